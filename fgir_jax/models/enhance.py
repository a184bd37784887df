"""The feature enhancement block of ResNet18-I: Inception-ResNet-C.

Inception-ResNet-C (Szegedy et al. 2016, "Inception-v4, Inception-ResNet and
the Impact of Residual Connections on Learning", block C of Inception-ResNet-v2):

    branch0 = 1x1 conv
    branch1 = 1x1 conv -> 1x3 conv -> 3x1 conv
    out     = ReLU(x + scale * 1x1conv(concat(branch0, branch1)))

Every conv but the last is followed by BatchNorm and ReLU; the last one has a
bias and no activation, as in Inception-ResNet-v2. The block keeps the input's
shape, so it can sit after any backbone.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fgir_jax.models import resnet


class InceptionResNetC(nn.Module):
  """Inception-ResNet-C residual block; (n, h, w, c) -> (n, h, w, c).

  Attributes:
    branch0: width of the 1x1 branch (192 in Inception-ResNet-v2).
    branch1: widths of the 1x1 -> 1x3 -> 3x1 branch ((192, 224, 256)).
    scale: residual scale of the branch sum (0.2 as PAPER.md decides).
    zero_init_last: start the last 1x1 conv at zero, so that a fresh block is
      ReLU(x), which is x itself after a ReLU backbone: imported ImageNet
      features pass through unchanged until training moves the block.
    dtype / param_dtype: compute and parameter dtypes.
    act: activation.
  """
  branch0: int = 192
  branch1: Sequence[int] = (192, 224, 256)
  scale: float = 0.2
  zero_init_last: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(n, h, w, c) feature map -> enhanced map of the same shape and dtype."""
    if len(self.branch1) != 3:
      raise ValueError(f"branch1 must hold 3 widths (1x1, 1x3, 3x1), got {self.branch1!r}.")
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=resnet.conv_kernel_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                             dtype=self.dtype, param_dtype=self.param_dtype)

    def conv_bn_act(y, features, kernel, name):
      # BasicConv2d of Inception: the conv needs no bias, BatchNorm has one.
      y = conv(features, kernel, padding=resnet.torch_padding(kernel), use_bias=False,
               name=f"{name}_conv")(y)
      return self.act(norm(name=f"{name}_bn")(y))

    x = jnp.asarray(x, self.dtype)
    b0 = conv_bn_act(x, self.branch0, (1, 1), "branch0")
    b1 = conv_bn_act(x, self.branch1[0], (1, 1), "branch1_0")
    b1 = conv_bn_act(b1, self.branch1[1], (1, 3), "branch1_1")
    b1 = conv_bn_act(b1, self.branch1[2], (3, 1), "branch1_2")
    init = nn.initializers.zeros if self.zero_init_last else resnet.conv_kernel_init
    up = conv(x.shape[-1], (1, 1), use_bias=True, kernel_init=init,
              name="project")(jnp.concatenate([b0, b1], axis=-1))
    return self.act(x + self.scale * up)
