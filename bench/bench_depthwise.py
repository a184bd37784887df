"""Depthwise convolution on the CPU: shifted multiply-adds vs XLA's grouped convolution.

    python bench/bench_depthwise.py

EfficientNet-Lite0's depthwise layers at 224 px, batch 32 (NHWC, float32,
"SAME" padding): `efficientnet.depthwise_by_shifts` (what the backbone uses
on CPUs) against `lax.conv_general_dilated(feature_group_count=channels)`,
forward alone and forward + backward (gradients for input and kernel), jitted,
median of --repeats runs after a warm-up. Both give the same values.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fgir_jax.models import efficientnet  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)

# (input side, channels, kernel, stride) of Lite0's depthwise layers at 224 px.
LAYERS = ((112, 32, 3, 1), (112, 96, 3, 2), (56, 144, 3, 1), (56, 144, 5, 2), (28, 240, 5, 1),
          (28, 240, 3, 2), (14, 480, 3, 1), (14, 480, 5, 1), (14, 672, 5, 2), (7, 1152, 5, 1),
          (7, 1152, 3, 1))


def grouped(x, w, strides):
  return lax.conv_general_dilated(x, w, (strides, strides), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}, batch {args.batch}")
  print("| input | channels | kernel | stride | shifts fwd | grouped fwd | fwd ratio "
        "| shifts fwd+bwd | grouped fwd+bwd | fwd+bwd ratio |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  totals = [0.0, 0.0, 0.0, 0.0]
  for size, channels, kernel, strides in LAYERS:
    key_x, key_w = jax.random.split(jax.random.key(size * channels + kernel))
    x = jax.random.normal(key_x, (args.batch, size, size, channels))
    w = jax.random.normal(key_w, (kernel, kernel, 1, channels))
    row = []
    for fn in (efficientnet.depthwise_by_shifts, grouped):
      forward = jax.jit(lambda x, w, fn=fn: fn(x, w, strides))
      both = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w, strides) ** 2),
                              argnums=(0, 1)))
      row.append(timed(lambda: jax.block_until_ready(forward(x, w)), args.repeats)[1])
      row.append(timed(lambda: jax.block_until_ready(both(x, w)), args.repeats)[1])
    shifts_f, shifts_b, grouped_f, grouped_b = row
    for i, t in enumerate((shifts_f, grouped_f, shifts_b, grouped_b)):
      totals[i] += t
    print(f"| {size} | {channels} | {kernel} | {strides} | {1e3 * shifts_f:.1f} ms "
          f"| {1e3 * grouped_f:.1f} ms | {grouped_f / shifts_f:.1f}x | {1e3 * shifts_b:.1f} ms "
          f"| {1e3 * grouped_b:.1f} ms | {grouped_b / shifts_b:.1f}x |")
  print(f"| all | | | | {1e3 * totals[0]:.0f} ms | {1e3 * totals[1]:.0f} ms "
        f"| {totals[1] / totals[0]:.1f}x | {1e3 * totals[2]:.0f} ms | {1e3 * totals[3]:.0f} ms "
        f"| {totals[3] / totals[2]:.1f}x |")


if __name__ == "__main__":
  main()
