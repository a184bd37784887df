"""Converts a PyTorch checkpoint (.pth) to a plain .npz of its tensors.

    python -m fgir_jax.models.convert_weights resnet18-f37072fd.pth resnet18.npz

The .npz keeps the checkpoint's names and layouts (float32, `num_batches_tracked`
dropped). Neither step needs torch: the .pth is read by the allow-listed
reader of `torch_checkpoint`, and the loaders take either file.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from fgir_jax.models import state_dict_import


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """Reads `src` (.pth/.pt, or .npz), writes `dst` (.npz); returns {name: shape} written."""
  dst = os.fspath(dst)
  if not dst.endswith(".npz"):
    raise ValueError(f"output {dst!r} must end in .npz.")
  state = state_dict_import.load_state_dict(src)
  arrays = {k: np.asarray(v, np.float32) for k, v in state.items()
            if not k.endswith("num_batches_tracked")}
  if "conv1.weight" not in arrays and "_conv_stem.weight" not in arrays:
    raise ValueError(f"{os.fspath(src)!r} has neither conv1.weight nor _conv_stem.weight; it is "
                     "not a torchvision ResNet or an EfficientNet-Lite checkpoint.")
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  # Write beside the target and rename, so a failed run never leaves half a file.
  tmp = dst[:-len(".npz")] + ".partial.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, dst)
  return {k: tuple(v.shape) for k, v in arrays.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m fgir_jax.models.convert_weights",
      description="Convert a ResNet or EfficientNet-Lite checkpoint (.pth) to .npz; no torch needed.")
  parser.add_argument("src", help="torchvision checkpoint, e.g. resnet18-f37072fd.pth")
  parser.add_argument("dst", help="output .npz, e.g. resnet18.npz")
  args = parser.parse_args(argv)
  try:
    shapes = convert(args.src, args.dst)
  except (OSError, ImportError, ValueError, RuntimeError) as e:
    print(f"convert_weights: error: {e}", file=sys.stderr)
    return 2
  count = sum(int(np.prod(s)) for s in shapes.values())
  print(f"wrote {args.dst}: {len(shapes)} tensors, {count:,} values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
