"""Class-aware hash-layer terms against NumPy loops, with gradient checks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgir_jax import class_losses
from test_losses import numeric_grad


def ref_center(h, y, centers, valid):
  total, count = 0.0, 0
  for row, label, ok in zip(np.asarray(h, np.float64), y, valid):
    if not ok:
      continue
    per_bit = []
    for value, centre in zip(row, centers[label]):
      p = min(max((value + 1) / 2, 1e-7), 1 - 1e-7)
      t = (centre + 1) / 2
      per_bit.append(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    total, count = total + np.mean(per_bit), count + 1
  return total / max(count, 1)


def ref_cross_entropy(logits_rows, y, valid):
  total, count = 0.0, 0
  for logits, label, ok in zip(logits_rows, y, valid):
    if ok:
      shifted = np.asarray(logits, np.float64) - max(logits)
      total += -(shifted[label] - np.log(np.sum(np.exp(shifted))))
      count += 1
  return total / max(count, 1)


def ref_proxy(h, y, proxies, scale, margin, valid):
  rows = []
  for row, label in zip(np.asarray(h, np.float64), y):
    logits = []
    for c, proxy in enumerate(np.asarray(proxies, np.float64)):
      norm = np.linalg.norm(row)
      cos = 0.0 if norm == 0 else row @ proxy / (norm * np.linalg.norm(proxy))
      logits.append(scale * (cos - (margin if c == label else 0.0)))
    rows.append(logits)
  return ref_cross_entropy(rows, y, valid)


def ref_classifier(h, y, kernel, bias, valid):
  rows = [[sum(v * kernel[i][c] for i, v in enumerate(row)) + bias[c] for c in range(len(bias))]
          for row in np.asarray(h, np.float64)]
  return ref_cross_entropy(rows, y, valid)


def problem(seed=0, n=9, bits=8, classes=5):
  rng = np.random.default_rng(seed)
  h = np.tanh(rng.standard_normal((n, bits))).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  valid = rng.random(n) < 0.7
  valid[0] = True
  return h, y, valid, class_losses.hash_centers(classes, bits)


def test_terms_match_their_references():
  h, y, valid, centers = problem()
  kernel = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
  bias = np.linspace(-1, 1, 5).astype(np.float32)
  np.testing.assert_allclose(class_losses.center_loss(h, y, centers, valid),
                             ref_center(h, y, centers, valid), rtol=1e-5)
  np.testing.assert_allclose(class_losses.proxy_loss(h, y, centers, scale=6.0, margin=0.3,
                                                     valid=valid),
                             ref_proxy(h, y, centers, 6.0, 0.3, valid), rtol=1e-5)
  np.testing.assert_allclose(class_losses.classifier_loss(h, y, kernel, bias, valid),
                             ref_classifier(h, y, kernel, bias, valid), rtol=1e-5)


def test_saturated_outputs_stay_finite_and_no_valid_row_gives_zero():
  h, y, _, centers = problem()
  saturated = np.sign(h)  # tanh at +-1: the clip keeps the logs finite
  assert np.isfinite(class_losses.center_loss(saturated, y, centers))
  none = np.zeros(len(y), bool)
  for loss in (lambda x: class_losses.center_loss(x, y, centers, none),
               lambda x: class_losses.proxy_loss(x, y, centers, valid=none)):
    assert float(loss(h)) == 0.0
    assert not np.any(np.asarray(jax.grad(loss)(jnp.asarray(h))))


def test_a_code_at_its_centre_scores_better_than_one_at_another():
  _, _, _, centers = problem()
  y = np.arange(5, dtype=np.int32)
  own, other = 0.9 * centers, 0.9 * np.roll(centers, 1, axis=0)
  for loss in (class_losses.center_loss, class_losses.proxy_loss):
    assert float(loss(own, y, centers)) < float(loss(other, y, centers))


def test_gradients_match_finite_differences():
  h, y, valid, centers = problem(seed=3)
  kernel = np.random.default_rng(2).standard_normal((8, 5))
  with jax.enable_x64(True):
    h0 = np.asarray(h, np.float64) * 0.9  # away from the centre loss's clip
    cases = {
        "centers": lambda x: class_losses.center_loss(x, y, centers, valid),
        "proxies": lambda x: class_losses.proxy_loss(x, y, centers, valid=valid),
        "classifier": lambda x: class_losses.classifier_loss(x, y, kernel, np.zeros(5), valid),
    }
    for name, loss in cases.items():
      grad = jax.grad(loss)(jnp.asarray(h0))
      np.testing.assert_allclose(grad, numeric_grad(lambda x: float(loss(jnp.asarray(x))), h0),
                                 atol=1e-6, err_msg=name)
    # The classifier's own parameters get their gradient too.
    g = jax.grad(lambda k: class_losses.classifier_loss(h0, y, k, np.zeros(5), valid))(kernel)
    ref = numeric_grad(lambda k: ref_classifier(h0, y, k, np.zeros(5), valid), kernel)
    np.testing.assert_allclose(g, ref, atol=1e-6)


def test_terms_jit_and_vmap_over_independent_problems():
  problems = [problem(seed=s) for s in range(3)]
  h = jnp.stack([p[0] for p in problems])
  y = jnp.stack([p[1] for p in problems])
  valid = jnp.stack([p[2] for p in problems])
  centers = problems[0][3]
  batched = jax.jit(jax.vmap(lambda a, b, c: class_losses.proxy_loss(a, b, centers, valid=c)))
  looped = [class_losses.proxy_loss(p[0], p[1], centers, valid=p[2]) for p in problems]
  np.testing.assert_allclose(batched(h, y, valid), looped, rtol=1e-6)
  batched = jax.vmap(lambda a, b, c: class_losses.center_loss(a, b, centers, c))
  np.testing.assert_allclose(batched(h, y, valid),
                             [class_losses.center_loss(p[0], p[1], centers, p[2]) for p in problems],
                             rtol=1e-6)


@pytest.mark.parametrize("classes,bits", [(5, 8), (16, 8), (50, 32), (50, 64)])
def test_hadamard_centres_are_half_the_bits_apart_or_opposite(classes, bits):
  centers = class_losses.hash_centers(classes, bits)
  assert centers.shape == (classes, bits) and set(np.unique(centers)) == {-1.0, 1.0}
  for i, j in itertools.combinations(range(classes), 2):
    distance = int(np.sum(centers[i] != centers[j]))
    assert distance in (bits // 2, bits), (i, j, distance)


@pytest.mark.parametrize("classes,bits", [(50, 16), (50, 48), (3, 12)])
def test_random_centres_are_distinct_and_deterministic(classes, bits):
  centers = class_losses.hash_centers(classes, bits, seed=4)
  assert centers.shape == (classes, bits)
  assert len({tuple(c) for c in centers}) == classes
  np.testing.assert_array_equal(centers, class_losses.hash_centers(classes, bits, seed=4))


def test_bad_arguments_are_named():
  h, y, valid, centers = problem()
  with pytest.raises(ValueError, match=r"centers must be \(num_classes, 8\)"):
    class_losses.center_loss(h, y, centers[:, :4])
  with pytest.raises(ValueError, match="labels has 3 entries"):
    class_losses.proxy_loss(h, y[:3], centers)
  with pytest.raises(ValueError, match=r"valid must be \(9,\)"):
    class_losses.center_loss(h, y, centers, valid[:2])
  with pytest.raises(ValueError, match=r"kernel must be \(bits, num_classes\)"):
    class_losses.classifier_loss(h, y, np.zeros((3, 5)), np.zeros(5))
  with pytest.raises(ValueError, match="bits must be a positive integer"):
    class_losses.hash_centers(4, 0)
