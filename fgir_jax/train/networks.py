"""The networks of a config and their saved variables: what stages train and later stages run.

`make_net` builds the stage-1 classifier (also the saliency bootstrap network);
`init_variables` gives it fresh variables, with the ImageNet backbone when
model.pretrained is set. A stage that trains a network saves its final
variables with `save_variables` ({"params", "batch_stats"}, msgpack); running
it later needs only `load_variables`, no optimizer state and no checkpoint.
"""

from __future__ import annotations

import functools
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import models


def make_net(config, num_classes: int, enhance: bool | None = None,
             frozen: bool = True) -> models.RetrievalNet:
  """The stage-1 network of the config (no hash head: stage 2 trains it on features).

  frozen=False leaves out model.frozen_stages (a network that is only run, never trained).
  """
  m = config.model
  return models.RetrievalNet(
      num_classes=num_classes, hash_bits=None,
      enhance=m.enhance if enhance is None else enhance, width=m.width,
      enhance_scale=m.enhance_scale, dtype=jnp.dtype(m.dtype), backbone=m.backbone,
      depth=float(m.depth),
      frozen_stages=int(m.frozen_stages) if frozen else 0)


def pretrained_path(config) -> str | None:
  """model.pretrained as load_imagenet's path: None for "imagenet" (the standard file)."""
  return None if config.model.pretrained == "imagenet" else config.model.pretrained


def init_variables(config, net, key) -> dict:
  """Fresh variables of `net` at the config's image size, with the ImageNet backbone
  when model.pretrained is set."""
  size = int(config.data.image_size)
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(functools.partial(net.init, train=False))(key, dummy)
  if config.model.pretrained:
    variables = models.load_imagenet(variables, backbone=net.backbone,
                                     path=pretrained_path(config),
                                     progress=bool(config.progress))
  return variables


def save_variables(path: str, variables: dict) -> None:
  """A network's {"params", "batch_stats"} as one msgpack file, written atomically."""
  state = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(state)))
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load_variables(path: str) -> dict:
  """The variables `save_variables` wrote, as JAX arrays."""
  with open(path, "rb") as f:
    state = flax.serialization.msgpack_restore(f.read())
  return jax.tree.map(jnp.asarray, state)
