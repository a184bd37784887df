"""The work directory of a run: config, stage markers, staged outputs, metrics, results.

Layout:
    config.json          the config of the last training command (what search reads)
    metrics.jsonl        one JSON object per line: {"stage", "epoch", ...}
    stages/<name>.json   written when a stage finishes: its summary, inputs, fingerprint
    .staging/<name>/     a stage's outputs while it runs (and its checkpoints, to resume)
    saliency/, ckpt/, stage1/, stage2/, codes/, index/, results.json, report.md, plots/
                         each stage's finished outputs (stages.OUTPUTS)

A stage writes only under its staging directory (`out`); `commit` then moves
each output into place and writes the marker. So a stage that is rerun leaves
the previous results readable until the new ones are complete, and a kill at
any moment loses nothing: the next run resumes the staged work when its inputs
are the same, and otherwise starts the stage afresh beside the old results.

`Workdir(path, writable=False)` opens a finished run without writing anything
into it (search, serve), so a read-only or shared run can be used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

STAGING = ".staging"


def write_json(path: str, obj: Any) -> None:
  """Writes atomically: a crash never leaves half a file behind."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)


def _json_default(obj):
  if hasattr(obj, "tolist"):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _link_or_copy(src: str, dst: str) -> None:
  """Hard links where the file system allows (reused outputs cost no space), else a copy."""
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _outputs_of(stage: str):
  from fgir_jax.train import stages  # pylint: disable=import-outside-toplevel  (a cycle)
  return stages.outputs(stage)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


class Workdir:
  """Paths and bookkeeping of one run's directory."""

  def __init__(self, path: str, writable: bool = True):
    self.path = os.path.abspath(path)
    self.writable = writable
    self.active = None  # the stage whose outputs `out` points into
    self.active_fingerprint = None
    self.current = {}   # {stage: fingerprint} of this command (see use_staged)
    if writable:
      os.makedirs(self.path, exist_ok=True)

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def dir(self, *parts: str) -> str:
    path = self.file(*parts)
    os.makedirs(path, exist_ok=True)
    return path

  # ---- the config -----------------------------------------------------------
  def saved_config(self) -> dict | None:
    path = self.file("config.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save_config(self, config_dict: dict) -> None:
    write_json(self.file("config.json"), config_dict)

  # ---- staged outputs ---------------------------------------------------------
  # A command's stages write under .staging/<stage>/ and read each other's
  # outputs there (`read`); only when all of them are complete does
  # `commit_all` move them into place, in order, so the finished results always
  # come from one run: a search during a rerun sees the previous run whole.
  def staging(self, stage: str) -> str:
    return self.file(STAGING, stage)

  def staging_matches(self, stage: str, fingerprint: str) -> bool:
    """Whether work of `stage` with these inputs is staged (finished or to resume)."""
    try:
      with open(os.path.join(self.staging(stage), "fingerprint")) as f:
        return f.read().strip() == fingerprint
    except OSError:
      return False

  def staged_marker(self, stage: str, fingerprint: str) -> dict | None:
    """The marker of `stage` finished in staging with these inputs, or None."""
    if not self.staging_matches(stage, fingerprint):
      return None
    path = os.path.join(self.staging(stage), "marker.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def use_staged(self, fingerprints: dict) -> None:
    """Reads (`read`, `done`) see the stages finished in staging with these inputs."""
    self.current = dict(fingerprints)

  def _staged_stage(self, stage: str) -> bool:
    fp = self.current.get(stage)
    return fp is not None and self.staged_marker(stage, fp) is not None

  def begin(self, stage: str, fingerprint: str) -> bool:
    """Points `out` at the stage's staging directory; True when it resumes earlier work.

    Unfinished work of other inputs is discarded (it never finished, and its
    inputs are no longer asked for); finished results are left alone.
    """
    resumed = self.staging_matches(stage, fingerprint)
    if not resumed:
      _remove(self.staging(stage))
      os.makedirs(self.staging(stage))
      with open(os.path.join(self.staging(stage), "fingerprint"), "w") as f:
        f.write(fingerprint + "\n")
    self.active, self.active_fingerprint = stage, fingerprint
    return resumed

  def out(self, *parts: str) -> str:
    """Where the running stage writes `parts` (its staging directory), parent made.

    With no stage running (a library call outside the pipeline) it is the
    final path.
    """
    root = self.path if self.active is None else self.staging(self.active)
    path = os.path.join(root, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def out_dir(self, *parts: str) -> str:
    path = self.out(*parts)
    os.makedirs(path, exist_ok=True)
    return path

  def read(self, *parts: str) -> str:
    """Where to read a stage output: this command's staged version if it has one, else final."""
    rel = os.path.join(*parts)
    if self.writable:
      for stage in self.current:
        if any(rel == o or rel.startswith(o + os.sep) for o in _outputs_of(stage)):
          if self._staged_stage(stage):
            return os.path.join(self.staging(stage), rel)
          break
    return self.file(rel)

  def finish(self, stage: str, summary: dict, fingerprint: str, inputs: dict) -> None:
    """Marks the staged stage complete; it is moved into place by `commit_all`."""
    marker = dict(summary, finished=time.time(), fingerprint=fingerprint, inputs=inputs)
    write_json(os.path.join(self.staging(stage), "marker.json"), marker)
    self.active = self.active_fingerprint = None

  def abandon(self) -> None:
    """Leaves the staged work where it is (to resume) and stops pointing `out` at it."""
    self.active = self.active_fingerprint = None

  def commit_all(self, stages, config_dict: dict | None = None, command: str | None = None) -> list:
    """Moves every stage finished in staging (with the current inputs) into place, in order.

    Each output replaces its previous version (a file or a whole directory) in
    one rename; outputs a stage did not produce this time are removed, so
    nothing stale is left beside the new results. Then the markers, then the
    config and command of the finished results. Returns the stages committed.
    """
    committed = []
    for stage in stages:
      fp = self.current.get(stage)
      marker = None if fp is None else self.staged_marker(stage, fp)
      if marker is None:
        continue
      staged = self.staging(stage)
      for rel in _outputs_of(stage):
        src, dst = os.path.join(staged, rel), self.file(rel)
        old = f"{dst}.old-{os.getpid()}"
        if os.path.lexists(dst):
          os.makedirs(os.path.dirname(old), exist_ok=True)
          os.replace(dst, old)
        if os.path.lexists(src):
          os.makedirs(os.path.dirname(dst), exist_ok=True)
          os.replace(src, dst)
        _remove(old)
      self.dir("stages")
      write_json(self.file("stages", f"{stage}.json"), marker)
      _remove(staged)
      committed.append(stage)
    try:
      os.rmdir(self.file(STAGING))  # only when nothing else waits there
    except OSError:
      pass
    if config_dict is not None:
      self.save_config(config_dict)
    if command:
      with open(self.file("command.txt"), "w") as f:
        f.write(command + "\n")
    return committed

  # ---- stages -----------------------------------------------------------------
  def done(self, stage: str) -> dict | None:
    """The stage's marker: this command's staged one if finished there, else the final one."""
    fp = self.current.get(stage)
    if self.writable and fp is not None:
      staged = self.staged_marker(stage, fp)
      if staged is not None:
        return staged
    path = self.file("stages", f"{stage}.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def final_marker(self, stage: str) -> dict | None:
    path = self.file("stages", f"{stage}.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def mark_done(self, stage: str, summary: dict, fingerprint: str | None = None,
                inputs: dict | None = None) -> None:
    """Writes a final marker directly (stages that stage nothing, and tests)."""
    self.dir("stages")
    marker = dict(summary, finished=time.time())
    if fingerprint is not None:
      marker.update(fingerprint=fingerprint, inputs=inputs or {})
    write_json(self.file("stages", f"{stage}.json"), marker)

  def adopt(self, source: "Workdir", stage: str, log_stages) -> None:
    """Stages `source`'s finished `stage` (outputs, log rows, marker) as this command's own."""
    marker = dict(source.final_marker(stage), adopted_from=source.path)
    fp = marker["fingerprint"]
    self.begin(stage, fp)
    for rel in _outputs_of(stage):
      src, dst = source.file(rel), os.path.join(self.staging(stage), rel)
      if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy)
      elif os.path.exists(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _link_or_copy(src, dst)
    rows = [dict(r, owner=stage, fp=fp) for r in source.read_log() if r["stage"] in log_stages]
    with open(self.file("metrics.jsonl"), "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    write_json(os.path.join(self.staging(stage), "marker.json"), marker)
    self.active = self.active_fingerprint = None

  # ---- metrics ----------------------------------------------------------------
  def log(self, stage: str, **values) -> None:
    """Appends one JSON line; numbers are made plain floats so any reader can parse them.

    A row written while a stage runs carries that stage's name and fingerprint
    ("owner", "fp"), so that the rows of a replaced run are told apart.
    """
    row = {"stage": stage, "time": round(time.time(), 3)}
    if self.active is not None:
      row.update(owner=self.active, fp=self.active_fingerprint)
    row.update({k: _plain(v) for k, v in values.items()})
    with open(self.file("metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")

  def read_log(self, stage: str | None = None, current: bool = True) -> list[dict]:
    """The log rows (of `stage`); current=True keeps only those of the finished results."""
    path = self.file("metrics.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if stage is None or r["stage"] == stage]
    if not current:
      return rows
    markers = {}

    def is_current(row):
      if "fp" not in row:
        return True  # written before rows were tagged
      owner = row["owner"]
      if owner not in markers:
        markers[owner] = (self.done(owner) or {}).get("fingerprint")
      return markers[owner] in (None, row["fp"])

    return [r for r in rows if is_current(r)]


def _plain(value):
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return value
