"""The ablation command: variants share what they can, and the table answers the paper's questions."""

import json
import os

import pytest

from fgir_jax.commands import ablation
from test_pipeline import tiny_config


def test_ablation_runs_variants_and_writes_the_table(tmp_path):
  config, workdir = tiny_config(), str(tmp_path / "abl")
  config.saliency.epochs = 2  # the bootstrap network: short, this test is about the plumbing
  lines = []
  rows = ablation.run_ablation(config, workdir, "triplet", echo=lines.append)
  # "full" is added: the triplet variant takes its stage 1 from it.
  assert list(rows) == ["full", "triplet"]
  assert rows["triplet"]["loss"] == "triplet" and rows["full"]["loss"] == "adaptive"
  # Shared work is adopted, not redone: the same stage-1 accuracy, no stage-1 training logged.
  assert rows["triplet"]["accuracy"] == rows["full"]["accuracy"]
  with open(os.path.join(workdir, "triplet", "stages", "stage1.json")) as f:
    assert json.load(f)["adopted_from"].endswith("full")
  assert not any(line.startswith("stage1: epoch") for line in _after(lines, "variant triplet"))
  table = open(os.path.join(workdir, "ablation.md")).read()
  for name in rows:
    assert f"| {name} |" in table
  assert "adaptive triplet beats the classic triplet loss" in table
  assert "not run (needs variants full and ce)" in table
  assert "ResNet18-I beats ResNet18" in table
  with open(os.path.join(workdir, "ablation.json")) as f:
    saved = json.load(f)
  assert saved["full"]["map"] == rows["full"]["map"]
  # Each variant is a complete run with its own report, whose stage table says what it reused.
  for name in rows:
    assert os.path.exists(os.path.join(workdir, name, "report.md"))
  with open(os.path.join(workdir, "triplet", "report.md")) as f:
    assert f"| stage1 | reused from {os.path.abspath(os.path.join(workdir, 'full'))} |" in f.read()

  # Run again: everything is done, nothing is retrained.
  again = []
  ablation.run_ablation(config, workdir, "triplet", echo=again.append)
  assert not any("epoch" in line for line in again)


def _after(lines, marker):
  start = next(i for i, line in enumerate(lines) if marker in line)
  end = next((i for i in range(start + 1, len(lines)) if "ablation variant" in lines[i]), len(lines))
  return lines[start + 1:end]


def test_each_variant_changes_one_setting():
  config = tiny_config()
  get = lambda name: ablation.variant_config(config, name, "/tmp/cache")
  assert get("no_enhance").model.enhance is False and get("full").model.enhance is True
  assert get("no_saliency").saliency.enabled is False
  assert get("ce").stage2.loss == "ce"
  assert all(get(v).data.cache_dir == "/tmp/cache" for v in ablation.VARIANTS)
  assert ablation.parse_variants("ce,no_enhance") == ["full", "no_enhance", "ce"]
  assert ablation.parse_variants("resnet18") == ["full", "no_enhance"]  # the old name
  assert ablation.parse_variants("no_saliency") == ["full", "no_saliency"]


def test_unknown_variant_is_one_clear_error():
  with pytest.raises(ValueError, match="--variants must list some of full, no_enhance"):
    ablation.parse_variants("full,bogus")
