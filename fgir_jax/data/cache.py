"""Decode cache: images (or crops of them) decoded once, stored as uint8 arrays.

`cached_images(source, size, cache_dir)` decodes every image of a source,
converts it to RGB, resizes it to `size` x `size` and keeps the result as one
memory-mappable `(n, size, size, 3)` uint8 `.npy` file in `cache_dir`, with a
small JSON beside it. The next call with the same files loads the `.npy`
(memory-mapped, nothing decoded). `cached_crops(source, boxes, size,
cache_dir)` does the same for crops of the original files to normalised boxes
(the saliency step's "crops cached").

Decisions:
- Square resize (aspect ratio not kept), as the paper resizes to 299 x 299;
  PIL bilinear, which widens its filter when shrinking (antialiased).
- RGB conversion: greyscale, CMYK (PIL's plain conversion) and palette images
  are converted; images with alpha (RGBA, LA, PA, or a transparency key) are
  composited on white, because transparent pixels often hold black or junk
  that would otherwise show. EXIF orientation is ignored, as boxes refer to
  the stored pixel grid (CUB and tfds ignore it too).
- Crops: the box is converted to pixels with each image's own size, the whole
  pixels it touches are cut out, and the fractional box is resized from
  those, so the resampling filter never reaches outside the box.
- JPEG draft mode: the decoder is asked for the smallest DCT scale (1/2, 1/4,
  1/8) that still leaves at least `size` pixels across the image (or across
  the box when cropping), which makes large photos several times faster.
- Validity: the file name holds a hash of (paths, size, boxes, settings), so
  another file list, size or set of boxes is another entry; the JSON holds a
  fingerprint of every file's size and modification time, and a changed file
  rebuilds its entry. Writes go to a temporary file that is renamed into
  place, and the JSON (written last) is removed before the `.npy` is
  replaced, so an interrupted run never leaves an entry that looks valid but
  is not. Old entries stay until the cache folder is deleted.
- Parallel decoding: a thread pool by default. PIL releases the GIL while it
  decodes and resizes, so threads scale like processes (CUB-format JPEGs at
  299 px, 2 cores: 1 thread ~410 images/s, 2 threads ~870, 2 processes ~770
  when the second core was free; 400-530 for either when other jobs held it)
  without process start-up, pickling or the `if __name__ == "__main__":`
  guard that worker processes need. `executor="process"` uses forkserver processes that
  write straight into the memory-mapped output; bench/bench_decode.py
  compares the two.
- In-memory sources (`Dataset.images`, e.g. the synthetic set) are resized or
  cropped in memory and not written to disk: they are cheap to remake.
"""

from __future__ import annotations

import concurrent.futures as futures
from concurrent.futures.process import BrokenProcessPool
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import uuid
from typing import Sequence

import numpy as np

from fgir_jax import _extras
from fgir_jax.data.dataset import Dataset
from fgir_jax.progress import Progress

Image = _extras.need("PIL.Image", "fgir_jax.data's decode cache")

CACHE_VERSION = 1
_RESAMPLE = Image.Resampling.BILINEAR
_CHUNK = 16  # images per task: amortises scheduling without hurting the progress bar
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


@dataclasses.dataclass(frozen=True, eq=False)
class Cached:
  """The result of `cached_images` / `cached_crops`.

  Attributes:
    images: (m, size, size, 3) uint8 RGB; a read-only memory map when it
      comes from the disk cache.
    kept: (m,) int64 row indices into the source; all rows unless
      `skip_bad=True` dropped undecodable files.
    bad: paths of the files that were skipped (empty unless skip_bad=True).
    path: the `.npy` file, or None for an in-memory source.
    hit: True when the images were loaded from an earlier run's cache.
  """
  images: np.ndarray
  kept: np.ndarray
  bad: tuple[str, ...] = ()
  path: str | None = None
  hit: bool = False


class UndecodableImage(ValueError):
  """An image file that cannot be decoded; `path` names it, `reason` says why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot decode image {path} ({reason}); replace or delete the file, or "
                     "pass skip_bad=True to skip undecodable images.")
    self.path, self.reason = path, reason


def to_rgb(img: Image.Image) -> Image.Image:
  """A PIL image converted to 8-bit RGB; alpha is composited on white."""
  if img.mode == "RGB" and "transparency" not in img.info:
    return img
  if img.mode.startswith("I") or img.mode == "F":
    # 16/32-bit and float greyscale: PIL's own conversion clips at 255, so scale.
    values = np.asarray(img, np.float64)
    if img.mode.startswith("I;16") or values.max(initial=0) > 255:
      values = values / 257.0
    img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def load_image(path: str, size: int, box=None, draft: bool = True) -> np.ndarray:
  """One image file decoded, converted to RGB and resized to (size, size, 3) uint8.

  Args:
    path: an image file PIL can read.
    size: output side in pixels.
    box: optional (ymin, xmin, ymax, xmax) normalised box to crop first;
      converted to pixels with the image's own size.
    draft: let the JPEG decoder downscale by 2, 4 or 8 where the result still
      has at least `size` pixels across the (cropped) image.

  Raises:
    ValueError: the file cannot be decoded; the message names it.
  """
  try:
    with Image.open(path) as img:
      return _resize(img, size, box, draft)
  except _DECODE_ERRORS as e:
    raise UndecodableImage(path, f"{type(e).__name__}: {e}") from e


def resize_array(image: np.ndarray, size: int, box=None) -> np.ndarray:
  """An (h, w, 3) uint8 array resized (and optionally cropped) like `load_image`."""
  return _resize(Image.fromarray(np.asarray(image, np.uint8)), size, box, draft=False)


def _resize(img: Image.Image, size: int, box, draft: bool) -> np.ndarray:
  if draft and img.format == "JPEG":
    frac_h = 1.0 if box is None else max(float(box[2]) - float(box[0]), 1e-3)
    frac_w = 1.0 if box is None else max(float(box[3]) - float(box[1]), 1e-3)
    # draft() keeps both sides >= the request, so the crop keeps >= size pixels.
    img.draft("RGB", (math.ceil(size / frac_w), math.ceil(size / frac_h)))
  img = to_rgb(img)
  pixel_box = None
  if box is not None:
    left, top, right, bottom = _pixel_box(box, *img.size)
    # Cut out the whole pixels the box touches first: the resampling filter then
    # never reaches beyond the box, while the fractional box keeps sub-pixel placement.
    outer = (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))
    img = img.crop(outer)
    pixel_box = (left - outer[0], top - outer[1], right - outer[0], bottom - outer[1])
  out = img.resize((size, size), _RESAMPLE, box=pixel_box)
  return np.asarray(out, np.uint8)


def _pixel_box(box, width: int, height: int) -> tuple[float, float, float, float]:
  """Normalised (ymin, xmin, ymax, xmax) -> PIL (left, top, right, bottom), >= 1 pixel."""
  ymin, xmin, ymax, xmax = (float(np.clip(v, 0.0, 1.0)) for v in box)
  left, right = _span(xmin * width, xmax * width, width)
  top, bottom = _span(ymin * height, ymax * height, height)
  return left, top, right, bottom


def _span(lo: float, hi: float, extent: int) -> tuple[float, float]:
  lo, hi = min(lo, hi), max(lo, hi)
  if hi - lo < 1.0:  # a degenerate box: one pixel around its centre
    centre = min(max((lo + hi) / 2, 0.5), extent - 0.5)
    lo, hi = centre - 0.5, centre + 0.5
  return lo, hi


# --------------------------------------------------------------------------
# The cache.


def cached_images(source, size: int, cache_dir: str | None, *, skip_bad: bool = False,
                  workers: int | None = None, executor: str = "thread",
                  progress: bool = True, draft: bool = True) -> Cached:
  """All images of a source at (size, size), decoded once and cached on disk.

  Args:
    source: a `Dataset` (file paths or in-memory images) or a list of paths.
    size: output side in pixels (e.g. 299 as in the paper, 224).
    cache_dir: folder for the cache files (created if needed), typically
      `<workdir>/cache`; None decodes into memory and writes nothing.
    skip_bad: skip files that cannot be decoded (reported in `Cached.bad`, and
      left out of `Cached.kept`) instead of raising.
    workers: decoding threads or processes; default: the usable CPU count.
    executor: "thread" (default, see the module docstring) or "process"
      (the calling script then needs an `if __name__ == "__main__":` guard).
    progress: draw a progress bar on stderr while decoding.
    draft: use JPEG draft mode (see `load_image`).

  Returns:
    A `Cached` with images (m, size, size, 3) uint8 and the kept row indices.

  Raises:
    ValueError: a file cannot be decoded (and skip_bad is False), or a bad
      argument.
  """
  job = _job(source, None, size, skip_bad, workers, executor, progress, draft)
  return _cached(source, job, cache_dir)


def cached_crops(source, boxes, size: int, cache_dir: str | None, *, skip_bad: bool = False,
                 workers: int | None = None, executor: str = "thread",
                 progress: bool = True, draft: bool = True) -> Cached:
  """Crops of the original images to boxes, resized to (size, size), cached on disk.

  Cropping the original files (not the resized cache) keeps all the detail the
  crop has. The cache key includes a hash of the boxes, so new boxes (another
  alpha, a retrained saliency network) make a new cache file.

  Args:
    source: a `Dataset` or a list of paths.
    boxes: (n, 4) normalised (ymin, xmin, ymax, xmax), one per source row,
      converted to pixels with each image's own size.
    size: as in `cached_images`.
    cache_dir: as in `cached_images`.
    skip_bad: as in `cached_images`.
    workers: as in `cached_images`.
    executor: as in `cached_images`.
    progress: as in `cached_images`.
    draft: as in `cached_images`.

  Returns:
    A `Cached` with crops (m, size, size, 3) uint8 and the kept row indices.
  """
  boxes = np.asarray(boxes, np.float32)
  n = len(source.labels) if isinstance(source, Dataset) else len(source)
  if boxes.shape != (n, 4):
    raise ValueError(f"boxes must have shape ({n}, 4), one (ymin, xmin, ymax, xmax) per image, "
                     f"got {boxes.shape}.")
  if not np.all(np.isfinite(boxes)):
    raise ValueError("boxes must be finite; check the saliency step's output.")
  job = _job(source, boxes, size, skip_bad, workers, executor, progress, draft)
  return _cached(source, job, cache_dir)


@dataclasses.dataclass(frozen=True)
class _Job:
  """What to decode and how: the settings every step of a build shares."""
  paths: list
  boxes: np.ndarray | None
  size: int
  draft: bool
  skip_bad: bool
  workers: int
  executor: str
  progress: bool
  label: str


def _job(source, boxes, size, skip_bad, workers, executor, progress, draft) -> _Job:
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size must be a positive int (pixels), got {size!r}.")
  if executor not in ("thread", "process"):
    raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}.")
  if isinstance(source, Dataset):
    name, paths = source.name, source.paths or []
  else:
    name, paths = "images", [os.fspath(p) for p in source]
  label = f"{name} {size}px{' crops' if boxes is not None else ''}"
  return _Job(paths=list(paths), boxes=boxes, size=int(size), draft=bool(draft),
              skip_bad=bool(skip_bad), workers=int(workers or _cpu_count()), executor=executor,
              progress=bool(progress), label=label)


def _cached(source, job: _Job, cache_dir) -> Cached:
  if isinstance(source, Dataset) and source.images is not None:
    return _in_memory(source.images, job.boxes, job.size)
  if cache_dir is None:
    return _decode_in_memory(job)
  name = _safe(source.name if isinstance(source, Dataset) else "images")
  kind = "crops" if job.boxes is not None else "full"
  stem = os.path.join(cache_dir, f"{name}-{job.size}px-{kind}-{_key(job)}")
  fingerprint = _fingerprint(job.paths)
  hit = _load(stem, fingerprint, job.size)
  if hit is not None:
    return hit
  created = not os.path.isdir(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  _remove_orphans(stem)
  try:
    return _build(stem, job, fingerprint)
  except BaseException:
    if created:  # a failed first decode leaves no empty cache folder behind
      try:
        os.rmdir(cache_dir)
      except OSError:
        pass
    raise


def _in_memory(images: np.ndarray, boxes, size: int) -> Cached:
  n = len(images)
  if boxes is None and images.shape[1:3] == (size, size):
    out = images
  else:
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
      out[i] = resize_array(images[i], size, None if boxes is None else boxes[i])
  return Cached(images=out, kept=np.arange(n))


def _decode_in_memory(job: _Job) -> Cached:
  """cache_dir=None: decode into memory, write nothing (worker processes use a temp file)."""
  if job.executor == "process":
    import tempfile  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp_dir:
      cached = _build(os.path.join(tmp_dir, "images"), job, "")
      return dataclasses.replace(cached, images=np.array(cached.images), path=None)
  n = len(job.paths)
  out = np.empty((n, job.size, job.size, 3), np.uint8)
  bad = sorted(_decode_all(out, None, job))
  kept = np.setdiff1d(np.arange(n), np.asarray(bad, np.int64))
  return Cached(images=out[kept] if bad else out, kept=kept, bad=tuple(job.paths[i] for i in bad))


def _key(job: _Job) -> str:
  h = hashlib.sha256()
  h.update(json.dumps({"version": CACHE_VERSION, "size": job.size, "draft": job.draft,
                       "resample": "bilinear", "paths": job.paths}).encode("utf-8"))
  if job.boxes is not None:
    h.update(np.ascontiguousarray(job.boxes, np.float32).tobytes())
  return h.hexdigest()[:16]


def _fingerprint(paths: Sequence[str]) -> str:
  """Hash of every file's size and modification time (no reading of contents)."""
  h = hashlib.sha256()
  for p in paths:
    try:
      st = os.stat(p)
      h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    except OSError:
      h.update(f"{p}\0missing\n".encode("utf-8"))
  return h.hexdigest()


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "images"


def _load(stem: str, fingerprint: str, size: int) -> Cached | None:
  """The cache at `stem` if it is complete and matches the files; else None."""
  try:
    with open(stem + ".json", encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
      return None
    kept = np.setdiff1d(np.arange(meta["count"]), np.asarray(meta["bad_indices"], np.int64))
    bad = tuple(meta["bad_paths"])
    images = np.load(stem + ".npy", mmap_mode="r")
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None  # missing, partial or foreign files: rebuild
  if images.shape != (len(kept), size, size, 3) or images.dtype != np.uint8:
    return None
  return Cached(images=images, kept=kept, bad=bad, path=stem + ".npy", hit=True)


def _remove_orphans(stem: str) -> None:
  """Deletes temporary files of this entry left by killed runs (their process is gone)."""
  folder, base = os.path.split(stem)
  for fname in os.listdir(folder):
    if not fname.startswith(base + ".npy.tmp-"):
      continue
    try:
      os.kill(int(fname.split(".tmp-")[1].split("-")[0]), 0)  # still running: leave it
    except ProcessLookupError:
      try:
        os.remove(os.path.join(folder, fname))
      except OSError:
        pass
    except (ValueError, PermissionError, IndexError):
      pass


def _build(stem: str, job: _Job, fingerprint: str) -> Cached:
  """Decodes everything into a temporary .npy, then renames it into place."""
  n, size = len(job.paths), job.size
  tmp = f"{stem}.npy.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    bad = sorted(_decode_all(out, tmp, job))
    out.flush()
    del out
    if bad:
      tmp = _compact(tmp, bad, n, size)
    if os.path.exists(stem + ".json"):
      os.remove(stem + ".json")  # invalidate first: a crash below then means "rebuild"
    os.replace(tmp, stem + ".npy")
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "count": n, "size": size,
          "crops": job.boxes is not None, "bad_indices": bad,
          "bad_paths": [job.paths[i] for i in bad], "first_path": job.paths[0] if n else None,
          "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
  _write_json(stem + ".json", meta)
  kept = np.setdiff1d(np.arange(n), np.asarray(bad, np.int64))
  return Cached(images=np.load(stem + ".npy", mmap_mode="r"), kept=kept,
                bad=tuple(meta["bad_paths"]), path=stem + ".npy", hit=False)


def _decode_all(out, tmp, job: _Job) -> dict:
  """Fills `out` (or the file `tmp`, from worker processes); returns {index: error}."""
  n, paths, boxes = len(job.paths), job.paths, job.boxes
  tasks = [(paths[i:i + _CHUNK], None if boxes is None else boxes[i:i + _CHUNK], i)
           for i in range(0, n, _CHUNK)]
  bar = Progress(n, f"decode {job.label}", enabled=job.progress)
  bad, completed = {}, False
  if job.executor == "thread":
    pool = futures.ThreadPoolExecutor(job.workers)
    submit = lambda t: pool.submit(_decode_chunk, out, *t, job.size, job.draft)
  else:
    pool = futures.ProcessPoolExecutor(job.workers, mp_context=_mp_context())
    submit = lambda t: pool.submit(_decode_chunk_to_file, tmp, *t, job.size, job.draft)
  try:
    pending = [submit(t) for t in tasks]
    for fut in futures.as_completed(pending):
      count, errors = fut.result()
      bad.update(errors)
      if errors and not job.skip_bad:
        i = min(errors)
        raise UndecodableImage(paths[i], errors[i])
      bar.update(count)
    completed = True
  except BrokenProcessPool as e:
    raise RuntimeError(
        "a decoding worker process died; with executor='process' the script that calls the "
        "cache needs an `if __name__ == '__main__':` guard (and enough memory), or use "
        "executor='thread'.") from e
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close(completed)
  if bad and job.progress:
    print(f"skipped {len(bad)} undecodable image(s), first: {paths[min(bad)]}", file=sys.stderr)
  return bad


def _decode_chunk(out, paths, boxes, start, size, draft) -> tuple[int, dict]:
  """Decodes one chunk into rows start.. of `out`; returns (count, {index: error})."""
  errors = {}
  for j, path in enumerate(paths):
    try:
      with Image.open(path) as img:
        out[start + j] = _resize(img, size, None if boxes is None else boxes[j], draft)
    except _DECODE_ERRORS as e:
      errors[start + j] = f"{type(e).__name__}: {e}"
  return len(paths), errors


def _decode_chunk_to_file(tmp, paths, boxes, start, size, draft) -> tuple[int, dict]:
  # Worker processes write into the shared memory-mapped file, so no pixels are pickled.
  out = np.load(tmp, mmap_mode="r+")
  try:
    return _decode_chunk(out, paths, boxes, start, size, draft)
  finally:
    out.flush()
    del out


def _compact(tmp: str, bad: list[int], n: int, size: int) -> str:
  """A copy of the temporary .npy without the rows of undecodable files."""
  keep = np.setdiff1d(np.arange(n), np.asarray(bad, np.int64))
  src = np.load(tmp, mmap_mode="r")
  tmp2 = tmp + "-kept"
  dst = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(keep), size, size, 3))
  for i in range(0, len(keep), 256):
    dst[i:i + 256] = src[keep[i:i + 256]]
  dst.flush()
  del dst, src
  os.remove(tmp)
  return tmp2


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def _cpu_count() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _mp_context():
  # forkserver: forking a process that already runs JAX's threads can deadlock.
  methods = multiprocessing.get_all_start_methods()
  return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
