"""Stanford Dogs with the paper's protocol (PAPER.md): ImageNet ResNet18-I, 299 px.

    python launch.py --config configs/dogs.py --workdir runs/dogs --config.data.root=/data/dogs
    python launch.py --config configs/dogs.py:runlocal --workdir runs/dogs_local \\
        --config.data.root=/data/dogs --config.data.max_classes=20

data.root holds the original archives unpacked (Images/, Annotation/,
train_list.mat, test_list.mat); without it the data comes through
tensorflow-datasets (`stanford_dogs`). Queries = test (8,580), database =
train (12,000). The backbone and the saliency boxes start from ImageNet weights
as in configs/cub.py. The paper saw no clear gain from the saliency crop on Dogs
(several subjects per image): compare with --config.saliency.enabled=False.
Optimiser, schedule, weight decay and batch sizes: `paper_config`'s docstring.
"""

from fgir_jax.train.config import paper_config


def get_config(arg=None):
  return paper_config("dogs", runlocal=arg == "runlocal")
