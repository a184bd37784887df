"""Stage 2 on cached features at CUB's size: 90 epochs, re-mining every 3 epochs.

    python bench/bench_stage2.py                   # 5,994 x 512 features, 200 classes, 64 bits
    python bench/bench_stage2.py --bits 16,64 --eval-every 3

Features are synthetic class clusters (pooled ResNet18-I features are 512-d);
the timing covers what `launch.py`'s stage 2 does for one code length once
the frozen network's features are cached: hash-layer training, re-mining
over the whole training set every `--mine-every` epochs, and (with
--eval-every) the query-set mAP of the logged curve. Target: under 60 s on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402

from fgir_jax import metrics  # noqa: E402
from fgir_jax.train import hash_layer  # noqa: E402


def clustered(rng, centers, per_class, noise):
  labels = np.repeat(np.arange(len(centers)), per_class)
  feats = centers[labels] + noise * rng.normal(size=(len(labels), centers.shape[1]))
  return np.maximum(feats, 0).astype(np.float32), labels  # post-ReLU pooled features


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--train", type=int, default=5994)
  p.add_argument("--test", type=int, default=5794)
  p.add_argument("--classes", type=int, default=200)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--bits", default="64")
  p.add_argument("--epochs", type=int, default=90)
  p.add_argument("--mine-every", type=int, default=3)
  p.add_argument("--eval-every", type=int, default=0, help="0: no per-epoch mAP")
  args = p.parse_args()

  rng = np.random.default_rng(0)
  centers = rng.normal(size=(args.classes, args.dim))
  x_tr, y_tr = clustered(rng, centers, -(-args.train // args.classes), 2.0)
  x_te, y_te = clustered(rng, centers, -(-args.test // args.classes), 2.0)
  x_tr, y_tr, x_te, y_te = x_tr[:args.train], y_tr[:args.train], x_te[:args.test], y_te[:args.test]
  print(f"stage 2: {len(y_tr)} train / {len(y_te)} query features of {args.dim} dims, "
        f"{args.classes} classes, {args.epochs} epochs, re-mining every {args.mine_every}; "
        f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores")
  codes = lambda params, x: np.asarray(hash_layer.hash_outputs(params, x) > 0)  # noqa: E731
  for bits in (int(b) for b in args.bits.split(",")):
    settings = hash_layer.Stage2Settings(bits=bits, epochs=args.epochs, mine_every=args.mine_every)

    def on_epoch(epoch, state, stats):
      if args.eval_every and epoch % args.eval_every == 0:
        params = state["train"]["params"]
        metrics.mean_average_precision(codes(params, x_te), y_te, codes(params, x_tr), y_tr)

    # A first short run compiles everything; the timed run is a fresh one.
    hash_layer.train_hash_layer(jax.random.key(1), x_tr, y_tr,
                            hash_layer.Stage2Settings(bits=bits, epochs=args.mine_every + 1,
                                                  mine_every=args.mine_every))
    start = time.perf_counter()
    state = hash_layer.train_hash_layer(jax.random.key(0), x_tr, y_tr, settings, on_epoch=on_epoch)
    params = jax.block_until_ready(state["train"]["params"])
    seconds = time.perf_counter() - start
    m = metrics.mean_average_precision(codes(params, x_te), y_te, codes(params, x_tr), y_tr)
    print(f"{bits:3d} bits: {seconds:6.1f} s for {args.epochs} epochs "
          f"({args.epochs // args.mine_every} minings{', mAP every %d epochs' % args.eval_every if args.eval_every else ''}); "
          f"final mAP {m:.4f}")


if __name__ == "__main__":
  main()
