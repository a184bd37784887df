"""Hard-triplet mining speed: fgir_jax vs pytorch-metric-learning, on CPU.

Same inputs for every tool: random standard-normal embeddings, L2-normalised
(pass --no-normalize to keep them raw), float32, labels = index % classes,
shuffled. Defaults are CUB-200-2011's training set: 5,994 x 64, 200 classes
(~30 per class), beta 0.5, negative factor 0.1.

Rows timed (median of --repeats runs after one warm-up; the warm-up, i.e.
tracing + XLA compile + one run, is reported apart and left out of ratios):
  fgir_jax  pairwise_distances                       the (n, n) matrix alone
  fgir_jax  hard_triplets(pairwise_distances(x))     the contract path
  fgir_jax  same, inside a user's jit (traced labels)
  fgir_jax  hard_triplets_from_embeddings(x)         blocked, no (n, n) matrix
  reference lax.top_k over all negatives, k = max w_n  (the obvious way; why
            fgir_jax selects by counting instead)
  PML       BatchHardMiner: one triplet per anchor (hardest positive and
            negative) from the full distance matrix, the comparable miner
  PML       TripletMarginMiner(type_of_triplets="hard"): it enumerates all
            n * P * N triplets (~1e9 at CUB size, ~25 GB), so it runs on the
            first --tmm-n points only, beside fgir_jax on the same subset.
PML's LpDistance re-normalises the embeddings (its default); that is part of
its time. torch runs at each of --threads (default 1 and 2 threads) and the
faster counts.

--large adds 100,000 x 64 (1,000 classes) through
hard_triplets_from_embeddings in a fresh process that imports no torch, and
reports its time and peak RSS (ru_maxrss).

  python bench/bench_mining.py
  python bench/bench_mining.py --large
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=5994, help="points (CUB train: 5994)")
  p.add_argument("--dim", type=int, default=64, help="embedding size (hash bits)")
  p.add_argument("--classes", type=int, default=200)
  p.add_argument("--beta", type=float, default=0.5)
  p.add_argument("--neg-factor", type=float, default=0.1)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--threads", default="1,2",
                 type=lambda text: [int(t) for t in text.split(",")],
                 help="torch thread counts tried; the faster is the baseline")
  p.add_argument("--no-normalize", action="store_true", help="keep embeddings unnormalised")
  p.add_argument("--tmm-n", type=int, default=1000,
                 help="points for TripletMarginMiner, which enumerates every triplet")
  p.add_argument("--skip-torch", action="store_true", help="fgir_jax rows only")
  p.add_argument("--large", action="store_true", help="also mine 100,000 x 64 (chunked)")
  p.add_argument("--large-n", type=int, default=100_000)
  p.add_argument("--large-classes", type=int, default=1000)
  p.add_argument("--block-size", type=int, default=128, help="chunked path anchors per block")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--large-child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def make_inputs(n, dim, classes, normalize, seed):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((n, dim)).astype(np.float32)
  if normalize:
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.arange(n) % classes
  rng.shuffle(labels)
  return emb, labels.astype(np.int64)


def timed(fn, repeats):
  """(seconds of the first call, median seconds of the next `repeats`)."""
  start = time.perf_counter()
  fn(0)
  first = time.perf_counter() - start
  runs = []
  for i in range(1, repeats + 1):
    start = time.perf_counter()
    fn(i)
    runs.append(time.perf_counter() - start)
  return first, statistics.median(runs)


# ----------------------------------------------------------------------------
# fgir_jax rows.
# ----------------------------------------------------------------------------
def fgir_rows(emb_np, labels, args, suffix=""):
  import jax
  import jax.numpy as jnp
  from fgir_jax import losses, mining

  emb = jnp.asarray(emb_np)
  key = jax.random.key(args.seed)
  beta, nf = args.beta, args.neg_factor
  block = jax.block_until_ready

  def contract(i):
    block(mining.hard_triplets(jax.random.fold_in(key, i), losses.pairwise_distances(emb),
                               labels, beta, nf))

  in_jit = jax.jit(lambda k, e, l: mining.hard_triplets(k, losses.pairwise_distances(e), l,
                                                        beta, nf))
  labels_dev = jnp.asarray(labels)

  def traced(i):
    block(in_jit(jax.random.fold_in(key, i), emb, labels_dev))

  def chunked(i):
    block(mining.hard_triplets_from_embeddings(jax.random.fold_in(key, i), emb, labels, beta,
                                               nf, block_size=args.block_size))

  rows = [("fgir_jax", "pairwise_distances" + suffix,
           timed(lambda i: block(losses.pairwise_distances(emb)), args.repeats)),
          ("fgir_jax", "hard_triplets incl. distances" + suffix, timed(contract, args.repeats))]
  if not suffix:
    rows += [("fgir_jax", "  same, in a user's jit (traced labels)", timed(traced, args.repeats)),
             ("fgir_jax", f"hard_triplets_from_embeddings (block {args.block_size})",
              timed(chunked, args.repeats)),
             ("reference", "lax.top_k(k = max w_n) on masked distances",
              topk_row(emb, labels, args))]
  return rows


def topk_row(emb, labels, args):
  import jax
  import jax.numpy as jnp
  from fgir_jax import losses, mining

  _, _, _, w_n = mining.window_sizes(labels, args.beta, args.neg_factor)
  k_n = int(w_n.max())

  @jax.jit
  def closest(e, l):
    d = losses.pairwise_distances(e)
    return jax.lax.top_k(-jnp.where(l[:, None] == l[None, :], jnp.inf, d), k_n)[1]

  labels_dev = jnp.asarray(labels)
  return timed(lambda i: jax.block_until_ready(closest(emb, labels_dev)), max(1, args.repeats // 2))


# ----------------------------------------------------------------------------
# pytorch-metric-learning rows.
# ----------------------------------------------------------------------------
def pml_rows(emb_np, labels, args, suffix="", which=("batch_hard",)):
  import torch
  from pytorch_metric_learning import miners

  emb, lab = torch.from_numpy(emb_np), torch.from_numpy(labels)
  made = {"batch_hard": ("BatchHardMiner", miners.BatchHardMiner()),
          "tmm": ('TripletMarginMiner("hard")',
                  miners.TripletMarginMiner(margin=0.2, type_of_triplets="hard"))}
  rows = []
  for name in which:
    title, miner = made[name]
    # torch's thread pool can stall on a shared machine: the faster thread count counts.
    best = None
    for threads in args.threads:
      torch.set_num_threads(threads)
      with torch.no_grad():
        result = timed(lambda i: miner(emb, lab), args.repeats)
      if best is None or result[1] < best[1][1]:
        best = (threads, result)
    threads, result = best
    rows.append(("PML", f"{title}{suffix} ({threads} thread{'s' * (threads > 1)})", result))
  return rows


# ----------------------------------------------------------------------------
# Large: a child process, so that its peak RSS is mining's own.
# ----------------------------------------------------------------------------
def large_child(args):
  import jax
  from fgir_jax import mining

  emb, labels = make_inputs(args.large_n, args.dim, args.large_classes, not args.no_normalize,
                            args.seed)
  key = jax.random.key(args.seed)
  times = []
  for i in range(2):  # the first call includes tracing and compiling
    start = time.perf_counter()
    triplets, valid = mining.hard_triplets_from_embeddings(
        jax.random.fold_in(key, i), emb, labels, args.beta, args.neg_factor,
        block_size=args.block_size)
    jax.block_until_ready((triplets, valid))
    times.append(time.perf_counter() - start)
  print(json.dumps({"first_s": times[0], "second_s": times[1],
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "valid": int(np.asarray(valid).sum())}))


def large_rows(args):
  cmd = [sys.executable, os.path.abspath(__file__), "--large-child"]
  for flag in ("large_n", "large_classes", "dim", "beta", "neg_factor", "block_size", "seed"):
    cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
  if args.no_normalize:
    cmd.append("--no-normalize")
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------
def print_table(title, rows):
  """Rows with the PML BatchHardMiner row of the same inputs as the baseline."""
  baseline = next((r[2][1] for r in rows if r[1].startswith("BatchHardMiner")), None)
  print(f"\n{title}\n")
  print("| tool | what | first call s | median s | BatchHardMiner / this |")
  print("| --- | --- | ---: | ---: | ---: |")
  for tool, what, (first, median) in rows:
    ratio = f"{baseline / median:.1f}x" if baseline else "-"
    print(f"| {tool} | {what} | {first:.3f} | {median:.3f} | {ratio} |")
  return baseline


def main(argv=None):
  args = parse_args(argv)
  if args.large_child:
    return large_child(args)
  import jax
  print(f"# mining benchmark: n={args.n} dim={args.dim} classes={args.classes} "
        f"beta={args.beta} neg_factor={args.neg_factor} "
        f"{'raw' if args.no_normalize else 'L2-normalised'} float32 embeddings")
  print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"torch threads tried {args.threads}, load average {os.getloadavg()[0]:.2f}")
  emb, labels = make_inputs(args.n, args.dim, args.classes, not args.no_normalize, args.seed)
  rows = fgir_rows(emb, labels, args)
  if not args.skip_torch:
    rows += pml_rows(emb, labels, args)
  baseline = print_table(f"## {args.n} points (first call = trace + compile + run; "
                         "median excludes it)", rows)
  if baseline:
    ours = next(r[2][1] for r in rows if r[1] == "hard_triplets incl. distances")
    in_jit = next(r[2][1] for r in rows if "user's jit" in r[1])
    print(f"\nvs PML BatchHardMiner (compile excluded): the call in a user's jit "
          f"{baseline / in_jit:.1f}x faster; hard_triplets outside jit (concrete labels, "
          f"distances included) {baseline / ours:.1f}x faster")
    small = min(args.tmm_n, args.n)
    sub = fgir_rows(emb[:small], labels[:small], args, suffix=f" (first {small})")
    sub += pml_rows(emb[:small], labels[:small], args, suffix=f" (first {small})",
                    which=("batch_hard", "tmm"))
    print_table(f"## first {small} points (TripletMarginMiner enumerates all triplets)", sub)
  if args.large:
    res = large_rows(args)
    print(f"\n## large: hard_triplets_from_embeddings, n={args.large_n} dim={args.dim} "
          f"classes={args.large_classes} block={args.block_size}\n")
    print("| measure | value |")
    print("| --- | ---: |")
    print(f"| first call (trace + compile + run) s | {res['first_s']:.1f} |")
    print(f"| second call s | {res['second_s']:.1f} |")
    print(f"| peak RSS of the process MB | {res['peak_rss_mb']:.0f} |")
    print(f"| valid triplets | {res['valid']} |")
  print(f"\n# load average at the end {os.getloadavg()[0]:.2f} "
        "(other processes on the machine make these numbers noisy)")


if __name__ == "__main__":
  main()
