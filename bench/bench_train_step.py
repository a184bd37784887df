"""Per-batch metric-learning train step: fgir_jax in a user's jit vs PyTorch + pytorch-metric-learning.

    python bench/bench_train_step.py                 # batches of 256, 512 and 1,024
    python bench/bench_train_step.py --sizes 256 --steps 20

The case most users have: a small MLP (--in-dim -> --hidden -> 128, ReLU)
embeds a P x K batch (K = --per-class images of each of P classes), the step
mines one hard triplet per anchor inside the batch and takes one Adam step on
a triplet loss. Both sides get the same features, labels and sizes, float32.

  fgir_jax  one `jax.jit` step with the labels traced, as a user writes it:
            embeddings -> losses.pairwise_distances (of stop_gradient
            embeddings) -> mining.hard_triplets ->
            losses.adaptive_triplet_loss_from_embeddings (Eq. 2-3) ->
            value_and_grad -> optax.adam.
  PyTorch   the same MLP, miners.BatchHardMiner -> losses.TripletMarginLoss
            (margin 0.2) on the mined triplets -> backward -> torch.optim.Adam,
            eager, at 1 and at 2 threads; the faster is the baseline (torch's
            thread pool can stall on a shared machine).

The same step with the MLP alone (loss: mean squared embedding, no mining) is
timed on both sides too, to split each step into the MLP's share (matrix
products, the same work in both frameworks) and the metric-learning share
(mining + triplet loss): the difference of the two.

Each side runs --warmup steps (jax: compiling included, reported apart), then
--rounds rounds of --steps steps over a cycle of --batches batches, the sides
taking turns within each round (so that both see the same load on a shared
machine); the figure is the median round, per step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="256,512,1024", help="embeddings per batch (P x K)")
  p.add_argument("--per-class", type=int, default=8, help="K: images of each class per batch")
  p.add_argument("--in-dim", type=int, default=512, help="input feature size")
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--dim", type=int, default=128, help="embedding size")
  p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=25, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--threads", default="1,2", help="torch thread counts tried")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def make_batches(size, args):
  """`args.batches` (features, labels) pairs: P classes x K images, class-centred noise."""
  rng = np.random.default_rng(args.seed + size)
  classes = size // args.per_class
  centres = rng.standard_normal((4 * classes, args.in_dim)).astype(np.float32)
  batches = []
  for _ in range(args.batches):
    picked = rng.choice(len(centres), classes, replace=False)
    labels = np.repeat(picked, args.per_class)
    feats = centres[labels] + 0.8 * rng.standard_normal((size, args.in_dim)).astype(np.float32)
    batches.append((feats, labels.astype(np.int32)))
  return batches


def interleaved(runners, args):
  """Seconds per step of each runner: median of --rounds rounds, the runners taking
  turns in every round so that all of them see the same machine load.

  runners: {name: run_steps(count)}. Returns ({name: warm-up seconds},
  {name: median seconds per step}).
  """
  warm, rounds = {}, {name: [] for name in runners}
  for name, run_steps in runners.items():
    start = time.perf_counter()
    run_steps(args.warmup)
    warm[name] = time.perf_counter() - start
  for _ in range(args.rounds):
    for name, run_steps in runners.items():
      # Idle thread pools spin for a while after their work (OpenMP's wait
      # policy): a pause keeps one side's spinning out of the other's turn.
      time.sleep(0.3)
      start = time.perf_counter()
      run_steps(args.steps)
      rounds[name].append((time.perf_counter() - start) / args.steps)
  return warm, {name: statistics.median(times) for name, times in rounds.items()}


def bench_jax(batches, args, metric=True):
  import jax
  import jax.numpy as jnp
  import optax
  from fgir_jax import losses, mining

  def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (args.in_dim, args.hidden)) / np.sqrt(args.in_dim),
            "b1": jnp.zeros(args.hidden),
            "w2": jax.random.normal(k2, (args.hidden, args.dim)) / np.sqrt(args.hidden),
            "b2": jnp.zeros(args.dim)}

  def embed(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  opt = optax.adam(1e-3)

  # Donated params and optimizer state are updated in place, as in any Flax training loop.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, key, step, x, y):
    key = jax.random.fold_in(key, step)  # in the step: no eager dispatch per step

    def loss_fn(p):
      emb = embed(p, x)
      if not metric:  # the MLP alone, for the split of the step's time
        return jnp.mean(emb * emb)
      # Mine on distances that carry no gradient; the loss needs only the
      # triplets' own distances, so its backward pass skips the (n, n) matrix.
      dist = losses.pairwise_distances(jax.lax.stop_gradient(emb))
      triplets, valid = mining.hard_triplets(key, dist, y)
      return losses.adaptive_triplet_loss_from_embeddings(emb, triplets, valid=valid)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = init(jax.random.key(args.seed))
  state = [params, opt.init(params), 0]
  data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
  key = jax.random.key(args.seed + 1)

  def run_steps(count):
    params, opt_state, i = state
    for _ in range(count):
      x, y = data[i % len(data)]
      params, opt_state, loss = train_step(params, opt_state, key, np.int32(i), x, y)
      i += 1
    loss.block_until_ready()
    state[:] = [params, opt_state, i]

  return run_steps


def bench_torch(batches, args, threads, metric=True):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import miners

  torch.manual_seed(args.seed)
  model = torch.nn.Sequential(torch.nn.Linear(args.in_dim, args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, args.dim))
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  miner = miners.BatchHardMiner()
  loss_fn = pml_losses.TripletMarginLoss(margin=0.2)
  data = [(torch.from_numpy(x), torch.from_numpy(y).long()) for x, y in batches]
  step_count = [0]

  def run_steps(count):
    torch.set_num_threads(threads)
    for _ in range(count):
      x, y = data[step_count[0] % len(data)]
      emb = model(x)
      loss = loss_fn(emb, y, miner(emb, y)) if metric else (emb * emb).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      step_count[0] += 1
    loss.item()

  return run_steps


def main(argv=None):
  args = parse_args(argv)
  import jax
  threads = [int(t) for t in args.threads.split(",")]
  print(f"# train step: MLP {args.in_dim}-{args.hidden}-{args.dim}, K={args.per_class} per class, "
        f"Adam; median of {args.rounds} rounds x {args.steps} steps; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}")
  print("\n| batch | fgir_jax ms/step | jax warm-up s | PyTorch + PML ms/step | ratio "
        "| MLP alone: fgir_jax / PyTorch ms | mining + loss: fgir_jax / PyTorch ms | ratio |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for size in (int(s) for s in args.sizes.split(",")):
    batches = make_batches(size, args)
    runners = {"jax": bench_jax(batches, args), "jax_mlp": bench_jax(batches, args, False)}
    if not args.skip_torch:
      runners.update({t: bench_torch(batches, args, t) for t in threads})
      runners.update({("mlp", t): bench_torch(batches, args, t, False) for t in threads})
    warm, times = interleaved(runners, args)
    cells = ["-"] * 5
    if not args.skip_torch:
      best = min(threads, key=times.get)
      mlp = times[("mlp", best)]
      ours_part, peer_part = times["jax"] - times["jax_mlp"], times[best] - mlp
      cells = [f"{1e3 * times[best]:.2f} ({best} thread{'s' * (best > 1)})",
               f"**{times[best] / times['jax']:.1f}x**",
               f"{1e3 * times['jax_mlp']:.2f} / {1e3 * mlp:.2f}",
               f"{1e3 * ours_part:.2f} / {1e3 * peer_part:.2f}",
               f"{peer_part / ours_part:.1f}x" if ours_part > 0 else "-"]
    print(f"| {size} | {1e3 * times['jax']:.2f} | {warm['jax']:.1f} | " + " | ".join(cells) + " |",
          flush=True)
  print(f"\n# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
