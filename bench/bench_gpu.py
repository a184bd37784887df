"""fgir_jax's kernel variants against PyTorch on one accelerator: mining, mAP and top-k search.

    python bench/bench_gpu.py --out DIR              # on a GPU (JAX and torch both on it)
    python bench/bench_gpu.py --cpu-smoke --out DIR  # tiny sizes on the CPU: checks the script

Each task runs at CUB size and at scale, on the same random inputs for every
contender:
  mining: `jax.jit(lambda k, e, y: mining.hard_triplets(k,
    losses.pairwise_distances(e), y, method=m))` with traced labels (5,994 x 64,
    200 classes), and `hard_triplets_from_embeddings` at --mine-large points
    (1,000 classes); against pytorch-metric-learning's BatchHardMiner;
  mAP over a Hamming ranking (64-bit codes, 200 classes), ties "stable" and
    "average"; against torch (+-1 matmul distances, stable sort, AP);
  top-100 search through a built `topk.Database` (what `HammingIndex.search`
    keeps); against torch (matmul distances + torch.topk), and
    `lax.approx_min_k` on the distances for reference (it does not order ties).
Every library variant (`method=`) runs with the backend's block and chunk sizes;
"count (CPU sizes)" etc. is the variant with the CPU's sizes forced, i.e. what
ran before variants were chosen per backend. Each variant's result is checked
against the first one's (triplets, mAP values, neighbour lists: identical).
Times are medians after a warm-up call (the first call, JAX's compile included,
is reported apart). Writes DIR/bench_gpu.json and DIR/bench_gpu.md; a
contender that fails (e.g. out of memory) is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=".", help="folder for bench_gpu.json and bench_gpu.md")
  p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
  p.add_argument("--mine-cub", type=int, default=5994)
  p.add_argument("--mine-large", type=int, default=100_000)
  p.add_argument("--cub-queries", type=int, default=5794)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--database", type=int, default=1_000_000)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per row")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.mine_cub, args.mine_large, args.cub_queries = 300, 1000, 200
    args.queries, args.database, args.budget = 20, 5000, 0.2
  return args


def timed(fn, sync, budget):
  """(first call s, median s of later calls, result): at least 2 and at most 10
  later calls, until `budget` seconds are spent (one only after a first call > 20 s)."""
  start = time.perf_counter()
  result = sync(fn())
  first = time.perf_counter() - start
  times = []
  while len(times) < (1 if first > 20 else 2) or (sum(times) < budget and len(times) < 10):
    start = time.perf_counter()
    result = sync(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), result


def attempt(fn):
  """fn() or a one-line error (out of memory on a big row must not end the run)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


@contextlib.contextmanager
def cpu_sizes(enabled=True):
  """The library's CPU block and chunk sizes, whatever the backend (while tracing)."""
  from fgir_jax import _backend
  original = _backend.backend
  if enabled:
    _backend.backend = lambda: "cpu"
  try:
    yield
  finally:
    _backend.backend = original


class Report:
  """Rows grouped by task: each row one contender, with its time or its error."""

  def __init__(self):
    self.rows = []

  def add(self, task, contender, result, same=None, note=""):
    row = {"task": task, "contender": contender, "note": note}
    if isinstance(result, str):
      row["error"] = result
    else:
      row["first_s"], row["median_s"] = result[0], result[1]
    if same is not None:
      row["same_result"] = bool(same)
    self.rows.append(row)
    print(self.line(row, None), flush=True)
    return row

  @staticmethod
  def line(row, best):
    if "error" in row:
      cell, ratio = f"failed: {row['error']}", ""
    else:
      cell = f"{1e3 * row['median_s']:.2f} ms (first call {row['first_s']:.2f} s)"
      ratio = f"{row['median_s'] / best:.2f}x" if best else ""
    same = {True: "yes", False: "**NO**"}.get(row.get("same_result"), "")
    return f"| {row['contender']} | {cell} | {ratio} | {same} | {row['note']} |"

  def markdown(self, header):
    lines = [header, ""]
    for task in dict.fromkeys(r["task"] for r in self.rows):
      rows = [r for r in self.rows if r["task"] == task]
      ours = [r for r in rows if "median_s" in r and r["contender"].startswith("fgir_jax")
              and r.get("same_result", True)]
      best = min((r["median_s"] for r in ours), default=None)
      lines += [f"### {task}", "", "| contender | median | time / fastest fgir_jax | same "
                "result | note |", "| --- | --- | ---: | --- | --- |"]
      lines += [self.line(r, best) for r in rows]
      lines.append("")
    return "\n".join(lines)


def embeddings(n, classes, seed=0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((n, 64)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.arange(n) % classes
  rng.shuffle(labels)
  return emb, labels.astype(np.int64)


def mining_rows(report, args, device, jsync, tsync):
  import jax
  import jax.numpy as jnp
  import torch
  from pytorch_metric_learning import miners
  from fgir_jax import losses, mining

  miner = miners.BatchHardMiner()
  for n, classes, blocked in ((args.mine_cub, 200, False), (args.mine_large, 1000, True)):
    task = (f"mining {n:,} x 64, {min(classes, n // 4)} classes: "
            + ("`hard_triplets_from_embeddings`" if blocked else
               "`hard_triplets(k, pairwise_distances(e), y)`") + " in a user's jit")
    emb, labels = embeddings(n, min(classes, n // 4))
    e, y = jnp.asarray(emb), jnp.asarray(labels.astype(np.int32))
    key = jax.random.key(0)
    reference = None
    for method, forced in [("count", True)] + [(m, False) for m in mining.METHODS]:
      if blocked:
        fn = lambda k, e, y, m=method: mining.hard_triplets_from_embeddings(k, e, y, method=m)
      else:
        fn = lambda k, e, y, m=method: mining.hard_triplets(k, losses.pairwise_distances(e), y,
                                                            method=m)
      step = jax.jit(fn)

      def run(step=step, forced=forced):
        with cpu_sizes(forced):
          return timed(lambda: step(key, e, y), jsync, args.budget)

      result = attempt(run)
      same = None
      if not isinstance(result, str):
        triplets = np.asarray(result[2][0])
        reference = triplets if reference is None else reference
        same = np.array_equal(triplets, reference)
      name = f"fgir_jax {method}" + (" (CPU sizes)" if forced else "")
      report.add(task, name, result, same)
    te, ty = torch.from_numpy(emb).to(device), torch.from_numpy(labels).to(device)

    def peer():
      with torch.no_grad():
        return timed(lambda: miner(te, ty), tsync, args.budget)

    report.add(task, "PML BatchHardMiner (torch)", attempt(peer),
               note="hardest positive and negative only (no windows)")
    te = ty = None  # freed before the next size
    if device == "cuda":
      torch.cuda.empty_cache()


def torch_map(q, db, q_labels, db_labels, chunk=256):
  """mAP over a stable Hamming ranking, in torch: +-1 matmul, stable sort, AP."""
  import torch

  bits = q.shape[1]
  total, counted = 0.0, 0
  ranks = torch.arange(1, db.shape[0] + 1, device=q.device, dtype=torch.float32)
  for start in range(0, q.shape[0], chunk):
    qc = q[start:start + chunk]
    dist = (bits - qc @ db.T) / 2
    order = torch.sort(dist, dim=1, stable=True).indices
    relevant = (db_labels[order] == q_labels[start:start + chunk, None]).float()
    hits = torch.cumsum(relevant, dim=1)
    n_rel = relevant.sum(1)
    ap = (relevant * hits / ranks).sum(1) / n_rel.clamp(min=1)
    total += float(ap[n_rel > 0].sum())
    counted += int((n_rel > 0).sum())
  return total / max(counted, 1)


def random_codes(n_q, n_db, bits, seed=1):
  rng = np.random.default_rng(seed)
  q_bits = rng.integers(0, 2, (n_q, bits)).astype(np.int8)
  db_bits = rng.integers(0, 2, (n_db, bits)).astype(np.int8)
  return q_bits, db_bits, rng.integers(0, 200, n_q), rng.integers(0, 200, n_db)


def map_rows(report, args, device, tsync):
  import torch
  from fgir_jax import metrics

  for n_q, n_db in ((args.cub_queries, args.mine_cub), (args.queries, args.database)):
    q_bits, db_bits, q_labels, db_labels = random_codes(n_q, n_db, args.bits)
    q_packed, db_packed = np.packbits(q_bits, axis=1), np.packbits(db_bits, axis=1)
    for ties in metrics.TIES:
      task = f"mAP, {n_q:,} queries x {n_db:,} codes of {args.bits} bits, ties=\"{ties}\""
      reference = None
      for method, forced in [("scatter", True)] + [(m, False) for m in metrics.METHODS]:
        def run(method=method, forced=forced):
          with cpu_sizes(forced):
            return timed(lambda: metrics.mean_average_precision(
                q_packed, q_labels, db_packed, db_labels, ties=ties, method=method),
                lambda r: r, args.budget)

        result = attempt(run)
        same = None
        if not isinstance(result, str):
          reference = result[2] if reference is None else reference
          same = abs(result[2] - reference) <= 1e-9
        report.add(task, f"fgir_jax {method}" + (" (CPU sizes)" if forced else ""), result, same,
                   note="" if isinstance(result, str) else f"mAP {result[2]:.6f}")
      if ties == "stable":
        tq = torch.from_numpy(2.0 * q_bits - 1).float().to(device)
        tdb = torch.from_numpy(2.0 * db_bits - 1).float().to(device)
        tql, tdbl = torch.from_numpy(q_labels).to(device), torch.from_numpy(db_labels).to(device)
        result = attempt(lambda: timed(lambda: torch_map(tq, tdb, tql, tdbl), lambda r: r,
                                       args.budget))
        same = None if isinstance(result, str) else abs(result[2] - reference) <= 1e-4
        report.add(task, "torch matmul + stable sort", result, same,
                   note="" if isinstance(result, str) else f"mAP {result[2]:.6f} (float32 sums)")
        tq = tdb = tql = tdbl = None


def search_rows(report, args, device, jsync, tsync):
  import jax
  import jax.numpy as jnp
  import torch
  from fgir_jax import codes as codes_lib
  from fgir_jax import topk

  for n_q, n_db in ((args.cub_queries, args.mine_cub), (args.queries, args.database),
                    (1, args.database)):
    q_bits, db_bits, _, _ = random_codes(n_q, n_db, args.bits, seed=2)
    q_packed, db_packed = np.packbits(q_bits, axis=1), np.packbits(db_bits, axis=1)
    task = f"top-{args.k} search, {n_q:,} quer{'y' if n_q == 1 else 'ies'} x {n_db:,} codes"
    reference = None
    for method, forced in [("groups", True)] + [(m, False) for m in topk.METHODS]:
      def run(method=method, forced=forced):
        with cpu_sizes(forced):
          db = topk.Database(db_packed, args.bits, min(args.k, n_db), None, method)
          return timed(lambda: db.search(q_packed, None), lambda r: r, args.budget)

      result = attempt(run)
      same = None
      if not isinstance(result, str):
        found = np.stack(result[2])
        reference = found if reference is None else reference
        same = np.array_equal(found, reference)
      report.add(task, f"fgir_jax {method}" + (" (CPU sizes)" if forced else ""), result, same)

    q_words = jnp.asarray(codes_lib.as_words(q_packed))
    db_words = jnp.asarray(codes_lib.as_words(db_packed))
    approx = jax.jit(lambda q, db: jax.lax.approx_min_k(
        codes_lib.hamming_distances(q, db).astype(jnp.float32), args.k))
    result = attempt(lambda: timed(lambda: approx(q_words, db_words), jsync, args.budget))
    same = None
    if not isinstance(result, str) and reference is not None:
      same = np.array_equal(np.asarray(result[2][0]).astype(np.int32), reference[0])
    report.add(task, "jax lax.approx_min_k on the distances", result, same,
               note="distances only; ties in no set order")
    tq = torch.from_numpy(2.0 * q_bits - 1).float().to(device)
    tdb = torch.from_numpy(2.0 * db_bits - 1).float().to(device)

    def peer():
      return torch.topk((args.bits - tq @ tdb.T) / 2, min(args.k, n_db), dim=1, largest=False)

    result = attempt(lambda: timed(peer, tsync, args.budget))
    same = None
    if not isinstance(result, str) and reference is not None:
      same = np.array_equal(result[2].values.cpu().numpy().astype(np.int32), reference[0])
    report.add(task, "torch matmul + topk", result, same,
               note="same distances checked; ties in no set order")
    tq = tdb = None


def main(argv=None):
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import torch

  device = "cpu" if args.cpu_smoke else "cuda"
  if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("bench_gpu.py: torch sees no GPU; pass --cpu-smoke to check the script on "
                     "the CPU.")
  if device == "cuda" and jax.default_backend() != "gpu":
    raise SystemExit(f"bench_gpu.py: JAX runs on {jax.default_backend()!r}, not a GPU; install "
                     "jax[cuda12] or pass --cpu-smoke.")

  def tsync(result):
    if device == "cuda":
      torch.cuda.synchronize()
    return result

  def jsync(result):
    return jax.block_until_ready(result)

  device_name = (torch.cuda.get_device_name(0) if device == "cuda"
                 else f"CPU, {os.cpu_count()} cores (smoke sizes)")
  header = (f"## fgir_jax's kernel variants vs PyTorch on {device_name}\n\n"
            f"{time.strftime('%Y-%m-%d')}; jax {jax.__version__} ({jax.devices()[0].device_kind}),"
            f" torch {torch.__version__}; medians of timed calls after a warm-up call "
            f"(`python bench/bench_gpu.py{' --cpu-smoke' if args.cpu_smoke else ''}`). "
            "\"same result\": identical to the first fgir_jax row (torch: same mAP to 1e-4, "
            "same distances).")
  print(header + "\n")
  report = Report()
  os.makedirs(args.out, exist_ok=True)
  for part in (lambda: mining_rows(report, args, device, jsync, tsync),
               lambda: map_rows(report, args, device, tsync),
               lambda: search_rows(report, args, device, jsync, tsync)):
    attempt(part)
    # Written after every part: a run cut short by its time limit keeps what it measured.
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
      json.dump({"device": device_name, "jax": jax.__version__, "torch": torch.__version__,
                 "rows": report.rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
      f.write(report.markdown(header))
    if device == "cuda":
      torch.cuda.empty_cache()
  print(report.markdown(header))


if __name__ == "__main__":
  main()
