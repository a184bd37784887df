"""Images -> codes exactly as the run's database went through training.

The saliency box comes from the uncropped image, the crop is cut from the
source itself (file or bytes) as the decode cache cuts it, the frozen stage-1
network gives the pooled features and a code length's hash layer the code.
Search and serve encode their queries with it, and evaluation the images that
`--mode index` added, so that they follow the run's networks.

The networks always run on batches of exactly `QUERY_BATCH` images (a lone
query is padded): XLA computes a batch of another size with other rounding, so
this is what makes a query's code and box the same whether it is searched
alone, with others in one command, or batched with concurrent requests by the
server; and one shape means one compile, at the first query.
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

QUERY_BATCH = 4


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
    out = _run(net, variables, images, with_maps=True, map_layer=sal.layer)
    # One map at a time: the upsampling, too, rounds by the shape it is compiled for.
    return np.concatenate([np.asarray(saliency.boxes_from_maps(
        m[None], alpha=sal.alpha, mode=sal.mode, image_size=(self.size, self.size),
        margin=sal.margin)) for m in out["maps"]])

  def encode(self, sources: list, images: np.ndarray, bits: int, decode_map=map):
    """(codes (n, bits) uint8 {0,1}, boxes (n, 4) or None) of the uncropped `images` of
    `sources` (image paths or file bytes). `decode_map` runs the crops' decodes (e.g. a
    thread pool's map)."""
    boxes = self.boxes(images)
    if boxes is not None:
      images = np.stack(list(decode_map(
          lambda pair: cache_lib.load_image(_openable(pair[0]), self.size, pair[1]),
          zip(sources, boxes))))
    return self.encode_crops(images, bits), boxes

  def encode_crops(self, images: np.ndarray, bits: int) -> np.ndarray:
    """Codes of images that are already cropped (or of a run that does not crop)."""
    net, variables = self.stage1_network()
    pooled = _run(net, variables, images)["pooled"]
    params = self.hash_layer(bits)
    hashed = chunked(lambda x: np.asarray(hash_layer.hash_outputs(params, jnp.asarray(x))),
                     pooled)
    return np.asarray(hashed > 0, np.uint8)


def chunked(fn, rows: np.ndarray):
  """fn on chunks of exactly QUERY_BATCH rows (the last one zero padded), results joined.

  fn returns an array or a dict of arrays, with the chunk's rows first.
  """
  outs = []
  for start in range(0, len(rows), QUERY_BATCH):
    chunk = rows[start:start + QUERY_BATCH]
    padded = np.zeros((QUERY_BATCH,) + chunk.shape[1:], chunk.dtype)
    padded[:len(chunk)] = chunk
    out = fn(padded)
    outs.append({k: v[:len(chunk)] for k, v in out.items()} if isinstance(out, dict)
                else out[:len(chunk)])
  if isinstance(outs[0], dict):
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  return np.concatenate(outs)


def _run(net, variables, images: np.ndarray, **kwargs) -> dict:
  """`inference.run_network` on chunks of exactly QUERY_BATCH images."""
  return chunked(lambda batch: inference.run_network(
      net, variables, batching.DeviceInput(batch, np.zeros(QUERY_BATCH, np.int32)),
      batch_size=QUERY_BATCH, **kwargs), images)


def _openable(source):
  """What PIL opens: a path as it is, file bytes as a fresh in-memory file."""
  return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
