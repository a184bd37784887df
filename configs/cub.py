"""CUB-200-2011 with the paper's settings (PAPER.md): ResNet18-I, 299 px, alpha 0.4.

    python launch.py --config configs/cub.py --workdir runs/cub \
        --config.data.root=/data/CUB_200_2011 --config.model.pretrained=resnet18.npz \
        --config.saliency.network=pretrained
    python launch.py --config configs/cub.py:runlocal --workdir runs/cub_local \
        --config.data.root=../shared/data/cub50

Without data.root the data comes through tensorflow-datasets
(`caltech_birds2011`; TensorFlow is needed only for that). Queries = the test
split (5,794), database = the train split (5,994). Optimiser, schedule, weight
decay and batch sizes: `fgir_jax.train.config.paper_config`'s docstring.
`:runlocal` is the same experiment shrunk to run on a 2-core CPU.
"""

from fgir_jax.train.config import paper_config


def get_config(arg=None):
  return paper_config("cub", runlocal=arg == "runlocal")
