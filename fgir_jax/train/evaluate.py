"""Evaluation, one stage per code length, and results.json, which gathers them.

`evaluate_<bits>` encodes the queries (test split) and the database (train
split) with that length's hash layer, scores the Hamming ranking (mAP, tie-aware
mAP, precision@k) and writes evaluate/<bits>.json, codes/codes_<bits>.npz and
the searchable index/index_<bits>.npz. Each length owns these files, so a
command that narrows stage2.bits leaves the other lengths' results in place.
Images added with `--mode index` are recorded in additions/index_<bits>.json
and replayed into a rebuilt index: encoded again with the new networks.
`results` writes results.json: the config's code lengths, and the finished
lengths it no longer names as "kept" (stages.kept_lengths).
"""

from __future__ import annotations

import json
import os

import numpy as np

from fgir_jax import index as index_lib
from fgir_jax import metrics
from fgir_jax.train import encoder as encoder_lib
from fgir_jax.train import finished
from fgir_jax.train import stage2
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import write_json

KEPT_NOTE = "kept from an earlier command"
METRICS = ("map", "map_tie_aware", "precision_at_{k}")


def stage_evaluate(run: Run, bits: int) -> dict:
  """Codes, scores and index of one code length; returns its scores."""
  products = finished.Finished(run)
  feats, params = products.features(), products.hash_layer(bits)
  tr = feats["is_train"]
  q = stage2.codes(params, feats["features"][~tr])
  db = stage2.codes(params, feats["features"][tr])
  args = (q, feats["labels"][~tr], db, feats["labels"][tr])
  k = int(run.config.eval.precision_k)
  row = {"bits": bits, "queries": int((~tr).sum()), "database": int(tr.sum()),
         "map": metrics.mean_average_precision(*args, mesh=run.mesh),
         "map_tie_aware": metrics.mean_average_precision(*args, ties="average", mesh=run.mesh),
         f"precision_at_{k}": metrics.precision_at_k(*args, k=k, mesh=run.mesh)}
  write_json(run.wd.out("evaluate", f"{bits}.json"), row)
  np.savez(run.wd.out("codes", f"codes_{bits}.npz"), query=np.packbits(q, axis=1),
           database=np.packbits(db, axis=1), bits=bits)
  save_index(run, bits, db, feats["labels"][tr])
  run.wd.log(f"evaluate_{bits}", map=row["map"])
  return {"map": row["map"]}


def save_index(run: Run, bits: int, db_codes, db_labels) -> str:
  """index/index_<bits>.npz: the database (train split) codes, labels and image paths, and
  the images added with --mode index, encoded with this command's networks."""
  ds = run.dataset
  index = index_lib.HammingIndex(bits, class_names=list(ds.class_names))
  paths = None
  if ds.paths is not None:  # in-memory images (synthetic) have no file
    paths = [os.path.abspath(p) for p, t in zip(ds.paths, ds.is_train) if t]
  index.add(db_codes, labels=db_labels, paths=paths)
  _replay_additions(run, bits, index)
  return str(index.save(run.wd.out("index", f"index_{bits}.npz")))


# ----------------------------------------------------------------------------
# Images added with --mode index.
# ----------------------------------------------------------------------------
def additions_path(wd, bits: int) -> str:
  return wd.file("additions", f"index_{bits}.json")


def read_additions(wd, bits: int) -> list[dict]:
  """[{"path", "label"}] of the images --mode index added to a code length's index."""
  try:
    with open(additions_path(wd, bits)) as f:
      return list(json.load(f)["images"])
  except FileNotFoundError:
    return []


def record_additions(wd, bits: int, paths: list[str], labels) -> None:
  """Appends images to the record that evaluation replays (the caller holds the lock)."""
  images = read_additions(wd, bits)
  known = {a["path"] for a in images}
  images += [{"path": os.path.abspath(p), "label": int(label)}
             for p, label in zip(paths, labels) if os.path.abspath(p) not in known]
  os.makedirs(wd.file("additions"), exist_ok=True)
  write_json(additions_path(wd, bits), {"bits": bits, "images": images})


def _replay_additions(run: Run, bits: int, index) -> None:
  added = read_additions(run.wd, bits)
  if not added:
    return
  present = [a for a in added if os.path.isfile(a["path"])]
  if len(present) < len(added):
    run.echo(f"evaluate_{bits}: {len(added) - len(present)} image(s) added with --mode index no "
             f"longer exist and are left out (their record stays in "
             f"{additions_path(run.wd, bits)})")
  if not present:
    return
  enc = encoder_lib.Encoder(run, len(run.dataset.class_names))
  paths = [a["path"] for a in present]
  codes, _ = enc.encode(paths, enc.load_files(paths), bits)
  index.add(codes, labels=np.array([a["label"] for a in present], np.int64), paths=paths)
  run.echo(f"evaluate_{bits}: {len(present)} image(s) added with --mode index encoded again "
           "with the new networks")


# ----------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------
def stage_results(run: Run, kept_bits=()) -> dict:
  """results.json: each metric by code length for the config's lengths, the kept ones
  under "kept", and stage 1's accuracy and the saliency stage's localisation."""
  k = int(run.config.eval.precision_k)
  names = [m.format(k=k) for m in METRICS]
  results = {name: {} for name in names}
  results.update(dataset=run.dataset.name, kept={})
  for bits in run.bits:
    row = _row(run.wd.read("evaluate", f"{bits}.json"))
    for name in names:
      results[name][str(bits)] = row.get(name)
    results.update(queries=row.get("queries"), database=row.get("database"))
  for bits in kept_bits:
    row = _row(run.wd.file("evaluate", f"{bits}.json"))
    results["kept"][str(bits)] = dict({n: row.get(n) for n in names}, note=KEPT_NOTE)
  results["accuracy"] = (run.wd.done("stage1") or {}).get("accuracy")
  sal = run.wd.done("saliency") or {}
  for key in ("corloc", "mean_iou", "full_image_corloc", "uncropped_accuracy"):
    if key in sal:
      results[key] = sal[key]
  write_json(run.wd.out("results.json"), results)
  run.wd.log("results", **{f"map_{b}": v for b, v in results["map"].items()})
  return {"bits": run.bits, "kept_bits": list(kept_bits)}


def _row(path: str) -> dict:
  with open(path) as f:
    return json.load(f)
