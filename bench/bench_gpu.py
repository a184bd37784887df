"""fgir_jax against PyTorch on one accelerator: mining, mAP and top-k search, side by side.

    python bench/bench_gpu.py --out DIR              # on a GPU (JAX and torch both on it)
    python bench/bench_gpu.py --cpu-smoke --out DIR  # tiny sizes on the CPU: checks the script

Rows (same random inputs for both tools, medians of --repeats calls after a
warm-up; the warm-up, i.e. JAX's compile, is reported apart):
  mining, CUB size (5,994 x 64, 200 classes) and --mine-large points (1,000
    classes): `jax.jit(lambda k, e, y: mining.hard_triplets(k,
    losses.pairwise_distances(e), y))` with traced labels (at the large size
    `hard_triplets_from_embeddings`, which never holds the n x n matrix)
    against pytorch-metric-learning's BatchHardMiner on the same device;
  mAP over a Hamming ranking: --queries x --database codes of 64 bits,
    `metrics.mean_average_precision` against torch (+-1 matmul distances,
    stable sort, AP);
  top-100 search over the same database: `index.hamming_topk` against torch
    (matmul distances + torch.topk).
Writes DIR/bench_gpu.json and DIR/bench_gpu.md (the table), and prints the table.
A row whose tool fails (e.g. out of memory) is reported as such; the others still run.
"""

from __future__ import annotations

import argparse
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
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--database", type=int, default=1_000_000)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.mine_cub, args.mine_large = 300, 1000
    args.queries, args.database, args.repeats = 20, 5000, 2
  return args


def timed(fn, sync, repeats):
  """(first call seconds, median seconds of `repeats` more)."""
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


class Table:
  def __init__(self):
    self.rows = []

  def add(self, what, ours, peer, peer_name):
    """ours / peer: (first, median) or an error string."""
    row = {"what": what, "peer": peer_name}
    for side, result in (("fgir_jax", ours), ("torch", peer)):
      if isinstance(result, str):
        row[side + "_error"] = result
      else:
        row[side + "_first_s"], row[side + "_s"] = result
    if "fgir_jax_s" in row and "torch_s" in row:
      row["ratio"] = row["torch_s"] / row["fgir_jax_s"]
    self.rows.append(row)
    print(self.line(row), flush=True)

  @staticmethod
  def line(row):
    def cell(side):
      if side + "_error" in row:
        return f"failed: {row[side + '_error']}"
      return f"{1e3 * row[side + '_s']:.2f} ms (first call {row[side + '_first_s']:.2f} s)"
    ratio = f"**{row['ratio']:.1f}x**" if "ratio" in row else "-"
    return f"| {row['what']} | {cell('fgir_jax')} | {row['peer']}: {cell('torch')} | {ratio} |"

  def markdown(self, header):
    lines = [header, "", "| what | fgir_jax | peer | peer / fgir_jax |", "| --- | --- | --- | ---: |"]
    return "\n".join(lines + [self.line(r) for r in self.rows]) + "\n"


def attempt(fn):
  """fn() or a one-line error (out of memory on a big row must not end the run)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def embeddings(n, classes, seed=0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((n, 64)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.arange(n) % classes
  rng.shuffle(labels)
  return emb, labels.astype(np.int64)


def mining_rows(table, args, device, jsync, tsync):
  import jax
  import jax.numpy as jnp
  import torch
  from pytorch_metric_learning import miners
  from fgir_jax import losses, mining

  in_jit = jax.jit(lambda k, e, y: mining.hard_triplets(k, losses.pairwise_distances(e), y))
  blocked = jax.jit(lambda k, e, y: mining.hard_triplets_from_embeddings(k, e, y))
  miner = miners.BatchHardMiner()
  for n, classes, ours_fn, name in ((args.mine_cub, 200, in_jit, "hard_triplets in a user's jit"),
                                    (args.mine_large, 1000, blocked,
                                     "hard_triplets_from_embeddings in a user's jit")):
    emb, labels = embeddings(n, min(classes, n // 4))
    e, y = jnp.asarray(emb), jnp.asarray(labels.astype(np.int32))
    te, ty = torch.from_numpy(emb).to(device), torch.from_numpy(labels).to(device)
    key = jax.random.key(0)
    ours = attempt(lambda: timed(lambda: ours_fn(key, e, y), jsync, args.repeats))

    def peer():
      with torch.no_grad():
        return timed(lambda: miner(te, ty), tsync, args.repeats)

    table.add(f"mining {n:,} x 64 ({name})", ours, attempt(peer), "PML BatchHardMiner")
    del te, ty
    if device == "cuda":
      torch.cuda.empty_cache()


def torch_map(q, db, q_labels, db_labels, chunk=256):
  """mAP over a stable Hamming ranking, in torch: +-1 matmul, stable sort, AP."""
  import torch

  bits = q.shape[1]
  total, counted = 0.0, 0
  for start in range(0, q.shape[0], chunk):
    qc = q[start:start + chunk]
    dist = (bits - qc @ db.T) / 2
    order = torch.sort(dist, dim=1, stable=True).indices
    relevant = (db_labels[order] == q_labels[start:start + chunk, None]).float()
    hits = torch.cumsum(relevant, dim=1)
    ranks = torch.arange(1, db.shape[0] + 1, device=q.device, dtype=torch.float32)
    n_rel = relevant.sum(1)
    ap = (relevant * hits / ranks).sum(1) / n_rel.clamp(min=1)
    total += float(ap[n_rel > 0].sum())
    counted += int((n_rel > 0).sum())
  return total / max(counted, 1)


def search_rows(table, args, device, jsync, tsync):
  import torch
  from fgir_jax import index as index_lib
  from fgir_jax import metrics

  rng = np.random.default_rng(1)
  q_bits = rng.integers(0, 2, (args.queries, args.bits)).astype(np.int8)
  db_bits = rng.integers(0, 2, (args.database, args.bits)).astype(np.int8)
  q_labels = rng.integers(0, 200, args.queries)
  db_labels = rng.integers(0, 200, args.database)
  q_packed, db_packed = np.packbits(q_bits, axis=1), np.packbits(db_bits, axis=1)
  tq = torch.from_numpy(2.0 * q_bits - 1).float().to(device)
  tdb = torch.from_numpy(2.0 * db_bits - 1).float().to(device)
  tql = torch.from_numpy(q_labels).to(device)
  tdbl = torch.from_numpy(db_labels).to(device)
  values = {}

  def ours_map():
    values["fgir_jax"] = metrics.mean_average_precision(q_packed, q_labels, db_packed, db_labels)
    return values["fgir_jax"]

  def peer_map():
    values["torch"] = torch_map(tq, tdb, tql, tdbl)
    return values["torch"]

  table.add(f"mAP, {args.queries:,} queries x {args.database:,} codes of {args.bits} bits",
            attempt(lambda: timed(ours_map, lambda r: r, args.repeats)),
            attempt(lambda: timed(peer_map, lambda r: r, args.repeats)), "torch matmul + sort")
  if len(values) == 2 and abs(values["fgir_jax"] - values["torch"]) > 1e-4:
    print(f"WARNING: mAP differs: fgir_jax {values['fgir_jax']:.6f}, torch {values['torch']:.6f}")

  def peer_topk():
    dist = (args.bits - tq @ tdb.T) / 2
    return torch.topk(dist, args.k, dim=1, largest=False)

  table.add(f"top-{args.k} search, {args.queries:,} queries x {args.database:,} codes",
            attempt(lambda: timed(lambda: index_lib.hamming_topk(q_packed, db_packed, args.k),
                                  lambda r: r, args.repeats)),
            attempt(lambda: timed(peer_topk, tsync, args.repeats)), "torch matmul + topk")


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

  device_name = (torch.cuda.get_device_name(0) if device == "cuda"
                 else f"CPU, {os.cpu_count()} cores (smoke sizes)")
  header = (f"## fgir_jax vs PyTorch on {device_name}\n\njax {jax.__version__} "
            f"({jax.devices()[0].device_kind}), torch {torch.__version__}; medians of "
            f"{args.repeats} calls after a warm-up (`python bench/bench_gpu.py"
            f"{' --cpu-smoke' if args.cpu_smoke else ''}`)")
  print(header + "\n")
  table = Table()
  mining_rows(table, args, device, jax.block_until_ready, tsync)
  search_rows(table, args, device, jax.block_until_ready, tsync)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
    json.dump({"device": device_name, "rows": table.rows}, f, indent=1)
  with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
    f.write(table.markdown(header))


if __name__ == "__main__":
  main()
