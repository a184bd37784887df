"""Shared test settings: CPU only, deterministic, quiet."""

import os

# Tests must behave the same on a laptop, in CI and on a GPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
