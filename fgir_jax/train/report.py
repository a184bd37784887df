"""report.md: this run's numbers beside the paper's, the settings, and the figures.

Reads results.json, metrics.jsonl and saliency/summary.json of a work
directory. Each table mirrors one of the paper's comparisons; a comparison the
run did not make reads "not run" (a single run measures one network, one
stage-2 loss and one saliency setting; the ablation command compares runs),
never a guessed number. Paper numbers are shown only for the dataset they come
from. The figures are drawn by report_plots.py.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np

from fgir_jax import saliency
from fgir_jax.train import report_plots
from fgir_jax.train.report_plots import top_results  # pylint: disable=unused-import  (public)

# The paper's numbers: PAPER.md, "The paper's numbers (to beat)"; the strings
# are what the paper states without a number (full text Sec. 3.1-3.3, whose
# Tables 1-3 are not in the text we have). A float is a fraction in [0, 1]; a
# missing key means the paper reports nothing for it.
PAPER = {
    "cub": {
        "dataset": "CUB-200-2011",
        "classes": 200,
        "accuracy": {"resnet18": 0.6187,
                     "resnet18_i": "no clear change from ResNet18 (Sec. 3.1)"},
        # Table 1, 64 bits. The paper's "Triplet" is its adaptive loss (Sec. 3.1).
        "map_by_loss": {"ce": 0.4065, "triplet": "about +16 points over CE",
                        "adaptive": 0.6822},
        "saliency_gain": "about +7 points (accuracy and mAP, alpha=0.4)",
        "map_by_bits": {64: 0.6822},       # ResNet18-I + adaptive triplet
        "fph_map_by_bits": {64: 0.6233},   # Feature Pyramid Hashing (Yang et al. 2019)
    },
    "dogs": {
        "dataset": "Stanford Dogs",
        "classes": 120,
        "accuracy": {},
        "map_by_loss": {"ce": 0.3826, "triplet": "about +21 points over CE",
                        "adaptive": "about +2 points over FPH at 48 and 64 bits"},
        "saliency_gain": "no clear gain (several subjects per image)",
        "map_by_bits": {48: "about +2 points over FPH", 64: "about +2 points over FPH"},
        "fph_map_by_bits": {},
    },
}
# The network behind each of the paper's map_by_loss numbers.
PAPER_LOSS_NETWORK = {"ce": "ResNet18", "triplet": "ResNet18", "adaptive": "ResNet18-I"}
PAPER_BITS = (16, 32, 48, 64)
LOSS_ROWS = (("ce", "CE features (no triplet loss)"), ("triplet", "triplet loss (Eq. 1)"),
             ("adaptive", "adaptive triplet loss (Eq. 2-3)"))
NOT_RUN = "not run"


def paper_numbers(source: str) -> dict:
  """The paper's numbers for data.source "cub" or "dogs" (a copy); {} for other data."""
  return copy.deepcopy(PAPER.get(source, {}))


def markdown_table(header: list[str], rows: list[list]) -> str:
  """A GitHub markdown table; cells are str()-ed and "|" inside a cell is escaped."""
  cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(cell(h) for h in header) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def pct(value, missing: str = NOT_RUN) -> str:
  """A fraction as a percentage; a string passes through (the paper's statements)."""
  if value is None:
    return missing
  return value if isinstance(value, str) else f"{100 * float(value):.2f}%"


def with_spread(results: dict, key: str, bits: int | None = None, missing: str = NOT_RUN) -> str:
  """A result as a percentage, "mean% ± std" when results.json holds the spread over seeds."""
  value, spread = results.get(key), results.get(f"{key}_std")
  if bits is not None:
    value = (value or {}).get(str(bits))
    spread = (spread or {}).get(str(bits))
  if value is None or spread is None:
    return pct(value, missing)
  return f"{pct(value)} ± {100 * float(spread):.2f}"


def _paper_table(header, rows, paper: dict, paper_cells) -> str:
  """The table with a paper column only when the data is the paper's."""
  if paper:
    return markdown_table(header + [f"paper ({paper['dataset']})"],
                          [r + [c] for r, c in zip(rows, paper_cells)])
  return markdown_table(header, rows)


# ----------------------------------------------------------------------------
# What the run measured
# ----------------------------------------------------------------------------
def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _run_facts(wd, config) -> dict:
  """results.json plus what the tables need from the logs."""
  results = _read_json(wd.read("results.json"))
  bits = sorted(int(b) for b in (results.get("map") or {}))
  boot = wd.read_log("saliency_net")
  summary = _read_json(wd.read("saliency", "summary.json"))
  return {
      "results": results, "bits": bits,
      # Table 1 of the paper is at 64 bits; take the longest code otherwise.
      "main_bits": 64 if 64 in bits else (max(bits) if bits else None),
      "network": network_name(config),
      "boot_epochs": max((r["epoch"] for r in boot if "epoch" in r), default=None),
      "boot_accuracy": next((r["uncropped_accuracy"] for r in reversed(boot)
                             if "uncropped_accuracy" in r), None),
      "saliency": summary,
  }


BACKBONE_NAMES = {"resnet18": "ResNet18", "efficientnet_lite0": "EfficientNet-Lite0"}


def network_name(config, enhance: bool | None = None) -> str:
  """"ResNet18-I", "EfficientNet-Lite0", ...: the backbone, "-I" with the enhancement block."""
  enhance = bool(config.model.enhance) if enhance is None else enhance
  name = BACKBONE_NAMES.get(config.model.backbone, config.model.backbone)
  return name + ("-I" if enhance else "")


def _main_map(facts: dict) -> str:
  """The mAP at the main code length, formatted (with its spread over seeds)."""
  b = facts["main_bits"]
  return NOT_RUN if b is None else with_spread(facts["results"], "map", b)


# ----------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------
def _accuracy_section(config, facts, paper) -> list[str]:
  acc = with_spread(facts["results"], "accuracy")
  other = f"{NOT_RUN} (see the ablation)"
  enhance = bool(config.model.enhance)
  rows = [[network_name(config, False), other if enhance else acc],
          [f"{network_name(config, True)} (feature enhancement)", acc if enhance else other]]
  cells = [_paper_cell(paper.get("accuracy", {}).get(k), name)
           for k, name in (("resnet18", "ResNet18"), ("resnet18_i", "ResNet18-I"))]
  return ["## Classification accuracy, stage 1 (paper Table 1)", "",
          _paper_table(["network", "this run (query accuracy)"], rows, paper, cells), ""]


def _paper_cell(value, network: str) -> str:
  """A paper number with the network it was measured on (ours may be another)."""
  if value is None:
    return "not reported"
  return f"{pct(value)} ({network})" if not isinstance(value, str) else value


def _loss_section(config, facts, paper) -> list[str]:
  loss, b = config.stage2.loss, facts["main_bits"]
  rows = [[label, _main_map(facts) if key == loss else NOT_RUN] for key, label in LOSS_ROWS]
  cells = [f"{pct(paper.get('map_by_loss', {}).get(k), 'not reported')} ({PAPER_LOSS_NETWORK[k]})"
           for k, _ in LOSS_ROWS]
  col = f"this run: mAP ({facts['network']}, {b if b else '?'} bits)"
  lines = ["## mAP by stage-2 loss (paper Table 1, 64 bits)", "",
            _paper_table(["stage-2 loss", col], rows, paper, cells), ""]
  if paper:  # the paper's gain is not evidence about Eq. 1 alone
    lines += ["The paper's \"Triplet\" (Sec. 3.1) is its adaptive loss; PAPER.md lists "
              "its gain over CE on the triplet row.", ""]
  return lines


def _uncropped_accuracy(config, facts) -> str:
  """The accuracy without crops: the bootstrap network, when the run trained one."""
  if not config.saliency.enabled:
    return with_spread(facts["results"], "accuracy")
  if facts["boot_accuracy"] is None:
    return f"{NOT_RUN} (no network was trained on uncropped images)"
  return (f"{pct(facts['boot_accuracy'])} (bootstrap CE network `saliency_net`, "
          f"{facts['boot_epochs']} epochs; stage 1 ran {config.stage1.epochs})")


def _saliency_section(config, facts, paper) -> list[str]:
  acc, on = with_spread(facts["results"], "accuracy"), bool(config.saliency.enabled)
  cropped = [f"saliency crops (alpha={config.saliency.alpha:g})",
             acc if on else NOT_RUN, _main_map(facts) if on else NOT_RUN]
  uncropped = ["uncropped images", _uncropped_accuracy(config, facts),
               NOT_RUN if on else _main_map(facts)]
  cells = ["gain over uncropped: " + pct(paper.get("saliency_gain"), "not reported"), "baseline"]
  col = f"mAP ({facts['main_bits']} bits)" if facts["main_bits"] else "mAP"
  return ["## Saliency crop on / off (paper Table 2)", "",
          _paper_table(["images", "stage-1 accuracy", col], [cropped, uncropped], paper, cells), ""]


def _bits_section(facts, paper) -> list[str]:
  res = facts["results"]
  k_key = next((k for k in res if k.startswith("precision_at_")), "precision_at_10")
  header = ["bits", "mAP (stable ties)", "mAP (tie-aware)", k_key.replace("_at_", "@")]
  rows, cells = [], []
  kept = res.get("kept") or {}
  for b in sorted(set(PAPER_BITS) | set(facts["bits"]) | {int(k) for k in kept}):
    keys = ("map", "map_tie_aware", k_key)
    if str(b) in kept:
      rows.append([f"{b} ({kept[str(b)]['note']})"] + [pct(kept[str(b)].get(key)) for key in keys])
    else:
      rows.append([b] + [with_spread(res, key, b) for key in keys])
    ours = paper.get("map_by_bits", {}).get(b)
    fph = paper.get("fph_map_by_bits", {}).get(b)
    cell = "not in PAPER.md (Table 3)" if ours is None else f"{pct(ours)} (ResNet18-I)"
    cells.append(cell + ("" if fph is None else f"; FPH {pct(fph)}"))
  note = ("Stable ties rank equal distances in database order; tie-aware averages "
          "the precision over each tie (the expected mAP under random tie order).")
  if res.get("seeds"):
    note += (f" Each value is the mean over {res['seeds']} seeds ± their sample standard "
             "deviation (results.json: per_seed).")
  return ["## mAP by code length (paper Table 3, Fig. 7)", "",
          _paper_table(header, rows, paper, cells), "", note, ""]


def _localisation_section(config, facts, dataset) -> list[str]:
  head = ["## Saliency boxes against the true boxes", ""]
  if not config.saliency.enabled:
    return head + [f"{NOT_RUN}: saliency.enabled is False.", ""]
  res, summary = facts["results"], facts["saliency"]
  corloc = res.get("corloc", summary.get("corloc"))
  miou = res.get("mean_iou", summary.get("mean_iou"))
  if corloc is None and (dataset is None or dataset.boxes is None):
    return head + ["Not measured: the data has no true boxes.", ""]
  full_iou = None
  if dataset is not None and dataset.boxes is not None:
    full = np.tile(np.array([saliency.FULL_BOX], np.float32), (len(dataset.boxes), 1))
    full_iou = float(np.mean(np.asarray(saliency.iou(full, dataset.boxes))))
  rows = [[f"saliency boxes (alpha={config.saliency.alpha:g}, {config.saliency.mode})",
           pct(corloc), pct(miou)],
          ["full image (baseline)", pct(summary.get("full_image_corloc"), "not measured"),
           pct(full_iou, "not measured (needs the dataset)")]]
  return head + [markdown_table(["boxes", "CorLoc (IoU > 0.5)", "mean IoU"], rows), "",
                 "The paper reports no localisation numbers.", ""]


def _run_section(wd, config) -> list[str]:
  """Where and how long: stage times, skipped files, library versions and devices."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import stages as stages_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for stage in stages_lib.all_stages(config)[:-1]:  # the report is being written
    marker = wd.done(stage) or {}
    if "adopted_from" in marker:
      rows.append([stage, f"reused from {marker['adopted_from']}"])
    elif "seconds" in marker:
      rows.append([stage, f"{marker['seconds']:.1f} s"])
  devices = jax.devices()
  lines = ["## This run", "",
           f"jax {jax.__version__}, flax {flax.__version__}; {len(devices)} device(s): "
           f"{', '.join(sorted({d.device_kind for d in devices}))} ({jax.default_backend()}).", ""]
  if rows:
    lines += [markdown_table(["stage", "time"], rows),
              "", "Times are of the command that computed each stage.", ""]
  data = wd.done("data") or {}
  skipped = data.get("skipped_files") or []
  if data.get("skipped"):
    lines += [f"{data['skipped']} unreadable image file(s) were skipped (data.skip_bad):", ""]
    lines += [f"- {path}" for path in skipped] + [""]
  return lines


def _protocol_notes(config, paper, classes: int | None = None) -> list[str]:
  """Where this run departs from the paper's protocol, so that gaps read right."""
  if not paper:
    return [f"The paper has no numbers for {config.data.source} data (it reports "
            "CUB-200-2011 and Stanford Dogs only), so no paper column is shown.", ""]
  notes = []
  if classes is not None and classes != paper.get("classes", classes):
    notes.append(f"{classes} classes (paper: {paper['classes']})")
  elif int(config.data.max_classes) > 0:
    notes.append(f"only the first {config.data.max_classes} classes")
  if int(config.data.image_size) != 299:
    notes.append(f"{config.data.image_size} px images (paper: 299)")
  if config.model.backbone != "resnet18":
    notes.append(f"{network_name(config, False)} backbone (paper: ResNet18)")
  if float(config.model.width) != 1.0:
    notes.append(f"channel width x{config.model.width:g} (paper: full ResNet18)")
  if not config.model.pretrained:
    notes.append("trained from scratch (no model.pretrained weights)")
  if int(config.model.frozen_stages) > 0:
    notes.append(f"stem and first {config.model.frozen_stages} backbone stages frozen in stage 1 "
                 "(paper: all fine-tuned)")
  if int(config.stage1.epochs) != 50 or int(config.stage2.epochs) != 90:
    notes.append(f"{config.stage1.epochs} + {config.stage2.epochs} epochs (paper: 50 + 90)")
  if not notes:
    return []
  return ["Differs from the paper's protocol: " + "; ".join(notes) + ".", ""]


# ----------------------------------------------------------------------------
# Figures and the whole report
# ----------------------------------------------------------------------------
def _figures(wd, config, facts, dataset, images, crops) -> tuple[list[str], dict]:
  plots = wd.out_dir("plots")
  # The retrieval grid shows the uncropped images with their saliency crop drawn on them.
  boxes, shown = _saliency_boxes(wd, config, dataset), images if images is not None else crops
  if boxes is None and crops is not None:
    shown = crops
  made, skipped = [], {}
  for m, s in (report_plots.plot_stage2_curves(wd, facts["bits"], plots),
               report_plots.plot_map_vs_bits(facts["results"], plots),
               report_plots.plot_saliency_crops(wd, config, dataset, images, plots),
               report_plots.plot_retrieval_grid(wd, facts["bits"], dataset, shown, plots,
                                                boxes=boxes)):
    made += m
    skipped.update(s)
  return made, skipped


def _saliency_boxes(wd, config, dataset):
  """The saliency stage's boxes, one per dataset image, or None."""
  path = wd.read("saliency", "boxes.npz")
  if not config.saliency.enabled or dataset is None or not os.path.exists(path):
    return None
  with np.load(path) as f:
    boxes = f["boxes"]
  return boxes if len(boxes) == len(dataset.labels) else None


FIGURE_CAPTIONS = {
    "map_vs_epoch.png": "mAP on the queries vs stage-2 epoch (paper Fig. 4)",
    "distances_vs_epoch.png": "mean d(A,P) and d(A,N) of the mined triplets (paper Fig. 5)",
    "saliency_crops.png": ("saliency map and boxes at several alpha; red: the saliency box, "
                           "green: the true box (paper Fig. 6)"),
    "map_vs_bits.png": "mAP vs code length (paper Fig. 7)",
    "retrieval_grid.png": ("queries and their top-10 by Hamming distance; green right, red "
                           "wrong; yellow: the saliency crop each image was encoded from"),
}


def _figure_section(made: list[str], skipped: dict) -> list[str]:
  lines = ["## Figures", ""]
  for f in made:
    lines += [f"{FIGURE_CAPTIONS.get(f, f)}:", "", f"![{f}](plots/{f})", ""]
  if skipped:
    lines += ["", "Not drawn:", ""] + [f"- {f}: {why}" for f, why in skipped.items()]
  return lines + [""]


def write_report(wd, config, dataset=None, images=None, crops=None) -> str:
  """Writes <workdir>/report.md and <workdir>/plots/*.png; returns the report's path.

  Args:
    wd: the run's Workdir.
    config: the run's ConfigDict.
    dataset: the run's data_lib.Dataset (rows as in the work directory's
      arrays), or None; the image figures need it.
    images: (n, s, s, 3) uint8 uncropped images in dataset order, or None.
    crops: (n, s, s, 3) uint8 saliency crops in dataset order, or None.
  """
  facts = _run_facts(wd, config)
  res, paper = facts["results"], paper_numbers(config.data.source)
  made, skipped = _figures(wd, config, facts, dataset, images, crops)
  name = res.get("dataset") or (dataset.name if dataset is not None else config.data.source)
  lines = [f"# fgir_jax report: {name}", "",
           f"Queries = test split ({res.get('queries', '?')} images), database = train split "
           f"({res.get('database', '?')} images); network {facts['network']}, stage-2 loss "
           f"`{config.stage2.loss}`, saliency crop "
           f"{'on' if config.saliency.enabled else 'off'}.", ""]
  classes = len(dataset.class_names) if dataset is not None else None
  lines += _protocol_notes(config, paper, classes)
  lines += _accuracy_section(config, facts, paper) + _loss_section(config, facts, paper)
  lines += _saliency_section(config, facts, paper) + _bits_section(facts, paper)
  lines += _localisation_section(config, facts, dataset)
  lines += _run_section(wd, config)
  lines += ["## Settings", "", "```json", config.to_json_best_effort(indent=2, sort_keys=True),
            "```", ""]
  lines += _figure_section(made, skipped)
  path = wd.out("report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  return path
