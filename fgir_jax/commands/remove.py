"""`launch.py --mode remove --bits N`: deletes one code length's finished outputs.

Besides `--config.rerun` (which replaces a stage's outputs by new ones), this is
the only command that deletes finished work. It names every path before it
removes it, and holds the run's write lock. Markers go first, so that a kill
midway leaves no marker claiming outputs that are gone; running it again
removes the rest.
"""

from __future__ import annotations

import os

from fgir_jax.train import evaluate
from fgir_jax.train import stages as stages_lib
from fgir_jax.train import workdir as workdir_lib


def remove_command(workdir: str, bits: int | None, echo=print, command: str | None = None) -> list:
  """Removes the hash layer, checkpoints, codes, index, scores, additions record and markers
  of `bits`-bit codes (every seed's); returns the removed paths (relative to the work directory)."""
  if bits is None:
    raise ValueError("--mode remove needs --bits N, the code length whose finished outputs "
                     "to delete.")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"work directory {workdir} does not exist; check --workdir.")
  wd = workdir_lib.Workdir(workdir)
  with wd.writing(command or f"--mode remove --bits {bits}", echo):
    stages = [f"stage2_{bits}", f"evaluate_{bits}"] + _other_seeds(wd, bits)
    paths = [os.path.join("stages", f"{s}.json") for s in stages]
    paths += [p for s in stages for p in stages_lib.outputs(s)]
    paths.append(os.path.relpath(evaluate.additions_path(wd, bits), wd.path))
    found = [p for p in paths if os.path.lexists(wd.file(p))]
    if not found:
      have = stages_lib.finished_lengths(wd)
      raise ValueError(f"{wd.path} has no {bits}-bit codes to remove; it has "
                       f"{', '.join(map(str, have)) or 'none'}.")
    for rel in found:
      echo(f"removing {rel}")
      workdir_lib.remove_path(wd.file(rel))
    echo(f"removed the {bits}-bit codes; results.json and report.md list them until the next "
         "training command, which updates both (and trains them again if the config names "
         f"{bits} bits).")
    return found


def _other_seeds(wd, bits: int) -> list[str]:
  """The stages of the seeds k >= 1 of `bits`-bit codes with a marker (stage2_64_s1, ...)."""
  folder = wd.file("stages")
  names = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
  return [n for n in names if stages_lib.parse(n)[0] in stages_lib.PER_LENGTH
          and stages_lib.bits_of(n) == bits and stages_lib.seed_of(n) > 0]
