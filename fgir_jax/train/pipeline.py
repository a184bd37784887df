"""The whole method, stage by stage: data -> saliency -> stage 1 -> stage 2 -> evaluate -> report.

`run(config, workdir)` is what `launch.py` calls. It checks everything it can
before writing anything (config values, the data, the weights file), then runs
the stages whose inputs changed since they last finished (stages.plan says
which and why), each writing into its staging directory and committed when
complete (workdir.py). A killed run resumes from its last Orbax checkpoint
when the same command is run again; finished results are never deleted, only
replaced by the completed results of a rerun. One command writes to a work
directory at a time (`Workdir.writing`); it first completes a commit that a
kill interrupted.

Several processes (jax.distributed, config.parallel.distributed) run the same
command: every one computes every stage, feeding its share of each global
batch, and process 0 alone writes the work directory; the others wait for it
at the start of each stage and at the commit (`parallel.barrier`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

from fgir_jax import _validate
from fgir_jax import models
from fgir_jax import parallel
from fgir_jax.models import weights as weights_lib
from fgir_jax.train import config as config_lib
from fgir_jax.train import data_stage
from fgir_jax.train import evaluate
from fgir_jax.train import inference
from fgir_jax.train import networks
from fgir_jax.train import saliency_stage
from fgir_jax.train import stage1
from fgir_jax.train import stage2
from fgir_jax.train import stages as stages_lib
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import FollowerWorkdir, Workdir


def check_config(config, bits) -> None:
  """Raises ValueError for a bad value anywhere in the config, before any work."""
  _validate.check_choice(config.data.source, config_lib.SOURCES, "data.source")
  _validate.check_choice(config.saliency.mode, ("largest", "all"), "saliency.mode")
  _validate.check_choice(config.saliency.network, ("stage1", "pretrained"), "saliency.network")
  _validate.check_choice(config.model.dtype, ("float32", "bfloat16"), "model.dtype")
  _validate.check_choice(config.model.backbone, models.BACKBONES, "model.backbone")
  backbone = models.retrieval_net.make_backbone(networks.make_net(config, 2), parent=None)
  stages = len(getattr(backbone, "stages", None) or backbone.stage_sizes)
  inference.check_map_layer(config.saliency.layer, stages)
  pretrained = config.model.pretrained
  if pretrained and pretrained != "imagenet" and not os.path.isfile(pretrained):
    raise ValueError(f"model.pretrained={pretrained!r} is neither 'imagenet' nor an existing "
                     ".pth / .npz file; fix the path or pass --config.model.pretrained=imagenet.")
  if not 0.0 <= config.saliency.alpha < 1.0:
    raise ValueError(f"saliency.alpha must be in [0, 1), got {config.saliency.alpha}.")
  if int(config.data.image_size) < 16:
    raise ValueError(f"data.image_size must be at least 16 pixels, got {config.data.image_size}.")
  _check_seeds(config)
  stage1.stage1_settings(config)
  for b in bits:
    stage2.stage2_settings(config, b, num_classes=2)




def _check_seeds(config) -> None:
  seeds = config.seeds
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds must be a positive integer (how many seeds), got {seeds!r}.")
  _validate.check_choice(config.seeds_from, ("stage2", "stage1", "saliency"), "seeds_from")
  if config.seeds_from == "saliency" and config.saliency.network != "stage1":
    raise ValueError("seeds_from='saliency' repeats the saliency stage's bootstrap classifier, "
                     f"but saliency.network is {config.saliency.network!r}, which trains "
                     "nothing there: use --config.seeds_from=stage1.")


def check_rerun(config) -> set[str]:
  """config.rerun as a set of concrete stages ("stage2" and "evaluate": every code length)."""
  names = [n.strip() for n in str(config.rerun or "").split(",") if n.strip()]
  known = stages_lib.all_stages(config)
  out = set()
  for name in names:
    if name in stages_lib.PER_LENGTH:
      out.update(s for s in known if stages_lib.base_name(s) == name)
    elif name in known:
      out.add(name)
    else:
      raise ValueError(f"--config.rerun names {name!r}, which is not a stage of this run; "
                       f"choose from {', '.join(list(stages_lib.PER_LENGTH) + known)}.")
  return out


def stage_report(run: Run) -> dict:
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  path = report.write_report(run.wd, run.config, run.dataset, run.images, run.crops)
  return {"report": os.path.relpath(path, run.wd.staging("report"))}


def weights_digest(config) -> str | None:
  """The SHA-256 of the file behind model.pretrained (the standard file for "imagenet")."""
  if not config.model.pretrained:
    return None
  path = (models.imagenet_file(config.model.backbone, progress=bool(config.progress))
          if config.model.pretrained == "imagenet" else config.model.pretrained)
  return weights_lib.sha256_once(path)


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------
def _run_stage(r: Run, stage: str, facts: stages_lib.Facts) -> dict:
  base, bits, seed = stages_lib.parse(stage)
  if base == "saliency":
    if not r.config.saliency.enabled:
      return {"enabled": False}
    return saliency_stage.stage_saliency(r, seed)
  if base in ("stage1", "report"):
    crop_seed = seed if base == "stage1" else 0
    if r.crops is None or r.crops_seed != stages_lib.upstream_of(r.config, "saliency", crop_seed):
      saliency_stage.load_crops(r, crop_seed)
  if base == "stage1":
    return stage1.stage_stage1(r, seed)
  if base == "stage2":
    return stage2.stage_stage2(r, bits, seed)
  if base == "evaluate":
    return evaluate.stage_evaluate(r, bits, seed)
  if stage == "results":
    return evaluate.stage_results(r, facts.kept_bits)
  if not parallel.is_primary():
    return {}  # no collectives in the report: process 0 draws it alone
  return stage_report(r)


def run(config, workdir: str, echo=print, reuse_from=(), command: str | None = None) -> dict:
  """Runs the stages of config.stages that are not up to date; returns results.json's content.

  reuse_from: other work directories whose finished stages with the same
  inputs are taken over instead of recomputed (the ablation's variants).
  command: the command line that runs this (kept in command.txt for the hints
  of search and serve).
  Raises workdir.Busy (a ValueError) when another command is writing there.
  """
  bits = config_lib.bit_list(config)
  check_config(config, bits)  # bad values fail now, not hours in
  rerun = check_rerun(config)
  dataset = data_stage.load_dataset(config)  # a missing or degenerate dataset fails here
  data_stage.check_dataset(dataset, echo)
  # The weights file is fetched (or found) and hashed before anything is written: no
  # network fails here, in one line.
  parallel.on_primary(lambda: weights_digest(config) and None)  # fetched once, by process 0
  facts = stages_lib.Facts(data_files=data_stage.files_digest(dataset),
                           weights=weights_digest(config))
  # Nothing was written before this line.
  r = Run(config, workdir, echo, command=command)
  try:
    with writing(r.wd, r.command, r.echo):
      return _run_stages(r, dataset, facts, rerun, reuse_from, command)
  finally:
    if isinstance(r.wd, FollowerWorkdir):
      shutil.rmtree(r.wd.scratch, ignore_errors=True)


@contextlib.contextmanager
def writing(wd: Workdir, command: str, echo):
  """The work directory's write lock (Workdir.writing), taken by process 0 for every
  process of the run; the others start once it holds it (or stop with its error)."""
  with contextlib.ExitStack() as stack:
    parallel.on_primary(lambda: stack.enter_context(wd.writing(command, echo)) and None)
    yield wd


def _run_stages(r: Run, dataset, facts, rerun, reuse_from, command) -> dict:
  config, echo = r.config, r.echo
  stage1_fp = stages_lib.fingerprints(config, facts)["stage1"]
  facts = dataclasses.replace(facts, kept_bits=stages_lib.kept_lengths(config, r.wd, stage1_fp))
  fps = stages_lib.fingerprints(config, facts)
  r.wd.use_staged(fps)
  _reuse(r, reuse_from, fps)
  parallel.barrier("stages planned")  # the plan reads what process 0 staged
  steps = stages_lib.plan(config, facts, r.wd, rerun)
  for line in stages_lib.describe(steps, config):
    echo(line)
  if facts.kept_bits:
    echo(f"kept from an earlier command: {', '.join(map(str, facts.kept_bits))}-bit codes "
         "(search them with --bits; remove them with --mode remove --bits N)")
  todo = [step.stage for step in steps]
  skipped = [s for s in stages_lib.concrete(config) if s not in todo]
  if skipped:
    echo(f"already done, skipped: {', '.join(skipped)}")
  data_seconds = 0.0
  if todo:
    r.dataset = dataset
    started = time.time()
    # Process 0 decodes first and writes the decode cache; the others read it.
    summary = parallel.on_primary(lambda: data_stage.stage_data(r))
    if not parallel.is_primary():
      summary = data_stage.stage_data(r)
    data_seconds = time.time() - started
    echo(f"data: {summary['images']} images ({summary['train']} train / {summary['test']} test), "
         f"{summary['classes']} classes" + (f", {summary['skipped']} unreadable files skipped"
                                            if summary["skipped"] else ""))
  for step in steps:
    started = time.time()
    r.wd.begin(step.stage, fps[step.stage])
    # Its checkpoint folder exists for all, and the stage before it is finished in staging.
    parallel.barrier(f"{step.stage} staged")
    if step.stage == "data":
      summary = data_stage.data_summary(r)
      data_stage.write_examples(r)
      r.wd.log("data", **summary)
      started -= data_seconds  # the decode ran before the stages
    else:
      echo(f"== {step.stage}" + (" (resuming)" if "resuming" in step.reason else ""))
      try:
        summary = _run_stage(r, step.stage, facts)
      except BaseException:
        r.wd.abandon()  # the staged work stays, to resume; the finished results are untouched
        raise
    summary = dict(summary, seconds=round(time.time() - started, 1))
    r.wd.finish(step.stage, summary, fps[step.stage], stages_lib.reads(config, step.stage, facts),
                stages_lib.upstream(config, step.stage, fps))
  parallel.barrier("stages finished")
  # Everything this command computed replaces the finished results at once.
  r.wd.commit_all(stages_lib.all_stages(config), config.to_dict(), command, echo=echo)
  parallel.barrier("committed")
  path = r.wd.file("results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _reuse(r: Run, sources, fps) -> None:
  """Stages the finished stages of `sources` whose inputs equal this run's, to take them over."""
  if not sources:
    return
  others = [Workdir(path, writable=False) for path in sources
            if os.path.abspath(path) != r.wd.path and os.path.isdir(path)]
  for stage in stages_lib.all_stages(r.config):
    mine = r.wd.final_marker(stage)
    if mine is not None and mine.get("fingerprint") == fps[stage]:
      continue
    if r.wd.staged_marker(stage, fps[stage]) is not None:
      continue
    for other in others:
      marker = other.final_marker(stage)
      if marker is not None and marker.get("fingerprint") == fps[stage]:
        r.wd.adopt(other, stage, stages_lib.log_stages(stage))
        r.echo(f"{stage}: reused from {other.path} (same inputs)")
        break
