"""RetrievalNet: ResNet18-I of the paper, one forward pass for logits, saliency and codes.

    images -> backbone -> [Inception-ResNet-C] -> feature_map
           -> global average pool -> pooled -> classifier -> logits   (stage 1)
                                            -> HashHead   -> hash     (stage 2)

Parameter tree (what checkpoints, optimizer masks and the importer see):

    params["backbone"]     conv1, bn1, layer1_0 .. layer4_1 (torchvision names), or
                           conv_stem, bn0, blocks_0 .. blocks_15, conv_head, bn1
                           (EfficientNet-Lite0, the names of its PyTorch port)
    params["enhancement"]  Inception-ResNet-C (when enhance=True)
    params["classifier"]   {"kernel": (c, num_classes), "bias"} (when num_classes)
    params["hash"]         {"kernel": (c, bits), "bias"} (when hash_bits)
    batch_stats[...]       running mean/var of every BatchNorm, same paths

Dtype policy: the backbone and the enhancement block compute in `dtype`
(float32, or bfloat16 on accelerators); parameters and BatchNorm statistics
are `param_dtype` (float32) and BatchNorm reduces in float32. Pooling, the
classifier and the hash head run in float32, and every output is float32:
they are cheap, and the CE loss, the triplet distances and the saliency
min-max scaling all want the precision.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgir_jax import _validate
from fgir_jax.models import efficientnet
from fgir_jax.models import enhance as enhance_lib
from fgir_jax.models import heads
from fgir_jax.models import resnet

BACKBONES = ("resnet18", "efficientnet_lite0")


def _optional_count(value, name: str) -> int:
  """None or 0 -> 0 (head left out); a positive int as is; anything else an error."""
  if value is None:
    return 0
  if isinstance(value, bool) or int(value) != value or value < 0:
    raise ValueError(f"{name} must be None or a non-negative integer, got {value!r}.")
  return int(value)


class RetrievalNet(nn.Module):
  """A backbone + optional enhancement block + classifier and hash heads.

  Attributes:
    num_classes: classifier outputs; None or 0 leaves the classifier out and
      `logits` is None (a pure retrieval network).
    hash_bits: code length; None or 0 leaves the hash head out.
    enhance: put Inception-ResNet-C after the last stage (ResNet18-I); it
      takes its channel count from the backbone's map.
    width: channel multiplier for the backbone and the enhancement block.
    stage_sizes: ResNet BasicBlocks per stage; (2, 2, 2, 2) is ResNet18.
    backbone: "resnet18" (torchvision layout) or "efficientnet_lite0".
    frozen_stages: the backbone's stem and this many stages are frozen (see
      `resnet.ResNet`); `trainable_mask` says which parameters to update.
    depth: EfficientNet-Lite's block-count multiplier (1.0 is Lite0); ResNet
      takes its depth from stage_sizes.
    enhance_branch0, enhance_branch1, enhance_scale, enhance_zero_init: the
      enhancement block's widths (before `width`), residual scale and init;
      see `InceptionResNetC`.
    dtype: compute dtype of backbone and enhancement block.
    param_dtype: parameter and BatchNorm statistics dtype.

  `RetrievalNet(1000, hash_bits=None, enhance=False)` is torchvision's
  resnet18 with its 11,689,512 parameters.
  """
  num_classes: int | None
  hash_bits: int | None = None
  enhance: bool = True
  width: float = 1.0
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  enhance_branch0: int = 192
  enhance_branch1: Sequence[int] = (192, 224, 256)
  enhance_scale: float = 0.2
  enhance_zero_init: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  backbone: str = "resnet18"
  frozen_stages: int = 0
  depth: float = 1.0

  def trainable_mask(self, params):
    """A pytree like `params`: False for the frozen backbone stages, True elsewhere."""
    net = make_backbone(self, parent=None)
    frozen = {name for name in params.get("backbone", {})
              if resnet.is_frozen(net.module_stage(name), int(self.frozen_stages))}
    return {top: _mask_module(top, sub, frozen) for top, sub in params.items()}

  @nn.compact
  def __call__(self, images, train: bool = False):
    """Runs the network.

    Args:
      images: (n, h, w, 3) normalised images (ImageNet mean/std for imported
        weights), any float dtype.
      train: BatchNorm uses batch statistics and updates `batch_stats`
        (apply with `mutable=["batch_stats"]`); otherwise running averages.

    Returns:
      (logits, out): logits (n, num_classes) float32, or None without a
      classifier; out["feature_map"] (n, h', w', c) float32, the deepest map
      (after the enhancement block when enabled; h' = 10 for h = 299, 7 for
      224), out["pooled"] (n, c) float32 global average of it, and
      out["hash"] (n, hash_bits) float32 tanh outputs when hash_bits is set.
      c = 512 * width for ResNet18, 1280 * width for EfficientNet-Lite0.
    """
    num_classes = _optional_count(self.num_classes, "num_classes")
    hash_bits = _optional_count(self.hash_bits, "hash_bits")
    if not self.width > 0:
      raise ValueError(f"width must be positive, got {self.width!r}.")
    _validate.check_ndim(images, 4, "images", "a (n, h, w, channels) batch of images")

    x = make_backbone(self, name="backbone")(images, train)
    if self.enhance:
      x = enhance_lib.InceptionResNetC(
          branch0=resnet.scaled(self.enhance_branch0, self.width),
          branch1=tuple(resnet.scaled(c, self.width) for c in self.enhance_branch1),
          scale=self.enhance_scale, zero_init_last=self.enhance_zero_init,
          dtype=self.dtype, param_dtype=self.param_dtype, name="enhancement")(x, train)
    feature_map = x.astype(jnp.float32)
    pooled = jnp.mean(feature_map, axis=(1, 2))
    out = {"feature_map": feature_map, "pooled": pooled}
    logits = None
    if num_classes:
      logits = nn.Dense(num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="classifier")(pooled)
    if hash_bits:
      out["hash"] = heads.HashHead(hash_bits, param_dtype=self.param_dtype, name="hash")(pooled)
    return logits, out


def make_backbone(net: RetrievalNet, **module_kwargs) -> nn.Module:
  """The backbone module `net` describes (`name="backbone"` inside it)."""
  _validate.check_choice(net.backbone, BACKBONES, "backbone")
  common = dict(width=net.width, dtype=net.dtype, param_dtype=net.param_dtype,
                frozen_stages=int(net.frozen_stages), **module_kwargs)
  if net.backbone == "efficientnet_lite0":
    module = efficientnet.EfficientNetLite0(depth=net.depth, **common)
    stages = len(module.stages)
  else:
    module = resnet.ResNet(stage_sizes=tuple(net.stage_sizes), **common)
    stages = len(module.stage_sizes)
  if not 0 <= int(net.frozen_stages) <= stages:
    raise ValueError(f"frozen_stages must be in 0..{stages} for {net.backbone}, "
                     f"got {net.frozen_stages!r}.")
  return module


def _mask_module(top: str, tree, frozen: set):
  if top != "backbone":
    return jax.tree.map(lambda _: True, tree)
  return {name: jax.tree.map(lambda _, keep=name not in frozen: keep, sub)
          for name, sub in tree.items()}


# Variants, flax-examples style. ResNet18-I is the paper's network.
ResNet18 = functools.partial(RetrievalNet, enhance=False)
ResNet18I = functools.partial(RetrievalNet, enhance=True)
# Tiny variants for tests and CPU demos: the full 18-layer topology (so the
# torchvision importer and every code path are exercised) at 1/8 width:
# 8/16/32/64 channels, enhancement branches 24 / (24, 28, 32); ~0.2M params.
ResNet18Tiny = functools.partial(RetrievalNet, enhance=False, width=0.125)
ResNet18ITiny = functools.partial(RetrievalNet, enhance=True, width=0.125)
EfficientNetLite0I = functools.partial(RetrievalNet, enhance=True, backbone="efficientnet_lite0")
# 1/8 width and half depth: 8-40 channels in 10 blocks (one per stage at least), a
# 160-channel head; every kind of block and stride is kept.
EfficientNetLite0ITiny = functools.partial(RetrievalNet, enhance=True, width=0.125, depth=0.5,
                                           backbone="efficientnet_lite0")
