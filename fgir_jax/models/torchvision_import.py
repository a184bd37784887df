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
tensor by tensor. `.pth` files are read without torch (`torch_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fgir_jax.models import state_dict_import as sdi
from fgir_jax.models.state_dict_import import load_state_dict  # noqa: F401  (public)

_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")


def _backbone_mapping(backbone: Mapping) -> list[sdi.Entry]:
  """[(torch name, collection, flax path)] for the backbone, in torchvision order."""
  entries = sdi.conv_entries("conv1", ("backbone", "conv1"))
  entries += sdi.bn_entries("bn1", ("backbone", "bn1"))
  blocks = sorted((tuple(int(g) for g in m.groups()), name)
                  for name in backbone if (m := _BLOCK.match(name)))
  for (stage, index), name in blocks:
    prefix = f"layer{stage}.{index}"
    for k in (1, 2):
      entries += sdi.conv_entries(f"{prefix}.conv{k}", ("backbone", name, f"conv{k}"))
      entries += sdi.bn_entries(f"{prefix}.bn{k}", ("backbone", name, f"bn{k}"))
    if "downsample_conv" in backbone[name]:
      entries += sdi.conv_entries(f"{prefix}.downsample.0", ("backbone", name, "downsample_conv"))
      entries += sdi.bn_entries(f"{prefix}.downsample.1", ("backbone", name, "downsample_bn"))
  return entries


def load_torchvision_resnet18(state_dict, variables):
  """Puts torchvision ResNet weights into a RetrievalNet's variables.

  Args:
    state_dict: {torchvision name: array} (numpy, jax or torch tensors, e.g.
      from `torch.load(..., weights_only=True)`), or a path to an `.npz`
      (from `python -m fgir_jax.models.convert_weights`) or a `.pth`/`.pt`
      (read without torch).
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
      has no place for (e.g. a resnet34 checkpoint for a resnet18), or a
      `.pth` that names a global outside the reader's allow-list.
  """
  state_dict = sdi.as_state_dict(state_dict)
  sdi.check_variables(variables)
  if "conv1" not in variables["params"]["backbone"]:
    raise ValueError("variables are not of a ResNet backbone (no params['backbone']['conv1']); "
                     "build the network with backbone='resnet18'.")
  entries = _backbone_mapping(variables["params"]["backbone"])
  return sdi.import_entries(state_dict, variables, entries, fc="fc", what="torchvision ResNet")
