"""Stage 2 (hash layer + triplet losses on frozen features): learning, resume, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgir_jax import metrics
from fgir_jax.models import HashHead
from fgir_jax.train import hash_layer


def _features(seed, per_class, num_classes=6, dim=16, noise=1.0):
  rng = np.random.default_rng(0)
  centers = 2.0 * rng.normal(size=(num_classes, dim))
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class)
  feats = centers[labels] + noise * rng.normal(size=(len(labels), dim))
  return feats.astype(np.float32), labels


def _map(params, train, test):
  codes = lambda x: np.asarray(hash_layer.hash_outputs(params, x[0]) > 0)
  return metrics.mean_average_precision(codes(test), test[1], codes(train), train[1])


@pytest.mark.parametrize("loss,margin_mode", [("adaptive", "batch"), ("adaptive", "ema"),
                                              ("triplet", "batch"), ("ce", "batch")])
def test_training_separates_classes(loss, margin_mode):
  train, test = _features(1, 12), _features(2, 5)
  settings = hash_layer.Stage2Settings(bits=16, epochs=6, mine_every=2, batch_size=32,
                                   learning_rate=1e-2, loss=loss, margin_mode=margin_mode,
                                   num_classes=6)
  history = []
  state = hash_layer.train_hash_layer(jax.random.key(0), *train, settings,
                                  on_epoch=lambda e, s, stats: history.append(stats))
  assert len(history) == settings.epochs
  assert all(np.isfinite(h["loss"]) for h in history)
  # Trained codes retrieve better than the random initial projection and the
  # anchor-negative distance ends above the anchor-positive one.
  init = hash_layer.init_hash_params(jax.random.split(jax.random.key(0))[0], 16, 16)
  assert _map(hash_layer.hash_params(state), train, test) > _map(init, train, test)
  assert history[-1]["d_an"] > history[-1]["d_ap"]


def test_resumed_run_equals_uninterrupted_run():
  train = _features(3, 8)
  settings = hash_layer.Stage2Settings(bits=8, epochs=5, mine_every=2, batch_size=16,
                                   margin_mode="ema")
  full = hash_layer.train_hash_layer(jax.random.key(7), *train, settings)
  # Stop after epoch 3 (inside a mining window), then resume from that state.
  saved = {}
  def stop_at_3(epoch, state, stats):
    if epoch == 3:
      saved["state"] = jax.tree.map(lambda x: x, state)
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    hash_layer.train_hash_layer(jax.random.key(7), *train, settings, on_epoch=stop_at_3)
  resumed = hash_layer.train_hash_layer(jax.random.key(7), *train, settings, state=saved["state"])
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_folded_hash_params_apply_to_raw_features():
  train = _features(5, 6)
  # All-positive features with a large shared mean, like pooled post-ReLU ones.
  raw = np.abs(train[0]) + 5.0
  settings = hash_layer.Stage2Settings(bits=8, epochs=1)
  state = hash_layer.train_hash_layer(jax.random.key(0), raw, train[1], settings)
  standardised = hash_layer.standardise(jnp.asarray(raw), state["norm"])
  np.testing.assert_allclose(np.asarray(standardised).mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(hash_layer.hash_outputs(hash_layer.hash_params(state), raw),
                             hash_layer.hash_outputs(state["train"]["params"], standardised),
                             rtol=1e-4, atol=1e-5)


def test_hash_params_drop_into_the_network_hash_head():
  params = hash_layer.init_hash_params(jax.random.key(0), 12, 8)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 12)), jnp.float32)
  np.testing.assert_allclose(HashHead(8).apply({"params": params}, x),
                             hash_layer.hash_outputs(params, x), rtol=1e-6, atol=1e-6)


def test_first_epoch_margin_is_eq3_mean_of_the_mined_triplets():
  train = _features(4, 6)
  settings = hash_layer.Stage2Settings(bits=8, epochs=1, margin_mode="ema")
  state = hash_layer.init_state(jax.random.key(1), jnp.asarray(train[0]), train[1], settings,
                            hash_layer.make_optimizer(settings))
  emb = np.asarray(hash_layer.hash_outputs(state["train"]["params"], train[0]))
  trip, ok = np.asarray(state["triplets"]), np.asarray(state["valid"])
  gaps = [np.linalg.norm(emb[a] - emb[n]) - np.linalg.norm(emb[a] - emb[p])
          for (a, p, n), v in zip(trip, ok) if v]
  np.testing.assert_allclose(float(state["train"]["ema_margin"]), np.mean(gaps), rtol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss="contrastive"), "loss must be one of"),
    (dict(margin_mode="median"), "margin_mode must be one of"),
    (dict(mine_every=0), "mine_every must be a positive integer"),
    (dict(loss="ce"), "need num_classes"),
    (dict(class_term="centers"), "need num_classes"),
    (dict(class_term="hadamard", num_classes=4), "class_term must be one of"),
    (dict(class_term="proxies", num_classes=4, class_weight=-1.0), "class_weight must be >= 0"),
])
def test_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hash_layer.Stage2Settings(bits=8, **kwargs)
