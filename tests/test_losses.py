"""Distances and triplet losses against brute-force NumPy references.

References are written here with plain loops (float64), independent of the
library; gradients are checked against central finite differences in float64
(inside a local `jax.enable_x64` block, so other tests keep 32-bit defaults).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fgir_jax import losses


# --------------------------------------------------------------------------
# References.

def ref_distances(a, b, metric):
  out = np.zeros((len(a), len(b)))
  for i, x in enumerate(np.asarray(a, np.float64)):
    for j, y in enumerate(np.asarray(b, np.float64)):
      if metric == "euclidean":
        out[i, j] = np.sqrt(np.sum((x - y) ** 2))
      elif metric == "sqeuclidean":
        out[i, j] = np.sum((x - y) ** 2)
      else:
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        cos = x @ y / (nx * ny) if nx > 0 and ny > 0 else 0.0
        out[i, j] = 1.0 - cos
  return out


def ref_gaps(dist, triplets):
  dist = np.asarray(dist, np.float64)
  d_ap = np.array([dist[a, p] for a, p, _ in triplets])
  d_an = np.array([dist[a, n] for a, _, n in triplets])
  return d_ap, d_an


def ref_triplet(dist, triplets, margin, valid):
  d_ap, d_an = ref_gaps(dist, triplets)
  terms = [max(ap - an + margin, 0.0) for ap, an, ok in zip(d_ap, d_an, valid) if ok]
  return float(np.mean(terms)) if terms else 0.0


def ref_adaptive(dist, triplets, margin, valid):
  d_ap, d_an = ref_gaps(dist, triplets)
  ok = np.asarray(valid, bool)
  if not ok.any():
    return 0.0
  if margin is None:  # Eq. 3
    margin = np.mean(d_an[ok] - d_ap[ok])
  terms = [1.0 - 1.0 / (1.0 + np.exp(-(an - ap - margin)))
           for ap, an, v in zip(d_ap, d_an, ok) if v]
  return float(np.mean(terms))


def numeric_grad(f, x, eps=1e-6):
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    grad[idx] = (f(hi) - f(lo)) / (2 * eps)
  return grad


def problem(seed=0, n=7, t=9):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((n, 4)).astype(np.float32)
  dist = ref_distances(emb, emb, "euclidean").astype(np.float32)
  triplets = rng.integers(0, n, (t, 3)).astype(np.int32)
  valid = rng.random(t) < 0.7
  valid[0] = True
  return dist, triplets, valid


# --------------------------------------------------------------------------
# Distances.

@pytest.mark.parametrize("metric", losses.METRICS)
def test_pairwise_distances_match_reference(metric):
  rng = np.random.default_rng(1)
  a = rng.standard_normal((6, 5)).astype(np.float32) + 3.0  # off-centre on purpose
  b = rng.standard_normal((4, 5)).astype(np.float32)
  np.testing.assert_allclose(losses.pairwise_distances(a, b, metric=metric),
                             ref_distances(a, b, metric), atol=2e-5, rtol=1e-5)
  self_dist = np.asarray(losses.pairwise_distances(a, metric=metric))
  np.testing.assert_allclose(self_dist, ref_distances(a, a, metric), atol=2e-5, rtol=1e-5)
  assert np.all(np.diag(self_dist) == 0.0)
  assert self_dist.shape == (6, 6) and self_dist.dtype == np.float32
  assert np.all(self_dist >= 0.0)


def test_pairwise_distances_single_row_and_integer_input():
  assert np.asarray(losses.pairwise_distances(np.ones((1, 3)))).tolist() == [[0.0]]
  d = losses.pairwise_distances(np.array([[0, 0], [3, 4]]))  # integers are cast to float32
  assert d.dtype == jnp.float32
  np.testing.assert_allclose(d, [[0, 5], [5, 0]])


def test_pairwise_distances_identical_embeddings_have_zero_distance_and_gradient():
  emb = jnp.tile(jnp.array([[0.3, -1.2, 2.0]]), (4, 1))
  for metric in losses.METRICS:
    assert np.all(np.asarray(losses.pairwise_distances(emb, metric=metric)) == 0.0)
    grad = jax.grad(lambda e: losses.pairwise_distances(e, metric=metric).sum())(emb)
    assert np.all(np.isfinite(grad)), metric
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_pairwise_distance_gradients_match_finite_differences():
  rng = np.random.default_rng(2)
  a0 = rng.standard_normal((4, 3))
  a0[3] = a0[1]  # a coincident pair: the expansion must not give NaN there
  w = rng.standard_normal((4, 4))
  w[1, 3] = w[3, 1] = 0.0  # Euclidean distance has no derivative at 0; skip that pair
  with jax.enable_x64(True):
    for metric in losses.METRICS:
      def f(a):
        return float(jnp.sum(losses.pairwise_distances(jnp.asarray(a), metric=metric) * w))
      grad = jax.grad(lambda a: jnp.sum(losses.pairwise_distances(a, metric=metric) * w))(
          jnp.asarray(a0))
      assert grad.dtype == jnp.float64
      np.testing.assert_allclose(grad, numeric_grad(f, a0), atol=1e-6, err_msg=metric)


def test_pairwise_distances_work_under_jit_and_vmap():
  rng = np.random.default_rng(3)
  batch = rng.standard_normal((3, 5, 2)).astype(np.float32)
  stacked = jax.jit(jax.vmap(losses.pairwise_distances))(batch)
  for k in range(3):
    np.testing.assert_allclose(stacked[k], ref_distances(batch[k], batch[k], "euclidean"),
                               atol=2e-5)


# --------------------------------------------------------------------------
# Losses.

def test_triplet_loss_matches_eq1():
  dist, triplets, valid = problem()
  for margin in (0.2, 1.5):
    got = losses.triplet_loss(dist, triplets, margin=margin, valid=valid)
    np.testing.assert_allclose(got, ref_triplet(dist, triplets, margin, valid), rtol=1e-5)
  # Default: margin 0.2, every triplet valid; a traced scalar margin gives the same.
  np.testing.assert_allclose(losses.triplet_loss(dist, triplets),
                             ref_triplet(dist, triplets, 0.2, [True] * len(triplets)), rtol=1e-5)
  np.testing.assert_allclose(
      jax.jit(lambda m: losses.triplet_loss(dist, triplets, margin=m, valid=valid))(
          jnp.float32(1.5)),
      ref_triplet(dist, triplets, 1.5, valid), rtol=1e-5)


def test_adaptive_triplet_loss_matches_eq2_and_eq3():
  dist, triplets, valid = problem(seed=4)
  np.testing.assert_allclose(losses.adaptive_triplet_loss(dist, triplets, valid=valid),
                             ref_adaptive(dist, triplets, None, valid), rtol=1e-5)
  np.testing.assert_allclose(losses.adaptive_triplet_loss(dist, triplets, margin=0.3, valid=valid),
                             ref_adaptive(dist, triplets, 0.3, valid), rtol=1e-5)


def test_adaptive_margin_can_be_a_traced_scalar():
  # A moving-average margin arrives as an array from the train state.
  dist, triplets, valid = problem(seed=5)
  loss = jax.jit(lambda m: losses.adaptive_triplet_loss(dist, triplets, margin=m, valid=valid))
  for m in (0.0, 0.4):
    np.testing.assert_allclose(loss(jnp.float32(m)), ref_adaptive(dist, triplets, m, valid),
                               rtol=1e-5)


def test_no_valid_triplet_gives_zero_loss_and_zero_gradient():
  dist, triplets, _ = problem(seed=6)
  none = np.zeros(len(triplets), bool)
  for loss in (losses.triplet_loss, losses.adaptive_triplet_loss):
    value, grad = jax.value_and_grad(lambda d: loss(d, triplets, valid=none))(jnp.asarray(dist))
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
  stats = losses.triplet_stats(dist, triplets, none)
  assert {k: float(v) for k, v in stats.items()} == {
      "d_ap": 0.0, "d_an": 0.0, "margin": 0.0, "num_valid": 0.0}


def test_loss_gradients_match_finite_differences():
  dist, triplets, valid = problem(seed=7)
  with jax.enable_x64(True):
    d0 = dist.astype(np.float64)
    cases = {
        "triplet": lambda d: losses.triplet_loss(d, triplets, margin=0.7, valid=valid),
        "adaptive_fixed": lambda d: losses.adaptive_triplet_loss(d, triplets, 0.3, valid),
    }
    for name, loss in cases.items():
      grad = jax.grad(loss)(jnp.asarray(d0))
      np.testing.assert_allclose(grad, numeric_grad(lambda d: float(loss(jnp.asarray(d))), d0),
                                 atol=1e-6, err_msg=name)


def test_adaptive_margin_is_stop_gradient():
  dist, triplets, valid = problem(seed=8)
  d_ap, d_an = ref_gaps(dist, triplets)
  margin = float(np.mean((d_an - d_ap)[valid]))
  with jax.enable_x64(True):
    d = jnp.asarray(dist, jnp.float64)
    g_eq3 = jax.grad(lambda d: losses.adaptive_triplet_loss(d, triplets, valid=valid))(d)
    g_const = jax.grad(lambda d: losses.adaptive_triplet_loss(d, triplets, margin, valid))(d)
    np.testing.assert_allclose(g_eq3, g_const, rtol=1e-9, atol=1e-12)
    # Analytic form with margin1 held fixed: d/d(d_AP) = s(1 - s), s = sigmoid(margin - gap).
    s = 1.0 / (1.0 + np.exp(-(margin - (d_an - d_ap))))
    want = np.zeros_like(dist, np.float64)
    for (a, p, n), si, ok in zip(triplets, s, valid):
      if ok:
        want[a, p] += si * (1 - si) / valid.sum()
        want[a, n] -= si * (1 - si) / valid.sum()
    np.testing.assert_allclose(g_eq3, want, atol=1e-9)


def test_triplet_stats_are_means_over_valid_triplets():
  dist, triplets, valid = problem(seed=9)
  d_ap, d_an = ref_gaps(dist, triplets)
  stats = losses.triplet_stats(dist, triplets, valid)
  np.testing.assert_allclose(stats["d_ap"], d_ap[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(stats["d_an"], d_an[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(stats["margin"], (d_an - d_ap)[valid].mean(), rtol=1e-5, atol=1e-6)
  assert float(stats["num_valid"]) == valid.sum()


def test_losses_vmap_over_independent_problems_equals_a_loop():
  problems = [problem(seed=s) for s in range(3)]
  dists, trips, valids = (np.stack(x) for x in zip(*problems))
  adaptive = jax.jit(jax.vmap(lambda d, t, v: losses.adaptive_triplet_loss(d, t, valid=v)))
  classic = jax.vmap(lambda d, t, v: losses.triplet_loss(d, t, 0.5, v))
  stats = jax.vmap(losses.triplet_stats)(dists, trips, valids)
  for k, (d, t, v) in enumerate(problems):
    np.testing.assert_allclose(adaptive(dists, trips, valids)[k], ref_adaptive(d, t, None, v),
                               rtol=1e-5)
    np.testing.assert_allclose(classic(dists, trips, valids)[k], ref_triplet(d, t, 0.5, v),
                               rtol=1e-5)
    np.testing.assert_allclose(stats["margin"][k], losses.triplet_stats(d, t, v)["margin"],
                               rtol=1e-6)


# --------------------------------------------------------------------------
# The losses straight from embeddings (no (n, n) matrix).

def embedding_problem(seed=0, n=7, t=9, dim=4):
  _, triplets, valid = problem(seed, n, t)
  emb = np.random.default_rng(seed + 100).standard_normal((n, dim)).astype(np.float32)
  emb[1] = emb[2]  # coincident rows: a zero distance with a finite gradient
  emb[3] = 0.0  # a zero vector: cosine distance 1 from everything
  triplets[0] = (1, 2, 3)
  return emb, triplets, valid


@pytest.mark.parametrize("metric", losses.METRICS)
def test_losses_from_embeddings_match_the_reference(metric):
  emb, triplets, valid = embedding_problem()
  dist = ref_distances(emb, emb, metric)
  for margin in (None, 0.3):
    got = losses.adaptive_triplet_loss_from_embeddings(emb, triplets, margin, valid, metric)
    np.testing.assert_allclose(got, ref_adaptive(dist, triplets, margin, valid), rtol=1e-5)
  got = losses.triplet_loss_from_embeddings(emb, triplets, 0.5, valid, metric)
  np.testing.assert_allclose(got, ref_triplet(dist, triplets, 0.5, valid), rtol=1e-5, atol=1e-6)
  # And the matrix path agrees to its expansion's rounding.
  matrix = losses.adaptive_triplet_loss(losses.pairwise_distances(emb, metric=metric), triplets,
                                        valid=valid)
  np.testing.assert_allclose(losses.adaptive_triplet_loss_from_embeddings(
      emb, triplets, valid=valid, metric=metric), matrix, atol=1e-5)


@pytest.mark.parametrize("metric", losses.METRICS)
def test_loss_from_embeddings_gradients_match_finite_differences(metric):
  emb, triplets, valid = embedding_problem(seed=3)
  # Finite differences need points away from the kinks: a zero distance, a zero vector.
  emb[1] = emb[2] + 0.1
  emb[3] = 0.5
  with jax.enable_x64(True):
    e0 = emb.astype(np.float64)
    cases = {
        "triplet": lambda e: losses.triplet_loss_from_embeddings(e, triplets, 0.7, valid, metric),
        "adaptive": lambda e: losses.adaptive_triplet_loss_from_embeddings(
            e, triplets, 0.3, valid, metric),
    }
    for name, loss in cases.items():
      grad = jax.grad(loss)(jnp.asarray(e0))
      np.testing.assert_allclose(grad, numeric_grad(lambda e: float(loss(jnp.asarray(e))), e0),
                                 atol=1e-6, err_msg=name)


def test_loss_from_embeddings_gradient_is_finite_at_coincident_rows():
  emb, triplets, valid = embedding_problem(seed=4)
  for metric in losses.METRICS:
    grad = jax.grad(lambda e: losses.adaptive_triplet_loss_from_embeddings(
        e, triplets, 0.2, valid, metric))(jnp.asarray(emb))
    assert np.all(np.isfinite(grad)), metric


def test_losses_from_embeddings_vmap_over_independent_problems():
  problems = [embedding_problem(seed=s) for s in range(3)]
  embs, trips, valids = (np.stack(x) for x in zip(*problems))
  batched = jax.jit(jax.vmap(lambda e, t, v: losses.adaptive_triplet_loss_from_embeddings(
      e, t, valid=v)))(embs, trips, valids)
  for k, (e, t, v) in enumerate(problems):
    np.testing.assert_allclose(batched[k], ref_adaptive(ref_distances(e, e, "euclidean"), t, None,
                                                        v), rtol=1e-5)


def test_loss_from_embeddings_argument_errors():
  emb, triplets, valid = embedding_problem()
  with pytest.raises(ValueError, match="embeddings must be a 2-d"):
    losses.adaptive_triplet_loss_from_embeddings(emb[0], triplets)
  with pytest.raises(ValueError, match=r"triplets must index rows of embeddings in \[0, 7\)"):
    losses.adaptive_triplet_loss_from_embeddings(emb, triplets + 7)
  with pytest.raises(ValueError, match="metric"):
    losses.triplet_loss_from_embeddings(emb, triplets, metric="manhattan")


# --------------------------------------------------------------------------
# Argument errors: one plain sentence naming the argument.

def test_distance_argument_errors():
  with pytest.raises(ValueError, match=r"a must be a 2-d array of embeddings"):
    losses.pairwise_distances(np.zeros(3))
  with pytest.raises(ValueError, match=r"a and b must have the same embedding size"):
    losses.pairwise_distances(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"metric must be one of 'euclidean'"):
    losses.pairwise_distances(np.zeros((2, 3)), metric="manhattan")


def test_loss_argument_errors():
  dist, triplets, valid = problem()
  with pytest.raises(ValueError, match=r"dist must be a square \(n, n\) distance matrix"):
    losses.triplet_loss(dist[:, :5], triplets)
  with pytest.raises(ValueError, match=r"dist must be a 2-d"):
    losses.adaptive_triplet_loss(dist[0], triplets)
  with pytest.raises(ValueError, match=r"triplets must have shape \(t, 3\)"):
    losses.triplet_loss(dist, triplets[:, :2])
  with pytest.raises(ValueError, match=r"triplets must hold integer indices"):
    losses.adaptive_triplet_loss(dist, triplets.astype(np.float32))
  with pytest.raises(ValueError, match=r"triplets must index rows of dist in \[0, 7\)"):
    losses.triplet_loss(dist, np.array([[0, 1, 7]]))
  with pytest.raises(ValueError, match=r"valid must have shape \(9,\)"):
    losses.triplet_loss(dist, triplets, valid=valid[:4])
  with pytest.raises(ValueError, match=r"margin must be a number or a float scalar array"):
    losses.adaptive_triplet_loss(dist, triplets, margin=jnp.ones(2))
  with pytest.raises(ValueError, match=r"margin must be a number"):
    losses.triplet_loss(dist, triplets, margin=None)


def test_shape_checks_run_on_tracers_too():
  dist, triplets, _ = problem()
  with pytest.raises(ValueError, match=r"triplets must have shape \(t, 3\)"):
    jax.jit(lambda t: losses.triplet_loss(dist, t))(triplets[:, :2])
