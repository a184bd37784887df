"""Stage 2 with each class-aware term, on a finished run's frozen features, over seeds.

    python bench/probe_class_terms.py --workdir runs/ablation_cub50 \
        --variants adaptive,ce,adaptive+centers:1,adaptive+proxies:1,adaptive+classifier:1

A variant is `<loss>[+<class_term>:<weight>]`. Each trains the hash layer exactly as
the run's stage 2 does (same settings, the same per-seed keys as stage2_<bits>_s<k>)
and prints mAP per code length as mean ± sample std over the seeds, and the seconds
per hash layer. Used to choose stage2.class_term and its weight (docs/real-birds.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

from fgir_jax import metrics
from fgir_jax.train import hash_layer
from fgir_jax.train import stages
from fgir_jax.train.context import name_to_int


def parse_variant(text: str) -> dict:
  loss, _, term = text.partition("+")
  out = {"loss": loss}
  if term:
    name, _, weight = term.partition(":")
    out.update(class_term=name, class_weight=float(weight or 1.0))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a finished run (its stage1/features.npz)")
  p.add_argument("--variants", default="adaptive,ce,adaptive+centers:1,adaptive+proxies:1")
  p.add_argument("--bits", default="16,32,48,64")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=0, help="0: the run's stage2.epochs")
  args = p.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    s2 = json.load(f)["stage2"]
  with np.load(os.path.join(args.workdir, "stage1", "features.npz")) as f:
    feats = dict(f)
  tr = feats["is_train"]
  x, y = feats["features"][tr], feats["labels"][tr]
  xq, yq = feats["features"][~tr], feats["labels"][~tr]
  classes = int(feats["labels"].max()) + 1
  base = hash_layer.Stage2Settings(
      bits=16, epochs=args.epochs or s2["epochs"], mine_every=s2["mine_every"],
      batch_size=s2["batch_size"], learning_rate=s2["learning_rate"],
      margin_mode=s2["margin_mode"], margin=s2["margin"], ema_decay=s2["ema_decay"],
      beta=s2["beta"], neg_factor=s2["neg_factor"], num_classes=classes)
  bits_list = [int(b) for b in args.bits.split(",")]
  print(f"{len(x)} database / {len(xq)} queries, {classes} classes, {base.epochs} epochs, "
        f"{args.seeds} seeds; mAP mean ± std over seeds")
  print("| variant | " + " | ".join(f"{b} bits" for b in bits_list) + " | s per layer |")
  print("| --- |" + " --- |" * (len(bits_list) + 1))
  for text in args.variants.split(","):
    cells, seconds = [], []
    for bits in bits_list:
      settings = dataclasses.replace(base, bits=bits, **parse_variant(text))
      maps = []
      for seed in range(args.seeds):
        # The pipeline's key for this stage: Run.stage_key(stage2_<bits>[_s<k>]), seed 0.
        key = jax.random.fold_in(jax.random.key(0),
                                 name_to_int(stages.stage_name("stage2", bits, seed)))
        started = time.perf_counter()
        state = hash_layer.train_hash_layer(key, x, y, settings)
        params = hash_layer.hash_params(state)
        codes = lambda f: np.asarray(hash_layer.hash_outputs(params, f) > 0)
        maps.append(metrics.mean_average_precision(codes(xq), yq, codes(x), y))
        seconds.append(time.perf_counter() - started)
      std = np.std(maps, ddof=1) if len(maps) > 1 else 0.0
      cells.append(f"{100 * np.mean(maps):.2f} ± {100 * std:.2f}")
    print(f"| {text} | " + " | ".join(cells) + f" | {np.median(seconds):.1f} |", flush=True)


if __name__ == "__main__":
  main()
