"""The data stage: the configured source as a Dataset and its images decoded once into the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np

from fgir_jax import data as data_lib
from fgir_jax.models import weights as weights_lib
from fgir_jax.train.context import Run


def load_dataset(config) -> data_lib.Dataset:
  """The configured source as a Dataset.

  cub / dogs read a local folder when data.root is set, else go through
  tensorflow-datasets (which downloads where it can, or reads the archives
  from data.tfds_manual_dir). A missing folder is an error, never a download.
  """
  d = config.data
  if d.source == "synthetic":
    s = d.synthetic
    ds = data_lib.make_synthetic(num_classes=s.num_classes, per_class=s.per_class, size=s.size,
                                 test_fraction=s.test_fraction, seed=int(config.seed),
                                 clutter=s.clutter)
  elif d.source == "folder":
    if not d.root:
      raise ValueError("data.source='folder' reads root/<class>/<image>: pass --config.data.root=DIR.")
    ds = data_lib.read_folder(d.root, test_fraction=d.folder_test_fraction, seed=int(config.seed))
  elif d.root:
    ds = (data_lib.read_cub if d.source == "cub" else data_lib.read_dogs)(d.root)
  else:
    name = {"cub": "caltech_birds2011", "dogs": "stanford_dogs"}[d.source]
    ds = data_lib.load_tfds(name, data_dir=d.tfds_data_dir, manual_dir=d.tfds_manual_dir)
  return _first_classes(ds, int(d.max_classes))


def _first_classes(ds: data_lib.Dataset, max_classes: int) -> data_lib.Dataset:
  """Keeps the first `max_classes` classes (quick runs on a big dataset)."""
  if max_classes <= 0 or max_classes >= len(ds.class_names):
    return ds
  kept = ds.subset(ds.labels < max_classes)
  return dataclasses.replace(kept, name=f"{ds.name}-first{max_classes}",
                             class_names=ds.class_names[:max_classes])


def check_dataset(ds: data_lib.Dataset, echo=print) -> None:
  """Stops on data the method cannot use; counts classes without a positive pair.

  Raises:
    ValueError: an empty split, or fewer than two classes in the training
      split (retrieval and the triplet loss need other classes to rank).
  """
  n_train, n_test = int(ds.is_train.sum()), int((~ds.is_train).sum())
  if n_train == 0 or n_test == 0:
    empty = "training (database)" if n_train == 0 else "test (query)"
    raise ValueError(f"{ds.name}: the {empty} split is empty ({n_train} train / {n_test} test "
                     "images); give a dataset with images in both splits (for a folder source, "
                     "at least two images per class, or set --config.data.folder_test_fraction).")
  counts = np.bincount(ds.labels[ds.is_train], minlength=len(ds.class_names))
  present = int((counts > 0).sum())
  if present < 2:
    raise ValueError(f"{ds.name}: the training split has {present} class; fine-grained retrieval "
                     "needs at least two (a single class would score accuracy 100% and mAP 1.0 "
                     "by construction).")
  single = int((counts == 1).sum())
  if single:
    echo(f"warning: {single} class(es) have a single training image: their anchors have no "
         "positive and add no triplet to stage 2.")


def files_digest(ds: data_lib.Dataset) -> str:
  """A digest of what the data stage reads: each image file's path and contents (the pixels
  of in-memory images), and the labels, split, boxes and class names.

  A replaced, added or removed image changes it; a copy of the same files does not (a
  dataset copied again, restored from a backup or unpacked anew keeps every finished
  stage). Reading the files costs a few seconds per GB, once per process.
  """
  h = hashlib.sha256()
  h.update(json.dumps([ds.name, list(ds.class_names)]).encode("utf-8"))
  for array in (ds.labels, ds.is_train, ds.boxes):
    if array is not None:
      h.update(np.ascontiguousarray(array).tobytes())
  if ds.paths is not None:
    for path in ds.paths:
      h.update(f"{path}\0{_file_sha256(path)}\n".encode("utf-8", "surrogateescape"))
  else:
    h.update(np.ascontiguousarray(ds.images).tobytes())
  return h.hexdigest()[:16]


def _file_sha256(path: str) -> str:
  try:
    return weights_lib.sha256_once(path)
  except OSError:  # missing or unreadable: the decode names it (or skips it with data.skip_bad)
    return "missing"


def stage_data(run: Run) -> dict:
  ds = run.dataset if run.dataset is not None else load_dataset(run.config)
  try:
    cached = data_lib.cached_images(ds, run.size, run.cache_dir,
                                    skip_bad=run.config.data.skip_bad,
                                    progress=bool(run.config.progress))
  except data_lib.UndecodableImage as e:
    raise ValueError(f"cannot decode image {e.path} ({e.reason}); replace or delete the file, "
                     f"or skip undecodable images: {run.command} --config.data.skip_bad=True"
                     ) from None
  if len(cached.kept) != len(ds.labels):
    ds = ds.subset(cached.kept)
  run.dataset, run.images = ds, cached.images
  run.skipped_files = list(getattr(cached, "bad", []) or [])
  return data_summary(run)


def data_summary(run: Run) -> dict:
  ds = run.dataset
  skipped = list(getattr(run, "skipped_files", []))
  summary = {"images": len(ds.labels), "train": int(ds.is_train.sum()),
             "test": int((~ds.is_train).sum()), "classes": len(ds.class_names),
             "skipped": len(skipped)}
  if skipped:
    summary["skipped_files"] = skipped[:50]  # the report lists them
  return summary



def write_examples(run: Run, count: int = 4) -> list[str]:
  """A few test-split images, one per class (spread over the classes), as examples/query_<i>
  files, so that `--mode search --query` has images to try: the synthetic birds as PNGs,
  image files copied as they are (keeping their format)."""
  ds = run.dataset
  test = np.flatnonzero(~ds.is_train)
  paths, seen = [], set()
  for row in test:
    label = int(ds.labels[row])
    if label in seen:
      continue
    seen.add(label)
    if ds.images is not None:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      path = run.wd.out("examples", f"query_{len(paths) + 1}.png")
      Image.fromarray(ds.images[row]).save(path)
    else:
      suffix = os.path.splitext(ds.paths[row])[1].lower() or ".jpg"
      path = run.wd.out("examples", f"query_{len(paths) + 1}{suffix}")
      shutil.copyfile(ds.paths[row], path)
    paths.append(path)
    if len(paths) == count:
      break
  return paths
