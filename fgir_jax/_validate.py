"""Argument checks shared by the public functions.

Each check looks only at shapes, dtypes and (when the value is concrete) the
values themselves, so it runs before tracing and also passes harmlessly under
`jit`/`vmap`, where it sees tracers. Every failure is a `ValueError` with one
plain sentence that names the argument and says what was expected.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
  """True when `x` holds values we may look at (not a tracer under jit/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def shape_of(x, name: str) -> tuple[int, ...]:
  """The shape of an array-like, or a clear error for something that is not one."""
  shape = getattr(x, "shape", None)
  if shape is None:
    try:
      shape = np.shape(x)
    except Exception as e:  # ragged lists and the like
      raise ValueError(f"{name} must be an array, got {type(x).__name__}.") from e
  return tuple(shape)


def check_ndim(x, ndim: int, name: str, what: str = "") -> tuple[int, ...]:
  """Checks the rank of `x` and returns its shape."""
  shape = shape_of(x, name)
  if len(shape) != ndim:
    desc = what or f"a {ndim}-d array"
    raise ValueError(f"{name} must be {desc}, got shape {shape}.")
  return shape


def check_labels(labels, n: int, name: str = "labels", against: str = "rows") -> None:
  """Labels must be a 1-d integer array with one entry per row (`n`)."""
  shape = check_ndim(labels, 1, name, f"a 1-d array of {n} integer class ids")
  if shape[0] != n:
    raise ValueError(
        f"{name} has {shape[0]} entries but there are {n} {against}; give one label per {against[:-1]}.")
  dtype = np.dtype(labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype)
  if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
    return
  if np.issubdtype(dtype, np.floating) and not is_concrete(labels):
    raise ValueError(
        f"{name} must hold integer class ids, got traced dtype {dtype}; cast with labels.astype(int).")
  if np.issubdtype(dtype, np.floating):
    values = np.asarray(labels)
    if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
      return  # whole-number floats (e.g. from a CSV) are accepted as class ids
  raise ValueError(
      f"{name} must hold integer class ids, got dtype {dtype}; cast with labels.astype(int).")


def as_int_labels(labels) -> jax.Array:
  """Labels as int32 (after `check_labels`)."""
  return jnp.asarray(labels).astype(jnp.int32)


def check_unit_interval(value, name: str) -> float:
  """A float in (0, 1], as beta must be."""
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number in (0, 1], got {value!r}.") from e
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{name} must be in (0, 1], got {value}.")
  return value


def check_choice(value, choices, name: str):
  if value not in choices:
    options = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name} must be one of {options}, got {value!r}.")
  return value
