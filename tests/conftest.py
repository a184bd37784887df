"""Shared test settings: CPU only, deterministic, quiet, and one XLA compile per program.

The pipeline tests build the same tiny networks again and again (each run, each
subprocess); JAX's persistent compilation cache, in a folder of its own for
this test session, lets every later build of the same program skip XLA's
compile, which is most of their time on a CPU.
"""

import os
import tempfile

# Tests must behave the same on a laptop, in CI and on a GPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Inherited by the subprocesses the command-line tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fgir_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
