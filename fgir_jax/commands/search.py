"""Search a trained work directory with image queries, and grow its index (`launch.py --mode
search / index`).

A query goes through exactly what the database went through in training: decoded
and resized as the cache does, cropped by the saliency box of the same network
and threshold (the box applied to the original file, as `cached_crops` does),
encoded by the frozen stage-1 network, hashed by the stage-2 layer. The index
(`index/index_<bits>.npz`, written by the evaluate stage) holds the database
codes with their labels and image paths.
"""

from __future__ import annotations

import os

from fgir_jax import _extras

ml_collections = _extras.need("ml_collections", "fgir_jax.commands.search")
import numpy as np

from fgir_jax import data as data_lib
from fgir_jax import index as index_lib
from fgir_jax.data import cache as cache_lib
from fgir_jax.train import config as config_lib
from fgir_jax.train import data_stage
from fgir_jax.train import encoder as encoder_lib
from fgir_jax.train import evaluate
from fgir_jax.train import stages as stages_lib
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import Workdir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def index_path(wd, bits: int) -> str:
  return wd.file("index", f"index_{bits}.npz")


class Searcher:
  """The trained pieces of a work directory: its networks and hash layers (an Encoder) and
  each code length's index.

  It opens the run read-only and with the run's own settings (its
  config.json): nothing is written into the work directory, so a read-only or
  shared run can be searched. The code lengths it offers are the config's and
  those kept from an earlier command (`stages.kept_lengths`).
  """

  def __init__(self, config, workdir: str, bits: int | None = None):
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"work directory {workdir} does not exist; train a model there "
                              "first (python launch.py --config CONFIG --workdir DIR).")
    config = run_config(config, workdir)
    wd = Workdir(workdir, writable=False)
    self.run = Run(config, workdir, echo=lambda _: None, writable=False,
                   command=train_command(wd))
    self.trained_bits = _trained_bits(self.run)
    self.bits = self._pick_bits(bits)
    self._indexes = {}  # bits -> HammingIndex, loaded on first use
    self.index = self.index_for(self.bits)
    # The networks only need the class count; the labels come from the index.
    self.run.dataset = _ClassesOnly(self.index.class_names or [])
    self.encoder = encoder_lib.Encoder(self.run, len(self.run.dataset.class_names))
    self._paths = self.index.paths  # a copy per access: taken once
    self._train_images = None       # the run's cached train images, loaded on first need

  def _pick_bits(self, bits):
    if bits is None:
      return max(self.trained_bits)
    if bits not in self.trained_bits:
      raise ValueError(f"no {bits}-bit model in {self.run.wd.path}; it has "
                       f"{', '.join(map(str, self.trained_bits))}-bit codes: pass --bits with "
                       "one of those.")
    return bits

  def index_for(self, bits: int | None = None) -> index_lib.HammingIndex:
    """The database index of a trained code length (default: this searcher's)."""
    bits = self._pick_bits(self.bits if bits is None else bits)
    if bits not in self._indexes:
      self._indexes[bits] = index_lib.HammingIndex.load(index_path(self.run.wd, bits))
    return self._indexes[bits]

  # ---- images -> codes ---------------------------------------------------------
  def encode_files(self, paths: list[str], bits: int | None = None) -> np.ndarray:
    """(n, bits) {0,1} codes of image files, preprocessed as the training images were."""
    return self.encode_loaded(paths, self.load_files(paths), bits)

  def load_files(self, paths: list[str]) -> np.ndarray:
    """The uncropped images of `paths`, decoded and resized as the cache does."""
    for p in paths:
      if os.path.isdir(p):
        raise ValueError(f"query {p} is a folder, not an image; pass image files with --query "
                         "(one --query per image), or add a folder to the index with --mode "
                         "index --images FOLDER.")
      if not os.path.isfile(p):
        raise FileNotFoundError(f"query image {p} does not exist; check the path.")
    return self.encoder.load_files(paths)

  def encode_loaded(self, sources: list, images: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Codes of `images` (= the uncropped images of `sources`, image paths or file bytes):
    the saliency box is cut from the source itself, as the cache cuts it in training."""
    return self.encode_with_boxes(sources, images, bits)[0]

  def encode_with_boxes(self, sources: list, images: np.ndarray, bits: int | None = None):
    """(codes, boxes): boxes (n, 4) normalised (ymin, xmin, ymax, xmax), None without cropping."""
    return self.encoder.encode(sources, images, self._pick_bits(self.bits if bits is None
                                                                else bits))

  # ---- database images, for the grid --------------------------------------------
  def database_image(self, item: int, bits: int | None = None) -> np.ndarray:
    """The image of item `item` of a code length's index (default: this searcher's): its
    file, or the run's cached image (items without a file are the same training images,
    in the same order, in every code length's index)."""
    path = self._paths[item] if bits in (None, self.bits) else self.index_for(bits).paths[item]
    if path and os.path.isfile(path):
      return cache_lib.load_image(path, self.run.size)
    if self._train_images is None:
      # Items without a file are in-memory images (the synthetic source): made again here,
      # never decoded into the run's cache.
      ds = data_stage.load_dataset(self.run.config)
      images = data_lib.cached_images(ds, self.run.size, None, progress=False).images
      self._train_images = images[ds.is_train]
    return self._train_images[item]

  def path(self, item: int) -> str:
    return self._paths[item]

  def class_name(self, label: int) -> str:
    """The name of a class id; "" for -1 (an image added without a known class)."""
    names = self.index.class_names or []
    return names[label] if 0 <= label < len(names) else ""


def train_command(wd) -> str:
  """The command that trained the run (recorded in command.txt), to resume or rerun it."""
  try:
    with open(wd.file("command.txt")) as f:
      return f.read().strip()
  except OSError:
    return f"python launch.py --config CONFIG_FILE --workdir {wd.path}"


def run_config(config, workdir: str):
  """The settings the run was trained with (its config.json); `config` before the first
  training command finished."""
  saved = Workdir(workdir, writable=False).saved_config()
  if saved is None:
    return config
  return ml_collections.ConfigDict(saved)


def _trained_bits(run: Run) -> list[int]:
  """The code lengths a finished, consistent run can search, or one clear line.

  Consistent: every finished stage on the way to a code length's index was
  computed from the finished stage before it (the upstream fingerprints its
  marker recorded); a partial command with new settings breaks the chain
  until its remaining stages finish.
  """
  wd, config = run.wd, run.config
  bits = config_lib.bit_list(config)
  chain = (["saliency", "stage1"] + [f"stage2_{b}" for b in bits]
           + [f"evaluate_{b}" for b in bits])
  markers = {stage: wd.final_marker(stage) for stage in chain}
  missing = [s for s in chain if markers[s] is None and s != "saliency"]
  if missing:
    raise ValueError(f"{wd.path} has no trained model and index yet (stage(s) "
                     f"{', '.join(missing)} not finished); finish training first: {run.command}")
  stale = set()
  for stage in chain:
    for up, fp in (markers[stage] or {}).get("after", {}).items():
      if up in stale or (up in markers and (markers[up] or {}).get("fingerprint") != fp):
        stale.add(stage)
  if stale:
    shown = [s for s in chain if s in stale]
    raise ValueError(f"{wd.path} is being retrained with new settings ({', '.join(shown)} "
                     f"not finished); finish it first: {run.command}")
  kept = stages_lib.kept_lengths(config, wd, markers["stage1"]["fingerprint"])
  trained = [b for b in sorted(set(bits) | set(kept)) if os.path.exists(index_path(wd, b))]
  if not trained:
    raise ValueError(f"{wd.path} has no index (index/index_<bits>.npz); write it again with: "
                     f"{run.command} --config.rerun=evaluate")
  return trained


class _ClassesOnly:
  """What the network builders read from a Dataset: the class names."""

  def __init__(self, class_names):
    self.class_names = list(class_names)


def search_command(config, workdir: str, queries: list[str], k: int = 10,
                   bits: int | None = None, echo=print, out_dir: str = ".") -> dict:
  """Prints the top k of each query and draws them into OUT/search_results.png.

  Nothing is written into the work directory; `out_dir` (--out, default the
  current directory) gets the picture.
  """
  if not queries:
    raise ValueError("--mode search needs at least one --query IMAGE.")
  if k < 1:
    raise ValueError(f"--k must be a positive number of results, got {k}.")
  _check_out_dir(out_dir)
  searcher = Searcher(config, workdir, bits)
  query_images = searcher.load_files(list(queries))
  codes, boxes = searcher.encode_with_boxes(list(queries), query_images)
  distances, items = searcher.index.search(codes, k=min(k, len(searcher.index)))
  results = []
  for q, path in enumerate(queries):
    rows = []
    for rank, (d, i) in enumerate(zip(distances[q], items[q]), 1):
      label = int(searcher.index.labels[i])
      rows.append({"rank": rank, "distance": int(d), "item": int(i), "label": label,
                   "class_name": searcher.class_name(label) or str(label),
                   "path": searcher.path(i)})
    echo(f"query {path} ({searcher.bits} bits, {len(searcher.index)} database images)")
    for line in _table(rows):
      echo(line)
    results.append({"query": path, "results": rows})
  grid = _plot_grid(searcher, queries, query_images, results, out_dir, boxes)
  echo(f"grid of queries and results: {grid}")
  return {"bits": searcher.bits, "queries": results, "grid": grid}


def _check_out_dir(out_dir: str) -> None:
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"output folder {out_dir} does not exist; create it or pass "
                            "--out with an existing folder.")
  if not os.access(out_dir, os.W_OK):
    raise PermissionError(f"output folder {out_dir} is not writable; pass --out with a "
                          "folder you can write to.")


def _table(rows: list[dict]) -> list[str]:
  """The results as lines of an aligned table (columns as wide as their longest entry)."""
  cells = [[str(r["rank"]), str(r["distance"]), r["class_name"],
            r["path"] or f"(database item {r['item']})"] for r in rows]
  head = ["rank", "distance", "class", "path"]
  widths = [max(len(c[j]) for c in cells + [head]) for j in range(3)]
  fmt = lambda c: (f"{c[0]:>{widths[0]}}  {c[1]:>{widths[1]}}  {c[2]:<{widths[2]}}  "
                   f"{c[3]}").rstrip()
  return [fmt(head)] + [fmt(c) for c in cells]


def _plot_grid(searcher: Searcher, queries, query_images, results, out_dir: str,
               boxes=None) -> str:
  from fgir_jax.train import report_plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  rows = [[searcher.database_image(r["item"]) for r in q["results"]] for q in results]
  titles = [[f"d={r['distance']} {r['class_name']}" for r in q["results"]] for q in results]
  path = os.path.join(out_dir, "search_results.png")
  report_plots.image_grid(query_images, [os.path.basename(p) for p in queries], rows, titles,
                          path, query_boxes=boxes,
                          title="yellow: the saliency crop the query was encoded from"
                          if boxes is not None else "")
  return path


def index_command(config, workdir: str, folder: str | None, bits: int | None = None,
                  echo=print, command: str | None = None) -> dict:
  """Adds the images under `folder` (root/<class>/<image> or root/<image>) to the index.

  Holds the run's write lock. The additions are recorded (additions/), so an
  evaluation that rebuilds the index encodes them again with its networks.
  """
  if not folder:
    raise ValueError("--mode index needs --images FOLDER (the images to add).")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder} does not exist; check --images.")
  paths, classes = _folder_images(folder)
  if not paths:
    raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); nothing to add.")
  searcher = Searcher(config, workdir, bits)
  wd = searcher.run.wd
  if not os.access(wd.path, os.W_OK) or not os.access(wd.file("index"), os.W_OK):
    raise PermissionError(f"{wd.path} is not writable; --mode index adds to the run's index, "
                          "so it needs a run you may write to.")
  with Workdir(workdir).writing(command or f"--mode index --images {folder}", echo):
    return _add_to_index(searcher, paths, classes, echo)


def _add_to_index(searcher: Searcher, paths: list[str], classes: list[str], echo) -> dict:
  known = set(p for p in searcher.index.paths if p)
  fresh = [i for i, p in enumerate(paths) if os.path.abspath(p) not in known]
  skipped = len(paths) - len(fresh)
  if not fresh:
    echo(f"all {len(paths)} images are already in the {searcher.bits}-bit index; nothing added.")
    return {"added": 0, "skipped": skipped, "size": len(searcher.index)}
  paths, classes = [paths[i] for i in fresh], [classes[i] for i in fresh]
  names = list(searcher.index.class_names or [])
  # Sub-folders named like a trained class take its label; other images get -1 (unknown).
  labels = np.array([names.index(c) if c in names else -1 for c in classes], np.int64)
  codes = searcher.encode_files(paths)
  wd = searcher.run.wd
  evaluate.record_additions(wd, searcher.bits, paths, labels)
  searcher.index.add(codes, labels=labels, paths=[os.path.abspath(p) for p in paths])
  searcher.index.save(index_path(wd, searcher.bits))  # the index files only, written atomically
  echo(f"added {len(paths)} images to the {searcher.bits}-bit index "
       f"({len(searcher.index)} images now; {int((labels < 0).sum())} without a known class"
       + (f"; {skipped} already there, skipped" if skipped else "") + ")")
  return {"added": len(paths), "skipped": skipped, "size": len(searcher.index)}


def _folder_images(folder: str) -> tuple[list[str], list[str]]:
  """Image files under `folder`, sorted, with their sub-folder's path ("" at the top): a class
  name with "/" in it is a nested folder."""
  paths, classes = [], []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      if name.lower().endswith(IMAGE_SUFFIXES):
        paths.append(os.path.join(root, name))
        rel = os.path.relpath(root, folder)
        classes.append("" if rel == "." else rel.replace(os.sep, "/"))
  return paths, classes
