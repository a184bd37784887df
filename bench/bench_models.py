"""Training throughput of stage 1 (CE), fgir_jax/Flax vs. plain PyTorch.

One step = forward, backward and an SGD-momentum update, BatchNorm in training
mode, softmax cross-entropy over `--classes` classes. Both networks are the
same: ResNet18-I (torchvision ResNet18 + Inception-ResNet-C), the PyTorch one
written here with torch.nn alone (no torchvision); or EfficientNet-Lite0(-I),
the PyTorch one efficientnet-lite-pytorch's reference implementation (with
the same Inception-ResNet-C on its 1280-channel map for -I). Data is one random batch
kept on the device: this measures the model, not the input pipeline. JAX's
compile time is reported apart from its throughput.

    python bench/bench_models.py                          # CPU, 112 and 224 px, batch 32
    python bench/bench_models.py --width 0.125 --sizes 32 --batch 4 --steps 2   # smoke check
    python bench/bench_models.py --gpu                    # GPU: 299 px, bfloat16; PyTorch
                                                          # channels_last + AMP (bfloat16)

Both frameworks use the same cores: PyTorch gets torch.set_num_threads(--threads)
and XLA's CPU backend uses every core of the machine by default; pass
--threads equal to the core count (the default) for a fair comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default=None, help="image sides, comma separated (112,224; 299 with --gpu)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10, help="timed steps per size and framework")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--classes", type=int, default=200)
  p.add_argument("--width", type=float, default=1.0, help="channel multiplier (0.125: tiny)")
  p.add_argument("--no-enhance", action="store_true", help="plain ResNet18, no Inception-ResNet-C")
  p.add_argument("--backbone", default="resnet18", choices=("resnet18", "efficientnet_lite0"),
                 help="efficientnet_lite0: the PyTorch side is efficientnet-lite-pytorch's "
                 "EfficientNet-Lite0 (with the enhancement block unless --no-enhance)")
  p.add_argument("--frameworks", default="jax,torch")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--bf16", action="store_true", help="bfloat16 compute (JAX dtype, torch AMP)")
  p.add_argument("--channels-last", action="store_true", help="torch channels_last memory format")
  p.add_argument("--gpu", action="store_true",
                 help="run on the GPU; implies --bf16 --channels-last and 299 px by default")
  args = p.parse_args(argv)
  if args.gpu:
    args.bf16 = args.channels_last = True
  sizes = args.sizes or ("299" if args.gpu else "112,224")
  args.sizes = [int(s) for s in sizes.split(",")]
  args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  bad = set(args.frameworks) - {"jax", "torch"}
  if bad or min(args.batch, args.steps, *args.sizes) < 1 or args.warmup < 0:
    p.error("need --frameworks from jax,torch, positive --batch/--steps/--sizes, --warmup >= 0")
  return args


# --------------------------------------------------------------------------
# JAX / Flax.

def bench_jax(args, size):
  """-> (images/s, compile seconds) of the jitted fgir_jax train step."""
  import jax
  import jax.numpy as jnp
  import optax
  from fgir_jax import models

  if args.gpu and jax.default_backend() != "gpu":
    raise SystemExit("--gpu: JAX sees no GPU (backend %r); install jax[cuda12]." % jax.default_backend())
  net = models.RetrievalNet(num_classes=args.classes, enhance=not args.no_enhance,
                            width=args.width, backbone=args.backbone,
                            dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
  tx = optax.sgd(0.01, momentum=0.9)
  # rbg keys: XLA compiles threefry initialisers of a whole ResNet slowly on CPU,
  # and the weights' values do not matter for timing.
  key = jax.random.key(0, impl="rbg")
  images = jax.random.normal(key, (args.batch, size, size, 3), jnp.float32)
  labels = jax.random.randint(key, (args.batch,), 0, args.classes)
  variables = jax.jit(net.init)(key, images[:1])
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  def train_step(params, stats, opt_state, images, labels):
    def loss_fn(params):
      (logits, _), new = net.apply({"params": params, "batch_stats": stats}, images,
                                   train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  state = (params, stats, opt_state)
  start = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(*state, images, labels).compile()
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    *state, loss = step(*state, images, labels)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):
    *state, loss = step(*state, images, labels)
  jax.block_until_ready((state, loss))
  return args.batch * args.steps / (time.perf_counter() - start), compile_s


# --------------------------------------------------------------------------
# PyTorch, torch.nn only: the same network layer for layer.

def torch_model(args):
  import torch
  from torch import nn

  def c(n):
    return max(1, int(round(n * args.width)))

  def conv_bn(cin, cout, k, stride=1, pad=0):
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout)]

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride, 1), nn.ReLU(inplace=True),
                                *conv_bn(cout, cout, 3, 1, 1))
      self.downsample = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      return torch.relu(self.body(x) + self.downsample(x))

  class InceptionResNetC(nn.Module):
    def __init__(self, cin, b0=c(192), b1=(c(192), c(224), c(256)), scale=0.2):
      super().__init__()
      relu = lambda: nn.ReLU(inplace=True)
      self.branch0 = nn.Sequential(*conv_bn(cin, b0, 1), relu())
      self.branch1 = nn.Sequential(*conv_bn(cin, b1[0], 1), relu(),
                                   *conv_bn(b1[0], b1[1], (1, 3), 1, (0, 1)), relu(),
                                   *conv_bn(b1[1], b1[2], (3, 1), 1, (1, 0)), relu())
      self.project = nn.Conv2d(b0 + b1[2], cin, 1)
      self.scale = scale

    def forward(self, x):
      up = self.project(torch.cat([self.branch0(x), self.branch1(x)], 1))
      return torch.relu(x + self.scale * up)

  if args.backbone == "efficientnet_lite0":
    # The reference implementation, whose logits tests/test_efficientnet.py matches.
    import efficientnet_lite_pytorch
    base = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0",
                                                            num_classes=args.classes)
    if args.no_enhance:
      return base

    class Features(nn.Module):
      def __init__(self):
        super().__init__()
        self.base = base

      def forward(self, x):
        return self.base.extract_features(x)

    width = 1280  # the head conv's map, as in fgir_jax's EfficientNet-Lite0-I
    return nn.Sequential(Features(), InceptionResNetC(width), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, args.classes))

  widths = [c(64), c(128), c(256), c(512)]
  layers = [*conv_bn(3, widths[0], 7, 2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
  cin = widths[0]
  for i, w in enumerate(widths):
    layers += [BasicBlock(cin, w, 2 if i else 1), BasicBlock(w, w, 1)]
    cin = w
  if not args.no_enhance:
    layers.append(InceptionResNetC(cin))
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, args.classes)]
  return nn.Sequential(*layers)


def bench_torch(args, size):
  """-> images/s of the eager PyTorch train step."""
  import torch

  torch.set_num_threads(args.threads)
  device = "cuda" if args.gpu else "cpu"
  torch.backends.cudnn.benchmark = True  # its best kernels for these fixed shapes (warm-up picks)
  if args.gpu and not torch.cuda.is_available():
    raise SystemExit("--gpu: torch.cuda.is_available() is False.")
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  torch.manual_seed(0)
  model = torch_model(args)
  model = model.to(device, memory_format=memory_format).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  images = torch.randn(args.batch, 3, size, size, device=device).to(memory_format=memory_format)
  labels = torch.randint(0, args.classes, (args.batch,), device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  sync = torch.cuda.synchronize if args.gpu else (lambda: None)
  for _ in range(max(1, args.warmup)):  # at least one: the first step allocates
    step()
  sync()
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  loss.item()
  sync()
  return args.batch * args.steps / (time.perf_counter() - start)


def main(argv=None):
  args = parse_args(argv)
  import jax
  dtype = "bfloat16" if args.bf16 else "float32"
  name = "EfficientNet-Lite0" if args.backbone == "efficientnet_lite0" else "ResNet18"
  print(f"{name}{'' if args.no_enhance else '-I'} stage-1 train step, width {args.width}, "
        f"batch {args.batch}, {args.classes} classes, {dtype}, {args.steps} timed steps; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
        f"torch threads {args.threads}")
  print(f"{'size':>5} {'jax img/s':>10} {'torch img/s':>12} {'jax/torch':>10} {'jax compile s':>14}")
  rows = []
  for size in args.sizes:
    row = {"size": size, "batch": args.batch, "dtype": dtype, "width": args.width,
           "backbone": args.backbone, "enhance": not args.no_enhance}
    if "jax" in args.frameworks:
      row["jax_images_per_s"], row["jax_compile_s"] = bench_jax(args, size)
      print(f"  jax: {row['jax_images_per_s']:.1f} img/s, compile {row['jax_compile_s']:.1f} s",
            flush=True)  # kept if the torch side runs out of time
    if "torch" in args.frameworks:
      row["torch_images_per_s"] = bench_torch(args, size)
    if {"jax", "torch"} <= set(args.frameworks):
      row["ratio"] = row["jax_images_per_s"] / row["torch_images_per_s"]
    fmt = lambda k, spec: format(row[k], spec) if k in row else "-"
    print(f"{size:>5} {fmt('jax_images_per_s', '10.1f'):>10} {fmt('torch_images_per_s', '12.1f'):>12} "
          f"{fmt('ratio', '10.2f'):>10} {fmt('jax_compile_s', '14.1f'):>14}", flush=True)
    rows.append(row)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
