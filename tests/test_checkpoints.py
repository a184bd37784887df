"""StageCheckpoints: a resumed stage gets its latest state; evaluation gets the best."""

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax.train.checkpoints import StageCheckpoints


def _state(offset):
  return {"params": {"w": jnp.full((3, 2), float(offset))},
          "step": jnp.asarray(offset, jnp.int32),
          "key": jax.random.key_data(jax.random.key(offset))}


def test_keeps_latest_and_best_and_survives_reopening(tmp_path):
  accuracies = {1: 0.5, 2: 0.9, 3: 0.4, 4: 0.3}
  with StageCheckpoints(str(tmp_path), best_metric="acc") as ckpt:
    for step, acc in accuracies.items():
      ckpt.save(step, _state(step), {"epoch": step, "metrics": {"acc": acc}})
  # A new manager (a resumed run) sees the same steps on disk.
  with StageCheckpoints(str(tmp_path), best_metric="acc") as ckpt:
    assert ckpt.latest_step() == 4
    assert ckpt.best_step() == 2
    state, meta = ckpt.restore(ckpt.best_step(), _state(0))
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 2.0))
    assert meta == {"epoch": 2, "metrics": {"acc": 0.9}}
    latest, _ = ckpt.restore(ckpt.latest_step(), _state(0))
    assert int(latest["step"]) == 4
    # The PRNG key survives as key data and can be wrapped again.
    key = jax.random.wrap_key_data(latest["key"])
    assert jnp.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(4)))


def test_without_metric_best_is_latest(tmp_path):
  with StageCheckpoints(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(7, _state(7), {"epoch": 7})
    assert ckpt.best_step() == ckpt.latest_step() == 7
