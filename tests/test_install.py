"""The package outside the clone: the plain install's modules, the extras named when missing,
the configs by name, and the installed command."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without its extras (absl comes with optax, a core dependency): the core imports; every other
# module stops with one line naming the extra.
_BLOCKED = """
import importlib, importlib.abc, json, sys
BLOCKED = {"PIL", "orbax", "ml_collections", "matplotlib", "starlette", "uvicorn",
           "python_multipart", "markdown", "tensorflow", "torch", "faiss"}
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
    return None
sys.meta_path.insert(0, Blocker())
out = {}
for module in sys.argv[1:]:
  try:
    importlib.import_module(module)
    out[module] = "ok"
  except ImportError as e:
    out[module] = str(e)
print(json.dumps(out))
"""

CORE = ["fgir_jax", "fgir_jax.losses", "fgir_jax.mining", "fgir_jax.metrics", "fgir_jax.codes",
        "fgir_jax.index", "fgir_jax.topk", "fgir_jax.parallel", "fgir_jax.saliency",
        "fgir_jax.faiss_export", "fgir_jax.models", "fgir_jax.data.augment",
        "fgir_jax.data.batching", "fgir_jax.data"]
NEEDS_PIPELINE = ["fgir_jax.data.cache", "fgir_jax.train.config", "fgir_jax.train.checkpoints",
                  "fgir_jax.train.pipeline", "fgir_jax.train.report_plots",
                  "fgir_jax.commands.search", "fgir_jax.commands.service", "fgir_jax.cli"]


def test_the_plain_install_imports_the_core_and_names_the_extra_of_the_rest():
  out = subprocess.run([sys.executable, "-c", _BLOCKED] + CORE + NEEDS_PIPELINE,
                       capture_output=True, text=True, check=True, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  result = json.loads(out.stdout)
  for module in CORE:
    assert result[module] == "ok", (module, result[module])
  for module in NEEDS_PIPELINE:
    assert result[module].endswith("which the plain install leaves out: pip install "
                                   "'fgir_jax[pipeline]'"), (module, result[module])
    assert "\n" not in result[module]


def test_every_subpackage_is_in_the_wheel():
  # pyproject lists the packages (configs/ ships as fgir_jax.configs): none may be forgotten.
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
  found = {"fgir_jax"} | {f"fgir_jax.{d}" for d in os.listdir(os.path.join(REPO, "fgir_jax"))
                          if os.path.isfile(os.path.join(REPO, "fgir_jax", d, "__init__.py"))}
  assert listed == found | {"fgir_jax.configs"}


def test_configs_by_name_and_by_path_are_the_same_file(tmp_path):
  from fgir_jax import cli  # pylint: disable=g-import-not-at-top
  assert os.path.samefile(cli.config_file("cub"), os.path.join(REPO, "configs", "cub.py"))
  argv = cli.resolve_config_names(["fgir-jax", "--config", "cub:runlocal", "--workdir", "w"])
  assert argv[2] == cli.config_file("cub") + ":runlocal"
  argv = cli.resolve_config_names(["fgir-jax", "--config=configs/cub.py", "--workdir", "w"])
  assert argv[1] == "--config=configs/cub.py"  # a path stays a path
  proc = subprocess.run([sys.executable, "-m", "fgir_jax", "--config", "birds", "--workdir",
                         str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: config birds is neither a packaged config (cub, demo, dogs, folder; e.g. --config "
      "demo) nor an existing config file; pass one of those, or the path of your own.")
