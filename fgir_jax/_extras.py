"""Imports that need an optional extra of the package, with one line naming it when missing.

The plain install (`pip install fgir_jax`) holds the library core: losses,
mining, metrics, codes, index, models, saliency. The pipeline (data decoding,
training stages, checkpoints, reports, the command line) needs the
`[pipeline]` extra, and `--mode serve` the `[serve]` extra. A module that needs
one imports through `need`, so a missing package stops the import with an
ImportError that says what to install, not "No module named 'PIL'".
"""

from __future__ import annotations

import importlib

# top-level module -> (the package that provides it, the extra that installs it)
PROVIDERS = {
    "PIL": ("Pillow", "pipeline"),
    "orbax": ("orbax-checkpoint", "pipeline"),
    "ml_collections": ("ml-collections", "pipeline"),
    "matplotlib": ("matplotlib", "pipeline"),
    "absl": ("absl-py", "pipeline"),
    "starlette": ("starlette", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "python_multipart": ("python-multipart", "serve"),
    "markdown": ("markdown", "serve"),
}


def need(module: str, user: str):
  """`importlib.import_module(module)`, or, when its package is not installed, ImportError:
  "<user> needs <package>, ...: pip install 'fgir_jax[<extra>]'". Any other import error of
  an installed package is raised as it is."""
  top = module.split(".")[0]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != top:  # the package is there; something inside it is not
      raise
    package, extra = PROVIDERS[top]
    raise ImportError(f"{user} needs {package}, which the plain install leaves out: "
                      f"pip install 'fgir_jax[{extra}]'") from None
