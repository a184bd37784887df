"""What `--mode serve` answers, without the web framework: a trained run held in memory.

`SearchService` loads the networks and the saved indexes of a work directory
once (read-only: nothing is written into it) and answers searches for image
bytes, database images by index id, random test-split queries and the run's
report. Bad input raises `RequestError` with an HTTP status and one sentence;
`fgir_jax.commands.serve` turns these methods into routes.

Searches that arrive together are encoded together: a batcher thread collects
the requests of a few milliseconds (up to a batch) and runs the networks once
for all of them, on batches of the fixed size `encoder.QUERY_BATCH`, so every
answer equals the same search made alone, whatever arrives concurrently.
Uploads are decoded by the requests' own threads, outside the batcher, after
their pixel count is checked against `max_megapixels` from the image header;
database images, test queries and health never wait for a search.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import queue
import random
import threading
import time

import numpy as np
from fgir_jax import _extras

Image = _extras.need("PIL.Image", "fgir_jax.commands.service")

from fgir_jax.commands import search as search_lib
from fgir_jax.data import cache as cache_lib
from fgir_jax.train import encoder as encoder_lib

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_MEGAPIXELS = 40.0
_THUMBNAILS = 512  # encoded database images kept in memory
# How long the batcher waits for more searches after the first, and the most per batch.
_BATCH_WINDOW_S = 0.003
_MAX_BATCH = 4 * encoder_lib.QUERY_BATCH


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

  def __init__(self, config, workdir: str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    if not max_upload_mb > 0:
      raise ValueError(f"--max_upload_mb must be positive, got {max_upload_mb}.")
    if not max_megapixels > 0:
      raise ValueError(f"--max_megapixels must be positive, got {max_megapixels}.")
    self.searcher = search_lib.Searcher(config, workdir)
    self.max_upload_bytes = int(max_upload_mb * 2**20)
    self.max_pixels = int(max_megapixels * 1e6)
    self._images_lock = threading.Lock()  # the thumbnail cache and the test split's lazy load
    self._thumbnails = collections.OrderedDict()
    self._test_split = None
    self._batcher = _Batcher(self._encode_batch)
    self.largest_batch = 0  # the most searches one forward pass served (for tests, benchmarks)

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
    request = self.prepare(data, k, bits)
    return self.answer(request, self.submit(request).result())

  def prepare(self, data: bytes, k=10, bits=None) -> "Query":
    """A checked, decoded search request (in the caller's thread; refusals raise RequestError)."""
    bits = self._check_bits(bits)
    k = _check_int(k, "k", 1, len(self.searcher.index_for(bits)))
    self._check_upload(data)
    return Query(data, self._decode(data), k, bits)

  def submit(self, request: "Query") -> concurrent.futures.Future:
    """Queues a prepared search; the future gives its (distances, items, box)."""
    return self._batcher.submit(request)

  def answer(self, request: "Query", found) -> dict:
    distances, items, box = found
    index = self.searcher.index_for(request.bits)
    results = []
    for rank, (distance, item) in enumerate(zip(distances, items), 1):
      label = int(index.labels[item])
      results.append({"rank": rank, "distance": int(distance), "id": int(item), "label": label,
                      "class_name": self.searcher.class_name(label),
                      "image_url": f"/api/images/{int(item)}?bits={request.bits}"})
    box = None if box is None else [round(float(v), 4) for v in box]
    return {"bits": request.bits, "box": box, "results": results}

  def _encode_batch(self, requests: list) -> list:
    """The batcher's work: each code length's requests encoded and searched together."""
    self.largest_batch = max(self.largest_batch, len(requests))
    out = [None] * len(requests)
    for bits in sorted({r.bits for r in requests}):
      rows = [i for i, r in enumerate(requests) if r.bits == bits]
      group = [requests[i] for i in rows]
      codes, boxes = self.searcher.encoder.encode(
          [r.data for r in group], np.stack([r.image for r in group]), bits,
          decode_map=self._batcher.pool.map)
      index = self.searcher.index_for(bits)
      # Searched at a power of two >= 16 and cut to each k: the exact, stable top-k lists
      # share their prefixes, and the page's k choices then compile one search kernel.
      top = min(len(index), max(16, 1 << (max(r.k for r in group) - 1).bit_length()))
      # In chunks of the encoder's batch too: one compiled search per k after warm-up.
      found = encoder_lib.chunked(lambda c: dict(zip(("d", "i"), index.search(c, k=top))), codes)
      distances, items = found["d"], found["i"]
      for j, (i, r) in enumerate(zip(rows, group)):
        out[i] = (distances[j, :r.k], items[j, :r.k], None if boxes is None else boxes[j])
    return out

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
    """The upload at the run's input size; its pixel count is checked from the header first."""
    try:
      with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      if self.max_pixels < Image.MAX_IMAGE_PIXELS:  # over Pillow's limit, so over ours too
        raise RequestError(413, f"the image has over {Image.MAX_IMAGE_PIXELS / 1e6:.0f} million "
                                f"pixels, over the {self.max_pixels / 1e6:g}-megapixel limit "
                                "(--max_megapixels).") from None
      raise self._unreadable(e) from None
    except (OSError, ValueError, SyntaxError) as e:
      raise self._unreadable(e) from None
    if width * height > self.max_pixels:
      raise RequestError(413, f"the image is {width} x {height} pixels, over the "
                              f"{self.max_pixels / 1e6:g}-megapixel limit (--max_megapixels).")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
      # Pillow only warns here (and a warning shown once is not shown again): refused all the same.
      raise self._unreadable(Image.DecompressionBombWarning())
    try:
      return cache_lib.load_image(io.BytesIO(data), self.searcher.run.size)
    except (ValueError, Image.DecompressionBombWarning) as e:
      raise self._unreadable(e.__cause__ or e) from None

  @staticmethod
  def _unreadable(cause) -> "RequestError":
    return RequestError(400, f"the upload is not an image this server can read "
                             f"({type(cause).__name__}); send a JPEG, PNG, BMP, GIF, WebP or "
                             "TIFF file.")

  # ---- images ------------------------------------------------------------------------
  def database_image(self, item, bits=None) -> bytes:
    """JPEG bytes of database item `item` (an index id; no client path reaches the disk)."""
    bits = self._check_bits(bits)
    index = self.searcher.index_for(bits)
    item = _check_int(item, "image id", 0, len(index) - 1, status=404)
    key = (bits, item)
    with self._images_lock:  # the thumbnail cache; never held by a search
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
    with self._images_lock:
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


@dataclasses.dataclass
class Query:
  """A search request, checked and decoded: file bytes, the image at the run's size, k, bits."""
  data: bytes
  image: np.ndarray
  k: int
  bits: int


class _Batcher:
  """A thread that serves queued requests in batches: the first request waits up to
  _BATCH_WINDOW_S for others, then up to _MAX_BATCH of them go through `work` at once."""

  def __init__(self, work):
    self._work = work
    self._queue = queue.Queue()
    self.pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2,
                                                      thread_name_prefix="fgir-decode")
    threading.Thread(target=self._loop, daemon=True, name="fgir-batcher").start()

  def submit(self, request) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    self._queue.put((request, future))
    return future

  def _loop(self) -> None:
    while True:
      batch = [self._queue.get()]
      deadline = time.monotonic() + _BATCH_WINDOW_S
      while len(batch) < _MAX_BATCH:
        try:
          batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
          break
      try:
        results = self._work([request for request, _ in batch])
      except BaseException as e:  # noqa: BLE001 - handed to every waiting request
        for _, future in batch:
          future.set_exception(e)
        continue
      for (_, future), result in zip(batch, results):
        future.set_result(result)


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
