"""Hard triplet mining (Eq. 4) against a brute-force NumPy reference.

The reference sorts each anchor's positives and negatives with NumPy and
checks that every mined positive is among the w_p farthest and every negative
among the w_n closest (ties allowed), with the windows computed here from the
paper's formula. Over many keys every window position must be drawn and
nothing outside. Shapes are shared between tests to keep compiles few.
"""

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fgir_jax import losses, mining

# 48 points in classes of 1, 2, 3, 5, 8, 13 and 16 (class 0 is a singleton).
SIZES = (1, 2, 3, 5, 8, 13, 16)


def dataset(seed=0, dim=5):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(SIZES)), SIZES)
  rng.shuffle(labels)
  emb = rng.standard_normal((len(labels), dim)).astype(np.float32)
  return emb, labels


def windows(labels, beta, neg_factor):
  """(w_p, w_n) per anchor from the paper's formula, written out."""
  w_p, w_n = [], []
  for i, label in enumerate(labels):
    p_num = sum(1 for j, other in enumerate(labels) if other == label and j != i)
    n_num = sum(1 for other in labels if other != label)
    w_p.append(max(1, math.floor(p_num * beta)))
    w_n.append(max(1, math.floor(n_num * beta * neg_factor)))
  return w_p, w_n


def check_windows(dist, labels, triplets, valid, beta, neg_factor):
  """Every mined triplet is inside its Eq. 4 windows (ties allowed)."""
  dist, triplets, valid = np.asarray(dist), np.asarray(triplets), np.asarray(valid)
  w_p, w_n = windows(labels, beta, neg_factor)
  assert triplets.shape == (len(labels), 3) and triplets.dtype == np.int32
  for i, (a, p, n) in enumerate(triplets):
    assert a == i
    pos = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
    neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
    assert valid[i] == (bool(pos) and bool(neg))
    if not valid[i]:
      assert p == i and n == i  # in range for downstream gathers
      continue
    assert p in pos and n in neg
    farthest = np.sort(dist[i, pos])[::-1]
    closest = np.sort(dist[i, neg])
    assert dist[i, p] >= farthest[w_p[i] - 1], (i, "positive outside its window")
    assert dist[i, n] <= closest[w_n[i] - 1], (i, "negative outside its window")


def window_sets(dist, labels, beta, neg_factor):
  """Exact index sets of each anchor's windows (distances must be distinct)."""
  w_p, w_n = windows(labels, beta, neg_factor)
  sets = []
  for i in range(len(labels)):
    pos = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
    neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
    far = sorted(pos, key=lambda j: -dist[i, j])[:w_p[i]]
    near = sorted(neg, key=lambda j: dist[i, j])[:w_n[i]]
    sets.append((set(far), set(near)))
  return sets


# --------------------------------------------------------------------------
# Correctness against the reference.

@pytest.mark.parametrize("beta,neg_factor", [(0.5, 0.5), (1.0, 1.0)])
def test_triplets_lie_in_their_windows(beta, neg_factor):
  emb, labels = dataset()
  dist = losses.pairwise_distances(emb)
  for seed in range(3):
    triplets, valid = mining.hard_triplets(jax.random.key(seed), dist, labels, beta, neg_factor)
    check_windows(dist, labels, triplets, valid, beta, neg_factor)


def test_every_window_position_is_drawn_and_nothing_else():
  emb, labels = dataset()
  dist = np.asarray(losses.pairwise_distances(emb))
  sets = window_sets(dist, labels, 0.5, 0.5)
  hits = [({}, {}) for _ in labels]
  draws = 300
  for seed in range(draws):
    triplets, valid = mining.hard_triplets(jax.random.key(seed), dist, labels, 0.5, 0.5)
    for i, (_, p, n) in enumerate(np.asarray(triplets)):
      if valid[i]:
        hits[i][0][p] = hits[i][0].get(p, 0) + 1
        hits[i][1][n] = hits[i][1].get(n, 0) + 1
  for i, ((far, near), (got_p, got_n)) in enumerate(zip(sets, hits)):
    if labels.tolist().count(labels[i]) == 1:
      continue  # singleton: no triplet
    assert set(got_p) == far and set(got_n) == near, i
    # Uniform within the window: each position near draws / w (loose, ~5 sigma).
    for got in (got_p, got_n):
      expected = draws / len(got)
      assert all(abs(c - expected) <= 5 * math.sqrt(expected) + 1 for c in got.values()), i


def test_small_classes_have_exact_windows():
  # Classes of 1, 2 and 3 with beta = 1, neg_factor = 1: the windows are all
  # positives and all negatives; with beta = 0.5 the class of 3 has w_p = 1.
  dist = np.array(losses.pairwise_distances(np.arange(6.0)[:, None] ** 1.5))
  labels = np.array([0, 1, 1, 2, 2, 2])
  for beta, neg_factor in [(1.0, 1.0), (0.5, 1.0)]:
    sets = window_sets(dist, labels, beta, neg_factor)
    seen = [(set(), set()) for _ in labels]
    for seed in range(120):
      triplets, valid = mining.hard_triplets(jax.random.key(seed), dist, labels, beta, neg_factor)
      assert np.asarray(valid).tolist() == [False, True, True, True, True, True]
      for i, (_, p, n) in enumerate(np.asarray(triplets)[1:], start=1):
        seen[i][0].add(p)
        seen[i][1].add(n)
    assert seen[1:] == sets[1:]


def test_same_key_same_triplets_other_key_other_triplets():
  emb, labels = dataset()
  dist = losses.pairwise_distances(emb)
  first = mining.hard_triplets(jax.random.key(7), dist, labels, 0.5, 0.5)
  again = mining.hard_triplets(jax.random.key(7), dist, labels, 0.5, 0.5)
  other = mining.hard_triplets(jax.random.key(8), dist, labels, 0.5, 0.5)
  assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


def test_traced_labels_give_the_same_triplets_also_with_ties():
  # Under a user's jit the labels are tracers: no host-side class table. The
  # selection is exact, so the answer must not change; all-equal distances
  # make every choice a tie (broken by index the same way on both paths).
  emb, labels = dataset()
  mine = jax.jit(lambda k, d, l: mining.hard_triplets(k, d, l, 0.5, 0.5))
  for dist in (losses.pairwise_distances(emb), jnp.zeros((len(labels),) * 2)):
    for seed in range(2):
      key = jax.random.key(seed)
      eager = mining.hard_triplets(key, dist, labels, 0.5, 0.5)
      traced = mine(key, dist, jnp.asarray(labels))
      assert np.array_equal(eager[0], traced[0]) and np.array_equal(eager[1], traced[1])
  check_windows(np.zeros((48, 48)), labels, *eager, 0.5, 0.5)


def sized_labels(largest, n=80, seed=0):
  """n labels whose largest class (the highest label, sorted last) has `largest` points."""
  rng = np.random.default_rng(seed)
  rest = np.arange(n - largest) % max(1, (n - largest) // 4)
  labels = np.concatenate([rest, np.full(largest, rest.max() + 1)])
  rng.shuffle(labels)
  return labels


@pytest.mark.parametrize("top_k_limit,sizes", [(64, (5, 30, 75)), (1, (12,))])
def test_traced_labels_pick_every_table_width(monkeypatch, top_k_limit, sizes):
  # With traced labels the class table is built in the graph at one of a few
  # static widths, chosen at run time by the largest class; past them the
  # whole row is counted. Every width (and the fallback) gives the triplets of
  # the concrete-label path and of the reference. The largest class sorts
  # last, where the table's reads run past n. top_k_limit 1: windows ranked
  # by counting instead of top_k.
  monkeypatch.setattr(mining, "_TOP_K_LIMIT", top_k_limit)
  n = 80 + (top_k_limit == 1)  # another shape: no compiled program is reused
  mine = jax.jit(lambda k, d, l: mining.hard_triplets(k, d, l))
  for largest in sizes:  # widths 8 / 32 (16 and 64 are the same code), 16, whole row (n < 512)
    labels = sized_labels(largest, n)
    emb = np.random.default_rng(largest).standard_normal((n, 6)).astype(np.float32)
    dist = losses.pairwise_distances(emb)
    key = jax.random.key(largest)
    eager = mining.hard_triplets(key, dist, labels)
    traced = mine(key, dist, jnp.asarray(labels))
    assert np.array_equal(eager[0], traced[0]) and np.array_equal(eager[1], traced[1]), largest
    sets = window_sets(np.asarray(dist), labels, 0.5, 0.1)
    for i, (_, p, q) in enumerate(np.asarray(traced[0])):
      assert p in sets[i][0] and q in sets[i][1], (largest, i)


# --------------------------------------------------------------------------
# vmap over independent problems.

def test_miner_vmaps_over_code_lengths_keys_and_labels():
  # Several code lengths at once: shorter codes padded with zeros to the
  # longest (zeros change no distance), one distance matrix per length.
  emb, labels = dataset(seed=5, dim=8)
  codes = np.stack([np.where(np.arange(8) < bits, emb, 0.0) for bits in (2, 4, 8)])
  dists = jax.vmap(losses.pairwise_distances)(codes)
  keys = jax.random.split(jax.random.key(1), 3)
  batched = jax.jit(jax.vmap(lambda k, d: mining.hard_triplets(k, d, labels, 0.5, 0.5)))(keys,
                                                                                       dists)
  per_labels = np.stack([np.roll(labels, s) for s in range(3)])
  traced = jax.jit(jax.vmap(lambda k, d, l: mining.hard_triplets(k, d, l, 0.5, 0.5)))(
      keys, dists, per_labels)
  blocked = jax.vmap(lambda k, e: mining.hard_triplets_from_embeddings(
      k, e, labels, 0.5, 0.5, block_size=16))(keys, codes)
  for j in range(3):
    alone = mining.hard_triplets(keys[j], dists[j], labels, 0.5, 0.5)
    for got in (batched, blocked):
      assert np.array_equal(got[0][j], alone[0]) and np.array_equal(got[1][j], alone[1]), j
    alone = mining.hard_triplets(keys[j], dists[j], per_labels[j], 0.5, 0.5)
    assert np.array_equal(traced[0][j], alone[0]) and np.array_equal(traced[1][j], alone[1]), j
    check_windows(dists[j], per_labels[j], traced[0][j], traced[1][j], 0.5, 0.5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_chunked_mining_equals_mining_the_full_matrix(metric):
  emb, labels = dataset(seed=1)
  key = jax.random.key(3)
  full = mining.hard_triplets(key, losses.pairwise_distances(emb, metric=metric), labels, 0.5, 0.5)
  for block in (10, 48):  # 48 = 4 * 10 + 8: the last block is a partial one
    chunked = mining.hard_triplets_from_embeddings(key, emb, labels, 0.5, 0.5, metric=metric,
                                                   block_size=block)
    assert np.array_equal(full[0], chunked[0]) and np.array_equal(full[1], chunked[1])


def test_block_sizes_do_not_change_the_triplets(monkeypatch):
  # Selection sub-blocks are sized for the CPU cache and only split anchors
  # below ~4,000 points at the default size; shrink that budget so that here,
  # too, distance blocks of 20 rows are selected 8 rows at a time.
  emb, labels = dataset(seed=2)
  key = jax.random.key(4)
  full = mining.hard_triplets(key, losses.pairwise_distances(emb), labels, 0.5, 0.5)
  monkeypatch.setitem(mining._BLOCK_BYTES, "cpu", 1)
  assert mining._sub_block(len(labels)) == 8
  for result in (mining.hard_triplets(key, losses.pairwise_distances(emb), labels, 0.5, 0.5),
                 mining.hard_triplets_from_embeddings(key, emb, labels, 0.5, 0.5, block_size=20)):
    assert np.array_equal(full[0], result[0]) and np.array_equal(full[1], result[1])


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_every_method_and_backend_block_gives_the_same_triplets(monkeypatch, backend):
  # The library picks a selection method and block size per backend; every
  # combination must mine the triplets of the CPU default: concrete and traced
  # labels, from the matrix and from embeddings, wide positive windows
  # (_TOP_K_LIMIT 1) and the traced whole-row fallback (a class wider than
  # every static table width) included. "gpu" forces the GPU's block sizes here.
  emb, labels = dataset(seed=6)
  wide = sized_labels(20, n=48)  # > _TRACED_WIDTHS[-1] once those are cut to 16
  key = jax.random.key(9)
  dist = losses.pairwise_distances(emb)
  expected = [mining.hard_triplets(key, dist, lab, 0.5, 0.5) for lab in (labels, wide)]
  monkeypatch.setattr(mining._backend, "backend", lambda: backend)
  monkeypatch.setattr(mining, "_TOP_K_LIMIT", 1)
  monkeypatch.setattr(mining, "_TRACED_WIDTHS", (8, 16))
  for method in mining.METHODS:
    for lab, want in zip((labels, wide), expected):
      traced = jax.jit(lambda k, d, l, m=method: mining.hard_triplets(k, d, l, 0.5, 0.5, method=m))
      for got in (mining.hard_triplets(key, dist, lab, 0.5, 0.5, method=method),
                  mining.hard_triplets_from_embeddings(key, emb, lab, 0.5, 0.5, method=method),
                  traced(key, dist, jnp.asarray(lab))):
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), method


@pytest.mark.parametrize("method", mining.METHODS)
def test_select_rank_is_exact_with_ties(method):
  # The core of the miner: the rank-th smallest masked entry of each row,
  # equal values ordered by column, against a stable NumPy sort; by counting,
  # sorting and top_k alike.
  rng = np.random.default_rng(0)
  values = rng.integers(-3, 4, (40, 300)).astype(np.float32) * 0.25  # many ties, signs
  values[:5] = rng.standard_normal((5, 300)) * 1e3  # wide and distinct
  values[5, :] = 0.0
  values[6, ::2] = -0.0  # -0 and +0 are equal
  mask = rng.random((40, 300)) < 0.8
  count = mask.sum(1)
  rank = (rng.random(40) * count).astype(np.int32)
  values[7, :3] = [np.nan, np.inf, -np.inf]  # NaN ranks as the largest value
  select = functools.partial(mining._select, method=method, k=int(rank.max()) + 1)
  got = jax.jit(select)(values, mask, rank, count.astype(np.int32))
  for i in range(40):
    cols = np.flatnonzero(mask[i])
    row = np.nan_to_num(values[i, cols], nan=np.finfo(np.float32).max)
    order = cols[np.argsort(row, kind="stable")]
    assert got[i] == order[rank[i]], i


# --------------------------------------------------------------------------
# Edge cases.

def test_one_class_and_one_point_yield_no_valid_triplet():
  for n in (1, 5):
    emb = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
    triplets, valid = mining.hard_triplets(jax.random.key(0), losses.pairwise_distances(emb),
                                           np.zeros(n, int))
    assert not np.asarray(valid).any()
    assert np.array_equal(triplets, np.repeat(np.arange(n), 3).reshape(n, 3))
  triplets, valid = mining.hard_triplets_from_embeddings(jax.random.key(0), emb, np.zeros(5, int))
  assert not np.asarray(valid).any()


def test_window_sizes_follow_the_formula():
  _, labels = dataset()
  for beta, neg_factor in [(0.5, 0.1), (0.7, 1.0)]:
    n_pos, n_neg, w_p, w_n = mining.window_sizes(labels, beta, neg_factor)
    want_p, want_n = windows(labels, beta, neg_factor)
    assert w_p.tolist() == want_p and w_n.tolist() == want_n
    assert (n_pos + n_neg + 1 == len(labels)).all()
  # floor(10 * 0.7) is 7 (float64), where float32 arithmetic would give 6.
  assert mining.window_sizes(np.repeat([0, 1], [11, 1]), 0.7)[2][0] == 7


# --------------------------------------------------------------------------
# Argument errors.

def test_argument_errors():
  emb, labels = dataset()
  dist = np.zeros((48, 48), np.float32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"dist must be a square \(n, n\)"):
    mining.hard_triplets(key, dist[:, :40], labels)
  with pytest.raises(ValueError, match=r"dist must be a 2-d"):
    mining.hard_triplets(key, dist[0], labels)
  with pytest.raises(ValueError, match=r"dist is empty"):
    mining.hard_triplets(key, np.zeros((0, 0)), np.zeros(0, int))
  with pytest.raises(ValueError, match=r"labels has 40 entries but there are 48 rows"):
    mining.hard_triplets(key, dist, labels[:40])
  with pytest.raises(ValueError, match=r"labels must hold integer class ids"):
    mining.hard_triplets(key, dist, labels + 0.5)
  with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
    mining.hard_triplets(key, dist, labels, beta=0.0)
  with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
    mining.hard_triplets(key, dist, labels, beta=1.5)
  with pytest.raises(ValueError, match=r"neg_factor must be > 0"):
    mining.hard_triplets(key, dist, labels, neg_factor=0.0)
  with pytest.raises(ValueError, match=r"key must be a jax.random.key"):
    mining.hard_triplets(0, dist, labels)
  with pytest.raises(ValueError, match=r"metric must be one of"):
    mining.hard_triplets_from_embeddings(key, emb, labels, metric="l1")
  with pytest.raises(ValueError, match=r"block_size must be an integer >= 8"):
    mining.hard_triplets_from_embeddings(key, emb, labels, block_size=4)
  with pytest.raises(ValueError, match=r"embeddings must be a 2-d"):
    mining.hard_triplets_from_embeddings(key, emb[0], labels)
  with pytest.raises(ValueError, match=r"method must be one of 'count', 'sort', 'top_k'"):
    mining.hard_triplets(key, dist, labels, method="bisect")
