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
import math
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize` for a multi-host run; call before any other JAX work.

  Unset arguments are detected from the cluster environment (SLURM, Open MPI,
  Cloud TPU), as jax.distributed does.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


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
  return jax.device_put(tree, NamedSharding(mesh, P()))


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
    x = np.asarray(x)
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
