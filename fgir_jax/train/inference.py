"""Frozen-network passes over a whole image array: logits, pooled features, saliency maps.

Stage 2 and evaluation need the network's outputs for every image once (eval
mode: BatchNorm uses its running statistics). One jitted forward per batch;
the host only concatenates small per-batch results.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import parallel
from fgir_jax import saliency
from fgir_jax.data import batching


@functools.partial(jax.jit, static_argnames=("net", "with_maps"))
def _forward(variables, images, *, net: nn.Module, with_maps: bool):
  logits, out = net.apply(variables, images, train=False)
  result = {"pooled": out["pooled"]}
  if logits is not None:
    result["logits"] = logits
  if with_maps:
    # Channel mean, min-max scaled: the grey image of PAPER.md step 1, kept at
    # the map's own resolution (h', w'); boxes are found on the upsampled map.
    result["maps"] = saliency.saliency_maps(out["feature_map"])
  return result


def run_network(net: nn.Module, variables: dict, inputs: batching.DeviceInput, *,
                batch_size: int = 128, with_maps: bool = False, progress=None,
                mesh=None) -> dict:
  """Eval-mode outputs of `net` for every example of `inputs`, in order.

  Returns NumPy arrays: "pooled" (n, c), "logits" (n, classes) when the net
  has a classifier, "maps" (n, h', w') saliency maps when `with_maps`.
  `mesh`: split each batch over its devices (batch_size a multiple of them).
  """
  parallel.check_divisible(batch_size, mesh, "eval.batch_size")
  variables = parallel.replicate(variables, mesh)
  chunks = []
  for batch in inputs.eval_batches(batch_size):
    image = parallel.shard_batch(batch["image"], mesh)
    out = _forward(variables, image, net=net, with_maps=with_maps)
    chunks.append((np.asarray(batch["mask"]), jax.device_get(out)))
    if progress is not None:
      progress(int(np.asarray(batch["mask"]).sum()))
  keys = chunks[0][1].keys()
  return {k: np.concatenate([out[k][mask] for mask, out in chunks]) for k in keys}
