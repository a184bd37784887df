"""The paper's comparisons on the same data, collected into one table (`launch.py --mode ablate`).

Each variant is the config with one change, run by the ordinary pipeline in
its own work directory under the ablation's directory:

  full         the config as given (e.g. ResNet18-I, saliency crop, adaptive loss)
  no_enhance   model.enhance=False: no Inception-ResNet-C block (ResNet18 vs
               ResNet18-I in the paper; "resnet18" is accepted as its old name)
  no_saliency  saliency.enabled=False: stage 1 and 2 on the uncropped images
  triplet      stage2.loss='triplet': Eq. 1 with a fixed margin
  ce           stage2.loss='ce': the hash layer trained with cross-entropy

Variants reuse every finished stage whose inputs equal theirs instead of
recomputing it, wherever it lies: in another variant or in a finished run in
the ablation's own directory (so `--mode ablate` on a trained run takes the
`full` variant over from it). All of them share the decoded images (one
cache); `no_enhance`/`triplet`/`ce` reuse the saliency boxes of `full` (so
every network sees the same crops), `triplet`/`ce` its stage-1 network and
features. Work already done is skipped, so an interrupted ablation resumes
where it stopped when run again.
"""

from __future__ import annotations

import json
import os

from fgir_jax.train import config as config_lib
from fgir_jax.train import pipeline
from fgir_jax.train.workdir import Workdir, write_json

VARIANTS = ("full", "no_enhance", "no_saliency", "triplet", "ce")
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
  # The ablation's tables are written under its directory's lock; each variant's run holds
  # its own.
  with Workdir(workdir).writing(f"--mode ablate --variants {variants}", echo):
    for name in names:
      echo(f"==== ablation variant {name}: {paths[name]}")
      pipeline.run(configs[name], paths[name], echo=echo, reuse_from=sources)
      rows[name] = summarise(Workdir(paths[name], writable=False), configs[name])
    write_tables(workdir, config, rows)
  return rows


def summarise(wd: Workdir, config) -> dict:
  """One row of the ablation table from a finished variant's results and log."""
  with open(wd.file("results.json")) as f:
    results = json.load(f)
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  return {"network": report.network_name(config),
          "saliency": bool(config.saliency.enabled), "loss": config.stage2.loss,
          "accuracy": results.get("accuracy"), "corloc": results.get("corloc"),
          "mean_iou": results.get("mean_iou"), "map": results.get("map", {}),
          "map_tie_aware": results.get("map_tie_aware", {}), "dataset": results.get("dataset")}


def write_tables(workdir: str, config, rows: dict) -> str:
  """ablation.md (markdown table + the questions it answers) and ablation.json."""
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  bits = config_lib.bit_list(config)
  header = (["variant", "network", "saliency crop", "stage-2 loss", "stage-1 accuracy"]
            + [f"mAP {b} bits" for b in bits] + [f"tie-aware mAP {bits[-1]} bits", "CorLoc"])
  table = []
  for name, r in rows.items():
    table.append([name, r["network"], "on" if r["saliency"] else "off", r["loss"],
                  report.pct(r["accuracy"])]
                 + [report.pct(r["map"].get(str(b))) for b in bits]
                 + [report.pct(r["map_tie_aware"].get(str(bits[-1]))),
                    report.pct(r["corloc"], missing="no true boxes" if r["saliency"] else "off")])
  dataset = next(iter(rows.values()))["dataset"] if rows else config.data.source
  lines = [f"# Ablation: {dataset}", "",
           "Each variant is the config with one change (fgir_jax/commands/ablation.py); "
           "same data, split and seeds.", "", report.markdown_table(header, table), ""]
  lines += _answers(rows, bits[-1], config)
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


def _answers(rows: dict, bits: int, config) -> list[str]:
  """The paper's questions, answered only from the variants that ran."""
  m = lambda name: rows[name]["map"].get(str(bits)) if name in rows else None
  acc = lambda name: rows[name]["accuracy"] if name in rows else None
  out = []

  def compare(question, a, b, value):
    va, vb = value(a), value(b)
    if va is None or vb is None:
      out.append(f"- {question}: not run (needs variants {a} and {b}).")
    else:
      verdict = "yes" if va > vb else "no"
      out.append(f"- {question}: {verdict} ({100 * va:.2f}% vs {100 * vb:.2f}%).")

  compare(f"adaptive triplet beats the classic triplet loss (mAP {bits} bits)", "full",
          "triplet", m)
  compare(f"adaptive triplet beats CE features (mAP {bits} bits)", "full", "ce", m)
  compare("the saliency crop helps stage-1 accuracy", "full", "no_saliency", acc)
  compare(f"the saliency crop helps mAP ({bits} bits)", "full", "no_saliency", m)
  from fgir_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  with_block, without = report.network_name(config, True), report.network_name(config, False)
  compare(f"{with_block} beats {without} in stage-1 accuracy", "full", "no_enhance", acc)
  compare(f"{with_block} beats {without} in mAP ({bits} bits)", "full", "no_enhance", m)
  corloc = rows.get("full", {}).get("corloc")
  if corloc is not None:
    out.append(f"- saliency boxes: CorLoc {100 * corloc:.2f}% (IoU > 0.5 with the true boxes).")
  return ["Answers:", ""] + out
