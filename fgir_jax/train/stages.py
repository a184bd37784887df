"""The stages of a run as a graph keyed by their inputs: what each reads, what it writes.

Every stage has
  - the config keys it reads (`reads`),
  - the stages whose outputs it uses (`after`),
  - the paths it writes in the work directory (`OUTPUTS`).
Its fingerprint hashes its keys' values with its upstream stages' fingerprints,
so a changed key reruns exactly that stage and what depends on it, and
nothing else: adding a code length trains one more hash layer, a stage-2
setting keeps stage 1. Stage 2 is one stage per code length (`stage2_64`).

    steps = stages.plan(config, wd, rerun={"stage1"})
    for step in steps: print(step.stage, step.reason)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from fgir_jax.train import config as config_lib

# Keys that choose what to run, where, or how to show it: never a stage's input.
RUN_ONLY = ("stages", "rerun", "progress", "data.cache_dir", "eval.batch_size",
            "stage1.eval_every", "stage2.eval_every", "stage2.bits")
RUN_ONLY_PREFIXES = ("parallel.",)

# Paths each stage writes (relative to the work directory); "{bits}" for stage2_<bits>.
OUTPUTS = {
    "data": ("examples",),
    "saliency": ("saliency", "ckpt/saliency_net"),
    "stage1": ("ckpt/stage1", "stage1"),
    "stage2": ("ckpt/stage2_{bits}", "stage2/hash_{bits}.npz"),
    "evaluate": ("results.json", "index", "codes"),
    "report": ("report.md", "plots"),
}
# metrics.jsonl rows that belong to each stage (copied with it when reused).
LOG_STAGES = {"saliency": ("saliency", "saliency_net")}


def flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def comparable(config) -> dict:
  """The config's flattened keys that can change a result (JSON values)."""
  flat = flatten(json.loads(config.to_json_best_effort()))
  return {k: v for k, v in flat.items()
          if k not in RUN_ONLY and not k.startswith(RUN_ONLY_PREFIXES)}


def _pick(flat: dict, prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict:
  return {k: v for k, v in flat.items()
          if any(k == p or k.startswith(p) for p in prefixes) and k not in exclude}


def base_name(stage: str) -> str:
  """stage2_64 -> stage2."""
  return "stage2" if stage.startswith("stage2_") else stage


def bits_of(stage: str) -> int | None:
  return int(stage.split("_", 1)[1]) if stage.startswith("stage2_") else None


def outputs(stage: str) -> tuple[str, ...]:
  bits = bits_of(stage)
  return tuple(p.format(bits=bits) for p in OUTPUTS[base_name(stage)])


def concrete(config) -> list[str]:
  """The stages config.stages names, stage2 expanded per code length, in run order."""
  names = []
  for stage in config_lib.stage_list(config):
    if stage == "stage2":
      names += [f"stage2_{b}" for b in config_lib.bit_list(config)]
    else:
      names.append(stage)
  return names


def all_stages(config) -> list[str]:
  return ["data", "saliency", "stage1"] + [f"stage2_{b}" for b in config_lib.bit_list(config)] + [
      "evaluate", "report"]


def reads(config, stage: str) -> dict:
  """{key: value} of the config keys `stage` reads."""
  flat = comparable(config)
  model = ("model.",)
  stage1 = ("stage1.",)
  if stage == "data":
    return _pick(flat, ("seed", "data."))
  if stage == "saliency":
    if not config.saliency.enabled:
      return {"saliency.enabled": False}
    if config.saliency.network == "pretrained":
      # A network that is only run: the ImageNet backbone, without block or heads.
      return _pick(flat, ("saliency.", "model.backbone", "model.width", "model.depth",
                          "model.pretrained",
                          "model.dtype"), exclude=("saliency.epochs",))
    return _pick(flat, ("seed", "saliency.") + model + stage1)  # the bootstrap classifier
  if stage == "stage1":
    return _pick(flat, ("seed",) + model + stage1)
  if stage.startswith("stage2_"):
    return dict(_pick(flat, ("seed", "stage2.")), bits=bits_of(stage))
  if stage == "evaluate":
    return dict(_pick(flat, ("eval.",)), bits=config_lib.bit_list(config))
  if stage == "report":
    return flat
  raise ValueError(f"unknown stage {stage!r}.")


def after(config, stage: str) -> tuple[str, ...]:
  """The stages whose outputs `stage` uses."""
  if stage == "data":
    return ()
  if stage == "saliency":
    return ("data",)
  if stage == "stage1":
    return ("data", "saliency")
  if stage.startswith("stage2_"):
    return ("stage1",)
  if stage == "evaluate":
    return tuple(f"stage2_{b}" for b in config_lib.bit_list(config))
  return ("saliency", "stage1", "evaluate")


def fingerprints(config) -> dict[str, str]:
  """{stage: hash of its inputs and its upstream stages' fingerprints}."""
  out = {}
  for stage in all_stages(config):
    blob = json.dumps({"reads": reads(config, stage),
                       "after": {a: out[a] for a in after(config, stage)}},
                      sort_keys=True, default=str)
    out[stage] = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
  return out


@dataclasses.dataclass
class Step:
  """A stage to run and why."""
  stage: str
  reason: str           # "not run yet", "resuming", "rerun requested", "<key> a -> b", ...
  replaces: bool        # a finished result exists and will be replaced when this one is done


def _changes(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new))
  return [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
          for k in keys if old.get(k) != new.get(k)]


def plan(config, wd, rerun=()) -> list[Step]:
  """The stages of config.stages to run now, in order, each with its reason.

  A stage runs when it never finished, when one of its keys or upstream stages
  changed since it finished, or when `rerun` names it (or a stage upstream).
  A stage this command already finished in staging (killed before the end)
  does not run again. Markers written before inputs were recorded count as up
  to date.
  """
  fps, todo = fingerprints(config), set(concrete(config))
  forced, steps, changed = set(rerun), [], set()
  for stage in all_stages(config):
    marker = wd.final_marker(stage)
    current = marker is not None and marker.get("fingerprint") in (None, fps[stage])
    if wd.staged_marker(stage, fps[stage]) is not None:
      if not current or stage in forced:
        changed.add(stage)  # finished in staging, replaces the final result at the end
      continue
    ups = [a for a in after(config, stage) if a in changed]
    if marker is None:
      reason, replaces = ("resuming" if wd.staging_matches(stage, fps[stage]) else "not run yet"), False
    elif stage in forced:
      reason, replaces = "rerun requested (--config.rerun)", True
    elif ups:
      reason, replaces = f"{', '.join(ups)} changed", True
    elif not current:
      diff = _changes(marker.get("inputs", {}), reads(config, stage))
      reason, replaces = (", ".join(diff) or "its inputs changed"), True
    else:
      continue
    if wd.staging_matches(stage, fps[stage]) and reason != "resuming":
      reason += " (resuming)"
    changed.add(stage)
    if stage in todo:
      steps.append(Step(stage, reason, replaces))
  return steps


def describe(steps: list[Step], config) -> list[str]:
  """Lines for the user: each stage that changed at its root, and what it reruns."""
  lines, shown = [], set()
  for step in steps:
    if step.stage in shown or not step.replaces:
      continue
    downstream = _downstream(config, step.stage, {s.stage for s in steps})
    shown.update(downstream)
    lines.append(f"{step.stage}: {step.reason}; reruns {', '.join(downstream)} "
                 "(the finished results stay until the new ones are complete)")
  return lines


def _downstream(config, stage: str, running: set) -> list[str]:
  out, frontier = [stage], {stage}
  for s in all_stages(config):
    if s in frontier:
      continue
    if any(a in frontier for a in after(config, s)):
      frontier.add(s)
      if s in running:
        out.append(s)
  return out
