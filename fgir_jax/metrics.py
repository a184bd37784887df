"""Retrieval and classification metrics: mAP over a Hamming ranking, precision@k, accuracy.

Retrieval ranks the whole database by Hamming distance to each query; an item
is relevant when its label equals the query's. Two ways to order equal
distances (`ties`):

* "stable": in database order, as a stable sort by distance gives.
* "average": the expectation over all orders of each tie group, uniformly at
  random (McSherry & Najork 2008; He et al. 2018, "Hashing as tie-aware
  learning to rank"). It depends only on how many items and how many relevant
  items sit at each distance, so it needs no sort at all.

How it runs: queries go through in chunks with static shapes (the last chunk
padded), each chunk one jitted call, so the query x database matrix never
exists as a whole: memory is O(chunk * n_db) (for "stable" plus
O(chunk * sqrt(n_relevant * n_db * levels)), which is smaller whenever a class
holds at most n_db / levels items). Distances are small integers 0..bits,
which both modes use:

* "average": one scatter-add per chunk builds, per query, the histogram of
  items and of relevant items over the bits + 1 distance levels; the expected
  AP is a closed form (harmonic numbers) on those histograms, evaluated on the
  host in float64.
* "stable": the rank of a relevant item j at distance v is
  1 + #(items closer than v) + #(items at v before j in the database). The
  second count comes from a histogram over (distance level, database block)
  pairs plus a compare-count inside j's own block. That is O(n_db) work per
  query plus O(sqrt(n_relevant * n_db * levels)), instead of a sort's
  O(n_db log n_db), and it is exact.

`method="sort"` computes the same values from a sort of each query's
distances instead (one int32 key, distance and database index, per item):
the ranks of the relevant items are their positions, and the level
histograms the boundaries between distances. `_METHOD_BY_BACKEND` names the
default on each backend (bench/bench_gpu.py measured them), and chunks are
sized per backend too: CPU chunks stay in cache, GPU chunks are large.

The functions here are host-side drivers (they return Python floats or NumPy
arrays) and cannot be called under `jax.jit`; `accuracy` is the exception.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from scipy import special  # a dependency of jax itself

from fgir_jax import _backend
from fgir_jax import _validate
from fgir_jax import codes as codes_lib
from fgir_jax import parallel

TIES = ("stable", "average")
# "scatter": histograms by scatter-add (see above); "sort": from sorted keys.
METHODS = ("scatter", "sort")
_METHOD_BY_BACKEND = {"cpu": "scatter", "gpu": "scatter"}

# Working set of one chunk, in 4-byte elements, and its most queries: on a CPU
# 8 MiB (chunks that stay in the caches measured 2-4x faster than 128 MiB
# ones); on a GPU 512 MiB, few large launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "gpu": 1 << 27}
_MAX_CHUNK = {"cpu": 1024, "gpu": 8192}
_NO_RANK = np.iinfo(np.int32).max  # rank of a padding slot: after every real one
# The sort method packs (distance, index) into one int32 key below this.
_ONE_KEY_LIMIT = 2**31


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def mean_average_precision(q_codes, q_labels, db_codes, db_labels, topk=None, ties="stable",
                           *, chunk_size=None, mesh=None, method=None) -> float:
  """Mean average precision over a Hamming ranking of the database.

  Args:
    q_codes: (n_q, bits) codes in {0,1} or {-1,+1}, or (n_q, bits/8) packed uint8
      (as np.packbits(bits, axis=1) writes them, zero padding bits).
    q_labels: (n_q,) integer class ids.
    db_codes: (n_db, bits) or (n_db, bits/8), same code length as q_codes.
    db_labels: (n_db,) integer class ids; an item is relevant to a query when
      the labels are equal.
    topk: None ranks the whole database; an int k keeps the first k items:
      AP@k = (sum of precision at the rank of each relevant item in the top k)
      / (number of relevant items in the top k), and 0 when there are none.
    ties: "stable" (equal distances in database order) or "average" (the
      expectation over uniformly random orders inside each tie group). With
      topk, "average" is exact also when the k-th position falls inside a tie
      group: the number X of that group's relevant items landing in the top k
      is hypergeometric, and AP@k is averaged over X with both its numerator
      and its denominator depending on X (an expected ratio, not a ratio of
      expectations).
    chunk_size: queries per jitted call; None sizes chunks to a working set of
      about 8 MiB, which keeps them in the CPU caches.
    mesh: a `jax.sharding.Mesh` (fgir_jax.parallel.data_mesh): each chunk's
      queries are split over its devices, the database replicated on each.
      Same values as without it.
    method: None (the backend's fastest) or one of `METHODS`; same values.
  Returns:
    The mean over the queries that have at least one relevant item in the
    database (queries without any are left out), as a Python float; NaN when
    no query has a relevant item.
  """
  aps = average_precisions(q_codes, q_labels, db_codes, db_labels, topk=topk, ties=ties,
                           chunk_size=chunk_size, mesh=mesh, method=method)
  return mean_over_queries(aps)


def average_precisions(q_codes, q_labels, db_codes, db_labels, topk=None, ties="stable",
                       *, chunk_size=None, mesh=None, method=None) -> np.ndarray:
  """Per-query average precision; see `mean_average_precision` for the arguments.

  Returns:
    (n_q,) float64; NaN for a query with no relevant item in the database.
  """
  problem = _prepare(q_codes, q_labels, db_codes, db_labels, ties=ties, chunk_size=chunk_size,
                     k=topk, k_name="topk", k_optional=True, mesh=mesh, method=method)
  if ties == "stable":
    return _stable_scores(problem, functools.partial(_stable_ap, topk=problem.k))
  return _average_scores(problem, functools.partial(_tie_aware_ap, topk=problem.k))


def precision_at_k(q_codes, q_labels, db_codes, db_labels, k, ties="stable",
                   *, chunk_size=None, mesh=None, method=None) -> float:
  """Mean precision in the first k items of the Hamming ranking.

  Arguments as for `mean_average_precision`; k is a positive int, and a k
  larger than the database is cut to its size. With ties="average" the count
  of relevant items in the top k is its expectation over random tie orders.

  Returns:
    The mean over the queries that have at least one relevant item in the
    database (the same queries mAP averages over), as a Python float; NaN
    when there are none.
  """
  problem = _prepare(q_codes, q_labels, db_codes, db_labels, ties=ties, chunk_size=chunk_size,
                     k=k, k_name="k", k_optional=False, mesh=mesh, method=method)
  k = min(problem.k, problem.n_db)
  if ties == "stable":
    scores = _stable_scores(problem, functools.partial(_stable_precision, k=k))
  else:
    scores = _average_scores(problem, functools.partial(_tie_aware_precision, k=k))
  return mean_over_queries(scores)


def accuracy(logits_or_predictions, labels):
  """Top-1 classification accuracy, a fraction in [0, 1].

  Args:
    logits_or_predictions: (n, classes) scores of any monotone kind (logits,
      probabilities), whose argmax is the prediction (the first one on ties),
      or (n,) integer predicted class ids.
    labels: (n,) integer true class ids.
  Returns:
    A Python float; under `jax.jit` (traced inputs) a float32 scalar array,
    so the same call can sit inside a jitted eval step.
  """
  shape = _validate.shape_of(logits_or_predictions, "logits_or_predictions")
  if len(shape) not in (1, 2):
    raise ValueError(
        "logits_or_predictions must be (n, classes) scores or (n,) predicted class ids, "
        f"got shape {shape}.")
  if shape[0] == 0 or (len(shape) == 2 and shape[1] == 0):
    raise ValueError(f"logits_or_predictions is empty (shape {shape}); give at least one example.")
  _validate.check_labels(labels, shape[0], "labels", against="predictions")
  x = logits_or_predictions
  dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if len(shape) == 1 and not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
    raise ValueError(
        f"logits_or_predictions is 1-d, so it must hold integer class ids, got dtype {dtype}; "
        "pass (n, classes) logits or cast the predictions with .astype(int).")
  if _validate.is_concrete(x) and _validate.is_concrete(labels):
    # On the host in the input's own precision: float64 logits are not
    # rounded to float32, which could create argmax ties.
    x = np.asarray(x)
    predictions = x.argmax(-1) if len(shape) == 2 else x
    return float(np.mean(predictions.astype(np.int64) == np.asarray(labels).astype(np.int64)))
  x = jnp.asarray(x)
  predictions = jnp.argmax(x, axis=-1) if len(shape) == 2 else x
  correct = predictions.astype(jnp.int32) == _validate.as_int_labels(labels)
  return jnp.mean(correct, dtype=jnp.float32)


# ----------------------------------------------------------------------------
# Argument checks and the shared set-up.
# ----------------------------------------------------------------------------


class _Problem:
  """Validated inputs on the host, ready for the chunked kernels.

  Attributes:
    q_words: (n_q, words) uint32 packed query codes.
    db_words: (n_db, words) uint32 on the device.
    q_class / db_class: (n_q,) / (n_db,) int32 dense class ids; -1 for a query
      whose label no database item has.
    n_relevant: (n_q,) int64 relevant items per query in the whole database.
    levels: number of possible distances, 8 * bytes + 1.
  """

  def __init__(self, q_bytes, db_bytes, q_labels, db_labels, k, chunk_size, mesh=None,
               method="scatter"):
    self.q_words = codes_lib.as_words(q_bytes)
    self.db_words = jnp.asarray(codes_lib.as_words(db_bytes))
    self.n_q, self.n_db = q_bytes.shape[0], db_bytes.shape[0]
    self.levels = 8 * q_bytes.shape[1] + 1
    self.k = k
    self.chunk_size = chunk_size
    self.mesh = mesh
    self.method = method
    classes, db_class = np.unique(db_labels, return_inverse=True)
    pos = np.clip(np.searchsorted(classes, q_labels), 0, len(classes) - 1)
    found = classes[pos] == q_labels
    self.db_class = db_class.astype(np.int32).reshape(-1)
    self.q_class = np.where(found, pos, -1).astype(np.int32)
    self.class_size = np.bincount(self.db_class, minlength=len(classes))
    self.n_relevant = np.where(found, self.class_size[pos], 0).astype(np.int64)


def _prepare(q_codes, q_labels, db_codes, db_labels, *, ties, chunk_size, k, k_name, k_optional,
             mesh=None, method=None):
  """Every argument check, cheapest first, then packing and label ids."""
  _validate.check_choice(ties, TIES, "ties")
  method = _backend.choose(method, METHODS, _METHOD_BY_BACKEND)
  k = _check_k(k, k_name, k_optional)
  if chunk_size is not None:
    chunk_size = _check_k(chunk_size, "chunk_size", optional=False)
  q_shape = codes_lib.check_shape(q_codes, "q_codes")
  db_shape = codes_lib.check_shape(db_codes, "db_codes")
  _validate.check_labels(q_labels, q_shape[0], "q_labels", against="query codes")
  _validate.check_labels(db_labels, db_shape[0], "db_labels", against="database codes")
  q_bytes, db_bytes, _ = codes_lib.pack_pair(q_codes, db_codes)
  q_labels = np.asarray(q_labels).astype(np.int64)
  db_labels = np.asarray(db_labels).astype(np.int64)
  return _Problem(q_bytes, db_bytes, q_labels, db_labels, k, chunk_size, mesh, method)


def _check_k(value, name, optional):
  """None (when optional) or a positive Python/NumPy integer, else a clear error."""
  if value is None and optional:
    return None
  try:
    ok = not isinstance(value, (bool, np.bool_)) and operator.index(value) >= 1
  except TypeError:
    ok = False
  if not ok:
    allowed = "None or a positive integer" if optional else "a positive integer"
    raise ValueError(f"{name} must be {allowed}, got {value!r}.")
  return operator.index(value)


def mean_over_queries(scores) -> float:
  """The mean of per-query scores (e.g. `average_precisions`) over the queries that have a
  relevant item: NaN rows left out, as `mean_average_precision` averages; NaN when all are."""
  scores = np.asarray(scores, np.float64)
  defined = scores[~np.isnan(scores)]
  return float(defined.mean()) if defined.size else float("nan")


def _chunk_rows(problem: _Problem, per_query_elements: int) -> int:
  """Queries per chunk: the user's choice, else from the memory budget, balanced
  so the padded last chunk wastes little."""
  where = _backend.backend() if _backend.backend() in _CHUNK_ELEMENTS else "cpu"
  cap = problem.chunk_size or max(1, min(_MAX_CHUNK[where],
                                         _CHUNK_ELEMENTS[where] // per_query_elements))
  cap = min(cap, problem.n_q)
  rows = -(-problem.n_q // -(-problem.n_q // cap))
  return parallel.padded_rows(rows, problem.mesh)  # every device gets the same share


def _chunks(kernel, rows: int, per_query: list[np.ndarray], database: tuple = ()):
  """Runs kernel(*per-query chunk, *database) on padded chunks of the per-query arrays.

  Yields (start, stop, host outputs). Chunk i + 1 is dispatched before the
  host reads chunk i, so the device never waits for the host's float64 work.
  """
  n = per_query[0].shape[0]
  pending = None
  for start in range(0, n, rows):
    stop = min(n, start + rows)
    padded = [_pad_rows(a[start:stop], rows) for a in per_query]
    out = kernel(*padded, *database)
    if pending is not None:
      yield pending[0], pending[1], parallel.to_host(pending[2])
    pending = (start, stop, out)
  if pending is not None:
    yield pending[0], pending[1], parallel.to_host(pending[2])


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  if a.shape[0] == rows:
    return a
  pad = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
  return np.concatenate([a, pad])


# ----------------------------------------------------------------------------
# ties="average": per-query histograms over distance levels.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("levels",))
def _level_histograms(q_words, q_class, db_words, db_class, *, levels):
  """Items and relevant items at each distance, per query.

  Args:
    q_words: (B, words) uint32; q_class: (B,) int32.
    db_words: (n_db, words) uint32; db_class: (n_db,) int32.
  Returns:
    counts (B, levels) int32 and relevant (B, levels) int32.
  """
  d = codes_lib.hamming_distances(q_words, db_words)
  relevant = (db_class[None, :] == q_class[:, None]).astype(jnp.int32)
  # One scatter-add on the key 2 * distance + relevant gives both histograms;
  # on CPU it is ~50x faster than summing one-hot compares over the levels.
  keys = 2 * d + relevant
  hist = jax.vmap(_bincount, in_axes=(0, None))(keys, 2 * levels).reshape(-1, levels, 2)
  return hist.sum(-1), hist[..., 1]


def _bincount(keys, length):
  """(n,) int keys in [0, length) -> (length,) int32 counts."""
  return jnp.zeros((length,), jnp.int32).at[keys].add(1, mode="promise_in_bounds")


@functools.partial(jax.jit, static_argnames=("levels",))
def _level_histograms_by_sort(q_words, q_class, db_words, db_class, *, levels):
  """`_level_histograms` from each query's sorted keys 2 * distance + relevant:
  the histogram is the differences between the boundaries of equal keys."""
  d = codes_lib.hamming_distances(q_words, db_words)
  relevant = (db_class[None, :] == q_class[:, None]).astype(jnp.int32)
  keys = jnp.sort(2 * d + relevant, axis=1)
  edges = jnp.arange(2 * levels + 1, dtype=jnp.int32)
  bounds = jax.vmap(lambda row: jnp.searchsorted(row, edges, side="left"))(keys)
  hist = jnp.diff(bounds, axis=1).astype(jnp.int32).reshape(-1, levels, 2)
  return hist.sum(-1), hist[..., 1]


def _average_scores(problem: _Problem, score_fn) -> np.ndarray:
  """Per-query scores from the level histograms; NaN without relevant items."""
  rows = _chunk_rows(problem, 3 * problem.n_db + 4 * problem.levels)
  database = (problem.db_words, jnp.asarray(problem.db_class))
  histograms = _level_histograms_by_sort if problem.method == "sort" else _level_histograms
  # With a mesh, each chunk's queries are split over the devices.
  kernel = parallel.shard_rows(histograms, problem.mesh, 2, 2, levels=problem.levels)
  out = np.full(problem.n_q, np.nan)
  for start, stop, (counts, relevant) in _chunks(kernel, rows, [problem.q_words, problem.q_class],
                                                   database):
    n = stop - start
    out[start:stop] = score_fn(counts[:n].astype(np.float64), relevant[:n].astype(np.float64))
  out[problem.n_relevant == 0] = np.nan
  return out


def _tie_group_sum(before, rel_before, n, r):
  """Expected sum of precisions over the relevant items of one tie group.

  A group of n items, r of them relevant, follows `before` items of which
  `rel_before` are relevant. Position j of the group is relevant with
  probability r/n and then has on average (j-1)(r-1)/(n-1) relevant items ahead
  of it inside the group, so the sum is
    sum_j (r/n) (rel_before + 1 + (j-1) a) / (before + j),  a = (r-1)/(n-1),
  = r a + (r/n) (rel_before + 1 - a (before + 1)) (H(before + n) - H(before)).
  All arguments broadcast; float64 keeps the harmonic-number difference exact
  to ~1e-9 relative even a million items deep.
  """
  a = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
  dh = special.digamma(before + n + 1) - special.digamma(before + 1)
  total = r * a + r / np.maximum(n, 1) * (rel_before + 1 - a * (before + 1)) * dh
  return np.where(r > 0, total, 0.0)


def _levels_split(counts, relevant, topk):
  """Exclusive prefix sums and which levels lie wholly inside the top k."""
  before = np.cumsum(counts, 1) - counts
  rel_before = np.cumsum(relevant, 1) - relevant
  full = np.ones_like(counts, bool) if topk is None else before + counts <= topk
  return before, rel_before, full


def _cut_group(counts, relevant, before, topk):
  """The tie group the top-k cut falls strictly inside, per query (n, r, before, m in top k)."""
  cut = (before < topk) & (before + counts > topk)
  pick = lambda x: np.where(cut, x, 0).sum(1)
  n, r, b = pick(counts), pick(relevant), pick(before)
  return n, r, b, np.where(cut.any(1), topk - b, 0)


def _tie_aware_ap(counts, relevant, topk):
  """Expected AP (@topk) per query from (B, levels) float64 histograms."""
  before, rel_before, full = _levels_split(counts, relevant, topk)
  s_full = np.where(full, _tie_group_sum(before, rel_before, counts, relevant), 0).sum(1)
  r_full = np.where(full, relevant, 0).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    ap = np.where(r_full > 0, s_full / r_full, 0.0)
  if topk is None:
    return ap
  n, r, b, m = _cut_group(counts, relevant, before, topk)
  rows = np.nonzero(r > 0)[0]
  # A cut group holding relevant items: condition on X, how many of its r
  # relevant items land in its first m slots (hypergeometric); given X = x the
  # slots hold x relevant items in uniformly random order, the closed form above.
  for part in np.array_split(rows, max(1, len(rows) * (int(r.max(initial=0)) + 1) // (1 << 22))):
    ap[part] = _expected_cut_ap(s_full[part], r_full[part], n[part], r[part], b[part], m[part])
  return ap


def _expected_cut_ap(s_full, r_full, n, r, before, m):
  """E[(s_full + sum of precisions in the cut part) / (r_full + X)] over X."""
  x = np.arange(int(np.minimum(r, m).max(initial=0)) + 1, dtype=np.float64)[None, :]
  n, r, m, before, s_full, r_full = (v[:, None] for v in (n, r, m, before, s_full, r_full))
  p = _hypergeom_pmf(x, n, r, m)
  part = _tie_group_sum(before, r_full, m, x)
  denom = r_full + x
  with np.errstate(invalid="ignore", divide="ignore"):
    value = np.where(denom > 0, (s_full + part) / denom, 0.0)
  return (p * value).sum(1)


def _hypergeom_pmf(x, n, r, m):
  """P(X = x) for X relevant among m draws without replacement from n holding r."""
  support = (x >= np.maximum(0, m - (n - r))) & (x <= np.minimum(r, m))
  xs = np.where(support, x, 0)  # keep gammaln's arguments positive off the support
  log_p = (_log_choose(r, xs) + _log_choose(n - r, np.where(support, m - xs, 0))
           - _log_choose(n, m))
  p = np.where(support, np.exp(log_p), 0.0)
  return p / p.sum(1, keepdims=True)  # removes the last ulps of lgamma error


def _log_choose(a, b):
  return special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(np.maximum(a - b, 0) + 1)


def _tie_aware_precision(counts, relevant, k):
  """Expected relevant items in the top k, over k, from the histograms."""
  before, _, full = _levels_split(counts, relevant, k)
  hits = np.where(full, relevant, 0).sum(1)
  n, r, _, m = _cut_group(counts, relevant, before, k)
  hits = hits + np.where(n > 0, r * m / np.maximum(n, 1), 0.0)
  return hits / k


# ----------------------------------------------------------------------------
# ties="stable": exact ranks of the relevant items.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("levels", "blocks", "max_relevant"))
def _stable_ranks(q_words, q_first, q_count, db_words, by_class, *, levels, blocks, max_relevant):
  """Sorted 1-based ranks of each query's relevant items under a stable sort.

  Args:
    q_words: (B, words) uint32.
    q_first, q_count: (B,) int32; the query's relevant items are
      by_class[q_first : q_first + q_count].
    db_words: (n_db, words) uint32.
    by_class: (n_db,) int32 database indices grouped by class, each class in
      database order.
  Returns:
    (B, max_relevant) int32 ranks, ascending, padded with INT32_MAX.
  """
  n_db = db_words.shape[0]
  size = -(-n_db // blocks)
  b = q_words.shape[0]
  d = codes_lib.hamming_distances(q_words, db_words)  # (B, n_db)
  slot = jnp.arange(max_relevant, dtype=jnp.int32)
  valid = slot[None, :] < q_count[:, None]
  item = by_class[jnp.minimum(q_first[:, None] + slot, n_db - 1)]  # (B, M)
  level = _gather(d, item)
  block = item // size

  # hist[q, v, g]: items at distance v in database block g.
  keys = d * blocks + jnp.arange(n_db, dtype=jnp.int32) // size
  hist = jax.vmap(_bincount, in_axes=(0, None))(keys, levels * blocks).reshape(b, levels, blocks)
  per_level = hist.sum(2)
  closer = jnp.cumsum(per_level, 1) - per_level
  # associative_scan: 1.8x faster than jnp.cumsum (a reduce_window) on XLA CPU.
  earlier = jax.lax.associative_scan(jnp.add, hist, axis=2) - hist  # same level, earlier blocks
  rank = (1 + _gather(closer, level)
          + _gather(earlier.reshape(b, -1), level * blocks + block)
          + _earlier_in_block(d, item, level, block, size, blocks, levels))
  return jnp.sort(jnp.where(valid, rank, _NO_RANK), axis=1)


@functools.partial(jax.jit, static_argnames=("levels", "max_relevant"))
def _stable_ranks_by_sort(q_words, q_class, db_words, db_class, *, levels, max_relevant):
  """`_stable_ranks` from a stable sort of each query's distances.

  Args:
    q_words: (B, words) uint32; q_class: (B,) int32 (-1: no relevant item).
    db_words: (n_db, words) uint32; db_class: (n_db,) int32.
  Returns:
    (B, max_relevant) int32 ranks, ascending, padded with INT32_MAX.
  """
  n_db = db_words.shape[0]
  d = codes_lib.hamming_distances(q_words, db_words)
  index = lax.broadcasted_iota(jnp.int32, d.shape, 1)
  shift = max(1, (n_db - 1).bit_length())
  if levels << shift < _ONE_KEY_LIMIT:  # one int32 key (distance, index): a one-operand sort
    item = jnp.sort((d << shift) | index, axis=1) & ((1 << shift) - 1)
  else:
    item = lax.sort((d, index), dimension=1, num_keys=1, is_stable=True)[1]
  relevant = _gather(jnp.broadcast_to(db_class, d.shape), item) == q_class[:, None]
  # The j-th relevant item in ranking order goes to slot j; the rest are dropped.
  slot = jnp.where(relevant, jnp.cumsum(relevant, axis=1, dtype=jnp.int32) - 1, max_relevant)
  row = lax.broadcasted_iota(jnp.int32, d.shape, 0)
  out = jnp.full((d.shape[0], max_relevant), _NO_RANK, jnp.int32)
  return out.at[row, slot].set(index + 1, mode="drop")


def _gather(x, index):
  """take_along_axis on axis 1 for indices that are in bounds by construction
  (no clamping or fill code: simpler HLO, faster compile)."""
  return jnp.take_along_axis(x, index, 1, mode="promise_in_bounds")


def _earlier_in_block(d, item, level, block, size, blocks, levels):
  """#(items before `item` in its own block at the same distance), (B, M)."""
  pad = blocks * size - d.shape[1]
  # Padding gets distance `levels`, which no item has, so it never counts.
  d_blocks = jnp.pad(d, ((0, 0), (0, pad)), constant_values=levels)
  d_blocks = d_blocks.reshape(d.shape[0], blocks, size)
  neighbours = _gather(d_blocks, block[:, :, None])  # (B, M, size)
  position = block[:, :, None] * size + jnp.arange(size, dtype=jnp.int32)
  same = (neighbours == level[:, :, None]) & (position < item[:, :, None])
  return same.sum(-1, dtype=jnp.int32)


def _block_count(n_db, levels, max_relevant):
  """Blocks that balance the (level, block) histogram against the in-block counts:
  levels * blocks ~ max_relevant * n_db / blocks."""
  blocks = int(round(math.sqrt(max_relevant * n_db / levels)))
  blocks = min(max(blocks, 1), n_db)
  return -(-n_db // -(-n_db // blocks))  # no empty trailing block


def _stable_scores(problem: _Problem, score_fn) -> np.ndarray:
  """Per-query scores from the exact stable ranks; NaN without relevant items."""
  out = np.full(problem.n_q, np.nan)
  max_relevant = int(problem.n_relevant.max())
  if max_relevant == 0:
    return out
  plan = _sorted_ranks_plan if problem.method == "sort" else _histogram_ranks_plan
  rows, kernel, per_query, database = plan(problem, max_relevant)
  q_count = problem.n_relevant.astype(np.int32)
  for start, stop, ranks in _chunks(kernel, rows, per_query, database):
    out[start:stop] = score_fn(ranks[:stop - start].astype(np.float64), q_count[start:stop])
  out[problem.n_relevant == 0] = np.nan
  return out


def _histogram_ranks_plan(problem: _Problem, max_relevant: int):
  """(queries per chunk, kernel, per-query arrays, database) of `_stable_ranks`."""
  levels, n_db = problem.levels, problem.n_db
  blocks = _block_count(n_db, levels, max_relevant)
  size = -(-n_db // blocks)
  per_query = 3 * n_db + 2 * levels * blocks + 2 * max_relevant * size + 4 * max_relevant
  by_class = np.argsort(problem.db_class, kind="stable").astype(np.int32)
  first = (np.cumsum(problem.class_size) - problem.class_size).astype(np.int32)
  q_first = np.where(problem.q_class >= 0, first[problem.q_class], 0).astype(np.int32)
  kernel = parallel.shard_rows(_stable_ranks, problem.mesh, 3, 2, levels=levels, blocks=blocks,
                               max_relevant=max_relevant)
  return (_chunk_rows(problem, per_query), kernel,
          [problem.q_words, q_first, problem.n_relevant.astype(np.int32)],
          (problem.db_words, jnp.asarray(by_class)))


def _sorted_ranks_plan(problem: _Problem, max_relevant: int):
  """(queries per chunk, kernel, per-query arrays, database) of `_stable_ranks_by_sort`."""
  kernel = parallel.shard_rows(_stable_ranks_by_sort, problem.mesh, 2, 2, levels=problem.levels,
                               max_relevant=max_relevant)
  return (_chunk_rows(problem, 5 * problem.n_db + max_relevant), kernel,
          [problem.q_words, problem.q_class],
          (problem.db_words, jnp.asarray(problem.db_class)))


def _stable_ap(ranks, n_relevant, topk):
  """AP (@topk) from ascending ranks (B, M) of the relevant items."""
  valid = np.arange(ranks.shape[1])[None, :] < n_relevant[:, None]
  kept = valid if topk is None else valid & (ranks <= topk)
  counted = kept.sum(1)
  # The i-th relevant item in ranking order has precision i / rank there.
  precision = np.arange(1, ranks.shape[1] + 1)[None, :] / ranks
  total = np.where(kept, precision, 0.0).sum(1)
  return np.where(counted > 0, total / np.maximum(counted, 1), 0.0)


def _stable_precision(ranks, n_relevant, k):
  valid = np.arange(ranks.shape[1])[None, :] < n_relevant[:, None]
  return (valid & (ranks <= k)).sum(1) / k
