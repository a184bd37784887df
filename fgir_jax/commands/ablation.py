"""The paper's comparisons on the same data, collected into one table (`launch.py --mode ablate`).

Each variant is the config with one change, run by the ordinary pipeline in
its own work directory under the ablation's directory:

  full         the config as given (e.g. ResNet18-I, saliency crop, adaptive loss)
  no_enhance   model.enhance=False: no Inception-ResNet-C block (ResNet18 vs
               ResNet18-I in the paper; "resnet18" is accepted as its old name)
  no_saliency  saliency.enabled=False: stage 1 and 2 on the uncropped images
  triplet      stage2.loss='triplet': Eq. 1 with a fixed margin
  ce           stage2.loss='ce': the hash layer trained with cross-entropy
  class_aware  beyond the paper: the adaptive loss plus a class-aware term
               (stage2.class_term, CLASS_AWARE unless the config sets one)

Variants reuse every finished stage whose inputs equal theirs instead of
recomputing it, wherever it lies: in another variant or in a finished run in
the ablation's own directory (so `--mode ablate` on a trained run takes the
`full` variant over from it). All of them share the decoded images (one
cache); `no_enhance`/`triplet`/`ce` reuse the saliency boxes of `full` (so
every network sees the same crops), `triplet`/`ce` its stage-1 network and
features. Work already done is skipped, so an interrupted ablation resumes
where it stopped when run again.

With `--config.seeds=N` every variant runs N seeds (seed k of each variant
shares the seed's random draws), the table shows mean ± standard deviation,
and each question is answered by `fgir_jax.significance`: "yes" or "no" only
when the 95% interval of the difference excludes 0, otherwise "within noise".
"""

from __future__ import annotations

import json
import os

import numpy as np

from fgir_jax import parallel
from fgir_jax import significance
from fgir_jax.train import config as config_lib
from fgir_jax.train import stages as stages_lib
from fgir_jax.train import pipeline
from fgir_jax.train.workdir import Workdir, write_json

VARIANTS = ("full", "no_enhance", "no_saliency", "triplet", "ce", "class_aware")
# The class-aware term of the class_aware variant (stage2.class_term, stage2.class_weight)
# when the config sets none: chosen on cub50 (bench/probe_class_terms.py, docs/real-birds.md).
CLASS_AWARE = ("classifier", 0.5)
_ALIASES = {"resnet18": "no_enhance"}


def variant_config(config, name: str, cache_dir: str):
  """The config of one variant: `config` with that variant's single change."""
  c = config.copy_and_resolve_references()
  c.data.cache_dir = config.data.cache_dir or cache_dir
  if name == "no_enhance":
    c.model.enhance = False
  elif name == "no_saliency":
    c.saliency.enabled = False
  elif name in ("triplet", "ce"):
    c.stage2.loss = name
  elif name == "class_aware":
    c.stage2.loss = "adaptive"
    if c.stage2.class_term == "none":
      c.stage2.class_term, c.stage2.class_weight = CLASS_AWARE
  elif name != "full":
    raise ValueError(f"unknown ablation variant {name!r}; choose from {', '.join(VARIANTS)}.")
  return c


def parse_variants(text: str) -> list[str]:
  names = [_ALIASES.get(v.strip(), v.strip()) for v in str(text).split(",") if v.strip()]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown or not names:
    raise ValueError(f"--variants must list some of {', '.join(VARIANTS)}, got {text!r}.")
  # `full` first: every question compares a variant with it, and the others reuse its stages.
  if "full" not in names:
    names.insert(0, "full")
  return sorted(set(names), key=VARIANTS.index)


def run_ablation(config, workdir: str, variants: str = ",".join(VARIANTS), echo=print) -> dict:
  """Runs the variants and writes ablation.md / ablation.json in `workdir`; returns the rows."""
  names = parse_variants(variants)
  cache_dir = os.path.join(os.path.abspath(workdir), "cache")
  configs = {name: variant_config(config, name, cache_dir) for name in names}
  for cfg in configs.values():  # every variant's settings are checked before any runs
    pipeline.check_config(cfg, config_lib.bit_list(cfg))
  paths = {name: os.path.join(workdir, name) for name in VARIANTS}
  # A trained run in the ablation's own directory, and every variant, may hold stages to reuse.
  sources = [workdir] + list(paths.values())
  rows = {}
  primary = parallel.is_primary()  # of several processes, process 0 writes the tables
  if not primary:
    echo = lambda *args, **kwargs: None  # pylint: disable=unnecessary-lambda-assignment
  # The ablation's tables are written under its directory's lock; each variant's run holds
  # its own.
  with pipeline.writing(Workdir(workdir, writable=primary),
                        f"--mode ablate --variants {variants}", echo):
    for name in names:
      echo(f"==== ablation variant {name}: {paths[name]}")
      pipeline.run(configs[name], paths[name], echo=echo, reuse_from=sources)
      rows[name] = summarise(Workdir(paths[name], writable=False), configs[name])
    if primary:
      write_tables(workdir, config, rows)
    parallel.barrier("ablation tables written")
  return rows


def summarise(wd: Workdir, config) -> dict:
  """One row of the ablation table from a finished variant's results and log."""
  with open(wd.file("results.json")) as f:
    results = json.load(f)
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  per_seed = results.get("per_seed") or {}
  return {"network": report.network_name(config),
          "saliency": bool(config.saliency.enabled), "loss": config.stage2.loss,
          "class_term": config.stage2.class_term,
          "accuracy": results.get("accuracy"), "corloc": results.get("corloc"),
          "mean_iou": results.get("mean_iou"), "map": results.get("map", {}),
          "map_tie_aware": results.get("map_tie_aware", {}), "dataset": results.get("dataset"),
          "queries": results.get("queries"), "seeds": results.get("seeds", 1),
          "map_std": results.get("map_std", {}), "accuracy_std": results.get("accuracy_std"),
          "map_per_seed": per_seed.get("map") or {b: [v] for b, v in results.get("map", {}).items()},
          "accuracy_per_seed": per_seed.get("accuracy") or [results.get("accuracy")],
          "workdir": wd.path}


def loss_name(row: dict) -> str:
  """The stage-2 loss column: "adaptive", "adaptive + proxies", ..."""
  term = row.get("class_term") or "none"
  return row["loss"] + ("" if term == "none" else f" + {term}")


def write_tables(workdir: str, config, rows: dict) -> str:
  """ablation.md (markdown table + the questions it answers) and ablation.json."""
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  bits = config_lib.bit_list(config)
  header = (["variant", "network", "saliency crop", "stage-2 loss", "stage-1 accuracy"]
            + [f"mAP {b} bits" for b in bits] + [f"tie-aware mAP {bits[-1]} bits", "CorLoc"])
  table = []
  for name, r in rows.items():
    table.append([name, r["network"], "on" if r["saliency"] else "off", loss_name(r),
                  report.with_spread(r, "accuracy")]
                 + [report.with_spread(r, "map", b) for b in bits]
                 + [report.pct(r["map_tie_aware"].get(str(bits[-1]))),
                    report.pct(r["corloc"], missing="no true boxes" if r["saliency"] else "off")])
  dataset = next(iter(rows.values()))["dataset"] if rows else config.data.source
  seeds = stages_lib.seeds(config)
  spread = (f" Each value is the mean over {seeds} seeds ± their sample standard deviation "
            f"(seeds repeat {_seeded_part(config)})." if seeds > 1 else "")
  lines = [f"# Ablation: {dataset}", "",
           "Each variant is the config with one change (fgir_jax/commands/ablation.py); "
           "same data, split and seeds." + spread, "", report.markdown_table(header, table), ""]
  lines += _answers(rows, bits, config)
  paper = report.paper_numbers(config.data.source)
  if paper:
    lines += ["", f"Paper ({paper['dataset']}, full protocol, 64 bits): adaptive "
              f"{report.pct(paper['map_by_loss'].get('adaptive'))}, CE "
              f"{report.pct(paper['map_by_loss'].get('ce'))}; saliency: "
              f"{paper['saliency_gain']}."]
  path = os.path.join(workdir, "ablation.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)
  write_json(os.path.join(workdir, "ablation.json"), rows)
  return path


def _seeded_part(config) -> str:
  return {"stage2": "stage 2 and its evaluation; stage 1 is shared",
          "stage1": "stage 1, stage 2 and the evaluation",
          "saliency": "the saliency network, stage 1, stage 2 and the evaluation"}[config.seeds_from]


def compare_map(rows: dict, a: str, b: str, bits: int) -> significance.Comparison:
  """Variant a against b in mAP at `bits`: paired over seeds, or over queries with one seed."""
  key = str(bits)
  seeds_a, seeds_b = rows[a]["map_per_seed"][key], rows[b]["map_per_seed"][key]
  if len(seeds_a) > 1 and len(seeds_a) == len(seeds_b):
    return significance.compare_seeds(seeds_a, seeds_b)
  return significance.compare_queries(_query_aps(rows[a], bits), _query_aps(rows[b], bits))


def compare_accuracy(rows: dict, a: str, b: str) -> significance.Comparison:
  """Stage-1 accuracies: paired over seeds when seeds repeat stage 1, else two proportions."""
  seeds_a, seeds_b = rows[a]["accuracy_per_seed"], rows[b]["accuracy_per_seed"]
  if len(seeds_a) > 1 and len(seeds_a) == len(seeds_b):
    return significance.compare_seeds(seeds_a, seeds_b)
  return significance.compare_proportions(rows[a]["accuracy"], rows[b]["accuracy"],
                                          int(rows[a]["queries"]))


def _query_aps(row: dict, bits: int) -> np.ndarray:
  """Seed 0's per-query average precisions of a variant (codes/codes_<bits>.npz)."""
  with np.load(os.path.join(row["workdir"], "codes", f"codes_{bits}.npz")) as f:
    return f["ap"]


def _answers(rows: dict, bits_list: list[int], config) -> list[str]:
  """The paper's questions (and the class-aware term's), answered only from the variants
  that ran, and "yes" / "no" only where the difference exceeds the noise."""
  bits = 64 if 64 in bits_list else bits_list[-1]
  out = []

  def ask(question, a, b, kind="map", at=bits):
    if a not in rows or b not in rows:
      out.append(f"- {question}: not run (needs variants {a} and {b}).")
      return
    if kind == "map":
      va, vb = rows[a]["map"].get(str(at)), rows[b]["map"].get(str(at))
      c = compare_map(rows, a, b, at)
    else:
      va, vb = rows[a]["accuracy"], rows[b]["accuracy"]
      c = compare_accuracy(rows, a, b)
    out.append(f"- {question}: **{c.verdict}** ({100 * va:.2f}% vs {100 * vb:.2f}%; "
               f"difference {c.describe()}).")

  ask(f"adaptive triplet beats the classic triplet loss (mAP {bits} bits)", "full", "triplet")
  ask(f"adaptive triplet beats CE features (mAP {bits} bits)", "full", "ce")
  ask("the saliency crop helps stage-1 accuracy", "full", "no_saliency", "accuracy")
  ask(f"the saliency crop helps mAP ({bits} bits)", "full", "no_saliency")
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  with_block, without = report.network_name(config, True), report.network_name(config, False)
  ask(f"{with_block} beats {without} in stage-1 accuracy", "full", "no_enhance", "accuracy")
  ask(f"{with_block} beats {without} in mAP ({bits} bits)", "full", "no_enhance")
  if "class_aware" in rows:
    term = loss_name(rows["class_aware"])
    for b in bits_list:
      ask(f"{term} beats the adaptive loss (mAP {b} bits)", "class_aware", "full", at=b)
      ask(f"{term} beats CE features (mAP {b} bits)", "class_aware", "ce", at=b)
  corloc = rows.get("full", {}).get("corloc")
  if corloc is not None:
    out.append(f"- saliency boxes: CorLoc {100 * corloc:.2f}% (IoU > 0.5 with the true boxes).")
  seeds = stages_lib.seeds(config)
  how = (f"paired over the {seeds} seeds (Student's t)" if seeds > 1
         else "by a paired bootstrap over the queries (one seed: training noise is not measured)")
  rule = [f"A question is answered yes or no only when the 95% interval of the difference "
          f"excludes 0, otherwise \"within noise\" (fgir_jax/significance.py). mAP is compared "
          f"{how}; stage-1 accuracy "
          + ("paired over the seeds." if seeds > 1 and config.seeds_from != "stage2" else
             "as two proportions over the queries (one stage-1 run per variant)."),
          ""]
  if seeds > 1 and config.seeds_from == "stage2":
    rule[0] += (" Stage 1 is one run per variant here, so the comparisons of variants with "
                "their own stage 1 (no_saliency, no_enhance) leave its training noise out "
                "(--config.seeds_from=stage1 repeats it).")
  return ["Answers:", ""] + rule + out
