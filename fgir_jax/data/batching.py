"""Device input: batches of augmented images from uint8 arrays kept on the device.

`DeviceInput` holds a dataset of uint8 images `(N, h, w, 3)` and int labels.

Memory policy. The whole uint8 array is put on the device with
`jax.device_put` when its size is at most `device_bytes` (default: half of the
device's memory where the backend reports it, e.g. GPUs; unlimited on CPU,
where "device" memory is host memory anyway). A batch is then one jitted call
`(images, labels, indices, key) -> batch` that gathers the rows and augments
them on the device: the host only sends the batch's indices. When the array is
larger than the budget it stays in host memory (NumPy); the host gathers the
batch's rows with one fancy-indexing copy, transfers that uint8 batch, and the
same jitted transform runs on it. Both policies give the same batches.

Sampling is deterministic by a `jax.random.key`: the order of an epoch and the
augmentation keys come from `fold_in(key, epoch)`, and the key of step `s`
from `fold_in(.., s)`, so any epoch or step can be re-made on its own. Three
samplers:

- `train_batches`: a shuffled pass; `drop_remainder=True` drops the last
  partial batch, False pads it (with `mask` False on the padding).
- `pk_batches`: class-balanced P x K batches for triplet training: P distinct
  classes, K images of each (drawn with replacement when a class has fewer
  than K images).
- `eval_batches`: every example exactly once, in order; the last batch is
  padded and `mask` marks the real rows.

Each batch is a dict: `image` (B, H, W, 3) float32 normalised, `label` (B,)
int32, `mask` (B,) bool, `index` (B,) int32 (the rows of the dataset).
Batches are dispatched `prefetch` steps ahead; JAX's asynchronous dispatch
then overlaps the input with the consumer's own step.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import _validate
from fgir_jax.data import augment

# A batch: {"image", "label", "mask", "index"} (see the module docstring).
Batch = dict


# ---------------------------------------------------------------------------
# Index samplers (pure; small integer arrays).

def _check_batch_size(batch_size) -> int:
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  return int(batch_size)


def epoch_order(key, n: int, epoch: int) -> np.ndarray:
  """The shuffled order of `n` examples for `epoch`: (n,) int32, a permutation."""
  return np.asarray(jax.random.permutation(_epoch_keys(key, epoch)[0], n), np.int32)


def _epoch_keys(key, epoch: int):
  """(order key, augmentation key) of an epoch; never the same key twice."""
  return jax.random.split(jax.random.fold_in(key, epoch))


def shuffled_indices(key, n: int, batch_size: int, epoch: int = 0,
                     drop_remainder: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """One shuffled epoch as (indices (steps, B) int32, mask (steps, B) bool).

  With `drop_remainder` the last partial batch is left out (a different
  subset each epoch); otherwise it is padded with repeats from the start of
  the order and `mask` is False there.
  """
  batch_size = _check_batch_size(batch_size)
  order = epoch_order(key, n, epoch)
  if drop_remainder:
    steps = n // batch_size
    if steps == 0:
      raise ValueError(
          f"batch_size={batch_size} is larger than the {n} examples; lower it or pass drop_remainder=False.")
    idx = order[: steps * batch_size].reshape(steps, batch_size)
    return idx, np.ones_like(idx, bool)
  return _pad_to_batches(order, batch_size)


def sequential_indices(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """0..n-1 in order as (indices (steps, B), mask (steps, B)); the last batch padded."""
  return _pad_to_batches(np.arange(n, dtype=np.int32), _check_batch_size(batch_size))


def _pad_to_batches(order: np.ndarray, batch_size: int):
  n = len(order)
  if n == 0:
    raise ValueError("The dataset is empty; there is nothing to batch.")
  steps = -(-n // batch_size)
  pos = np.arange(steps * batch_size)
  # Padding repeats real rows (valid indices) so the gather needs no special case.
  return (order[pos % n].reshape(steps, batch_size).astype(np.int32),
          (pos < n).reshape(steps, batch_size))


def class_table(labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rows of each class: (classes (C,), members (C, max_count) int32, counts (C,)).

  `members[c, :counts[c]]` are the dataset rows of class `classes[c]`; the
  rest of the row is padding (-1).
  """
  labels = np.asarray(labels)
  classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  members = np.full((len(classes), counts.max()), -1, np.int32)
  order = np.argsort(inverse, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  col = np.arange(len(labels)) - np.repeat(starts, counts)
  members[inverse[order], col] = order
  return classes, members, counts.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("p", "k", "num_batches"))
def _pk_sample(key, members, counts, *, p: int, k: int, num_batches: int):
  num_classes, max_count = members.shape
  k_cls, k_perm, k_repl = jax.random.split(key, 3)
  # P distinct classes per batch: the P smallest of C uniform draws.
  u = jax.random.uniform(k_cls, (num_batches, num_classes))
  cls = jnp.argsort(u, axis=1)[:, :p]  # (b, p)
  cnt = counts[cls]  # (b, p)
  # K distinct members where the class has at least K: the K smallest uniform
  # draws among its real members (padding gets +inf so it is never chosen).
  v = jax.random.uniform(k_perm, (num_batches, p, max_count))
  v = jnp.where(jnp.arange(max_count) < cnt[..., None], v, jnp.inf)
  without = jnp.argsort(v, axis=-1)[..., :k]
  # Fewer than K members: K draws with replacement.
  with_ = jax.random.randint(k_repl, (num_batches, p, k), 0, cnt[..., None])
  pos = jnp.where((cnt >= k)[..., None], without, with_)
  return members[cls[..., None], pos].reshape(num_batches, p * k)


def pk_indices(key, labels, p: int, k: int, epoch: int = 0,
               num_batches: int | None = None) -> np.ndarray:
  """Class-balanced batches: (num_batches, p * k) int32 dataset rows.

  Each batch holds `p` distinct classes (chosen uniformly) and `k` rows of
  each, consecutive in the batch; rows are distinct within a class unless the
  class has fewer than `k` rows, then they are drawn with replacement.
  `num_batches` defaults to len(labels) // (p * k) (about one epoch).
  """
  p, k = int(p), int(k)
  if p < 1 or k < 1:
    raise ValueError(f"p and k must be positive, got p={p}, k={k}.")
  _validate.check_labels(labels, len(labels))
  classes, members, counts = class_table(labels)
  if p > len(classes):
    raise ValueError(f"p={p} classes per batch but the labels hold only {len(classes)} classes; lower p.")
  if num_batches is None:
    num_batches = max(1, len(labels) // (p * k))
  return np.asarray(_pk_sample(_epoch_keys(key, epoch)[0], jnp.asarray(members),
                               jnp.asarray(counts), p=p, k=k, num_batches=int(num_batches)))


# ---------------------------------------------------------------------------
# Placement.

def default_device_bytes(device=None) -> int | None:
  """Half of the device's memory where the backend reports it, else None (no limit)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory stats (CPU)
    stats = {}
  limit = stats.get("bytes_limit")
  return None if limit is None else limit // 2


def fits_on_device(nbytes: int, device_bytes: int | None) -> bool:
  return device_bytes is None or nbytes <= device_bytes


# ---------------------------------------------------------------------------
# The input pipeline.

_BATCH_FNS = {}  # (train, transform) -> the jitted batch functions, shared by every DeviceInput


def _batch_fns(transform: Callable, train: bool):
  """(gather, local): the jitted batch functions of a transform, made once per process.

  A DeviceInput per request (a search service's queries) then reuses the
  compiled programs instead of compiling new ones. Transforms built by
  `augment.transform_fn` with equal settings count as the same transform.
  """
  key = (train, _transform_key(transform))
  if key not in _BATCH_FNS:
    if train:
      fn = lambda batch_u8, k: transform(k, batch_u8)  # noqa: E731
    else:
      fn = lambda batch_u8, k: transform(batch_u8)  # noqa: E731  (deterministic: k unused)
    # Device-resident: one jitted call from indices to the augmented batch.
    gather = jax.jit(lambda images, labels, idx, k: (fn(images[idx], k), labels[idx]))
    # Host memory: the same transform on a batch the host gathered.
    _BATCH_FNS[key] = (gather, jax.jit(fn))
  return _BATCH_FNS[key]


def _transform_key(transform):
  """A hashable identity of a transform: a partial's function and arguments, else the object."""
  if isinstance(transform, functools.partial):
    try:
      key = (transform.func, transform.args, tuple(sorted(transform.keywords.items())))
      hash(key)
      return key
    except TypeError:
      pass
  return transform


class DeviceInput:
  """uint8 images + labels, batched and augmented on the device.

  Args:
    images: (N, h, w, c) uint8 (NumPy or jax).
    labels: (N,) integer class ids.
    train_transform: fn(key, uint8 batch) -> float batch; default
      `augment.train_transform` with random resized crop to the input size
      and flips. Build one with `augment.transform_fn(True, size=224, ...)`.
    eval_transform: fn(uint8 batch) -> float batch; default identity +
      ImageNet normalisation.
    device_bytes: byte budget for keeping the images on the device; "auto"
      (default) is `default_device_bytes()`, None means no limit, 0 forces
      host memory.
    prefetch: batches dispatched ahead of the consumer (>= 1).
  """

  def __init__(self, images, labels, *, train_transform: Callable | None = None,
               eval_transform: Callable | None = None, device_bytes="auto",
               prefetch: int = 2):
    shape = _validate.check_ndim(images, 4, "images", "a 4-d uint8 array (N, h, w, channels)")
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype != np.uint8:
      raise ValueError(f"images must be uint8 (0..255), got dtype {dtype}; convert once on the host.")
    _validate.check_labels(labels, shape[0], "labels", "images")
    if int(prefetch) < 1:
      raise ValueError(f"prefetch must be at least 1, got {prefetch}.")
    self.num_examples = shape[0]
    self.prefetch = int(prefetch)
    if device_bytes == "auto":
      device_bytes = default_device_bytes()
    self.on_device = fits_on_device(int(np.prod(shape)), device_bytes)
    self.images = jax.device_put(images) if self.on_device else np.asarray(images)
    self.labels_np = np.asarray(labels).astype(np.int32)
    self.labels = jax.device_put(self.labels_np)
    self._fns = {"train": _batch_fns(train_transform or augment.train_transform, True),
                 "eval": _batch_fns(eval_transform or augment.eval_transform, False)}

  def batch(self, indices, key=None, *, train: bool = True, mask=None) -> Batch:
    """One batch for the dataset rows `indices` (B,); `key` drives the augmentation.

    `train=False` applies the eval transform (no key needed). `mask` (B,) bool
    defaults to all True.
    """
    idx = np.asarray(indices, np.int32)
    if key is None:
      if train:
        raise ValueError("A training batch needs a PRNG key for its augmentation.")
      key = jax.random.key(0)  # ignored by the eval transform
    gather, local = self._fns["train" if train else "eval"]
    if self.on_device:
      image, label = gather(self.images, self.labels, idx, key)
    else:
      # One C-level fancy-indexing copy on the host, then one transfer.
      image = local(jax.device_put(self.images[idx]), key)
      label = jax.device_put(self.labels_np[idx])
    mask = np.ones(idx.shape, bool) if mask is None else np.asarray(mask, bool)
    return {"image": image, "label": label, "mask": jax.device_put(mask),
            "index": jax.device_put(idx)}

  def _run(self, idx: np.ndarray, mask: np.ndarray, aug_key, train: bool) -> Iterator[Batch]:
    queue = collections.deque()
    for step in range(len(idx)):
      key = jax.random.fold_in(aug_key, step) if train else None
      queue.append(self.batch(idx[step], key, train=train, mask=mask[step]))
      if len(queue) > self.prefetch:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  def steps_per_epoch(self, batch_size: int, drop_remainder: bool = True) -> int:
    n, b = self.num_examples, _check_batch_size(batch_size)
    return n // b if drop_remainder else -(-n // b)

  def train_batches(self, key, epoch: int, batch_size: int, *,
                    drop_remainder: bool = True) -> Iterator[Batch]:
    """One shuffled epoch of augmented batches (see the module docstring)."""
    idx, mask = shuffled_indices(key, self.num_examples, batch_size, epoch, drop_remainder)
    return self._run(idx, mask, _epoch_keys(key, epoch)[1], train=True)

  def pk_batches(self, key, epoch: int, p: int, k: int, *,
                 num_batches: int | None = None) -> Iterator[Batch]:
    """Class-balanced P x K augmented batches (batch size p * k); see `pk_indices`."""
    idx = pk_indices(key, self.labels_np, p, k, epoch, num_batches)
    return self._run(idx, np.ones_like(idx, bool), _epoch_keys(key, epoch)[1], train=True)

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """Every example exactly once, in order, with the eval transform; the last batch padded."""
    idx, mask = sequential_indices(self.num_examples, batch_size)
    return self._run(idx, mask, None, train=False)
