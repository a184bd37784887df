"""fgir_jax command line: train, evaluate, compare and search a fine-grained retrieval model.

`fgir-jax` after `pip install "fgir_jax[pipeline]"`, `python -m fgir_jax`, or
`python launch.py` in a clone: the same flags and modes. `--config` takes a
packaged config by name (`demo`, `cub:runlocal`, `folder`, `dogs`; they ship in
the package as `fgir_jax.configs`, one copy of the clone's configs/ folder) or
the path of a config file (`configs/cub.py:runlocal`, or your own).

    python launch.py --config demo --workdir runs/demo
    python launch.py --config cub --workdir runs/cub --config.data.root=/data/CUB_200_2011
    python launch.py --config cub:runlocal --workdir runs/ablation --mode ablate
    python launch.py --config demo --workdir runs/demo --mode search --query a.jpg --k 10
    python launch.py --config demo --workdir runs/demo --mode index --images new_photos/
    python launch.py --config demo --workdir runs/demo --mode serve --port 8000
    python launch.py --config demo --workdir runs/demo --mode remove --bits 64

--mode train (the default) runs the stages the config names (data, saliency,
stage1, stage2, evaluate, report); a finished stage is skipped and an
interrupted one resumes from its last checkpoint when the same command is run
again. --mode ablate runs the paper's comparisons (fgir_jax/commands/ablation.py),
--mode search finds the database images nearest to each --query (and draws
them into --out, default the current directory: it writes nothing into the run),
--mode index adds the images of a folder to the run's index, --mode serve serves
a search page and a JSON API over the run (read-only; pip install "fgir_jax[serve]",
fgir_jax/commands/serve.py), --mode remove deletes one code length's finished
outputs (the only command that deletes finished work, besides --config.rerun
replacing a stage). A SIGTERM stops a run as Ctrl-C does: the same command
resumes it. One command writes to a work directory at a time; a second one is
refused, naming the first.
"""

import os
import shlex
import signal
import sys

from fgir_jax import _extras

app = _extras.need("absl.app", "the fgir-jax command")
logging = _extras.need("absl.logging", "the fgir-jax command")
flags = _extras.need("absl.flags", "the fgir-jax command")
config_flags = _extras.need("ml_collections.config_flags", "the fgir-jax command")

MODES = ("train", "ablate", "search", "index", "serve", "remove")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a packaged name (demo, cub:runlocal, folder, dogs) or a "
    "config file's path.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs and checkpoints.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the work directory.")
_VARIANTS = flags.DEFINE_string("variants", "full,no_enhance,no_saliency,triplet,ce,class_aware",
                                "--mode ablate: the variants to run, comma-separated.")
_QUERY = flags.DEFINE_multi_string("query", [], "--mode search: a query image (repeatable).")
_K = flags.DEFINE_integer("k", 10, "--mode search: results per query.")
_BITS = flags.DEFINE_integer("bits", None, "--mode search/index: code length (default: longest); "
                             "--mode remove: the code length to delete.")
_IMAGES = flags.DEFINE_string("images", None, "--mode index: a folder of images to add.")
_OUT = flags.DEFINE_string("out", ".", "--mode search: the folder for search_results.png "
                           "(nothing is written into the work directory).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "--mode serve: the address to listen on "
                            "(the default answers this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "--mode serve: the port to listen on.")
_MAX_UPLOAD = flags.DEFINE_float("max_upload_mb", 20.0, "--mode serve: the largest image upload "
                                 "accepted, in megabytes.")
_MAX_MEGAPIXELS = flags.DEFINE_float("max_megapixels", 40.0, "--mode serve: the largest image "
                                     "accepted, in millions of pixels (checked before decoding).")
_ALLOWED_HOSTS = flags.DEFINE_list("allowed_hosts", [], "--mode serve: Host names the server "
                                   "answers besides localhost, 127.0.0.1 and ::1 (comma-separated).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  signal.signal(signal.SIGTERM, _stop)  # a scheduler's kill: stop as on Ctrl-C, resumable
  try:
    start_distributed(_CONFIG.value, _MODE.value)
    run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError, ImportError, OSError) as e:
    if _DEBUG.value:
      raise
    # One clear line and a non-zero exit; outputs and checkpoints on disk stay as they are.
    print(f"error: {_multiprocess_reason(e)}", file=sys.stderr)
    _exit(2)
  except KeyboardInterrupt:
    print("interrupted: run the same command again to resume; finished results are kept.",
          file=sys.stderr)
    _exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if _processes() == 1 or _DEBUG.value:
      raise
    # Several processes: a lost peer surfaces as a runtime error of the collectives. One
    # line and a prompt exit, without jax.distributed's shutdown (it would wait on the peer).
    print(f"error: {_multiprocess_reason(e)}", file=sys.stderr)
    _exit(2)


def _multiprocess_reason(error: Exception) -> str:
  """The error's message; a lost peer process said as such, with the way to resume."""
  text = str(error)
  if _processes() > 1 and any(s in text for s in ("Gloo", "gloo", "heartbeat", "barrier",
                                                  "Barrier", "coordination")):
    first = text.splitlines()[0]
    cause = first[first.find("Gloo"):] if "Gloo" in first else first
    return (f"another process of this run stopped ({cause[:160]}); run the same command on "
            "every process again to resume from the last checkpoint.")
  return text


_JOINED = []  # [True] once jax.distributed joined this process to others


def _processes() -> int:
  if not _JOINED:
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def _exit(code: int) -> None:
  """sys.exit, except in a multi-process run: there the exit skips jax.distributed's
  shutdown, which would wait for (or abort on) the processes that already stopped."""
  if _processes() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _stop(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def program(argv0: str) -> str:
  """How the user started this command, for the commands that hints suggest."""
  name = os.path.basename(argv0)
  if name == "launch.py":
    return "python launch.py"
  if name == "__main__.py":
    return "python -m fgir_jax"
  return "fgir-jax"


def train_command(argv) -> str:
  """The training command of this run (--config, its overrides and --workdir), for hints."""
  keep, args = [], list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(("--config", "--workdir")):
      keep.append(arg)
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
        keep.append(args[i + 1])
        i += 1
    i += 1
  return program(argv[0]) + " " + " ".join(shlex.quote(a) for a in keep)


def run_mode(mode: str, config, workdir: str) -> None:
  # Imports here keep --help fast (JAX and the models load on use).
  # pylint: disable=g-import-not-at-top
  if mode == "train":
    from fgir_jax.train import pipeline
    results = pipeline.run(config, workdir, command=train_command(sys.argv))
    if results.get("map"):
      shown = ", ".join(f"{b} bits {v:.4f}" for b, v in results["map"].items())
      print(f"mAP: {shown}  (results in {workdir}/results.json, report in {workdir}/report.md)")
  elif mode == "ablate":
    from fgir_jax.commands import ablation
    ablation.run_ablation(config, workdir, _VARIANTS.value)
    print(f"ablation table: {workdir}/ablation.md")
  elif mode == "search":
    from fgir_jax.commands import search
    search.search_command(config, workdir, _QUERY.value, k=_K.value, bits=_BITS.value,
                          out_dir=_OUT.value)
  elif mode == "serve":
    from fgir_jax.commands import serve
    serve.serve(config, workdir, host=_HOST.value, port=_PORT.value,
                max_upload_mb=_MAX_UPLOAD.value, max_megapixels=_MAX_MEGAPIXELS.value,
                allowed_hosts=_ALLOWED_HOSTS.value)
  elif mode == "remove":
    from fgir_jax.commands import remove
    remove.remove_command(workdir, _BITS.value, command=" ".join(sys.argv))
  else:
    from fgir_jax.commands import search
    search.index_command(config, workdir, _IMAGES.value, bits=_BITS.value,
                         command=" ".join(sys.argv))


def start_distributed(config, mode: str = "train") -> None:
  """Several hosts: connect them before any JAX work (config.parallel.distributed)."""
  p = config.parallel
  if p.distributed and mode not in ("train", "ablate"):
    raise ValueError(f"--mode {mode} runs in one process; drop "
                     "--config.parallel.distributed=True (it is for training and ablations).")
  if p.distributed:
    from fgir_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize(p.coordinator_address, p.num_processes, p.process_id,
                        heartbeat_seconds=p.heartbeat_seconds)
    _JOINED.append(True)


def parse_flags(argv):
  """absl's parsing, but a bad --config override is one line and exit 2, not a traceback."""
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    print_help()
    sys.exit(0)
  argv = resolve_config_names(argv)
  try:
    return flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    if "--workdir" in str(e) and "other than None" in str(e):
      print("error: --workdir is required: the folder of the run's outputs and checkpoints "
            "(e.g. --workdir runs/demo).", file=sys.stderr)
      sys.exit(2)
    if "--config" in str(e) and "other than None" in str(e):
      print("error: --config is required: a config file (e.g. --config configs/demo.py).",
            file=sys.stderr)
      sys.exit(2)
    _bad_command_line(argv, e)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    _bad_command_line(argv, e)


def _bad_command_line(argv, e):
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  hint = f" (overrides given: {', '.join(overrides)})" if overrides else ""
  print(f"error: bad command line: {_one_line(e)}{hint}; every --config.KEY must exist in the "
        "config file and take a value of its type.", file=sys.stderr)
  sys.exit(2)


def _one_line(e: BaseException) -> str:
  """The error's text on one line: a KeyError's repr quotes and newlines are dropped."""
  while e.args and isinstance(e.args[0], BaseException):  # an error wrapping another
    e = e.args[0]
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  if isinstance(e, KeyError) and lines:
    lines[0] = f"unknown key {lines[0]}"
  return "; ".join(lines) if lines else type(e).__name__


CONFIG_NAMES = ("cub", "demo", "dogs", "folder")


def config_file(name: str) -> str | None:
  """The file of a packaged config (`demo` -> .../fgir_jax/configs/demo.py), or None."""
  if name not in CONFIG_NAMES:
    return None
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.find_spec(f"fgir_jax.configs.{name}")
  except ImportError:  # a clone that is not installed: configs/ beside the package
    spec = None
  if spec is not None and spec.origin:
    return spec.origin
  beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        f"{name}.py")
  return beside if os.path.isfile(beside) else None


def resolve_config_names(argv) -> list[str]:
  """argv with a packaged --config name replaced by its file; a --config that is neither a
  file nor a packaged name is one line and exit 2, before absl's multi-line error."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      at, value = i, arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      at, value = i + 1, argv[i + 1]
    else:
      continue
    path, sep, rest = value.partition(":")
    if os.path.isfile(path):
      continue
    found = config_file(path)
    if found is None:
      print(f"error: config {path} is neither a packaged config ({', '.join(CONFIG_NAMES)}; "
            "e.g. --config demo) nor an existing config file; pass one of those, or the path "
            "of your own.", file=sys.stderr)
      sys.exit(2)
    argv[at] = (f"--config={found}{sep}{rest}" if argv[at].startswith("--config=")
                else f"{found}{sep}{rest}")
  return argv


def print_help() -> None:
  """This module's docstring and its flags, whatever script started it (absl's own --help
  lists only the flags of the __main__ module)."""
  examples = "    " + program(sys.argv[0]) + " "
  print(__doc__.strip().replace("    python launch.py ", examples) + "\n")
  print(flags.FLAGS.module_help(sys.modules[__name__]))
  print("\nEvery config key can be set with --config.KEY=VALUE (e.g. --config.stage2.bits=32,64).")


def run() -> None:
  """The console entry point (`fgir-jax`, `python -m fgir_jax`, launch.py)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
