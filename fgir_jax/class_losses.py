"""Class-aware terms for a hash layer, beside the triplet losses (beyond the paper).

The triplet losses (`fgir_jax.losses`) only compare codes with each other; the
strongest deep-hashing methods since the paper also tie every code to its
class. Three such terms, each from the literature:

* `center_loss`: central similarity (Yuan et al., "Central Similarity
  Quantization for Efficient Image and Video Retrieval", CVPR 2020). Each class
  owns a fixed +-1 hash centre (`hash_centers`), and each code is pulled to its
  class's centre bit by bit with a binary cross-entropy.
* `proxy_loss`: orthogonal proxies (Hoe et al., "One Loss for All: Deep Hashing
  with a Single Cosine Similarity based Learning Objective", OrthoHash, NeurIPS
  2021). Softmax cross-entropy over the scaled cosine similarities of a code to
  the same fixed +-1 class codes, with an additive margin on its own class.
* `classifier_loss`: a linear classifier on the relaxed codes (as in DSDH, Li et
  al., NeurIPS 2017, and SSDH, Yang et al., TPAMI 2018), trained with the hash
  layer.

Each takes (n, bits) relaxed codes in [-1, 1] (the hash layer's tanh outputs),
(n,) integer class ids and an optional (n,) valid mask, and returns the mean
over the valid rows (0.0 when none is valid). They are pure, jit-compatible and
vmap over a leading axis of independent problems. `hash_centers` is a host
function: the centres are constants of a training run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import _validate

# OrthoHash's cosine scale and margin (its paper's defaults for ImageNet-100).
PROXY_SCALE = 8.0
PROXY_MARGIN = 0.2
_EPS = 1e-7


def hash_centers(num_classes: int, bits: int, seed: int = 0) -> np.ndarray:
  """(num_classes, bits) float32 +-1 class codes, far apart in Hamming distance.

  As CSQ builds them: when `bits` is a power of two and num_classes <= 2 * bits,
  the rows of a Sylvester Hadamard matrix and their negations (any two are
  bits / 2 apart, or bits for a row and its negation); otherwise random
  +-1 bits, here the best of 16 draws by their smallest pairwise distance.
  Deterministic for a given `seed`.
  """
  num_classes, bits = _positive_int(num_classes, "num_classes"), _positive_int(bits, "bits")
  if bits & (bits - 1) == 0 and num_classes <= 2 * bits:
    hadamard = np.ones((1, 1), np.float32)
    while hadamard.shape[0] < bits:
      hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    return np.concatenate([hadamard, -hadamard])[:num_classes]
  rng = np.random.default_rng(seed)
  best, best_gap = None, -1
  for _ in range(16):
    codes = np.where(rng.random((num_classes, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    hamming = (bits - codes @ codes.T) / 2
    np.fill_diagonal(hamming, bits)
    gap = hamming.min() if num_classes > 1 else bits
    if gap > best_gap:
      best, best_gap = codes, gap
  return best


def center_loss(outputs, labels, centers, valid=None) -> jax.Array:
  """CSQ's central similarity: per-bit binary cross-entropy to the class's hash centre.

  Args:
    outputs: (n, bits) relaxed codes in [-1, 1].
    labels: (n,) integer class ids, indices into `centers`.
    centers: (num_classes, bits) +-1 centres (`hash_centers`).
    valid: (n,) bool, or None for all rows.
  Returns:
    Scalar: the mean over valid rows of the mean over bits of
    -[t log p + (1 - t) log(1 - p)] with p = (h + 1) / 2, t = (c + 1) / 2
    (p clipped to [1e-7, 1 - 1e-7], as saturated tanh outputs reach +-1).
  """
  outputs, labels, valid = _check(outputs, labels, valid)
  centers = _check_codes(centers, outputs.shape[1], "centers")
  return _center_loss(outputs, labels, centers, valid)


def proxy_loss(outputs, labels, proxies, scale: float = PROXY_SCALE, margin: float = PROXY_MARGIN,
               valid=None) -> jax.Array:
  """OrthoHash's loss: cross-entropy over scale * (cos(h, proxy_c) - margin * [c == label]).

  Args:
    outputs: (n, bits) relaxed codes.
    labels: (n,) integer class ids, indices into `proxies`.
    proxies: (num_classes, bits) fixed class codes (`hash_centers`).
    scale: the cosine similarities' scale (a softmax temperature of 1 / scale).
    margin: subtracted from the similarity to the own class (additive margin).
    valid: (n,) bool, or None for all rows.
  Returns:
    Scalar: the mean cross-entropy over the valid rows. A zero output row has
    cosine 0 to every proxy.
  """
  outputs, labels, valid = _check(outputs, labels, valid)
  proxies = _check_codes(proxies, outputs.shape[1], "proxies")
  return _proxy_loss(outputs, labels, proxies, jnp.float32(scale), jnp.float32(margin), valid)


def classifier_loss(outputs, labels, kernel, bias, valid=None) -> jax.Array:
  """Softmax cross-entropy of a linear classifier on the relaxed codes.

  Args:
    outputs: (n, bits) relaxed codes.
    labels: (n,) integer class ids.
    kernel: (bits, num_classes) trainable weights.
    bias: (num_classes,) trainable biases.
    valid: (n,) bool, or None for all rows.
  Returns:
    Scalar: the mean cross-entropy of outputs @ kernel + bias over the valid rows.
  """
  outputs, labels, valid = _check(outputs, labels, valid)
  kernel = jnp.asarray(kernel, outputs.dtype)
  if kernel.ndim != 2 or kernel.shape[0] != outputs.shape[1]:
    raise ValueError(f"kernel must be (bits, num_classes) with bits={outputs.shape[1]}, "
                     f"got shape {kernel.shape}.")
  return _classifier_loss(outputs, labels, kernel, jnp.asarray(bias, outputs.dtype), valid)


# ----------------------------------------------------------------------------
# The jitted computations (also what the stage-2 trainer calls inside its jit).
# ----------------------------------------------------------------------------
def _masked_mean(per_row, valid):
  w = valid.astype(per_row.dtype)
  return (per_row * w).sum() / jnp.maximum(w.sum(), 1.0)


def _cross_entropy(logits, labels, valid):
  per = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  return _masked_mean(per, valid)


@jax.jit
def _center_loss(outputs, labels, centers, valid):
  p = jnp.clip((outputs + 1.0) / 2.0, _EPS, 1.0 - _EPS)
  t = (centers[labels] + 1.0) / 2.0
  per_bit = -(t * jnp.log(p) + (1.0 - t) * jnp.log1p(-p))
  return _masked_mean(per_bit.mean(axis=1), valid)


@jax.jit
def _proxy_loss(outputs, labels, proxies, scale, margin, valid):
  norms = jnp.linalg.norm(outputs, axis=1, keepdims=True)
  unit = outputs / jnp.maximum(norms, 1e-12)
  cos = unit @ (proxies / jnp.linalg.norm(proxies, axis=1, keepdims=True)).T
  logits = scale * (cos - margin * jax.nn.one_hot(labels, proxies.shape[0], dtype=cos.dtype))
  return _cross_entropy(logits, labels, valid)


@jax.jit
def _classifier_loss(outputs, labels, kernel, bias, valid):
  return _cross_entropy(outputs @ kernel + bias, labels, valid)


# ----------------------------------------------------------------------------
# Argument checks (before tracing, with plain messages).
# ----------------------------------------------------------------------------
def _check(outputs, labels, valid):
  shape = _validate.check_ndim(outputs, 2, "outputs", "(n, bits) relaxed codes")
  outputs = jnp.asarray(outputs)
  if not jnp.issubdtype(outputs.dtype, jnp.floating):
    outputs = outputs.astype(jnp.float32)
  _validate.check_labels(labels, shape[0])
  labels = _validate.as_int_labels(labels)
  if valid is None:
    valid = jnp.ones((shape[0],), bool)
  valid = jnp.asarray(valid)
  if valid.shape != (shape[0],):
    raise ValueError(f"valid must be ({shape[0]},) booleans, got shape {valid.shape}.")
  return outputs, labels, valid.astype(bool)


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def _check_codes(codes, bits: int, name: str):
  codes = jnp.asarray(codes, jnp.float32)
  if codes.ndim != 2 or codes.shape[1] != bits:
    raise ValueError(f"{name} must be (num_classes, {bits}) class codes, got shape {codes.shape}.")
  return codes
