"""The floor the full method must beat: frozen ImageNet features + the stage-2 hash layer.

    python bench/frozen_baseline.py --root data/cub50

Pooled features of the ImageNet network (frozen, eval mode, whole images at
--size, no saliency crop, no fine-tuning) go straight to this project's stage 2
(`train.hash_layer.train_hash_layer`, the paper's settings: 90 epochs, Adam 1e-3,
re-mining every 3 epochs) with the adaptive loss; mAP over Hamming ranking of
the test split against the train split, at each code length.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import metrics
from fgir_jax.data import batching
from fgir_jax.train import inference
from fgir_jax.train import hash_layer
import pretrained_cub  # bench/pretrained_cub.py


def main() -> None:
  parser = pretrained_cub.parser(__doc__.splitlines()[0])
  parser.add_argument("--bits", default="16,64")
  parser.add_argument("--loss", default="adaptive", choices=hash_layer.LOSSES)
  args = parser.parse_args()

  ds, images, net, variables = pretrained_cub.load(args)
  start = time.perf_counter()
  feats = inference.run_network(net, variables, batching.DeviceInput(images, ds.labels),
                                batch_size=64)["pooled"]
  print(f"{ds.name}: features of {len(images)} images in {time.perf_counter() - start:.0f} s")
  tr = ds.is_train
  for bits in (int(b) for b in args.bits.split(",")):
    settings = hash_layer.Stage2Settings(bits=bits, loss=args.loss, num_classes=len(ds.class_names))
    state = hash_layer.train_hash_layer(jax.random.key(1), feats[tr], ds.labels[tr], settings)
    params = hash_layer.hash_params(state)
    codes = lambda x: np.asarray(hash_layer.hash_outputs(params, jnp.asarray(x)) > 0)
    m = metrics.mean_average_precision(codes(feats[~tr]), ds.labels[~tr], codes(feats[tr]),
                                       ds.labels[tr])
    print(f"{args.backbone} frozen, whole images, {args.loss}: mAP {bits} bits {100 * m:.2f}%")


if __name__ == "__main__":
  main()
