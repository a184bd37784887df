"""Which kernel variant a function runs on which backend.

The selection kernels (mining, mAP, Hamming top-k) each have variants that
compute the same result: counting passes that suit a CPU's caches and
vector units, and sort / top_k based ones. Which is fastest depends on the
backend, so each module keeps a table {backend: variant}, filled from the
measurements of bench/bench_gpu.py, and its public functions take
`method=None` (the table's choice) or a variant's name: the tests force
every variant on the CPU and check that they give identical results.
"""

from __future__ import annotations

import jax

from fgir_jax import _validate


def backend() -> str:
  """"cpu", "gpu" or "tpu": where JAX runs by default."""
  return jax.default_backend()


def choose(method, methods: tuple, by_backend: dict, name: str = "method") -> str:
  """`method` itself (checked against `methods`) or, for None, the variant that
  `by_backend` names for this backend (its "cpu" entry for backends it does not name)."""
  if method is None:
    return by_backend.get(backend(), by_backend["cpu"])
  return _validate.check_choice(method, methods, name)
