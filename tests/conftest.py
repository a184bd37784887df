"""Shared test settings: CPU only, deterministic, quiet, and one XLA compile per program.

The pipeline tests build the same tiny networks again and again (each run, each
subprocess); JAX's persistent compilation cache, in a folder of its own for
this test session, lets every later build of the same program skip XLA's
compile, which is most of their time on a CPU.
"""

import os
import shutil
import tempfile

import pytest

# Tests must behave the same on a laptop, in CI and on a GPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Inherited by the subprocesses the command-line tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fgir_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A finished tiny run (test_pipeline.tiny_config: 8- and 12-bit codes), trained once per
  session. Tests that change a run copy it first (`copy_run`)."""
  from test_pipeline import tiny_config  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import pipeline  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  pipeline.run(tiny_config(), workdir, echo=lambda _: None, command="python launch.py TINY")
  return workdir


def copy_run(workdir, destination):
  """A copy of a finished run, to change without touching the shared one."""
  shutil.copytree(workdir, destination)
  return str(destination)


def write_marker(wd, stage, marker):
  """A finished stage's marker written directly: a run's state without running it."""
  from fgir_jax.train.workdir import write_json  # pylint: disable=g-import-not-at-top
  os.makedirs(wd.file("stages"), exist_ok=True)
  write_json(wd.file("stages", f"{stage}.json"), marker)
