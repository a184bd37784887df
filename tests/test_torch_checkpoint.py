"""The torch-free .pth reader: both of torch's formats, layouts and dtypes, and the allow-list.

Files are written by hand (tests/torch_files.py) so these run without torch;
where torch is installed the same is checked on files torch.save writes.
"""

import os
import sys

import numpy as np
import pytest

from fgir_jax import models
from fgir_jax.models import torch_checkpoint

from torch_files import write_legacy, write_zip


def sample_state():
  rng = np.random.default_rng(0)
  return {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
          "bn.running_mean": rng.normal(size=4).astype(np.float64),
          "half": rng.normal(size=(2, 5)).astype(np.float16),
          "bn.num_batches_tracked": np.array(12, np.int64),
          "mask": np.array([True, False, True]),
          "ids": np.arange(6, dtype=np.int32).reshape(2, 3)}


@pytest.mark.parametrize("writer", [write_zip, write_legacy], ids=["zip", "legacy"])
def test_hand_written_files_read_back_exactly_without_torch(tmp_path, monkeypatch, writer):
  monkeypatch.setitem(sys.modules, "torch", None)  # any torch import would fail
  state = sample_state()
  writer(tmp_path / "w.pth", state)
  loaded = torch_checkpoint.load_state_dict(tmp_path / "w.pth")
  assert list(loaded) == list(state)
  for name, array in state.items():
    assert loaded[name].dtype == array.dtype, name
    assert loaded[name].shape == array.shape, name
    np.testing.assert_array_equal(loaded[name], array)


def test_training_checkpoint_wrapping_the_state_dict_is_unwrapped(tmp_path):
  state = sample_state()
  write_zip(tmp_path / "ckpt.pth", state, wrap="state_dict")
  loaded = torch_checkpoint.load_state_dict(tmp_path / "ckpt.pth")
  np.testing.assert_array_equal(loaded["conv.weight"], state["conv.weight"])


@pytest.mark.parametrize("writer", [write_zip, write_legacy], ids=["zip", "legacy"])
def test_a_forbidden_global_is_refused_and_never_runs(tmp_path, writer):
  marker = tmp_path / "ran"
  # If the reader ran the payload, os.mkdir would create the marker directory.
  writer(tmp_path / "evil.pth", sample_state(), extra=("os", "mkdir", (str(marker),)))
  with pytest.raises(ValueError, match=r"names the global os\.mkdir.*nothing from the file was run"):
    torch_checkpoint.load(tmp_path / "evil.pth")
  assert not marker.exists()
  # The public loader refuses it the same way.
  with pytest.raises(ValueError, match=r"os\.mkdir"):
    models.load_state_dict(tmp_path / "evil.pth")


def test_truncated_and_foreign_files_are_named(tmp_path):
  write_legacy(tmp_path / "cut.pth", sample_state(), truncate=20)
  with pytest.raises(ValueError, match="truncated"):
    torch_checkpoint.load(tmp_path / "cut.pth")
  (tmp_path / "text.pth").write_text("hello, not a checkpoint")
  with pytest.raises(ValueError, match="text.pth"):
    torch_checkpoint.load(tmp_path / "text.pth")
  with pytest.raises(FileNotFoundError, match="nothere.pth"):
    torch_checkpoint.load(tmp_path / "nothere.pth")


def test_strided_and_offset_views_like_torch():
  # A transposed tensor: the stored strides are not C order.
  storage = torch_checkpoint._Storage(np.float32, 12)  # pylint: disable=protected-access
  storage.data = np.arange(12, dtype="<f4").tobytes()
  ref = torch_checkpoint._TensorRef(storage, 2, (3, 2), (1, 4))  # pylint: disable=protected-access
  expected = np.arange(12, dtype=np.float32)[2:].copy()
  expected = np.lib.stride_tricks.as_strided(expected, (3, 2), (4, 16))
  np.testing.assert_array_equal(ref.materialise(big_endian=False), expected)
  storage.data = np.arange(12, dtype=">f4").tobytes()
  np.testing.assert_array_equal(ref.materialise(big_endian=True), expected)


def test_files_written_by_torch_read_back_exactly(tmp_path):
  torch = pytest.importorskip("torch")
  state = {"w": torch.randn(3, 4), "t": torch.randn(5, 6).t(), "h": torch.randn(4).half(),
           "bf": torch.randn(7).bfloat16(), "i": torch.arange(5), "b": torch.tensor([True, False]),
           "scalar": torch.tensor(3.5), "view": torch.arange(10.0)[2:6],
           "param": torch.nn.Parameter(torch.ones(2, 2))}
  for zip_format in (True, False):
    path = os.path.join(tmp_path, f"{zip_format}.pth")
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = torch_checkpoint.load(path)
    for name, tensor in state.items():
      want = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
      assert loaded[name].shape == want.shape, name
      np.testing.assert_array_equal(loaded[name], want)
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not tensors
  with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear"):
    torch_checkpoint.load(tmp_path / "module.pth")
