"""Latency of one search through `--mode serve`, after warm-up, on a trained run.

    python launch.py --config configs/demo.py --workdir runs/demo      # once (~4 min)
    python bench/bench_serve.py --workdir runs/demo

Starts the same server `--mode serve` starts (uvicorn on 127.0.0.1, a free
port) in this process, warms it up as `serve` does, then sends --repeats
POST /api/search requests one after another (each waits for its answer) with
the run's example query images (runs/<run>/examples/query_*.png, or test-split
images) and reports the median and 90th percentile of the wall time per
request as the client sees it, and of `SearchService.search` alone (decode,
saliency crop, both networks, hashing and the index search, without HTTP).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--k", type=int, default=10)
  args = p.parse_args(argv)

  import httpx
  import jax
  from fgir_jax.commands import serve
  from fgir_jax.commands.service import SearchService

  config = _load_config(args.config)
  service = SearchService(config, args.workdir)
  start = time.perf_counter()
  serve.warm_up(service)
  warm = time.perf_counter() - start
  images = sorted(glob.glob(os.path.join(args.workdir, "examples", "query_*.png")))
  if not images:
    raise SystemExit(f"{args.workdir}/examples has no query_*.png; train the demo first.")
  payloads = [open(path, "rb").read() for path in images]

  direct = []
  for i in range(args.repeats):
    t = time.perf_counter()
    service.search(payloads[i % len(payloads)], k=args.k)
    direct.append(time.perf_counter() - t)

  with serve.Background(service) as server, httpx.Client(timeout=60) as client:
    http = []
    for i in range(args.repeats):
      t = time.perf_counter()
      response = client.post(server.url + "/api/search",
                             files={"image": ("q.png", payloads[i % len(payloads)])},
                             data={"k": str(args.k)})
      response.raise_for_status()
      http.append(time.perf_counter() - t)

  health = service.health()
  print(f"# {args.workdir}: {health['database']} database images, {health['bits'][-1]}-bit "
        f"codes by default, image size {service.searcher.run.size} px; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}, {os.cpu_count()} cores; warm-up {warm:.1f} s; "
        f"{args.repeats} searches, top-{args.k}, {len(payloads)} different query images")
  print("\n| one search | median | 90th percentile |")
  print("| --- | ---: | ---: |")
  for name, times in (("POST /api/search over HTTP (client's view)", http),
                      ("SearchService.search (no HTTP)", direct)):
    ordered = sorted(times)
    print(f"| {name} | {1e3 * statistics.median(times):.0f} ms "
          f"| {1e3 * ordered[int(0.9 * (len(ordered) - 1))]:.0f} ms |")


def _load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


if __name__ == "__main__":
  main()
