"""The work directory's commit and lock: a kill at any step of a commit is completed by the
next writing command, and one command writes at a time (real processes)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fgir_jax.train import stages as stages_lib
from fgir_jax.train import workdir as workdir_lib
from fgir_jax.train.workdir import Workdir

from conftest import write_marker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGE_SETS = {
    "stage1": ("stage1",),
    "one code length": ("stage2_8", "evaluate_8", "results"),
    "everything": ("data", "saliency", "stage1", "stage2_8", "stage2_16", "evaluate_8",
                   "evaluate_16", "results", "report"),
}


def _write_output(path, tag):
  """A file holding `tag`, or (no suffix) a folder with two files holding it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.splitext(path)[1]:
    with open(path, "w") as f:
      f.write(tag)
  else:
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    for name in ("a", os.path.join("sub", "b")):
      with open(os.path.join(path, name), "w") as f:
        f.write(tag)


def _read_output(path):
  if not os.path.lexists(path):
    return None
  if os.path.isdir(path):
    tags = set()
    for name in ("a", os.path.join("sub", "b")):
      with open(os.path.join(path, name)) as f:
        tags.add(f.read())
    return tags.pop() if len(tags) == 1 else f"mixed {sorted(tags)}"
  with open(path) as f:
    return f.read()


def _outputs(stages):
  return [rel for stage in stages for rel in stages_lib.outputs(stage)]


def _old_and_staged(root, stages):
  """A run whose `stages` finished as "old" and whose new versions wait in staging."""
  wd = Workdir(str(root))
  for stage in stages:
    for rel in stages_lib.outputs(stage):
      _write_output(wd.file(rel), "old")
    write_marker(wd, stage, {"fingerprint": f"old-{stage}"})
  fps = {stage: f"new-{stage}" for stage in stages}
  wd.use_staged(fps)
  for stage in stages:
    wd.begin(stage, fps[stage])
    for rel in stages_lib.outputs(stage):
      _write_output(wd.out(rel), "new")
    wd.finish(stage, {}, fps[stage], {})
  return wd, fps


class _Kill:
  """Counts the commit's steps (renames, removals, file writes); raises at step `at`."""

  def __init__(self, monkeypatch, at=None):
    self.count, self.at = 0, at
    for name in ("_rename", "remove_path", "write_json", "_write_text"):
      monkeypatch.setattr(workdir_lib, name, self._wrap(getattr(workdir_lib, name)))

  def _wrap(self, fn):
    def step(*args, **kw):
      if self.count == self.at:
        raise KeyboardInterrupt  # what SIGTERM and Ctrl-C become in launch.py
      self.count += 1
      return fn(*args, **kw)
    return step


def _state(root, stages):
  """"new" or "old" when every output and marker of `stages` is, else a description."""
  wd = Workdir(str(root), writable=False)
  tags = {_read_output(wd.file(rel)) for rel in _outputs(stages)}
  markers = {(wd.final_marker(s) or {}).get("fingerprint", "none").split("-")[0] for s in stages}
  if len(tags) == 1 and tags == markers:
    return tags.pop()
  return f"outputs {sorted(map(str, tags))}, markers {sorted(markers)}"


def _leftovers(root):
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      if name.endswith(workdir_lib.REPLACED) or name == workdir_lib.JOURNAL:
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return found


def _steps(tmp_path, stages):
  wd, _ = _old_and_staged(tmp_path / "count", stages)
  with pytest.MonkeyPatch.context() as mp:
    kill = _Kill(mp)
    wd.commit_all(stages, {"config": 1}, "CMD")
  return kill.count


@pytest.mark.parametrize("which", list(STAGE_SETS))
def test_a_kill_at_every_step_of_a_commit_is_completed_by_the_next_command(tmp_path, which):
  stages = STAGE_SETS[which]
  steps = _steps(tmp_path, stages)
  assert steps >= 3 * len(stages)  # renames, removals and markers all counted
  for at in range(steps + 1):
    root = tmp_path / f"kill_{at}"
    wd, fps = _old_and_staged(root, stages)
    with pytest.MonkeyPatch.context() as mp:
      _Kill(mp, at)
      if at < steps:
        with pytest.raises(KeyboardInterrupt):
          wd.commit_all(stages, {"config": 1}, "CMD")
      else:
        wd.commit_all(stages, {"config": 1}, "CMD")
    # The next command that writes (any of them) opens the directory: the journal, written
    # before the first rename, says what to finish.
    lines = []
    with Workdir(str(root)).writing("NEXT", echo=lines.append):
      pass
    state = _state(root, stages)
    if at == 0:  # killed before the journal: the old results, whole, the new ones still staged
      assert state == "old", (at, state)
      again = Workdir(str(root))
      again.use_staged(fps)
      again.commit_all(stages, {"config": 1}, "CMD")
      state = _state(root, stages)
    assert state == "new", (at, state)
    assert _leftovers(root) == [], at
    assert not os.path.exists(root / workdir_lib.STAGING), at
    assert Workdir(str(root)).saved_config() == {"config": 1}, at
    assert bool(lines) == (0 < at < steps), (at, lines)


def test_a_kill_while_finishing_an_interrupted_commit_is_finished_again(tmp_path):
  stages = STAGE_SETS["one code length"]
  steps = _steps(tmp_path, stages)
  for at in range(1, steps):
    for again_at in range(steps):
      root = tmp_path / f"kill_{at}_{again_at}"
      wd, _ = _old_and_staged(root, stages)
      with pytest.MonkeyPatch.context() as mp:
        _Kill(mp, at)
        with pytest.raises(KeyboardInterrupt):
          wd.commit_all(stages, {"config": 1}, "CMD")
      with pytest.MonkeyPatch.context() as mp:
        kill = _Kill(mp, again_at)
        try:
          Workdir(str(root)).recover(echo=lambda _: None)
        except KeyboardInterrupt:
          pass
      if kill.count < again_at:
        continue  # the recovery had fewer steps than this position
      Workdir(str(root)).recover(echo=lambda _: None)
      assert _state(root, stages) == "new", (at, again_at)
      assert _leftovers(root) == [], (at, again_at)


def test_an_output_the_new_run_did_not_produce_is_kept(tmp_path):
  # E.g. saliency switched off: the stage finishes without its network; the old one stays.
  wd, fps = _old_and_staged(tmp_path / "run", ("saliency",))
  workdir_lib.remove_path(os.path.join(wd.staging("saliency"), "ckpt", "saliency_net"))
  wd.commit_all(("saliency",))
  assert _read_output(wd.file("saliency")) == "new"
  assert _read_output(wd.file("ckpt", "saliency_net")) == "old"
  assert wd.final_marker("saliency")["fingerprint"] == fps["saliency"]


# ----------------------------------------------------------------------------
# One writer at a time, with real processes.
# ----------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from fgir_jax.train.workdir import Workdir
    with Workdir({path!r}).writing("python launch.py HOLDER", echo=print):
      print("locked", flush=True)
      time.sleep(600)
""")


def _hold_lock(path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=REPO, path=str(path))],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_holder_is_taken_over(tmp_path):
  path = tmp_path / "run"
  holder = _hold_lock(path)
  try:
    with pytest.raises(workdir_lib.Busy, match=rf"{path} is in use by another command \(pid "
                                              rf"{holder.pid}: python launch.py HOLDER\); wait "
                                              "for it to finish, or use another --workdir"):
      with Workdir(str(path)).writing("SECOND"):
        pass
    # Readers take no lock and are not blocked.
    assert Workdir(str(path), writable=False).saved_config() is None
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died without releasing anything by hand: its lock went with it.
  with Workdir(str(path)).writing("THIRD"):
    with open(path / workdir_lib.LOCK) as f:
      info = json.load(f)
    assert info["pid"] == os.getpid() and info["command"] == "THIRD"
  # And a finished writer leaves it free for the next.
  start = time.time()
  with Workdir(str(path)).writing("FOURTH"):
    pass
  assert time.time() - start < 5
