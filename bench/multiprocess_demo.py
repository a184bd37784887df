"""Two processes on this machine against one process over two devices, on a real config.

    python bench/multiprocess_demo.py --config demo --out runs/multiprocess_demo

Trains OUT/one (one process, two simulated CPU devices) and OUT/two (two processes
joined by jax.distributed over 127.0.0.1, one device each), then prints both runs'
mAP per code length, the largest difference, their wall times, and whether the two
work directories hold the same files (checkpoints compared by their steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _files(workdir: str) -> set:
  out = set()
  for root, _, names in os.walk(workdir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), workdir)
      out.add(os.path.join(*rel.split(os.sep)[:3]) if rel.startswith("ckpt" + os.sep) else rel)
  return out - {".lock", "command.txt", "config.json"}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="demo")
  p.add_argument("--out", required=True)
  args, overrides = p.parse_known_args()
  one, two = os.path.join(args.out, "one"), os.path.join(args.out, "two")
  base = [sys.executable, "launch.py", "--config", args.config] + overrides
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  started = time.time()
  subprocess.run(base + ["--workdir", one], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                 env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  seconds_one = time.time() - started

  port = _free_port()
  started = time.time()
  procs = [subprocess.Popen(base + ["--workdir", two, "--config.parallel.distributed=True",
                                    f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                                    "--config.parallel.num_processes=2",
                                    f"--config.parallel.process_id={i}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL if i else None)
           for i in (0, 1)]
  codes = [proc.wait() for proc in procs]
  seconds_two = time.time() - started
  if any(codes):
    sys.exit(f"the two processes exited with {codes}")

  maps = []
  for workdir in (one, two):
    with open(os.path.join(workdir, "results.json")) as f:
      maps.append(json.load(f)["map"])
  print("| run | " + " | ".join(f"mAP {b} bits" for b in maps[0]) + " | wall time |")
  print("| --- |" + " --- |" * (len(maps[0]) + 1))
  for name, m, s in (("one process, two devices", maps[0], seconds_one),
                     ("two processes, one device each", maps[1], seconds_two)):
    print(f"| {name} | " + " | ".join(f"{v:.6f}" for v in m.values()) + f" | {s:.0f} s |")
  print(f"largest mAP difference: {max(abs(maps[0][b] - maps[1][b]) for b in maps[0]):.2e}")
  print(f"same files in both work directories: {_files(one) == _files(two)}")


if __name__ == "__main__":
  main()
