"""The synthetic fine-grained set: determinism, true boxes, balance, ranges, traits."""

import numpy as np
import pytest

from fgir_jax import data
from fgir_jax.data import synthetic


@pytest.fixture(scope="module")
def small():
  return data.make_synthetic(num_classes=6, per_class=10, size=48, seed=3, return_masks=True)


def test_same_seed_same_data_other_seed_other_data(small):
  ds, masks = small
  again, masks2 = data.make_synthetic(num_classes=6, per_class=10, size=48, seed=3, return_masks=True)
  np.testing.assert_array_equal(ds.images, again.images)
  np.testing.assert_array_equal(ds.labels, again.labels)
  np.testing.assert_array_equal(ds.boxes, again.boxes)
  np.testing.assert_array_equal(masks, masks2)
  other = data.make_synthetic(num_classes=6, per_class=10, size=48, seed=4)
  assert not np.array_equal(ds.images, other.images)


def test_chunking_does_not_change_images(small, monkeypatch):
  monkeypatch.setattr(synthetic, "_CHUNK", 7)
  rechunked = data.make_synthetic(num_classes=6, per_class=10, size=48, seed=3)
  np.testing.assert_array_equal(small[0].images, rechunked.images)


def test_boxes_are_tight_around_the_object_mask(small):
  ds, masks = small
  size = ds.images.shape[1]
  for mask, box in zip(masks, ds.boxes):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    np.testing.assert_allclose(box * size, [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
    r0, c0, r1, c1 = np.round(box * size).astype(int)
    assert mask[r0:r1, c0:c1].sum() == mask.sum()  # every object pixel inside the box


def test_object_covers_10_to_40_percent(small):
  ds, _ = small
  b = ds.boxes
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  assert area.min() >= 0.09 and area.max() <= 0.42
  assert b.min() >= 0 and b.max() <= 1 and np.all(b[:, 2:] > b[:, :2])


def test_balance_split_and_dtypes(small):
  ds, _ = small
  assert ds.images.shape == (60, 48, 48, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.boxes.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(ds.labels), [10] * 6)
  np.testing.assert_array_equal(np.bincount(ds.labels[ds.is_train]), [6] * 6)  # test_fraction 0.4
  assert ds.images.min() < 30 and ds.images.max() > 225  # the full range is used
  assert len(set(ds.class_names)) == 6


def test_object_pixels_carry_the_class_crown_colour(small):
  ds, masks = small
  for i in range(len(ds)):
    crown = synthetic.CROWN_COLOURS[synthetic.class_traits(6)[ds.labels[i]]["crown"]]
    pixels = ds.images[i][masks[i]].astype(int)
    close = np.abs(pixels - np.array(crown)).max(1) <= 45  # lighting gain and noise
    assert close.sum() >= 3, f"image {i}: no crown-coloured pixel on the object"


def test_traits_are_distinct_and_stable():
  traits = data.class_traits(synthetic.MAX_CLASSES)
  assert len({tuple(t.values()) for t in traits}) == synthetic.MAX_CLASSES
  assert data.class_traits(20) == traits[:20]
  with pytest.raises(ValueError, match="num_classes"):
    data.class_traits(synthetic.MAX_CLASSES + 1)


def test_bad_arguments():
  with pytest.raises(ValueError, match="test_fraction"):
    data.make_synthetic(test_fraction=1.0)
  with pytest.raises(ValueError, match="per_class"):
    data.make_synthetic(per_class=0)
