"""What finished stages left, for the stages and commands after them.

One small interface: the stage-1 network, the saliency network and boxes, the
pooled features and each code length's hash layer, of any seed (a stage the
seeds do not repeat is shared: seed k reads seed 0's). Every read goes through
the work directory's `read`, so during a command a stage sees the results this
command already staged, and a reader (search, serve) the committed ones.
"""

from __future__ import annotations

import os

import numpy as np

from fgir_jax.train import networks
from fgir_jax.train import stages


class Finished:
  """The trained products of a run (`run`: a context.Run)."""

  def __init__(self, run):
    self.run = run

  def _path(self, *parts: str) -> str:
    path = self.run.wd.read(*parts)
    if not os.path.exists(path):
      raise ValueError(f"{self.run.wd.path} has no {os.path.join(*parts)}; train the run first: "
                       f"{self.run.command}")
    return path

  def _dir(self, base: str, seed: int) -> str:
    """The output folder of stage `base` that seed `seed` reads (stage1_s2, or shared stage1)."""
    return stages.upstream_of(self.run.config, base, seed)

  def stage1_network(self, num_classes: int, seed: int = 0):
    """(net, variables) of the final stage-1 network."""
    net = networks.make_net(self.run.config, num_classes)
    return net, networks.load_variables(self._path(self._dir("stage1", seed), "network.msgpack"))

  def saliency_network(self, num_classes: int, seed: int = 0):
    """(net, variables) whose feature maps give the saliency boxes.

    saliency.network "pretrained": the ImageNet backbone alone (nothing was
    trained); "stage1": the bootstrap classifier the saliency stage trained.
    """
    config = self.run.config
    if config.saliency.network == "pretrained":
      net = networks.make_net(config, num_classes, enhance=False, frozen=False)
      return net, networks.init_variables(config, net, self.run.stage_key("saliency_net"))
    net = networks.make_net(config, num_classes)
    return net, networks.load_variables(self._path(self._dir("saliency", seed), "network.msgpack"))

  def boxes(self, seed: int = 0) -> np.ndarray | None:
    """(n, 4) saliency boxes of the dataset's images; None when the run does not crop."""
    path = self.run.wd.read(self._dir("saliency", seed), "boxes.npz")
    if not self.run.config.saliency.enabled or not os.path.exists(path):
      return None
    with np.load(path) as f:
      return f["boxes"]

  def features(self, seed: int = 0) -> dict:
    """The frozen stage-1 network's pooled features of every image, with labels and split."""
    with np.load(self._path(self._dir("stage1", seed), "features.npz")) as f:
      return dict(f)

  def hash_layer(self, bits: int, seed: int = 0) -> dict:
    """The trained hash layer of a code length ({"kernel", "bias"}, for raw pooled features)."""
    with np.load(self._path("stage2", f"hash_{bits}{stages.seed_suffix(seed)}.npz")) as f:
      return dict(f)
