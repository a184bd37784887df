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


MAP_LAYERS = ("output", "last_stage", "stage<k>")


def check_map_layer(layer: str, num_stages: int) -> str:
  """saliency.layer: "output", "last_stage" or "stage1" .. "stage<num_stages>"."""
  if layer in ("output", "last_stage"):
    return layer
  number = layer[len("stage"):] if layer.startswith("stage") else ""
  if not (number.isdigit() and 1 <= int(number) <= num_stages):
    raise ValueError(f"saliency.layer must be 'output', 'last_stage' or one of stage1 .. "
                     f"stage{num_stages} (the backbone's stages of blocks), got {layer!r}.")
  return layer


@functools.partial(jax.jit, static_argnames=("net", "with_maps", "map_layer"))
def _forward(variables, images, *, net: nn.Module, with_maps: bool, map_layer: str = "output"):
  if with_maps and map_layer != "output":
    (logits, out), state = net.apply(variables, images, train=False, mutable=["intermediates"])
  else:
    (logits, out), state = net.apply(variables, images, train=False), {}
  result = {"pooled": out["pooled"]}
  if logits is not None:
    result["logits"] = logits
  if with_maps:
    # Channel mean, min-max scaled: the grey image of PAPER.md step 1, kept at
    # the map's own resolution (h', w'); boxes are found on the upsampled map.
    result["maps"] = saliency.saliency_maps(_map_features(out, state, map_layer))
  return result


def _map_features(out: dict, state: dict, map_layer: str):
  """The feature map the saliency map is taken from.

  "output": the network's deepest map (ResNet18: layer4's output).
  "last_stage": the output of the backbone's last stage of blocks, ReLU'd;
  for ResNet it is the same map, for EfficientNet-Lite it is the 320-channel
  map before the 1x1 head conv, whose ReLU6 saturates and blurs the map
  (bench/probe_saliency.py measures both against true boxes).
  "stage<k>": the output of stage k, ReLU'd: a finer map (EfficientNet-Lite's
  stage 5 has stride 16, twice the resolution of the last stage).
  """
  if map_layer == "output":
    return out["feature_map"]
  stages = state["intermediates"]["backbone"]
  numbered = {k: int(k[len("stage"):]) for k in stages if k.startswith("stage")}
  name = max(numbered, key=numbered.get) if map_layer == "last_stage" else map_layer
  if name not in stages:
    raise ValueError(f"map_layer must be 'output', 'last_stage' or one of "
                     f"{', '.join(sorted(numbered, key=numbered.get))}, got {map_layer!r}.")
  return jax.nn.relu(stages[name][0].astype(jnp.float32))


def run_network(net: nn.Module, variables: dict, inputs: batching.DeviceInput, *,
                batch_size: int = 128, with_maps: bool = False, progress=None,
                mesh=None, map_layer: str = "output") -> dict:
  """Eval-mode outputs of `net` for every example of `inputs`, in order.

  Returns NumPy arrays: "pooled" (n, c), "logits" (n, classes) when the net
  has a classifier, "maps" (n, h', w') saliency maps when `with_maps`, from
  the layer `map_layer` names (MAP_LAYERS; see `_map_features`).
  `mesh`: split each batch over its devices (batch_size a multiple of them).
  """
  parallel.check_divisible(batch_size, mesh, "eval.batch_size")
  variables = parallel.replicate(variables, mesh)
  chunks = []
  for batch in inputs.eval_batches(batch_size):
    image = parallel.shard_batch(batch["image"], mesh)
    out = _forward(variables, image, net=net, with_maps=with_maps, map_layer=map_layer)
    chunks.append((np.asarray(batch["mask"]), parallel.to_host(out)))
    if progress is not None:
      progress(int(np.asarray(batch["mask"]).sum()))
  keys = chunks[0][1].keys()
  return {k: np.concatenate([out[k][mask] for mask, out in chunks]) for k in keys}
