"""Data parallelism: the sharded train steps, miner and metrics equal their single-device runs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fgir_jax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def two_device_results():
  """tests/sharded_checks.py in a process that sees two CPU devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py")], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_devices_seen(two_device_results):
  assert two_device_results["devices"] == 2


def test_sharded_stage1_step_gives_the_single_device_parameters(two_device_results):
  r = two_device_results
  assert r["stage1_params_replicated"]
  # Equal up to float32 summation order, tiny beside what the three steps changed.
  assert r["stage1_params_diff"] <= 1e-3 * r["stage1_params_moved"]
  assert r["stage1_batch_stats_diff"] <= 1e-3 * r["stage1_batch_stats_moved"]


def test_sharded_miner_gives_identical_triplets(two_device_results):
  assert two_device_results["miner_equal"]


def test_sharded_metrics_equal(two_device_results):
  assert two_device_results["map_diff"] < 1e-12


def test_sharded_stage2_equals_single_device(two_device_results):
  assert two_device_results["stage2_triplets_equal"]
  assert two_device_results["stage2_param_diff"] < 1e-5


def test_one_device_is_the_identity():
  mesh = parallel.data_mesh(1)
  batch = {"image": np.zeros((4, 2)), "label": np.arange(4)}
  assert parallel.shard_batch(batch, mesh) is batch
  tree = {"w": np.ones(3)}
  assert parallel.replicate(tree, mesh) is tree
  assert parallel.padded_rows(7, mesh) == 7
  assert parallel.shard_rows(np.add, mesh, 2)(1, 2) == 3


def test_bad_device_count_and_batch_split_are_clear():
  with pytest.raises(ValueError, match="parallel.devices must be between 0"):
    parallel.data_mesh(len(jax.devices()) + 1)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices() * 1), ("batch",))
  parallel.check_divisible(8, mesh, "stage1.batch_size")  # one device: anything splits


def test_check_divisible_message_names_key_and_fix():
  class FakeMesh:  # a 4-device mesh, without needing 4 devices
    devices = np.zeros(4)
  with pytest.raises(ValueError, match=r"stage1.batch_size=30 does not split over 4 devices; "
                                       r"use a multiple of 4 \(e.g. 32\)"):
    parallel.check_divisible(30, FakeMesh(), "stage1.batch_size")
