"""The PNG figures of report.md, each drawn only from what the run measured.

Every `plot_*` function returns `(made, skipped)`: the file names it wrote
under `plots` and, for each figure it could not draw, the reason, so that the
report can say why a figure is missing instead of leaving a silent gap.

Figures (paper numbering): map_vs_epoch (Fig. 4), distances_vs_epoch (Fig. 5),
saliency_crops (Fig. 6), map_vs_bits (Fig. 7), and retrieval_grid (queries
with their top-10 database images by Hamming distance).
"""

from __future__ import annotations

import os
import re

import numpy as np

from fgir_jax import _extras
from fgir_jax import topk
from fgir_jax import saliency

_extras.need("matplotlib", "fgir_jax.train.report_plots").use("Agg")  # files only, no display
plt = _extras.need("matplotlib.pyplot", "fgir_jax.train.report_plots")

NUM_SHOWN = 6         # images per figure (rows of the crop and retrieval grids)
TOP_K = 10            # database results per query in the retrieval grid
CROP_ALPHAS = (0.2, 0.4, 0.6)  # besides config.saliency.alpha (paper Fig. 6)


def _save(fig, plots: str, name: str) -> list[str]:
  fig.tight_layout()
  fig.savefig(os.path.join(plots, name), dpi=100)
  plt.close(fig)
  return [name]


# ----------------------------------------------------------------------------
# Training curves and code length
# ----------------------------------------------------------------------------
def plot_stage2_curves(wd, bits: list[int], plots: str):
  """mAP vs epoch (paper Fig. 4) and d(A,P), d(A,N) vs epoch (Fig. 5)."""
  rows = {b: wd.read_log(f"stage2_{b}") for b in bits}
  if not any(rows.values()):
    reason = "no stage-2 epochs in metrics.jsonl"
    return [], {"map_vs_epoch.png": reason, "distances_vs_epoch.png": reason}
  made, skipped = [], {}
  curves = {b: [(x["epoch"], x["map"]) for x in r if "map" in x] for b, r in rows.items()}
  if any(curves.values()):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b, pts in curves.items():
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{b} bits")
    ax.set(xlabel="epoch", ylabel="mAP (query set)", title="mAP vs epoch")
    ax.legend()
    made += _save(fig, plots, "map_vs_epoch.png")
  else:
    skipped["map_vs_epoch.png"] = "no stage-2 epoch logged a mAP (see stage2.eval_every)"
  made += _plot_distances(rows, plots)
  return made, skipped


def _plot_distances(rows: dict, plots: str) -> list[str]:
  """Each code length in one colour: d(A,P) solid, d(A,N) dashed; the legend beside the axes."""
  fig, ax = plt.subplots(figsize=(6.5, 3.5))
  for i, (b, r) in enumerate(rows.items()):
    r = [x for x in r if "d_ap" in x and "d_an" in x]
    if r:
      epochs = [x["epoch"] for x in r]
      ax.plot(epochs, [x["d_ap"] for x in r], color=f"C{i}", label=f"d(A,P) {b} bits")
      ax.plot(epochs, [x["d_an"] for x in r], "--", color=f"C{i}", label=f"d(A,N) {b} bits")
  ax.set(xlabel="epoch", ylabel="mean distance (mined triplets)", title="Triplet distances")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  return _save(fig, plots, "distances_vs_epoch.png")


def plot_map_vs_bits(results: dict, plots: str):
  """mAP vs code length (paper Fig. 7)."""
  maps = results.get("map") or {}
  if not maps:
    return [], {"map_vs_bits.png": "results.json has no mAP (the evaluate stage did not run)"}
  bits = sorted(int(b) for b in maps)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(bits, [maps[str(b)] for b in bits], marker="o", label="stable ties")
  tie = results.get("map_tie_aware") or {}
  if tie:
    ax.plot(bits, [tie.get(str(b), np.nan) for b in bits], marker="s", ls="--", label="tie-aware")
  ax.set(xlabel="code length (bits)", ylabel="mAP", xticks=bits, title="mAP vs code length")
  ax.legend()
  return _save(fig, plots, "map_vs_bits.png"), {}


# ----------------------------------------------------------------------------
# Which images to show
# ----------------------------------------------------------------------------
def pick_queries(labels: np.ndarray, n: int = NUM_SHOWN) -> np.ndarray:
  """n row indices into `labels`, spread over the classes, the same on every call.

  Classes are taken evenly spaced over the sorted class ids, the first image
  of each; with fewer classes than n, the second image of each follows, etc.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels)
  if len(classes) > n:
    classes = classes[np.linspace(0, len(classes) - 1, n).round().astype(int)]
  members = [np.flatnonzero(labels == c) for c in classes]
  picked = []
  for rank in range(max((len(m) for m in members), default=0)):
    picked += [int(m[rank]) for m in members if rank < len(m)]
  return np.array(picked[:n], np.int64)


# ----------------------------------------------------------------------------
# Saliency crops (paper Fig. 6)
# ----------------------------------------------------------------------------
def plot_saliency_crops(wd, config, dataset, images, plots: str):
  """Saliency maps and boxes at several alpha on a few test images."""
  name = "saliency_crops.png"
  path = wd.read("saliency", "boxes.npz")
  if not config.saliency.enabled or not os.path.exists(path):
    return [], {name: "the saliency stage did not run (saliency.enabled or stages)"}
  if dataset is None or images is None:
    return [], {name: "write_report was not given the dataset and its uncropped images"}
  with np.load(path) as f:
    maps = f["maps"]
  if len(maps) != len(images) or len(images) != len(dataset.labels):
    return [], {name: f"saliency/boxes.npz has {len(maps)} maps for {len(images)} images"}
  test = np.flatnonzero(~dataset.is_train)
  rows = test[pick_queries(dataset.labels[test])]
  true = None if dataset.boxes is None else dataset.boxes[rows]
  alphas = sorted(set(CROP_ALPHAS) | {float(config.saliency.alpha)})
  saliency.plot_crops(np.asarray(images)[rows], maps[rows], true, alphas, os.path.join(plots, name),
                      mode=config.saliency.mode, margin=float(config.saliency.margin),
                      cell_inches=1.6)
  plt.close("all")
  return [name], {}


# ----------------------------------------------------------------------------
# Retrieval grid
# ----------------------------------------------------------------------------
def top_results(q_packed: np.ndarray, db_packed: np.ndarray, k: int = TOP_K):
  """The k nearest database codes of each query by Hamming distance.

  Args:
    q_packed: (n_q, bytes) uint8 codes from np.packbits.
    db_packed: (n_db, bytes) uint8, same code length.
    k: results per query (at most n_db are returned).

  Returns:
    (indices (n_q, k) int64 into the database, distances (n_q, k) int32).
    Ties are broken by database order (a stable sort), as the stable mAP does.
  """
  dist, order = topk.hamming_topk(q_packed, db_packed, k)
  return order, dist


def longest_codes(wd, bits):
  """(bits, query, database) of the longest of `bits` with codes/codes_<bits>.npz, or None."""
  for b in sorted(bits, reverse=True):
    path = wd.read("codes", f"codes_{b}.npz")
    if os.path.exists(path):
      with np.load(path) as f:
        return b, f["query"], f["database"]
  return None


def plot_retrieval_grid(wd, bits, dataset, shown, plots: str, boxes=None):
  """A few queries, each with its top-10 database images (green right, red wrong); `boxes`
  (one per dataset image, or None) draws each image's saliency crop on it."""
  name = "retrieval_grid.png"
  codes = longest_codes(wd, bits)
  if codes is None:
    return [], {name: "no codes/codes_<bits>.npz (the evaluate stage did not run)"}
  if dataset is None or shown is None:
    return [], {name: "write_report was not given the dataset and its images"}
  bits, q, db = codes
  is_train = np.asarray(dataset.is_train)
  if len(q) != (~is_train).sum() or len(db) != is_train.sum():
    return [], {name: f"codes_{bits}.npz has {len(q)} queries / {len(db)} database rows, "
                      f"the dataset {(~is_train).sum()} / {is_train.sum()}"}
  q_labels, db_labels = dataset.labels[~is_train], dataset.labels[is_train]
  rows = pick_queries(q_labels)
  top, dist = top_results(q[rows], db, TOP_K)
  q_images, db_images = np.asarray(shown)[~is_train], np.asarray(shown)[is_train]
  colours = [["limegreen" if db_labels[hit] == q_labels[r] else "red" for hit in top[i]]
             for i, r in enumerate(rows)]
  q_boxes = db_boxes = None
  if boxes is not None:
    q_boxes, db_boxes = np.asarray(boxes)[~is_train][rows], np.asarray(boxes)[is_train]
    db_boxes = [db_boxes[t] for t in top]
  path = image_grid(q_images[rows], [f"query: {_class(dataset, q_labels[r])}" for r in rows],
                    [db_images[t] for t in top],
                    [[f"d={d} {_class(dataset, db_labels[hit])}" for d, hit in zip(row, hits)]
                     for row, hits in zip(dist, top)],
                    os.path.join(plots, name), colours=colours,
                    title=f"Top-{top.shape[1]} by Hamming distance, {bits} bits"
                          + (" (yellow: saliency crop)" if boxes is not None else ""),
                    query_boxes=q_boxes, result_boxes=db_boxes)
  return [os.path.basename(path)], {}


TITLE_CHARS = 22  # characters per title line under a grid cell (wrapped, never cut)


def image_grid(queries, query_titles, results, result_titles, path: str, colours=None,
               title: str = "", query_boxes=None, result_boxes=None) -> str:
  """One row per query: the query, then its results; frames coloured per result (green
  right, red wrong, grey when unknown). Titles (class names) are wrapped whole; the
  optional boxes (normalised ymin, xmin, ymax, xmax; None for none) are drawn in yellow:
  the saliency crop each image was encoded from. Returns the PNG's path."""
  cols = 1 + max(len(r) for r in results)
  query_titles = [wrap_title(t) for t in query_titles]
  result_titles = [[wrap_title(t) for t in row] for row in result_titles]
  lines = max(t.count("\n") + 1 for t in query_titles + sum(result_titles, []))
  fig, axes = plt.subplots(len(queries), cols, squeeze=False,
                           figsize=(1.25 * cols, (1.15 + 0.11 * lines) * len(queries)))
  for i, query in enumerate(queries):
    _cell(axes[i, 0], query, query_titles[i], "black",
          None if query_boxes is None else query_boxes[i])
    for j in range(cols - 1):
      if j >= len(results[i]):
        axes[i, j + 1].axis("off")
        continue
      colour = colours[i][j] if colours is not None else "grey"
      _cell(axes[i, j + 1], results[i][j], result_titles[i][j], colour,
            None if result_boxes is None else result_boxes[i][j])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def wrap_title(text, width: int = TITLE_CHARS) -> str:
  """Lines of at most `width` characters, broken after spaces, "/", "_" or "." where possible
  (class names such as "yellow-crown/2-stripes/dot" or "001.Black_footed_Albatross")."""
  lines, line = [], ""
  for token in re.split(r"(?<=[ /_.])", str(text)):
    while len(token) > width:  # a token longer than a line: cut it, only then
      if line:
        lines.append(line)
        line = ""
      lines.append(token[:width])
      token = token[width:]
    if len(line) + len(token) > width and line:
      lines.append(line)
      line = ""
    line += token
  return "\n".join(part.rstrip() for part in lines + [line] if part.strip()) or ""


def _class(dataset, label) -> str:
  names = dataset.class_names
  return names[label] if label < len(names) else str(label)


def _cell(ax, image, title: str, colour: str, box=None) -> None:
  ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=6)
  if box is not None:
    from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
    h, w = np.asarray(image).shape[:2]
    y0, x0, y1, x1 = np.asarray(box, float) * [h, w, h, w]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor="yellow", linewidth=1.2))
  # The frame says right (green) or wrong (red) at a glance.
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(3)
