"""Run by test_parallel.py in a fresh process with two host devices (XLA_FLAGS set before JAX
starts): every data-parallel path against its single-device counterpart. Prints one JSON object.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fgir_jax import losses, metrics, mining, models, parallel  # pylint: disable=g-import-not-at-top
from fgir_jax.train import hash_layer, stage1_step  # pylint: disable=g-import-not-at-top


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def stage1_steps(mesh, steps=3):
  """Three SGD steps of a tiny ResNet18 (BatchNorm included) from the same start; the
  enhancement block adds nothing to what sharding does, only compile time."""
  net = models.RetrievalNet(num_classes=5, hash_bits=None, enhance=False, width=0.0625)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(steps, 8, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 5, (steps, 8)).astype(np.int32)
  variables = net.init(jax.random.key(0), jnp.asarray(images[0]), train=False)
  if mesh is None:
    return variables
  settings = stage1_step.Stage1Settings(epochs=1, batch_size=8, learning_rate=0.1, warmup_epochs=0)
  optimizer = stage1_step.make_optimizer(settings, steps)
  state = parallel.replicate(stage1_step.create_state(variables, optimizer), mesh)
  for i in range(steps):
    batch = {"image": images[i], "label": labels[i], "mask": np.ones(8, bool)}
    state, _ = stage1_step.train_step(state, parallel.shard_batch(batch, mesh), net=net,
                                 optimizer=optimizer)
  return state


def main():
  mesh = parallel.data_mesh()
  single = parallel.data_mesh(1)
  out = {"devices": parallel.size(mesh)}

  sharded_state, single_state = stage1_steps(mesh), stage1_steps(single)
  start = stage1_steps(None)
  for part in ("params", "batch_stats"):
    # How far the sharded result is from the single-device one (float sums
    # reorder), beside how far the steps moved the variables at all.
    out[f"stage1_{part}_diff"] = max_diff(single_state[part], sharded_state[part])
    out[f"stage1_{part}_moved"] = max_diff(start[part], single_state[part])
  out["stage1_params_replicated"] = all(
      x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded_state["params"]))

  rng = np.random.default_rng(1)
  x = rng.normal(size=(301, 8)).astype(np.float32)
  y = rng.integers(0, 6, 301)
  key = jax.random.key(3)
  a = mining.hard_triplets_from_embeddings(key, x, y, block_size=32)
  b = mining.hard_triplets_from_embeddings(key, x, y, block_size=32, mesh=mesh)
  c = mining.hard_triplets(key, losses.pairwise_distances(x), y, mesh=mesh)
  out["miner_equal"] = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                            and np.array_equal(a[0], c[0]))

  q, db = rng.integers(0, 2, (77, 12)), rng.integers(0, 2, (250, 12))
  ql, dl = rng.integers(0, 5, 77), rng.integers(0, 5, 250)
  diffs = []
  for ties in ("stable", "average"):
    for topk in (None, 15):
      ref = metrics.average_precisions(q, ql, db, dl, topk=topk, ties=ties, chunk_size=9)
      got = metrics.average_precisions(q, ql, db, dl, topk=topk, ties=ties, chunk_size=9,
                                       mesh=mesh)
      diffs.append(float(np.nanmax(np.abs(ref - got))))
  out["map_diff"] = max(diffs)

  feats = rng.normal(size=(120, 16)).astype(np.float32)
  labels = rng.integers(0, 4, 120)
  settings = hash_layer.Stage2Settings(bits=8, epochs=3, mine_every=1, batch_size=16, num_classes=4)
  s_one = hash_layer.train_hash_layer(jax.random.key(0), feats, labels, settings)
  s_two = hash_layer.train_hash_layer(jax.random.key(0), feats, labels, settings, mesh=mesh)
  out["stage2_param_diff"] = max_diff(hash_layer.hash_params(s_one), hash_layer.hash_params(s_two))
  out["stage2_triplets_equal"] = bool(np.array_equal(s_one["triplets"], s_two["triplets"]))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
