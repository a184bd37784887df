"""Shared by the probes on real birds (frozen_baseline.py, probe_saliency.py): their common
command-line arguments, and CUB images with a frozen ImageNet-pretrained network."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from fgir_jax import data, models


def parser(description: str) -> argparse.ArgumentParser:
  """--root, --backbone, --pretrained, --size and --cache; each probe adds its own."""
  p = argparse.ArgumentParser(description=description)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--root", help="a CUB_200_2011 folder (or one holding it)")
  source.add_argument("--synthetic", type=float, metavar="CLUTTER",
                      help="the demo's synthetic birds (configs/demo.py) at this clutter, 0-1")
  p.add_argument("--backbone", default="efficientnet_lite0", choices=models.BACKBONES)
  p.add_argument("--pretrained", default=None, help="weights file; default the standard one")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--cache", default="runs/probe_saliency_cache")
  return p


def load(args):
  """(dataset, decoded images, backbone without heads, its ImageNet variables)."""
  if args.synthetic is not None:
    ds = data.make_synthetic(num_classes=20, per_class=100, size=96, test_fraction=0.4,
                             clutter=args.synthetic)
    images = data.cached_images(ds, args.size, None, progress=False).images
  else:
    ds = data.read_cub(args.root)
    images = data.cached_images(ds, args.size, args.cache, progress=True).images
  net = models.RetrievalNet(None, enhance=False, backbone=args.backbone)
  variables = models.load_imagenet(
      net.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3))),
      backbone=args.backbone, path=args.pretrained)
  return ds, images, net, variables
