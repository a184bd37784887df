"""Flax models: torchvision-layout ResNet18, Inception-ResNet-C, hash and classifier heads.

    from fgir_jax import models
    net = models.RetrievalNet(num_classes=200, hash_bits=64, enhance=True)   # ResNet18-I
    variables = net.init(key, images, train=False)
    variables = models.load_torchvision_resnet18("resnet18.npz", variables)  # ImageNet weights
    logits, out = net.apply(variables, images, train=False)

`ResNet18`, `ResNet18I` and their `...Tiny` (1/8 width) versions are partials of
`RetrievalNet`; torch is needed only to read `.pth` files.
"""

from fgir_jax.models.enhance import InceptionResNetC
from fgir_jax.models.heads import HashHead, binary_codes
from fgir_jax.models.resnet import BasicBlock, ResNet
from fgir_jax.models.retrieval_net import (RetrievalNet, ResNet18, ResNet18I, ResNet18ITiny,
                                           ResNet18Tiny)
from fgir_jax.models.torchvision_import import load_state_dict, load_torchvision_resnet18

__all__ = [
    "BasicBlock", "HashHead", "InceptionResNetC", "ResNet", "ResNet18", "ResNet18I",
    "ResNet18ITiny", "ResNet18Tiny", "RetrievalNet", "binary_codes", "load_state_dict",
    "load_torchvision_resnet18",
]
