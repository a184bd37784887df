"""A CUB-200-2011 subset in the official layout: chosen classes, optionally downscaled.

    python -m fgir_jax.data.subset CUB_200_2011.tgz data/cub50 --classes 1-50 --max-side 256
    python -m fgir_jax.data.subset /data/CUB_200_2011 data/cub_birds --classes 1-10,60,71-80

The source is the official archive (`CUB_200_2011.tgz`, read in two streaming
passes, nothing else extracted) or the folder it unpacks to. The output is
DEST/CUB_200_2011/ with images/ and images.txt, image_class_labels.txt,
train_test_split.txt, bounding_boxes.txt and classes.txt, keeping the official
image and class ids (so labels are the same as for the whole dataset, and as
tensorflow-datasets numbers them). `--max-side N` shrinks every image whose
longer side is above N pixels (JPEG quality 95) and scales its box with it.
`data.read_cub(DEST)` and `--config.data.root=DEST` read the result; the
cub50 tables of docs/real-birds.md come from `--classes 1-50 --max-side 256`.
"""

from __future__ import annotations

import argparse
import io
import os
import posixpath
import sys
import tarfile

from fgir_jax import _extras

_TABLES = ("images.txt", "image_class_labels.txt", "train_test_split.txt",
           "bounding_boxes.txt", "classes.txt")


def parse_classes(text: str) -> list[int]:
  """"1-50" or "1-10,60,71-80" -> sorted class ids in 1..200."""
  ids = set()
  for part in str(text).split(","):
    part = part.strip()
    try:
      low, _, high = part.partition("-")
      ids.update(range(int(low), int(high or low) + 1))
    except ValueError:
      raise ValueError(f"--classes takes ids and ranges like 1-50 or 1-10,60; got {text!r}.") \
          from None
  if not ids or min(ids) < 1 or max(ids) > 200:
    raise ValueError(f"--classes must name class ids from 1 to 200, got {text!r}.")
  return sorted(ids)


class _Source:
  """The official folder or archive: its metadata tables, then the images it holds."""

  def __init__(self, path: str):
    self.path = path
    self.archive = os.path.isfile(path) and tarfile.is_tarfile(path)
    if not self.archive:
      base = path if os.path.isfile(os.path.join(path, "images.txt")) else \
          os.path.join(path, "CUB_200_2011")
      if not os.path.isfile(os.path.join(base, "images.txt")):
        raise ValueError(f"{path} is neither CUB_200_2011.tgz nor a folder holding "
                         "CUB_200_2011/images.txt; download the archive from "
                         "https://data.caltech.edu/records/65de6-vp158.")
      self.base = base

  def tables(self) -> dict[str, str]:
    """{name: text} of the metadata files."""
    if not self.archive:
      out = {}
      for name in _TABLES:
        path = os.path.join(self.base, name)
        if os.path.isfile(path):
          with open(path, encoding="utf-8") as f:
            out[name] = f.read()
      return out
    out = {}
    with tarfile.open(self.path, "r:*") as tar:
      for member in tar:
        name = posixpath.basename(member.name)
        if member.isfile() and name in _TABLES and posixpath.dirname(member.name).endswith(
            "CUB_200_2011"):
          out[name] = tar.extractfile(member).read().decode("utf-8")
    return out

  def images(self, wanted: set[str]):
    """(relative path, file bytes) of each wanted image (paths as images.txt lists them)."""
    if not self.archive:
      for rel in sorted(wanted):
        with open(os.path.join(self.base, "images", *rel.split("/")), "rb") as f:
          yield rel, f.read()
      return
    with tarfile.open(self.path, "r:*") as tar:
      for member in tar:
        head, sep, rel = member.name.partition("CUB_200_2011/images/")
        if sep and member.isfile() and rel in wanted:
          yield rel, tar.extractfile(member).read()


def _rows(text: str) -> list[list[str]]:
  return [line.split() for line in text.splitlines() if line.strip()]


def write_subset(source: str, dest: str, classes, max_side: int | None = None,
                 echo=print) -> dict:
  """Writes the subset; returns {"images", "classes", "train", "test"}."""
  src = _Source(os.fspath(source))
  tables = src.tables()
  missing = [t for t in _TABLES[:4] if t not in tables]
  if missing:
    raise ValueError(f"{source} lacks {', '.join(missing)}; it is not the official CUB archive.")
  wanted_classes = set(classes)
  label = {int(r[0]): int(r[1]) for r in _rows(tables["image_class_labels.txt"])}
  keep = {int(r[0]) for r in _rows(tables["images.txt"]) if label.get(int(r[0])) in wanted_classes}
  paths = {int(r[0]): r[1] for r in _rows(tables["images.txt"]) if int(r[0]) in keep}
  for rel in paths.values():
    if rel.startswith("/") or ".." in rel.split("/"):
      raise ValueError(f"images.txt lists {rel!r}, outside images/; the archive is not CUB's.")
  out = os.path.join(os.fspath(dest), "CUB_200_2011")
  if os.path.exists(os.path.join(out, "images.txt")):
    raise ValueError(f"{out} already holds a dataset; choose a new destination or remove it.")
  scales = {}
  count = 0
  by_rel = {rel: i for i, rel in paths.items()}
  for rel, data in src.images(set(paths.values())):
    target = os.path.join(out, "images", *rel.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    scales[by_rel[rel]] = _write_image(target, data, max_side)
    count += 1
    if echo and count % 500 == 0:
      echo(f"{count} / {len(paths)} images")
  if count != len(paths):
    lost = sorted(set(paths) - set(scales))
    raise ValueError(f"{source} lacks {len(lost)} listed image(s), e.g. {paths[lost[0]]}.")
  _write_tables(out, tables, keep, wanted_classes, scales)
  split = {int(r[0]): r[1] for r in _rows(tables["train_test_split.txt"])}
  train = sum(split[i] == "1" for i in keep)
  summary = {"images": len(keep), "classes": len(wanted_classes), "train": train,
             "test": len(keep) - train}
  if echo:
    echo(f"wrote {out}: {summary['images']} images of {summary['classes']} classes "
         f"({train} train / {len(keep) - train} test)")
  return summary


def _write_image(target: str, data: bytes, max_side: int | None) -> float:
  """Writes one image (shrunk to max_side when larger); returns the scale applied."""
  if not max_side:
    with open(target, "wb") as f:
      f.write(data)
    return 1.0
  Image = _extras.need("PIL.Image", "python -m fgir_jax.data.subset --max-side")
  with Image.open(io.BytesIO(data)) as img:
    scale = min(1.0, max_side / max(img.size))
    if scale == 1.0:
      with open(target, "wb") as f:
        f.write(data)
      return scale
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(target, quality=95)
  return scale


def _write_tables(out: str, tables: dict, keep: set, classes: set, scales: dict) -> None:
  def kept(name, column=0, ids=keep):
    return [r for r in _rows(tables[name]) if int(r[column]) in ids]

  lines = {
      "images.txt": [" ".join(r) for r in kept("images.txt")],
      "image_class_labels.txt": [" ".join(r) for r in kept("image_class_labels.txt")],
      "train_test_split.txt": [" ".join(r) for r in kept("train_test_split.txt")],
      "bounding_boxes.txt": [f"{r[0]} " + " ".join(f"{float(v) * scales[int(r[0])]:.1f}"
                                                   for v in r[1:5])
                             for r in kept("bounding_boxes.txt")],
  }
  if "classes.txt" in tables:
    lines["classes.txt"] = [" ".join(r) for r in kept("classes.txt", ids=classes)]
  for name, rows in lines.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      f.write("\n".join(rows) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m fgir_jax.data.subset",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("source", help="CUB_200_2011.tgz, or the folder it unpacks to")
  p.add_argument("dest", help="output folder (DEST/CUB_200_2011/ is written)")
  p.add_argument("--classes", default="1-50", help="class ids and ranges, e.g. 1-50 or 1-10,60")
  p.add_argument("--max-side", type=int, default=0,
                 help="shrink images whose longer side is above this many pixels (0: keep)")
  args = p.parse_args(argv)
  try:
    write_subset(args.source, args.dest, parse_classes(args.classes), args.max_side or None)
  except (OSError, ValueError, ImportError, tarfile.TarError) as e:
    print(f"subset: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
