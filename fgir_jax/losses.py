"""Distance matrices and the triplet losses of the paper (Eq. 1-3).

* `pairwise_distances`: (n, d) x (m, d) -> (n, m) Euclidean, squared Euclidean
  or cosine distances, with finite gradients where two embeddings coincide.
* `triplet_loss`: Eq. 1, max(d_AP - d_AN + margin, 0).
* `adaptive_triplet_loss`: Eq. 2, 1 - sigmoid(d_AN - d_AP - margin1), where
  margin1 is Eq. 3 (the mean of d_AN - d_AP over the valid triplets of the
  call, as a constant) or a value the caller passes (fixed, or a moving
  average kept by the training loop).
* `triplet_stats`: mean d_AP, mean d_AN and their gap, for logging (Fig. 5).
* `triplet_loss_from_embeddings`, `adaptive_triplet_loss_from_embeddings`: the
  same losses with d_AP and d_AN computed straight from the embeddings of each
  triplet. A train step that mines on `stop_gradient` distances and takes its
  gradient through these never differentiates an (n, n) matrix: O(t * d)
  instead of two (n, n, d) matrix products in the backward pass.

The losses take a distance matrix and (t, 3) index triplets (anchor, positive,
negative), as `mining.hard_triplets` returns them, and average over the valid
triplets. All are pure and jit-compatible, and vmap over a leading axis of
independent problems.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

from fgir_jax import _validate

METRICS = ("euclidean", "sqeuclidean", "cosine")


# ----------------------------------------------------------------------------
# Distances.
# ----------------------------------------------------------------------------
def pairwise_distances(a, b=None, metric: str = "euclidean") -> jax.Array:
  """All distances between the rows of `a` and the rows of `b`.

  Args:
    a: (n, d) embeddings.
    b: (m, d) embeddings, or None for `a` against itself (then the diagonal is
      exactly 0).
    metric: "euclidean" (L2 distance), "sqeuclidean" (its square) or "cosine"
      (1 - cosine similarity, in [0, 2]; a zero vector is at distance 1 from
      every other vector).
  Returns:
    (n, m) distances in the embeddings' float dtype (float32 for integer
    input). Computed as |a|^2 + |b|^2 - 2 a.b (one matrix product) after
    centring both sets on the mean of `a`; negative rounding is clipped to 0.
    Gradients are finite everywhere: where a squared distance is exactly 0
    (the diagonal, identical embeddings) the Euclidean gradient is 0, not NaN.
    As with any such expansion, distances far below |a| * sqrt(eps) are
    rounding noise (two coincident rows among others of norm ~10 can come
    out ~1e-2 apart in float32).
  """
  shape_a = _validate.check_ndim(a, 2, "a", "a 2-d array of embeddings (n, d)")
  if b is not None:
    shape_b = _validate.check_ndim(b, 2, "b", "a 2-d array of embeddings (m, d)")
    if shape_b[1] != shape_a[1]:
      raise ValueError(
          f"a and b must have the same embedding size, got {shape_a[1]} and {shape_b[1]}.")
  _validate.check_choice(metric, METRICS, "metric")
  a = _as_float(a)
  b = None if b is None else _as_float(b).astype(a.dtype)
  return _pairwise_distances(a, b, metric=metric)


@functools.partial(jax.jit, static_argnames="metric")
def _pairwise_distances(a, b, metric):
  x, sq_x = _prepare(a, metric, center=jnp.mean(a, axis=0))
  if b is None:
    dist = _from_gram(sq_x, sq_x, x @ x.T, metric)
    # The expansion leaves rounding noise on the diagonal; a point is at 0 from itself.
    return jnp.where(jnp.eye(a.shape[0], dtype=bool), 0.0, dist).astype(a.dtype)
  y, sq_y = _prepare(b, metric, center=jnp.mean(a, axis=0))
  return _from_gram(sq_x, sq_y, x @ y.T, metric)


def _prepare(x, metric, center):
  """Rows as used by `_from_gram` and their squared norms (shared with mining)."""
  if metric == "cosine":
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    # Double where: the norm's gradient at a zero vector would be NaN.
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 1.0)
    x = x / norm
  else:
    # Distances do not change under a shift; centring keeps |a|^2 small, so the
    # expansion loses fewer digits to cancellation.
    x = x - center
  return x, jnp.sum(x * x, axis=-1)


def _from_gram(sq_a, sq_b, gram, metric):
  """Distances from squared norms (n,), (m,) and the gram matrix (n, m)."""
  if metric == "cosine":
    return jnp.clip(1.0 - gram, 0.0, 2.0)
  # Rounding can make the expansion slightly negative for coincident points.
  sq = jnp.maximum(sq_a[:, None] + sq_b[None, :] - 2.0 * gram, 0.0)
  if metric == "sqeuclidean":
    return sq
  # Double where: sqrt only where positive, so the gradient at 0 is 0, not NaN.
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _as_float(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


# ----------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------
def triplet_loss(dist, triplets, margin=0.2, valid=None) -> jax.Array:
  """Eq. 1: mean over valid triplets of max(d_AP - d_AN + margin, 0).

  Args:
    dist: (n, n) distances between the n embeddings the triplets index.
    triplets: (t, 3) integer indices (anchor, positive, negative) into dist.
    margin: a float or a scalar array, in distance units.
    valid: (t,) bool, or None for all valid. Invalid rows add nothing; their
      indices must still be in range.
  Returns:
    Scalar loss; 0.0 when no triplet is valid.
  """
  dist, triplets, valid = _check_triplet_args(dist, triplets, valid)
  margin = _check_margin(margin, allow_none=False)
  return _triplet_loss(dist, triplets, valid, margin)


def adaptive_triplet_loss(dist, triplets, margin=None, valid=None) -> jax.Array:
  """Eq. 2: mean over valid triplets of 1 - sigmoid(d_AN - d_AP - margin1).

  Args:
    dist: (n, n) distances between the n embeddings the triplets index.
    triplets: (t, 3) integer indices (anchor, positive, negative) into dist.
    margin: None for Eq. 3, margin1 = mean(d_AN - d_AP) over the valid
      triplets of this call; or a float / scalar array (a fixed margin, or a
      moving average the caller keeps across steps, see `triplet_stats`).
      Either way margin1 is a constant for the gradient (stop-gradient).
    valid: (t,) bool, or None for all valid.
  Returns:
    Scalar loss in [0, 1]; 0.0 when no triplet is valid.
  """
  dist, triplets, valid = _check_triplet_args(dist, triplets, valid)
  margin = _check_margin(margin, allow_none=True)
  return _adaptive_triplet_loss(dist, triplets, valid, margin)


def triplet_stats(dist, triplets, valid=None) -> dict[str, jax.Array]:
  """Means over the valid triplets, for logging and moving-average margins.

  Returns a dict of scalars: "d_ap" (mean anchor-positive distance), "d_an"
  (mean anchor-negative distance), "margin" (mean d_AN - d_AP, i.e. Eq. 3's
  margin1) and "num_valid" (float count of valid triplets). Means are 0.0
  when no triplet is valid. No gradient flows through any of them.
  """
  dist, triplets, valid = _check_triplet_args(dist, triplets, valid)
  return _triplet_stats(dist, triplets, valid)


def triplet_loss_from_embeddings(embeddings, triplets, margin=0.2, valid=None,
                                 metric: str = "euclidean") -> jax.Array:
  """`triplet_loss(pairwise_distances(embeddings, metric=metric), ...)`, without the matrix.

  embeddings: (n, d) floats the triplets index; the rest as in `triplet_loss`.
  Each triplet's two distances are computed from its rows directly, which is
  also more exact than the matrix's |a|^2 + |b|^2 - 2 a.b expansion (the two
  agree to that expansion's rounding).
  """
  embeddings, triplets, valid = _check_embedding_args(embeddings, triplets, valid, metric)
  margin = _check_margin(margin, allow_none=False)
  return _triplet_loss_from_pairs(*_direct_pairs(embeddings, triplets, metric), valid, margin)


def adaptive_triplet_loss_from_embeddings(embeddings, triplets, margin=None, valid=None,
                                          metric: str = "euclidean") -> jax.Array:
  """`adaptive_triplet_loss(pairwise_distances(embeddings, metric=metric), ...)`, without the matrix.

  embeddings: (n, d) floats the triplets index; margin and valid as in
  `adaptive_triplet_loss` (margin None: Eq. 3 over this call's triplets).
  See `triplet_loss_from_embeddings` for why and how the distances differ.
  """
  embeddings, triplets, valid = _check_embedding_args(embeddings, triplets, valid, metric)
  margin = _check_margin(margin, allow_none=True)
  return _adaptive_loss_from_pairs(*_direct_pairs(embeddings, triplets, metric), valid, margin)


@jax.jit
def _triplet_loss(dist, triplets, valid, margin):
  return _triplet_loss_from_pairs(*_gather_pairs(dist, triplets), valid, margin)


@jax.jit
def _adaptive_triplet_loss(dist, triplets, valid, margin):
  return _adaptive_loss_from_pairs(*_gather_pairs(dist, triplets), valid, margin)


@jax.jit
def _triplet_loss_from_pairs(d_ap, d_an, valid, margin):
  per = jax.vmap(lambda ap, an: jnp.maximum(ap - an + margin, 0.0))(d_ap, d_an)
  return _valid_mean(per, valid)


@jax.jit
def _adaptive_loss_from_pairs(d_ap, d_an, valid, margin):
  if margin is None:
    margin = _valid_mean(d_an - d_ap, valid)  # Eq. 3
  margin = jax.lax.stop_gradient(margin)
  # 1 - sigmoid(x) == sigmoid(-x), without the cancellation near x >> 0.
  per = jax.vmap(lambda ap, an: jax.nn.sigmoid(margin - (an - ap)))(d_ap, d_an)
  return _valid_mean(per, valid)


@jax.jit
def _triplet_stats(dist, triplets, valid):
  d_ap, d_an = jax.lax.stop_gradient(_gather_pairs(dist, triplets))
  return {"d_ap": _valid_mean(d_ap, valid), "d_an": _valid_mean(d_an, valid),
          "margin": _valid_mean(d_an - d_ap, valid),
          "num_valid": jnp.sum(valid).astype(dist.dtype)}


def _gather_pairs(dist, triplets):
  """d_AP and d_AN, (t,) each; one triplet at a time, vmapped."""
  pair = jax.vmap(lambda tr: (dist[tr[0], tr[1]], dist[tr[0], tr[2]]))
  return pair(triplets)


@functools.partial(jax.jit, static_argnames="metric")
def _direct_pairs(embeddings, triplets, metric):
  """d_AP and d_AN, (t,) each, from the triplets' own rows (no (n, n) matrix)."""
  if metric == "cosine":  # unit rows, as `pairwise_distances` makes them
    embeddings, _ = _prepare(embeddings, metric, center=None)
  anchor, positive, negative = (embeddings[triplets[:, i]] for i in range(3))
  return _row_distance(anchor, positive, metric), _row_distance(anchor, negative, metric)


def _row_distance(a, b, metric):
  if metric == "cosine":
    return jnp.clip(1.0 - jnp.sum(a * b, axis=-1), 0.0, 2.0)
  sq = jnp.sum(jnp.square(a - b), axis=-1)
  if metric == "sqeuclidean":
    return sq
  # Double where: the gradient at a zero distance is 0, not NaN.
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _valid_mean(x, valid):
  total = jnp.sum(jnp.where(valid, x, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1).astype(x.dtype)


# ----------------------------------------------------------------------------
# Argument checks (shapes and dtypes always; values only when concrete).
# ----------------------------------------------------------------------------
def _check_triplet_args(dist, triplets, valid):
  shape = _validate.check_ndim(dist, 2, "dist", "a 2-d (n, n) distance matrix")
  if shape[0] != shape[1]:
    raise ValueError(f"dist must be a square (n, n) distance matrix, got shape {shape}.")
  triplets, valid = _check_triplets(shape[0], triplets, valid, "rows of dist")
  dist = jnp.asarray(dist)
  if not jnp.issubdtype(dist.dtype, jnp.floating):
    dist = dist.astype(jnp.float32)
  return dist, triplets, valid


def _check_embedding_args(embeddings, triplets, valid, metric):
  shape = _validate.check_ndim(embeddings, 2, "embeddings", "a 2-d (n, d) array of embeddings")
  _validate.check_choice(metric, METRICS, "metric")
  triplets, valid = _check_triplets(shape[0], triplets, valid, "rows of embeddings")
  return _as_float(embeddings), triplets, valid


def _check_triplets(n, triplets, valid, what):
  """(triplets, valid) checked against n points; `what` names what they index."""
  t_shape = _validate.check_ndim(triplets, 2, "triplets", "a (t, 3) array of index triplets")
  if t_shape[1] != 3:
    raise ValueError(
        f"triplets must have shape (t, 3) (anchor, positive, negative), got {t_shape}.")
  if not jnp.issubdtype(_dtype(triplets), jnp.integer):
    raise ValueError(
        f"triplets must hold integer indices, got dtype {_dtype(triplets)}; "
        "cast with triplets.astype(int).")
  if _validate.is_concrete(triplets) and t_shape[0] and n:
    values = np.asarray(triplets)
    if values.min() < 0 or values.max() >= n:
      raise ValueError(
          f"triplets must index {what} in [0, {n}); give padded rows an in-range "
          "index (e.g. the anchor) and mark them invalid.")
  if valid is None:
    valid = jnp.ones((t_shape[0],), bool)
  else:
    v_shape = _validate.shape_of(valid, "valid")
    if v_shape != (t_shape[0],):
      raise ValueError(
          f"valid must have shape ({t_shape[0]},), one flag per triplet, got {v_shape}.")
    valid = jnp.asarray(valid).astype(bool)
  return jnp.asarray(triplets), valid


def _check_margin(margin, allow_none):
  if margin is None:
    if allow_none:
      return None
    raise ValueError("margin must be a number or a scalar array, got None.")
  if isinstance(margin, (int, float, np.integer, np.floating)) and not isinstance(margin, bool):
    return float(margin)
  shape = getattr(margin, "shape", None)
  if shape is None or tuple(shape) != () or not jnp.issubdtype(margin.dtype, jnp.floating):
    raise ValueError(
        f"margin must be a number or a float scalar array (shape ()), got {margin!r}.")
  return margin


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
