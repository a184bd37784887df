"""EfficientNet-Lite0: the Flax module, its depthwise convolution, the ImageNet import, freezing.

The import is checked against the reference PyTorch implementation
(`efficientnet-lite-pytorch`) where torch is installed; without torch the
structural checks still run: every tensor of the installed ImageNet file has
a place of the right shape, and nothing of the network is left unfilled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fgir_jax import models
from fgir_jax.data import augment
from fgir_jax.models import efficientnet, weights

from test_models import abstract_variables, filled_variables


def lax_depthwise(x, kernel, strides):
  return lax.conv_general_dilated(x, kernel, (strides, strides), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


@pytest.mark.parametrize("size,kernel,strides", [(9, 3, 1), (8, 3, 2), (9, 5, 2), (10, 5, 1),
                                                 (7, 5, 2)])
def test_depthwise_by_shifts_equals_the_grouped_convolution(size, kernel, strides):
  rng = np.random.default_rng(size * kernel)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  ours = efficientnet.depthwise_by_shifts(x, w, strides)
  np.testing.assert_allclose(ours, lax_depthwise(x, w, strides), rtol=1e-5, atol=1e-5)
  # Gradients against the convolution's own (an independent implementation).
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, strides)))
  g_ours = jax.grad(loss(efficientnet.depthwise_by_shifts), argnums=(0, 1))(x, w)
  g_ref = jax.grad(loss(lax_depthwise), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 5, 5, 2)), jnp.float64 if jax.config.x64_enabled else jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 2)), x.dtype)
  f = lambda w: jnp.sum(efficientnet.depthwise_by_shifts(x, w, 2) ** 2)
  grad = np.asarray(jax.grad(f)(w))
  eps = 1e-2
  for idx in [(0, 0, 0, 0), (1, 2, 0, 1), (2, 1, 0, 0)]:
    e = np.zeros(w.shape, np.float32)
    e[idx] = eps
    numeric = (f(w + e) - f(w - e)) / (2 * eps)
    np.testing.assert_allclose(grad[idx], numeric, rtol=2e-3, atol=2e-3)


def test_same_padding_is_tensorflows():
  for size in range(1, 12):
    for kernel in (1, 3, 5):
      for strides in (1, 2):
        before, after = efficientnet.same_padding(size, kernel, strides)
        out = -(-size // strides)
        assert (size + before + after - kernel) // strides + 1 == out
        assert after - before in (0, 1)


def test_depthwise_module_impls_agree_and_bad_impl_is_named():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 4)), jnp.float32)
  conv = efficientnet.DepthwiseConv(3, 2, impl="xla")
  v = conv.init(jax.random.key(0), x)
  assert v["params"]["kernel"].shape == (3, 3, 1, 4)  # nn.Conv's grouped layout
  shifts = efficientnet.DepthwiseConv(3, 2, impl="shifts").apply(v, x)
  np.testing.assert_allclose(shifts, conv.apply(v, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="impl must be"):
    efficientnet.DepthwiseConv(3, impl="fft").apply(v, x)


def test_lite0_layout_and_feature_map():
  net = models.RetrievalNet(1000, enhance=False, backbone="efficientnet_lite0")
  v = abstract_variables(net, (1, 224, 224, 3))
  backbone = v["params"]["backbone"]
  assert len([k for k in backbone if k.startswith("blocks_")]) == 16
  assert "expand_conv" not in backbone["blocks_0"]  # expansion 1 in the first stage
  assert backbone["blocks_15"]["project_conv"]["kernel"].shape == (1, 1, 1152, 320)
  assert backbone["conv_head"]["kernel"].shape == (1, 1, 320, 1280)
  _, out = jax.eval_shape(lambda v: net.apply(v, jnp.zeros((2, 224, 224, 3))), v)
  assert out["feature_map"].shape == (2, 7, 7, 1280)
  _, out = jax.eval_shape(lambda v: net.apply(v, jnp.zeros((1, 299, 299, 3))), v)
  assert out["feature_map"].shape == (1, 10, 10, 1280)


def test_installed_imagenet_file_fills_every_tensor_with_the_right_shape():
  net = models.RetrievalNet(1000, enhance=False, backbone="efficientnet_lite0")
  v = abstract_variables(net, (1, 64, 64, 3))
  loaded = models.load_imagenet(v, backbone="efficientnet_lite0")  # strict: raises on any mismatch
  # Every leaf was replaced by a real array (abstract leaves have no values).
  leaves = jax.tree.leaves(loaded)
  assert leaves and all(isinstance(a, jax.Array) for a in leaves)
  state = models.load_state_dict(models.imagenet_file("efficientnet_lite0"))
  np.testing.assert_array_equal(loaded["params"]["backbone"]["blocks_3"]["depthwise_conv"]["kernel"],
                                state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["params"]["classifier"]["kernel"], state["_fc.weight"].T)
  count = sum(a.size for k, a in state.items()
              if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert count == sum(a.size for a in jax.tree.leaves(loaded["params"]))


def test_import_errors_name_the_tensor():
  net = models.EfficientNetLite0ITiny(num_classes=10)
  v = abstract_variables(net)
  filled = filled_variables(net)
  state = {}
  from fgir_jax.models import efficientnet_import  # pylint: disable=import-outside-toplevel
  entries = efficientnet_import._backbone_mapping(v["params"]["backbone"])  # pylint: disable=protected-access
  for name, collection, path in entries:
    leaf = filled[collection]
    for key in path:
      leaf = leaf[key]
    a = np.asarray(leaf)
    state[name] = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
  models.load_efficientnet_lite(state, v)  # the complete dict imports
  missing = dict(state)
  del missing["_blocks.5._bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing '_blocks\.5\._bn1\.running_var'"):
    models.load_efficientnet_lite(missing, v)
  with pytest.raises(ValueError, match="not of an EfficientNet-Lite backbone"):
    models.load_efficientnet_lite(state, abstract_variables(models.ResNet18Tiny(num_classes=10)))
  with pytest.raises(ValueError, match="not of a ResNet backbone"):
    models.load_torchvision_resnet18({}, v)


def test_logits_equal_the_reference_pytorch_implementation():
  torch = pytest.importorskip("torch")
  reference = pytest.importorskip("efficientnet_lite_pytorch")
  torch.set_num_threads(2)
  path = models.imagenet_file("efficientnet_lite0")
  ref = reference.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
  net = models.RetrievalNet(1000, enhance=False, backbone="efficientnet_lite0")
  x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  variables = models.load_imagenet(jax.eval_shape(lambda: net.init(jax.random.key(0), x[:1])),
                                   backbone="efficientnet_lite0")
  logits, _ = jax.jit(net.apply)(variables, jnp.asarray(x))
  # The Lite weights were trained on (pixel - 127) / 128; x is ImageNet mean/std-normalised.
  pixels = np.asarray(augment.denormalize(jnp.asarray(x)))
  with torch.no_grad():
    want = ref(torch.from_numpy((pixels - 127.0) / 128.0).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone,frozen", [("resnet18", 2), ("efficientnet_lite0", 3)])
def test_frozen_stages_get_no_gradient_and_keep_their_statistics(backbone, frozen):
  net = models.RetrievalNet(5, enhance=True, width=0.125, backbone=backbone, frozen_stages=frozen,
                            depth=0.5)
  v = filled_variables(net)
  mask = net.trainable_mask(v["params"])
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 32, 32, 3)), jnp.float32)

  def loss(params):
    (logits, _), updates = net.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                     train=True, mutable=["batch_stats"])
    return jnp.sum(logits ** 2), updates["batch_stats"]

  grads, stats = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
  stage_of = models.retrieval_net.make_backbone(net, parent=None).module_stage
  for name, sub in grads["backbone"].items():
    frozen_here = stage_of(name) <= frozen  # the stem (stage 0) and the first `frozen` stages
    norm = float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(sub)))
    assert all(not m for m in jax.tree.leaves(mask["backbone"][name])) == frozen_here, name
    assert (norm == 0.0) == frozen_here, (name, norm)
    if name in stats["backbone"]:
      unchanged = all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(stats["backbone"][name]), jax.tree.leaves(v["batch_stats"]["backbone"][name])))
      assert unchanged == frozen_here, name
  assert all(jax.tree.leaves(mask["classifier"])) and all(jax.tree.leaves(mask["enhancement"]))
  with pytest.raises(ValueError, match="frozen_stages must be in 0..4"):
    abstract_variables(models.RetrievalNet(5, width=0.125, frozen_stages=5))


def test_enhancement_block_takes_its_channels_from_the_backbone():
  net = models.EfficientNetLite0ITiny(num_classes=7, hash_bits=12)
  v = abstract_variables(net)
  channels = efficientnet.round_filters(1280, 0.125)
  assert v["params"]["enhancement"]["project"]["kernel"].shape[-1] == channels
  logits, out = jax.eval_shape(lambda v: net.apply(v, jnp.zeros((3, 32, 32, 3))), v)
  assert logits.shape == (3, 7) and out["hash"].shape == (3, 12)
  assert out["pooled"].shape == (3, channels)
