"""The saliency stage (PAPER.md step 1): maps from a CNN's last feature map -> boxes -> crops."""

from __future__ import annotations

import numpy as np

from fgir_jax import data as data_lib
from fgir_jax import saliency
from fgir_jax.train import finished
from fgir_jax.train import networks
from fgir_jax.train import stage1
from fgir_jax.train import stages
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import write_json


def saliency_network(run: Run, seed: int = 0):
  """(net, variables, bootstrap accuracy or None): the network whose last feature map gives
  the saliency maps; saliency.network "stage1" trains it here (and saves it), one per seed
  when config.seeds_from is "saliency"."""
  sal, classes = run.config.saliency, len(run.dataset.class_names)
  if sal.network == "pretrained":
    if not run.config.model.pretrained:
      raise ValueError("saliency.network='pretrained' needs --config.model.pretrained=imagenet "
                       "(or a .pth / .npz file), or use --config.saliency.network=stage1.")
    return (*finished.Finished(run).saliency_network(classes), None)
  if sal.network != "stage1":
    raise ValueError(f"saliency.network must be 'pretrained' or 'stage1', got {sal.network!r}.")
  # Bootstrap: a CE network trained on the uncropped images finds the object.
  sfx = stages.seed_suffix(seed)
  net, variables, acc = stage1.train_classifier(run, "saliency_net" + sfx, run.images,
                                                epochs=int(sal.epochs))
  networks.save_variables(run.wd.out("saliency" + sfx, "network.msgpack"), variables)
  run.wd.log("saliency_net" + sfx, uncropped_accuracy=acc)
  return net, variables, acc


def stage_saliency(run: Run, seed: int = 0) -> dict:
  sal, ds = run.config.saliency, run.dataset
  out_dir = stages.stage_name("saliency", seed=seed)
  net, variables, uncropped_accuracy = saliency_network(run, seed)
  out = stage1.encode_all(run, net, variables, run.images, "saliency maps", with_maps=True)
  boxes = np.asarray(saliency.boxes_from_maps(out["maps"], alpha=sal.alpha, mode=sal.mode,
                                              image_size=(run.size, run.size), margin=sal.margin))
  np.savez(run.wd.out(out_dir, "boxes.npz"), boxes=boxes, maps=out["maps"])
  summary = {"alpha": sal.alpha, "mode": sal.mode,
             "mean_box_area": float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))}
  if uncropped_accuracy is not None:
    # The bootstrap network is stage 1 on uncropped images: "saliency off" for free.
    summary["uncropped_accuracy"] = uncropped_accuracy
  if ds.boxes is not None:
    summary["corloc"] = saliency.corloc(boxes, ds.boxes)
    summary["mean_iou"] = float(np.mean(np.asarray(saliency.iou(boxes, ds.boxes))))
    # The same measure for the uncropped image as a baseline: how much the crop localises.
    summary["full_image_corloc"] = saliency.corloc(np.tile([[0, 0, 1, 1]], (len(boxes), 1)), ds.boxes)
  run.wd.log(out_dir, **summary)
  write_json(run.wd.out(out_dir, "summary.json"), summary)
  return summary


def load_crops(run: Run, seed: int = 0) -> None:
  """run.crops: the saliency crops (of seed `seed`'s boxes) when the run crops, else the images."""
  run.crops_seed = stages.upstream_of(run.config, "saliency", seed)
  boxes = finished.Finished(run).boxes(seed)
  if boxes is None:
    run.crops = run.images
    return
  run.crops = data_lib.cached_crops(run.dataset, boxes, run.size, run.cache_dir,
                                    skip_bad=run.config.data.skip_bad,
                                    progress=bool(run.config.progress)).images
