"""Probe: is the synthetic set harder uncropped than cropped to the object?

Trains the same tiny CNN (BatchNorm, Adam, flips) on `data.make_synthetic()`
three times, each input resized to --size:
  uncropped   the whole images;
  saliency    crops to the boxes the uncropped network's own last feature map
              gives (the paper's step 1 with the bootstrap network: channel
              mean, alpha=0.4, largest component), with their CorLoc;
  true box    crops to the true boxes (the upper bound of any crop).
It prints test accuracy and the retrieval mAP of the pooled features (cosine
ranking of the test queries against the training database). About ten
minutes on a 2-core CPU.

    python bench/probe_synthetic.py [--size 64] [--epochs 20] [--which uncropped,saliency,true]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from fgir_jax import data


class TinyCNN(nn.Module):
  """Conv-BN-ReLU pairs (the second of each with stride 2), global pooling, a linear head."""
  widths: tuple = (16, 32, 64)
  num_classes: int = 20

  @nn.compact
  def __call__(self, x, train: bool = False):
    for w in self.widths:
      for stride in (1, 2):
        x = nn.Conv(w, (3, 3), strides=stride, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    pooled = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(pooled), {"pooled": pooled, "feature_map": x}


def mean_ap(q, ql, db, dbl):
  """mAP of cosine ranking (brute force, small sets)."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  db = db / np.linalg.norm(db, axis=1, keepdims=True)
  order = np.argsort(-(q @ db.T), axis=1, kind="stable")
  rel = dbl[order] == ql[:, None]
  prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
  return float(np.mean((prec * rel).sum(1) / rel.sum(1)))


def run(images, labels, is_train, num_classes, epochs, seed=0, batch=64):
  x = images.astype(np.float32) / 127.5 - 1.0
  xtr, ytr, xte, yte = x[is_train], labels[is_train], x[~is_train], labels[~is_train]
  model = TinyCNN(num_classes=num_classes)
  variables = model.init(jax.random.key(seed), xtr[:1])
  params, stats = variables["params"], variables["batch_stats"]
  steps = epochs * (len(xtr) // batch)
  opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, stats, opt_state, xb, yb, key):
    flip = jax.random.bernoulli(key, 0.5, (xb.shape[0], 1, 1, 1))
    xb = jnp.where(flip, xb[:, :, ::-1], xb)  # the birds face both ways anyway
    def loss_fn(p):
      (logits, _), new = model.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                     mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  predict = jax.jit(lambda p, s, xb: model.apply({"params": p, "batch_stats": s}, xb))
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed + 1)
  for _ in range(epochs):
    perm = rng.permutation(len(xtr))
    for i in range(0, len(perm) - batch + 1, batch):
      key, sub = jax.random.split(key)
      params, stats, opt_state, _ = step(params, stats, opt_state, xtr[perm[i:i + batch]],
                                         ytr[perm[i:i + batch]], sub)
  out_te = [predict(params, stats, xte[i:i + 256]) for i in range(0, len(xte), 256)]
  out_tr = [predict(params, stats, xtr[i:i + 256]) for i in range(0, len(xtr), 256)]
  logits = np.concatenate([np.asarray(o[0]) for o in out_te])
  f_te = np.concatenate([np.asarray(o[1]["pooled"]) for o in out_te])
  f_tr = np.concatenate([np.asarray(o[1]["pooled"]) for o in out_tr])
  acc = float((logits.argmax(1) == yte).mean())
  feature_map = lambda xs: np.concatenate(
      [np.asarray(predict(params, stats, xs[i:i + 256])[1]["feature_map"])
       for i in range(0, len(xs), 256)])
  return acc, mean_ap(f_te, yte, f_tr, ytr), lambda: feature_map(x)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=64, help="network input side, pixels")
  parser.add_argument("--image-size", type=int, default=96, help="synthetic image side, pixels")
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--clutter", type=float, default=1.0)
  parser.add_argument("--per-class", type=int, default=100)
  parser.add_argument("--which", default="uncropped,saliency,true", help="runs to do")
  args = parser.parse_args()
  t0 = time.perf_counter()
  ds = data.make_synthetic(per_class=args.per_class, size=args.image_size, seed=args.seed,
                           clutter=args.clutter)
  print(f"made {len(ds)} images in {time.perf_counter() - t0:.1f} s "
        f"({ds.num_classes} classes, {ds.is_train.sum()} train / {(~ds.is_train).sum()} test)")
  full = data.cached_images(ds, args.size, cache_dir=None).images
  runs = args.which.split(",")
  feature_maps = None
  if "uncropped" in runs or "saliency" in runs:
    t0 = time.perf_counter()
    acc, m, feature_maps = run(full, ds.labels, ds.is_train, ds.num_classes, args.epochs, args.seed)
    print(f"uncropped  (input {args.size} px) test accuracy {acc:.3f}  feature mAP {m:.3f}  "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  if "saliency" in runs:
    from fgir_jax import saliency  # pylint: disable=g-import-not-at-top
    maps = saliency.saliency_maps(feature_maps())
    boxes = np.asarray(saliency.boxes_from_maps(maps, alpha=0.4, image_size=args.size))
    hit = saliency.corloc(boxes, ds.boxes)
    crops = data.cached_crops(ds, boxes, args.size, cache_dir=None).images
    t0 = time.perf_counter()
    acc, m, _ = run(crops, ds.labels, ds.is_train, ds.num_classes, args.epochs, args.seed)
    print(f"saliency   (input {args.size} px) test accuracy {acc:.3f}  feature mAP {m:.3f}  "
          f"({time.perf_counter() - t0:.0f} s; CorLoc of the boxes {hit:.3f})", flush=True)
  if "true" in runs:
    crops = data.cached_crops(ds, ds.boxes, args.size, cache_dir=None).images
    t0 = time.perf_counter()
    acc, m, _ = run(crops, ds.labels, ds.is_train, ds.num_classes, args.epochs, args.seed)
    print(f"true box   (input {args.size} px) test accuracy {acc:.3f}  feature mAP {m:.3f}  "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

if __name__ == "__main__":
  main()
