"""Does anything move stage 1 on the CPU? XLA flags, dtype and layout, measured side by side.

    python bench/stage1_cpu_study.py                  # ResNet18-I train step, 112 px, batch 32
    python bench/stage1_cpu_study.py --steps 2 --width 0.125 --sizes 32 --batch 4   # smoke

Part 1 runs `bench/bench_models.py --frameworks jax` in a fresh process per
variant (XLA reads XLA_FLAGS once, at start-up), with PyTorch measured at the
start and at the end of the study as the reference. A flag this jaxlib does
not know stops its process at once: it is reported as "not accepted".

Part 2 times one 3x3 convolution (64 -> 64 channels, 56 x 56, batch 32,
forward + backward) in both layouts XLA can be asked for, NHWC (what Flax
uses) and NCHW (what PyTorch uses), to see whether the layout alone matters,
and the same convolution in PyTorch (NCHW and channels_last, the faster of 1
and 2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, XLA_FLAGS, extra bench_models arguments)
VARIANTS = (
    ("default", "", []),
    ("oneDNN for dots / convolutions", "--xla_cpu_use_onednn=true", []),
    ("oneDNN fusions (dot)", "--xla_cpu_experimental_onednn_fusion_type=dot", []),
    ("XNNPACK", "--xla_cpu_use_xnnpack=true", []),
    ("XNNPACK fusions (dot)", "--xla_cpu_experimental_xnn_fusion_type=dot", []),
    ("XNNPACK graph fusion, greedy",
     "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", []),
    ("fast math", "--xla_cpu_enable_fast_math=true", []),
    ("no multi-threaded Eigen", "--xla_cpu_multi_thread_eigen=false", []),
    ("no multi-output fusion", "--xla_cpu_use_multi_output_fusion=false", []),
    ("preferred vector width 512", "--xla_cpu_prefer_vector_width=512", []),
    ("bfloat16 compute", "", ["--bf16"]),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="112")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--only", default="", help="comma-separated variant numbers (1-based)")
  p.add_argument("--skip-layout", action="store_true")
  return p.parse_args(argv)


def run_bench(args, frameworks, flags="", extra=()):
  """[row dicts] from bench_models.py's JSON line, or an error string."""
  env = dict(os.environ, XLA_FLAGS=flags) if flags else dict(os.environ)
  cmd = [sys.executable, os.path.join(HERE, "bench_models.py"), "--frameworks", frameworks,
         "--sizes", args.sizes, "--batch", str(args.batch), "--steps", str(args.steps),
         "--warmup", "1", "--width", str(args.width), *extra]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return "not accepted" if "Unknown flag" in out.stderr or "flag" in last.lower() else last[:80]
  return json.loads(out.stdout.strip().splitlines()[-1])


def layout_study():
  """Seconds per forward + backward of one 3x3 convolution in NHWC and NCHW."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  rows = []
  for layout, x_shape, w_shape, dims in (
      ("NHWC (Flax)", (32, 56, 56, 64), (3, 3, 64, 64), ("NHWC", "HWIO", "NHWC")),
      ("NCHW (PyTorch's)", (32, 64, 56, 56), (64, 64, 3, 3), ("NCHW", "OIHW", "NCHW"))):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape) * 0.05

    def loss(x, w, dims=dims):
      y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
      return jnp.sum(y * y)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(x, w))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(step(x, w))
      times.append(time.perf_counter() - start)
    rows.append((layout, sorted(times)[2]))
  try:
    import torch
  except ImportError:
    return rows
  for name, memory_format in (("PyTorch NCHW", torch.contiguous_format),
                              ("PyTorch channels_last", torch.channels_last)):
    x = torch.randn(32, 64, 56, 56).to(memory_format=memory_format).requires_grad_()
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(memory_format=memory_format)
    best = float("inf")
    for threads in (1, 2):
      torch.set_num_threads(threads)
      times = []
      for _ in range(6):
        start = time.perf_counter()
        (conv(x) ** 2).sum().backward()
        times.append(time.perf_counter() - start)
      best = min(best, sorted(times[1:])[2])
    rows.append((name, best))
  return rows


def main(argv=None):
  args = parse_args(argv)
  chosen = {int(i) for i in args.only.split(",") if i} or set(range(1, len(VARIANTS) + 1))
  print(f"# stage-1 train step on {os.cpu_count()} CPU cores: ResNet18-I, {args.sizes} px, "
        f"batch {args.batch}, width {args.width}, {args.steps} timed steps per variant")
  torch_before = run_bench(args, "torch")
  print("\n| # | variant | XLA_FLAGS / option | jax img/s | vs default | vs PyTorch |")
  print("| ---: | --- | --- | ---: | ---: | ---: |")
  torch_ips = torch_before[0]["torch_images_per_s"] if isinstance(torch_before, list) else None
  default_ips = None
  for i, (name, flags, extra) in enumerate(VARIANTS, 1):
    if i not in chosen:
      continue
    result = run_bench(args, "jax", flags, extra)
    option = flags or " ".join(extra) or "-"
    if isinstance(result, str):
      print(f"| {i} | {name} | `{option}` | {result} | | |", flush=True)
      continue
    ips = result[0]["jax_images_per_s"]
    default_ips = default_ips or (ips if i == 1 else None)
    vs_default = f"{ips / default_ips:.2f}x" if default_ips else "-"
    vs_torch = f"{ips / torch_ips:.2f}x" if torch_ips else "-"
    print(f"| {i} | {name} | `{option}` | {ips:.1f} | {vs_default} | {vs_torch} |", flush=True)
  torch_after = run_bench(args, "torch")
  for when, result in (("start", torch_before), ("end", torch_after)):
    shown = (f"{result[0]['torch_images_per_s']:.1f} img/s" if isinstance(result, list)
             else result)
    print(f"\nPyTorch at the {when} of the study: {shown}")
  if not args.skip_layout:
    print("\n| one 3x3 convolution, 64 -> 64 ch, 56 px, batch 32, fwd + bwd | ms |")
    print("| --- | ---: |")
    for layout, seconds in layout_study():
      print(f"| {layout} | {1e3 * seconds:.1f} |")


if __name__ == "__main__":
  main()
