"""A plain image folder, `root/<class>/*.jpg`, with a seeded stratified split.

Class ids follow the sorted class-folder names; files are taken in sorted
order, so the same folder always gives the same dataset. The split is drawn
per class with a generator seeded by (seed, CRC32 of the class name): adding
or removing a class does not move any other class's images between splits.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from fgir_jax.data.dataset import IMAGE_EXTENSIONS, Dataset


def read_folder(root: str, test_fraction: float = 0.2, seed: int = 0,
                extensions=IMAGE_EXTENSIONS, name: str | None = None) -> Dataset:
  """Reads `root/<class>/<image>` with a per-class stratified train/test split.

  Args:
    root: a folder with one sub-folder of images per class; sub-folders with
      no image (and hidden entries) are ignored.
    test_fraction: fraction of each class put in the test split, in [0, 1).
      Each class gets round(fraction * count) test images, but keeps at least
      one training image, and gets at least one test image when it has two or
      more images and the fraction is above 0.
    seed: the split's seed, a non-negative int.
    extensions: file extensions (lower case, with the dot) taken as images.
    name: dataset name for cache keys; defaults to the folder's name.

  Returns:
    A `Dataset` with `paths`, `labels` (int32 class ids in sorted-name
    order), `is_train` and `class_names`; no boxes.

  Raises:
    ValueError: the folder is missing, holds no class folder with images, or
      `test_fraction` is outside [0, 1).
  """
  root = os.fspath(root)
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
  if int(seed) < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed}.")
  if not os.path.isdir(root):
    raise ValueError(
        f"image folder {root} does not exist; pass a folder laid out as root/<class>/<image>.")
  extensions = tuple(e.lower() for e in extensions)
  classes, paths, labels, is_train = [], [], [], []
  for entry in sorted(os.listdir(root)):
    folder = os.path.join(root, entry)
    if entry.startswith(".") or not os.path.isdir(folder):
      continue
    files = sorted(f for f in os.listdir(folder)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
                   and os.path.isfile(os.path.join(folder, f)))
    if not files:
      continue
    paths += [os.path.join(folder, f) for f in files]
    labels += [len(classes)] * len(files)
    is_train += list(_split(len(files), test_fraction, seed, entry))
    classes.append(entry)
  if not classes:
    raise ValueError(
        f"{root} holds no class folder with images ({', '.join(extensions)}); "
        f"lay it out as root/<class>/<image>.")
  return Dataset(name=name or os.path.basename(os.path.normpath(root)), paths=paths,
                 labels=np.array(labels), is_train=np.array(is_train), class_names=classes)


def _split(count: int, test_fraction: float, seed: int, class_name: str) -> np.ndarray:
  """(count,) bool, True = train, for one class."""
  n_test = int(round(test_fraction * count))
  if test_fraction > 0 and count >= 2:
    n_test = max(n_test, 1)
  n_test = min(n_test, count - 1)
  rng = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])
  is_train = np.ones(count, bool)
  is_train[rng.permutation(count)[:n_test]] = False
  return is_train
