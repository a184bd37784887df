"""What every stage shares: the config, the work directory, the loaded arrays, the device mesh."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import jax

from fgir_jax import parallel
from fgir_jax.progress import Progress
from fgir_jax.train import config as config_lib
from fgir_jax.train.workdir import FollowerWorkdir, Workdir


class Run:
  """The config, the work directory and the arrays the stages load and hand on."""

  def __init__(self, config, workdir: str, echo=print, writable: bool = True,
               command: str | None = None):
    self.config = config
    # The command that runs this, for the fixes messages suggest.
    self.command = command or f"python launch.py --config CONFIG_FILE --workdir {workdir}"
    self.stages = config_lib.stage_list(config)
    self.bits = config_lib.bit_list(config)
    self.wd = _workdir(workdir, writable)
    # Process 0 of a multi-process run speaks for all of them.
    self.echo = echo if parallel.is_primary() else (lambda *args, **kwargs: None)
    self.key = jax.random.key(int(config.seed))
    # Train steps, the miner and the evaluation run data-parallel over this mesh.
    self.mesh = parallel.data_mesh(int(config.parallel.devices))
    self.dataset = None      # data_lib.Dataset, rows in source order
    self.images = None       # (n, s, s, 3) uint8, uncropped
    self.crops = None        # (n, s, s, 3) uint8, saliency crops (or the images)
    self.crops_seed = None   # the saliency stage whose boxes made them ("saliency", "saliency_s1")

  @property
  def size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def cache_dir(self) -> str:
    """The decode cache: data.cache_dir, else <workdir>/cache (content-keyed, shared by reruns)."""
    if self.config.data.cache_dir:
      return self.config.data.cache_dir
    return self.wd.file("cache")  # made by the cache on its first write

  def stage_key(self, name: str) -> jax.Array:
    """The stage's own key: distinct names give unrelated keys (stage2_24 vs stage2_42)."""
    return jax.random.fold_in(self.key, name_to_int(name))


def _workdir(path: str, writable: bool) -> Workdir:
  """Process 0 (or the only process) writes the run; the others follow it (FollowerWorkdir)."""
  if not writable or parallel.is_primary():
    return Workdir(path, writable=writable)
  # One name per run and process: the same command after a kill replaces what the killed
  # process left there.
  digest = hashlib.sha256(os.path.abspath(path).encode("utf-8")).hexdigest()[:12]
  scratch = os.path.join(tempfile.gettempdir(),
                         f"fgir_jax_{digest}_process{jax.process_index()}")
  shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(scratch)
  return FollowerWorkdir(path, scratch)


def name_to_int(name: str) -> int:
  """A 32-bit number from the SHA-256 of `name`: unlike a character sum, order matters."""
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


def progress_bar(run: Run, total: int, desc: str, log_line: bool = True) -> Progress:
  return Progress(total, desc, enabled=bool(run.config.progress) and parallel.is_primary(),
                  log_line=log_line and parallel.is_primary())
