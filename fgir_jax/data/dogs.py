"""Stanford Dogs from the original archives' layout.

`images.tar`, `annotation.tar` and `lists.tar` from
http://vision.stanford.edu/aditya86/ImageNetDogs/ unpacked into one folder:

    Images/<synset>-<breed>/<synset>_<n>.jpg
    Annotation/<synset>-<breed>/<synset>_<n>      VOC-style XML, no extension
    train_list.mat, test_list.mat                 (also accepted under lists/)

The .mat files (MATLAB v5) hold `file_list` (paths relative to Images/),
`labels` (1-based class ids) and `annotation_list`; the official split is
12,000 train / 8,580 test images over 120 breeds. Reading them needs scipy.

Several dogs per image: the XML has one <object> each. `box="union"` (the
default) gives the box around all of them, so a crop to it keeps every
labelled dog; `"largest"` keeps the one with the largest area and `"first"`
the first one listed (what a single-box loader usually does). Boxes are
normalised like tfds does it: xmin / width, ymin / height with the image size
written in the XML's <size> (the header is read when the XML lacks it).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from fgir_jax.data.dataset import Dataset, clip_boxes, image_size

_HOWTO = ("download images.tar, annotation.tar and lists.tar from "
          "http://vision.stanford.edu/aditya86/ImageNetDogs/ and unpack them into one folder, "
          "or leave --config.data.root unset to load it through tensorflow-datasets "
          "(pip install -e '.[tfds]'; data.load_tfds in Python)")
BOX_MODES = ("union", "largest", "first")


def read_dogs(root: str, box: str = "union", name: str = "dogs") -> Dataset:
  """Reads Stanford Dogs with its official train/test split and true boxes.

  Args:
    root: the folder holding Images/, Annotation/ and train_list.mat /
      test_list.mat (directly or under lists/).
    box: how one box is made from several annotated dogs: "union",
      "largest" or "first" (see the module docstring).
    name: the dataset name used for cache keys.

  Returns:
    A `Dataset` with the training images first, then the test images, each in
    the .mat files' order; `labels` = .mat label - 1 (int32); `class_names`
    are the breed folder names (e.g. "n02085620-Chihuahua") by class id;
    `boxes` (n, 4) float32 (ymin, xmin, ymax, xmax) in [0, 1]; `sizes`
    (n, 2) (height, width) as the XML gives them.

  Raises:
    ValueError: a folder, list file, image or annotation is missing or
      malformed, or `box` is not one of BOX_MODES.
  """
  if box not in BOX_MODES:
    raise ValueError(f"box must be one of {', '.join(BOX_MODES)}, got {box!r}.")
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise ValueError(f"Stanford Dogs folder {root} does not exist; {_HOWTO}.")
  for sub in ("Images", "Annotation"):
    if not os.path.isdir(os.path.join(root, sub)):
      raise ValueError(
          f"{os.path.join(root, sub)} is missing; expected Images/, Annotation/, train_list.mat "
          f"and test_list.mat in {root}; {_HOWTO}.")

  files, labels, is_train = [], [], []
  for split in ("train", "test"):
    split_files, split_labels = _read_list(_find_list(root, split))
    files += split_files
    labels += split_labels
    is_train += [split == "train"] * len(split_files)

  class_names = _class_names(files, labels)
  paths = [os.path.join(root, "Images", f) for f in files]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"Stanford Dogs image {missing[0]} listed in the .mat lists is missing{more}; "
                     f"re-extract images.tar ({_HOWTO}).")
  read = [_read_box(root, f, p, box) for f, p in zip(files, paths)]
  boxes = np.array([b for b, _ in read], np.float32).reshape(-1, 4)
  sizes = np.array([hw for _, hw in read], np.int32).reshape(-1, 2)
  return Dataset(name=name, paths=paths, labels=np.array(labels) - 1, is_train=np.array(is_train),
                 boxes=clip_boxes(boxes), sizes=sizes, class_names=class_names)


def _find_list(root: str, split: str) -> str:
  for folder in (root, os.path.join(root, "lists")):
    path = os.path.join(folder, f"{split}_list.mat")
    if os.path.isfile(path):
      return path
  raise ValueError(
      f"Stanford Dogs split file {os.path.join(root, split + '_list.mat')} is missing "
      f"(also looked in lists/); unpack lists.tar there ({_HOWTO}).")


def _read_list(path: str) -> tuple[list[str], list[int]]:
  """(relative image paths, 1-based labels) from train_list.mat / test_list.mat."""
  try:
    import scipy.io  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        "reading Stanford Dogs' .mat split files needs scipy; pip install scipy.") from None
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True)
    files = [_as_str(f) for f in np.atleast_1d(mat["file_list"])]
    labels = [int(v) for v in np.atleast_1d(mat["labels"])]
  except Exception as e:  # loadmat raises many types on a bad file
    raise ValueError(f"cannot read 'file_list' and 'labels' from {path} ({e}); "
                     f"restore it from lists.tar.") from e
  if len(files) != len(labels):
    raise ValueError(f"{path} has {len(files)} files but {len(labels)} labels; "
                     f"restore it from lists.tar.")
  return [f.replace("\\", "/") for f in files], labels


def _as_str(cell) -> str:
  # A MATLAB cell of strings loads as str or as a 0-d/1-element array of str.
  return str(np.asarray(cell).reshape(-1)[0]) if not isinstance(cell, str) else cell


def _class_names(files: list[str], labels: list[int]) -> tuple[str, ...]:
  """Breed folder name by class id, checking that every id maps to one folder."""
  by_id: dict[int, str] = {}
  for f, y in zip(files, labels):
    folder = f.split("/")[0]
    if by_id.setdefault(y, folder) != folder:
      raise ValueError(f"Stanford Dogs label {y} is used for both {by_id[y]} and {folder}; "
                       f"the .mat lists are inconsistent, restore them from lists.tar.")
  if labels and min(labels) < 1:
    raise ValueError(f"Stanford Dogs labels must start at 1, got {min(labels)}; "
                     f"restore the lists from lists.tar.")
  count = max(by_id, default=0)
  return tuple(by_id.get(i, f"class_{i}") for i in range(1, count + 1))


def _read_box(root: str, rel_image: str, image_path: str, mode: str):
  """(normalised (ymin, xmin, ymax, xmax), (height, width)) from the image's XML annotation."""
  path = os.path.join(root, "Annotation", os.path.splitext(rel_image)[0])
  if not os.path.isfile(path):
    if os.path.isfile(path + ".xml"):
      path += ".xml"
    else:
      raise ValueError(f"Stanford Dogs annotation {path} is missing; re-extract annotation.tar "
                       f"({_HOWTO}).")
  try:
    tree = ET.parse(path).getroot()
    objects = [[float(o.find(f"bndbox/{k}").text) for k in ("ymin", "xmin", "ymax", "xmax")]
               for o in tree.iter("object")]
    width = float(tree.findtext("size/width", "0") or 0)
    height = float(tree.findtext("size/height", "0") or 0)
  except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
    raise ValueError(f"cannot read the boxes of Stanford Dogs annotation {path} ({e}); "
                     f"re-extract annotation.tar.") from e
  if not objects:
    raise ValueError(f"Stanford Dogs annotation {path} has no <object><bndbox>; "
                     f"re-extract annotation.tar.")
  if width <= 0 or height <= 0:
    height, width = image_size(image_path)  # XML without a usable <size>
  pixel_box = combine_boxes(np.array(objects), mode)
  return list(pixel_box / np.array([height, width, height, width])), (int(height), int(width))


def combine_boxes(boxes: np.ndarray, mode: str) -> np.ndarray:
  """One (ymin, xmin, ymax, xmax) box from an image's (k, 4) boxes (any unit).

  mode: "union" (the box around all), "largest" (by area) or "first"; no box
  at all gives the whole image (0, 0, 1, 1) in normalised units.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(boxes) == 0:
    return np.array([0.0, 0.0, 1.0, 1.0])
  if mode == "union":
    return np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
  if mode == "largest":
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[int(np.argmax(areas))]
  return boxes[0]
