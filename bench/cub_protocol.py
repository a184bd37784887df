"""The paper's protocol end to end on real birds, with the ablation, timed per stage.

    python bench/cub_protocol.py --root gpu_carry/cub50 --workdir /tmp/protocol --out DIR
    python bench/cub_protocol.py --cpu-smoke --workdir /tmp/smoke --out DIR   # tiny, CPU, synthetic

Runs `launch.py --config configs/cub.py:gpu --mode ablate` (EfficientNet-Lite0-I
with ImageNet weights, 299 px, bfloat16, 50 stage-1 epochs fully fine-tuned, 90
stage-2 epochs at 16/32/48/64 bits, saliency crop; then the variants no_enhance,
no_saliency, triplet and ce, which reuse every stage they share) and writes into
--out:
  protocol.md      the command, device, wall time, seconds per stage of every
                   variant, and the ablation table with its answers;
  protocol.tar.gz  ablation.md / .json, and per variant results.json, report.md
                   with its plots, metrics.jsonl, config.json, command.txt and
                   the stage records; the run's log.
Compiled programs go to a persistent JAX cache (--compile-cache), so variants
whose networks have the same shapes compile once. --cpu-smoke runs the same
command on tiny synthetic birds with tiny networks: it checks the script, not
the method. --time-limit stops the run cleanly (SIGTERM, which launch.py treats as Ctrl-C)
and still writes the summary. Extra arguments after `--` go to launch.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("full", "no_enhance", "no_saliency", "triplet", "ce")
# Tiny networks on tiny synthetic birds: seconds per stage on a CPU (the tiny
# ResNet compiles fastest; the method's path is the same).
SMOKE = ("--config.data.source=synthetic", "--config.data.synthetic.num_classes=4",
         "--config.data.synthetic.per_class=12", "--config.data.synthetic.size=32",
         "--config.data.image_size=32", "--config.model.pretrained=",
         "--config.model.backbone=resnet18", "--config.model.width=0.125",
         "--config.model.dtype=float32",
         "--config.saliency.network=stage1", "--config.saliency.epochs=1",
         "--config.stage1.epochs=1", "--config.stage1.batch_size=8",
         "--config.stage2.epochs=1", "--config.stage2.bits=8", "--config.stage2.batch_size=16",
         "--config.eval.batch_size=16", "--config.progress=False")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", help="the CUB folder (CUB_200_2011/ or the folder holding it)")
  p.add_argument("--workdir", required=True, help="the ablation's work directory")
  p.add_argument("--out", required=True, help="folder for protocol.md and protocol.tar.gz")
  p.add_argument("--config", default="configs/cub.py:gpu")
  p.add_argument("--compile-cache", default=os.environ.get(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "fgir_jax", "jax_compile")))
  p.add_argument("--cpu-smoke", action="store_true", help="tiny synthetic run on the CPU")
  p.add_argument("--time-limit", type=float, default=0,
                 help="seconds after which the run is stopped as by Ctrl-C (it stays resumable) "
                 "and the summary written from what finished; 0: none")
  args, extra = p.parse_known_args(argv)
  if extra[:1] == ["--"]:
    extra = extra[1:]
  if not args.cpu_smoke and not args.root:
    p.error("--root is needed (the CUB folder), or --cpu-smoke")
  args.extra = list(extra)
  return args


def launch_command(args) -> list[str]:
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), "--config",
         os.path.join(REPO, args.config), "--workdir", args.workdir, "--mode", "ablate"]
  if args.cpu_smoke:
    cmd += SMOKE
  else:
    cmd.append(f"--config.data.root={os.path.abspath(args.root)}")
  return cmd + args.extra


def run(cmd, env, log_path, time_limit=0.0) -> tuple[int, float, bool]:
  """Runs cmd, its output shown and logged; (exit status, wall seconds, stopped at the limit)."""
  start = time.perf_counter()
  stopped = threading.Event()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1, cwd=REPO)

    def stop():  # as Ctrl-C: launch.py keeps what finished; a kill only if it does not exit
      stopped.set()
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()

    timer = threading.Timer(time_limit, stop) if time_limit > 0 else None
    if timer:
      timer.daemon = True
      timer.start()
    for line in proc.stdout:
      stamped = f"[{time.perf_counter() - start:7.1f}s] {line}"
      sys.stdout.write(stamped)
      log.write(stamped)
    status = proc.wait()
    if timer:
      timer.cancel()
  return status, time.perf_counter() - start, stopped.is_set()


def stage_times(workdir: str) -> dict:
  """{variant: [(stage, seconds)]} in the order the stages finished."""
  times = {}
  for variant in VARIANTS:
    records = []
    for path in glob.glob(os.path.join(workdir, variant, "stages", "*.json")):
      with open(path) as f:
        record = json.load(f)
      records.append((record.get("finished", 0.0), os.path.basename(path)[:-5],
                      record.get("seconds"), record.get("adopted_from")))
    times[variant] = [(name, seconds, reused) for _, name, seconds, reused in sorted(records)]
  return times


def device_line() -> str:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # only to name the device
  try:
    import jax  # pylint: disable=g-import-not-at-top
    kinds = sorted({d.device_kind for d in jax.devices()})
    return f"jax {jax.__version__} on {', '.join(kinds)} ({jax.default_backend()})"
  except Exception as e:  # noqa: BLE001 - the summary says so instead
    return f"(jax unavailable: {e})"


def summary(args, cmd, status, wall, stopped, times) -> str:
  limit = (f" **stopped at the time limit of {args.time_limit:.0f} s** (what finished is below);"
           if stopped else "")
  lines = ["# The paper's protocol with the ablation (bench/cub_protocol.py)", "",
           f"{time.strftime('%Y-%m-%d %H:%M')}; {device_line()}; exit status {status};{limit} "
           f"wall time {wall:.0f} s ({wall / 60:.1f} min), compiles included.", "",
           "```", " ".join(cmd[1:]).replace(REPO + "/", ""), "```", "",
           "| variant | stage | seconds |", "| --- | --- | ---: |"]
  for variant, rows in times.items():
    for name, seconds, reused in rows:
      shown = ("reused from " + os.path.basename(reused) if reused
               else "-" if seconds is None else f"{seconds:.1f}")
      lines.append(f"| {variant} | {name} | {shown} |")
  ablation = os.path.join(args.workdir, "ablation.md")
  if os.path.exists(ablation):
    with open(ablation) as f:
      lines += ["", f.read()]
  else:  # stopped early: the variants that finished, from their results
    lines += ["", "No ablation table (the run did not finish); finished variants:", ""]
    lines += finished_results(args.workdir)
  return "\n".join(lines) + "\n"


def finished_results(workdir: str) -> list[str]:
  """Stage-1 accuracy, mAP per code length and CorLoc of each variant with results.json."""
  lines = []
  for variant in VARIANTS:
    path = os.path.join(workdir, variant, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        r = json.load(f)
      maps = ", ".join(f"{b} bits {100 * v:.2f}%" for b, v in r.get("map", {}).items())
      pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
      lines.append(f"- {variant}: accuracy {pct(r.get('accuracy'))}; mAP {maps}; "
                   f"CorLoc {pct(r.get('corloc'))}")
  return lines or ["- none"]


def pack(args, log_path) -> str:
  """protocol.tar.gz: the tables, each variant's results and report (no checkpoints, no cache)."""
  path = os.path.join(args.out, "protocol.tar.gz")
  keep = ("results.json", "report.md", "metrics.jsonl", "config.json", "command.txt")
  with tarfile.open(path, "w:gz") as tar:
    for name in ("ablation.md", "ablation.json"):
      if os.path.exists(os.path.join(args.workdir, name)):
        tar.add(os.path.join(args.workdir, name), arcname=name)
    for variant in VARIANTS:
      base = os.path.join(args.workdir, variant)
      for name in keep:
        if os.path.exists(os.path.join(base, name)):
          tar.add(os.path.join(base, name), arcname=f"{variant}/{name}")
      for folder in ("plots", "stages"):
        if os.path.isdir(os.path.join(base, folder)):
          tar.add(os.path.join(base, folder), arcname=f"{variant}/{folder}")
    tar.add(log_path, arcname="run.log")
  return path


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=args.compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
  cmd = launch_command(args)
  log_path = os.path.join(args.out, "run.log")
  status, wall, stopped = run(cmd, env, log_path, args.time_limit)
  text = summary(args, cmd, status, wall, stopped, stage_times(args.workdir))
  with open(os.path.join(args.out, "protocol.md"), "w") as f:
    f.write(text)
  pack(args, log_path)
  print(text)
  return status


if __name__ == "__main__":
  sys.exit(main())
