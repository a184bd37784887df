"""Data sources, decode cache and on-device input for fgir_jax.

Sources, each returning a `Dataset` (images as paths or a uint8 array, 0-based
labels, the official train/test split, true boxes where the data has them):

    data.read_cub(root)                  CUB-200-2011 in its own layout
    data.read_dogs(root)                 Stanford Dogs in the original archives' layout
    data.load_tfds("caltech_birds2011")  tensorflow-datasets (TensorFlow imported only there)
    data.read_folder(root)               root/<class>/<image>, seeded stratified split
    data.make_synthetic()                the embedded synthetic fine-grained set

Decode cache (uint8 arrays at the input size, decoded once per source and size):

    data.cached_images(ds, 299, cache_dir).images       # (n, 299, 299, 3) uint8
    data.cached_crops(ds, boxes, 299, cache_dir).images # crops of the original files

Nothing here imports TensorFlow or matplotlib. The decode cache needs Pillow
(the `[pipeline]` extra) and is imported on first use, so that the on-device
augmentation (`fgir_jax.data.augment`, pure JAX) imports with the plain install.
"""

import importlib

from fgir_jax.data.cub import read_cub
from fgir_jax.data.dataset import IMAGE_EXTENSIONS, Dataset, image_size, image_sizes
from fgir_jax.data.dogs import read_dogs
from fgir_jax.data.folder import read_folder
from fgir_jax.data.synthetic import class_traits, make_synthetic
from fgir_jax.data.tfds_source import load_tfds

__all__ = [
    "Cached", "Dataset", "IMAGE_EXTENSIONS", "UndecodableImage", "cached_crops", "cached_images",
    "class_traits",
    "image_size", "image_sizes", "load_image", "load_tfds", "make_synthetic", "read_cub",
    "read_dogs", "read_folder", "resize_array", "to_rgb",
]

_CACHE_NAMES = ("Cached", "UndecodableImage", "cached_crops", "cached_images", "load_image",
                "resize_array", "to_rgb")


def __getattr__(name):
  if name in _CACHE_NAMES:
    return getattr(importlib.import_module("fgir_jax.data.cache"), name)
  raise AttributeError(f"module 'fgir_jax.data' has no attribute {name!r}")
