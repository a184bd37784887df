"""Heads on the pooled features: the hash layer (stage 2) and binary codes.

The hash head is a module of its own so that stage 2, where everything before
it is frozen, can train it on cached pooled features without running the
network:

    head = HashHead(bits=64)
    params = net_variables["params"]["hash"]          # {"kernel", "bias"}
    h = head.apply({"params": params}, pooled)        # (n, 64) in (-1, 1)
    codes = binary_codes(h)                           # (n, 64) bool
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class HashHead(nn.Module):
  """Hash layer: Dense(bits) + tanh; (n, c) pooled features -> (n, bits) in (-1, 1).

  The parameters are the flat dict {"kernel": (c, bits), "bias": (bits,)}, so
  `RetrievalNet`'s `params["hash"]` is exactly this module's params.

  Attributes:
    bits: code length K (16, 32, 48, 64 in the paper).
    dtype: compute dtype. float32 by default: the layer is tiny and its outputs
      feed the triplet distances, where bfloat16's 8 bits of mantissa would
      blur the small margins the adaptive loss works on.
    param_dtype: parameter dtype.
  """
  bits: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, pooled):
    """(n, c) features -> (n, bits) tanh outputs, float32 unless dtype says otherwise."""
    if self.bits is None or int(self.bits) < 1:
      raise ValueError(f"bits must be a positive integer, got {self.bits!r}.")
    kernel = self.param("kernel", self.kernel_init, (pooled.shape[-1], self.bits),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.bits,), self.param_dtype)
    y = jnp.asarray(pooled, self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
    return jnp.tanh(y)


def binary_codes(hash_outputs: jax.Array) -> jax.Array:
  """(n, bits) tanh outputs -> (n, bits) bool codes, bit = output > 0 (sign)."""
  return jnp.asarray(hash_outputs) > 0
