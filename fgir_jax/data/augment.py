"""On-device augmentation of uint8 image batches.

Every transform takes a batch of uint8 images `(n, h, w, 3)` (values 0..255)
and returns float32. Training transforms take a PRNG key and are deterministic
by it; `eval_transform` is deterministic by construction. All of them are
jitted with static sizes, so they can also be called inside a larger jitted
function (`fgir_jax.data.batching` fuses the gather from the device-resident
array with them).

Resampling is one separable bilinear gather per example (vmapped): the crop
box, the output size and a horizontal flip only change the sample positions,
so cropping, resizing and flipping cost one pass over the output pixels and
one over the selected input rows. Conventions (the same as
`jax.image.resize(..., "linear", antialias=False)`, torchvision and TF2 with
half-pixel centres): output pixel `j` of a box that starts at `x0` and is `L`
pixels wide samples the input at `x0 + (j + 0.5) * L / out - 0.5`, clamped to
the image (edge pixels repeat). There is no anti-aliasing: random resized
crops shrink by at most ~1.3x at the usual sizes, where it does not matter.

    >>> x = augment.train_transform(key, images_u8, size=224)   # (n, 224, 224, 3)
    >>> y = augment.eval_transform(images_u8)                   # identity + normalise
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import _validate

# ImageNet statistics in [0, 1] units (torchvision's), the default for weights
# trained on ImageNet.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROPS = ("random_resized", "pad_and_crop", "none")
PAD_MODES = ("reflect", "zero")


# ---------------------------------------------------------------------------
# Argument checks (before tracing).

def _check_images(images, name: str = "images") -> tuple[int, int, int, int]:
  shape = _validate.check_ndim(images, 4, name, "a 4-d array (n, h, w, channels)")
  if shape[1] < 1 or shape[2] < 1:
    raise ValueError(f"{name} must have positive height and width, got shape {shape}.")
  return shape


def to_hw(size, name: str = "size") -> tuple[int, int]:
  """An int or a pair of ints -> (height, width), both positive."""
  if isinstance(size, (int, np.integer)):
    size = (int(size), int(size))
  try:
    h, w = (int(s) for s in size)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be an int or a (height, width) pair, got {size!r}.") from e
  if h < 1 or w < 1:
    raise ValueError(f"{name} must be positive, got {(h, w)}.")
  return h, w


def _range2(value, name: str, positive: bool = True) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}.") from e
  if not lo <= hi or (positive and lo <= 0):
    raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}.")
  return lo, hi


def _stats(values, channels: int, name: str) -> tuple[float, ...]:
  values = tuple(float(v) for v in np.ravel(values))
  if len(values) not in (1, channels):
    raise ValueError(f"{name} must have 1 or {channels} entries (one per channel), got {len(values)}.")
  if name == "std" and min(values) <= 0:
    raise ValueError(f"std must be positive, got {values}.")
  return values


# ---------------------------------------------------------------------------
# The resampling core.

def _axis_samples(start, length, in_size: int, out_size: int, flip=False):
  """Bilinear sample positions along one axis for a box [start, start+length).

  Returns (lo, hi, frac): output j = in[lo[j]] * (1 - frac[j]) + in[hi[j]] * frac[j].
  """
  j = jnp.arange(out_size, dtype=jnp.float32) + 0.5
  # A flip mirrors the sample positions inside the box: out[j] = out[out-1-j].
  j = jnp.where(flip, out_size - j, j)
  pos = start + j * (length / out_size) - 0.5
  pos = jnp.clip(pos, 0.0, in_size - 1.0)
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, in_size - 1)
  return lo, hi, frac


def _resample_one(image, box, flip, out_hw: tuple[int, int]):
  """One image (h, w, c) -> float32 (out_h, out_w, c) from box (y0, x0, bh, bw) in pixels."""
  h, w, _ = image.shape
  y0, x0, bh, bw = box[0], box[1], box[2], box[3]
  ylo, yhi, yf = _axis_samples(y0, bh, h, out_hw[0])
  xlo, xhi, xf = _axis_samples(x0, bw, w, out_hw[1], flip)
  # Rows first: only the out_h selected rows are read and converted to float.
  rows = (image[ylo].astype(jnp.float32) * (1.0 - yf)[:, None, None]
          + image[yhi].astype(jnp.float32) * yf[:, None, None])
  return (rows[:, xlo] * (1.0 - xf)[None, :, None]
          + rows[:, xhi] * xf[None, :, None])


def resample_boxes(images, boxes, size, flip=None):
  """Crops boxes from a batch and resizes them bilinearly (traceable core).

  Args:
    images: (n, h, w, c) uint8 or float.
    boxes: (n, 4) float32 (y0, x0, box_height, box_width) in input pixels; the
      box covers [y0, y0 + box_height) x [x0, x0 + box_width), fractional
      values allowed. Positions outside the image repeat the edge pixels.
    size: static (out_h, out_w).
    flip: optional (n,) bool; True mirrors that output horizontally.

  Returns:
    (n, out_h, out_w, c) float32 in the input's units (0..255 for uint8).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  if flip is None:
    flip = jnp.zeros(boxes.shape[:1], bool)
  return jax.vmap(functools.partial(_resample_one, out_hw=tuple(size)))(images, boxes, flip)


# ---------------------------------------------------------------------------
# Random box samplers.

@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def random_resized_boxes(key, n: int, height: int, width: int,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """Random-resized-crop boxes with torchvision's algorithm, vectorised.

  Each example draws `attempts` (area fraction, log aspect ratio) pairs; the
  first whose rounded box fits the image is used, else the central crop with
  the aspect ratio clamped to `ratio` (torchvision's fallback).

  Args (all static but the key; scale and ratio as tuples): key, the number
  of boxes n, the image height and width in pixels, the area-fraction range
  `scale`, the aspect-ratio (width / height) range `ratio`, `attempts`.

  Returns:
    (n, 4) float32 boxes (y0, x0, box_height, box_width) in whole pixels.
  """
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (n, attempts), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (n, attempts), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  bw = jnp.round(jnp.sqrt(area * aspect))
  bh = jnp.round(jnp.sqrt(area / aspect))
  ok = (bw > 0) & (bh > 0) & (bw <= width) & (bh <= height)
  first = jnp.argmax(ok, axis=1)  # index of the first attempt that fits
  found = ok.any(axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  # Fallback (static): the central crop with the aspect ratio clamped into `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fw, fh = round(height * ratio[1]), height
  else:
    fw, fh = width, height
  bh = jnp.where(found, pick(bh), float(fh))
  bw = jnp.where(found, pick(bw), float(fw))
  # Offsets uniform over the integer positions where the box fits.
  y0 = jnp.floor(jax.random.uniform(k_y, (n,)) * (height - bh + 1))
  x0 = jnp.floor(jax.random.uniform(k_x, (n,)) * (width - bw + 1))
  y0 = jnp.where(found, y0, float((height - fh) // 2))
  x0 = jnp.where(found, x0, float((width - fw) // 2))
  return jnp.stack([y0, x0, bh, bw], axis=1)


def _full_boxes(n: int, height: int, width: int):
  return jnp.tile(jnp.array([[0.0, 0.0, height, width]], jnp.float32), (n, 1))


# ---------------------------------------------------------------------------
# Public transforms.

def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """(x / 255 - mean) / std per channel; images in 0..255 (uint8 or float) -> float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def denormalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """Inverse of `normalize`: float32 in 0..255 (not rounded or clipped)."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(x, jnp.float32) * std + mean) * 255.0


def random_flip(key, images):
  """Mirrors each image horizontally with probability 1/2 (any dtype, same shape)."""
  _check_images(images)
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


@functools.partial(jax.jit, static_argnames=("size",))
def resize(images, size):
  """Bilinear resize (half-pixel centres, no anti-aliasing) -> float32 in input units."""
  n, h, w, _ = images.shape
  return resample_boxes(images, _full_boxes(n, h, w), size)


@functools.partial(jax.jit, static_argnames=(
    "size", "crop", "scale", "ratio", "pad", "pad_mode", "flip", "mean", "std"))
def _train_transform(key, images, *, size, crop, scale, ratio, pad, pad_mode, flip, mean, std):
  n, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  if crop == "random_resized":
    boxes = random_resized_boxes(k_crop, n, h, w, scale, ratio)
  elif crop == "pad_and_crop":
    # Pad once for the batch; a whole-pixel box of the original size then
    # samples exactly (all bilinear weights are 0), so this is a plain crop.
    mode = "reflect" if pad_mode == "reflect" else "constant"
    images = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    off = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1).astype(jnp.float32)
    boxes = jnp.concatenate([off, jnp.tile(jnp.array([[h, w]], jnp.float32), (n, 1))], axis=1)
  else:
    boxes = _full_boxes(n, h, w)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,)) if flip else None
  return normalize(resample_boxes(images, boxes, size, flips), mean, std)


def train_transform(key, images, size=None, *, crop="random_resized",
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), pad=4, pad_mode="reflect",
                    flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """Random crop, horizontal flip and normalisation of a uint8 batch.

  Args:
    key: PRNG key; the output is a deterministic function of it.
    images: (n, h, w, c) uint8 (0..255).
    size: output int or (height, width); None keeps the input size.
    crop: "random_resized" (area fraction in `scale`, aspect ratio in `ratio`,
      torchvision's sampler, then bilinear resize to `size`), "pad_and_crop"
      (pad `pad` pixels per side with `pad_mode` "reflect" or "zero", take a
      random crop of the input size, resize to `size` if it differs) or "none"
      (the whole image resized to `size`).
    flip: mirror each example horizontally with probability 1/2.
    mean: per-channel means in [0, 1] units (ImageNet's by default).
    std: per-channel standard deviations in [0, 1] units (ImageNet's by default).

  Returns:
    (n, size_h, size_w, c) float32, normalised: (x / 255 - mean) / std.
  """
  n, h, w, c = _check_images(images)
  size = (h, w) if size is None else to_hw(size)
  _validate.check_choice(crop, CROPS, "crop")
  _validate.check_choice(pad_mode, PAD_MODES, "pad_mode")
  scale = _range2(scale, "scale")
  if scale[1] > 1.0:
    raise ValueError(f"scale is a fraction of the image area and must be at most 1, got {scale}.")
  ratio = _range2(ratio, "ratio")
  if int(pad) != pad or pad < 0:
    raise ValueError(f"pad must be a non-negative number of pixels, got {pad!r}.")
  if crop == "pad_and_crop" and pad_mode == "reflect" and pad >= min(h, w):
    raise ValueError(f"pad={pad} is too large to reflect an image of {h}x{w}; use pad < {min(h, w)}.")
  return _train_transform(
      key, images, size=size, crop=crop, scale=scale, ratio=ratio, pad=int(pad),
      pad_mode=pad_mode, flip=bool(flip), mean=_stats(mean, c, "mean"), std=_stats(std, c, "std"))


@functools.partial(jax.jit, static_argnames=("size", "crop_fraction", "mean", "std"))
def _eval_transform(images, *, size, crop_fraction, mean, std):
  n, h, w, _ = images.shape
  if size is None:
    return normalize(images, mean, std)
  ch, cw = h * crop_fraction, w * crop_fraction
  box = jnp.array([[(h - ch) / 2, (w - cw) / 2, ch, cw]], jnp.float32)
  return normalize(resample_boxes(images, jnp.tile(box, (n, 1)), size), mean, std)


def eval_transform(images, size=None, *, crop_fraction=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """The deterministic evaluation transform of a uint8 batch.

  Args:
    images: (n, h, w, c) uint8.
    size: None (identity, then normalise) or output int / (height, width): the
      central `crop_fraction` of each side, resized bilinearly to `size`
      (crop_fraction=0.875 is the classic "resize 256, centre crop 224").
    mean: per-channel means in [0, 1] units.
    std: per-channel standard deviations in [0, 1] units.

  Returns:
    (n, out_h, out_w, c) float32, normalised.
  """
  _, _, _, c = _check_images(images)
  size = None if size is None else to_hw(size)
  crop_fraction = float(crop_fraction)
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
  if size is None and crop_fraction != 1.0:
    raise ValueError("crop_fraction needs an output size; pass size=... as well.")
  return _eval_transform(images, size=size, crop_fraction=crop_fraction,
                         mean=_stats(mean, c, "mean"), std=_stats(std, c, "std"))


def transform_fn(train: bool, **kwargs):
  """A transform with its settings bound, for `batching.DeviceInput`.

  `transform_fn(True, size=224)` -> fn(key, images) and
  `transform_fn(False, size=224)` -> fn(images).
  """
  return functools.partial(train_transform if train else eval_transform, **kwargs)
