#!/usr/bin/env bash
# One prepared run on a GPU machine (JAX with CUDA, PyTorch; no pip, no internet): stage-1
# train steps (ResNet18-I, ResNet18, EfficientNet-Lite0) against PyTorch, mining / mAP /
# search against PyTorch, and configs/cub.py on cub50 with its time per stage. Everything
# lands in $OUT (default ./gpu_out); the whole run is cut to fit 8 minutes.
#
#   bash bench/gpu_prepare.sh           # here, with pip: wheels + cub50 into gpu_carry/
#   bash bench/gpu.sh                   # there (carry gpu_carry), or:
#   bash bench/gpu.sh --cpu-smoke       # here: the same steps, tiny, on the CPU
#
# Each part runs under its own time limit and a failing part does not stop the rest:
# its log says why. Budget (seconds): stage-1 steps 200, bench_gpu 120, cub50 150.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
CARRY="$PWD/gpu_carry"
START=$(date +%s)

# Pure-Python wheels the machine lacks, unpacked onto PYTHONPATH (a wheel is a zip).
SITE="$(mktemp -d)"
for wheel in "$CARRY"/wheels/*.whl; do
  [ -e "$wheel" ] && python -m zipfile -e "$wheel" "$SITE"
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' > "$OUT/environment.txt" 2>&1
import importlib, jax
print("jax", jax.__version__, jax.devices())
for name in ("torch", "flax", "optax", "orbax.checkpoint", "ml_collections", "efficientnet_lite_pytorch",
             "pytorch_metric_learning"):
  try:
    print(name, getattr(importlib.import_module(name), "__version__", "?"))
  except Exception as e:  # reported, not fatal: the part that needs it says so too
    print(name, "MISSING", e)
PY
cat "$OUT/environment.txt"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s in)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - START ))s"
  tail -n 12 "$OUT/$name.log"
}

if [ $SMOKE = 1 ]; then
  export JAX_PLATFORMS=cpu
  MODELS=(--width 0.125 --sizes 32 --batch 4 --steps 1 --warmup 0 --frameworks jax,torch)
  part stage1_resnet18_i 200 python bench/bench_models.py "${MODELS[@]}"
  part stage1_resnet18 200 python bench/bench_models.py "${MODELS[@]}" --no-enhance
  part stage1_efficientnet_lite0 200 python bench/bench_models.py "${MODELS[@]}" \
    --backbone efficientnet_lite0
  part bench_gpu 120 python bench/bench_gpu.py --cpu-smoke --out "$OUT"
  part cub50 300 python launch.py --config configs/demo.py:scratch --workdir "$OUT/cub50_run" \
    --config.saliency.epochs=1 \
    --config.stage1.epochs=1 --config.stage2.epochs=1 --config.stage2.bits=16
else
  MODELS=(--gpu --sizes 299 --batch 64 --steps 20 --warmup 3)
  part stage1_resnet18_i 90 python bench/bench_models.py "${MODELS[@]}"
  part stage1_resnet18 55 python bench/bench_models.py "${MODELS[@]}" --no-enhance
  part stage1_efficientnet_lite0 55 python bench/bench_models.py "${MODELS[@]}" \
    --backbone efficientnet_lite0
  part bench_gpu 120 python bench/bench_gpu.py --out "$OUT"
  # The paper's protocol at 299 px, cut to fit: 4 + 9 epochs instead of 50 + 90, and from
  # scratch (torchvision's ResNet18 file cannot be fetched there); time per stage is the figure.
  part cub50 150 python launch.py --config configs/cub.py --workdir "$OUT/cub50_run" \
    --config.data.root="$CARRY/cub50" --config.model.pretrained= \
    --config.saliency.network=stage1 --config.stage1.epochs=4 --config.stage1.eval_every=4 \
    --config.stage2.epochs=9
fi
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["# bench/gpu.sh figures", ""]
for log in sorted(out.glob("stage1_*.log")):
  rows = [l for l in log.read_text().splitlines() if l.startswith("[")]
  for row in (json.loads(rows[-1]) if rows else []):
    lines.append(f"- {log.stem}: {row['size']} px, batch {row['batch']}, {row['dtype']}: "
                 f"jax {row.get('jax_images_per_s', 0):.0f} img/s, torch "
                 f"{row.get('torch_images_per_s', 0):.0f} img/s, ratio {row.get('ratio', 0):.2f}")
md = out / "bench_gpu.md"
lines += ["", md.read_text() if md.exists() else "(bench_gpu.py wrote no table)"]
stages = sorted((out / "cub50_run" / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime)
if stages:
  lines += ["", "| cub50 stage | seconds |", "| --- | ---: |"]
  lines += [f"| {p.stem} | {json.loads(p.read_text()).get('seconds', '?')} |" for p in stages]
results = out / "cub50_run" / "results.json"
if results.exists():
  lines += ["", "cub50 results: " + results.read_text()[:2000]]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "== done in $(( $(date +%s) - START ))s; figures in $OUT"
