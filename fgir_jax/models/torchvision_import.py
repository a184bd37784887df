"""Import torchvision ResNet weights (ImageNet) into a RetrievalNet.

torchvision stores convolutions as OIHW and Linear weights as (out, in); Flax
wants HWIO and (in, out). Names map one to one (dots become the module path):

    conv1.weight                         -> params/backbone/conv1/kernel
    bn1.weight, bn1.bias                 -> params/backbone/bn1/scale, bias
    bn1.running_mean, bn1.running_var    -> batch_stats/backbone/bn1/mean, var
    layer2.0.conv1.weight                -> params/backbone/layer2_0/conv1/kernel
    layer2.0.downsample.0.weight         -> params/backbone/layer2_0/downsample_conv/kernel
    layer2.0.downsample.1.*              -> .../layer2_0/downsample_bn/*
    fc.weight, fc.bias                   -> params/classifier/kernel, bias

`num_batches_tracked` is ignored. The list of tensors expected comes from the
model's own tree, so width multipliers and other stage sizes are checked
tensor by tensor. torch is imported only to read a `.pth`/`.pt` file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

_BN = (("weight", "params", "scale"), ("bias", "params", "bias"),
       ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))
_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")


def _to_numpy(value) -> np.ndarray:
  """numpy / jax array or torch tensor -> numpy array, without importing torch."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
      return value.numpy()
    return value.float().numpy()  # numpy has no bfloat16; float16 is upcast alike
  return np.asarray(value)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torchvision state dict from `.npz` (no torch needed) or `.pth`/`.pt`.

  Returns:
    {torchvision name: numpy array}.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"reading {path!r} needs PyTorch, which is not installed; convert it on a machine "
          "with torch: python -m fgir_jax.models.convert_weights IN.pth OUT.npz") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k: _to_numpy(v) for k, v in obj.items()}
  raise ValueError(f"weights file {path!r} must end in .npz, .pth or .pt.")


def _as_state_dict(state_dict) -> dict[str, Any]:
  if isinstance(state_dict, (str, os.PathLike)):
    return load_state_dict(state_dict)
  if not isinstance(state_dict, Mapping):
    raise ValueError("state_dict must be a mapping of torchvision names to arrays or a "
                     f"path to .npz/.pth, got {type(state_dict).__name__}.")
  state_dict = dict(state_dict)
  # Checkpoints saved from nn.DataParallel prefix every name with "module.".
  if state_dict and all(k.startswith("module.") for k in state_dict):
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
  return state_dict


def _backbone_mapping(backbone: Mapping) -> list[tuple[str, str, tuple[str, ...]]]:
  """[(torch name, collection, flax path)] for the backbone, in torchvision order."""
  entries = [("conv1.weight", "params", ("backbone", "conv1", "kernel"))]
  entries += [(f"bn1.{t}", col, ("backbone", "bn1", f)) for t, col, f in _BN]
  blocks = sorted((tuple(int(g) for g in m.groups()), name)
                  for name in backbone if (m := _BLOCK.match(name)))
  for (stage, index), name in blocks:
    prefix = f"layer{stage}.{index}"
    for k in (1, 2):
      entries.append((f"{prefix}.conv{k}.weight", "params", ("backbone", name, f"conv{k}", "kernel")))
      entries += [(f"{prefix}.bn{k}.{t}", col, ("backbone", name, f"bn{k}", f)) for t, col, f in _BN]
    if "downsample_conv" in backbone[name]:
      entries.append((f"{prefix}.downsample.0.weight", "params",
                      ("backbone", name, "downsample_conv", "kernel")))
      entries += [(f"{prefix}.downsample.1.{t}", col, ("backbone", name, "downsample_bn", f))
                  for t, col, f in _BN]
  return entries


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _copy_dicts(tree):
  """Copies the nested dicts (not the arrays), so the caller's tree is left alone."""
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _to_flax(array: np.ndarray) -> np.ndarray:
  """torch layout -> flax layout: OIHW -> HWIO, (out, in) -> (in, out), vectors as is."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape torchvision would store for a Flax leaf of `flax_shape`."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _place(value: np.ndarray, target) -> jax.Array:
  """The imported tensor with the dtype (and sharding) of the leaf it replaces."""
  array = jnp.asarray(_to_flax(value), dtype=target.dtype)
  if isinstance(target, jax.Array):
    array = jax.device_put(array, target.sharding)
  return array


def _check(state_dict: Mapping, name: str, target) -> np.ndarray:
  """The tensor `name`, or a ValueError saying it is missing or misshapen."""
  if name not in state_dict:
    raise ValueError(f"state_dict is missing {name!r}; is it a torchvision ResNet state dict "
                     "for this network's stage sizes?")
  value = _to_numpy(state_dict[name])
  expected = _torch_shape(tuple(target.shape))
  if tuple(value.shape) != expected:
    raise ValueError(f"state_dict[{name!r}] has shape {tuple(value.shape)}, but this network "
                     f"expects {expected} (torch layout); check width and stage sizes.")
  return value


def _load_fc(state_dict: Mapping, params: dict, out: dict) -> None:
  """Replaces the classifier with fc when it fits; otherwise keeps it and logs why."""
  if "classifier" not in params:
    log.info("The network has no classifier (num_classes=None); fc.* is not imported.")
    return
  kernel, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
  want_w, want_b = _torch_shape(tuple(kernel.shape)), tuple(bias.shape)
  if "fc.weight" not in state_dict or "fc.bias" not in state_dict:
    log.warning("state_dict has no fc.weight/fc.bias; keeping the network's classifier.")
    return
  got_w = tuple(_to_numpy(state_dict["fc.weight"]).shape)
  got_b = tuple(_to_numpy(state_dict["fc.bias"]).shape)
  if (got_w, got_b) != (want_w, want_b):
    log.warning("fc.weight has shape %s but the classifier needs %s; keeping the network's "
                "classifier (as expected when fine-tuning on other classes).", got_w, want_w)
    return
  out["params"]["classifier"]["kernel"] = _place(_to_numpy(state_dict["fc.weight"]), kernel)
  out["params"]["classifier"]["bias"] = _place(_to_numpy(state_dict["fc.bias"]), bias)


def load_torchvision_resnet18(state_dict, variables):
  """Puts torchvision ResNet weights into a RetrievalNet's variables.

  Args:
    state_dict: {torchvision name: array} (numpy, jax or torch tensors, e.g.
      from `torch.load(..., weights_only=True)`), or a path to an `.npz`
      (from `python -m fgir_jax.models.convert_weights`) or a `.pth`/`.pt`.
    variables: `RetrievalNet(...).init(...)` output ({"params", "batch_stats"});
      not modified.

  Returns:
    New variables: the backbone's params and BatchNorm statistics replaced;
    the classifier replaced by fc when their shapes match (otherwise kept,
    with a logged warning: the usual case for 200 classes against
    ImageNet's 1000); the enhancement block and hash head kept as they were.
    Each leaf keeps the dtype (and sharding) it had.

  Raises:
    ValueError: naming the first backbone tensor that is missing or whose
      shape differs (expected vs. got, torch layout), or a tensor the network
      has no place for (e.g. a resnet34 checkpoint for a resnet18).
  """
  state_dict = _as_state_dict(state_dict)
  if not isinstance(variables, Mapping) or "backbone" not in variables.get("params", {}):
    raise ValueError("variables must be RetrievalNet variables with params['backbone'] "
                     "(the output of RetrievalNet(...).init).")
  if "batch_stats" not in variables:
    raise ValueError("variables has no 'batch_stats'; pass the whole init output, not params only.")
  entries = _backbone_mapping(variables["params"]["backbone"])
  known = {name for name, _, _ in entries} | {"fc.weight", "fc.bias"}
  unexpected = [k for k in state_dict if k not in known and not k.endswith("num_batches_tracked")]
  if unexpected:
    raise ValueError(f"state_dict has {len(unexpected)} tensor(s) this network has no place for, "
                     f"first {unexpected[0]!r}; is it a checkpoint of another ResNet depth?")
  out = _copy_dicts(variables)
  for name, collection, path in entries:
    target = _get(variables[collection], path)
    _set(out[collection], path, _place(_check(state_dict, name, target), target))
  _load_fc(state_dict, variables["params"], out)
  return out
