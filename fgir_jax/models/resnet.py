"""ResNet backbone laid out exactly as torchvision's (BasicBlock variants).

Same layers, same padding and the same parameter count as
`torchvision.models.resnet18`, so that ImageNet weights import one to one
(see `torchvision_import.py`). Layout is NHWC, as XLA prefers on every backend.

Module and parameter names follow torchvision's with `.` replaced by `_`
(`conv1`, `bn1`, `layer2_0/downsample_conv`, ...), so the name mapping of the
importer is easy to read.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out",
# nonlinearity="relu"); the same here so that training from scratch behaves
# alike in both frameworks.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch.nn.BatchNorm2d(momentum=0.1) updates running = 0.9 * running + 0.1 * batch,
# which is flax's momentum=0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def scaled(channels: int, width: float) -> int:
  """Channel count times the width multiplier, at least 1."""
  return max(1, int(round(channels * width)))


def torch_padding(kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """torchvision's symmetric padding `k // 2` on each side.

  Not "SAME": with stride 2 on an even input XLA's SAME pads (2, 3) where torch
  pads (3, 3), which shifts every window by one pixel and breaks weight import.
  """
  return tuple((k // 2, k // 2) for k in kernel_size)


def is_frozen(stage: int, frozen_stages: int) -> bool:
  """Whether stage `stage` (0: the stem) is frozen when the stem and `frozen_stages` stages are."""
  return frozen_stages > 0 and stage <= frozen_stages


def freeze_if(x, last_frozen: bool):
  """Stops gradients after the last frozen stage, so nothing before it is differentiated."""
  return jax.lax.stop_gradient(x) if last_frozen else x


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs and a skip, ReLU after the sum.

  Attributes:
    filters: output channels.
    conv: a partial of `nn.Conv` (dtype, init, no bias already bound).
    norm: a partial of `nn.BatchNorm` (train/eval, momentum, eps bound).
    act: the activation.
    strides: stride of the first conv and of the 1x1 downsample.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    """(n, h, w, c_in) -> (n, ceil(h / strides), ceil(w / strides), filters)."""
    residual = x
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (3, 3), s, padding=torch_padding((3, 3)), name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=torch_padding((3, 3)), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), s, padding="VALID",
                           name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """torchvision ResNet without its pooling and fc: image -> deepest feature map.

  Attributes:
    stage_sizes: BasicBlocks per stage; (2, 2, 2, 2) is ResNet18, (3, 4, 6, 3) ResNet34.
    width: channel multiplier (1.0 is torchvision's 64/128/256/512).
    dtype: compute dtype; parameters and BatchNorm statistics stay `param_dtype`.
    param_dtype: dtype of the parameters and BatchNorm statistics.
    act: activation.
    frozen_stages: the stem and this many stages of blocks are frozen: their
      BatchNorm keeps its running statistics and no gradient flows through
      them (so their backward pass is never computed). Their parameters must
      also be left out of the optimizer: see `module_stage`.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  act: Callable = nn.relu
  frozen_stages: int = 0

  def module_stage(self, name: str) -> int:
    """Stage of a top-level submodule: 0 for the stem, i for `layer{i}_*`."""
    match = re.match(r"^layer(\d+)_\d+$", name)
    return int(match.group(1)) if match else 0

  @property
  def num_features(self) -> int:
    """Channels of the output map."""
    return scaled(64 * 2 ** (len(self.stage_sizes) - 1), self.width)

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(n, h, w, 3) normalised images -> (n, h/32, w/32, 512 * width) map.

    Each spatial size is rounded as torch rounds it: 224 -> 7, 299 -> 10.
    Stage outputs are sown into the "intermediates" collection ("stem",
    "stage1".."stage4"), which costs nothing unless asked for with
    `mutable=["intermediates"]`.
    """
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=conv_kernel_init)

    def norm_of(stage):
      return functools.partial(nn.BatchNorm,
                               use_running_average=not train or is_frozen(stage, self.frozen_stages),
                               momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                               dtype=self.dtype, param_dtype=self.param_dtype)

    x = jnp.asarray(x, self.dtype)
    x = conv(scaled(64, self.width), (7, 7), (2, 2), padding=torch_padding((7, 7)),
             name="conv1")(x)
    x = self.act(norm_of(0)(name="bn1")(x))
    # max_pool pads with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.sow("intermediates", "stem", x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = BasicBlock(scaled(64 * 2 ** i, self.width), conv=conv, norm=norm_of(i + 1),
                       act=self.act, strides=2 if i > 0 and j == 0 else 1,
                       name=f"layer{i + 1}_{j}")(x)
      x = freeze_if(x, i + 1 == self.frozen_stages)
      self.sow("intermediates", f"stage{i + 1}", x)
    return x


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
