#!/usr/bin/env bash
# The package outside the clone: the built wheel installed with [pipeline,serve] into a fresh
# virtual environment in a temporary folder, then the README's library example, the command's
# help, and a tiny training run, search and index through the installed `fgir-jax`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel -q --no-deps -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$(ls "$work"/dist/fgir_jax-*.whl)[pipeline,serve]"
cd "$work"  # nothing of the clone on the path from here on
export JAX_PLATFORMS=cpu
"$work/venv/bin/python" "$repo/.ci/readme_example.py" "$repo/README.md"
"$work/venv/bin/fgir-jax" --help > help.txt
grep -q -- "--config demo --workdir runs/demo" help.txt
tiny=(--config demo:scratch --workdir "$work/run" --config.data.synthetic.num_classes=4
      --config.data.synthetic.per_class=8 --config.data.synthetic.size=32
      --config.data.image_size=32 --config.saliency.epochs=1 --config.stage1.epochs=1
      --config.stage2.epochs=1 --config.stage2.bits=8 --config.progress=False)
"$work/venv/bin/fgir-jax" "${tiny[@]}"
"$work/venv/bin/fgir-jax" "${tiny[@]}" --mode search --query "$work/run/examples/query_1.png" \
  --k 3 --out "$work"
test -s "$work/search_results.png"
mkdir -p "$work/more/class_a" && cp "$work/run/examples/query_2.png" "$work/more/class_a/"
"$work/venv/bin/fgir-jax" "${tiny[@]}" --mode index --images "$work/more"
echo "wheel check: installed fgir-jax trained, searched and indexed outside the clone"
