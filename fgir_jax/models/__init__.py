"""Flax models: torchvision-layout ResNet18, Inception-ResNet-C, hash and classifier heads."""
