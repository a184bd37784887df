"""Benchmark: exact Hamming top-k search, fgir_jax.index against faiss IndexBinaryFlat.

Default cases: 1,000 queries against 5,994 database codes (CUB-200-2011's
retrieval set) and against 1,000,000 codes; 64-bit random codes
(np.random), top-100. Every tool gets the same packed codes.

Rows timed (median of --repeats calls after one warm-up; the warm-up, i.e.
tracing + XLA compile + one run, is reported apart and left out of ratios):
  fgir_jax hamming_topk(q, db, k)   the functional call: packs and lays out
                                    the database on every call
  fgir_jax HammingIndex.search      the index keeps the device layout
  faiss IndexBinaryFlat.search      all cores (faiss.omp_set_num_threads)
Then single-query latency on the largest database: --single queries one at a
time, median and best, for HammingIndex.search and faiss.

Checks (the script exits non-zero if one fails): distances equal faiss's
exactly, and fgir_jax's ids equal a stable order's (distance, then database
index). faiss does not promise an order inside a tie, so its ids are checked
as a set: every id closer than the k-th distance is the same, and at the k-th
distance both pick codes at that distance. The table also gives the share of
rows whose ids are identical.

  python bench/bench_search.py
  python bench/bench_search.py --databases 5994 --queries 5794
  python bench/bench_search.py --gpu        # fgir_jax on the default JAX device
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import timed  # noqa: E402  (bench/timing.py)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--databases", default="5994,1000000", help="comma list of database sizes")
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up")
  p.add_argument("--single", type=int, default=50, help="queries timed one at a time")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gpu", action="store_true",
                 help="run fgir_jax on the default JAX device (faiss stays on the CPU)")
  p.add_argument("--skip-faiss", action="store_true", help="fgir_jax rows only")
  args = p.parse_args()
  if args.bits % 8:
    p.error("--bits must be a multiple of 8 (faiss binary indexes need whole bytes)")
  return args


def speedup(reference: float, ours: float) -> str:
  r = reference / ours
  return f"{r:5.1f}x faster" if r >= 1 else f"{1 / r:5.1f}x slower"


def check(ours, theirs, q, db):
  """Problems (a list of strings) comparing our (dist, ids) with faiss's; and
  the share of rows whose ids are identical."""
  (d, i), (fd, fi) = ours, theirs
  problems = []
  if not np.array_equal(d, fd):
    problems.append(f"distances differ in {int((d != fd).any(1).sum())} rows")
  true_d = np.bitwise_count(q[:, None, :] ^ db[i]).sum(-1)
  if not np.array_equal(true_d, d):
    problems.append("fgir_jax's distances are not the distances of its ids")
  kth = d[:, -1:]
  for row in range(d.shape[0]):
    inside = set(i[row][d[row] < kth[row]].tolist())
    if inside != set(fi[row][fd[row] < kth[row]].tolist()):
      problems.append(f"row {row}: ids closer than the k-th distance differ")
      break
  for row in range(min(d.shape[0], 20)):  # stable order, against a full sort (20 rows)
    full = np.bitwise_count(q[row] ^ db).sum(-1)
    ref = np.argsort(full, kind="stable")[:d.shape[1]]
    if not np.array_equal(ref, i[row]):
      problems.append(f"row {row}: ids are not in stable (distance, index) order")
      break
  return problems, float((i == fi).all(1).mean())


def main():
  args = parse_args()
  if not args.gpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  from fgir_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  from fgir_jax import topk  # pylint: disable=import-outside-toplevel
  faiss = None
  if not args.skip_faiss:
    import faiss  # pylint: disable=import-outside-toplevel
    faiss.omp_set_num_threads(os.cpu_count())

  print("command: python " + " ".join(sys.argv))
  print(f"{args.queries} queries, {args.bits}-bit random codes, top-{args.k}; {os.cpu_count()} CPU "
        f"cores; jax {jax.__version__} on {jax.devices()[0].platform}"
        + ("" if faiss is None else f"; faiss {faiss.__version__}"))
  rng = np.random.default_rng(args.seed)
  nbytes = args.bits // 8
  q = rng.integers(0, 256, (args.queries, nbytes), dtype=np.uint8)
  ok = True
  header = (f"{'database':>10}  {'tool':34} {'median':>9} {'first call':>11} {'per query':>10}"
            "  vs faiss")
  print(header)
  print("-" * len(header))
  last = None
  for n_db in (int(x) for x in args.databases.split(",")):
    db = rng.integers(0, 256, (n_db, nbytes), dtype=np.uint8)
    index = index_lib.HammingIndex(args.bits)
    index.add(db)
    rows = [("fgir_jax hamming_topk", lambda: topk.hamming_topk(q, db, args.k)),
            ("fgir_jax HammingIndex.search", lambda: index.search(q, args.k))]
    flat = None
    if faiss is not None:
      flat = faiss.IndexBinaryFlat(args.bits)
      flat.add(db)
      rows.append(("faiss IndexBinaryFlat.search", lambda: flat.search(q, args.k)))
    results = {name: timed(fn, args.repeats) for name, fn in rows}
    ref = results.get("faiss IndexBinaryFlat.search")
    for j, (name, (first, med, _)) in enumerate(results.items()):
      ratio = "" if ref is None or name.startswith("faiss") else speedup(ref[1], med)
      print(f"{f'{n_db:,}' if j == 0 else '':>10}  {name:34} {med:8.4f}s {first:10.3f}s "
            f"{med / args.queries * 1e6:8.1f}us  {ratio}")
    ours = results["fgir_jax HammingIndex.search"][2]
    if ref is not None:
      problems, same = check(ours, ref[2], q, db)
      ok &= not problems
      print(f"{'':>10}  check vs faiss: {'; '.join(problems) or 'distances equal'}; "
            f"ids identical in {same:.1%} of rows (faiss's tie order is unspecified)")
    last = (n_db, db, index, flat)

  n_db, db, index, flat = last
  print(f"\nsingle-query latency, {n_db:,} codes, top-{args.k} "
        f"({args.single} queries, one at a time)")
  tools = [("fgir_jax HammingIndex.search", lambda x: index.search(x, args.k))]
  if flat is not None:
    tools.append(("faiss IndexBinaryFlat.search", lambda x: flat.search(x, args.k)))
  for name, fn in tools:
    fn(q[:1])  # warm-up (compiles the one-query shape)
    times = []
    for row in range(min(args.single, args.queries)):
      t = time.perf_counter()
      fn(q[row:row + 1])
      times.append(time.perf_counter() - t)
    print(f"  {name:34} median {np.median(times) * 1e3:7.3f} ms   best {min(times) * 1e3:7.3f} ms")
  print("all checks passed" if ok else "CHECKS FAILED")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
