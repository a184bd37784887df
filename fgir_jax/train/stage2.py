"""Stage 2 (PAPER.md step 4), one stage per code length: the hash layer on the frozen features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import metrics
from fgir_jax.train import finished
from fgir_jax.train import hash_layer
from fgir_jax.train import stages
from fgir_jax.train.checkpoints import StageCheckpoints
from fgir_jax.train.context import Run


def stage2_settings(config, bits: int, num_classes: int = 0) -> hash_layer.Stage2Settings:
  s = config.stage2
  return hash_layer.Stage2Settings(num_classes=num_classes,
      bits=bits, epochs=s.epochs, mine_every=s.mine_every, batch_size=s.batch_size,
      learning_rate=s.learning_rate, loss=s.loss, margin_mode=s.margin_mode, margin=s.margin,
      ema_decay=s.ema_decay, beta=s.beta, neg_factor=s.neg_factor,
      class_term=s.class_term, class_weight=s.class_weight)


def codes(params, features):
  """(n, bits) {0,1} codes of pooled features under a hash layer."""
  return np.asarray(hash_layer.hash_outputs(params, jnp.asarray(features)) > 0)


def train_bits(run: Run, feats: dict, bits: int, seed: int = 0) -> dict:
  """Stage 2 at one code length and seed, resumable; returns the final hash params."""
  settings = stage2_settings(run.config, bits, len(run.dataset.class_names))
  tr = feats["is_train"]
  x_train, y_train = feats["features"][tr], feats["labels"][tr]
  x_query, y_query = feats["features"][~tr], feats["labels"][~tr]
  name = stages.stage_name("stage2", bits, seed)
  key = run.stage_key(name)  # each seed's own: initialisation, mining and batch order
  fresh = lambda: hash_layer.new_state(jax.random.split(key)[0], x_train, y_train, settings)
  eval_every = max(1, int(run.config.stage2.eval_every))

  with StageCheckpoints(run.wd.checkpoint_dir("ckpt", name), best_metric="map",
                        echo=run.echo) as ckpt:
    state = None
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(ckpt.latest_step(), fresh())
      run.echo(f"{name}: resuming after epoch {int(state['epoch'])}")

    def on_epoch(epoch, state, stats):
      row = dict(stats)
      if epoch % eval_every == 0 or epoch == settings.epochs:
        params = hash_layer.hash_params(state)
        row["map"] = metrics.mean_average_precision(
            codes(params, x_query), y_query, codes(params, x_train), y_train, mesh=run.mesh)
      ckpt.save(epoch, state, {"epoch": epoch, "metrics": {"map": row.get("map", -1.0)}})
      run.wd.log(name, epoch=epoch, **row)
      shown = " ".join(f"{k} {v:.4f}" for k, v in row.items())
      run.echo(f"{name}: epoch {epoch}/{settings.epochs} {shown}")

    try:
      state = hash_layer.train_hash_layer(key, x_train, y_train, settings, state=state,
                                          on_epoch=on_epoch, mesh=run.mesh)
    except FloatingPointError as e:
      lower = settings.learning_rate / 10
      raise FloatingPointError(
          f"{name}: {e} Lower it and run again (the stage starts afresh with it): "
          f"{run.command} --config.stage2.learning_rate={lower:g}") from None
  return hash_layer.hash_params(state)


def stage_stage2(run: Run, bits: int, seed: int = 0) -> dict:
  """Stage 2 at one code length and seed: the hash layer, saved as
  stage2/hash_<bits>.npz (seed k >= 1: hash_<bits>_s<k>.npz)."""
  params = train_bits(run, finished.Finished(run).features(seed), bits, seed)
  np.savez(run.wd.out("stage2", f"hash_{bits}{stages.seed_suffix(seed)}.npz"),
           **jax.device_get(params))
  return {"bits": bits, "seed": seed}
