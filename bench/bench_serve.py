"""Latency of `--mode serve` on a trained run: one search at a time, and 50 at once.

    python launch.py --config configs/demo.py --workdir runs/demo      # once (~2 min)
    python bench/bench_serve.py --workdir runs/demo

Starts the same server `--mode serve` starts (uvicorn on 127.0.0.1, a free
port) in this process, warms it up as `serve` does, then
  - sends --repeats POST /api/search requests one after another (each waits
    for its answer) with the run's example query images (runs/<run>/examples/
    query_*.png) and reports the median and 90th percentile of the wall time
    per request as the client sees it, and of `SearchService.search` alone;
  - sends --concurrent searches at once (one thread each) and reports the wall
    time until the last answer, checks every answer equals the same search
    made alone, and polls GET /api/health meanwhile: its median and worst
    latency under that load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--concurrent", type=int, default=50)
  p.add_argument("--rounds", type=int, default=3, help="concurrent rounds; the median is shown")
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

  with serve.Background(service) as server, httpx.Client(timeout=120) as client:
    def one(i):
      response = client.post(server.url + "/api/search",
                             files={"image": ("q.png", payloads[i % len(payloads)])},
                             data={"k": str(args.k)})
      response.raise_for_status()
      return response.json()

    http, alone = [], {}
    for i in range(args.repeats):
      t = time.perf_counter()
      alone[i % len(payloads)] = one(i)
      http.append(time.perf_counter() - t)
    walls, health, same = [], [], True
    for _ in range(args.rounds):
      wall, latencies, answers = _concurrent_round(server.url, one, args.concurrent, httpx)
      walls.append(wall)
      health += latencies
      same &= all(a == alone[i % len(payloads)] for i, a in enumerate(answers))

  info = service.health()
  print(f"# {args.workdir}: {info['database']} database images, {info['bits'][-1]}-bit "
        f"codes by default, image size {service.searcher.run.size} px; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}, {os.cpu_count()} cores; warm-up {warm:.1f} s; "
        f"top-{args.k}, {len(payloads)} different query images")
  print("\n| measure | median | 90th percentile / worst |")
  print("| --- | ---: | ---: |")
  for name, times in ((f"one search, POST /api/search over HTTP ({args.repeats} in a row)", http),
                      ("one search, SearchService.search (no HTTP)", direct)):
    ordered = sorted(times)
    print(f"| {name} | {1e3 * statistics.median(times):.0f} ms "
          f"| {1e3 * ordered[int(0.9 * (len(ordered) - 1))]:.0f} ms |")
  print(f"| {args.concurrent} concurrent searches, until the last answer ({args.rounds} rounds) "
        f"| {statistics.median(walls):.2f} s | {max(walls):.2f} s |")
  print(f"| GET /api/health during them ({len(health)} polls) "
        f"| {1e3 * statistics.median(health):.0f} ms | {1e3 * max(health):.0f} ms |")
  print(f"\nconcurrent answers identical to the same searches alone: {same}; most searches in "
        f"one forward pass: {getattr(service, 'largest_batch', 'n/a')}")


def _concurrent_round(url, one, n, httpx):
  """(wall seconds of n searches at once, health latencies polled meanwhile, answers)."""
  done = threading.Event()
  latencies = []

  def poll():
    with httpx.Client(timeout=120) as health_client:
      while not done.is_set():
        t = time.perf_counter()
        health_client.get(url + "/api/health").raise_for_status()
        latencies.append(time.perf_counter() - t)
        time.sleep(0.02)

  poller = threading.Thread(target=poll)
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    poller.start()
    t = time.perf_counter()
    answers = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t
  done.set()
  poller.join()
  return wall, latencies, answers


def _load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


if __name__ == "__main__":
  main()
