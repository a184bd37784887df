"""Models: torchvision-exact ResNet18, weight import, enhancement block, heads, dtypes.

The import is checked against a forward pass written here from torchvision's
semantics (NumPy, float64), and against torch itself where torch is installed.
Random weights are drawn with NumPy and put in through the importer, which
also keeps the tests fast: on CPU, compiling JAX's threefry initialisers of a
whole ResNet costs seconds.
"""

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgir_jax import models
from fgir_jax.models import convert_weights

from torch_files import write_zip

RESNET18_PARAMS = 11_689_512
EPS = 1e-5


# --------------------------------------------------------------------------
# A torchvision-layout state dict and forward pass, written independently of
# the library.

def random_state_dict(width=1.0, num_classes=10, stage_sizes=(2, 2, 2, 2), seed=0):
  """Random torchvision resnet weights and BatchNorm statistics (numpy float32)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, cout, cin, k):
    sd[name] = rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)

  def bn(name, c):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

  widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
  conv("conv1.weight", widths[0], 3, 7)
  bn("bn1", widths[0])
  cin = widths[0]
  for i, (c, blocks) in enumerate(zip(widths, stage_sizes)):
    for j in range(blocks):
      p = f"layer{i + 1}.{j}"
      conv(f"{p}.conv1.weight", c, cin, 3)
      bn(f"{p}.bn1", c)
      conv(f"{p}.conv2.weight", c, c, 3)
      bn(f"{p}.bn2", c)
      if i > 0 and j == 0:
        conv(f"{p}.downsample.0.weight", c, cin, 1)
        bn(f"{p}.downsample.1", c)
      cin = c
  sd["fc.weight"] = rng.normal(0, 1 / np.sqrt(cin), (num_classes, cin)).astype(np.float32)
  sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return sd


def np_conv(x, w, stride=1, pad=(0, 0)):
  """torch.nn.functional.conv2d in NumPy: x (n, c, h, w), w (o, c, kh, kw)."""
  x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
  win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
  win = win[:, :, ::stride, ::stride]
  return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)


def np_bn(x, sd, name):
  shape = (1, -1, 1, 1)
  inv = sd[f"{name}.weight"].reshape(shape) / np.sqrt(sd[f"{name}.running_var"].reshape(shape) + EPS)
  return (x - sd[f"{name}.running_mean"].reshape(shape)) * inv + sd[f"{name}.bias"].reshape(shape)


def np_maxpool(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
  return win.max(axis=(-1, -2))


def np_resnet(sd, images):
  """torchvision resnet forward, eval mode: (n, h, w, 3) -> (logits, pooled, feature map NCHW)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  relu = lambda t: np.maximum(t, 0)
  x = np.transpose(images, (0, 3, 1, 2)).astype(np.float64)
  x = np_maxpool(relu(np_bn(np_conv(x, sd["conv1.weight"], 2, (3, 3)), sd, "bn1")))
  stage = 1
  while f"layer{stage}.0.conv1.weight" in sd:
    j = 0
    while f"layer{stage}.{j}.conv1.weight" in sd:
      p = f"layer{stage}.{j}"
      stride = 2 if f"{p}.downsample.0.weight" in sd else 1
      y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], stride, (1, 1)), sd, f"{p}.bn1"))
      y = np_bn(np_conv(y, sd[f"{p}.conv2.weight"], 1, (1, 1)), sd, f"{p}.bn2")
      if stride == 2:
        x = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], 2), sd, f"{p}.downsample.1")
      x = relu(x + y)
      j += 1
    stage += 1
  pooled = x.mean(axis=(2, 3))
  return pooled @ sd["fc.weight"].T + sd["fc.bias"], pooled, x


def abstract_variables(net, shape=(1, 32, 32, 3)):
  return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(shape), train=False))


def filled_variables(net, shape=(1, 32, 32, 3), seed=0):
  """Random variables without compiling JAX initialisers (NumPy, float32)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
    return jnp.asarray(rng.normal(0, np.sqrt(1.0 / fan_in), leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(net, shape))


def images(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Structure.

def test_resnet18_has_torchvision_parameter_count():
  v = abstract_variables(models.RetrievalNet(num_classes=1000, hash_bits=None, enhance=False),
                         (1, 224, 224, 3))
  assert count(v["params"]) == RESNET18_PARAMS
  assert count(v["batch_stats"]) == 2 * 4800  # running mean and var of 20 BatchNorms


def test_import_covers_every_backbone_and_fc_tensor():
  # Every leaf of the abstract tree is replaced by a concrete array: nothing left out.
  v = abstract_variables(models.ResNet18(num_classes=1000), (1, 64, 64, 3))
  loaded = models.load_torchvision_resnet18(random_state_dict(num_classes=1000), v)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))


@pytest.mark.parametrize("size,last", [(32, 1), (64, 2), (112, 4), (224, 7), ((299, 299), 10),
                                       ((300, 240), (10, 8))])
@pytest.mark.parametrize("enhance", [False, True])
def test_output_shapes(size, last, enhance):
  h, w = size if isinstance(size, tuple) else (size, size)
  lh, lw = last if isinstance(last, tuple) else (last, last)
  net = models.RetrievalNet(num_classes=200, hash_bits=48, enhance=enhance)
  logits, out = jax.eval_shape(
      lambda: net.init_with_output(jax.random.key(0), jnp.zeros((2, h, w, 3)))[0])
  assert logits.shape == (2, 200)
  assert out["feature_map"].shape == (2, lh, lw, 512)
  assert out["pooled"].shape == (2, 512)
  assert out["hash"].shape == (2, 48)
  assert all(x.dtype == jnp.float32 for x in (logits, *out.values()))


def test_without_heads_logits_are_none_and_no_head_params():
  net = models.ResNet18ITiny(num_classes=None, hash_bits=None)
  v = filled_variables(net)
  assert set(v["params"]) == {"backbone", "enhancement"}
  logits, out = net.apply(v, images((2, 32, 32, 3)))
  assert logits is None and set(out) == {"feature_map", "pooled"}
  assert out["feature_map"].shape == (2, 1, 1, 64)


def test_invalid_arguments_are_value_errors():
  with pytest.raises(ValueError, match="num_classes"):
    abstract_variables(models.RetrievalNet(num_classes=-3))
  with pytest.raises(ValueError, match="images"):
    abstract_variables(models.ResNet18Tiny(num_classes=10), (32, 32, 3))


# --------------------------------------------------------------------------
# Weight import against torchvision semantics.

def test_import_matches_numpy_torchvision_reference():
  sd = random_state_dict(num_classes=10)
  net = models.ResNet18(num_classes=10)
  variables = models.load_torchvision_resnet18(sd, abstract_variables(net))
  x = images((2, 45, 38, 3))  # odd, non-square: catches padding and H/W mix-ups
  logits, out = net.apply(variables, x, train=False)
  ref_logits, ref_pooled, ref_map = np_resnet(sd, x)
  np.testing.assert_allclose(out["pooled"], ref_pooled, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["feature_map"], ref_map.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_import_matches_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  sd = {k: torch.from_numpy(v) for k, v in random_state_dict(width=0.25, num_classes=7).items()}

  def bn(x, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=EPS)

  def forward(x):
    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i in range(1, 5):
      for j in range(2):
        p, s = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
        y = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s, padding=1), f"{p}.bn1"))
        y = bn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
        if s == 2:
          x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2), f"{p}.downsample.1")
        x = F.relu(x + y)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(pooled, sd["fc.weight"], sd["fc.bias"]), pooled

  net = models.RetrievalNet(num_classes=7, width=0.25, enhance=False)
  variables = models.load_torchvision_resnet18(sd, abstract_variables(net))  # torch tensors in
  x = images((2, 64, 57, 3))
  logits, out = net.apply(variables, x)
  with torch.no_grad():
    ref_logits, ref_pooled = forward(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(out["pooled"], ref_pooled.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-4)


def test_import_keeps_enhancement_and_hash_head_and_input_untouched():
  net = models.ResNet18ITiny(num_classes=10, hash_bits=16)
  v = filled_variables(net)
  before = jax.tree.map(np.asarray, v)
  loaded = models.load_torchvision_resnet18(random_state_dict(width=0.125, num_classes=10), v)
  for part in ("enhancement", "hash"):
    jax.tree.map(np.testing.assert_array_equal, loaded["params"][part], before["params"][part])
  jax.tree.map(np.testing.assert_array_equal, v, before)  # the caller's tree is not modified
  sd = random_state_dict(width=0.125, num_classes=10)
  np.testing.assert_array_equal(loaded["params"]["backbone"]["layer3_0"]["downsample_conv"]["kernel"],
                                sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["var"], sd["bn1.running_var"])
  np.testing.assert_array_equal(loaded["params"]["classifier"]["kernel"], sd["fc.weight"].T)


def test_other_class_count_keeps_classifier_and_says_so(caplog):
  net = models.ResNet18Tiny(num_classes=200)
  v = filled_variables(net)
  with caplog.at_level(logging.INFO, logger="fgir_jax"):  # the expected case: info, not a warning
    loaded = models.load_torchvision_resnet18(random_state_dict(width=0.125, num_classes=1000), v)
  assert "keeping the network's classifier" in caplog.text
  np.testing.assert_array_equal(loaded["params"]["classifier"]["kernel"],
                                v["params"]["classifier"]["kernel"])
  # A headless network ignores fc altogether.
  headless = filled_variables(models.ResNet18Tiny(num_classes=None))
  models.load_torchvision_resnet18(random_state_dict(width=0.125), headless)


def test_missing_tensor_is_named():
  sd = random_state_dict(width=0.125)
  del sd["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing 'layer3\.1\.bn2\.running_var'"):
    models.load_torchvision_resnet18(sd, abstract_variables(models.ResNet18Tiny(num_classes=10)))


def test_misshapen_tensor_is_named_with_both_shapes():
  sd = random_state_dict(width=0.125)
  sd["layer2.0.downsample.0.weight"] = np.zeros((16, 8, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'layer2\.0\.downsample\.0\.weight'.*\(16, 8, 3, 3\).*"
                                       r"\(16, 8, 1, 1\)"):
    models.load_torchvision_resnet18(sd, abstract_variables(models.ResNet18Tiny(num_classes=10)))


def test_width_multiplier_mismatch_is_caught():
  with pytest.raises(ValueError, match=r"'conv1\.weight'.*\(64, 3, 7, 7\).*\(8, 3, 7, 7\)"):
    models.load_torchvision_resnet18(random_state_dict(),
                                     abstract_variables(models.ResNet18Tiny(num_classes=10)))


def test_deeper_checkpoint_is_rejected_and_module_prefix_is_accepted():
  v = abstract_variables(models.ResNet18Tiny(num_classes=10))
  deeper = random_state_dict(width=0.125, stage_sizes=(3, 4, 6, 3))
  with pytest.raises(ValueError, match="no place for.*'layer1.2.conv1.weight'"):
    models.load_torchvision_resnet18(deeper, v)
  prefixed = {f"module.{k}": a for k, a in random_state_dict(width=0.125).items()}
  models.load_torchvision_resnet18(prefixed, v)


def test_npz_and_pth_files_load_without_torch(tmp_path, monkeypatch):
  sd = random_state_dict(width=0.125)
  np.savez(tmp_path / "w.npz", **sd)
  write_zip(tmp_path / "w.pth", sd)
  v = abstract_variables(models.ResNet18Tiny(num_classes=10))
  monkeypatch.setitem(sys.modules, "torch", None)  # any torch import would now fail
  from_npz = models.load_torchvision_resnet18(str(tmp_path / "w.npz"), v)
  from_pth = models.load_torchvision_resnet18(tmp_path / "w.pth", v)
  from_dict = models.load_torchvision_resnet18(sd, v)
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_dict)
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_dict)
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="junk.pth"):
    models.load_torchvision_resnet18(tmp_path / "junk.pth", v)
  with pytest.raises(FileNotFoundError, match="nothere.npz"):
    models.load_torchvision_resnet18(tmp_path / "nothere.npz", v)


def test_pth_to_npz_converter_round_trip(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  sd = random_state_dict(width=0.125)
  torch.save({k: torch.from_numpy(a) for k, a in sd.items()}, tmp_path / "r18.pth")
  assert convert_weights.main([str(tmp_path / "r18.pth"), str(tmp_path / "r18.npz")]) == 0
  assert "wrote" in capsys.readouterr().out
  with np.load(tmp_path / "r18.npz") as f:
    assert "bn1.num_batches_tracked" not in f.files
    np.testing.assert_array_equal(f["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"])
  v = abstract_variables(models.ResNet18Tiny(num_classes=10))
  from_npz = models.load_torchvision_resnet18(tmp_path / "r18.npz", v)
  from_pth = models.load_torchvision_resnet18(tmp_path / "r18.pth", v)
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_pth)
  assert convert_weights.main([str(tmp_path / "missing.pth"), str(tmp_path / "x.npz")]) == 2


# --------------------------------------------------------------------------
# Enhancement block and heads.

def test_enhancement_starts_as_relu_identity():
  block = models.InceptionResNetC(branch0=4, branch1=(4, 5, 6))
  x = images((2, 3, 4, 8))  # negative values too: the output is ReLU(x), not x
  variables = jax.jit(block.init)(jax.random.key(0, impl="rbg"), x)
  shapes = jax.tree.map(lambda a: a.shape, variables["params"])
  assert shapes["branch1_1_conv"]["kernel"] == (1, 3, 4, 5)
  assert shapes["branch1_2_conv"]["kernel"] == (3, 1, 5, 6)
  assert shapes["project"]["kernel"] == (1, 1, 10, 8)
  np.testing.assert_allclose(block.apply(variables, x), np.maximum(x, 0), atol=1e-6)


def test_enhancement_matches_numpy_reference():
  block = models.InceptionResNetC(branch0=4, branch1=(4, 5, 6), scale=0.2)
  x = images((2, 3, 4, 8))
  variables = filled_variables(block, x.shape, seed=3)
  p, s = variables["params"], variables["batch_stats"]
  relu = lambda t: np.maximum(t, 0)

  def conv_bn(t, name, pad):
    w = np.asarray(p[f"{name}_conv"]["kernel"], np.float64).transpose(3, 2, 0, 1)
    y = np_conv(t, w, 1, pad)
    bn = {f"n.{k}": np.asarray(v, np.float64) for k, v in
          [("weight", p[f"{name}_bn"]["scale"]), ("bias", p[f"{name}_bn"]["bias"]),
           ("running_mean", s[f"{name}_bn"]["mean"]), ("running_var", s[f"{name}_bn"]["var"])]}
    return relu(np_bn(y, bn, "n"))

  t = x.transpose(0, 3, 1, 2).astype(np.float64)
  b0 = conv_bn(t, "branch0", (0, 0))
  b1 = conv_bn(conv_bn(conv_bn(t, "branch1_0", (0, 0)), "branch1_1", (0, 1)), "branch1_2", (1, 0))
  w = np.asarray(p["project"]["kernel"], np.float64).transpose(3, 2, 0, 1)
  up = np_conv(np.concatenate([b0, b1], 1), w) + np.asarray(p["project"]["bias"]).reshape(1, -1, 1, 1)
  ref = relu(t + 0.2 * up).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(block.apply(variables, x), ref, rtol=1e-4, atol=1e-5)


def test_hash_head_applies_standalone_to_pooled_features():
  net = models.ResNet18ITiny(num_classes=10, hash_bits=16)
  v = filled_variables(net)
  _, out = net.apply(v, images((2, 32, 32, 3)))
  assert set(v["params"]["hash"]) == {"kernel", "bias"}
  h = models.HashHead(16).apply({"params": v["params"]["hash"]}, out["pooled"])
  np.testing.assert_allclose(h, out["hash"], rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(h) < 1)
  codes = models.binary_codes(h)
  assert codes.dtype == jnp.bool_ and codes.shape == (2, 16)


# --------------------------------------------------------------------------
# Training mode and precision.

def test_train_mode_updates_batch_stats_and_has_finite_grads():
  net = models.ResNet18ITiny(num_classes=5)
  v = filled_variables(net)
  x = images((2, 32, 32, 3))

  def loss(params):
    (logits, _), new = net.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), new

  (value, new), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  old_mean = v["batch_stats"]["backbone"]["bn1"]["mean"]
  assert not np.allclose(new["batch_stats"]["backbone"]["bn1"]["mean"], old_mean)


def test_bfloat16_compute_keeps_float32_state_and_stays_close():
  f32 = models.ResNet18ITiny(num_classes=10, hash_bits=16, enhance_zero_init=False)
  bf16 = models.ResNet18ITiny(num_classes=10, hash_bits=16, enhance_zero_init=False,
                              dtype=jnp.bfloat16)
  v = filled_variables(f32, seed=4)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract_variables(bf16)))
  x = images((2, 32, 32, 3))

  @jax.jit  # one compilation for the three passes
  def run(v, x):
    return f32.apply(v, x), bf16.apply(v, x), bf16.apply(v, x, train=True, mutable=["batch_stats"])

  (ref_logits, ref), (logits, out), (_, new) = run(v, x)
  assert all(a.dtype == jnp.float32 for a in (logits, *out.values()))
  for got, want in ((logits, ref_logits), (out["pooled"], ref["pooled"]), (out["hash"], ref["hash"])):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, atol=0.02 * scale)  # seen: <1%
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
