"""Device input: epoch coverage, P x K batches, determinism, host-memory fallback."""

import functools

import jax
import numpy as np
import pytest

from fgir_jax.data import augment, batching

N, H, W = 46, 12, 14


@functools.lru_cache(maxsize=None)
def _data():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
  # Class 5 has a single image, class 6 two: fewer than K.
  labels = np.concatenate([np.repeat(np.arange(5), 8), [5, 6, 6], rng.integers(0, 5, 3)])
  return images, labels


@functools.lru_cache(maxsize=None)
def _input(device_bytes=None):
  images, labels = _data()
  return batching.DeviceInput(
      images, labels, device_bytes=device_bytes,
      train_transform=augment.transform_fn(True, size=8),
      eval_transform=augment.transform_fn(False))


def _collect(batches):
  return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def test_eval_covers_every_example_once_with_mask():
  images, labels = _data()
  out = _collect(_input().eval_batches(16))
  assert len(out) == 3 and all(b["image"].shape == (16, H, W, 3) for b in out)
  idx = np.concatenate([b["index"][b["mask"]] for b in out])
  np.testing.assert_array_equal(idx, np.arange(N))  # each once, in order
  assert sum((~b["mask"]).sum() for b in out) == 3 * 16 - N
  for b in out:  # labels and pixels belong to the rows named by `index`
    np.testing.assert_array_equal(b["label"], labels[b["index"]])
    np.testing.assert_allclose(augment.denormalize(b["image"]), images[b["index"]], atol=1e-3)


def test_shuffled_epoch_without_repeats():
  idx, mask = batching.shuffled_indices(jax.random.key(0), N, 8, epoch=0)
  assert idx.shape == (N // 8, 8) and mask.all()
  assert len(np.unique(idx)) == idx.size  # no example twice in an epoch
  idx2, _ = batching.shuffled_indices(jax.random.key(0), N, 8, epoch=1)
  assert not np.array_equal(idx, idx2)  # a new order each epoch
  padded, pmask = batching.shuffled_indices(jax.random.key(0), N, 8, epoch=0, drop_remainder=False)
  assert padded.shape == (6, 8)
  np.testing.assert_array_equal(np.sort(padded[pmask]), np.arange(N))


def test_train_batches_deterministic_by_key_and_epoch():
  inp = _input()
  a = _collect(inp.train_batches(jax.random.key(1), 3, 8))
  b = _collect(inp.train_batches(jax.random.key(1), 3, 8))
  c = _collect(inp.train_batches(jax.random.key(1), 4, 8))
  assert len(a) == N // 8
  assert a[0]["image"].shape == (8, 8, 8, 3) and a[0]["image"].dtype == np.float32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["index"], y["index"])
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  # Two steps of one epoch get different augmentation keys.
  same_rows = inp.batch(a[0]["index"], jax.random.key(5))
  other_key = inp.batch(a[0]["index"], jax.random.key(6))
  assert not np.allclose(np.asarray(same_rows["image"]), np.asarray(other_key["image"]))


def test_host_memory_fallback_gives_the_same_batches():
  device, host = _input(None), _input(0)
  assert device.on_device and not host.on_device
  assert isinstance(host.images, np.ndarray)
  key = jax.random.key(2)
  for x, y in zip(_collect(device.train_batches(key, 0, 8)), _collect(host.train_batches(key, 0, 8))):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_allclose(x["image"], y["image"], atol=1e-6)
  for x, y in zip(_collect(device.pk_batches(key, 0, 2, 4)), _collect(host.pk_batches(key, 0, 2, 4))):
    np.testing.assert_allclose(x["image"], y["image"], atol=1e-6)


def test_pk_batches_have_p_classes_and_k_each():
  _, labels = _data()
  p, k = 4, 3
  idx = batching.pk_indices(jax.random.key(0), labels, p, k, num_batches=40)
  assert idx.shape == (40, p * k)
  by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
  for row in idx:
    groups = labels[row].reshape(p, k)
    assert np.all(groups == groups[:, :1])  # K consecutive rows per class
    assert len(np.unique(groups[:, 0])) == p  # P distinct classes
    for g, rows in zip(groups[:, 0], row.reshape(p, k)):
      if len(by_class[g]) >= k:
        assert len(np.unique(rows)) == k  # without replacement when possible
  # Small classes are still drawn (with replacement).
  assert np.isin(5, labels[idx]) and np.isin(6, labels[idx])
  again = batching.pk_indices(jax.random.key(0), labels, p, k, num_batches=40)
  np.testing.assert_array_equal(idx, again)


def test_pk_batches_iterator_masks_and_labels():
  out = _collect(_input().pk_batches(jax.random.key(3), 0, 2, 4))
  assert len(out) == N // 8
  for b in out:
    assert b["mask"].all() and b["image"].shape == (8, 8, 8, 3)
    assert len(np.unique(b["label"])) == 2


def test_class_table_lists_each_row_once():
  _, labels = _data()
  classes, members, counts = batching.class_table(labels)
  rows = np.concatenate([members[c, :counts[c]] for c in range(len(classes))])
  np.testing.assert_array_equal(np.sort(rows), np.arange(N))
  for c, cls in enumerate(classes):
    assert np.all(labels[members[c, :counts[c]]] == cls)


def test_device_budget_defaults_to_no_limit_on_cpu():
  assert batching.default_device_bytes() is None
  assert batching.fits_on_device(10, None) and not batching.fits_on_device(10, 9)


@pytest.mark.parametrize("call,match", [
    (lambda im, lb: batching.DeviceInput(im.astype(np.float32), lb), "uint8"),
    (lambda im, lb: batching.DeviceInput(im[0], lb), "4-d"),
    (lambda im, lb: batching.DeviceInput(im, lb[:-1]), "labels"),
    (lambda im, lb: batching.pk_indices(jax.random.key(0), lb, 50, 2), "classes"),
    (lambda im, lb: batching.shuffled_indices(jax.random.key(0), 5, 8), "drop_remainder"),
    (lambda im, lb: batching.sequential_indices(5, 0), "batch_size"),
])
def test_bad_arguments_raise_clear_errors(call, match):
  images, labels = _data()
  with pytest.raises(ValueError, match=match):
    call(images, labels)
