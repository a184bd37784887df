"""Evaluation: codes of queries and database, mAP and precision@k, the saved index, results.json."""

from __future__ import annotations

import json
import os

import numpy as np

from fgir_jax import index as index_lib
from fgir_jax import metrics
from fgir_jax.train import stage2
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import write_json


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
  feats = stage2.pooled_features(run)
  tr = feats["is_train"]
  k = int(run.config.eval.precision_k)
  results = {"map": {}, "map_tie_aware": {}, f"precision_at_{k}": {}, "dataset": run.dataset.name,
             "queries": int((~tr).sum()), "database": int(tr.sum())}
  for bits in run.bits:
    with np.load(run.wd.read("stage2", f"hash_{bits}.npz")) as f:
      params = dict(f)
    q, db = stage2.codes(params, feats["features"][~tr]), stage2.codes(params, feats["features"][tr])
    args = (q, feats["labels"][~tr], db, feats["labels"][tr])
    results["map"][str(bits)] = metrics.mean_average_precision(*args, mesh=run.mesh)
    results["map_tie_aware"][str(bits)] = metrics.mean_average_precision(
        *args, ties="average", mesh=run.mesh)
    results[f"precision_at_{k}"][str(bits)] = metrics.precision_at_k(*args, k=k, mesh=run.mesh)
    np.savez(run.wd.out("codes", f"codes_{bits}.npz"), query=np.packbits(q, axis=1),
             database=np.packbits(db, axis=1), bits=bits)
    save_index(run, bits, db, feats["labels"][tr])
  results["accuracy"] = (run.wd.done("stage1") or {}).get("accuracy")
  sal = run.wd.done("saliency") or {}
  for key in ("corloc", "mean_iou", "full_image_corloc", "uncropped_accuracy"):
    if key in sal:
      results[key] = sal[key]
  write_json(run.wd.out("results.json"), results)
  run.wd.log("evaluate", **{f"map_{b}": v for b, v in results["map"].items()})
  return results

