"""Tests for fgir_jax.metrics (and the code formats of fgir_jax.codes).

Every retrieval number is checked against a brute-force NumPy reference
written here: a stable sort by (distance, database index) and the textbook AP
for ties="stable"; for ties="average", the mean over every order of every tie
group (exhaustive enumeration on tiny inputs) and an exact rational
computation on larger ones.
"""

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fgir_jax import codes as codes_lib
from fgir_jax import metrics

# ----------------------------------------------------------------------------
# Brute-force references.
# ----------------------------------------------------------------------------


def hamming_np(q_bits, db_bits):
  return (q_bits[:, None, :] != db_bits[None, :, :]).sum(-1)


def textbook_ap(rel, topk=None):
  """AP of rankings given as (..., n) relevance flags in rank order."""
  rel = rel[..., :topk] if topk else rel
  hits = np.cumsum(rel, -1)
  precision = hits / np.arange(1, rel.shape[-1] + 1)
  count = rel.sum(-1)
  return np.where(count > 0, (precision * rel).sum(-1) / np.maximum(count, 1), 0.0)


def stable_order(d_row):
  return np.lexsort((np.arange(len(d_row)), d_row))  # distance, then database index


def all_tie_orders(d_row):
  """(orders, n): every ranking that some order of the tie groups gives."""
  groups = [np.flatnonzero(d_row == v) for v in np.unique(d_row)]
  perms = itertools.product(*(itertools.permutations(g) for g in groups))
  return np.array([np.concatenate(p) for p in perms])


def reference(q_bits, q_labels, db_bits, db_labels, score, ties):
  """Per-query score(rel flags in rank order, orders x n) averaged over tie orders."""
  d = hamming_np(q_bits, db_bits)
  out = []
  for i in range(len(q_bits)):
    rel = db_labels == q_labels[i]
    if not rel.any():
      out.append(np.nan)
      continue
    orders = stable_order(d[i])[None] if ties == "stable" else all_tie_orders(d[i])
    out.append(score(rel[orders]).mean())
  return np.array(out)


def ref_aps(q, ql, db, dl, topk=None, ties="stable"):
  return reference(q, ql, db, dl, functools.partial(textbook_ap, topk=topk), ties)


def ref_precisions(q, ql, db, dl, k, ties="stable"):
  k = min(k, db.shape[0])
  return reference(q, ql, db, dl, lambda rel: rel[..., :k].sum(-1) / k, ties)


def exact_tie_aware_ap(d_row, rel_row, topk=None):
  """Tie-aware AP (@topk) in exact rationals, by the definition.

  Group sums use the per-position expectation; a group cut by topk is
  averaged over the hypergeometric count X of its relevant items kept.
  """
  def group_sum(before, rel_before, n, r):
    a = Fraction(r - 1, n - 1) if n > 1 else Fraction(0)
    return sum(Fraction(r, n) * (rel_before + 1 + (j - 1) * a) / (before + j)
               for j in range(1, n + 1))

  before = rel_before = 0
  total = Fraction(0)
  for v in np.unique(d_row):
    n, r = int((d_row == v).sum()), int(rel_row[d_row == v].sum())
    if topk is not None and before >= topk:
      break
    if topk is None or before + n <= topk:
      total += group_sum(before, rel_before, n, r) if r else 0
      before, rel_before = before + n, rel_before + r
      continue
    m, expected = topk - before, Fraction(0)
    for x in range(max(0, m - (n - r)), min(r, m) + 1):
      p = Fraction(math.comb(r, x) * math.comb(n - r, m - x), math.comb(n, m))
      kept = total + (group_sum(before, rel_before, m, x) if x else 0)
      expected += p * (kept / (rel_before + x) if rel_before + x else 0)
    return float(expected)
  return float(total / rel_before) if rel_before else 0.0


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------


def random_problem(seed, n_q, n_db, bits, classes):
  rng = np.random.default_rng(seed)
  q = rng.integers(0, 2, (n_q, bits)).astype(bool)
  db = rng.integers(0, 2, (n_db, bits)).astype(bool)
  return q, rng.integers(0, classes, n_q), db, rng.integers(0, classes, n_db)


def in_format(bits, fmt):
  """Bool (n, bits) codes in one of the accepted formats."""
  return {"01": bits.astype(np.int32), "u8": bits.astype(np.uint8), "bool": bits,
          "pm1": np.where(bits, 1.0, -1.0).astype(np.float32),
          "packed": np.packbits(bits, axis=1)}[fmt]


# Tiny problems where ties abound and every tie order can be enumerated.
TINY = random_problem(0, n_q=8, n_db=7, bits=3, classes=3)
SMALL = random_problem(1, n_q=23, n_db=300, bits=8, classes=5)


# ----------------------------------------------------------------------------
# Values against the references.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ties", ["stable", "average"])
@pytest.mark.parametrize("topk", [None, 1, 3, 5, 100])
def test_average_precisions_match_bruteforce_on_tiny_tied_data(ties, topk):
  q, ql, db, dl = TINY
  got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties=ties)
  np.testing.assert_allclose(got, ref_aps(q, ql, db, dl, topk, ties), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("topk", [None, 10, 299])
def test_stable_matches_sorted_ranking_with_many_blocks(topk):
  # 300 items of 5 classes: the database is split into many blocks, so the
  # rank counts of every block path are exercised.
  q, ql, db, dl = SMALL
  got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties="stable")
  np.testing.assert_allclose(got, ref_aps(q, ql, db, dl, topk), rtol=1e-12)
  assert got.shape == (23,) and not np.isnan(got).any()


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_every_method_and_backend_chunking_match_the_references(monkeypatch, backend):
  # mAP and precision@k run by scatter-add histograms or from sorted keys, in
  # CPU- or GPU-sized chunks, whichever the backend's table picks; every
  # combination gives the references' values ("gpu" forces its chunking here).
  monkeypatch.setattr(metrics._backend, "backend", lambda: backend)
  tied = random_problem(3, n_q=6, n_db=200, bits=2, classes=3)  # groups of ~50: exact rationals
  d = hamming_np(tied[0], tied[2])
  for method in metrics.METHODS:
    for topk in (None, 5, 120):
      for ties, (q, ql, db, dl) in (("average", TINY), ("stable", TINY), ("stable", SMALL)):
        got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties=ties, method=method)
        np.testing.assert_allclose(got, ref_aps(q, ql, db, dl, topk, ties), rtol=1e-12,
                                   atol=1e-12, err_msg=f"{method} {ties} {topk}")
        got = metrics.precision_at_k(q, ql, db, dl, k=7, ties=ties, method=method)
        np.testing.assert_allclose(got, np.nanmean(ref_precisions(q, ql, db, dl, 7, ties)),
                                   rtol=1e-12)
      got = metrics.average_precisions(*tied, topk=topk, ties="average", method=method)
      want = [exact_tie_aware_ap(d[i], tied[3] == tied[1][i], topk) for i in range(6)]
      np.testing.assert_allclose(got, want, rtol=1e-9)


def test_sort_method_with_two_sort_keys(monkeypatch):
  # Long codes over a big database do not fit (distance, index) in one int32
  # key; the sort method then sorts the two as a pair, with the same ranks.
  q, ql, db, dl = SMALL
  want = metrics.average_precisions(q, ql, db, dl, method="scatter")
  monkeypatch.setattr(metrics, "_ONE_KEY_LIMIT", 1)
  got = metrics.average_precisions(q, ql, db, dl, method="sort", chunk_size=5)
  np.testing.assert_allclose(got, want, rtol=1e-14)


@pytest.mark.parametrize("topk", [None, 37, 120])
def test_large_tie_groups(topk):
  # 2-bit codes: 3 groups of ~100 items, beyond enumeration; "average" is
  # checked against exact rationals, also when the top-k cut falls inside a
  # group, and "stable" against the sorted ranking.
  q, ql, db, dl = random_problem(2, n_q=4, n_db=300, bits=2, classes=4)
  got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties="average")
  d = hamming_np(q, db)
  want = [exact_tie_aware_ap(d[i], dl == ql[i], topk) for i in range(len(q))]
  np.testing.assert_allclose(got, want, rtol=1e-10)
  got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties="stable")
  np.testing.assert_allclose(got, ref_aps(q, ql, db, dl, topk), rtol=1e-12)


@pytest.mark.parametrize("ties", ["stable", "average"])
def test_every_item_relevant_gives_ap_one(ties):
  # One class: every query's relevant set is the whole database (the largest
  # possible relevant set), and any ranking is perfect.
  q, _, db, _ = random_problem(5, n_q=6, n_db=200, bits=16, classes=1)
  ql, dl = np.zeros(6, int), np.zeros(200, int)
  np.testing.assert_allclose(metrics.average_precisions(q, ql, db, dl, ties=ties), 1.0, rtol=1e-12)
  assert metrics.precision_at_k(q, ql, db, dl, k=50, ties=ties) == pytest.approx(1.0)


def test_mean_average_precision_is_the_mean_of_average_precisions():
  q, ql, db, dl = SMALL
  for ties in metrics.TIES:
    m = metrics.mean_average_precision(q, ql, db, dl, ties=ties)
    assert isinstance(m, float)
    aps = metrics.average_precisions(q, ql, db, dl, ties=ties)
    assert m == pytest.approx(np.mean(aps), rel=1e-12)
    assert metrics.mean_over_queries(aps) == m


def test_mean_over_queries_leaves_out_queries_without_relevant_items():
  assert metrics.mean_over_queries([0.5, np.nan, 1.0, np.nan]) == pytest.approx(0.75)
  assert np.isnan(metrics.mean_over_queries([np.nan, np.nan]))


def test_stable_follows_database_order_inside_a_tie():
  db = np.array([[1, 1], [1, 1]])
  q = np.array([[1, 1]])
  # The relevant item second in the database is ranked second: AP = 1/2.
  assert metrics.mean_average_precision(q, [0], db, [1, 0]) == pytest.approx(0.5)
  assert metrics.mean_average_precision(q, [0], db, [0, 1]) == pytest.approx(1.0)
  # Tie-aware: the mean of both orders.
  assert metrics.mean_average_precision(q, [0], db, [1, 0], ties="average") == pytest.approx(0.75)


def test_all_equal_distances():
  # Every database code identical: the ranking is one tie group of 8.
  rng = np.random.default_rng(3)
  db = np.ones((8, 16), np.int32)
  q = rng.integers(0, 2, (5, 16))
  ql, dl = rng.integers(0, 3, 5), rng.integers(0, 3, 8)
  for ties in metrics.TIES:
    for topk in (None, 3):
      got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties=ties)
      want = ref_aps(q.astype(bool), ql, db.astype(bool), dl, topk, ties)
      np.testing.assert_allclose(got, want, rtol=1e-12)
  # Stable: the plain database order.
  got = metrics.average_precisions(q, ql, db, dl)
  np.testing.assert_allclose(got, [textbook_ap(dl == c) if (dl == c).any() else np.nan for c in ql])


def test_average_equals_stable_without_ties():
  # Database codes at distances 0..8 from the query, all different.
  db = np.tril(np.ones((9, 8), np.int32), -1)[::-1]
  q = np.zeros((1, 8), np.int32)
  labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0])
  for topk in (None, 4):
    a = metrics.mean_average_precision(q, [1], db, labels, topk=topk, ties="stable")
    b = metrics.mean_average_precision(q, [1], db, labels, topk=topk, ties="average")
    assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("ties", ["stable", "average"])
@pytest.mark.parametrize("k", [1, 4, 7, 50])
def test_precision_at_k_matches_bruteforce(ties, k):
  q, ql, db, dl = TINY
  got = metrics.precision_at_k(q, ql, db, dl, k=k, ties=ties)
  assert isinstance(got, float)
  assert got == pytest.approx(np.nanmean(ref_precisions(q, ql, db, dl, k, ties)), rel=1e-12)


def test_precision_at_k_on_larger_data():
  q, ql, db, dl = SMALL
  for k in (1, 25):
    got = metrics.precision_at_k(q, ql, db, dl, k=k)
    assert got == pytest.approx(np.nanmean(ref_precisions(q, ql, db, dl, k)), rel=1e-12)


# ----------------------------------------------------------------------------
# Formats, lengths and chunking.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [12, 24, 64])
def test_all_code_formats_give_identical_results(bits):
  q, ql, db, dl = random_problem(bits, n_q=9, n_db=40, bits=bits, classes=4)
  for ties in metrics.TIES:
    want = ref_aps(q, ql, db, dl, ties="stable") if ties == "stable" else None
    results = []
    for q_fmt, db_fmt in [("01", "01"), ("pm1", "pm1"), ("bool", "bool"), ("u8", "u8"),
                          ("packed", "packed"), ("pm1", "packed"), ("packed", "01"),
                          ("u8", "packed")]:
      results.append(metrics.average_precisions(in_format(q, q_fmt), ql, in_format(db, db_fmt), dl,
                                                 topk=10, ties=ties))
    for r in results[1:]:
      np.testing.assert_array_equal(r, results[0])
    if want is not None:
      np.testing.assert_allclose(metrics.average_precisions(q, ql, db, dl), want, rtol=1e-12)


def test_packed_bytes_of_only_zeros_and_ones():
  # Packed codes whose bytes happen to be 0 or 1 look like unpacked bits; the
  # other array's length tells them apart, and the distances agree either way.
  q, ql, db, dl = random_problem(6, n_q=5, n_db=30, bits=64, classes=3)
  q[:, np.arange(64) % 8 != 7] = False  # only the lowest bit of each byte
  packed_q = np.packbits(q, axis=1)
  assert packed_q.max() == 1
  want = ref_aps(q, ql, db, dl)
  for db_fmt in ("pm1", "packed", "u8"):
    got = metrics.average_precisions(packed_q, ql, in_format(db, db_fmt), dl)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_packed_padding_bits_do_not_change_distances():
  # 12-bit codes packed into 2 bytes: the 4 zero padding bits are equal in
  # queries and database, so the distances are the 12-bit ones.
  q, _, db, _ = random_problem(4, n_q=5, n_db=6, bits=12, classes=2)
  qb, dbb, nbytes = codes_lib.pack_pair(np.packbits(q, axis=1), db)
  d = codes_lib.hamming_distances(codes_lib.as_words(qb), codes_lib.as_words(dbb))
  assert nbytes == 2
  np.testing.assert_array_equal(np.asarray(d), hamming_np(q, db))


@pytest.mark.parametrize("ties", ["stable", "average"])
def test_chunk_boundaries_do_not_change_results(ties):
  q, ql, db, dl = SMALL  # 23 queries: no chunk size below divides it
  want = metrics.average_precisions(q, ql, db, dl, topk=20, ties=ties, chunk_size=23)
  for chunk in (1, 4, 7, 64):
    got = metrics.average_precisions(q, ql, db, dl, topk=20, ties=ties, chunk_size=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-14)  # float64 sums may reassociate


def test_numpy_and_jax_inputs_agree():
  q, ql, db, dl = SMALL
  for ties in metrics.TIES:
    a = metrics.mean_average_precision(q, ql, db, dl, ties=ties)
    b = metrics.mean_average_precision(*map(jnp.asarray, (q, ql, db, dl)), ties=ties)
    c = metrics.mean_average_precision(q.tolist(), ql.tolist(), db.tolist(), dl.tolist(), ties=ties)
    assert a == b == c


def test_labels_are_compared_by_value_not_position():
  # Arbitrary, negative and whole-number float labels are class ids like any other.
  q, ql, db, dl = SMALL
  want = metrics.mean_average_precision(q, ql, db, dl)
  assert metrics.mean_average_precision(q, ql * 7 - 3, db, dl * 7 - 3) == want
  assert metrics.mean_average_precision(q, ql.astype(float), db, dl.astype(np.float32)) == want


# ----------------------------------------------------------------------------
# Queries without relevant items, top-k corner cases.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ties", ["stable", "average"])
def test_queries_without_relevant_items_are_left_out(ties):
  q, ql, db, dl = TINY
  ql = ql.copy()
  ql[[1, 4]] = 99  # no database item has label 99 (nor 0, the label of query 3)
  aps = metrics.average_precisions(q, ql, db, dl, ties=ties)
  np.testing.assert_array_equal(np.isnan(aps), ~np.isin(ql, dl))
  assert np.isnan(aps).sum() == 3
  assert metrics.mean_average_precision(q, ql, db, dl, ties=ties) == pytest.approx(np.nanmean(aps))
  assert metrics.precision_at_k(q, ql, db, dl, k=3, ties=ties) == pytest.approx(
      np.nanmean(ref_precisions(q, ql, db, dl, 3, ties)))


def test_no_relevant_item_anywhere_gives_nan():
  q, _, db, dl = TINY
  assert math.isnan(metrics.mean_average_precision(q, np.full(8, 99), db, dl))
  assert math.isnan(metrics.mean_average_precision(q, np.full(8, 99), db, dl, ties="average"))


@pytest.mark.parametrize("ties", ["stable", "average"])
def test_relevant_items_outside_top_k_score_zero_and_count(ties):
  db = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
  dl = np.array([1, 1, 0])
  q = np.zeros((2, 4), np.int32)
  ql = np.array([0, 1])  # query 0's only relevant item is the farthest
  aps = metrics.average_precisions(q, ql, db, dl, topk=2, ties=ties)
  np.testing.assert_allclose(aps, [0.0, 1.0])
  assert metrics.mean_average_precision(q, ql, db, dl, topk=2, ties=ties) == pytest.approx(0.5)


@pytest.mark.parametrize("ties", ["stable", "average"])
def test_topk_at_or_above_database_size_equals_full_ranking(ties):
  q, ql, db, dl = TINY
  full = metrics.average_precisions(q, ql, db, dl, ties=ties)
  for topk in (7, 8, 10**9):
    got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties=ties)
    np.testing.assert_array_equal(got, full)
  assert metrics.precision_at_k(q, ql, db, dl, k=100, ties=ties) == pytest.approx(
      metrics.precision_at_k(q, ql, db, dl, k=7, ties=ties))


# ----------------------------------------------------------------------------
# accuracy.
# ----------------------------------------------------------------------------


def test_accuracy_from_logits_and_predictions():
  logits = np.array([[0.1, 2.0, 0.3], [1.0, 0.0, -1.0], [0.0, 0.0, 5.0], [3.0, 3.0, 0.0]])
  labels = np.array([1, 0, 1, 1])
  # Row 3 ties: argmax takes the first maximum (class 0), so it is wrong.
  assert metrics.accuracy(logits, labels) == pytest.approx(0.5)
  assert metrics.accuracy(np.array([1, 0, 2, 1]), labels) == pytest.approx(0.75)
  assert isinstance(metrics.accuracy(jnp.asarray(logits), jnp.asarray(labels)), float)


def test_accuracy_under_jit():
  logits = jnp.array([[0.0, 1.0], [2.0, 1.0], [0.5, 0.6]])
  labels = jnp.array([1, 1, 1])
  out = jax.jit(metrics.accuracy)(logits, labels)
  assert out.dtype == jnp.float32 and float(out) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------
# Error messages.
# ----------------------------------------------------------------------------


def _args():
  q, ql, db, dl = TINY
  return dict(q_codes=q, q_labels=ql, db_codes=db, db_labels=dl)


@pytest.mark.parametrize("change, match", [
    (dict(q_codes=np.zeros(3)), r"q_codes must be a 2-d array"),
    (dict(db_codes=np.zeros((2, 3, 4))), r"db_codes must be a 2-d array"),
    (dict(db_codes=np.zeros((7, 4), np.int32)),
     r"q_codes has 3 bits but db_codes has 4; .*same code length"),
    (dict(db_codes=np.full((7, 2), 255, np.uint8)),
     r"q_codes has 3 bits but db_codes has 2 packed bytes"),
    (dict(q_labels=np.zeros(5, int)), r"q_labels has 5 entries but there are 8 query codes"),
    (dict(db_labels=np.zeros(3, int)), r"db_labels has 3 entries but there are 7 database codes"),
    (dict(q_labels=np.full(8, 0.5)), r"q_labels must hold integer class ids"),
    (dict(db_labels=np.zeros((7, 1), int)), r"db_labels must be a 1-d array"),
    (dict(q_codes=np.full((8, 3), 0.3)),
     r"q_codes must hold binary codes in \{0, 1\} or \{-1, \+1\}"),
    (dict(db_codes=np.array([[0, -1, 1]] * 7)), r"db_codes mixes 0 and -1"),
    (dict(q_codes=np.zeros((0, 3))), r"q_codes is empty"),
    (dict(ties="random"), r"ties must be one of 'stable', 'average', got 'random'"),
    (dict(method="radix"), r"method must be one of 'scatter', 'sort', got 'radix'"),
    (dict(topk=0), r"topk must be None or a positive integer, got 0"),
    (dict(topk=2.5), r"topk must be None or a positive integer"),
    (dict(chunk_size=0), r"chunk_size must be a positive integer"),
])
def test_mean_average_precision_errors(change, match):
  with pytest.raises(ValueError, match=match):
    metrics.mean_average_precision(**{**_args(), **change})


def test_precision_at_k_rejects_bad_k():
  with pytest.raises(ValueError, match=r"k must be a positive integer, got 0"):
    metrics.precision_at_k(**_args(), k=0)
  with pytest.raises(ValueError, match=r"k must be a positive integer, got None"):
    metrics.precision_at_k(**_args(), k=None)


def test_retrieval_metrics_refuse_traced_codes():
  q, ql, db, dl = TINY
  with pytest.raises(ValueError, match=r"outside jax.jit"):
    jax.jit(lambda x: metrics.mean_average_precision(x, ql, db, dl))(jnp.asarray(q, jnp.int32))


@pytest.mark.parametrize("x, labels, match", [
    (np.zeros((4, 3)), np.zeros(5, int), r"labels has 5 entries but there are 4 predictions"),
    (np.zeros(4), np.zeros(4, int),
     r"logits_or_predictions is 1-d, so it must hold integer class ids"),
    (np.zeros((2, 3, 4)), np.zeros(2, int), r"logits_or_predictions must be \(n, classes\)"),
    (np.zeros((0, 3)), np.zeros(0, int), r"logits_or_predictions is empty"),
    (np.zeros((4, 3)), np.full(4, 1.5), r"labels must hold integer class ids"),
])
def test_accuracy_errors(x, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.accuracy(x, labels)
