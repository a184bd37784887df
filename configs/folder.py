"""Your own images: root/<class>/<image>.jpg, split per class with a seed.

    python launch.py --config configs/folder.py --workdir runs/mine --config.data.root=/path/to/root

The paper's method at 224 px with the full ResNet18-I; pass
--config.model.pretrained=resnet18.npz to start from ImageNet weights, and
--config.data.folder_test_fraction=0.2 to choose the query share. Optimiser and
schedules as `paper_config` (configs/cub.py); `:runlocal` shrinks it for a CPU.
"""

from fgir_jax.train.config import paper_config


def get_config(arg=None):
  c = paper_config("folder", runlocal=arg == "runlocal")
  if arg != "runlocal":
    c.data.image_size = 224
  return c
