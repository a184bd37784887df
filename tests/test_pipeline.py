"""The whole pipeline on tiny synthetic data: results, resume, overrides, errors."""

import json
import os
import subprocess
import sys

import pytest

from fgir_jax.train import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  sys.path.insert(0, REPO)
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config("scratch")  # the tiny ResNet18-I from scratch: fast to compile
  c.data.synthetic.update(num_classes=4, per_class=8, size=32, test_fraction=0.25)
  c.data.image_size = 32
  c.stage1.update(epochs=2, batch_size=8)
  c.stage2.update(epochs=2, mine_every=1, bits="8,12", batch_size=16, eval_every=1)
  c.progress = False
  return c


def _interrupt_on(text):
  def echo(line):
    if text in line:
      raise KeyboardInterrupt
  return echo


def test_tiny_run_resumes_and_writes_results(tmp_path):
  config, workdir = tiny_config(), str(tmp_path / "run")
  # Killed after the first stage-1 epoch: the checkpoint of epoch 1 is on disk.
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(config, workdir, echo=_interrupt_on("stage1: epoch 1/2"))
  lines = []
  results = pipeline.run(config, workdir, echo=lines.append)
  assert "stage1: resuming after epoch 1" in lines
  assert "already done, skipped: data, saliency" in lines
  assert not any(line.startswith("stage1: epoch 1/2") for line in lines)

  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert set(results["map"]) == {"8", "12"}
  _check_scores_against_saved_codes(workdir, results)
  assert 0.0 <= results["accuracy"] <= 1.0 and 0.0 <= results["corloc"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "report.md"))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  s2 = [r for r in rows if r["stage"] == "stage2_8"]
  assert [r["epoch"] for r in s2] == [1, 2] and all("d_ap" in r and "map" in r for r in s2)

  # A finished run is skipped entirely and gives the same results.
  lines = []
  assert pipeline.run(config, workdir, echo=lines.append) == results
  assert lines[0].startswith("already done, skipped: data, saliency, stage1, stage2")


def test_nan_loss_stops_keeps_the_good_epoch_and_the_advice_works(tmp_path, monkeypatch):
  import re  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import stage1_step  # pylint: disable=g-import-not-at-top
  from fgir_jax.train.checkpoints import StageCheckpoints  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_config(), str(tmp_path / "run")
  config.stages = "data,stage1"
  config.saliency.enabled = False
  step, calls = stage1_step.train_step, []
  per_epoch = 24 // config.stage1.batch_size  # 24 training images in the tiny set

  def poisoned(state, batch, **kw):  # the loss turns NaN in the second epoch
    state, m = step(state, batch, **kw)
    calls.append(1)
    return state, (dict(m, loss=m["loss"] * float("nan")) if len(calls) > per_epoch else m)

  monkeypatch.setattr(stage1_step, "train_step", poisoned)
  with pytest.raises(FloatingPointError, match="loss became nan in epoch 2") as info:
    pipeline.run(config, workdir, echo=lambda _: None, command="python launch.py X")
  staged = os.path.join(workdir, ".staging", "stage1", "ckpt", "stage1")
  with StageCheckpoints(staged, read_only=True) as ckpt:
    assert ckpt.latest_step() == 1  # the good epoch is kept, the bad one never saved
  assert not os.path.exists(os.path.join(workdir, "stages", "stage1.json"))
  # Follow the advice: the command with the suggested override runs stage 1 through.
  override = re.search(r"python launch\.py X --config\.stage1\.learning_rate=(\S+)$",
                       str(info.value))
  assert override, str(info.value)
  monkeypatch.setattr(stage1_step, "train_step", step)
  config.stage1.learning_rate = float(override.group(1))
  pipeline.run(config, workdir, echo=lambda _: None)
  assert os.path.exists(os.path.join(workdir, "stages", "stage1.json"))


def _check_scores_against_saved_codes(workdir, results):
  """Each results.json score equals `metrics` on the saved codes and the dataset's labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fgir_jax import metrics  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(workdir, "stage1", "features.npz")) as f:
    labels, is_train = f["labels"], f["is_train"]
  for bits in results["map"]:
    with np.load(os.path.join(workdir, "codes", f"codes_{bits}.npz")) as f:
      args = (f["query"], labels[~is_train], f["database"], labels[is_train])
    assert results["map"][bits] == metrics.mean_average_precision(*args)
    assert results["map_tie_aware"][bits] == metrics.mean_average_precision(*args, ties="average")
    assert results["precision_at_10"][bits] == metrics.precision_at_k(*args, k=10)
    assert results["queries"] == len(args[0]) and results["database"] == len(args[2])


def _launch(*args):
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_missing_dataset_folder_is_one_line_and_exit_2(tmp_path):
  missing = tmp_path / "nowhere"
  proc = _launch("--config", "configs/cub.py:runlocal", "--workdir", str(tmp_path / "w"),
                 f"--config.data.root={missing}")
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and str(missing) in last and "Traceback" not in proc.stderr


def test_unknown_config_key_and_bad_value_are_rejected(tmp_path):
  proc = _launch("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
                 "--config.stage2.nosuchkey=3")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: bad command line") and "--config.stage2.nosuchkey" in last
  assert "\\n" not in last
  # A near-miss names the key it meant; using that key gets past the command line.
  proc = _launch("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
                 "--config.stage2.bitz=8")
  last = proc.stderr.strip().splitlines()[-1]
  assert 'Did you mean "bits" instead of "bitz"?' in last
  proc = _launch("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
                 "--config.stage2.bits=8", "--config.stages=nonsense")
  last = proc.stderr.strip().splitlines()[-1]
  assert "bad command line" not in last and "unknown stage(s) ['nonsense']" in last
  proc = _launch("--config", "configs/nothere.py", "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: config configs/nothere.py is neither a packaged config (cub, demo, dogs, folder; "
      "e.g. --config demo) nor an existing config file; pass one of those, or the path of your "
      "own.")
  proc = _launch("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
                 "--config.stage2.loss=contrastive", "--config.stages=stage2")
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: stage2 loss must be one of (") and "got 'contrastive'" in last
  assert not os.path.exists(tmp_path / "w" / "stages")  # nothing ran
  # A missing --workdir or --config is named as such, with an example.
  proc = _launch("--config", "configs/demo.py")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: --workdir is required: the folder of the run's outputs and checkpoints "
      "(e.g. --workdir runs/demo).")
  proc = _launch("--workdir", str(tmp_path / "w"))
  assert proc.returncode == 2 and "--config is required" in proc.stderr


def test_saliency_from_pretrained_weights_file(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from test_models import random_state_dict  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_config(), str(tmp_path / "run")
  weights = tmp_path / "resnet18.npz"
  np.savez(weights, **random_state_dict(width=config.model.width, num_classes=1000))
  config.model.pretrained = str(weights)
  config.saliency.network = "pretrained"
  config.stages = "data,saliency"
  lines = []
  pipeline.run(config, workdir, echo=lines.append)
  # The boxes come from the given network: no bootstrap classifier was trained.
  assert not any(line.startswith("saliency_net") for line in lines)
  with open(os.path.join(workdir, "saliency", "summary.json")) as f:
    summary = json.load(f)
  assert 0.0 <= summary["corloc"] <= 1.0 and 0.0 < summary["mean_box_area"] <= 1.0
  boxes = np.load(os.path.join(workdir, "saliency", "boxes.npz"))["boxes"]
  assert boxes.shape == (32, 4) and np.all(boxes[:, :2] < boxes[:, 2:])


def test_pretrained_efficientnet_with_frozen_stages_end_to_end(tmp_path):
  """A .pth read without torch, saliency from its last stage, the frozen stages left unchanged."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fgir_jax import models  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import finished  # pylint: disable=g-import-not-at-top
  from fgir_jax.train.context import Run  # pylint: disable=g-import-not-at-top
  from torch_files import lite_state_dict, write_legacy  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_config(), str(tmp_path / "run")
  config.model.update(backbone="efficientnet_lite0", width=0.125, depth=0.5, frozen_stages=5)
  config.saliency.update(network="pretrained", layer="last_stage")
  config.stages = "data,saliency,stage1"  # the rest is the same for every backbone
  config.stage1.epochs = 1
  state = lite_state_dict(models.EfficientNetLite0ITiny(num_classes=4))
  write_legacy(tmp_path / "lite.pth", state)
  config.model.pretrained = str(tmp_path / "lite.pth")
  pipeline.run(config, workdir, echo=lambda line: None)
  with open(os.path.join(workdir, "saliency", "summary.json")) as f:
    assert 0.0 <= json.load(f)["corloc"] <= 1.0
  run = Run(config, workdir, echo=lambda line: None, writable=False)
  _, trained = finished.Finished(run).stage1_network(num_classes=4)
  backbone = trained["params"]["backbone"]
  # Frozen: the stem and stages 1-5 (blocks 0-6 at half depth) keep the imported weights.
  np.testing.assert_array_equal(backbone["conv_stem"]["kernel"],
                                state["_conv_stem.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(backbone["blocks_2"]["project_conv"]["kernel"],
                                state["_blocks.2._project_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(trained["batch_stats"]["backbone"]["blocks_2"]["bn1"]["var"],
                                state["_blocks.2._bn1.running_var"])
  # Trained: a later block moved.
  assert not np.array_equal(backbone["blocks_8"]["project_conv"]["kernel"],
                            state["_blocks.8._project_conv.weight"].transpose(2, 3, 1, 0))
  del jax


def test_bad_pretrained_setting_fails_before_anything_is_written(tmp_path):
  config, workdir = tiny_config(), tmp_path / "run"
  config.model.pretrained = str(tmp_path / "typo.pth")
  with pytest.raises(ValueError, match=r"typo\.pth.*neither 'imagenet' nor an existing"):
    pipeline.run(config, str(workdir))
  assert not workdir.exists()
  config.model.pretrained = None
  config.model.frozen_stages = 9
  with pytest.raises(ValueError, match="frozen_stages must be in 0..4"):
    pipeline.run(config, str(workdir))
  assert not workdir.exists()


def test_paper_configs_default_to_imagenet_weights_and_pretrained_saliency():
  sys.path.insert(0, REPO)
  from configs import cub, dogs  # pylint: disable=g-import-not-at-top
  for module in (cub, dogs):
    c = module.get_config()
    assert (c.model.backbone, c.model.pretrained, c.saliency.network) == (
        "resnet18", "imagenet", "pretrained")
    local = module.get_config("runlocal")
    assert (local.model.backbone, local.model.pretrained, local.saliency.network) == (
        "efficientnet_lite0", "imagenet", "pretrained")
  # The paper's protocol on a GPU: everything fine-tuned, 299 px, 50 + 90 epochs, bfloat16.
  gpu = cub.get_config("gpu")
  assert (gpu.model.backbone, gpu.model.pretrained, gpu.model.frozen_stages, gpu.model.dtype,
          gpu.data.image_size, gpu.stage1.epochs, gpu.stage2.epochs) == (
              "efficientnet_lite0", "imagenet", 0, "bfloat16", 299, 50, 90)
  with pytest.raises(ValueError, match="takes :runlocal or :gpu"):
    cub.get_config("gpus")


def test_stage_keys_differ_for_names_with_the_same_letters(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from fgir_jax.train.context import Run  # pylint: disable=g-import-not-at-top
  run = Run(tiny_config(), str(tmp_path / "run"), echo=lambda line: None)
  names = ["stage2_24", "stage2_42", "stage1", "saliency_net", "stage2_16", "stage2_61"]
  keys = {name: tuple(jax.random.key_data(run.stage_key(name)).tolist()) for name in names}
  assert len(set(keys.values())) == len(names)  # the old character sum made 24/42 and 16/61 equal
  assert keys["stage1"] == tuple(jax.random.key_data(run.stage_key("stage1")).tolist())


def test_saliency_maps_from_any_stage_of_the_backbone():
  # saliency.layer "stage<k>" takes the map of an earlier, finer stage (the demo's stage 5).
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fgir_jax.data import batching  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from fgir_jax.train import inference, networks  # pylint: disable=g-import-not-at-top
  config = tiny_config()  # the tiny ResNet18-I: 4 stages, 32 px
  net = networks.make_net(config, 4)
  variables = networks.init_variables(config, net, jax.random.key(0))
  images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
  inputs = batching.DeviceInput(images, np.zeros(3, np.int32))
  sides = {layer: inference.run_network(net, variables, inputs, batch_size=4, with_maps=True,
                                        map_layer=layer)["maps"].shape[1:]
           for layer in ("stage2", "stage3", "last_stage", "output")}
  assert sides == {"stage2": (4, 4), "stage3": (2, 2), "last_stage": (1, 1), "output": (1, 1)}
  config.saliency.layer = "stage5"
  with pytest.raises(ValueError, match=r"one of stage1 \.\. stage4 .*got 'stage5'"):
    pipeline.check_config(config, config_lib.bit_list(config))
