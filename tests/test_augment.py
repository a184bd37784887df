"""On-device augmentation: shapes, ranges, flips, crops, resizing and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgir_jax.data import augment


def _images(n=6, h=24, w=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _np_bilinear_resize(img, out_h, out_w):
  """Reference: half-pixel centres, edge clamp, one output pixel at a time."""
  h, w, _ = img.shape
  img = img.astype(np.float64)
  out = np.zeros((out_h, out_w, img.shape[2]))
  for i in range(out_h):
    y = min(max((i + 0.5) * h / out_h - 0.5, 0), h - 1)
    y0 = int(np.floor(y)); y1 = min(y0 + 1, h - 1); fy = y - y0
    for j in range(out_w):
      x = min(max((j + 0.5) * w / out_w - 0.5, 0), w - 1)
      x0 = int(np.floor(x)); x1 = min(x0 + 1, w - 1); fx = x - x0
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bot * fy
  return out


@pytest.mark.parametrize("crop", augment.CROPS)
def test_train_transform_shape_dtype_and_range(crop):
  x = _images()
  y = augment.train_transform(jax.random.key(0), x, 20, crop=crop)
  assert y.shape == (6, 20, 20, 3) and y.dtype == jnp.float32
  # Bilinear samples of 0..255 pixels stay in 0..255 once normalisation is undone.
  back = np.asarray(augment.denormalize(y))
  assert back.min() >= -1e-3 and back.max() <= 255 + 1e-3


def test_eval_identity_inverts_exactly():
  x = _images()
  y = augment.eval_transform(x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(augment.denormalize(y)), x, atol=1e-3)
  # Per-channel ImageNet statistics: a mean-coloured pixel maps to 0.
  mean_pixel = np.round(np.array(augment.IMAGENET_MEAN) * 255)
  z = augment.normalize(mean_pixel[None, None, None])
  assert np.all(np.abs(np.asarray(z)) < 0.01)


def test_resize_matches_numpy_and_jax_image():
  x = _images(2, 9, 13)
  for out in [(9, 13), (20, 31), (5, 6)]:
    got = np.asarray(augment.resize(x, out))
    ref = np.stack([_np_bilinear_resize(im, *out) for im in x])
    np.testing.assert_allclose(got, ref, atol=1e-3)
    jref = jax.image.resize(x.astype(np.float32), (2,) + out + (3,), "linear", antialias=False)
    np.testing.assert_allclose(got, np.asarray(jref), atol=1e-3)


def test_full_scale_random_resized_crop_is_a_plain_resize():
  x = _images(4, 24, 32)
  # scale 1 with the image's own aspect ratio can only draw the whole image.
  y = augment.train_transform(jax.random.key(3), x, (16, 20), scale=(1.0, 1.0),
                              ratio=(32 / 24, 32 / 24), flip=False)
  ref = augment.normalize(jax.image.resize(x.astype(np.float32), (4, 16, 20, 3), "linear", antialias=False))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-4)


def test_flip_mirrors_or_keeps_each_image():
  x = _images(32, 8, 10)
  y = np.asarray(augment.denormalize(augment.train_transform(jax.random.key(1), x, crop="none")))
  same = np.all(np.abs(y - x) < 1e-3, axis=(1, 2, 3))
  mirrored = np.all(np.abs(y - x[:, :, ::-1]) < 1e-3, axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert same.any() and mirrored.any()  # both happen in 32 draws
  f = np.asarray(augment.random_flip(jax.random.key(1), x))
  assert all(np.array_equal(a, b) or np.array_equal(a, b[:, ::-1]) for a, b in zip(f, x))


def test_no_flip_flag_keeps_orientation():
  x = _images(16, 8, 10)
  y = augment.train_transform(jax.random.key(1), x, crop="none", flip=False)
  np.testing.assert_allclose(np.asarray(augment.denormalize(y)), x, atol=1e-3)


@pytest.mark.parametrize("pad_mode,np_mode", [("zero", "constant"), ("reflect", "reflect")])
def test_pad_and_crop_is_a_window_of_the_padded_image(pad_mode, np_mode):
  x = _images(8, 10, 12)
  pad = 3
  y = augment.train_transform(jax.random.key(2), x, crop="pad_and_crop", pad=pad,
                              pad_mode=pad_mode, flip=False)
  y = np.round(np.asarray(augment.denormalize(y)))
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=np_mode)
  offsets = set()
  for i in range(8):
    hits = [(a, b) for a in range(2 * pad + 1) for b in range(2 * pad + 1)
            if np.array_equal(padded[i, a:a + 10, b:b + 12], y[i])]
    assert hits, f"example {i} is not a window of the padded image"
    offsets.add(hits[0])
  assert len(offsets) > 1  # the window moves


def test_random_resized_boxes_respect_scale_ratio_and_bounds():
  h, w = 40, 60
  boxes = np.asarray(augment.random_resized_boxes(jax.random.key(0), 500, h, w, (0.2, 0.6), (0.5, 2.0)))
  y0, x0, bh, bw = boxes.T
  assert np.all((y0 >= 0) & (x0 >= 0) & (y0 + bh <= h) & (x0 + bw <= w))
  assert np.all(boxes == np.round(boxes))  # whole pixels, as torchvision
  area = bh * bw / (h * w)
  assert area.min() > 0.15 and area.max() < 0.68  # (0.2, 0.6) up to rounding
  aspect = bw / bh
  assert aspect.min() > 0.4 and aspect.max() < 2.5


def test_random_resized_boxes_fall_back_to_center_crop():
  # An aspect ratio of 4..5 cannot fit a 10x10 image at 90% of its area.
  boxes = np.asarray(augment.random_resized_boxes(jax.random.key(0), 8, 10, 10, (0.9, 1.0), (4.0, 5.0)))
  # torchvision's fallback: full width, height = width / max(ratio) rounded, centred.
  np.testing.assert_array_equal(boxes, np.tile([[4.0, 0.0, 2.0, 10.0]], (8, 1)))


def test_eval_center_crop_is_a_resize_of_the_center():
  x = _images(2, 16, 16)
  y = augment.eval_transform(x, 8, crop_fraction=0.5)
  ref = augment.normalize(augment.resize(x[:, 4:12, 4:12], (8, 8)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)


def test_deterministic_by_key_and_jittable():
  x = _images()
  a = augment.train_transform(jax.random.key(7), x, 16)
  b = augment.train_transform(jax.random.key(7), x, 16)
  c = augment.train_transform(jax.random.key(8), x, 16)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  jitted = jax.jit(lambda k, im: augment.train_transform(k, im, 16))
  np.testing.assert_allclose(np.asarray(jitted(jax.random.key(7), x)), np.asarray(a), atol=1e-5)


def test_custom_mean_std():
  x = np.full((1, 2, 2, 3), 255, np.uint8)
  y = augment.eval_transform(x, mean=(0.5,), std=(0.5,))
  np.testing.assert_allclose(np.asarray(y), 1.0, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda x: augment.train_transform(jax.random.key(0), x[0], 8), "4-d"),
    (lambda x: augment.train_transform(jax.random.key(0), x, 8, crop="zoom"), "crop"),
    (lambda x: augment.train_transform(jax.random.key(0), x, 8, scale=(0.5, 1.5)), "at most 1"),
    (lambda x: augment.train_transform(jax.random.key(0), x, 8, ratio=(2, 1)), "ratio"),
    (lambda x: augment.train_transform(jax.random.key(0), x, 8, pad_mode="edge"), "pad_mode"),
    (lambda x: augment.train_transform(jax.random.key(0), x, 0), "size"),
    (lambda x: augment.train_transform(jax.random.key(0), x, 8, std=(0.1, 0.2)), "std"),
    (lambda x: augment.eval_transform(x, crop_fraction=0.5), "size"),
])
def test_bad_arguments_raise_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call(_images(2, 8, 8))
