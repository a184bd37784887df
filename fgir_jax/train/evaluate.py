"""Evaluation, one stage per code length, and results.json, which gathers them.

`evaluate_<bits>` encodes the queries (test split) and the database (train
split) with that length's hash layer, scores the Hamming ranking (mAP, tie-aware
mAP, precision@k) and writes evaluate/<bits>.json, codes/codes_<bits>.npz and
the searchable index/index_<bits>.npz. Each length owns these files, so a
command that narrows stage2.bits leaves the other lengths' results in place.
Images added with `--mode index` are recorded in additions/index_<bits>.json
and replayed into a rebuilt index: encoded again with the new networks.
`results` writes results.json: the config's code lengths, and the finished
lengths it no longer names as "kept" (stages.kept_lengths). With seeds, each
seed k >= 1 has its own evaluate_<bits>_s<k> (scores and codes; the index is
seed 0's), and results.json holds the mean over seeds under each metric's
name, the standard deviation under "<metric>_std" and every seed's value
under "per_seed".
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
from fgir_jax.train import stages
from fgir_jax.train.context import Run
from fgir_jax.train.workdir import write_json

KEPT_NOTE = "kept from an earlier command"
METRICS = ("map", "map_tie_aware", "precision_at_{k}")


def stage_evaluate(run: Run, bits: int, seed: int = 0) -> dict:
  """Codes, scores (and for seed 0 the index) of one code length; returns its scores.

  codes/codes_<bits>.npz also holds each query's average precision (`ap`), which
  the ablation's comparisons resample."""
  products = finished.Finished(run)
  feats, params = products.features(seed), products.hash_layer(bits, seed)
  tr = feats["is_train"]
  q = stage2.codes(params, feats["features"][~tr])
  db = stage2.codes(params, feats["features"][tr])
  args = (q, feats["labels"][~tr], db, feats["labels"][tr])
  k = int(run.config.eval.precision_k)
  ap = np.asarray(metrics.average_precisions(*args, mesh=run.mesh))
  row = {"bits": bits, "seed": seed, "queries": int((~tr).sum()), "database": int(tr.sum()),
         "map": metrics.mean_over_queries(ap),
         "map_tie_aware": metrics.mean_average_precision(*args, ties="average", mesh=run.mesh),
         f"precision_at_{k}": metrics.precision_at_k(*args, k=k, mesh=run.mesh)}
  sfx = stages.seed_suffix(seed)
  write_json(run.wd.out("evaluate", f"{bits}{sfx}.json"), row)
  np.savez(run.wd.out("codes", f"codes_{bits}{sfx}.npz"), query=np.packbits(q, axis=1),
           database=np.packbits(db, axis=1), bits=bits, ap=ap.astype(np.float32))
  if seed == 0:
    save_index(run, bits, db, feats["labels"][tr])
  run.wd.log(stages.stage_name("evaluate", bits, seed), map=row["map"])
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
  under "kept", and stage 1's accuracy and the saliency stage's localisation. With
  config.seeds = N > 1 each value is the mean over the seeds, "<name>_std" the sample
  standard deviation (ddof=1) and "per_seed" every seed's value."""
  config = run.config
  k = int(config.eval.precision_k)
  names = [m.format(k=k) for m in METRICS]
  results = {name: {} for name in names}
  results.update(dataset=run.dataset.name, kept={})
  per_seed = {name: {} for name in names}
  for bits in run.bits:
    rows = [_row(run.wd.read("evaluate", f"{bits}{stages.seed_suffix(seed)}.json"))
            for seed in stages.seed_list(config, "evaluate")]
    for name in names:
      per_seed[name][str(bits)] = [row.get(name) for row in rows]
    results.update(queries=rows[0].get("queries"), database=rows[0].get("database"))
  for bits in kept_bits:
    row = _row(run.wd.file("evaluate", f"{bits}.json"))
    results["kept"][str(bits)] = dict({n: row.get(n) for n in names}, note=KEPT_NOTE)
  per_seed["accuracy"] = [(run.wd.done(s) or {}).get("accuracy")
                          for s in stages.expand(config, "stage1")]
  saliency_runs = [run.wd.done(s) or {} for s in stages.expand(config, "saliency")]
  for key in ("corloc", "mean_iou", "full_image_corloc", "uncropped_accuracy"):
    if key in saliency_runs[0]:
      per_seed[key] = [sal.get(key) for sal in saliency_runs]
  seeds = stages.seeds(config)
  for name, values in per_seed.items():
    results[name] = _by_length(values, mean_or_none)
    # A spread only over values that seeds repeat (not a shared stage 1's accuracy).
    if seeds > 1 and (isinstance(values, dict) or len(values) > 1):
      results[f"{name}_std"] = _by_length(values, std_or_none)
  if seeds > 1:
    results.update(seeds=seeds, per_seed=per_seed)
  write_json(run.wd.out("results.json"), results)
  run.wd.log("results", **{f"map_{b}": v for b, v in results["map"].items()})
  return {"bits": run.bits, "kept_bits": list(kept_bits), "seeds": stages.seeds(config)}


def _by_length(values, summary):
  """summary(values), or {bits: summary(values of bits)} for per-length values."""
  if isinstance(values, dict):
    return {b: summary(v) for b, v in values.items()}
  return summary(values)


def mean_or_none(values: list) -> float | None:
  """The mean of the values; None if any is missing."""
  if not values or any(v is None for v in values):
    return None
  return float(np.mean(values))


def std_or_none(values: list) -> float | None:
  """The sample standard deviation (ddof=1) of two or more values; None if any is missing."""
  if len(values) < 2 or any(v is None for v in values):
    return None
  return float(np.std(values, ddof=1))


def _row(path: str) -> dict:
  with open(path) as f:
    return json.load(f)
