"""What `--mode serve` answers, without the web framework: a trained run held in memory.

`SearchService` loads the networks and the saved indexes of a work directory
once (read-only: nothing is written into it) and answers searches for image
bytes, database images by index id, random test-split queries and the run's
report. Bad input raises `RequestError` with an HTTP status and one sentence;
`fgir_jax.commands.serve` turns these methods into routes.

Searches share the networks, so they run one at a time under a lock: every
answer equals the same search made alone, whatever arrives concurrently.
"""

from __future__ import annotations

import collections
import io
import os
import random
import threading

import numpy as np
from PIL import Image

from fgir_jax.commands import search as search_lib
from fgir_jax.data import cache as cache_lib

DEFAULT_MAX_UPLOAD_MB = 20.0
_THUMBNAILS = 512  # encoded database images kept in memory


class RequestError(Exception):
  """A request the service refuses: an HTTP status and a message naming the problem."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


class SearchService:
  """A trained run's search, database images, test queries and report.

  Args:
    config: the command line's config (the run's own config.json wins, as in
      `--mode search`).
    workdir: a finished run; opened read-only.
    max_upload_mb: the largest image upload accepted, in megabytes.
  """

  def __init__(self, config, workdir: str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    if not max_upload_mb > 0:
      raise ValueError(f"--max_upload_mb must be positive, got {max_upload_mb}.")
    self.searcher = search_lib.Searcher(config, workdir)
    self.max_upload_bytes = int(max_upload_mb * 2**20)
    self._lock = threading.Lock()
    self._thumbnails = collections.OrderedDict()
    self._test_split = None

  # ---- what the page and the API read --------------------------------------------
  @property
  def bits(self) -> list[int]:
    return list(self.searcher.trained_bits)

  def health(self) -> dict:
    return {"status": "ok", "bits": self.bits, "database": len(self.searcher.index)}

  # ---- search ----------------------------------------------------------------------
  def search(self, data: bytes, k=10, bits=None) -> dict:
    """The top k of an image given as file bytes, as `--mode search` finds them.

    Returns {"bits", "box" (normalised [ymin, xmin, ymax, xmax] of the
    saliency crop, or null without cropping), "results": [{"rank",
    "distance", "id", "label", "class_name", "image_url"}]}.
    """
    bits = self._check_bits(bits)
    index = self.searcher.index_for(bits)
    k = _check_int(k, "k", 1, len(index))
    self._check_upload(data)
    with self._lock:
      image = self._decode(data)
      codes, boxes = self.searcher.encode_with_boxes([data], image[None], bits)
      # Searched at a power of two >= 16 and cut to k: the exact, stable top-k lists
      # share their prefixes, and the page's k choices then compile one search kernel.
      distances, items = index.search(codes, k=min(len(index), max(16, 1 << (k - 1).bit_length())))
      distances, items = distances[:, :k], items[:, :k]
    results = []
    for rank, (distance, item) in enumerate(zip(distances[0], items[0]), 1):
      label = int(index.labels[item])
      results.append({"rank": rank, "distance": int(distance), "id": int(item), "label": label,
                      "class_name": self.searcher.class_name(label),
                      "image_url": f"/api/images/{int(item)}?bits={bits}"})
    box = None if boxes is None else [round(float(v), 4) for v in boxes[0]]
    return {"bits": bits, "box": box, "results": results}

  def _check_bits(self, bits) -> int:
    if bits in (None, ""):
      return self.searcher.bits
    try:
      value = int(bits)
    except (TypeError, ValueError):
      value = None
    if value not in self.searcher.trained_bits:
      raise RequestError(400, f"bits must be one of the trained code lengths "
                              f"{', '.join(map(str, self.bits))}, got {bits!r}.")
    return value

  def _check_upload(self, data: bytes) -> None:
    if not data:
      raise RequestError(400, "the upload is empty; send an image file in the multipart "
                              "field 'image'.")
    if len(data) > self.max_upload_bytes:
      raise RequestError(413, f"the upload is {len(data) / 2**20:.1f} MB, over the "
                              f"{self.max_upload_bytes / 2**20:g} MB limit (--max_upload_mb).")

  def _decode(self, data: bytes) -> np.ndarray:
    try:
      return cache_lib.load_image(io.BytesIO(data), self.searcher.run.size)
    except ValueError as e:
      cause = e.__cause__ or e
      raise RequestError(400, f"the upload is not an image this server can read "
                              f"({type(cause).__name__}); send a JPEG, PNG, BMP, GIF, "
                              "WebP or TIFF file.") from e

  # ---- images ------------------------------------------------------------------------
  def database_image(self, item, bits=None) -> bytes:
    """JPEG bytes of database item `item` (an index id; no client path reaches the disk)."""
    bits = self._check_bits(bits)
    index = self.searcher.index_for(bits)
    item = _check_int(item, "image id", 0, len(index) - 1, status=404)
    key = (bits, item)
    with self._lock:  # the networks' lazy loads and the thumbnail cache, one at a time
      if key not in self._thumbnails:
        self._remember(key, _jpeg(self.searcher.database_image(item, bits)))
      self._thumbnails.move_to_end(key)
      return self._thumbnails[key]

  def _remember(self, key, value) -> None:
    self._thumbnails[key] = value
    while len(self._thumbnails) > _THUMBNAILS:
      self._thumbnails.popitem(last=False)

  def random_query(self, rng: random.Random | None = None) -> dict:
    """A random test-split image: {"id", "image_url", "label", "class_name"}."""
    test = self._test()
    i = (rng or random).randrange(len(test["labels"]))
    label = int(test["labels"][i])
    return {"id": i, "image_url": f"/api/queries/{i}", "label": label,
            "class_name": self.searcher.class_name(label)}

  def query_image(self, i) -> bytes:
    """The file bytes (or a PNG) of test-split image `i`."""
    test = self._test()
    i = _check_int(i, "query id", 0, len(test["labels"]) - 1, status=404)
    if test["paths"] is not None:
      with open(test["paths"][i], "rb") as f:
        return f.read()
    buffer = io.BytesIO()
    Image.fromarray(test["images"][i]).save(buffer, format="PNG")
    return buffer.getvalue()

  def _test(self) -> dict:
    with self._lock:
      return self._load_test()

  def _load_test(self) -> dict:
    if self._test_split is None:
      try:
        ds = search_lib.data_stage.load_dataset(self.searcher.run.config)
      except (OSError, ValueError, ImportError) as e:
        raise RequestError(404, f"the run's test images cannot be loaded ({e}); upload a "
                                "query instead.") from e
      test = ~ds.is_train
      self._test_split = {
          "labels": ds.labels[test],
          "paths": None if ds.paths is None else [p for p, t in zip(ds.paths, test) if t],
          "images": None if ds.images is None else ds.images[test]}
    if not len(self._test_split["labels"]):
      raise RequestError(404, "the run has no test images; upload a query instead.")
    return self._test_split

  # ---- the report ----------------------------------------------------------------------
  def report_markdown(self) -> str:
    path = self.searcher.run.wd.file("report.md")
    if not os.path.isfile(path):
      raise RequestError(404, "the run has no report.md yet; finish training first.")
    with open(path, encoding="utf-8") as f:
      return f.read()

  def plot_file(self, name: str) -> str:
    """The path of plots/<name>, looked up among the files that folder holds."""
    folder = self.searcher.run.wd.file("plots")
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if name not in names:
      raise RequestError(404, f"the report has no plot named {name!r}.")
    return os.path.join(folder, name)


def _check_int(value, name: str, low: int, high: int, status: int = 400) -> int:
  try:
    number = int(value)
    ok = str(number) == str(value).strip() and low <= number <= high
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise RequestError(status, f"{name} must be a whole number from {low} to {high}, "
                               f"got {value!r}.")
  return number


def _jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()
