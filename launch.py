"""fgir_jax command line: train, evaluate, compare and search a fine-grained retrieval model.

    python launch.py --config configs/demo.py --workdir runs/demo
    python launch.py --config configs/cub.py --workdir runs/cub --config.data.root=/data/CUB_200_2011
    python launch.py --config configs/cub.py:runlocal --workdir runs/ablation --mode ablate
    python launch.py --config configs/demo.py --workdir runs/demo --mode search --query a.jpg --k 10
    python launch.py --config configs/demo.py --workdir runs/demo --mode index --images new_photos/

--mode train (the default) runs the stages the config names (data, saliency,
stage1, stage2, evaluate, report); a finished stage is skipped and an
interrupted one resumes from its last checkpoint when the same command is run
again. --mode ablate runs the paper's comparisons (fgir_jax/train/ablation.py),
--mode search finds the database images nearest to each --query, --mode index
adds the images of a folder to the work directory's index.
"""

import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

MODES = ("train", "ablate", "search", "index")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs and checkpoints.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the work directory.")
_VARIANTS = flags.DEFINE_string("variants", "full,no_enhance,no_saliency,triplet,ce",
                                "--mode ablate: the variants to run, comma-separated.")
_QUERY = flags.DEFINE_multi_string("query", [], "--mode search: a query image (repeatable).")
_K = flags.DEFINE_integer("k", 10, "--mode search: results per query.")
_BITS = flags.DEFINE_integer("bits", None, "--mode search/index: code length (default: longest).")
_IMAGES = flags.DEFINE_string("images", None, "--mode index: a folder of images to add.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  try:
    start_distributed(_CONFIG.value)
    run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError, ImportError, OSError) as e:
    if _DEBUG.value:
      raise
    # One clear line and a non-zero exit; outputs and checkpoints on disk stay as they are.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted: run the same command again to resume.", file=sys.stderr)
    sys.exit(130)


def run_mode(mode: str, config, workdir: str) -> None:
  # Imports here keep --help fast (JAX and the models load on use).
  # pylint: disable=g-import-not-at-top
  if mode == "train":
    from fgir_jax.train import pipeline
    results = pipeline.run(config, workdir)
    if results.get("map"):
      shown = ", ".join(f"{b} bits {v:.4f}" for b, v in results["map"].items())
      print(f"mAP: {shown}  (results in {workdir}/results.json, report in {workdir}/report.md)")
  elif mode == "ablate":
    from fgir_jax.train import ablation
    ablation.run_ablation(config, workdir, _VARIANTS.value)
    print(f"ablation table: {workdir}/ablation.md")
  elif mode == "search":
    from fgir_jax.train import search
    search.search_command(config, workdir, _QUERY.value, k=_K.value, bits=_BITS.value)
  else:
    from fgir_jax.train import search
    search.index_command(config, workdir, _IMAGES.value, bits=_BITS.value)


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
