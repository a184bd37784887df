"""CUB-200-2011 from its own on-disk layout (as `CUB_200_2011.tgz` unpacks).

    CUB_200_2011/images/<class>/<file>.jpg
    CUB_200_2011/images.txt              <image id> <relative path>
    CUB_200_2011/image_class_labels.txt  <image id> <class id, 1-based>
    CUB_200_2011/train_test_split.txt    <image id> <1 = train, 0 = test>
    CUB_200_2011/bounding_boxes.txt      <image id> <x> <y> <width> <height>, pixels
    CUB_200_2011/classes.txt             <class id> <name>  (optional here)

Labels are the official class id minus one, so a subset with classes 1-50
(such as the development set cub50) has labels 0..49 and a subset with classes
51-100 keeps labels 50..99, the same ids tfds's `caltech_birds2011` uses.
Boxes are normalised like tfds does it, x / width and y / height of each
image's own size, which is read from the file header (no pixel decoding).
"""

from __future__ import annotations

import os

import numpy as np

from fgir_jax.data.dataset import Dataset, clip_boxes, image_sizes

_REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
_HOWTO = ("download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 "
          "and unpack it, or leave --config.data.root unset to load it through "
          "tensorflow-datasets (pip install -e '.[tfds]'; data.load_tfds in Python)")


def read_cub(root: str, name: str = "cub") -> Dataset:
  """Reads CUB-200-2011 (or a subset of its classes) from the official layout.

  Args:
    root: a folder that holds `CUB_200_2011/` (as the archive unpacks) or is it.
    name: the dataset name used for cache keys.

  Returns:
    A `Dataset` in images.txt order with `paths`, `labels` (class id - 1,
    int32), `is_train` (bool, official split), `boxes` ((n, 4) float32
    (ymin, xmin, ymax, xmax) in [0, 1]), `sizes` ((n, 2) (height, width) from
    the headers) and `class_names` (from classes.txt, else "class_<id>").

  Raises:
    ValueError: the folder, a metadata file or a listed image is missing, or a
      metadata file is malformed; the message names the path and the fix.
  """
  base = _find_base(os.fspath(root))
  ids, rel_paths = _read_table(base, "images.txt", str)
  table = {"images.txt": dict(zip(ids, rel_paths))}
  for fname in _REQUIRED[1:]:
    keys, values = _read_table(base, fname, float)
    table[fname] = dict(zip(keys, values))
  for fname in _REQUIRED[1:]:
    missing = [i for i in ids if i not in table[fname]]
    if missing:
      raise ValueError(
          f"{os.path.join(base, fname)} has no line for image id {missing[0]} "
          f"({len(missing)} ids missing); restore the file from the archive ({_HOWTO}).")

  class_ids = np.array([table["image_class_labels.txt"][i][0] for i in ids], np.int64)
  is_train = np.array([table["train_test_split.txt"][i][0] for i in ids]) == 1
  if any(len(table["bounding_boxes.txt"][i]) != 4 for i in ids):
    raise ValueError(f"{os.path.join(base, 'bounding_boxes.txt')} must hold 'id x y width height' "
                     f"on every line; restore the file from the archive ({_HOWTO}).")
  xywh = np.array([table["bounding_boxes.txt"][i] for i in ids], np.float64).reshape(-1, 4)
  if class_ids.size and class_ids.min() < 1:
    raise ValueError(f"{os.path.join(base, 'image_class_labels.txt')} has class id "
                     f"{class_ids.min()}; CUB class ids start at 1.")

  paths = [os.path.join(base, "images", p) for p in rel_paths]
  _check_exist(paths, base)
  sizes = image_sizes(paths)  # (height, width) from headers only
  return Dataset(
      name=name,
      paths=paths,
      labels=class_ids - 1,
      is_train=is_train,
      boxes=_normalise_xywh(xywh, sizes),
      sizes=sizes,
      class_names=_class_names(base, int(class_ids.max()) if class_ids.size else 0))


def _find_base(root: str) -> str:
  for base in (os.path.join(root, "CUB_200_2011"), root):
    if os.path.isfile(os.path.join(base, "images.txt")):
      return base
  if not os.path.isdir(root):
    raise ValueError(f"CUB folder {root} does not exist; {_HOWTO}, then pass the folder that "
                     f"holds CUB_200_2011/.")
  raise ValueError(
      f"{root} holds no CUB_200_2011/images.txt; expected CUB_200_2011/ with images/ and "
      f"{', '.join(_REQUIRED)}; {_HOWTO}.")


def _read_table(base: str, fname: str, kind) -> tuple[list[int], list]:
  """Rows '<id> <values...>' of a metadata file as (ids, values)."""
  path = os.path.join(base, fname)
  if not os.path.isfile(path):
    raise ValueError(
        f"CUB metadata file {path} is missing; expected {', '.join(_REQUIRED)} beside images/; "
        f"{_HOWTO}.")
  ids, values = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split(maxsplit=1) if kind is str else line.split()
      if not parts:
        continue
      try:
        ids.append(int(parts[0]))
        values.append(parts[1].strip() if kind is str else [float(v) for v in parts[1:]])
      except (ValueError, IndexError):
        raise ValueError(
            f"{path} line {lineno} is malformed ({line.strip()!r}); restore the file from the "
            f"archive ({_HOWTO}).") from None
  return ids, values


def _check_exist(paths: list[str], base: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(
        f"CUB image {missing[0]} listed in {os.path.join(base, 'images.txt')} is missing{more}; "
        f"re-extract the images ({_HOWTO}).")


def _normalise_xywh(xywh: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Pixel (x, y, w, h) -> normalised (ymin, xmin, ymax, xmax), as tfds computes it."""
  h = sizes[:, 0].astype(np.float64)
  w = sizes[:, 1].astype(np.float64)
  x, y, bw, bh = xywh.T
  return clip_boxes(np.stack([y / h, x / w, (y + bh) / h, (x + bw) / w], axis=1))


def _class_names(base: str, max_id: int) -> tuple[str, ...]:
  """Names by class id from classes.txt; ids it does not list get 'class_<id>'."""
  names = {}
  path = os.path.join(base, "classes.txt")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit():
          names[int(parts[0])] = parts[1].strip()
  count = max([max_id, *names])
  return tuple(names.get(i, f"class_{i}") for i in range(1, count + 1))
