"""Benchmark: Hamming-ranking mAP of fgir_jax.metrics against faiss + NumPy (and torch).

Default sizes are CUB-200-2011's retrieval protocol: 5,794 query codes x 5,994
database codes of 64 bits, 200 classes; every tool gets the same random codes.

Reference ("faiss + NumPy"): faiss IndexBinaryFlat full search (k = n_db, all
cores), then NumPy AP. faiss does not promise database order inside a tie, so
the stable reference re-sorts each row by (distance, index); the tie-aware
reference is the per-position expectation of He et al. 2018, vectorised in
NumPy on the sorted distances. torch (optional): +-1 matmul distances, a stable
sort, NumPy-style AP in torch.

  python bench/bench_map.py                 # CUB sizes, both tie modes, all tools
  python bench/bench_map.py --large         # bounded-memory run: 2,000 x 1,000,000
  pip install -r bench/requirements.txt     # faiss-cpu and torch: benchmark-only

Times are medians after one warm-up call; the first call's extra time (JIT
compilation) is printed separately. The script exits non-zero if a reference
disagrees with fgir_jax on mAP by more than --tol. --large runs fgir_jax alone
(a k = n_db faiss search would not fit) and spot-checks 5 queries with NumPy.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import timed  # noqa: E402  (bench/timing.py)
import jax  # noqa: E402
from fgir_jax import metrics  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--queries", type=int, default=5794)
  p.add_argument("--database", type=int, default=5994)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--classes", type=int, default=200)
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
  p.add_argument("--ties", default="stable,average")
  p.add_argument("--tools", default="faiss,torch", help="comma list of references: faiss, torch")
  p.add_argument("--tol", type=float, default=1e-6)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--large", action="store_true",
                 help="bounded-memory demonstration instead: fgir_jax only, large database")
  p.add_argument("--large-queries", type=int, default=2000)
  p.add_argument("--large-database", type=int, default=1_000_000)
  args = p.parse_args()
  if args.bits % 8:
    p.error("--bits must be a multiple of 8 (the codes are generated packed, as faiss takes them)")
  return args


def make_codes(seed, n_q, n_db, bits, classes):
  """Packed uint8 codes (n, bits/8) and labels, shared by every tool."""
  rng = np.random.default_rng(seed)
  q = rng.integers(0, 256, (n_q, bits // 8), dtype=np.uint8)
  db = rng.integers(0, 256, (n_db, bits // 8), dtype=np.uint8)
  return q, rng.integers(0, classes, n_q), db, rng.integers(0, classes, n_db)


# ----------------------------------------------------------------------------
# References.
# ----------------------------------------------------------------------------


def faiss_search(q, db, bits):
  import faiss  # pylint: disable=import-outside-toplevel
  faiss.omp_set_num_threads(os.cpu_count())
  index = faiss.IndexBinaryFlat(bits)
  index.add(db)
  return index.search(q, db.shape[0])  # (distances, indices), each (n_q, n_db)


def numpy_stable_map(dist, idx, q_labels, db_labels):
  """Textbook AP after re-sorting ties into database order."""
  order = np.lexsort((idx, dist), axis=-1)
  rel = db_labels[np.take_along_axis(idx, order, 1)] == q_labels[:, None]
  precision = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
  n_rel = rel.sum(1)
  ap = (precision * rel).sum(1) / np.maximum(n_rel, 1)
  return float(ap[n_rel > 0].mean())


def numpy_tie_aware_map(dist, idx, q_labels, db_labels):
  """He et al. (2018) tie-aware AP: expected precision at every position.

  Position j of a tie group (start N, size n, r relevant, R relevant before) is
  relevant with probability r/n, with expected precision
  (R + 1 + (j-1)(r-1)/(n-1)) / (N + j).
  """
  rel = db_labels[idx] == q_labels[:, None]
  n_q, n_db = dist.shape
  pos = np.broadcast_to(np.arange(n_db), dist.shape)
  first = np.ones(dist.shape, bool)
  first[:, 1:] = dist[:, 1:] != dist[:, :-1]
  last = np.ones(dist.shape, bool)
  last[:, :-1] = first[:, 1:]
  start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
  stop = np.minimum.accumulate(np.where(last, pos, n_db - 1)[:, ::-1], axis=1)[:, ::-1] + 1
  size = stop - start
  crel = np.concatenate([np.zeros((n_q, 1), np.int64), np.cumsum(rel, 1)], 1)
  rel_before = np.take_along_axis(crel, start, 1)
  r = np.take_along_axis(crel, stop, 1) - rel_before
  j = pos - start + 1
  a = np.where(size > 1, (r - 1) / np.maximum(size - 1, 1), 0.0)
  expected = (r / size) * (rel_before + 1 + (j - 1) * a) / (start + j)
  n_rel = rel.sum(1)
  ap = expected.sum(1) / np.maximum(n_rel, 1)
  return float(ap[n_rel > 0].mean())


def torch_stable_map(q, q_labels, db, db_labels, bits):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  qs = torch.from_numpy(np.unpackbits(q, axis=1).astype(np.float32) * 2 - 1)
  dbs = torch.from_numpy(np.unpackbits(db, axis=1).astype(np.float32) * 2 - 1)
  dist = ((bits - qs @ dbs.T) / 2).round().to(torch.int32)
  order = torch.sort(dist, dim=1, stable=True).indices
  rel = torch.from_numpy(db_labels)[order] == torch.from_numpy(q_labels)[:, None]
  precision = torch.cumsum(rel, 1) / torch.arange(1, rel.shape[1] + 1)
  n_rel = rel.sum(1)
  ap = (precision * rel).sum(1) / n_rel.clamp(min=1)
  return float(ap[n_rel > 0].double().mean())


# ----------------------------------------------------------------------------
# Runs.
# ----------------------------------------------------------------------------


def run_cub(args):
  q, ql, db, dl = make_codes(args.seed, args.queries, args.database, args.bits, args.classes)
  print(f"{args.queries} queries x {args.database} database codes, {args.bits} bits, "
        f"{args.classes} classes; {os.cpu_count()} CPU cores; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}")
  tools = [t for t in args.tools.split(",") if t]
  values, ok = {}, True
  search = None
  if "faiss" in tools:
    _, faiss_seconds, search = timed(lambda: faiss_search(q, db, args.bits), args.repeats)
    print(f"faiss IndexBinaryFlat search, k = n_db: {faiss_seconds:.3f} s")
  for ties in args.ties.split(","):
    print(f"ties={ties}")
    first, med, ours = timed(
        lambda: metrics.mean_average_precision(q, ql, db, dl, ties=ties), args.repeats)
    print(f"  fgir_jax             {med:8.3f} s   (first call {first:.3f} s: "
          f"compile ~{max(first - med, 0):.3f} s)   mAP {ours:.9f}")
    values[ties] = {"fgir_jax": ours}
    if search is not None:
      ref_fn = numpy_stable_map if ties == "stable" else numpy_tie_aware_map
      _, np_med, ref = timed(lambda: ref_fn(*search, ql, dl), args.repeats)
      total = np_med + faiss_seconds
      print(f"  faiss + NumPy        {total:8.3f} s   (NumPy AP {np_med:.3f} s)"
            f"   mAP {ref:.9f}   fgir_jax is {total / med:6.1f}x faster "
            f"({total / first:.1f}x counting compile)")
      values[ties]["faiss+numpy"] = ref
    if "torch" in tools and ties == "stable":
      _, t_med, ref = timed(lambda: torch_stable_map(q, ql, db, dl, args.bits), args.repeats)
      print(f"  torch (matmul+sort)  {t_med:8.3f} s   mAP {ref:.9f}   "
            f"fgir_jax is {t_med / med:6.1f}x faster")
      values[ties]["torch"] = ref
    for tool, v in values[ties].items():
      if abs(v - ours) > args.tol:
        print(f"  MISMATCH: {tool} gives {v!r}, fgir_jax {ours!r}")
        ok = False
  print(f"all values agree to within {args.tol}" if ok else "VALUES DISAGREE")
  return ok


def run_large(args):
  n_q, n_db = args.large_queries, args.large_database
  q, ql, db, dl = make_codes(args.seed, n_q, n_db, args.bits, args.classes)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"{n_q} queries x {n_db} database codes, {args.bits} bits, {args.classes} classes; "
        f"peak RSS before: {rss0:.0f} MiB (codes + labels "
        f"{(q.nbytes + db.nbytes + ql.nbytes + dl.nbytes) / 2**20:.0f} MiB)")
  # Warm-up on the query of the largest class: with a database of ~1M codes a
  # chunk is one query, so this compiles the very kernel the full run uses.
  warm = int(np.argmax(np.bincount(dl, minlength=args.classes)[ql]))
  results = {}
  for ties in args.ties.split(","):
    t = time.perf_counter()
    metrics.average_precisions(q[warm:warm + 1], ql[warm:warm + 1], db, dl, ties=ties)
    first = time.perf_counter() - t
    t = time.perf_counter()
    results[ties] = aps = metrics.average_precisions(q, ql, db, dl, ties=ties)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = seconds / n_q * 1e3
    print(f"ties={ties}: {seconds:.1f} s ({ms:.2f} ms/query; "
          f"warm-up call with compile {first:.2f} s), "
          f"mAP {np.nanmean(aps):.6f}, peak RSS so far {rss:.0f} MiB")
    print(f"  extrapolated: 100,000 queries ~{ms * 100:.0f} s at the same peak memory "
          f"(their full int32 distance matrix would be {4e5 * n_db / 2**30:.0f} GiB)")
  # Spot check (after the timed runs, so its memory is not in the peaks above):
  # the first few queries against NumPy on the full sorted ranking.
  few, ok = 5, True
  dist = np.stack([np.bitwise_count(q[i] ^ db).sum(1) for i in range(few)])
  idx = np.argsort(dist, axis=1, kind="stable")
  dist = np.take_along_axis(dist, idx, 1)
  for ties, aps in results.items():
    ref_fn = numpy_stable_map if ties == "stable" else numpy_tie_aware_map
    ref = ref_fn(dist, idx, ql[:few], dl)
    good = abs(ref - np.nanmean(aps[:few])) <= args.tol
    ok &= good
    print(f"ties={ties}: first {few} queries vs NumPy: {np.nanmean(aps[:few]):.9f} vs {ref:.9f} "
          f"({'agree' if good else 'MISMATCH'})")
  return ok


def main():
  args = parse_args()
  ok = run_large(args) if args.large else run_cub(args)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
