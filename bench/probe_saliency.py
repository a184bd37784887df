"""How well do a pretrained network's saliency boxes find the bird? CorLoc per layer and alpha.

    python bench/probe_saliency.py --root data/cub50
    python bench/probe_saliency.py --root data/cub50 --backbone resnet18 \
        --pretrained resnet18-f37072fd.pth --size 299
    python bench/probe_saliency.py --synthetic 0.2 --size 96 --layers last_stage,stage5  # the demo

Runs the ImageNet network once over every image (eval mode, the pipeline's
own decode and normalisation), takes the saliency map from each layer the
pipeline offers (`saliency.layer`: --layers), and prints CorLoc
(IoU > 0.5 with the true box) and mean IoU on the train and the test split for
a grid of alpha and margin. Choose alpha on the train split; the test column
is then an honest estimate.
"""

from __future__ import annotations

import time

import numpy as np

from fgir_jax import saliency
from fgir_jax.data import batching
from fgir_jax.train import inference
import pretrained_cub  # bench/pretrained_cub.py


def main() -> None:
  parser = pretrained_cub.parser(__doc__.splitlines()[0])
  parser.add_argument("--alphas", default="0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65")
  parser.add_argument("--margins", default="0,0.05,0.1")
  parser.add_argument("--layers", default="output,last_stage",
                      help="saliency.layer values: output, last_stage, stage<k>")
  args = parser.parse_args()

  ds, images, net, variables = pretrained_cub.load(args)
  inputs = batching.DeviceInput(images, ds.labels)
  tr = ds.is_train
  print(f"{ds.name}: {len(ds.labels)} images ({tr.sum()} train), {args.backbone} at {args.size} px")
  print("| layer | alpha | margin | CorLoc train | CorLoc test | CorLoc all | mean IoU all |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for layer in args.layers.split(","):
    start = time.perf_counter()
    maps = inference.run_network(net, variables, inputs, batch_size=64, with_maps=True,
                                 map_layer=layer)["maps"]
    seconds = time.perf_counter() - start
    for alpha in (float(a) for a in args.alphas.split(",")):
      for margin in (float(m) for m in args.margins.split(",")):
        boxes = np.asarray(saliency.boxes_from_maps(maps, alpha=alpha, image_size=(args.size,) * 2,
                                                    margin=margin))
        print(f"| {layer} | {alpha:g} | {margin:g} | {saliency.corloc(boxes[tr], ds.boxes[tr]):.3f} "
              f"| {saliency.corloc(boxes[~tr], ds.boxes[~tr]):.3f} "
              f"| {saliency.corloc(boxes, ds.boxes):.3f} "
              f"| {float(np.mean(np.asarray(saliency.iou(boxes, ds.boxes)))):.3f} |")
    print(f"({layer}: maps of {len(images)} images in {seconds:.0f} s)")


if __name__ == "__main__":
  main()
