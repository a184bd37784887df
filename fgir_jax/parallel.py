"""Data parallelism with JAX's own SPMD: one mesh over the devices, a batch axis, replicated params.

Training places parameters and optimizer state replicated on every device and
each batch split along its first axis (`shard_batch`); the jitted step is the
same function as on one device and XLA inserts the gradient all-reduce, so the
sharded step computes the single-device step (BatchNorm statistics too: they
are means over the whole, global batch). Whole-set passes that are independent
per row (the miner's anchors, the metrics' queries) split their rows over the
devices with `shard_rows`, the database or embeddings replicated.

With one device every function here is the identity, so the code path is the
same from a laptop to a multi-GPU host. For several hosts, `initialize` calls
`jax.distributed.initialize` first; each host then feeds the same global batch
(same seed, same order) and contributes its own slice of it.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_seconds: int = 100) -> None:
  """`jax.distributed.initialize` for a multi-host run; call before any other JAX work.

  Unset arguments are detected from the cluster environment (SLURM, Open MPI,
  Cloud TPU), as jax.distributed does. On CPUs the processes exchange gradients
  through gloo (JAX's CPU collectives, off by default). A process that stops
  sending heartbeats for `heartbeat_seconds` stops the others.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=int(heartbeat_seconds))


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0, or the only one)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def on_primary(fn: Callable):
  """fn() on process 0 only; the others wait, then get its result or its error.

  The result must be JSON-able (None is). An error on process 0 is raised on
  every process as a ValueError with the same message, so all of them stop
  with the same line instead of waiting for each other.
  """
  if jax.process_count() == 1:
    return fn()
  error, outcome = None, {}
  if is_primary():
    try:
      outcome = {"ok": fn()}
    except Exception as e:  # pylint: disable=broad-except  (sent to the others, then raised)
      error, outcome = e, {"error": str(e)}
  outcome = _broadcast_json(outcome)
  if error is not None:
    raise error
  if "error" in outcome:
    raise ValueError(outcome["error"])
  return outcome["ok"]


def _broadcast_json(obj):
  """Process 0's JSON-able `obj` on every process."""
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if is_primary() else None
  size = multihost_utils.broadcast_one_to_all(
      np.int32(0 if data is None else data.size), is_source=is_primary())
  buffer = data if data is not None else np.zeros(int(size), np.uint8)
  buffer = multihost_utils.broadcast_one_to_all(buffer, is_source=is_primary())
  return json.loads(np.asarray(buffer).tobytes().decode("utf-8"))


def to_host(tree):
  """Every leaf as a NumPy array of its global value, also when other processes hold parts."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def data_mesh(num_devices: int = 0) -> Mesh:
  """A 1-d mesh with axis "batch" over the first `num_devices` devices (0: all of them)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"parallel.devices must be between 0 (all) and {len(devices)} "
                     f"(the devices JAX sees), got {num_devices}.")
  chosen = devices[:num_devices] if num_devices else devices
  return Mesh(np.asarray(chosen), (BATCH_AXIS,))


def size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(mesh.devices.size)


def check_divisible(batch_size: int, mesh: Mesh | None, name: str) -> None:
  """A batch must split evenly over the devices; one clear error otherwise."""
  n = size(mesh)
  if batch_size % n:
    multiple = n * max(1, round(batch_size / n))
    raise ValueError(f"{name}={batch_size} does not split over {n} devices; use a multiple of "
                     f"{n} (e.g. {multiple}) or set parallel.devices.")


def replicate(tree, mesh: Mesh | None):
  """Every leaf of `tree` as a copy on each device of the mesh (params, optimizer state)."""
  if size(mesh) == 1:
    return tree
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  # Every process holds the same values: each places its copy on its own devices.
  return jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) == sharding else
      jax.make_array_from_process_local_data(sharding, to_host(x)), tree)


def shard_batch(batch, mesh: Mesh | None, axis: int = 0):
  """Every leaf split along `axis` (its batch axis) over the mesh's devices.

  Single host: a device_put of the global batch. Several hosts: each passes
  the same global batch and keeps its own contiguous slice of it.
  """
  if size(mesh) == 1:
    return batch
  sharding = NamedSharding(mesh, P(*([None] * axis), BATCH_AXIS))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def local(x):
    x = to_host(x)
    per = x.shape[axis] // jax.process_count()
    mine = np.take(x, np.arange(per) + jax.process_index() * per, axis=axis)
    return jax.make_array_from_process_local_data(sharding, mine, x.shape)

  return jax.tree.map(local, batch)


def padded_rows(rows: int, mesh: Mesh | None) -> int:
  """`rows` rounded up to a multiple of the device count."""
  n = size(mesh)
  return n * math.ceil(rows / n)


def shard_rows(fn: Callable, mesh: Mesh | None, num_rows: int, num_replicated: int = 0,
               **static) -> Callable:
  """fn(*rows, *replicated, **static) run on each device on its slice of the rows.

  The first `num_rows` arguments have rows on their first axis and are split
  over the devices; the next `num_replicated` (a database, embeddings) are
  whole on each device; `static` are fn's static keyword arguments. Outputs
  have the same rows on their first axis, each row independent of the others.
  The row count must be a multiple of the device count (`padded_rows`).
  """
  if size(mesh) == 1:
    return functools.partial(fn, **static)
  return _sharded(fn, tuple(sorted(static.items())), mesh, num_rows, num_replicated)


@functools.lru_cache(maxsize=64)
def _sharded(fn, static, mesh, num_rows, num_replicated):
  # Cached so that repeated calls (mAP every few epochs) reuse one compilation.
  rows, whole = P(BATCH_AXIS), P()
  return jax.jit(jax.shard_map(functools.partial(fn, **dict(static)), mesh=mesh,
                               in_specs=(rows,) * num_rows + (whole,) * num_replicated,
                               out_specs=rows, check_vma=False))
