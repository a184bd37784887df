"""Orbax checkpoints for one training stage: the latest and the best are kept.

Each stage (stage 1, stage 2 at each code length) owns a directory with one
`ocp.CheckpointManager`. A checkpoint holds the train-state pytree (params,
batch statistics, optimizer state, step, PRNG key data) and a small JSON dict
(epoch, metrics) so that a killed run resumes where it stopped and the best
epoch can be restored for evaluation.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
from fgir_jax import _extras
from fgir_jax import parallel

ocp = _extras.need("orbax.checkpoint", "fgir_jax.train.checkpoints")
ocp_policy = ocp.checkpoint_managers.preservation_policy


# Orbax writes a checkpoint under "<step>.orbax-checkpoint-tmp..." and renames it when complete.
_TMP_MARK = ".orbax-checkpoint-tmp"


def _remove_unfinished(directory: str, echo) -> None:
  """Removes the half-written checkpoint a kill left behind, saying so in one line."""
  if not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    if _TMP_MARK in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
      step = name.split(".", 1)[0]
      what = f"epoch {step}" if step.isdigit() else name
      echo(f"removed the unfinished checkpoint of {what} in {directory} (the run was stopped "
           "while saving it)")


class StageCheckpoints:
  """Save/restore the train state of one stage; keeps the latest and the best.

  `best_metric` names the key in the saved metrics used to rank checkpoints
  (higher is better); the latest checkpoint is always kept as well so that a
  resumed run continues from the last epoch, not the best one.
  """

  def __init__(self, directory: str, best_metric: str | None = None, echo=print,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.read_only = read_only
    if not read_only:
      if parallel.is_primary():
        _remove_unfinished(self.directory, echo)
      parallel.barrier("checkpoints cleaned")
    best_fn = None
    policies = [ocp_policy.LatestN(n=1)]
    if best_metric:
      best_fn = lambda m: float(m.get(best_metric, float("-inf")))
      policies.append(ocp_policy.BestN(get_metric_fn=best_fn, reverse=False, n=1))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode="max",  # what best_step() ranks by
        preservation_policy=ocp_policy.AnyPreservationPolicy(policies),
        enable_async_checkpointing=False,  # stages are short; simpler failure modes
        # Restoring only (read_only=True here) creates nothing and saves nothing;
        # Orbax's own read_only mode would log two warnings for it.
        create=not read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes `state` (a pytree of arrays) and `meta` (JSON-able) at `step`."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only; it cannot be saved to.")
    metrics = meta.get("metrics") if self.best_metric else None
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(_global(state)),
                                meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    if not self.best_metric:
      return self.latest_step()
    return self._manager.best_step()

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores the state at `step` into the structure, shapes and dtypes of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _global(like))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return _placed_like(restored["state"], like), dict(restored["meta"])

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _global(tree):
  """With several processes, every leaf that one process holds alone (a per-process
  copy of the same value) as a global array replicated over all devices: Orbax saves
  a multi-host checkpoint only from global arrays. With one process, `tree` itself."""
  if jax.process_count() == 1:
    return tree
  replicated = jax.sharding.NamedSharding(parallel.data_mesh(), jax.sharding.PartitionSpec())

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return jax.make_array_from_process_local_data(replicated, np.asarray(x))
  return jax.tree.map(one, tree)


def _placed_like(restored, like):
  """Restored leaves back on the devices of `like`'s leaves (see `_global`)."""
  if jax.process_count() == 1:
    return restored

  def one(x, ref):
    if isinstance(ref, jax.Array) and not ref.is_fully_addressable:
      return x
    value = parallel.to_host(x)
    return jax.device_put(value, ref.sharding) if isinstance(ref, jax.Array) else value
  return jax.tree.map(one, restored, like)
