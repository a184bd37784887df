"""CUB and Stanford Dogs through tensorflow-datasets, materialised as files.

For users whose machine can download (tfds fetches both datasets itself) or
who put the archives in tfds's manual directory. TensorFlow and tfds are
imported only inside `load_tfds`, and not even there once the images are
materialised into an explicit `out_dir`; nothing else in fgir_jax needs them.

Decision: the encoded image bytes tfds stored (the original JPEGs) are written
once, unchanged, to a folder beside tfds's data (`<data_dir>/fgir_jax_images/
<name>/<version>/<split>/<index>.jpg`, or `out_dir`) with a JSON manifest of
labels, split, class names and every annotated box (the `box` mode is applied
when loading). The returned `Dataset` then holds file paths, exactly like
`read_cub`, so the decode cache, crops and everything after them take one code
path and no image is re-encoded; a run that passes the same `out_dir` (e.g. a
GPU machine given the folder) needs neither TensorFlow nor the tfds records.
"""

from __future__ import annotations

import json
import os

import numpy as np

from fgir_jax.data.dataset import Dataset, clip_boxes
from fgir_jax.data.dogs import BOX_MODES, combine_boxes

TFDS_NAMES = ("caltech_birds2011", "stanford_dogs")
_MANIFEST = "manifest.json"


def load_tfds(name: str, data_dir: str | None = None, manual_dir: str | None = None,
              download: bool = True, out_dir: str | None = None, box: str = "union",
              splits=("train", "test")) -> Dataset:
  """Loads `caltech_birds2011` or `stanford_dogs` from tfds as a file-backed Dataset.

  Args:
    name: "caltech_birds2011" or "stanford_dogs", optionally with a version
      ("stanford_dogs:0.2.0").
    data_dir: tfds's data directory (None: tfds's default, ~/tensorflow_datasets
      or $TFDS_DATA_DIR).
    manual_dir: where the downloaded archives lie when tfds cannot download
      them itself (tfds's `DownloadConfig(manual_dir=...)`).
    download: run `download_and_prepare` first (a no-op once prepared).
    out_dir: where the image files and manifest are written; default beside
      tfds's data, see the module docstring.
    box: Stanford Dogs only, how one box is made from several dogs: "union",
      "largest" or "first" (as in `read_dogs`).
    splits: the tfds splits to read; "train" rows get `is_train=True`.

  Returns:
    A `Dataset` with `paths`, `labels` (tfds's 0-based label), `is_train`,
    `boxes` ((n, 4) float32 (ymin, xmin, ymax, xmax) as tfds stores them) and
    `class_names` (tfds's label names).

  Raises:
    ImportError: tensorflow or tensorflow-datasets is not installed.
    ValueError: an unknown dataset name or box mode.
  """
  base_name = name.split(":")[0]
  if base_name not in TFDS_NAMES:
    raise ValueError(f"load_tfds supports {', '.join(TFDS_NAMES)}, got {name!r}; "
                     f"use read_folder for other datasets.")
  if box not in BOX_MODES:
    raise ValueError(f"box must be one of {', '.join(BOX_MODES)}, got {box!r}.")
  # Materialised before into an explicit out_dir: no TensorFlow needed at all.
  manifest = None if out_dir is None else _read_manifest(out_dir, splits)
  if manifest is None:
    tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    if out_dir is None:
      data_root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
      out_dir = os.path.join(data_root, "fgir_jax_images", builder.name, str(builder.version))
    manifest = _read_manifest(out_dir, splits) or _materialise(tfds, builder, out_dir, splits)
  paths = [os.path.join(out_dir, p) for p in manifest["paths"]]
  boxes = [combine_boxes(objects, box) for objects in manifest["objects"]]
  return Dataset(
      name=f"tfds-{base_name}", paths=paths, labels=np.array(manifest["labels"]),
      is_train=np.array(manifest["is_train"]),
      boxes=clip_boxes(np.array(boxes, np.float32).reshape(-1, 4)),
      class_names=manifest["class_names"])


def _import_tfds():
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "loading CUB or Dogs through tensorflow-datasets needs TensorFlow: pip install -e "
        "'.[tfds]' (or pass the unpacked archive with --config.data.root=DIR, which needs "
        "neither; data.read_cub / data.read_dogs in Python).") from None
  return tfds


def _read_manifest(out_dir: str, splits) -> dict | None:
  """The manifest of an earlier, completed materialisation, if it matches."""
  path = os.path.join(out_dir, _MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  try:
    if manifest.get("splits") != list(splits) or "objects" not in manifest:
      return None
    if not all(os.path.isfile(os.path.join(out_dir, p)) for p in manifest["paths"]):
      return None
  except (AttributeError, KeyError, TypeError):
    return None  # not our manifest
  return manifest


def _materialise(tfds, builder, out_dir: str, splits) -> dict:
  """Writes every example's encoded bytes to a file; returns the manifest."""
  label_feature = builder.info.features["label"]
  manifest = {"name": builder.name, "version": str(builder.version), "splits": list(splits),
              "class_names": list(label_feature.names), "paths": [], "labels": [],
              "is_train": [], "objects": []}
  for split in splits:
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    for i, example in enumerate(tfds.as_numpy(ds)):
      data = bytes(example["image"])
      rel = os.path.join(split, f"{i:06d}{_extension(data)}")
      _write_atomic(os.path.join(out_dir, rel), data)
      manifest["paths"].append(rel)
      manifest["labels"].append(int(example["label"]))
      manifest["is_train"].append(split == "train")
      manifest["objects"].append(_example_boxes(example).tolist())
  # The manifest is written last: its presence means every image file is complete.
  _write_atomic(os.path.join(out_dir, _MANIFEST), json.dumps(manifest).encode("utf-8"))
  return manifest


def _example_boxes(example: dict) -> np.ndarray:
  """(k, 4) boxes of a caltech_birds2011 'bbox' (k = 1) or stanford_dogs 'objects'."""
  if "bbox" in example:
    return np.asarray(example["bbox"], np.float32).reshape(1, 4)
  return np.asarray(example["objects"]["bbox"], np.float32).reshape(-1, 4)


def _extension(data: bytes) -> str:
  if data[:3] == b"\xff\xd8\xff":
    return ".jpg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return ".png"
  return ".img"  # PIL sniffs the format from the bytes, not the name


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
