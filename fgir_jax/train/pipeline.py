"""The whole method, stage by stage: data -> saliency -> stage 1 -> stage 2 -> evaluate -> report.

`run(config, workdir)` is what `launch.py` calls. Each stage leaves its outputs
in the work directory and a marker in `stages/`; a finished stage is skipped on
the next run and an interrupted training stage resumes from its last Orbax
checkpoint (see workdir.py and checkpoints.py).
"""

from __future__ import annotations

import json
import os

from fgir_jax import _validate
from fgir_jax import models
from fgir_jax.train import classifier
from fgir_jax.train import config as config_lib
from fgir_jax.train import data_stage
from fgir_jax.train import hashing
from fgir_jax.train import inference
from fgir_jax.train import saliency_stage
from fgir_jax.train.context import Run


def check_config(config, bits) -> None:
  """Raises ValueError for a bad value anywhere in the config, before any work."""
  _validate.check_choice(config.data.source, config_lib.SOURCES, "data.source")
  _validate.check_choice(config.saliency.mode, ("largest", "all"), "saliency.mode")
  _validate.check_choice(config.saliency.network, ("stage1", "pretrained"), "saliency.network")
  _validate.check_choice(config.saliency.layer, inference.MAP_LAYERS, "saliency.layer")
  _validate.check_choice(config.model.dtype, ("float32", "bfloat16"), "model.dtype")
  _validate.check_choice(config.model.backbone, models.BACKBONES, "model.backbone")
  models.retrieval_net.make_backbone(classifier.make_net(config, 2), parent=None)  # frozen_stages
  pretrained = config.model.pretrained
  if pretrained and pretrained != "imagenet" and not os.path.isfile(pretrained):
    raise ValueError(f"model.pretrained={pretrained!r} is neither 'imagenet' nor an existing "
                     ".pth / .npz file; fix the path or pass --config.model.pretrained=imagenet.")
  if not 0.0 <= config.saliency.alpha < 1.0:
    raise ValueError(f"saliency.alpha must be in [0, 1), got {config.saliency.alpha}.")
  if int(config.data.image_size) < 16:
    raise ValueError(f"data.image_size must be at least 16 pixels, got {config.data.image_size}.")
  classifier.stage1_settings(config)
  for b in bits:
    hashing.stage2_settings(config, b, num_classes=2)




def stage_report(run: Run) -> dict:
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  path = report.write_report(run.wd, run.config, run.dataset, run.images, run.crops)
  return {"report": path}


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------
# Every stage after "data" needs its arrays (a cache hit once decoded); the report draws them.
_STAGES = {"saliency": saliency_stage.stage_saliency, "stage1": classifier.stage_stage1,
           "stage2": hashing.stage_stage2, "evaluate": hashing.stage_evaluate,
           "report": stage_report}
_NEED_IMAGES = ("data", "saliency", "stage1", "stage2", "evaluate", "report")


def run(config, workdir: str, echo=print) -> dict:
  """Runs the stages the config names; returns results.json's content (if written)."""
  check_config(config, config_lib.bit_list(config))  # bad values fail now, not hours in
  if config.model.pretrained == "imagenet":
    # Fetched (or found) before the run starts: no network fails here, in one line.
    models.imagenet_file(config.model.backbone, progress=bool(config.progress))
  r = Run(config, workdir, echo)
  todo = [s for s in r.stages if r.wd.done(s) is None]
  skipped = [s for s in r.stages if s not in todo]
  if skipped:
    echo(f"already done, skipped: {', '.join(skipped)}")
  if any(s in todo for s in _NEED_IMAGES):
    stage_data_summary = data_stage.stage_data(r)
    if "data" in todo:
      r.wd.mark_done("data", stage_data_summary)
      r.wd.log("data", **stage_data_summary)
      todo.remove("data")
    echo(f"data: {stage_data_summary}")
  for name in todo:
    if name == "saliency" and not config.saliency.enabled:
      r.wd.mark_done(name, {"enabled": False})
      continue
    if name in ("stage1", "stage2", "evaluate", "report") and r.crops is None:
      saliency_stage.load_crops(r)
    echo(f"== {name}")
    summary = _STAGES[name](r)
    r.wd.mark_done(name, summary)
  path = r.wd.file("results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}
