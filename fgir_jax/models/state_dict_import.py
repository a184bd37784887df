"""Puts a PyTorch state dict into Flax variables, tensor by tensor, with errors that name the tensor.

The backbone importers (`torchvision_import`, `efficientnet_import`) only list
which torch name goes where; this module reads the file, converts layouts
(conv OIHW -> HWIO, Linear (out, in) -> (in, out)), checks every shape and
keeps each leaf's dtype and sharding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax.models import npz_file
from fgir_jax.models import torch_checkpoint

log = logging.getLogger(__name__)

# torch BatchNorm tensor -> (collection, flax leaf).
BN = (("weight", "params", "scale"), ("bias", "params", "bias"),
      ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))

Entry = tuple[str, str, tuple[str, ...]]  # (torch name, collection, flax path)


def conv_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
  return [(f"{torch_prefix}.weight", "params", path + ("kernel",))]


def bn_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
  return [(f"{torch_prefix}.{t}", col, path + (leaf,)) for t, col, leaf in BN]


def to_numpy(value) -> np.ndarray:
  """numpy / jax array or torch tensor -> numpy array, without importing torch."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
      return value.numpy()
    return value.float().numpy()  # numpy has no bfloat16; float16 is upcast alike
  return np.asarray(value)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{torch name: array} from an `.npz` or a `.pth`/`.pt`, never importing torch.

  `.pth` files go through `torch_checkpoint`'s allow-listed unpickler: a file
  that names any other global raises ValueError and nothing in it runs.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    return npz_file.load(path)
  if ext in (".pth", ".pt"):
    return torch_checkpoint.load_state_dict(path)
  raise ValueError(f"weights file {path!r} must end in .npz, .pth or .pt.")


def as_state_dict(state_dict) -> dict[str, Any]:
  """A path or a mapping -> {name: array-like}, DataParallel's "module." prefix dropped."""
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict(state_dict)
  if not isinstance(state_dict, Mapping):
    raise ValueError("state_dict must be a mapping of torch names to arrays or a "
                     f"path to .npz/.pth, got {type(state_dict).__name__}.")
  state_dict = dict(state_dict)
  if state_dict and all(k.startswith("module.") for k in state_dict):
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
  return state_dict


def check_variables(variables) -> None:
  if not isinstance(variables, Mapping) or "backbone" not in variables.get("params", {}):
    raise ValueError("variables must be RetrievalNet variables with params['backbone'] "
                     "(the output of RetrievalNet(...).init).")
  if "batch_stats" not in variables:
    raise ValueError("variables has no 'batch_stats'; pass the whole init output, not params only.")


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
  """The shape torch would store for a Flax leaf of `flax_shape`."""
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


def _check(state_dict: Mapping, name: str, target, what: str) -> np.ndarray:
  """The tensor `name`, or a ValueError saying it is missing or misshapen."""
  if name not in state_dict:
    raise ValueError(f"state_dict is missing {name!r}; is it a {what} state dict "
                     "for this network's architecture?")
  value = to_numpy(state_dict[name])
  expected = _torch_shape(tuple(target.shape))
  if tuple(value.shape) != expected:
    raise ValueError(f"state_dict[{name!r}] has shape {tuple(value.shape)}, but this network "
                     f"expects {expected} (torch layout); check width and stage sizes.")
  return value


def _load_fc(state_dict: Mapping, params: dict, out: dict, fc: str) -> None:
  """Replaces the classifier with `fc` when it fits; otherwise keeps it and logs why."""
  if "classifier" not in params:
    log.info("The network has no classifier (num_classes=None); %s.* is not imported.", fc)
    return
  kernel, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
  want_w = _torch_shape(tuple(kernel.shape))
  if f"{fc}.weight" not in state_dict or f"{fc}.bias" not in state_dict:
    log.warning("state_dict has no %s.weight/%s.bias; keeping the network's classifier.", fc, fc)
    return
  got_w = tuple(to_numpy(state_dict[f"{fc}.weight"]).shape)
  got_b = tuple(to_numpy(state_dict[f"{fc}.bias"]).shape)
  if (got_w, got_b) != (want_w, tuple(bias.shape)):
    log.info("%s.weight has shape %s but the classifier needs %s; keeping the network's "
                "classifier (as expected when fine-tuning on other classes).", fc, got_w, want_w)
    return
  out["params"]["classifier"]["kernel"] = _place(to_numpy(state_dict[f"{fc}.weight"]), kernel)
  out["params"]["classifier"]["bias"] = _place(to_numpy(state_dict[f"{fc}.bias"]), bias)


def import_entries(state_dict: Mapping, variables, entries: list[Entry], *, fc: str,
                   what: str) -> dict:
  """New variables with every entry's tensor in place and the classifier from `fc` if it fits.

  Raises ValueError naming the first missing or misshapen tensor, or the first
  tensor of `state_dict` the network has no place for.
  """
  known = {name for name, _, _ in entries} | {f"{fc}.weight", f"{fc}.bias"}
  unexpected = [k for k in state_dict if k not in known and not k.endswith("num_batches_tracked")]
  if unexpected:
    raise ValueError(f"state_dict has {len(unexpected)} tensor(s) this network has no place for, "
                     f"first {unexpected[0]!r}; is it a {what} checkpoint of another depth?")
  out = _copy_dicts(variables)
  for name, collection, path in entries:
    target = _get(variables[collection], path)
    _set(out[collection], path, _place(_check(state_dict, name, target, what), target))
  _load_fc(state_dict, variables["params"], out, fc)
  return out
