"""Seeds: the stages a seed changes run once per seed, share the rest, and report mean and spread."""

import json
import os
import shutil

import numpy as np
import pytest

from fgir_jax.commands import remove
from fgir_jax.train import pipeline
from fgir_jax.train import stages as stages_lib

from test_pipeline import tiny_config


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run, workdir)
  return tiny_config(), workdir


def _run(config, workdir):
  lines = []
  results = pipeline.run(config, workdir, echo=lines.append)
  return results, [line[3:] for line in lines if line.startswith("== ")]


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def test_more_seeds_train_only_the_new_seeds_and_report_mean_and_spread(run_copy):
  config, workdir = run_copy
  one_seed = _json(workdir, "results.json")
  hash8 = open(os.path.join(workdir, "stage2", "hash_8.npz"), "rb").read()
  config.seeds = 3
  results, ran = _run(config, workdir)
  # Stage 1 is shared and seed 0 is the finished run: only seeds 1 and 2 train.
  assert ran == ["stage2_8_s1", "stage2_8_s2", "stage2_12_s1", "stage2_12_s2", "evaluate_8_s1",
                 "evaluate_8_s2", "evaluate_12_s1", "evaluate_12_s2", "results", "report"]
  assert open(os.path.join(workdir, "stage2", "hash_8.npz"), "rb").read() == hash8
  for bits in ("8", "12"):
    values = [_json(workdir, "evaluate", f"{bits}{sfx}.json")["map"] for sfx in ("", "_s1", "_s2")]
    assert values[0] == one_seed["map"][bits]
    assert results["per_seed"]["map"][bits] == values
    assert results["map"][bits] == pytest.approx(np.mean(values))
    assert results["map_std"][bits] == pytest.approx(np.std(values, ddof=1))
    assert results["map_tie_aware_std"][bits] is not None
  assert results["seeds"] == 3 and results["accuracy"] == one_seed["accuracy"]
  assert "accuracy_std" not in results  # one stage-1 network, no spread to report
  # Each seed draws its own initialisation and triplets.
  with np.load(os.path.join(workdir, "stage2", "hash_8.npz")) as a, \
       np.load(os.path.join(workdir, "stage2", "hash_8_s1.npz")) as b:
    assert not np.allclose(a["kernel"], b["kernel"])
  # The index searches seed 0's codes; the other seeds only score.
  assert not os.path.exists(os.path.join(workdir, "index", "index_8_s1.npz"))
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert f"{100 * results['map']['8']:.2f}% ± {100 * results['map_std']['8']:.2f}" in report
  assert "mean over 3 seeds" in report

  # Back to one seed: the results are seed 0's again, and the other seeds' work stays on disk.
  config.seeds = 1
  results, ran = _run(config, workdir)
  assert ran == ["results", "report"]
  assert results["map"] == one_seed["map"] and "map_std" not in results
  assert os.path.exists(os.path.join(workdir, "stage2", "hash_8_s2.npz"))
  # --mode remove takes every seed of a length.
  removed = remove.remove_command(workdir, 8, echo=lambda _: None)
  assert {"stage2/hash_8_s1.npz", "codes/codes_8_s2.npz", "stages/evaluate_8_s1.json"} <= set(removed)
  assert os.path.exists(os.path.join(workdir, "stage2", "hash_12_s1.npz"))


def test_seeds_from_stage1_train_a_network_per_seed(run_copy):
  config, workdir = run_copy
  config.seeds, config.seeds_from = 2, "stage1"
  config.stage2.bits = "8"
  results, ran = _run(config, workdir)
  assert ran == ["stage1_s1", "stage2_8_s1", "evaluate_8_s1", "results", "report"]
  assert os.path.exists(os.path.join(workdir, "stage1_s1", "features.npz"))
  assert _json(workdir, "stages", "stage2_8_s1.json")["after"] == {
      "stage1_s1": _json(workdir, "stages", "stage1_s1.json")["fingerprint"]}
  accuracies = results["per_seed"]["accuracy"]
  assert len(accuracies) == 2 and results["accuracy_std"] == pytest.approx(
      np.std(accuracies, ddof=1))


def test_seed_stages_are_named_and_read_what_their_seed_needs():
  config = tiny_config()
  config.seeds = 2
  assert stages_lib.parse("stage2_64_s2") == ("stage2", 64, 2)
  assert stages_lib.stage_name("evaluate", 16, 1) == "evaluate_16_s1"
  assert stages_lib.outputs("evaluate_8_s1") == ("evaluate/8_s1.json", "codes/codes_8_s1.npz")
  assert stages_lib.reads(config, "stage2_8_s1")["seed_index"] == 1
  assert "seed_index" not in stages_lib.reads(config, "stage2_8")
  # The number of seeds is not an input of seed 0's stages: adding seeds keeps them.
  more = tiny_config()
  more.seeds = 5
  base = stages_lib.fingerprints(tiny_config())
  assert all(stages_lib.fingerprints(more)[s] == base[s]
             for s in base if s not in ("results", "report"))


@pytest.mark.parametrize("changes,message", [
    (dict(seeds=0), "seeds must be a positive integer"),
    (dict(seeds_from="stage2_8"), "seeds_from must be one of"),
])
def test_bad_seed_settings_are_named(changes, message):
  config = tiny_config()
  config.update(changes)
  with pytest.raises(ValueError, match=message):
    pipeline.check_config(config, [8])


def test_seeding_a_pretrained_saliency_network_is_refused_with_the_fix():
  config = tiny_config()
  config.seeds, config.seeds_from, config.saliency.network = 2, "saliency", "pretrained"
  with pytest.raises(ValueError, match="use --config.seeds_from=stage1"):
    pipeline.check_config(config, [8])
