"""What finished stages left, for the stages and commands after them.

One small interface: the stage-1 network, the saliency network and boxes, the
pooled features and each code length's hash layer. Every read goes through
the work directory's `read`, so during a command a stage sees the results this
command already staged, and a reader (search, serve) the committed ones.
"""

from __future__ import annotations

import os

import numpy as np

from fgir_jax.train import networks


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

  def stage1_network(self, num_classes: int):
    """(net, variables) of the final stage-1 network."""
    net = networks.make_net(self.run.config, num_classes)
    return net, networks.load_variables(self._path("stage1", "network.msgpack"))

  def saliency_network(self, num_classes: int):
    """(net, variables) whose feature maps give the saliency boxes.

    saliency.network "pretrained": the ImageNet backbone alone (nothing was
    trained); "stage1": the bootstrap classifier the saliency stage trained.
    """
    config = self.run.config
    if config.saliency.network == "pretrained":
      net = networks.make_net(config, num_classes, enhance=False, frozen=False)
      return net, networks.init_variables(config, net, self.run.stage_key("saliency_net"))
    net = networks.make_net(config, num_classes)
    return net, networks.load_variables(self._path("saliency", "network.msgpack"))

  def boxes(self) -> np.ndarray | None:
    """(n, 4) saliency boxes of the dataset's images; None when the run does not crop."""
    path = self.run.wd.read("saliency", "boxes.npz")
    if not self.run.config.saliency.enabled or not os.path.exists(path):
      return None
    with np.load(path) as f:
      return f["boxes"]

  def features(self) -> dict:
    """The frozen stage-1 network's pooled features of every image, with labels and split."""
    with np.load(self._path("stage1", "features.npz")) as f:
      return dict(f)

  def hash_layer(self, bits: int) -> dict:
    """The trained hash layer of a code length ({"kernel", "bias"}, for raw pooled features)."""
    with np.load(self._path("stage2", f"hash_{bits}.npz")) as f:
      return dict(f)
