"""The experiment config: every key the pipeline reads, with its default and meaning.

The files in configs/ start from `base_config()` and change what their
experiment needs (big_vision style: one `get_config(arg)` per experiment, a
`runlocal` argument that shrinks it). Keys that may be unset are
`config_dict.placeholder`s so that the command line can set them.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

STAGES = ("data", "saliency", "stage1", "stage2", "evaluate", "report")
SOURCES = ("synthetic", "cub", "dogs", "folder")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ",".join(STAGES)          # comma-separated subset, run in this order
  c.overwrite = False                  # reuse a workdir made by a different config
  c.progress = True                    # progress bars on stderr

  # ---- data -----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"          # one of SOURCES
  c.data.root = config_dict.placeholder(str)  # local folder; cub/dogs without it: tfds
  c.data.tfds_data_dir = config_dict.placeholder(str)
  c.data.tfds_manual_dir = config_dict.placeholder(str)
  c.data.image_size = 299              # square input size (PAPER: 299)
  c.data.cache_dir = config_dict.placeholder(str)  # default: <workdir>/cache
  c.data.skip_bad = False              # skip undecodable files (counted) instead of failing
  c.data.max_classes = 0               # > 0: keep only the first classes (quick runs)
  c.data.folder_test_fraction = 0.2    # folder source: per-class test split
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_classes=20, per_class=100, size=96, test_fraction=0.4, clutter=1.0))

  # ---- model ----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.width = 1.0                  # channel multiplier; 0.125 is the tiny net
  c.model.enhance = True               # Inception-ResNet-C after the last stage
  c.model.enhance_scale = 0.2
  c.model.dtype = "float32"            # compute dtype; "bfloat16" on GPUs
  c.model.pretrained = config_dict.placeholder(str)  # torchvision resnet18 .npz/.pth

  # ---- saliency crop (PAPER step 1) ------------------------------------------
  c.saliency = ml_collections.ConfigDict()
  c.saliency.enabled = True
  c.saliency.alpha = 0.4
  c.saliency.mode = "largest"          # "largest" 4-connected component or "all"
  c.saliency.margin = 0.05
  c.saliency.network = "stage1"        # "pretrained" (model.pretrained) or "stage1"
                                       # (a CE network trained on uncropped images)
  c.saliency.epochs = 0                # epochs of that bootstrap network; 0: stage1.epochs

  # ---- stage 1: cross-entropy -------------------------------------------------
  c.stage1 = ml_collections.ConfigDict(dict(
      epochs=50, batch_size=32, learning_rate=0.01, momentum=0.9, weight_decay=1e-4,
      warmup_epochs=1.0, label_smoothing=0.0, crop="random_resized", crop_scale_min=0.25))

  # ---- stage 2: hash layer + (adaptive) triplet loss ------------------------
  # loss: "adaptive" (Eq. 2), "triplet" (Eq. 1 with `margin`) or "ce" (cross-
  # entropy features, the paper's baseline); margin_mode for "adaptive":
  # "batch" (Eq. 3 per batch), "ema" (moving average, `ema_decay`), "fixed".
  # Ablations: model.enhance (ResNet18 vs ResNet18-I), saliency.enabled.
  c.stage2 = ml_collections.ConfigDict(dict(
      bits="16,32,48,64", epochs=90, mine_every=3, batch_size=128, learning_rate=1e-3,
      loss="adaptive", margin_mode="batch", margin=0.2, ema_decay=0.9, beta=0.5,
      neg_factor=0.1, eval_every=3))

  # ---- evaluation ---------------------------------------------------------------
  c.eval = ml_collections.ConfigDict(dict(precision_k=10, batch_size=128))

  # ---- devices: data-parallel over a mesh (fgir_jax/parallel.py) -------------
  c.parallel = ml_collections.ConfigDict()
  c.parallel.devices = 0               # local devices to use; 0: all. Batches must split evenly
  c.parallel.distributed = False       # call jax.distributed.initialize (several hosts)
  c.parallel.coordinator_address = config_dict.placeholder(str)  # "host:port"; unset: detected
  c.parallel.num_processes = config_dict.placeholder(int)
  c.parallel.process_id = config_dict.placeholder(int)
  return c


def stage_list(config) -> list[str]:
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"config.stages names unknown stage(s) {unknown}; choose from {list(STAGES)}.")
  return [s for s in STAGES if s in stages]


def bit_list(config) -> list[int]:
  try:
    bits = [int(b) for b in str(config.stage2.bits).split(",") if b.strip()]
  except ValueError:
    bits = []
  if not bits or any(b < 1 for b in bits):
    raise ValueError(
        f"config.stage2.bits must list positive code lengths like '16,32,48,64', "
        f"got {config.stage2.bits!r}.")
  return bits


def paper_config(source: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  """The paper's experiment on `source` ("cub" or "dogs"); see configs/cub.py.

  Stage 1: SGD, Nesterov momentum 0.9, weight decay 1e-4 on kernels, one
  warm-up epoch then cosine decay, batch 32, peak rate 0.01 (fine-tuning from
  ImageNet weights), 50 epochs. Stage 2: Adam 1e-3 on the hash layer, batches
  of 128 triplets re-mined on the whole train set every 3 epochs (beta 0.5,
  negative factor 0.1), 90 epochs per code length, 16/32/48/64 bits.
  `runlocal` shrinks it for a 2-core CPU: 128 px, the 1/8-width network from
  scratch, 15 + 30 epochs, 16 and 64 bits.
  """
  c = base_config()
  c.data.source = source
  c.data.image_size = 299
  c.saliency.alpha = 0.4
  c.stage1.update(epochs=50, batch_size=32, learning_rate=0.01, weight_decay=1e-4,
                  warmup_epochs=1.0, crop="random_resized", crop_scale_min=0.25)
  c.stage2.update(bits="16,32,48,64", epochs=90, mine_every=3, batch_size=128,
                  learning_rate=1e-3, beta=0.5, neg_factor=0.1, eval_every=3)
  if runlocal:
    c.data.image_size = 128
    c.model.width = 0.125
    c.stage1.update(epochs=15, learning_rate=0.05, weight_decay=5e-4, crop_scale_min=0.35)
    c.stage2.update(bits="16,64", epochs=30)
  return c
