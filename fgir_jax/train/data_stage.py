"""The data stage: the configured source as a Dataset and its images decoded once into the cache."""

from __future__ import annotations

import dataclasses

from fgir_jax import data as data_lib
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


def stage_data(run: Run) -> dict:
  ds = load_dataset(run.config)
  cached = data_lib.cached_images(ds, run.size, run.cache_dir, skip_bad=run.config.data.skip_bad,
                                  progress=bool(run.config.progress))
  if len(cached.kept) != len(ds.labels):
    ds = ds.subset(cached.kept)
  run.dataset, run.images = ds, cached.images
  return {"images": len(ds.labels), "train": int(ds.is_train.sum()),
          "test": int((~ds.is_train).sum()), "classes": len(ds.class_names),
          "skipped": len(getattr(cached, "bad", []) or [])}

