"""report.md and its PNG plots, drawn only from what the run measured.

Reads results.json, metrics.jsonl and the saliency summary of a work
directory; a number the run did not measure is reported as "not measured",
never guessed.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

# PAPER.md, "The paper's numbers" (CUB-200-2011, ResNet18-I + adaptive triplet).
PAPER_CUB_MAP_64 = 0.6822
PAPER_CUB_ACCURACY_RESNET18 = 0.6187


def _fmt(value) -> str:
  return "not measured" if value is None else f"{100 * value:.2f}%"


def _plot_stage2_curves(wd, bits: list[int], plots: str) -> list[str]:
  """mAP vs epoch (paper Fig. 4) and d(A,P), d(A,N) vs epoch (Fig. 5)."""
  made = []
  rows = {b: wd.read_log(f"stage2_{b}") for b in bits}
  if not any(rows.values()):
    return made
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for b, r in rows.items():
    pts = [(x["epoch"], x["map"]) for x in r if "map" in x]
    if pts:
      ax.plot(*zip(*pts), marker="o", ms=3, label=f"{b} bits")
  ax.set(xlabel="epoch", ylabel="mAP (query set)", title="mAP vs epoch")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(plots, "map_vs_epoch.png"), dpi=100)
  plt.close(fig)
  made.append("map_vs_epoch.png")

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for b, r in rows.items():
    if r:
      epochs = [x["epoch"] for x in r]
      ax.plot(epochs, [x["d_ap"] for x in r], label=f"d(A,P) {b} bits")
      ax.plot(epochs, [x["d_an"] for x in r], "--", label=f"d(A,N) {b} bits")
  ax.set(xlabel="epoch", ylabel="mean distance (mined triplets)", title="Triplet distances")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(plots, "distances_vs_epoch.png"), dpi=100)
  plt.close(fig)
  made.append("distances_vs_epoch.png")
  return made


def _plot_map_vs_bits(results: dict, plots: str) -> list[str]:
  """mAP vs code length (paper Fig. 7)."""
  maps = results.get("map") or {}
  if not maps:
    return []
  bits = sorted(int(b) for b in maps)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(bits, [maps[str(b)] for b in bits], marker="o", label="stable ties")
  tie = results.get("map_tie_aware") or {}
  if tie:
    ax.plot(bits, [tie[str(b)] for b in bits], marker="s", ls="--", label="tie-aware")
  ax.set(xlabel="code length (bits)", ylabel="mAP", xticks=bits, title="mAP vs code length")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(plots, "map_vs_bits.png"), dpi=100)
  plt.close(fig)
  return ["map_vs_bits.png"]


def write_report(wd, config) -> str:
  """Writes <workdir>/report.md and plots/; returns the report's path."""
  results_path = wd.file("results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  plots = wd.dir("plots")
  bits = sorted(int(b) for b in (results.get("map") or {}))
  figures = _plot_stage2_curves(wd, bits, plots) + _plot_map_vs_bits(results, plots)

  lines = [f"# fgir_jax report: {results.get('dataset', config.data.source)}", ""]
  lines += ["## Retrieval (queries = test split, database = train split)", "",
            "| bits | mAP (stable ties) | mAP (tie-aware) | precision@k |", "| --- | --- | --- | --- |"]
  pk_key = next((k for k in results if k.startswith("precision_at_")), None)
  for b in bits:
    pk = results[pk_key].get(str(b)) if pk_key else None
    lines.append(f"| {b} | {_fmt(results['map'].get(str(b)))} | "
                 f"{_fmt(results.get('map_tie_aware', {}).get(str(b)))} | {_fmt(pk)} |")
  lines += ["", "## Classification and saliency", "",
            "| measure | this run | paper (CUB) |", "| --- | --- | --- |",
            f"| stage-1 accuracy (queries) | {_fmt(results.get('accuracy'))} | "
            f"{_fmt(PAPER_CUB_ACCURACY_RESNET18)} (ResNet18) |",
            f"| saliency CorLoc (IoU > 0.5) | {_fmt(results.get('corloc'))} | not reported |",
            f"| saliency mean IoU | {_fmt(results.get('mean_iou'))} | not reported |",
            f"| mAP at 64 bits | {_fmt((results.get('map') or {}).get('64'))} | "
            f"{_fmt(PAPER_CUB_MAP_64)} (ResNet18-I + adaptive) |", ""]
  lines += ["## Settings", "", "```", config.to_json_best_effort(indent=2, sort_keys=True), "```", ""]
  if figures:
    lines += ["## Figures", ""] + [f"![{f}](plots/{f})" for f in figures] + [""]
  path = wd.file("report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  return path
