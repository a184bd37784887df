"""Images -> codes exactly as the run's database went through training.

The saliency box comes from the uncropped image, the crop is cut from the
source itself (file or bytes) as the decode cache cuts it, the frozen stage-1
network gives the pooled features and a code length's hash layer the code.
Search and serve encode their queries with it, and evaluation the images that
`--mode index` added, so that they follow the run's networks.
"""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np

from fgir_jax import saliency
from fgir_jax.data import batching
from fgir_jax.data import cache as cache_lib
from fgir_jax.train import finished as finished_lib
from fgir_jax.train import hash_layer
from fgir_jax.train import inference


class Encoder:
  """The trained networks of a run (`run`: a context.Run), loaded on first use."""

  def __init__(self, run, num_classes: int):
    self.run = run
    self.finished = finished_lib.Finished(run)
    self.num_classes = num_classes
    self._stage1 = None
    self._saliency = None
    self._hash = {}

  @property
  def size(self) -> int:
    return int(self.run.config.data.image_size)

  def stage1_network(self):
    if self._stage1 is None:
      self._stage1 = self.finished.stage1_network(self.num_classes)
    return self._stage1

  def hash_layer(self, bits: int) -> dict:
    if bits not in self._hash:
      self._hash[bits] = {k: jnp.asarray(v) for k, v in self.finished.hash_layer(bits).items()}
    return self._hash[bits]

  def load_files(self, paths: list[str]) -> np.ndarray:
    """The uncropped images of `paths`, decoded and resized as the cache does."""
    return np.stack([cache_lib.load_image(p, self.size) for p in paths])

  def boxes(self, images: np.ndarray) -> np.ndarray | None:
    """Saliency boxes of uncropped images, as in training; None when the run does not crop."""
    sal = self.run.config.saliency
    if not sal.enabled:
      return None
    if self._saliency is None:
      self._saliency = self.finished.saliency_network(self.num_classes)
    net, variables = self._saliency
    out = inference.run_network(net, variables, _inputs(images),
                                batch_size=self._batch_size(len(images)), with_maps=True,
                                map_layer=sal.layer)
    return np.asarray(saliency.boxes_from_maps(out["maps"], alpha=sal.alpha, mode=sal.mode,
                                               image_size=(self.size, self.size),
                                               margin=sal.margin))

  def encode(self, sources: list, images: np.ndarray, bits: int):
    """(codes (n, bits) uint8 {0,1}, boxes (n, 4) or None) of the uncropped `images` of
    `sources` (image paths or file bytes)."""
    boxes = self.boxes(images)
    if boxes is not None:
      images = np.stack([cache_lib.load_image(_openable(s), self.size, box)
                         for s, box in zip(sources, boxes)])
    return self.encode_crops(images, bits), boxes

  def encode_crops(self, images: np.ndarray, bits: int) -> np.ndarray:
    """Codes of images that are already cropped (or of a run that does not crop)."""
    net, variables = self.stage1_network()
    out = inference.run_network(net, variables, _inputs(images),
                                batch_size=self._batch_size(len(images)))
    hashed = hash_layer.hash_outputs(self.hash_layer(bits), jnp.asarray(out["pooled"]))
    return np.asarray(hashed > 0, np.uint8)

  def _batch_size(self, n: int) -> int:
    """A power of two >= n, at most eval.batch_size: one query runs as a batch of one (not
    padded to a full evaluation batch), and the few sizes compile once each."""
    return min(self.run.config.eval.batch_size, 1 << max(0, n - 1).bit_length())


def _inputs(images: np.ndarray) -> batching.DeviceInput:
  return batching.DeviceInput(images, np.zeros(len(images), np.int32))


def _openable(source):
  """What PIL opens: a path as it is, file bytes as a fresh in-memory file."""
  return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
