"""The whole method, stage by stage: data -> saliency -> stage 1 -> stage 2 -> evaluate -> report.

`run(config, workdir)` is what `launch.py` calls. Each stage leaves its outputs
in the work directory and a marker in `stages/`; a finished stage is skipped on
the next run and an interrupted training stage resumes from its last Orbax
checkpoint (see workdir.py and checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import _validate
from fgir_jax import data as data_lib
from fgir_jax import metrics
from fgir_jax import models
from fgir_jax import saliency
from fgir_jax.progress import Progress
from fgir_jax.data import augment
from fgir_jax.data import batching
from fgir_jax.train import config as config_lib
from fgir_jax.train import inference
from fgir_jax.train import stage1 as stage1_lib
from fgir_jax.train import stage2 as stage2_lib
from fgir_jax.train.checkpoints import StageCheckpoints
from fgir_jax.train.workdir import Workdir, write_json


class Run:
  """What the stages share: the config, the work directory and loaded arrays."""

  def __init__(self, config, workdir: str, echo=print):
    self.config = config
    self.stages = config_lib.stage_list(config)
    self.bits = config_lib.bit_list(config)
    check_config(config, self.bits)  # bad values fail now, not hours into a run
    self.wd = Workdir(workdir, config.to_dict(), overwrite=bool(config.overwrite))
    self.echo = echo
    self.key = jax.random.key(int(config.seed))
    self.dataset = None      # data_lib.Dataset, rows in source order
    self.images = None       # (n, s, s, 3) uint8, uncropped
    self.crops = None        # (n, s, s, 3) uint8, saliency crops (or the images)

  @property
  def size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def cache_dir(self) -> str:
    return self.config.data.cache_dir or self.wd.dir("cache")

  def stage_key(self, name: str) -> jax.Array:
    return jax.random.fold_in(self.key, sum(map(ord, name)))


def check_config(config, bits) -> None:
  """Raises ValueError for a bad value anywhere in the config, before any work."""
  _validate.check_choice(config.data.source, config_lib.SOURCES, "data.source")
  _validate.check_choice(config.saliency.mode, ("largest", "all"), "saliency.mode")
  _validate.check_choice(config.saliency.network, ("stage1", "pretrained"), "saliency.network")
  _validate.check_choice(config.model.dtype, ("float32", "bfloat16"), "model.dtype")
  if not 0.0 <= config.saliency.alpha < 1.0:
    raise ValueError(f"saliency.alpha must be in [0, 1), got {config.saliency.alpha}.")
  if int(config.data.image_size) < 16:
    raise ValueError(f"data.image_size must be at least 16 pixels, got {config.data.image_size}.")
  stage1_settings(config)
  for b in bits:
    stage2_settings(config, b, num_classes=2)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def load_dataset(config) -> data_lib.Dataset:
  """The configured source as a Dataset.

  cub / dogs read a local folder when data.root is set, else go through
  tensorflow-datasets (which downloads where it can, or reads the archives
  from data.tfds_manual_dir). A missing folder is an error, never a download.
  """
  d = config.data
  if d.source == "synthetic":
    s = d.synthetic
    ds = data_lib.make_synthetic(num_classes=s.num_classes, per_class=s.per_class, size=s.size,
                                 test_fraction=s.test_fraction, seed=int(config.seed),
                                 clutter=s.clutter)
  elif d.source == "folder":
    if not d.root:
      raise ValueError("data.source='folder' reads root/<class>/<image>: pass --config.data.root=DIR.")
    ds = data_lib.read_folder(d.root, test_fraction=d.folder_test_fraction, seed=int(config.seed))
  elif d.root:
    ds = (data_lib.read_cub if d.source == "cub" else data_lib.read_dogs)(d.root)
  else:
    name = {"cub": "caltech_birds2011", "dogs": "stanford_dogs"}[d.source]
    ds = data_lib.load_tfds(name, data_dir=d.tfds_data_dir, manual_dir=d.tfds_manual_dir)
  return _first_classes(ds, int(d.max_classes))


def _first_classes(ds: data_lib.Dataset, max_classes: int) -> data_lib.Dataset:
  """Keeps the first `max_classes` classes (quick runs on a big dataset)."""
  if max_classes <= 0 or max_classes >= len(ds.class_names):
    return ds
  kept = ds.subset(ds.labels < max_classes)
  return dataclasses.replace(kept, name=f"{ds.name}-first{max_classes}",
                             class_names=ds.class_names[:max_classes])


def stage_data(run: Run) -> dict:
  ds = load_dataset(run.config)
  cached = data_lib.cached_images(ds, run.size, run.cache_dir, skip_bad=run.config.data.skip_bad,
                                  progress=bool(run.config.progress))
  if len(cached.kept) != len(ds.labels):
    ds = ds.subset(cached.kept)
  run.dataset, run.images = ds, cached.images
  return {"images": len(ds.labels), "train": int(ds.is_train.sum()),
          "test": int((~ds.is_train).sum()), "classes": len(ds.class_names),
          "skipped": len(getattr(cached, "bad", []) or [])}


# ----------------------------------------------------------------------------
# Networks and stage 1 (cross-entropy)
# ----------------------------------------------------------------------------
def make_net(config, num_classes: int, enhance: bool | None = None) -> models.RetrievalNet:
  """The stage-1 network of the config (no hash head: stage 2 trains it on features)."""
  m = config.model
  return models.RetrievalNet(
      num_classes=num_classes, hash_bits=None,
      enhance=m.enhance if enhance is None else enhance, width=m.width,
      enhance_scale=m.enhance_scale, dtype=jnp.dtype(m.dtype))


def init_variables(run: Run, net, key) -> dict:
  dummy = jnp.zeros((1, run.size, run.size, 3), jnp.float32)
  variables = jax.jit(functools.partial(net.init, train=False))(key, dummy)
  if run.config.model.pretrained:
    variables = models.load_torchvision_resnet18(run.config.model.pretrained, variables)
  return variables


def _inputs(run: Run, images, labels) -> batching.DeviceInput:
  s1 = run.config.stage1
  train_tf = augment.transform_fn(True, size=run.size, crop=s1.crop,
                                  scale=(float(s1.crop_scale_min), 1.0))
  return batching.DeviceInput(images, labels, train_transform=train_tf,
                              eval_transform=augment.transform_fn(False))


def stage1_settings(config) -> stage1_lib.Stage1Settings:
  s1 = config.stage1
  return stage1_lib.Stage1Settings(
      epochs=s1.epochs, batch_size=s1.batch_size, learning_rate=s1.learning_rate,
      momentum=s1.momentum, weight_decay=s1.weight_decay, warmup_epochs=s1.warmup_epochs,
      label_smoothing=s1.label_smoothing)


def train_classifier(run: Run, name: str, images: np.ndarray, epochs: int = 0):
  """Stage 1 on `images` (train split); returns (net, final variables, accuracy on the queries).

  epochs > 0 overrides stage1.epochs (the saliency bootstrap network).
  """
  ds, settings = run.dataset, stage1_settings(run.config)
  if epochs > 0:
    settings = dataclasses.replace(settings, epochs=int(epochs))
  train_in = _inputs(run, images[ds.is_train], ds.labels[ds.is_train])
  query_in = _inputs(run, images[~ds.is_train], ds.labels[~ds.is_train])
  net = make_net(run.config, len(ds.class_names))
  steps = train_in.steps_per_epoch(settings.batch_size, train_in.num_examples >= settings.batch_size)
  optimizer = stage1_lib.make_optimizer(settings, steps)
  key = run.stage_key(name)
  state = stage1_lib.create_state(init_variables(run, net, key), optimizer)
  with StageCheckpoints(run.wd.dir("ckpt", name), best_metric="accuracy") as ckpt:
    start, acc = 0, float("nan")
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(ckpt.latest_step(), state)
      start, acc = int(meta["epoch"]), float(meta["metrics"]["accuracy"])
      run.echo(f"{name}: resuming after epoch {start}")
    for epoch in range(start, settings.epochs):
      state, train_stats = _classifier_epoch(run, name, net, optimizer, settings, state,
                                             train_in, key, epoch)
      acc = _query_accuracy(run, net, stage1_lib.variables_of(state), query_in)
      ckpt.save(epoch + 1, state, {"epoch": epoch + 1, "metrics": {"accuracy": acc}})
      run.wd.log(name, epoch=epoch + 1, accuracy=acc, **train_stats)
      run.echo(f"{name}: epoch {epoch + 1}/{settings.epochs} loss {train_stats['loss']:.4f} "
               f"train acc {train_stats['train_accuracy']:.3f} query acc {acc:.4f}")
  # Downstream stages use the final epoch (the best one is kept on disk too):
  # picking the epoch by query accuracy would tune on the test set.
  return net, stage1_lib.variables_of(state), acc


def _classifier_epoch(run, name, net, optimizer, settings, state, train_in, key, epoch):
  sums, count = {}, 0
  # Full batches only, unless the set is smaller than one batch (tiny runs).
  drop = train_in.num_examples >= settings.batch_size
  progress = _progress(run, train_in.steps_per_epoch(settings.batch_size, drop) * settings.batch_size,
                       f"{name} epoch {epoch + 1}")
  for batch in train_in.train_batches(key, epoch, settings.batch_size, drop_remainder=drop):
    state, m = stage1_lib.train_step(state, batch, net=net, optimizer=optimizer,
                                     label_smoothing=settings.label_smoothing)
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
    progress.update(settings.batch_size)
  progress.close()
  stats = {k: float(v) / max(count, 1) for k, v in sums.items()}
  if not np.isfinite(stats.get("loss", 0.0)):
    raise FloatingPointError(
        f"{name}: the loss became {stats['loss']} in epoch {epoch + 1}; the last good "
        "checkpoint is kept: lower stage1.learning_rate and run again to resume.")
  stats["train_accuracy"] = stats.pop("accuracy", 0.0)
  return state, stats


def _query_accuracy(run, net, variables, query_in) -> float:
  out = inference.run_network(net, variables, query_in, batch_size=run.config.eval.batch_size)
  return metrics.accuracy(out["logits"], query_in.labels_np)


def _progress(run, total, desc):
  return Progress(total, desc, enabled=bool(run.config.progress))


def encode_all(run: Run, net, variables, images, desc: str, with_maps: bool = False) -> dict:
  """Eval-mode outputs for every image, with a progress bar (a long pass on big sets)."""
  progress = _progress(run, len(images), desc)
  out = inference.run_network(net, variables, batching.DeviceInput(images, run.dataset.labels),
                              batch_size=run.config.eval.batch_size, with_maps=with_maps,
                              progress=progress.update)
  progress.close()
  return out


def stage_stage1(run: Run) -> dict:
  _, _, acc = train_classifier(run, "stage1", run.crops)
  return {"accuracy": acc}


def restore_stage1(run: Run):
  """The final stage-1 network of a finished run (for stage 2, evaluation, search)."""
  net = make_net(run.config, len(run.dataset.class_names))
  key = run.stage_key("stage1")
  variables = init_variables_shapes(run, net, key)
  like = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  with StageCheckpoints(run.wd.file("ckpt", "stage1"), best_metric="accuracy") as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f"{run.wd.path} has no stage-1 checkpoint; run the stage1 stage first.")
    full, _ = ckpt.restore(step, _state_like(like))
  return net, {"params": full["params"], "batch_stats": full["batch_stats"]}


def init_variables_shapes(run: Run, net, key):
  dummy = jax.ShapeDtypeStruct((1, run.size, run.size, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(net.init, train=False), key, dummy)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _state_like(variables):
  s1 = stage1_lib.Stage1Settings()
  return stage1_lib.create_state(variables, stage1_lib.make_optimizer(s1, 1))


# ----------------------------------------------------------------------------
# Saliency crop (PAPER step 1)
# ----------------------------------------------------------------------------
def saliency_network(run: Run):
  """The network whose last feature map gives the saliency maps."""
  sal = run.config.saliency
  if sal.network == "pretrained":
    if not run.config.model.pretrained:
      raise ValueError("saliency.network='pretrained' needs --config.model.pretrained=FILE "
                       "(a torchvision resnet18 .npz or .pth), or use saliency.network='stage1'.")
    net = make_net(run.config, len(run.dataset.class_names), enhance=False)
    return net, init_variables(run, net, run.stage_key("saliency_net"))
  if sal.network != "stage1":
    raise ValueError(f"saliency.network must be 'pretrained' or 'stage1', got {sal.network!r}.")
  # Bootstrap: a CE network trained on the uncropped images finds the object.
  net, variables, acc = train_classifier(run, "saliency_net", run.images,
                                        epochs=int(sal.epochs))
  run.wd.log("saliency_net", uncropped_accuracy=acc)
  return net, variables


def stage_saliency(run: Run) -> dict:
  sal, ds = run.config.saliency, run.dataset
  net, variables = saliency_network(run)
  out = encode_all(run, net, variables, run.images, "saliency maps", with_maps=True)
  boxes = np.asarray(saliency.boxes_from_maps(out["maps"], alpha=sal.alpha, mode=sal.mode,
                                              image_size=(run.size, run.size), margin=sal.margin))
  out_dir = run.wd.dir("saliency")
  np.savez(os.path.join(out_dir, "boxes.npz"), boxes=boxes, maps=out["maps"])
  summary = {"alpha": sal.alpha, "mode": sal.mode,
             "mean_box_area": float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))}
  if ds.boxes is not None:
    summary["corloc"] = saliency.corloc(boxes, ds.boxes)
    summary["mean_iou"] = float(np.mean(np.asarray(saliency.iou(boxes, ds.boxes))))
    # The same measure for the uncropped image as a baseline: how much the crop localises.
    summary["full_image_corloc"] = saliency.corloc(np.tile([[0, 0, 1, 1]], (len(boxes), 1)), ds.boxes)
  run.wd.log("saliency", **summary)
  write_json(os.path.join(out_dir, "summary.json"), summary)
  return summary


def load_crops(run: Run) -> None:
  """run.crops: the saliency crops when the saliency stage ran, else the images."""
  path = run.wd.file("saliency", "boxes.npz")
  if not run.config.saliency.enabled or not os.path.exists(path):
    run.crops = run.images
    return
  boxes = np.load(path)["boxes"]
  run.crops = data_lib.cached_crops(run.dataset, boxes, run.size, run.cache_dir,
                                    skip_bad=run.config.data.skip_bad,
                                    progress=bool(run.config.progress)).images


# ----------------------------------------------------------------------------
# Stage 2 (hash layer + adaptive triplet loss) and evaluation
# ----------------------------------------------------------------------------
def pooled_features(run: Run) -> dict:
  """Pooled features of the frozen stage-1 network for every image (cached in stage2/)."""
  path = run.wd.file("stage2", "features.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return dict(f)
  net, variables = restore_stage1(run)
  out = encode_all(run, net, variables, run.crops, "pooled features")
  feats = {"features": out["pooled"], "labels": run.dataset.labels, "is_train": run.dataset.is_train}
  run.wd.dir("stage2")
  tmp = path + ".tmp.npz"
  np.savez(tmp, **feats)
  os.replace(tmp, path)
  return feats


def stage2_settings(config, bits: int, num_classes: int = 0) -> stage2_lib.Stage2Settings:
  s = config.stage2
  return stage2_lib.Stage2Settings(num_classes=num_classes,
      bits=bits, epochs=s.epochs, mine_every=s.mine_every, batch_size=s.batch_size,
      learning_rate=s.learning_rate, loss=s.loss, margin_mode=s.margin_mode, margin=s.margin,
      ema_decay=s.ema_decay, beta=s.beta, neg_factor=s.neg_factor)


def _codes(params, features):
  return np.asarray(stage2_lib.hash_outputs(params, jnp.asarray(features)) > 0)


def train_bits(run: Run, feats: dict, bits: int) -> dict:
  """Stage 2 at one code length, resumable; returns the final hash params."""
  settings = stage2_settings(run.config, bits, len(run.dataset.class_names))
  tr = feats["is_train"]
  x_train, y_train = feats["features"][tr], feats["labels"][tr]
  x_query, y_query = feats["features"][~tr], feats["labels"][~tr]
  name = f"stage2_{bits}"
  key = run.stage_key(name)
  fresh = lambda: stage2_lib.new_state(jax.random.split(key)[0], x_train, y_train, settings)
  eval_every = max(1, int(run.config.stage2.eval_every))

  with StageCheckpoints(run.wd.dir("ckpt", name), best_metric="map") as ckpt:
    state = None
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(ckpt.latest_step(), fresh())
      run.echo(f"{name}: resuming after epoch {int(state['epoch'])}")

    def on_epoch(epoch, state, stats):
      row = dict(stats)
      if epoch % eval_every == 0 or epoch == settings.epochs:
        params = stage2_lib.hash_params(state)
        row["map"] = metrics.mean_average_precision(
            _codes(params, x_query), y_query, _codes(params, x_train), y_train)
      ckpt.save(epoch, state, {"epoch": epoch, "metrics": {"map": row.get("map", -1.0)}})
      run.wd.log(name, epoch=epoch, **row)
      shown = " ".join(f"{k} {v:.4f}" for k, v in row.items())
      run.echo(f"{name}: epoch {epoch}/{settings.epochs} {shown}")

    state = stage2_lib.train_hash_layer(key, x_train, y_train, settings, state=state,
                                        on_epoch=on_epoch)
  return stage2_lib.hash_params(state)


def stage_stage2(run: Run) -> dict:
  feats = pooled_features(run)
  summary = {}
  for bits in run.bits:
    params = train_bits(run, feats, bits)
    np.savez(run.wd.file("stage2", f"hash_{bits}.npz"), **jax.device_get(params))
    summary[str(bits)] = True
  return summary


def stage_evaluate(run: Run) -> dict:
  feats = pooled_features(run)
  tr = feats["is_train"]
  k = int(run.config.eval.precision_k)
  results = {"map": {}, "map_tie_aware": {}, f"precision_at_{k}": {}, "dataset": run.dataset.name,
             "queries": int((~tr).sum()), "database": int(tr.sum())}
  for bits in run.bits:
    with np.load(run.wd.file("stage2", f"hash_{bits}.npz")) as f:
      params = dict(f)
    q, db = _codes(params, feats["features"][~tr]), _codes(params, feats["features"][tr])
    args = (q, feats["labels"][~tr], db, feats["labels"][tr])
    results["map"][str(bits)] = metrics.mean_average_precision(*args)
    results["map_tie_aware"][str(bits)] = metrics.mean_average_precision(*args, ties="average")
    results[f"precision_at_{k}"][str(bits)] = metrics.precision_at_k(*args, k=k)
    np.savez(run.wd.file("stage2", f"codes_{bits}.npz"), query=np.packbits(q, axis=1),
             database=np.packbits(db, axis=1), bits=bits)
  stage1 = run.wd.done("stage1") or {}
  results["accuracy"] = stage1.get("accuracy")
  sal = run.wd.done("saliency") or {}
  for key in ("corloc", "mean_iou"):
    if key in sal:
      results[key] = sal[key]
  write_json(run.wd.file("results.json"), results)
  run.wd.log("evaluate", **{f"map_{b}": v for b, v in results["map"].items()})
  return results


def stage_report(run: Run) -> dict:
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  path = report.write_report(run.wd, run.config)
  return {"report": path}


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------
# The stages after "data", which every run needs for its arrays (a cache hit when done).
_STAGES = {"saliency": stage_saliency, "stage1": stage_stage1, "stage2": stage_stage2,
           "evaluate": stage_evaluate, "report": stage_report}
_NEED_IMAGES = ("data", "saliency", "stage1", "stage2", "evaluate")


def run(config, workdir: str, echo=print) -> dict:
  """Runs the stages the config names; returns results.json's content (if written)."""
  r = Run(config, workdir, echo)
  todo = [s for s in r.stages if r.wd.done(s) is None]
  skipped = [s for s in r.stages if s not in todo]
  if skipped:
    echo(f"already done, skipped: {', '.join(skipped)}")
  if any(s in todo for s in _NEED_IMAGES):
    stage_data_summary = stage_data(r)
    if "data" in todo:
      r.wd.mark_done("data", stage_data_summary)
      r.wd.log("data", **stage_data_summary)
      todo.remove("data")
    echo(f"data: {stage_data_summary}")
  for name in todo:
    if name == "saliency" and not config.saliency.enabled:
      r.wd.mark_done(name, {"enabled": False})
      continue
    if name in ("stage1", "stage2", "evaluate") and r.crops is None:
      load_crops(r)
    echo(f"== {name}")
    summary = _STAGES[name](r)
    r.wd.mark_done(name, summary)
  path = r.wd.file("results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}
