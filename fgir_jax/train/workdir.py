"""The work directory of a run: config, stage markers, staged outputs, metrics, results.

Layout:
    config.json          the config of the last training command (what search reads)
    metrics.jsonl        one JSON object per line: {"stage", "epoch", ...}
    stages/<name>.json   written when a stage finishes: its summary, inputs, fingerprint
    .staging/<name>/     a stage's outputs while it runs (and its checkpoints, to resume)
    .staging/commit.json the moves of a commit under way (see `commit_all`)
    .lock                the write lock, naming the command that holds it
    additions/           images added with --mode index, replayed by evaluation
    saliency/, ckpt/, stage1/, stage2/, evaluate/, codes/, index/, results.json,
    report.md, plots/    each stage's finished outputs (stages.OUTPUTS)

A stage writes only under its staging directory (`out`); `commit_all` then
moves each output into place and writes the marker. So a stage that is rerun
leaves the previous results readable until the new ones are complete, and a
kill at any moment loses nothing: the next run resumes the staged work when
its inputs are the same, and otherwise starts the stage afresh beside the old
results. The commit writes down its moves before the first rename; the next
command that opens the directory for writing finishes them (`recover`), and
no move ever removes a finished output whose replacement is not there.
One command writes at a time (`writing`); readers take no lock.

`Workdir(path, writable=False)` opens a finished run without writing anything
into it (search, serve), so a read-only or shared run can be used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; one writer at a time is then up to the user
  fcntl = None

STAGING = ".staging"
JOURNAL = "commit.json"
LOCK = ".lock"
# What a replaced output is renamed to while its replacement moves in.
REPLACED = ".replaced"


class Busy(ValueError):
  """Another command is writing to the work directory."""


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


def remove_path(path: str) -> None:
  """Removes a file, link or whole folder; nothing when it is not there."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _rename(src: str, dst: str) -> None:
  os.replace(src, dst)


def _move_into_place(src: str, dst: str) -> None:
  """Replaces dst by the staged src; safe to repeat after a kill at any point.

  src present: dst (if any) goes aside to dst.replaced, src takes its place.
  src gone: the move is done; only the set-aside copy is left to remove.
  A dst whose src is gone is never touched.
  """
  aside = dst + REPLACED
  if os.path.lexists(src):
    if os.path.lexists(dst):
      remove_path(aside)  # a set-aside copy of an earlier, finished move
      _rename(dst, aside)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    _rename(src, dst)
  remove_path(aside)


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
      remove_path(self.staging(stage))
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

  def checkpoint_dir(self, *parts: str) -> str:
    """Where the running stage keeps its checkpoints: in its staging folder, shared by
    every process of a multi-process run."""
    return self.out_dir(*parts)

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

  def finish(self, stage: str, summary: dict, fingerprint: str, inputs: dict,
             after: dict | None = None) -> None:
    """Marks the staged stage complete; it is moved into place by `commit_all`.

    after: {upstream stage: fingerprint} it was computed from (a finished
    chain is checked against it later).
    """
    marker = dict(summary, finished=time.time(), fingerprint=fingerprint, inputs=inputs,
                  after=after or {})
    write_json(os.path.join(self.staging(stage), "marker.json"), marker)
    self.active = self.active_fingerprint = None

  def abandon(self) -> None:
    """Leaves the staged work where it is (to resume) and stops pointing `out` at it."""
    self.active = self.active_fingerprint = None

  def commit_all(self, stages, config_dict: dict | None = None, command: str | None = None,
                 echo=None) -> list:
    """Moves every stage finished in staging (with the current inputs) into place, in order.

    Each output the stage produced replaces its previous version (a file or a
    whole directory); an output it did not produce this time is left as it
    is. Then its marker, then the config and command of the finished
    results. The moves are written down first (.staging/commit.json), so a
    kill anywhere in between is completed by the next writing command
    (`recover`). Returns the stages committed.
    """
    planned = []
    for stage in stages:
      fp = self.current.get(stage)
      if fp is None or self.staged_marker(stage, fp) is None:
        continue
      staged = self.staging(stage)
      produced = [rel for rel in _outputs_of(stage) if os.path.lexists(os.path.join(staged, rel))]
      replaced = [rel for rel in produced if os.path.lexists(self.file(rel))]
      if replaced and echo is not None:
        echo(f"{stage}: replacing {', '.join(replaced)}")
      planned.append({"stage": stage, "fingerprint": fp, "outputs": produced})
    journal = {"stages": planned, "config": config_dict, "command": command}
    os.makedirs(self.file(STAGING), exist_ok=True)
    write_json(self.file(STAGING, JOURNAL), journal)  # from here on, `recover` completes it
    self._apply(journal)
    return [entry["stage"] for entry in planned]

  def recover(self, echo=print) -> list:
    """Finishes the commit an interrupted command began (.staging/commit.json), if any.

    Every writing command calls this first, holding the lock. Returns the
    stages it completed.
    """
    path = self.file(STAGING, JOURNAL)
    if not os.path.exists(path):
      return []
    try:
      with open(path) as f:
        journal = json.load(f)
    except ValueError:  # written atomically, so this is not a half-written journal
      raise ValueError(f"{path} is not a commit journal fgir_jax wrote; move it away and run "
                       "again.") from None
    names = [entry["stage"] for entry in journal["stages"]]
    echo(f"finishing the commit of an interrupted command: {', '.join(names) or 'its config'}")
    self._apply(journal)
    return names

  def _apply(self, journal: dict) -> None:
    """Carries out a commit's planned moves; each step is safe to repeat."""
    for entry in journal["stages"]:
      staged = self.staging(entry["stage"])
      if not os.path.isdir(staged):
        continue  # committed before the kill
      for rel in entry["outputs"]:
        _move_into_place(os.path.join(staged, rel), self.file(rel))
      marker = os.path.join(staged, "marker.json")
      if os.path.exists(marker):  # gone only if the staging folder was being removed
        with open(marker) as f:
          self.dir("stages")
          write_json(self.file("stages", f"{entry['stage']}.json"), json.load(f))
      remove_path(staged)
    if journal.get("config") is not None:
      self.save_config(journal["config"])
    if journal.get("command"):
      _write_text(self.file("command.txt"), journal["command"] + "\n")
    remove_path(self.file(STAGING, JOURNAL))
    try:
      os.rmdir(self.file(STAGING))  # only when nothing else waits there
    except OSError:
      pass

  @contextlib.contextmanager
  def writing(self, command: str, echo=print):
    """Holds the directory's write lock for a writing command, after finishing any
    interrupted commit. A second writer gets `Busy`, naming the holder; the lock of
    a process that died is released with it, so it is taken over."""
    path = self.file(LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      if fcntl is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
          holder = _lock_holder(path)
          raise Busy(f"{self.path} is in use by another command ({holder}); wait for it to "
                     "finish, or use another --workdir.") from None
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps({"pid": os.getpid(), "command": command,
                               "since": round(time.time())}).encode("utf-8"))
      self.recover(echo)
      yield self
    finally:
      os.close(fd)  # releases the lock

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
        return True  # written outside any stage: no stage's results replace it
      owner = row["owner"]
      if owner not in markers:
        markers[owner] = (self.done(owner) or {}).get("fingerprint")
      return markers[owner] in (None, row["fp"])

    return [r for r in rows if is_current(r)]


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _lock_holder(path: str) -> str:
  """"pid N: COMMAND" of the process holding the lock, from the lock file."""
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
    return f"pid {info.get('pid', '?')}: {info.get('command') or 'unknown command'}"
  except (OSError, ValueError):
    return "unknown process"


def _plain(value):
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return value


class FollowerWorkdir(Workdir):
  """The work directory as the processes after the first of a multi-process run see it.

  Every process computes every stage (their collectives pair up), but only
  process 0 (a plain `Workdir`) writes the run's files. A follower reads the
  shared directory (finished results, and the stages staged by an earlier
  command, which it resumes together with process 0) and writes its own copies
  of this command's outputs into `scratch`, a private folder it reads them back
  from and that nobody keeps. Checkpoints are the exception: Orbax saves one
  multi-host checkpoint into process 0's staging folder (`checkpoint_dir`).
  """

  def __init__(self, path: str, scratch: str):
    super().__init__(path, writable=True)
    self.scratch = scratch

  def _own(self, stage: str) -> str:
    return os.path.join(self.scratch, stage)

  def begin(self, stage: str, fingerprint: str) -> bool:
    os.makedirs(self._own(stage), exist_ok=True)
    self.active, self.active_fingerprint = stage, fingerprint
    return self.staging_matches(stage, fingerprint)

  def out(self, *parts: str) -> str:
    root = self.scratch if self.active is None else self._own(self.active)
    path = os.path.join(root, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def checkpoint_dir(self, *parts: str) -> str:
    return os.path.join(self.staging(self.active), *parts)

  def read(self, *parts: str) -> str:
    rel = os.path.join(*parts)
    for stage in self.current:
      if any(rel == o or rel.startswith(o + os.sep) for o in _outputs_of(stage)):
        if os.path.exists(os.path.join(self._own(stage), "marker.json")):
          return os.path.join(self._own(stage), rel)
        break
    return super().read(*parts)

  def finish(self, stage: str, summary: dict, fingerprint: str, inputs: dict,
             after: dict | None = None) -> None:
    write_json(os.path.join(self._own(stage), "marker.json"), dict(summary, fingerprint=fingerprint))
    self.active = self.active_fingerprint = None

  def commit_all(self, stages, config_dict=None, command=None, echo=None) -> list:
    return []

  def recover(self, echo=print) -> list:
    return []

  @contextlib.contextmanager
  def writing(self, command: str, echo=print):
    yield self  # process 0 holds the lock for the whole run

  def adopt(self, source: "Workdir", stage: str, log_stages) -> None:
    pass  # process 0 stages it; this process reads it there

  def log(self, stage: str, **values) -> None:
    pass

  def save_config(self, config_dict: dict) -> None:
    pass
