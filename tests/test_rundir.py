"""The run directory: stages rerun only when their inputs change, reruns lose nothing,
read-only commands write nothing, bad input leaves no trace, and the advice in messages works."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fgir_jax.train import pipeline
from fgir_jax.commands import search
from fgir_jax.train.checkpoints import StageCheckpoints

from test_pipeline import REPO, tiny_config
from test_search import _tiny_overrides


@pytest.fixture(scope="module")
def finished(tiny_run):
  """A finished tiny run (8 and 12 bits), copied afresh for each test that changes it."""
  return tiny_run


@pytest.fixture()
def run_copy(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return tiny_config(), workdir


def snapshot(workdir, skip=()):
  """{relative path: (size, mtime)} of every file under workdir."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if not rel.startswith(skip):
        st = os.stat(path)
        out[rel] = (st.st_size, st.st_mtime_ns)
  return out


def _lines(config, workdir, **kw):
  lines = []
  pipeline.run(config, workdir, echo=lines.append, **kw)
  return lines


def test_a_stage2_setting_reruns_stage2_only_and_says_why(run_copy):
  config, workdir = run_copy
  stage1_before = snapshot(os.path.join(workdir, "ckpt", "stage1"))
  config.stage2.beta = 0.25
  lines = _lines(config, workdir)
  assert ("stage2_8: stage2.beta 0.5 -> 0.25; reruns stage2_8, evaluate_8, results, report (the "
          "finished results stay until the new ones are complete)") in lines
  assert not any(line.startswith(("stage1:", "== stage1", "== saliency")) for line in lines)
  assert "== stage2_12" in lines
  assert snapshot(os.path.join(workdir, "ckpt", "stage1")) == stage1_before
  with open(os.path.join(workdir, "stages", "stage2_8.json")) as f:
    assert json.load(f)["inputs"]["stage2.beta"] == 0.25
  assert not os.path.exists(os.path.join(workdir, ".staging", "stage2_8"))


def test_adding_a_code_length_trains_only_that_hash_layer(run_copy):
  config, workdir = run_copy
  hash8 = snapshot(os.path.join(workdir, "stage2"))["hash_8.npz"]
  config.stage2.bits = "8,12,16"
  lines = _lines(config, workdir)
  ran = [line[3:] for line in lines if line.startswith("== ")]
  assert ran == ["stage2_16", "evaluate_16", "results", "report"]
  assert "results: code lengths 8, 12 -> 8, 12, 16; reruns results, report (the finished " \
         "results stay until the new ones are complete)" in lines
  assert snapshot(os.path.join(workdir, "stage2"))["hash_8.npz"] == hash8
  with open(os.path.join(workdir, "results.json")) as f:
    assert set(json.load(f)["map"]) == {"8", "12", "16"}


def test_a_saliency_setting_reruns_everything_after_it(run_copy):
  config, workdir = run_copy
  config.saliency.alpha = 0.3
  lines = _lines(config, workdir)
  assert ("saliency: saliency.alpha 0.5 -> 0.3; reruns saliency, stage1, stage2_8, stage2_12, "
          "evaluate_8, evaluate_12, results, report (the finished results stay until the new ones "
          "are complete)") in lines


def test_rerun_switch_replaces_the_named_stage_and_what_depends_on_it(run_copy):
  config, workdir = run_copy
  config.rerun = "stage2"
  lines = _lines(config, workdir)
  ran = [line[3:] for line in lines if line.startswith("== ")]
  assert ran == ["stage2_8", "stage2_12", "evaluate_8", "evaluate_12", "results", "report"]
  assert any(line.startswith("stage2_8: rerun requested (--config.rerun)") for line in lines)
  config.rerun = "stage9"
  with pytest.raises(ValueError, match="--config.rerun names 'stage9'.*choose from stage2, "
                                       "evaluate, data"):
    pipeline.run(config, workdir, echo=lambda _: None)


def test_a_kill_during_a_rerun_loses_nothing_and_search_still_works(run_copy):
  config, workdir = run_copy
  before = snapshot(workdir, skip=("metrics.jsonl", ".staging", ".lock"))
  config.stage1.learning_rate = 0.01

  def stop_in_stage1(line):
    if line.startswith("stage1: epoch 1/"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pipeline.run(config, workdir, echo=stop_in_stage1)
  # The finished run is untouched, config.json included, and can still be searched.
  assert snapshot(workdir, skip=("metrics.jsonl", ".staging", ".lock")) == before
  searcher = search.Searcher(config, workdir)
  assert len(searcher.index) == 24
  # The same command resumes the rerun and then replaces the results.
  lines = _lines(config, workdir)
  assert "== stage1 (resuming)" in lines and "stage1: resuming after epoch 1" in lines
  with open(os.path.join(workdir, "stages", "stage1.json")) as f:
    assert json.load(f)["inputs"]["stage1.learning_rate"] == 0.01
  assert not os.path.exists(os.path.join(workdir, ".staging"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["stage1"]["learning_rate"] == 0.01


def test_search_writes_nothing_into_the_run_and_uses_its_own_settings(run_copy, tmp_path):
  config, workdir = run_copy
  from test_search import _write_queries  # pylint: disable=g-import-not-at-top
  queries, _, _ = _write_queries(config, str(tmp_path / "q"), [0])
  before = snapshot(workdir)
  other = tiny_config()
  # The command line's settings differ in a key search reads (the network's width): with
  # them the saved network would not load; the run's own settings are used.
  other.model.width = 0.5
  out = search.search_command(other, workdir, queries, k=3, echo=lambda _: None,
                              out_dir=str(tmp_path))
  assert snapshot(workdir) == before
  assert out["grid"] == str(tmp_path / "search_results.png") and os.path.exists(out["grid"])
  with pytest.raises(FileNotFoundError, match="output folder .* does not exist"):
    search.search_command(config, workdir, queries, out_dir=str(tmp_path / "nowhere"))


def test_index_adds_an_image_once_and_writes_only_the_index(run_copy, tmp_path):
  config, workdir = run_copy
  from test_search import _write_queries  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "more"
  _write_queries(config, str(folder), [0, 1])
  # The index, the record of the additions (replayed when the index is rebuilt) and the lock.
  before = snapshot(workdir, skip=("index", "additions", ".lock"))
  lines = []
  first = search.index_command(config, workdir, str(folder), echo=lines.append)
  second = search.index_command(config, workdir, str(folder), echo=lines.append)
  assert first["added"] == 2 and second["added"] == 0 and second["skipped"] == 2
  assert "already in the 12-bit index; nothing added" in lines[-1]
  assert snapshot(workdir, skip=("index", "additions", ".lock")) == before
  with open(os.path.join(workdir, "additions", "index_12.json")) as f:
    assert len(json.load(f)["images"]) == 2


def test_search_of_an_unfinished_run_names_the_command_that_finishes_it(tmp_path):
  config, workdir = tiny_config(), str(tmp_path / "run")
  config.stages = "data,saliency"
  pipeline.run(config, workdir, echo=lambda _: None, command="python launch.py TINY")
  with pytest.raises(ValueError, match=r"stage\(s\) stage1, stage2_8, stage2_12, evaluate_8, "
                                       r"evaluate_12 not finished\); finish training first: "
                                       r"python launch.py TINY"):
    search.Searcher(config, workdir)
  # Following the advice (the same command with every stage) makes the run searchable.
  config.stages = tiny_config().stages
  pipeline.run(config, workdir, echo=lambda _: None)
  assert len(search.Searcher(config, workdir).index) == 24


def test_a_query_folder_is_named_as_a_folder(run_copy, tmp_path):
  config, workdir = run_copy
  with pytest.raises(ValueError, match=r"is a folder, not an image.*--mode index --images FOLDER"):
    search.search_command(config, workdir, [str(tmp_path)])


def test_a_failed_start_leaves_no_trace_and_the_corrected_command_runs(tmp_path, monkeypatch):
  config, workdir = tiny_config(), tmp_path / "run"
  config.data.source = "cub"
  config.data.root = str(tmp_path / "typo")
  with pytest.raises(ValueError, match=r"typo.*leave --config.data.root unset"):
    pipeline.run(config, str(workdir), echo=lambda _: None)
  assert not workdir.exists()
  # Following the tensorflow-datasets advice gets further: now it names what to install.
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  config.data.root = None
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tfds\]'"):
    pipeline.run(config, str(workdir), echo=lambda _: None)
  assert not workdir.exists()
  # And the corrected folder runs in the same directory.
  config.data.source = "folder"
  config.data.root = str(_image_folder(tmp_path / "birds", {"a": 3, "b": 3}))
  config.data.folder_test_fraction = 0.34
  config.stages = "data"
  pipeline.run(config, str(workdir), echo=lambda _: None)
  assert os.path.exists(workdir / "stages" / "data.json")


def test_degenerate_data_is_named(tmp_path):
  config = tiny_config()
  config.data.source = "folder"
  config.stages = "data"
  config.data.folder_test_fraction = 0.34
  config.data.root = str(_image_folder(tmp_path / "one", {"a": 4}))
  with pytest.raises(ValueError, match="the training split has 1 class; .*at least two"):
    pipeline.run(config, str(tmp_path / "w1"), echo=lambda _: None)
  assert not (tmp_path / "w1").exists()
  config.data.root = str(_image_folder(tmp_path / "single", {"a": 3, "b": 3, "c": 2}))
  lines = []
  pipeline.run(config, str(tmp_path / "w2"), echo=lines.append)
  assert "warning: 1 class(es) have a single training image" in lines[0]


def test_a_killed_checkpoint_save_is_removed_with_one_line(tmp_path):
  directory = tmp_path / "ckpt"
  (directory / "3.orbax-checkpoint-tmp-1234").mkdir(parents=True)
  lines = []
  with StageCheckpoints(str(directory), echo=lines.append):
    pass
  assert lines == [f"removed the unfinished checkpoint of epoch 3 in {directory} (the run was "
                   "stopped while saving it)"]
  assert not (directory / "3.orbax-checkpoint-tmp-1234").exists()


def test_ablation_on_a_finished_run_takes_it_over(run_copy):
  from fgir_jax.commands import ablation  # pylint: disable=g-import-not-at-top
  config, workdir = run_copy
  lines = []
  ablation.run_ablation(config, workdir, "full", echo=lines.append)
  assert "stage1: reused from" in "\n".join(lines)
  assert not any(line.startswith(("stage1: epoch", "stage2_8: epoch")) for line in lines)


def test_sigterm_stops_like_ctrl_c_and_the_same_command_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), "--config",
         os.path.join(REPO, "configs", "demo.py") + ":scratch", "--workdir", workdir]
  cmd += _tiny_overrides() + ["--config.stage1.epochs=6"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 240
  for line in proc.stdout:
    if line.startswith("stage1: epoch 2/6") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130
  assert "interrupted: run the same command again to resume" in err
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "stage1: resuming after epoch" in done.stdout
  assert not any(line.startswith("stage1: epoch 1/6") for line in done.stdout.splitlines())
  assert "mAP:" in done.stdout


def _image_folder(root, counts):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for name, count in counts.items():
    os.makedirs(root / name, exist_ok=True)
    for i in range(count):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
          root / name / f"{i}.png")
  return root


def test_the_advice_of_search_errors_works(run_copy, tmp_path):
  """Each fix a search message suggests, followed as written, gets the next command further."""
  import re  # pylint: disable=g-import-not-at-top
  config, workdir = run_copy
  from test_search import _write_queries  # pylint: disable=g-import-not-at-top
  queries, _, _ = _write_queries(config, str(tmp_path / "q"), [0, 1])
  # --bits that was not trained: "pass --bits with one of those".
  with pytest.raises(ValueError, match=r"it has 8, 12-bit codes: pass --bits") as info:
    search.search_command(config, workdir, queries, bits=32, out_dir=str(tmp_path))
  bits = int(re.search(r"it has (\d+)", str(info.value)).group(1))
  assert search.search_command(config, workdir, queries, bits=bits, out_dir=str(tmp_path),
                               echo=lambda _: None)["bits"] == bits
  # A folder as a query: "--mode index --images FOLDER" takes it.
  with pytest.raises(ValueError, match=r"--mode index --images FOLDER"):
    search.search_command(config, workdir, [str(tmp_path / "q")], out_dir=str(tmp_path))
  assert search.index_command(config, workdir, str(tmp_path / "q"), echo=lambda _: None)["added"] == 2
  # A lost index: the command it gives writes it again.
  shutil.rmtree(os.path.join(workdir, "index"))
  with pytest.raises(ValueError, match=r"write it again with: python launch.py TINY "
                                       r"--config.rerun=evaluate$") as info:
    search.Searcher(config, workdir)
  config.rerun = "evaluate"
  pipeline.run(config, workdir, echo=lambda _: None)
  # The database again, and the two images added with --mode index, encoded again.
  assert len(search.Searcher(config, workdir).index) == 24 + 2


def test_a_partial_command_leaves_a_run_search_calls_unfinished_until_completed(run_copy):
  config, workdir = run_copy
  config.saliency.alpha = 0.3
  config.stages = "data,saliency"  # only the first stages of the new settings
  pipeline.run(config, workdir, echo=lambda _: None)
  with pytest.raises(ValueError, match=r"being retrained with new settings \(stage1, stage2_8, "
                                       r"stage2_12, evaluate_8, evaluate_12 not finished\); "
                                       r"finish it first: python launch.py TINY"):
    search.Searcher(config, workdir)
  config.stages = tiny_config().stages  # the command it names: every stage
  pipeline.run(config, workdir, echo=lambda _: None)
  assert len(search.Searcher(config, workdir).index) == 24


# ----------------------------------------------------------------------------
# Nothing finished is lost: per-length outputs, kept lengths, removal on request.
# ----------------------------------------------------------------------------
def test_narrowing_the_code_lengths_keeps_the_others_searchable_until_removed(run_copy, tmp_path):
  config, workdir = run_copy
  index12 = snapshot(os.path.join(workdir, "index"))["index_12.npz"]
  config.stage2.bits = "8"
  lines = _lines(config, workdir, command="python launch.py TINY8")
  assert ("kept from an earlier command: 12-bit codes (search them with --bits; remove them "
          "with --mode remove --bits N)") in lines
  assert [line[3:] for line in lines if line.startswith("== ")] == ["results", "report"]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert set(results["map"]) == {"8"} and results["kept"]["12"]["note"] == "kept from an earlier command"
  assert "| 12 (kept from an earlier command) |" in open(os.path.join(workdir, "report.md")).read()
  for rel in ("stage2/hash_12.npz", "codes/codes_12.npz", "evaluate/12.json", "ckpt/stage2_12",
              "stages/stage2_12.json", "stages/evaluate_12.json"):
    assert os.path.exists(os.path.join(workdir, rel)), rel
  assert snapshot(os.path.join(workdir, "index"))["index_12.npz"] == index12
  # Search and serve still offer the kept length, with the run's settings (8 bits now).
  from test_search import _write_queries  # pylint: disable=g-import-not-at-top
  queries, _, _ = _write_queries(config, str(tmp_path / "q"), [0])
  out = search.search_command(config, workdir, queries, k=3, bits=12, echo=lambda _: None,
                              out_dir=str(tmp_path))
  assert out["bits"] == 12
  assert search.Searcher(config, workdir).trained_bits == [8, 12]
  # Removing it is a command of its own, which names every path before it goes.
  from fgir_jax.commands import remove  # pylint: disable=g-import-not-at-top
  said = []
  removed = remove.remove_command(workdir, 12, echo=said.append)
  assert [f"removing {rel}" for rel in removed] == said[:len(removed)]
  assert not os.path.exists(os.path.join(workdir, "stage2", "hash_12.npz"))
  assert search.Searcher(config, workdir).trained_bits == [8]
  with pytest.raises(ValueError, match="has no 12-bit codes to remove; it has 8"):
    remove.remove_command(workdir, 12, echo=said.append)
  # The next command updates results.json and the report: nothing kept any more.
  lines = _lines(config, workdir)
  assert any(line.startswith("results: kept code lengths 12 -> none") for line in lines)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["kept"] == {}


def test_a_kept_length_of_an_earlier_stage_1_is_not_offered(run_copy):
  # Its hash layer was trained on the features of a stage-1 network that is gone.
  config, workdir = run_copy
  config.stage2.bits = "8"
  config.stage1.learning_rate = 0.02
  lines = _lines(config, workdir)
  assert not any(line.startswith("kept from an earlier command") for line in lines)
  assert search.Searcher(config, workdir).trained_bits == [8]
  assert os.path.exists(os.path.join(workdir, "stage2", "hash_12.npz"))  # on disk all the same


def test_switching_the_saliency_crop_off_keeps_the_saliency_network(run_copy):
  config, workdir = run_copy
  network = snapshot(os.path.join(workdir, "saliency"))["network.msgpack"]
  config.saliency.enabled = False
  _lines(config, workdir)
  assert snapshot(os.path.join(workdir, "saliency"))["network.msgpack"] == network
  assert os.path.isdir(os.path.join(workdir, "ckpt", "saliency_net"))
  with open(os.path.join(workdir, "stages", "saliency.json")) as f:
    assert json.load(f)["enabled"] is False


# ----------------------------------------------------------------------------
# Complete fingerprints: the dataset's files, the weights file, the code.
# ----------------------------------------------------------------------------
def test_an_image_replaced_under_the_same_name_reruns_the_data_and_what_follows_a_copy_does_not(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_config(), str(tmp_path / "run")
  config.data.source = "folder"
  config.data.root = str(_image_folder(tmp_path / "birds", {"a": 4, "b": 4, "c": 4}))
  config.data.folder_test_fraction = 0.25
  config.saliency.enabled = False
  config.stage1.epochs = 1
  config.stage2.update(epochs=1, bits="8")
  _lines(config, workdir)
  # The same files with new times (a dataset copied again): every finished stage is kept.
  later = time.time_ns() + 10**9
  for path in (tmp_path / "birds").rglob("*.png"):
    os.utime(path, ns=(later, later))
  assert _lines(config, workdir)[0].startswith("already done, skipped: data, saliency, stage1")
  image = tmp_path / "birds" / "b" / "1.png"
  Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(image)
  os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later time, whatever the clock
  lines = _lines(config, workdir)
  assert ("data: the dataset's files changed; reruns data, saliency, stage1, stage2_8, "
          "evaluate_8, results, report (the finished results stay until the new ones are "
          "complete)") in lines
  # Unchanged files: nothing to do.
  assert _lines(config, workdir)[0].startswith("already done, skipped: data, saliency, stage1")


def test_a_new_weights_file_at_the_same_path_reruns_what_read_it(tmp_path):
  from fgir_jax import models  # pylint: disable=g-import-not-at-top
  from torch_files import lite_state_dict, write_legacy  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_config(), str(tmp_path / "run")
  config.model.update(backbone="efficientnet_lite0", width=0.125, depth=0.5)
  config.saliency.update(network="pretrained", layer="last_stage")
  config.stages = "data,saliency"
  state = lite_state_dict(models.EfficientNetLite0ITiny(num_classes=4))
  write_legacy(tmp_path / "lite.pth", state)
  config.model.pretrained = str(tmp_path / "lite.pth")
  _lines(config, workdir)
  state["_conv_stem.weight"] = state["_conv_stem.weight"] * 0.5
  write_legacy(tmp_path / "lite.pth", state)
  lines = _lines(config, workdir)
  assert ("saliency: the weights file behind model.pretrained changed; reruns saliency (the "
          "finished results stay until the new ones are complete)") in lines


def test_a_new_code_version_and_markers_of_an_older_release_rerun_and_say_so(run_copy,
                                                                             monkeypatch):
  from fgir_jax.train import stages as stages_lib  # pylint: disable=g-import-not-at-top
  config, workdir = run_copy
  monkeypatch.setitem(stages_lib.CODE_VERSIONS, "evaluate", stages_lib.CODE_VERSIONS["evaluate"] + 1)
  lines = _lines(config, workdir)
  assert any(line.startswith("evaluate_8: its computation changed (code version") for line in lines)
  assert [line[3:] for line in lines if line.startswith("== ")] == [
      "evaluate_8", "evaluate_12", "results", "report"]
  # Markers of the release before: inputs without code versions, data files or weights, and
  # fingerprints of those inputs. Changed, said once, at the root.
  for name in os.listdir(os.path.join(workdir, "stages")):
    path = os.path.join(workdir, "stages", name)
    with open(path) as f:
      marker = json.load(f)
    for key in ("code_version", "data.files", "model.pretrained_sha256"):
      marker["inputs"].pop(key, None)
    marker["fingerprint"] = "0123456789abcdef"
    with open(path, "w") as f:
      json.dump(marker, f)
  config.stages = "data"
  lines = _lines(config, workdir)
  assert lines[0] == ("data: recorded by an older fgir_jax, before the dataset's files, the "
                      "weights file and the code were part of a stage's inputs; reruns data "
                      "(the finished results stay until the new ones are complete)")


# ----------------------------------------------------------------------------
# One writer at a time, and messages whose fixes work as typed.
# ----------------------------------------------------------------------------
def _demo_command(workdir, *extra):
  return ([sys.executable, os.path.join(REPO, "launch.py"), "--config",
           os.path.join(REPO, "configs", "demo.py") + ":scratch", "--workdir", workdir]
          + _tiny_overrides() + list(extra))


def test_a_second_training_command_is_refused_while_the_first_finishes_whole(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  first = subprocess.Popen(_demo_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
  for line in first.stdout:
    if line.startswith("== saliency"):
      break
  second = subprocess.run(_demo_command(workdir), capture_output=True, text=True, env=env,
                          timeout=120)
  assert second.returncode == 2
  holder = "python launch.py " + " ".join(_demo_command(workdir)[2:])  # as command.txt has it
  assert second.stderr.strip() == (f"error: {workdir} is in use by another command (pid "
                                   f"{first.pid}: {holder}); wait for it to finish, or use "
                                   "another --workdir.")
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  assert "mAP:" in out
  with open(os.path.join(workdir, "results.json")) as f:
    assert set(json.load(f)["map"]) == {"8", "12"}


def test_an_undecodable_image_names_a_fix_that_works_as_typed(tmp_path):
  import shlex  # pylint: disable=g-import-not-at-top
  root = _image_folder(tmp_path / "birds", {"a": 3, "b": 3})
  (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  workdir = tmp_path / "run"
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), "--config",
         os.path.join(REPO, "configs", "folder.py") + ":runlocal", "--workdir", str(workdir),
         f"--config.data.root={root}", "--config.stages=data", "--config.model.pretrained=",
         "--config.saliency.network=stage1", "--config.data.folder_test_fraction=0.34"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  assert proc.returncode == 2
  line = proc.stderr.strip()
  assert line.startswith(f"error: cannot decode image {root / 'b' / 'broken.png'}") and "\n" not in line
  assert not (workdir / "cache").exists()  # a failed first decode leaves no empty cache
  suggested = line.split("skip undecodable images: ", 1)[1]
  assert suggested.endswith(" --config.data.skip_bad=True")
  args = shlex.split(suggested)
  assert args[:2] == ["python", "launch.py"]
  done = subprocess.run([sys.executable] + args[1:], capture_output=True, text=True, env=env,
                        timeout=300, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "1 unreadable files skipped" in done.stdout
