"""fgir_jax command line: train and evaluate a fine-grained retrieval model.

    python launch.py --config configs/demo.py --workdir runs/demo
    python launch.py --config configs/cub.py --workdir runs/cub --config.data.root=/data/CUB_200_2011
    python launch.py --config configs/cub.py:runlocal --workdir runs/cub_local --config.stage2.bits=64

Runs the stages the config names (data, saliency, stage1, stage2, evaluate,
report); a finished stage is skipped and an interrupted one resumes from its
last checkpoint when the same command is run again.
"""

import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs and checkpoints.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from fgir_jax.train import pipeline  # pylint: disable=g-import-not-at-top  (fast --help)
  try:
    start_distributed(_CONFIG.value)
    results = pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
    if _DEBUG.value:
      raise
    # One clear line and a non-zero exit; outputs and checkpoints on disk stay as they are.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted: run the same command again to resume.", file=sys.stderr)
    sys.exit(130)
  if results.get("map"):
    shown = ", ".join(f"{b} bits {v:.4f}" for b, v in results["map"].items())
    print(f"mAP: {shown}  (results in {_WORKDIR.value}/results.json)")


def start_distributed(config) -> None:
  """Several hosts: connect them before any JAX work (config.parallel.distributed)."""
  p = config.parallel
  if p.distributed:
    from fgir_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize(p.coordinator_address, p.num_processes, p.process_id)


def parse_flags(argv):
  """absl's parsing, but a bad --config override is one line and exit 2, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    hint = f" (overrides given: {', '.join(overrides)})" if overrides else ""
    message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    print(f"error: bad command line: {message}{hint}; every --config.KEY must exist in the "
          "config file and take a value of its type.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
