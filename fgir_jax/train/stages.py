"""The stages of a run as a graph keyed by their inputs: what each reads, what it writes.

Every stage has
  - its inputs (`reads`): the config keys it reads, the facts measured for
    them (the dataset's files, the weights file's SHA-256) and its code
    version, which a change to the stage's computation bumps;
  - the stages whose outputs it uses (`after`);
  - the paths it writes in the work directory (`OUTPUTS`).
Its fingerprint hashes its inputs with its upstream stages' fingerprints, so
a changed key, file or computation reruns exactly that stage and what depends
on it, and nothing else: adding a code length trains one more hash layer, a
stage-2 setting keeps stage 1. Stage 2 and evaluation are one stage per code
length (`stage2_64`, `evaluate_64`), each owning its outputs; `results`
gathers the lengths of the config into results.json, and lists finished
lengths the config no longer names (`Facts.kept_bits`) as kept.

Seeds (`config.seeds` = N > 1) repeat the stages a seed changes: stage 2 and
its evaluation always, and from `config.seeds_from` on ("stage1" or
"saliency") the earlier ones too. Seed k >= 1 of a stage is its own stage,
`<stage>_s<k>` (`stage2_64_s2`, `stage1_s1`), with the seed index among its
inputs and its own outputs (`stage2/hash_64_s2.npz`); seed 0 is the stage as
a one-seed run has it, so adding seeds keeps every finished stage and trains
only the new seeds. `results` reports the mean and spread over seeds.

    steps = stages.plan(config, facts, wd, rerun={"stage1"})
    for step in steps: print(step.stage, step.reason)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from fgir_jax.train import config as config_lib

# Keys that choose what to run, where, or how to show it: never a stage's input.
RUN_ONLY = ("stages", "rerun", "progress", "data.cache_dir", "eval.batch_size",
            "stage1.eval_every", "stage2.eval_every", "stage2.bits")
RUN_ONLY_PREFIXES = ("parallel.",)

# Paths each stage writes (relative to the work directory); "{bits}" for the per-length
# stages, "{seed}" the seed's suffix ("" for seed 0, "_s<k>" for seed k).
OUTPUTS = {
    "data": ("examples",),
    "saliency": ("saliency{seed}", "ckpt/saliency_net{seed}"),
    "stage1": ("ckpt/stage1{seed}", "stage1{seed}"),
    "stage2": ("ckpt/stage2_{bits}{seed}", "stage2/hash_{bits}{seed}.npz"),
    "evaluate": ("evaluate/{bits}{seed}.json", "codes/codes_{bits}{seed}.npz"),
    "results": ("results.json",),
    "report": ("report.md", "plots"),
}
# The searchable index: seed 0's codes (the other seeds only measure the spread).
INDEX_OUTPUTS = ("index/index_{bits}.npz", "index/index_{bits}.json")
# The stages that seeds can repeat, in order: config.seeds_from names the first one.
SEEDABLE = ("saliency", "stage1", "stage2", "evaluate")
# metrics.jsonl rows that belong to each stage (copied with it when reused); seed k's with
# the seed's suffix.
LOG_STAGES = {"saliency": ("saliency", "saliency_net")}
# Bumped when a stage computes something else from the same inputs: its
# finished results (and those after it) are then recomputed.
CODE_VERSIONS = {"data": 3, "saliency": 2, "stage1": 2, "stage2": 2, "evaluate": 3,
                 "results": 3, "report": 3}
PER_LENGTH = ("stage2", "evaluate")


@dataclasses.dataclass(frozen=True)
class Facts:
  """What a stage's inputs hold beyond the config, measured when a command starts.

  data_files: a digest of the dataset: each image file's path and contents, and
    the labels, split, boxes and class names (data_stage.files_digest).
  weights: the SHA-256 of the file behind model.pretrained (None without one).
  kept_bits: finished code lengths that config.stage2.bits no longer names and
    that still belong to the finished stage 1 (`kept_lengths`).
  """
  data_files: str | None = None
  weights: str | None = None
  kept_bits: tuple[int, ...] = ()


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


def _pick(flat: dict, names: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict:
  """The keys of `names`: "stage1." every key under it, "seed" that key alone."""
  return {k: v for k, v in flat.items()
          if any(k == p or (p.endswith(".") and k.startswith(p)) for p in names)
          and k not in exclude}


def parse(stage: str) -> tuple[str, int | None, int]:
  """stage2_64_s2 -> ("stage2", 64, 2); stage1 -> ("stage1", None, 0); results -> ("results", ...)."""
  parts = stage.split("_")
  seed = 0
  if len(parts) > 1 and parts[-1][:1] == "s" and parts[-1][1:].isdigit() and parts[0] in SEEDABLE:
    seed = int(parts.pop()[1:])
  bits = None
  if parts[0] in PER_LENGTH and len(parts) == 2 and parts[1].isdigit():
    bits = int(parts.pop())
  return "_".join(parts), bits, seed


def stage_name(base: str, bits: int | None = None, seed: int = 0) -> str:
  """The inverse of `parse`: ("stage2", 64, 2) -> stage2_64_s2."""
  return base + (f"_{bits}" if bits is not None else "") + (f"_s{seed}" if seed else "")


def base_name(stage: str) -> str:
  """stage2_64 -> stage2, evaluate_64_s1 -> evaluate, stage1_s2 -> stage1."""
  return parse(stage)[0]


def bits_of(stage: str) -> int | None:
  return parse(stage)[1]


def seed_of(stage: str) -> int:
  """The seed index of a stage: 0 for the stages of a one-seed run."""
  return parse(stage)[2]


def seed_suffix(seed: int) -> str:
  return f"_s{seed}" if seed else ""


def log_stages(stage: str) -> tuple[str, ...]:
  """The names of a stage's rows in metrics.jsonl."""
  base, _, seed = parse(stage)
  return tuple(n + seed_suffix(seed) for n in LOG_STAGES[base]) if base in LOG_STAGES else (stage,)


def outputs(stage: str) -> tuple[str, ...]:
  base, bits, seed = parse(stage)
  paths = OUTPUTS[base] + (INDEX_OUTPUTS if base == "evaluate" and seed == 0 else ())
  return tuple(p.format(bits=bits, seed=seed_suffix(seed)) for p in paths)


def seeds(config) -> int:
  return int(config.seeds)


def seeded(config, base: str) -> bool:
  """Whether seeds repeat stage `base` (stage 2 and evaluate always, earlier ones if asked)."""
  return (base in SEEDABLE and seeds(config) > 1
          and SEEDABLE.index(base) >= SEEDABLE.index(config.seeds_from))


def seed_list(config, base: str) -> range:
  return range(seeds(config) if seeded(config, base) else 1)


def expand(config, base: str) -> list[str]:
  """One stage name per code length (stage2, evaluate) and per seed that repeats it."""
  lengths = config_lib.bit_list(config) if base in PER_LENGTH else [None]
  return [stage_name(base, b, k) for b in lengths for k in seed_list(config, base)]


def per_length(config, base: str) -> list[str]:
  """Seed 0's stage of each code length: stage2_16, stage2_32, ..."""
  return [stage_name(base, b) for b in config_lib.bit_list(config)]


def concrete(config) -> list[str]:
  """The stages config.stages names, expanded per code length and seed, in run order."""
  names = []
  for stage in config_lib.stage_list(config):
    names += expand(config, stage)
    if stage == "evaluate":
      names.append("results")
  return names


def all_stages(config) -> list[str]:
  return (["data"] + expand(config, "saliency") + expand(config, "stage1")
          + expand(config, "stage2") + expand(config, "evaluate") + ["results", "report"])


def upstream_of(config, base: str, seed: int) -> str:
  """The stage `base` of seed `seed` reads: its own seed's when seeds repeat it, else seed 0's."""
  return stage_name(base, seed=seed if seeded(config, base) else 0)


def reads(config, stage: str, facts: Facts = Facts()) -> dict:
  """{key: value} of the inputs `stage` reads: config keys, measured facts, its code version,
  and for seed k >= 1 of a repeated stage the seed index."""
  base, bits, seed = parse(stage)
  inputs = _config_reads(config, stage_name(base, bits), facts)
  inputs["code_version"] = CODE_VERSIONS[base]
  if seed:
    inputs["seed_index"] = seed
  return inputs


def _config_reads(config, stage: str, facts: Facts) -> dict:
  flat = comparable(config)
  model = ("model.",)
  stage1 = ("stage1.",)
  weights = {"model.pretrained_sha256": facts.weights} if config.model.pretrained else {}
  if stage == "data":
    return dict(_pick(flat, ("seed", "data.")), **{"data.files": facts.data_files})
  if stage == "saliency":
    if not config.saliency.enabled:
      return {"saliency.enabled": False}
    if config.saliency.network == "pretrained":
      # A network that is only run: the ImageNet backbone, without block or heads.
      return dict(_pick(flat, ("saliency.", "model.backbone", "model.width", "model.depth",
                               "model.pretrained", "model.dtype"),
                        exclude=("saliency.epochs",)), **weights)
    return dict(_pick(flat, ("seed", "saliency.") + model + stage1), **weights)  # bootstrap
  if stage == "stage1":
    return dict(_pick(flat, ("seed",) + model + stage1), **weights)
  if stage.startswith("stage2_"):
    # Without a class term its weight is not read (and runs from before the key keep stage 2).
    unread = (("stage2.class_term", "stage2.class_weight")
              if config.stage2.class_term == "none" else ())
    return dict(_pick(flat, ("seed", "stage2."), exclude=unread), bits=bits_of(stage))
  if stage.startswith("evaluate_"):
    return dict(_pick(flat, ("eval.",)), bits=bits_of(stage))
  if stage == "results":
    return {"bits": config_lib.bit_list(config), "kept_bits": list(facts.kept_bits),
            "seeds": seeds(config), "seeds_from": config.seeds_from}
  if stage == "report":
    return flat
  raise ValueError(f"unknown stage {stage!r}.")


def after(config, stage: str) -> tuple[str, ...]:
  """The stages whose outputs `stage` uses."""
  base, bits, seed = parse(stage)
  if base == "data":
    return ()
  if base == "saliency":
    return ("data",)
  if base == "stage1":
    return ("data", upstream_of(config, "saliency", seed))
  if base == "stage2":
    return (upstream_of(config, "stage1", seed),)
  if base == "evaluate":
    return (stage_name("stage2", bits, seed),)
  if base == "results":
    return tuple(expand(config, "saliency") + expand(config, "stage1")
                 + expand(config, "evaluate"))
  return ("saliency", "stage1", "results")


def fingerprints(config, facts: Facts = Facts()) -> dict[str, str]:
  """{stage: hash of its inputs and its upstream stages' fingerprints}."""
  out = {}
  for stage in all_stages(config):
    blob = json.dumps({"reads": reads(config, stage, facts),
                       "after": {a: out[a] for a in after(config, stage)}},
                      sort_keys=True, default=str)
    out[stage] = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
  return out


def upstream(config, stage: str, fps: dict) -> dict:
  """{upstream stage: fingerprint}, recorded in a marker to check a finished chain later."""
  return {a: fps[a] for a in after(config, stage)}


def kept_lengths(config, wd, stage1_fingerprint: str) -> tuple[int, ...]:
  """Finished code lengths outside config.stage2.bits whose hash layer was trained on the
  stage 1 of `stage1_fingerprint` and whose evaluation belongs to that hash layer."""
  wanted = set(config_lib.bit_list(config))
  kept = []
  for bits in finished_lengths(wd):
    if bits in wanted:
      continue
    hash_marker = wd.final_marker(f"stage2_{bits}") or {}
    eval_marker = wd.final_marker(f"evaluate_{bits}") or {}
    if (hash_marker.get("after", {}).get("stage1") == stage1_fingerprint
        and eval_marker.get("after", {}).get(f"stage2_{bits}") == hash_marker.get("fingerprint")):
      kept.append(bits)
  return tuple(sorted(kept))


def finished_lengths(wd) -> list[int]:
  """Code lengths with a finished evaluation marker in the work directory."""
  names = os.listdir(wd.file("stages")) if os.path.isdir(wd.file("stages")) else []
  return sorted({parse(n[:-5])[1] for n in names
                 if n.startswith("evaluate_") and n.endswith(".json")} - {None})


@dataclasses.dataclass
class Step:
  """A stage to run and why."""
  stage: str
  reason: str           # "not run yet", "resuming", "rerun requested", "<key> a -> b", ...
  replaces: bool        # a finished result exists and will be replaced when this one is done


def plan(config, facts: Facts, wd, rerun=()) -> list[Step]:
  """The stages of config.stages to run now, in order, each with its reason.

  A stage runs when it never finished, when one of its inputs or upstream
  stages changed since it finished, or when `rerun` names it (or a stage
  upstream). A stage this command already finished in staging (killed before
  the end) does not run again.
  """
  fps, todo = fingerprints(config, facts), set(concrete(config))
  forced, steps, changed = set(rerun), [], set()
  for stage in all_stages(config):
    marker = wd.final_marker(stage)
    current = marker is not None and marker.get("fingerprint") == fps[stage]
    if wd.staged_marker(stage, fps[stage]) is not None:
      if not current or stage in forced:
        changed.add(stage)  # finished in staging, replaces the final result at the end
      continue
    ups = [a for a in after(config, stage) if a in changed]
    if marker is None:
      reason, replaces = ("resuming" if wd.staging_matches(stage, fps[stage]) else "not run yet"), False
    elif stage in forced:
      reason, replaces = "rerun requested (--config.rerun)", True
    elif not current and _own_inputs_changed(marker, reads(config, stage, facts)):
      reason, replaces = _why_changed(marker.get("inputs", {}), reads(config, stage, facts)), True
    elif ups:
      new = [a for a in ups if wd.final_marker(a) is None]
      reason = ", ".join([f"{a} changed" for a in ups if a not in new]
                         + [f"{a} is new" for a in new])
      replaces = True
    elif not current:
      reason, replaces = "its inputs changed", True
    else:
      continue
    if wd.staging_matches(stage, fps[stage]) and reason != "resuming":
      reason += " (resuming)"
    changed.add(stage)
    if stage in todo:
      steps.append(Step(stage, reason, replaces))
  return steps


def _own_inputs_changed(marker: dict, inputs: dict) -> bool:
  return marker.get("inputs") != json.loads(json.dumps(inputs, default=str))


def _why_changed(old: dict, new: dict) -> str:
  if "code_version" not in old:
    return ("recorded by an older fgir_jax, before the dataset's files, the weights file and "
            "the code were part of a stage's inputs")
  if old.get("code_version") != new.get("code_version"):
    return f"its computation changed (code version {old['code_version']} -> {new['code_version']})"
  lines = []
  for k in sorted(set(old) | set(new)):
    if old.get(k) == new.get(k):
      continue
    if k == "data.files":
      lines.append("the dataset's files changed")
    elif k == "model.pretrained_sha256":
      lines.append("the weights file behind model.pretrained changed")
    elif k in ("bits", "kept_bits"):
      name = "code lengths" if k == "bits" else "kept code lengths"
      show = lambda v: ", ".join(map(str, v or [])) or "none"
      lines.append(f"{name} {show(old.get(k))} -> {show(new.get(k))}")
    else:
      lines.append(f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}")
  return ", ".join(lines) or "its inputs changed"


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
