"""Stage 2 (hash layer + adaptive triplet loss) per code length, and the evaluate stage."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fgir_jax import index as index_lib
from fgir_jax import metrics
from fgir_jax.train import classifier
from fgir_jax.train import stage2 as stage2_lib
from fgir_jax.train.checkpoints import StageCheckpoints
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import write_json


def pooled_features(run: Run) -> dict:
  """Pooled features of the frozen stage-1 network for every image (stage 1 writes them)."""
  for path in (run.wd.read("stage1", "features.npz"),
               run.wd.file("stage2", "features.npz")):  # where runs before 0.2 kept them
    if os.path.exists(path):
      with np.load(path) as f:
        return dict(f)
  net, variables = classifier.restore_stage1(run)
  out = classifier.encode_all(run, net, variables, run.crops, "pooled features")
  return {"features": out["pooled"], "labels": run.dataset.labels,
          "is_train": run.dataset.is_train}


def stage2_settings(config, bits: int, num_classes: int = 0) -> stage2_lib.Stage2Settings:
  s = config.stage2
  return stage2_lib.Stage2Settings(num_classes=num_classes,
      bits=bits, epochs=s.epochs, mine_every=s.mine_every, batch_size=s.batch_size,
      learning_rate=s.learning_rate, loss=s.loss, margin_mode=s.margin_mode, margin=s.margin,
      ema_decay=s.ema_decay, beta=s.beta, neg_factor=s.neg_factor)


def _codes(params, features):
  return np.asarray(stage2_lib.hash_outputs(params, jnp.asarray(features)) > 0)


def train_bits(run: Run, feats: dict, bits: int) -> dict:
  """Stage 2 at one code length, resumable; returns the final hash params."""
  settings = stage2_settings(run.config, bits, len(run.dataset.class_names))
  tr = feats["is_train"]
  x_train, y_train = feats["features"][tr], feats["labels"][tr]
  x_query, y_query = feats["features"][~tr], feats["labels"][~tr]
  name = f"stage2_{bits}"
  key = run.stage_key(name)
  fresh = lambda: stage2_lib.new_state(jax.random.split(key)[0], x_train, y_train, settings)
  eval_every = max(1, int(run.config.stage2.eval_every))

  with StageCheckpoints(run.wd.out_dir("ckpt", name), best_metric="map", echo=run.echo) as ckpt:
    state = None
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(ckpt.latest_step(), fresh())
      run.echo(f"{name}: resuming after epoch {int(state['epoch'])}")

    def on_epoch(epoch, state, stats):
      row = dict(stats)
      if epoch % eval_every == 0 or epoch == settings.epochs:
        params = stage2_lib.hash_params(state)
        row["map"] = metrics.mean_average_precision(
            _codes(params, x_query), y_query, _codes(params, x_train), y_train, mesh=run.mesh)
      ckpt.save(epoch, state, {"epoch": epoch, "metrics": {"map": row.get("map", -1.0)}})
      run.wd.log(name, epoch=epoch, **row)
      shown = " ".join(f"{k} {v:.4f}" for k, v in row.items())
      run.echo(f"{name}: epoch {epoch}/{settings.epochs} {shown}")

    try:
      state = stage2_lib.train_hash_layer(key, x_train, y_train, settings, state=state,
                                          on_epoch=on_epoch, mesh=run.mesh)
    except FloatingPointError as e:
      lower = settings.learning_rate / 10
      raise FloatingPointError(
          f"{name}: {e} Lower it and run again (the stage starts afresh with it): "
          f"{run.command} --config.stage2.learning_rate={lower:g}") from None
  return stage2_lib.hash_params(state)


def stage_stage2(run: Run, bits: int) -> dict:
  """Stage 2 at one code length: the hash layer, saved as stage2/hash_<bits>.npz."""
  params = train_bits(run, pooled_features(run), bits)
  np.savez(run.wd.out("stage2", f"hash_{bits}.npz"), **jax.device_get(params))
  return {"bits": bits}


def save_index(run: Run, bits: int, db_codes, db_labels) -> str:
  """index/index_<bits>.npz: the database (train split) codes, labels and image paths,
  what `launch.py --mode search` searches."""
  ds = run.dataset
  index = index_lib.HammingIndex(bits, class_names=list(ds.class_names))
  paths = None
  if ds.paths is not None:  # in-memory images (synthetic) have no file
    paths = [os.path.abspath(p) for p, t in zip(ds.paths, ds.is_train) if t]
  index.add(db_codes, labels=db_labels, paths=paths)
  _warn_dropped_additions(run, bits, len(index))
  return str(index.save(run.wd.out("index", f"index_{bits}.npz")))


def _warn_dropped_additions(run: Run, bits: int, size: int) -> None:
  """The rebuilt index holds the database only: say so when --mode index had added images."""
  old = run.wd.file("index", f"index_{bits}.json")
  if not os.path.exists(old):
    return
  try:
    with open(old) as f:
      before = int(json.load(f).get("size", 0))
  except (OSError, ValueError, TypeError):
    return
  if before > size:
    run.echo(f"evaluate: the rebuilt {bits}-bit index holds the {size} database images; the "
             f"{before - size} image(s) added with --mode index must be added again (same command).")


def stage_evaluate(run: Run) -> dict:
  feats = pooled_features(run)
  tr = feats["is_train"]
  k = int(run.config.eval.precision_k)
  results = {"map": {}, "map_tie_aware": {}, f"precision_at_{k}": {}, "dataset": run.dataset.name,
             "queries": int((~tr).sum()), "database": int(tr.sum())}
  for bits in run.bits:
    with np.load(run.wd.read("stage2", f"hash_{bits}.npz")) as f:
      params = dict(f)
    q, db = _codes(params, feats["features"][~tr]), _codes(params, feats["features"][tr])
    args = (q, feats["labels"][~tr], db, feats["labels"][tr])
    results["map"][str(bits)] = metrics.mean_average_precision(*args, mesh=run.mesh)
    results["map_tie_aware"][str(bits)] = metrics.mean_average_precision(
        *args, ties="average", mesh=run.mesh)
    results[f"precision_at_{k}"][str(bits)] = metrics.precision_at_k(*args, k=k, mesh=run.mesh)
    np.savez(run.wd.out("codes", f"codes_{bits}.npz"), query=np.packbits(q, axis=1),
             database=np.packbits(db, axis=1), bits=bits)
    save_index(run, bits, db, feats["labels"][tr])
  stage1 = run.wd.done("stage1") or {}
  results["accuracy"] = stage1.get("accuracy")
  sal = run.wd.done("saliency") or {}
  for key in ("corloc", "mean_iou", "full_image_corloc", "uncropped_accuracy"):
    if key in sal:
      results[key] = sal[key]
  write_json(run.wd.out("results.json"), results)
  run.wd.log("evaluate", **{f"map_{b}": v for b, v in results["map"].items()})
  return results

