"""Throughput of the device input pipeline (gather + augmentation), images/s.

    python bench/bench_input.py                       # 224 and 299 px, batch 64
    python bench/bench_input.py --host                # also the host-memory fallback
    python bench/bench_input.py --saliency 2000       # also boxes_from_maps, both CC methods
    python bench/bench_input.py --step                # also input + the stage-1 train step

The source is a random uint8 array of `--n` images at `--src` px (the decode
cache's layout), put on the device once. Each timed batch is one jitted call:
gather the rows, random resized crop + flip to the output size, normalise.

With --step, the stage-1 train step of ResNet18-I (200 classes, SGD) is timed
three ways: on one fixed batch (the step alone), fed by the input pipeline
(input + step), and the input alone; the input keeps up when input + step runs
at the speed of the step alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fgir_jax import saliency  # noqa: E402
from fgir_jax.data import augment, batching  # noqa: E402


def measure(inp: batching.DeviceInput, key, batch_size: int, steps: int,
            step_fn: Callable | None = None, state=None, warmup: int = 2) -> float:
  """Images/s over `steps` training batches (after `warmup` untimed ones).

  With `step_fn(state, batch) -> (state, metrics)` each batch is also fed to
  the step, and the clock stops when the last state is ready.
  """
  def run(epoch, n):
    nonlocal state
    out = None
    batches = inp.train_batches(key, epoch, batch_size)
    for _, batch in zip(range(n), batches):
      if step_fn is None:
        out = batch["image"]
      else:
        state, _ = step_fn(state, batch)
        out = state
    jax.block_until_ready(out)

  run(0, warmup)  # compile
  epochs = -(-steps // max(inp.steps_per_epoch(batch_size), 1))
  start = time.perf_counter()
  done = 0
  for epoch in range(1, epochs + 1):
    n = min(steps - done, inp.steps_per_epoch(batch_size))
    run(epoch, n)
    done += n
  return done * batch_size / (time.perf_counter() - start)


def stage1_step(size: int, width: float, batch_size: int):
  """(step_fn, state) of the stage-1 step of ResNet18-I at `size` px."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fgir_jax import models  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import stage1_step  # pylint: disable=g-import-not-at-top
  net = models.RetrievalNet(num_classes=200, enhance=True, width=width)
  variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, size, size, 3)), train=False))(
      jax.random.key(0, impl="rbg"))
  optimizer = stage1_step.make_optimizer(stage1_step.Stage1Settings(epochs=1), 100)
  state = stage1_step.create_state(variables, optimizer)
  step = lambda s, b: stage1_step.train_step(s, b, net=net, optimizer=optimizer)  # noqa: E731
  return step, state


def bench_step(inp, key, size, width, batch_size, steps):
  step, state = stage1_step(size, width, batch_size)
  fixed = next(iter(inp.train_batches(key, 0, batch_size)))
  state, _ = step(state, fixed)  # compile
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, fixed)
  jax.block_until_ready(state)
  alone = steps * batch_size / (time.perf_counter() - start)
  fed = measure(inp, key, batch_size, steps, step_fn=step, state=state, warmup=1)
  print(f"stage-1 step ResNet18-I width {width} at {size} px, batch {batch_size}: "
        f"step alone {alone:7.1f} images/s, input + step {fed:7.1f} images/s "
        f"({100 * fed / alone:.0f}% of the step alone)")


def bench_saliency(num_maps: int, image_size: int = 299, grid: int = 8):
  """Maps/s of boxes_from_maps on 8x8 maps upsampled to the image, per CC method."""
  rng = np.random.default_rng(0)
  maps = np.asarray(saliency.saliency_maps(rng.random((num_maps, grid, grid, 1)).astype(np.float32)))
  # "all" needs no components; the device loop is slow on CPU, so it gets fewer maps.
  cases = [("largest", "scipy", num_maps), ("largest", "jax", min(num_maps, 256)),
           ("all", "jax", num_maps)]
  for mode, method, n in cases:
    run = lambda m: saliency.boxes_from_maps(  # noqa: E731
        m, 0.4, mode, image_size=image_size, method=method).block_until_ready()
    run(maps[:128])  # compile
    start = time.perf_counter()
    run(maps[:n])
    rate = n / (time.perf_counter() - start)
    print(f"boxes_from_maps {grid}x{grid}->{image_size} mode={mode:7s} components={method:5s}: "
          f"{rate:8.1f} maps/s ({n} maps; 6000 maps in {6000 / rate:.1f} s)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=512, help="images in the device-resident array")
  parser.add_argument("--src", type=int, default=299, help="cached image size (px)")
  parser.add_argument("--sizes", default="224,299", help="output sizes (px), comma separated")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--host", action="store_true", help="also time the host-memory fallback")
  parser.add_argument("--saliency", type=int, default=0, help="also time boxes_from_maps on this many maps")
  parser.add_argument("--step", action="store_true", help="also time input + the stage-1 step")
  parser.add_argument("--width", type=float, default=1.0, help="network width for --step")
  parser.add_argument("--step-batch", type=int, default=32)
  parser.add_argument("--step-steps", type=int, default=5)
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores visible")
  images = np.random.default_rng(0).integers(0, 256, (args.n, args.src, args.src, 3), dtype=np.uint8)
  labels = np.arange(args.n) % 20
  key = jax.random.key(0)
  placements = [("device", None)] + ([("host", 0)] if args.host else [])
  for size in (int(s) for s in args.sizes.split(",")):
    for where, budget in placements:
      inp = batching.DeviceInput(images, labels, device_bytes=budget,
                                 train_transform=augment.transform_fn(True, size=size))
      rate = measure(inp, key, args.batch, args.steps)
      print(f"input {args.src}->{size} px, batch {args.batch}, {where}-resident: {rate:8.1f} images/s")
    if args.step:
      inp = batching.DeviceInput(images, labels, train_transform=augment.transform_fn(True, size=size))
      bench_step(inp, key, size, args.width, args.step_batch, args.step_steps)
  if args.saliency:
    bench_saliency(args.saliency, args.src)


if __name__ == "__main__":
  main()
