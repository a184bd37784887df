"""Hard triplet mining (paper Eq. 4) as jitted rank selection, chunked for large N.

For every anchor i (one triplet per anchor, row i has anchor i):

* positive: uniform among the w_p farthest same-class points (i itself
  excluded), w_p = max(1, floor(P_num * beta));
* negative: uniform among the w_n closest other-class points,
  w_n = max(1, floor(N_num * beta * neg_factor)).

The random part is drawn first, for all anchors at once, from the key: a rank
r = floor(u * w) inside each window, u ~ U[0, 1). What is left is exact
selection: the r-th farthest positive and the r-th closest negative of each
row, equal distances ranked by index (lower first). So the result is a
function of (key, distances, labels) alone, whatever the path or block size.

How the selection runs (`_select_rank`). `lax.top_k` would need k = max w_n,
about 300 of 6,000 negatives on CUB; on a 2-core CPU that alone took 0.6-0.8 s,
about as long as pytorch-metric-learning's whole BatchHardMiner, and a full
sort is ~10x slower still. One element per row needs no ordering: each row
keeps a bracket [lo, hi] with count(x < lo) <= r < count(x <= hi) and shrinks
it with one vectorised count pass over the row per step. The first pivot comes
from a normal fit of the row (mean and std of ~512 sampled columns), the next
ones from Newton and then Illinois false-position steps on the normal-quantile
scale of the counts: ~4 passes on a typical row, ~7-9 for the slowest row of a
block; after `_INTERP_STEPS` steps, bisection on the float's bit pattern bounds
the work. Counts are float32 sums of 0/1 compares (`_count_at_most`), which
XLA:CPU vectorises (about 3x faster than the float-arithmetic form this code
used before, on jax 0.10), and blocks of 8-256 anchors are sized to stay in
cache (`_sub_block`). Positives need no scan of the row: a class table gathers
each anchor's own class and `lax.top_k` with a static k_p >= max w_p (~14 on
CUB) ranks it. With concrete labels the table is built on the host at the
width of the largest class. With traced labels (inside a user's jit) it is
built in the graph by one stable argsort, at the narrowest of a few static
widths that holds the largest class, picked at run time by `lax.switch`
(`_TRACED_WIDTHS`); classes wider than all of them count over the whole row.
Every path gives the same triplets, and a user's jit runs at the speed of
concrete labels. Two other selections give the same columns, `method="sort"`
(a stable sort of each row) and `method="top_k"` (`lax.top_k` with k the
widest window); `_METHOD_BY_BACKEND` names the default on each backend, and on
a GPU the blocks are as large as `_BLOCK_BYTES` allows (bench/bench_gpu.py).

`hard_triplets_from_embeddings` never builds the n x n matrix: anchors go in
blocks through a `lax.fori_loop`, each block computing its (block, n) distances
with the same code as `losses.pairwise_distances` (one matrix product) and
selecting in cache-sized sub-blocks, so memory is O(block * n) and the
triplets equal those of `hard_triplets` on the full matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtri

from fgir_jax import _backend
from fgir_jax import _validate
from fgir_jax import losses
from fgir_jax import parallel

# Bytes of distance rows that one selection block may hold. On a CPU the
# count passes then run in cache (2 MiB L2 per core here), and smaller blocks
# wait less for their slowest row (measured: 16-64 rows at n = 6,000 were
# equal, and at n = 100,000 8 rows took ~0.55x the time of 128). A GPU wants
# few, large launches instead.
_BLOCK_BYTES = {"cpu": 1 << 20, "gpu": 1 << 28}

# How the r-th closest negative (and a wide positive window) is selected:
# "count" (bracketing count passes, see `_select_rank`), "sort" (a stable
# sort of each row) or "top_k" (`lax.top_k` with k the widest window). All
# three give the same triplets; the table says which runs where by default,
# from bench/bench_gpu.py's measurements.
METHODS = ("count", "sort", "top_k")
_METHOD_BY_BACKEND = {"cpu": "count", "gpu": "count"}


# False-position steps before the selection falls back to bisection; rows
# rarely need more than 10 (measured on random and clustered embeddings).
_INTERP_STEPS = 16


# Static class-table widths tried with traced labels (the largest class picks
# one at run time); past the last, positives are counted over the whole row.
_TRACED_WIDTHS = (8, 16, 32, 64, 512)

# Widest positive window ranked by lax.top_k; wider ones by counting.
_TOP_K_LIMIT = 64


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------
def hard_triplets(key, dist, labels, beta=0.5, neg_factor=0.1, *, mesh=None, method=None):
  """Eq. 4: one hard triplet per anchor from a distance matrix.

  Args:
    key: a `jax.random.key`; the same key gives the same triplets.
    dist: (n, n) distances, smaller is closer; ranked in float32, where
      |d| < 2^-64 counts as 0 and NaN as the largest distance.
    labels: (n,) integer class ids.
    beta: hardness factor in (0, 1]; a Python number.
    neg_factor: > 0, the paper's 0.1; a Python number.
  Returns:
    triplets: (n, 3) int32 (anchor, positive, negative), row i has anchor i;
    valid: (n,) bool, False where the anchor has no positive or no negative
      (that row holds (i, i, i) so that gathers stay in range).
  Windows are w_p = max(1, floor(P_num * beta)) and
  w_n = max(1, floor(N_num * beta * neg_factor)), in float64 arithmetic.
  mesh: a `jax.sharding.Mesh` (fgir_jax.parallel.data_mesh) splits the
  anchors over its devices; the triplets are the same.
  method: None (the backend's fastest, see `METHODS`) or "count", "sort",
    "top_k": how each row's r-th element is selected; the triplets are the same.
  """
  key = _check_key(key)
  shape = _validate.check_ndim(dist, 2, "dist", "a 2-d (n, n) distance matrix")
  if shape[0] != shape[1]:
    raise ValueError(f"dist must be a square (n, n) distance matrix, got shape {shape}.")
  n = shape[0]
  if n == 0:
    raise ValueError("dist is empty; give the distances of at least one point.")
  _validate.check_labels(labels, n)
  method = _backend.choose(method, METHODS, _METHOD_BY_BACKEND)
  plan, k_pos, k_neg = _plan(labels, n, beta, neg_factor)
  block = _sub_block(n)
  return _mine(key, _as_float(dist), *plan, k_pos=k_pos, k_neg=k_neg, block=block, sub=block,
               metric=None, method=method, mesh=mesh)


def hard_triplets_from_embeddings(key, embeddings, labels, beta=0.5, neg_factor=0.1,
                                  metric="euclidean", block_size=None, *, mesh=None,
                                  method=None):
  """Eq. 4 straight from embeddings, without the (n, n) matrix: memory O(block_size * n).

  Gives the triplets of `hard_triplets(key, losses.pairwise_distances(
  embeddings, metric=metric), labels, beta, neg_factor)`: each block of
  anchors computes its distance rows with the same code. (Bitwise-equal
  distances, hence identical triplets, hold on CPU; other backends may round
  matrix products of different shapes differently, which can only swap
  near-equal distances.)

  Args:
    key: a PRNG key, as in `hard_triplets`.
    labels: (n,) int class ids, as in `hard_triplets`.
    beta: the hardness factor, as in `hard_triplets`.
    neg_factor: the negative window's factor, as in `hard_triplets`.
    embeddings: (n, d) float embeddings.
    metric: "euclidean", "sqeuclidean" or "cosine", as in
      `losses.pairwise_distances`.
    block_size: anchors per block (>= 8); each block holds a few
      (block_size, n) float32 arrays. None: 128 on a CPU (~50 MB each at
      100,000 points), about 256 MiB worth of rows on a GPU.
    mesh: as in `hard_triplets`: anchors split over the devices, embeddings
      replicated on each.
    method: as in `hard_triplets`.
  Returns:
    (triplets (n, 3) int32, valid (n,) bool), as `hard_triplets`.
  """
  key = _check_key(key)
  shape = _validate.check_ndim(embeddings, 2, "embeddings", "a 2-d (n, d) array of embeddings")
  n = shape[0]
  if n == 0:
    raise ValueError("embeddings is empty; give at least one embedding.")
  _validate.check_labels(labels, n)
  _validate.check_choice(metric, losses.METRICS, "metric")
  if block_size is None:
    block_size = 128 if _backend.backend() == "cpu" else max(8, _sub_block(n))
  if not isinstance(block_size, (int, np.integer)) or block_size < 8:
    raise ValueError(f"block_size must be an integer >= 8 or None, got {block_size!r}.")
  method = _backend.choose(method, METHODS, _METHOD_BY_BACKEND)
  plan, k_pos, k_neg = _plan(labels, n, beta, neg_factor)
  emb = losses._as_float(embeddings)  # distances in its dtype, ranked in float32
  block = min(int(block_size), n)
  return _mine(key, emb, *plan, k_pos=k_pos, k_neg=k_neg, block=block,
               sub=min(_sub_block(n), block), metric=metric, method=method, mesh=mesh)


def window_sizes(labels, beta=0.5, neg_factor=0.1):
  """Per-anchor (P_num, N_num, w_p, w_n) as NumPy int32 arrays, (n,) each.

  Host-side (labels must be concrete). P_num: same-class points other than
  the anchor; N_num: other-class points; w_p, w_n: the window sizes
  `hard_triplets` draws from (1 when the count is 0).
  """
  shape = _validate.check_ndim(labels, 1, "labels", "a 1-d array of integer class ids")
  _validate.check_labels(labels, shape[0])
  (_, n_pos, n_neg, _, wp_table, wn_table), _, _ = _plan(np.asarray(labels), shape[0], beta,
                                                        neg_factor)
  return n_pos, n_neg, wp_table[n_pos], wn_table[n_neg]


# ----------------------------------------------------------------------------
# Host-side plan: class ids, counts, class table and window lookup tables.
# ----------------------------------------------------------------------------
def _plan(labels, n, beta, neg_factor):
  """((cls, n_pos, n_neg, table, wp_table, wn_table), k_pos, k_neg) for `_mine`.

  k_neg is the widest negative window (static: the k of the "top_k" method).

  Concrete labels: dense class ids, counts and a (classes, max class size)
  member table, all from NumPy. Traced labels: the raw labels and None for the
  rest, which `_mine` then derives in the graph.
  """
  beta, neg_factor = _check_factors(beta, neg_factor)
  # Window sizes as lookup tables indexed by the count, computed in float64 on
  # the host: floor(10 * 0.7) must be 7 and float32 would give 6.
  counts = np.arange(n, dtype=np.float64)
  wp_table = np.maximum(1, np.floor(counts * beta)).astype(np.int32)
  wn_table = np.maximum(1, np.floor(counts * beta * neg_factor)).astype(np.int32)
  if not _validate.is_concrete(labels):
    # The class sizes are unknown until run time: `_mine` builds the class
    # table in the graph and picks one of these static widths for it.
    widths = tuple(w for w in _TRACED_WIDTHS if w < n)
    return ((_validate.as_int_labels(labels), None, None, None, wp_table, wn_table),
            tuple((w, int(wp_table[w - 1])) for w in widths), int(wn_table[n - 1]))
  _, cls, sizes = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
  cls = cls.reshape(-1).astype(np.int32)
  n_pos = (sizes[cls] - 1).astype(np.int32)
  n_neg = (n - sizes[cls]).astype(np.int32)
  order = np.argsort(cls, kind="stable")  # members of each class in index order
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  table = np.full((sizes.shape[0], sizes.max()), -1, np.int32)
  table[cls[order], np.arange(n) - starts[cls[order]]] = order
  k_pos = int(wp_table[n_pos.max()])  # the widest positive window, static for top_k
  k_neg = int(wn_table[n_neg.max()])
  return (cls, n_pos, n_neg, table, wp_table, wn_table), k_pos, k_neg


# ----------------------------------------------------------------------------
# The jitted miner.
# ----------------------------------------------------------------------------
def _sub_block(n):
  """Anchors per selection block, at most n: on a CPU a power of two in [8, 256].

  Fewer, larger blocks pay the per-step overhead of the selection loop less
  often, which dominates below ~2,000 points on a CPU (n = 256: 0.84 -> 0.76
  ms); on a GPU, blocks fill `_BLOCK_BYTES` (the whole matrix at CUB size)."""
  budget = _BLOCK_BYTES.get(_backend.backend(), _BLOCK_BYTES["cpu"]) // (4 * n)
  if _backend.backend() == "cpu":
    return min(1 << max(3, min(8, budget.bit_length() - 1)), n)
  return min(max(8, budget), n)


@functools.partial(jax.jit, static_argnames=("k_pos", "k_neg", "block", "sub", "metric",
                                             "method", "mesh"))
def _mine(key, source, cls, n_pos, n_neg, table, wp_table, wn_table, *, k_pos, k_neg, block, sub,
          metric, method, mesh=None):
  """source: (n, n) distances (metric None) or (n, d) embeddings (metric str)."""
  n = source.shape[0]
  if n_pos is None:  # traced labels: the class table is built here
    table, size = _traced_table(cls, k_pos)
    n_pos, n_neg = size - 1, n - size
  # Every anchor's ranks come from one draw, whatever the devices: sharding
  # cannot change the triplets.
  rank_p, rank_n = _draw_ranks(key, wp_table[n_pos], wn_table[n_neg])
  if metric is not None:
    source = losses._prepare(source, metric, center=jnp.mean(source, axis=0))
  args = (source, cls, table, (rank_p, n_pos), (rank_n, n_neg))
  static = dict(k_pos=k_pos, k_neg=k_neg, block=block, sub=sub, metric=metric, method=method)
  if parallel.size(mesh) == 1:
    pos, neg = _mine_rows(0, n, *args, **static)
  else:
    pos, neg = _mine_sharded(n, args, static, mesh)
  anchors = jnp.arange(n, dtype=jnp.int32)
  valid = (n_pos > 0) & (n_neg > 0)
  triplets = jnp.stack([anchors, jnp.where(valid, pos, anchors),
                        jnp.where(valid, neg, anchors)], axis=1)
  return triplets, valid


def _mine_sharded(n, args, static, mesh):
  """The anchors split over the mesh's devices, each with all the points (replicated)."""
  per = -(-n // parallel.size(mesh))

  def shard(args):
    # The last shard is shifted back to end at n rather than padded (rows are
    # independent, so the overlap is harmless).
    first = jnp.minimum(lax.axis_index(parallel.BATCH_AXIS) * per, n - per)
    pos, neg = _mine_rows(first, per, *args, **static)
    return pos, neg, first + jnp.arange(per, dtype=jnp.int32)

  rows = jax.sharding.PartitionSpec(parallel.BATCH_AXIS)
  pos, neg, anchor = jax.shard_map(shard, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),),
                                   out_specs=rows, check_vma=False)(args)
  zeros = jnp.zeros((n,), jnp.int32)
  return zeros.at[anchor].set(pos), zeros.at[anchor].set(neg)


def _mine_rows(first, count, source, cls, table, positives, negatives, *, k_pos, k_neg, block,
               sub, metric, method):
  """(positive, negative) columns of anchors first .. first + count - 1.

  first may be traced, count is static; positives / negatives are (rank,
  count) pairs for all n anchors.
  """
  block = min(block, count)
  sub = min(sub, block)
  if metric is None:
    def rows(start):
      return lax.dynamic_slice_in_dim(source, start, block)
  else:
    x, sq = source

    def rows(start):
      x_b = lax.dynamic_slice_in_dim(x, start, block)
      sq_b = lax.dynamic_slice_in_dim(sq, start, block)
      return losses._from_gram(sq_b, sq, x_b @ x.T, metric).astype(jnp.float32)

  def select_rows(start, local, d, out):
    """Writes the positives and negatives of anchors start .. start + len(d) at `local`."""
    take = functools.partial(lax.dynamic_slice_in_dim, start_index=start, slice_size=d.shape[0])
    pos, neg = _select_block(d, start + jnp.arange(d.shape[0]), take(cls), cls, table,
                             tuple(map(take, positives)), tuple(map(take, negatives)), k_pos,
                             k_neg, method)
    return (lax.dynamic_update_slice_in_dim(out[0], pos, local, 0),
            lax.dynamic_update_slice_in_dim(out[1], neg, local, 0))

  def one_block(b, out):
    # The last block is shifted back to end at `count` (overlapping the
    # previous one) rather than padded: rows are independent.
    local = jnp.minimum(b * block, count - block)
    start = first + local
    d = rows(start)
    if sub == block:
      return select_rows(start, local, d, out)

    # Distances come in big blocks (one efficient matrix product), selection
    # in sub-blocks whose rows stay in cache across the count passes.
    def one_sub(j, out):
      offset = jnp.minimum(j * sub, block - sub)
      return select_rows(start + offset, local + offset,
                         lax.dynamic_slice_in_dim(d, offset, sub), out)

    return lax.fori_loop(0, -(-block // sub), one_sub, out)

  zeros = jnp.zeros((count,), jnp.int32)
  return lax.fori_loop(0, -(-count // block), one_block, (zeros, zeros))


def _select_block(d, anchors, cls_rows, cls, table, positives, negatives, k_pos, k_neg, method):
  """Positive and negative index for each row of d, (b, n) distances of `anchors`.

  positives, negatives: (rank, count) pairs, (b,) each; table: the
  (classes, largest class) member table (concrete labels) or a TracedTable.
  k_neg: the widest negative window.
  """
  other = cls_rows[:, None] != cls[None, :]
  neg = _select(d, other, *negatives, method=method, k=k_neg)
  if isinstance(table, TracedTable):
    return _traced_positives(d, anchors, other, table, positives, k_pos, method), neg
  return _farthest_member(d, table[cls_rows], anchors, positives, k_pos, method), neg


def _farthest_member(d, members, anchors, positives, k_pos, method):
  """The positive of each row among `members`, (b, w) ascending ids, -1 padded.

  Only the anchor's own class, gathered; the window is small, so top_k with
  the static k_pos >= every w_p (ties: lower column first, i.e. lower id).
  """
  safe = jnp.maximum(members, 0)
  own = (members >= 0) & (members != anchors[:, None])
  # Canonical values, as `_select_rank` ranks them, so every path agrees.
  far = jnp.where(own, _canonical(jnp.take_along_axis(d, safe, axis=1)), -jnp.inf)
  if k_pos > _TOP_K_LIMIT:  # a wide window: the row's own selection method
    col = _select(-far, own, *positives, method=method, k=k_pos)[:, None]
  else:
    _, cols = lax.top_k(far, k_pos)
    col = jnp.take_along_axis(cols, positives[0][:, None], axis=1)
  return jnp.take_along_axis(safe, col, axis=1)[:, 0]


class TracedTable(NamedTuple):
  """The class table of traced labels: members of class c are order[start:start + size]."""
  order: jax.Array  # (n,) point ids sorted by class, stable (ascending within a class)
  start: jax.Array  # (n,) where each point's class begins in `order`
  width: jax.Array  # () index into the static widths: the narrowest >= the largest class


def _traced_table(labels, widths):
  """(TracedTable, class size of each point) from traced labels, in the graph.

  One stable sort: O(n log n), small beside the O(n^2) selection. widths:
  the static (width, k_pos) pairs of `_plan`; a class larger than all of them
  selects over the whole row instead (width index len(widths)).
  """
  order = jnp.argsort(labels, stable=True).astype(jnp.int32)
  ordered = labels[order]
  start = jnp.searchsorted(ordered, labels, side="left").astype(jnp.int32)
  size = jnp.searchsorted(ordered, labels, side="right").astype(jnp.int32) - start
  largest = jnp.max(size)
  width = jnp.sum(jnp.asarray([w for w, _ in widths] or [0], jnp.int32) < largest)
  return TracedTable(order, start, width.astype(jnp.int32)), size


def _traced_positives(d, anchors, other, table, positives, widths, method):
  """Positives with traced labels: `_farthest_member` at the static width that fits.

  `lax.switch` runs only the branch of the narrowest width that holds the
  largest class, so a user's jit gets the concrete-label speed; with no such
  width, counting over the whole row (same answer).
  """
  n = d.shape[1]
  start = table.start[anchors]

  def at_width(width, k_pos):
    def branch():
      j = jnp.arange(width, dtype=jnp.int32)
      # Past the class's end the ids belong to other classes, and past n
      # they are clipped repeats: both masked to -1.
      at = start[:, None] + j
      ids = table.order[jnp.minimum(at, n - 1)]
      same = ~jnp.take_along_axis(other, ids, axis=1) & (at < n)
      return _farthest_member(d, jnp.where(same, ids, -1), anchors, positives, k_pos, method)
    return branch

  def whole_row():
    own = ~other & (anchors[:, None] != jnp.arange(n)[None, :])
    # Any positive window fits in half the row (beta <= 1 of at most n - 1).
    return _select(-_canonical(d), own, *positives, method=method, k=n)

  return lax.switch(table.width, [at_width(w, k) for w, k in widths] + [whole_row])


def _draw_ranks(key, w_p, w_n):
  """Uniform ranks in [0, w) for every anchor, from one draw of the key."""
  u = jax.random.uniform(key, (2,) + w_p.shape, jnp.float32)
  # float32 rounding can push u * w up to w itself; clamp into the window.
  rank_p = jnp.minimum(jnp.floor(u[0] * w_p).astype(jnp.int32), w_p - 1)
  rank_n = jnp.minimum(jnp.floor(u[1] * w_n).astype(jnp.int32), w_n - 1)
  return rank_p, rank_n


# ----------------------------------------------------------------------------
# Exact rank selection: three ways to the same column.
# ----------------------------------------------------------------------------
def _select(values, mask, rank, count, *, method, k):
  """Column of the rank-th smallest of values[i, mask[i]] per row (see `_select_rank`).

  k: a static bound above every rank (the widest window), for "top_k".
  """
  if method == "sort":
    return _select_by_sort(values, mask, rank)
  if method == "top_k":
    return _select_by_top_k(values, mask, rank, k)
  return _select_rank(values, mask, rank, count)


def _order_keys(values, mask):
  """int32 keys in the canonical order of `_select_rank`, masked-out entries last."""
  return _to_key(jnp.where(mask, _canonical(values), jnp.inf))


def _select_by_sort(values, mask, rank):
  """A stable sort of each row's keys: equal values stay in column order."""
  keys = _order_keys(values, mask)
  columns = lax.broadcasted_iota(jnp.int32, keys.shape, 1)
  _, order = lax.sort((keys, columns), dimension=1, num_keys=1, is_stable=True)
  at = jnp.minimum(rank, keys.shape[1] - 1)[:, None]
  return jnp.take_along_axis(order, at, axis=1)[:, 0]


def _select_by_top_k(values, mask, rank, k):
  """The k smallest keys of each row by `lax.top_k` on their negation, which ranks
  equal values lower column first; k > every rank."""
  keys = _order_keys(values, mask)
  k = max(1, min(int(k), keys.shape[1]))
  _, columns = lax.top_k(-keys, k)  # keys >= -2^31 + 1: negation cannot overflow
  at = jnp.minimum(rank, k - 1)[:, None]
  return jnp.take_along_axis(columns, at, axis=1)[:, 0].astype(jnp.int32)


# ----------------------------------------------------------------------------
# Exact rank selection by counting.
#
# Values are float32 made "canonical": NaN and +-inf -> +-max float (NaN as
# the largest), |x| < 2^-64 -> +0 (so -0 == +0 and no denormals). Excluded
# entries are +inf, after every real value. Order is by value, then column.
# Keys are the order-preserving int32 image of a float (`_to_key`). The bracket
# search runs on keys, the counting and picking on floats compared with
# canonical bounds (`_float_bound`): canonical values hold no denormals, so a
# CPU that flushes them to zero compares them exactly. Compares summed as
# float32 0/1 and plain min / sum reductions are what XLA:CPU vectorises; a
# (value, column) argmin reduction measured ~10x slower than a count pass.
# ----------------------------------------------------------------------------
_TINY = 2.0 ** -64
_FMAX = float(np.finfo(np.float32).max)
_KEY_LO = -2139095040  # _to_key(-_FMAX)
_KEY_HI = 2139095039  # _to_key(_FMAX)


def _select_rank(values, mask, rank, count):
  """Column of the rank-th smallest of values[i, mask[i]] for each row i.

  values: (b, w) floats; mask: (b, w) bool; rank, count: (b,) int32 with
  count = mask.sum(1) < 2^24. Exact in the canonical float32 order (see
  above), equal values ranked by column (lower first). Rows with
  rank >= count get some in-range column.
  """
  x = jnp.where(mask, _canonical(values), jnp.inf)
  mean, std = _sample_moments(x, mask)
  total = jnp.maximum(count, 1).astype(jnp.float32)

  def z(c):  # counts on the normal-quantile scale, where a row's CDF is ~linear
    return ndtri(jnp.clip(c.astype(jnp.float32), 0.5, total - 0.5) / total)

  z_target = z(rank.astype(jnp.float32) + 0.5)
  # Invariant: c_lo == count(key < lo) <= rank < c_hi == count(key <= hi).
  lo = jnp.full_like(rank, _KEY_LO)
  hi = jnp.full_like(rank, _KEY_HI)
  c_lo = jnp.zeros_like(rank)
  state = dict(step=jnp.int32(0), lo=lo, hi=hi, c_lo=c_lo, c_hi=count,
               # c_last = count / 2 (z = 0) makes the first Newton step the mean.
               last=mean, c_last=count // 2, w_lo=jnp.ones_like(total),
               w_hi=jnp.ones_like(total), side=jnp.zeros_like(rank),
               done=_is_done(rank, count, lo, hi, c_lo, count))

  def keep_going(s):
    return (s["step"] < _INTERP_STEPS + 32) & ~jnp.all(s["done"])

  def step(s):
    lo, hi, c_lo, c_hi = s["lo"], s["hi"], s["c_lo"], s["c_hi"]
    # While an end is still open: a Newton step with the row's normal slope.
    newton = s["last"] + std * (z_target - z(s["c_last"]))
    # Both ends real values: Illinois false position between them.
    f_lo = (z_target - z(c_lo)) * s["w_lo"]
    f_hi = (z(c_hi) - z_target) * s["w_hi"]
    frac = jnp.where(f_lo + f_hi > 0, f_lo / (f_lo + f_hi), 0.5)
    lo_v, hi_v = _from_key(lo), _from_key(hi)
    closed = (lo != _KEY_LO) & (hi != _KEY_HI)
    guess = jnp.where(closed, lo_v + (hi_v - lo_v) * frac, newton)
    halfway = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
    pivot = jnp.where(s["step"] < _INTERP_STEPS, _to_key(_canonical(guess)), halfway)
    pivot = jnp.clip(pivot, lo, hi - 1)
    c = _count_at_most(x, pivot)
    above = c > rank
    # Illinois: an end kept twice in a row has its weight halved.
    w_lo = jnp.where(above, jnp.where(s["side"] < 0, s["w_lo"] * 0.5, s["w_lo"]), 1.0)
    w_hi = jnp.where(above, 1.0, jnp.where(s["side"] > 0, s["w_hi"] * 0.5, s["w_hi"]))
    new = dict(lo=jnp.where(above, lo, pivot + 1), hi=jnp.where(above, pivot, hi),
               c_lo=jnp.where(above, c_lo, c), c_hi=jnp.where(above, c, c_hi),
               last=_from_key(pivot), c_last=c,
               w_lo=w_lo, w_hi=w_hi, side=jnp.where(above, -1, 1))
    # Finished rows keep their state, so block composition cannot matter.
    new = {k: jnp.where(s["done"], s[k], v) for k, v in new.items()}
    new["done"] = s["done"] | _is_done(rank, count, new["lo"], new["hi"], new["c_lo"], new["c_hi"])
    new["step"] = s["step"] + 1
    return new

  s = lax.while_loop(keep_going, step, state)
  return _pick(x, rank, count, s["lo"], s["hi"], s["c_lo"], s["c_hi"])


def _count_at_most(x, pivot):
  """(b,) int32 count of canonical x[i] whose key is <= pivot[i]."""
  # A float32 sum of 0/1 is exact below 2^24 and vectorises best (see above).
  return jnp.sum((x <= _float_bound(pivot)[:, None]).astype(jnp.float32), axis=1).astype(jnp.int32)


def _float_bound(pivot):
  """The largest canonical float whose key is <= pivot: for canonical x,
  key(x) <= pivot exactly when x <= this float, compared as floats (no
  denormals, so flush-to-zero cannot change a comparison)."""
  f = _from_key(pivot)
  return jnp.where(pivot >= 0, jnp.where(f < _TINY, 0.0, f), jnp.where(f > -_TINY, -_TINY, f))


def _is_done(rank, count, lo, hi, c_lo, c_hi):
  return (c_lo == rank) | (c_hi == rank + 1) | (lo >= hi) | (count <= rank)


def _pick(x, rank, count, lo, hi, c_lo, c_hi):
  """The selected column once the bracket search has stopped."""
  width = x.shape[1]
  iota = jnp.arange(width, dtype=jnp.float32)[None, :]
  # c_lo == rank: the answer is the first occurrence of the smallest value
  # with key >= lo. c_hi == rank + 1: the last occurrence of the largest value
  # with key <= hi. Plain min / max and sums: XLA:CPU vectorises those, not
  # an (value, column) argmin.
  from_hi = (c_hi == rank + 1) & (c_lo != rank)
  # One min over y = x (from lo) or -x (from hi) serves both kinds of row:
  # key(x) >= lo is x > bound(lo - 1) (lo - 1 >= key(-inf)), and key(x) <= hi
  # is x <= bound(hi), i.e. -x >= -bound(hi).
  sign = jnp.where(from_hi, -1.0, 1.0)[:, None]
  bound = jnp.where(from_hi, -_float_bound(hi), _float_bound(lo - 1))[:, None]
  y = x * sign
  inside = jnp.where(from_hi[:, None], y >= bound, y > bound)
  value = jnp.min(jnp.where(inside, y, jnp.inf), axis=1)
  at = y == value[:, None]
  copies = jnp.sum(at.astype(jnp.float32), axis=1)
  col = jnp.sum(jnp.where(at, iota, 0.0), axis=1).astype(jnp.int32)  # right when copies == 1

  def first_or_last_copy(col):
    first = jnp.min(jnp.where(at, iota, width), axis=1)
    last = jnp.max(jnp.where(at, iota, -1), axis=1)
    return jnp.where(copies > 1, jnp.where(from_hi, last, first), col).astype(jnp.int32)

  col = lax.cond(jnp.any(copies > 1), first_or_last_copy, lambda col: col, col)
  # Otherwise lo == hi is a value shared by several entries around the rank:
  # take its (rank - c_lo)-th occurrence. Only ties get here.
  tied = (c_lo != rank) & (c_hi != rank + 1) & (count > rank)

  def nth_occurrence(col):
    seen = jnp.cumsum(_to_key(x) == lo[:, None], axis=1, dtype=jnp.int32)
    nth = jnp.argmax(seen > (rank - c_lo)[:, None], axis=1).astype(jnp.int32)
    return jnp.where(tied, nth, col)

  return lax.cond(jnp.any(tied), nth_occurrence, lambda col: col, col)


def _sample_moments(x, mask, size=512):
  """Mean and std of each row's masked values, from about `size` columns."""
  stride = max(1, x.shape[1] // size)
  x, m = x[:, ::stride], mask[:, ::stride]
  n = jnp.maximum(jnp.sum(m, axis=1), 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(m, x, 0.0), axis=1) / n
  var = jnp.sum(jnp.where(m, x * x, 0.0), axis=1) / n - mean * mean
  # Huge values can overflow the guess; the search is exact anyway.
  ok = jnp.isfinite(mean) & jnp.isfinite(var)
  return jnp.where(ok, mean, 0.0), jnp.where(ok, jnp.sqrt(jnp.maximum(var, 0.0)), 1.0)


def _canonical(x):
  x = jnp.clip(jnp.where(jnp.isnan(x), _FMAX, x), -_FMAX, _FMAX)
  return jnp.where(jnp.abs(x) < _TINY, 0.0, x)


def _to_key(x):
  """Order-preserving map of float32 to int32 (negative floats flipped)."""
  bits = lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(k):
  return lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k), jnp.float32)


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------
def _check_key(key):
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if getattr(key, "shape", ()) != ():
      raise ValueError(f"key must be a single jax.random.key, got shape {key.shape}.")
    return key
  if dtype == jnp.uint32 and tuple(getattr(key, "shape", ())) == (2,):
    return jax.random.wrap_key_data(key)  # a legacy jax.random.PRNGKey
  raise ValueError(f"key must be a jax.random.key(seed), got {key!r}.")


def _check_factors(beta, neg_factor):
  beta = _validate.check_unit_interval(beta, "beta")
  try:
    neg_factor = float(neg_factor)
  except (TypeError, ValueError) as e:
    raise ValueError(f"neg_factor must be a positive number, got {neg_factor!r}.") from e
  if not neg_factor > 0:
    raise ValueError(f"neg_factor must be > 0 (the paper uses 0.1), got {neg_factor}.")
  return beta, neg_factor


def _as_float(x):
  # Ranks are taken in float32 whatever the input (see `_select_rank`).
  return jnp.asarray(x).astype(jnp.float32)
