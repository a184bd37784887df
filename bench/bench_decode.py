"""Decode-cache throughput on CUB-format JPEGs (target: >= 150 images/s on 2 CPU cores).

Reads a CUB_200_2011 folder, then fills the decode cache from scratch (a fresh
temporary cache folder per run, so every image is really decoded, converted
and resized) at each size with each executor, and prints images/s; then the
time to open a finished cache (a hit). Default data: the development subset.

    python bench/bench_decode.py [--root data/cub50] [--sizes 299,224]
        [--executors thread,process] [--workers 2] [--repeat 2]
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from fgir_jax import data

_DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cub50")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default=_DEFAULT_ROOT, help="folder holding CUB_200_2011/")
  parser.add_argument("--sizes", default="299,224", help="comma-separated output sides, pixels")
  parser.add_argument("--executors", default="thread,process")
  parser.add_argument("--workers", default="", help="comma-separated worker counts; default: CPU count")
  parser.add_argument("--repeat", type=int, default=2, help="runs per setting; the best is reported")
  parser.add_argument("--no-draft", action="store_true", help="disable JPEG draft mode")
  args = parser.parse_args()

  t0 = time.perf_counter()
  cub = data.read_cub(args.root)
  read_s = time.perf_counter() - t0
  n = len(cub)
  print(f"read_cub: {n} images, {cub.num_classes} classes, headers read in {read_s:.2f} s "
        f"(median image {int(np.median(cub.sizes[:, 1]))} x {int(np.median(cub.sizes[:, 0]))} px)")
  print(f"CPUs usable: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}")
  workers = [int(w) for w in args.workers.split(",") if w] or [None]
  print("| size | executor | workers | images/s | seconds | cache hit, s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for size in (int(s) for s in args.sizes.split(",")):
    for executor in args.executors.split(","):
      for w in workers:
        best, hit_s = float("inf"), float("nan")
        for _ in range(args.repeat):
          tmp = tempfile.mkdtemp(prefix="bench_decode_")
          try:
            t0 = time.perf_counter()
            out = data.cached_images(cub, size, tmp, workers=w, executor=executor,
                                     progress=False, draft=not args.no_draft)
            best = min(best, time.perf_counter() - t0)
            assert out.images.shape == (n, size, size, 3) and not out.hit
            t0 = time.perf_counter()
            hit = data.cached_images(cub, size, tmp, progress=False, draft=not args.no_draft)
            hit_s = time.perf_counter() - t0
            assert hit.hit
          finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"| {size} | {executor} | {w or len(os.sched_getaffinity(0))} | {n / best:.0f} | "
              f"{best:.2f} | {hit_s:.3f} |", flush=True)


if __name__ == "__main__":
  main()
