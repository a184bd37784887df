"""The `Dataset` record every source returns, and small helpers they share.

A source (CUB, Stanford Dogs, tfds, an image folder, the synthetic set) gives
one `Dataset`: the images as file paths (decoded later by `data.cache`) or as
an in-memory uint8 array, 0-based labels, the official train/test split and,
where the dataset has them, true boxes normalised like tfds writes them:
(ymin, xmin, ymax, xmax) as fractions of the image's height and width.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

# Extensions PIL decodes that image datasets use; lower case, with the dot.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Images, labels, split and boxes of one dataset (both splits together).

  Exactly one of `paths` and `images` is set.

  Attributes:
    name: short name used in cache keys and reports, e.g. "cub".
    labels: (n,) int32 class ids, 0-based.
    is_train: (n,) bool, True for the training split (the retrieval database),
      False for the test split (the queries).
    class_names: one name per class id; `len(class_names)` is the number of
      classes (it may exceed `labels.max() + 1` for a subset of a dataset).
    paths: list of n image file paths, or None for in-memory images.
    images: (n, h, w, 3) uint8 RGB, or None for images on disk.
    boxes: (n, 4) float32 true boxes (ymin, xmin, ymax, xmax) in [0, 1],
      normalised by each image's own height and width; None when the dataset
      has no boxes.
    sizes: (n, 2) int32 (height, width) of each image in pixels when the
      source read them (CUB from the file headers, Dogs from the XML), else None.
  """
  name: str
  labels: np.ndarray
  is_train: np.ndarray
  class_names: tuple[str, ...]
  paths: list[str] | None = None
  images: np.ndarray | None = None
  boxes: np.ndarray | None = None
  sizes: np.ndarray | None = None

  def __post_init__(self):
    if (self.paths is None) == (self.images is None):
      raise ValueError(
          "Dataset needs exactly one of paths and images; pass file paths or a uint8 array.")
    n = len(self.paths) if self.paths is not None else len(self.images)
    # Normalise dtypes once here so every consumer can rely on them.
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.paths is not None:
      set_("paths", [os.fspath(p) for p in self.paths])
    if self.images is not None:
      images = np.asarray(self.images)
      if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"Dataset images must be a (n, h, w, 3) uint8 array, "
            f"got {images.dtype} {images.shape}.")
      set_("images", images)
    set_("labels", _column(self.labels, n, "labels", np.int32))
    set_("is_train", _column(self.is_train, n, "is_train", np.bool_))
    set_("class_names", tuple(str(c) for c in self.class_names))
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(
          f"Dataset labels must lie in [0, {len(self.class_names)}) (one class name per id), "
          f"got [{self.labels.min()}, {self.labels.max()}].")
    if self.boxes is not None:
      boxes = np.asarray(self.boxes, np.float32)
      if boxes.shape != (n, 4):
        raise ValueError(f"Dataset boxes must have shape ({n}, 4), got {boxes.shape}.")
      set_("boxes", boxes)
    if self.sizes is not None:
      sizes = np.asarray(self.sizes, np.int32)
      if sizes.shape != (n, 2):
        raise ValueError(f"Dataset sizes must have shape ({n}, 2), got {sizes.shape}.")
      set_("sizes", sizes)

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def subset(self, index) -> "Dataset":
    """The rows selected by an integer index array or a boolean mask, same fields."""
    index = np.asarray(index)
    if index.dtype == np.bool_:
      index = np.flatnonzero(index)
    pick = lambda a: None if a is None else a[index]
    return dataclasses.replace(
        self,
        labels=self.labels[index],
        is_train=self.is_train[index],
        paths=None if self.paths is None else [self.paths[i] for i in index],
        images=pick(self.images),
        boxes=pick(self.boxes),
        sizes=pick(self.sizes))

  @property
  def train(self) -> "Dataset":
    """The training split (the retrieval database)."""
    return self.subset(self.is_train)

  @property
  def test(self) -> "Dataset":
    """The test split (the queries)."""
    return self.subset(~self.is_train)


def _column(values, n: int, name: str, dtype) -> np.ndarray:
  array = np.asarray(values)
  if array.shape != (n,):
    raise ValueError(f"Dataset {name} must have shape ({n},), got {array.shape}.")
  return array.astype(dtype)


def clip_boxes(boxes: np.ndarray) -> np.ndarray:
  """Boxes clipped to [0, 1] with min <= max on each axis (annotations overshoot by a pixel)."""
  boxes = np.clip(np.asarray(boxes, np.float32), 0.0, 1.0)
  lo = np.minimum(boxes[:, :2], boxes[:, 2:])
  hi = np.maximum(boxes[:, :2], boxes[:, 2:])
  return np.concatenate([lo, hi], axis=1)


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of an image file from its header, without decoding the pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      width, height = img.size
  except FileNotFoundError:
    raise ValueError(
        f"image file {path} does not exist; restore it or remove it from the list.") from None
  except Exception as e:  # PIL raises several types for a bad header
    raise ValueError(f"cannot read the header of image {path} ({e}); replace the file.") from e
  return height, width


def image_sizes(paths: Sequence[str], workers: int = 8) -> np.ndarray:
  """(n, 2) int32 (height, width) of many files; threads hide file-system latency."""
  if len(paths) < 64:
    return np.array([image_size(p) for p in paths], np.int32).reshape(-1, 2)
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top
  with ThreadPoolExecutor(workers) as pool:
    return np.array(list(pool.map(image_size, paths)), np.int32).reshape(-1, 2)
