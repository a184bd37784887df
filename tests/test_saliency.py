"""Saliency maps, boxes (thresholds, components, margins), IoU, CorLoc, crops, figure."""

import collections

import jax
import numpy as np
import pytest
from PIL import Image

from fgir_jax import saliency

FULL = [0.0, 0.0, 1.0, 1.0]


def _largest_box_bfs(mask):
  """Reference: BFS components in row-major order of first pixel; ties -> the first."""
  h, w = mask.shape
  seen = np.zeros_like(mask)
  best, best_size = None, 0
  for r in range(h):
    for c in range(w):
      if not mask[r, c] or seen[r, c]:
        continue
      queue, pix = collections.deque([(r, c)]), []
      seen[r, c] = True
      while queue:
        y, x = queue.popleft()
        pix.append((y, x))
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
          yy, xx = y + dy, x + dx
          if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
            seen[yy, xx] = True
            queue.append((yy, xx))
      if len(pix) > best_size:
        best, best_size = np.array(pix), len(pix)
  if best is None:
    return np.array(FULL)
  (r0, c0), (r1, c1) = best.min(0), best.max(0)
  return np.array([r0 / h, c0 / w, (r1 + 1) / h, (c1 + 1) / w])


def _two_blobs():
  m = np.zeros((1, 20, 30), np.float32)
  m[0, 2:5, 3:6] = 0.9      # small blob: 9 pixels
  m[0, 10:18, 12:25] = 0.8  # large blob: 104 pixels
  return m


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_largest_picks_the_bigger_blob_and_all_covers_both(method):
  m = _two_blobs()
  largest = saliency.boxes_from_maps(m, 0.4, "largest", margin=0, method=method)
  np.testing.assert_allclose(np.asarray(largest), [[10 / 20, 12 / 30, 18 / 20, 25 / 30]], atol=1e-6)
  every = saliency.boxes_from_maps(m, 0.4, "all", margin=0, method=method)
  np.testing.assert_allclose(np.asarray(every), [[2 / 20, 3 / 30, 18 / 20, 25 / 30]], atol=1e-6)


def test_threshold_is_strictly_greater_than_alpha():
  m = _two_blobs()
  m[0, 10:18, 12:25] = 0.4  # exactly alpha: not kept, as 102 is not kept on 0..255
  box = saliency.boxes_from_maps(m, 0.4, margin=0)
  np.testing.assert_allclose(np.asarray(box), [[2 / 20, 3 / 30, 5 / 20, 6 / 30]], atol=1e-6)


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_components_match_bfs_on_random_binary_maps(method):
  rng = np.random.default_rng(0)
  masks = rng.random((24, 13, 17)) < rng.uniform(0.2, 0.7, (24, 1, 1))
  masks[0] = False  # empty -> full image
  got = np.asarray(saliency.boxes_from_maps(masks.astype(np.float32), 0.5, margin=0, method=method))
  ref = np.stack([_largest_box_bfs(m) for m in masks])
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_device_labels_partition_like_bfs():
  rng = np.random.default_rng(1)
  masks = rng.random((6, 15, 11)) < 0.55
  labels = np.asarray(saliency.label_components(masks))
  for mask, lab in zip(masks, labels):
    assert np.all(lab[~mask] == mask.size)
    for r, c in zip(*np.nonzero(mask)):  # 4-neighbours share the label of their component
      if r + 1 < mask.shape[0] and mask[r + 1, c]:
        assert lab[r, c] == lab[r + 1, c]
      if c + 1 < mask.shape[1] and mask[r, c + 1]:
        assert lab[r, c] == lab[r, c + 1]
    # and the label is the row-major index of the component's first pixel
    for value in np.unique(lab[mask]):
      first = np.flatnonzero((lab == value).ravel())[0]
      assert value == first


def test_blob_touching_the_border_and_margin_clipping():
  m = np.zeros((1, 10, 10), np.float32)
  m[0, 0:4, 6:10] = 1.0  # touches the top and right edges
  tight = saliency.boxes_from_maps(m, 0.4, margin=0)
  np.testing.assert_allclose(np.asarray(tight), [[0.0, 0.6, 0.4, 1.0]], atol=1e-6)
  # margin 0.25 of the 0.4 side = 0.1 per side, clipped at the image border.
  grown = saliency.boxes_from_maps(m, 0.4, margin=0.25)
  np.testing.assert_allclose(np.asarray(grown), [[0.0, 0.5, 0.5, 1.0]], atol=1e-6)


@pytest.mark.parametrize("mode", saliency.MODES)
def test_empty_and_constant_maps_give_the_full_image(mode):
  maps = np.stack([np.zeros((6, 6)), np.full((6, 6), 0.3)]).astype(np.float32)
  boxes = saliency.boxes_from_maps(maps, 0.4, mode, image_size=(32, 32))
  np.testing.assert_allclose(np.asarray(boxes), [FULL, FULL])
  # A constant feature map scales to all zeros: the full image, at any alpha.
  flat = saliency.saliency_maps(np.full((1, 4, 4, 8), 3.0, np.float32))
  np.testing.assert_array_equal(np.asarray(flat), 0.0)
  np.testing.assert_allclose(np.asarray(saliency.boxes_from_maps(flat, 0.0, mode)), [FULL])


def test_saliency_maps_are_min_max_scaled_channel_means():
  rng = np.random.default_rng(2)
  fm = rng.normal(size=(3, 5, 7, 16)).astype(np.float32) * [[[[1.0]]], [[[10.0]]], [[[0.1]]]]
  maps = np.asarray(saliency.saliency_maps(fm))
  assert maps.shape == (3, 5, 7)
  mean = fm.mean(-1)
  ref = (mean - mean.min((1, 2), keepdims=True)) / np.ptp(mean, axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(maps, ref, atol=1e-5)


def test_upsampled_threshold_matches_reference():
  # An 8x8 map upsampled to 64x64 before thresholding (PAPER decision).
  rng = np.random.default_rng(3)
  maps = np.asarray(saliency.saliency_maps(rng.random((4, 8, 8, 1)).astype(np.float32)))
  big = np.asarray(jax.image.resize(maps, (4, 64, 64), "linear", antialias=False))
  ref = np.stack([_largest_box_bfs(b > 0.4) for b in big])
  for method in ("jax", "scipy"):
    got = saliency.boxes_from_maps(maps, 0.4, image_size=64, margin=0, method=method, batch_size=3)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)


def test_boxes_under_jit_use_the_device_path():
  m = _two_blobs()
  fn = jax.jit(lambda x: saliency.boxes_from_maps(x, 0.4, margin=0))
  np.testing.assert_allclose(np.asarray(fn(m)), np.asarray(saliency.boxes_from_maps(m, 0.4, margin=0)))


def test_iou_hand_computed_values():
  pred = np.array([[0, 0, 0.5, 0.5],      # identical
                   [0, 0, 0.2, 0.2],      # disjoint
                   [0.25, 0.25, 0.75, 0.75],  # nested: inner 0.25 of outer 1.0
                   [0, 0, 0.5, 0.5]])     # partial
  true = np.array([[0, 0, 0.5, 0.5],
                   [0.5, 0.5, 1, 1],
                   [0, 0, 1, 1],
                   [0.25, 0.25, 0.75, 0.75]])
  np.testing.assert_allclose(np.asarray(saliency.iou(pred, true)),
                             [1.0, 0.0, 0.25, 0.0625 / 0.4375], atol=1e-6)


def test_corloc_counts_iou_strictly_above_threshold():
  true = np.array([[0, 0, 1, 1]] * 4, np.float32)
  pred = np.array([[0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0, 1, 0.6], [0, 0, 0.1, 0.1]], np.float32)
  # IoUs 1, 0.5 (not counted: PASCAL's > 0.5), 0.6, 0.01.
  assert saliency.corloc(pred, true) == pytest.approx(0.5)
  assert saliency.corloc(pred, true, threshold=0.0) == pytest.approx(1.0)


def _np_crop_resize(img, box, out_h, out_w):
  """Reference: bilinear, half-pixel centres, box edges in continuous pixels."""
  h, w, _ = img.shape
  y0, x0, y1, x1 = np.asarray(box, np.float64) * [h, w, h, w]
  out = np.zeros((out_h, out_w, img.shape[2]))
  for i in range(out_h):
    y = np.clip(y0 + (i + 0.5) * (y1 - y0) / out_h - 0.5, 0, h - 1)
    ya = int(y); yb = min(ya + 1, h - 1); fy = y - ya
    for j in range(out_w):
      x = np.clip(x0 + (j + 0.5) * (x1 - x0) / out_w - 0.5, 0, w - 1)
      xa = int(x); xb = min(xa + 1, w - 1); fx = x - xa
      out[i, j] = ((img[ya, xa] * (1 - fx) + img[ya, xb] * fx) * (1 - fy)
                   + (img[yb, xa] * (1 - fx) + img[yb, xb] * fx) * fy)
  return out


def test_crop_and_resize_matches_numpy_reference():
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (5, 17, 23, 3), dtype=np.uint8)
  boxes = np.array([FULL, [0.1, 0.2, 0.6, 0.9], [0.5, 0.5, 1, 1], [0.33, 0.0, 0.34, 0.3],
                    [0, 0, 0.5, 0.5]], np.float32)
  ref = np.stack([_np_crop_resize(im.astype(np.float64), b, 9, 11) for im, b in zip(images, boxes)])
  floats = saliency.crop_and_resize(images.astype(np.float32), boxes, (9, 11), batch_size=2)
  assert isinstance(floats, np.ndarray) and floats.dtype == np.float32
  np.testing.assert_allclose(floats, ref, atol=1e-3)
  u8 = saliency.crop_and_resize(images, boxes, (9, 11), batch_size=2)
  assert u8.dtype == np.uint8 and u8.shape == (5, 9, 11, 3)
  assert np.abs(u8.astype(float) - ref).max() <= 0.5 + 1e-3  # rounded to nearest
  on_device = saliency.crop_and_resize(jax.numpy.asarray(images), boxes, 9)
  assert isinstance(on_device, jax.Array) and on_device.shape == (5, 9, 9, 3)


def test_plot_crops_writes_a_png_of_the_expected_size(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  maps = np.asarray(saliency.saliency_maps(rng.random((2, 4, 4, 1)).astype(np.float32)))
  true = np.array([[0.1, 0.1, 0.8, 0.9], [0.2, 0.3, 0.6, 0.7]])
  path = saliency.plot_crops(images, maps, true, alphas=(0.3, 0.5), path=tmp_path / "fig6.png",
                             cell_inches=1.0, dpi=50)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (3 * 50, 2 * 50)


@pytest.mark.parametrize("call,match", [
    (lambda: saliency.boxes_from_maps(np.zeros((4, 4)), 0.4), "3-d"),
    (lambda: saliency.boxes_from_maps(np.zeros((1, 4, 4)), 1.0), "alpha"),
    (lambda: saliency.boxes_from_maps(np.zeros((1, 4, 4)), -0.1), "alpha"),
    (lambda: saliency.boxes_from_maps(np.zeros((1, 4, 4)), 0.4, "biggest"), "mode"),
    (lambda: saliency.boxes_from_maps(np.zeros((1, 4, 4)), 0.4, margin=-1), "margin"),
    (lambda: saliency.saliency_maps(np.zeros((4, 4, 3))), "4-d"),
    (lambda: saliency.iou(np.zeros((2, 3)), np.zeros((2, 3))), r"\(n, 4\)"),
    (lambda: saliency.iou(np.zeros((2, 4)), np.zeros((3, 4))), "one predicted box"),
    (lambda: saliency.corloc(np.zeros((2, 4)), np.zeros((2, 4)), threshold=1.5), "threshold"),
    (lambda: saliency.crop_and_resize(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((3, 4)), 2), "one box"),
    (lambda: saliency.plot_crops(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((1, 2, 2)), None), "one map"),
])
def test_bad_arguments_raise_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
