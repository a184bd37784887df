"""Weight files that lie: the readers bound every size a file declares before touching memory.

Each crafted file below is a case found by hand (the issue that asked for
this lists them); the dangerous ones are read by a worker process that limits
its memory (RLIMIT_AS: what it maps plus 256 MiB) and time per file, where the
only outcomes allowed are a correct load or one ValueError. The fuzz tests
then draw hundreds of crafted tensors and mutated real files (hypothesis);
FGIR_JAX_FUZZ_EXAMPLES sets how many (default 150 per test).
"""

import json
from struct import error as struct_error
import os
import pickle
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from fgir_jax.models import npz_file
from fgir_jax.models import torch_checkpoint

from torch_files import View, write_legacy, write_pickle, write_views, write_zip

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = int(os.environ.get("FGIR_JAX_FUZZ_EXAMPLES", "150"))


class Reader:
  """tests/reader_worker.py: each file loaded in a forked child under memory and time limits."""

  def __init__(self, headroom_mb=256, seconds=10):
    self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "reader_worker.py"),
                                  str(headroom_mb), str(seconds)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def __call__(self, path) -> dict:
    self.proc.stdin.write(f"{path}\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def limited():
  reader = Reader()
  yield reader
  reader.close()


def _refused(result, *words):
  assert result["outcome"] == "ValueError", result
  for word in words:
    assert word in result["message"], (word, result["message"])


# ----------------------------------------------------------------------------
# The cases found by hand.
# ----------------------------------------------------------------------------
def test_a_negative_stride_is_refused_not_read_before_the_buffer(tmp_path, limited):
  # 4 values viewed as (32, 3, 3, 3) from the last one backwards: memory before the storage.
  path = tmp_path / "neg.pth"
  write_views(path, {"_conv_stem.weight": View(np.arange(4, dtype=np.float32), (32, 3, 3, 3),
                                               (-1, -1, -1, -1), offset=3)})
  _refused(limited(path), "out of range")
  proc = subprocess.run([sys.executable, "-m", "fgir_jax.models.convert_weights", str(path),
                         str(tmp_path / "out.npz")], capture_output=True, text=True,
                        cwd=os.path.dirname(HERE))
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
  assert proc.stderr.startswith("convert_weights: error: ") and "out of range" in proc.stderr
  assert not (tmp_path / "out.npz").exists()


def test_a_view_larger_than_its_storage_is_refused_before_allocating(tmp_path, limited):
  # A 400-byte file asking for 65536 x 65536 floats (16 GiB) through zero strides.
  path = tmp_path / "huge.pth"
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (65536, 65536), (0, 0))})
  _refused(limited(path), "views a storage of 4")
  path = tmp_path / "past.pth"
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (5,), (1,))})
  _refused(limited(path), "views a storage of 4")
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (2, 2), (2, 1), offset=1)})
  _refused(limited(path), "reaches element 4 of a storage of 4")


def test_a_storage_larger_than_the_file_is_refused_before_inflating(tmp_path, limited):
  # 16 MiB of zeros deflate to 16 KB: the record declares more than the whole file holds.
  path = tmp_path / "bomb.pth"
  zeros = np.zeros(4 << 20, np.float32)
  write_views(path, {"w": View(zeros, (4 << 20,), (1,))}, deflate=True)
  assert os.path.getsize(path) < (1 << 20)
  _refused(limited(path), "more than the file's")
  # The pickle declaring 2^40 elements for a 4-element storage, and a record longer than declared.
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (4,), (1,), numel=1 << 40)})
  _refused(limited(path), "more than the file's")
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (2,), (1,), numel=2)})
  _refused(limited(path), "holds 16 bytes where its tensors declare 8")


def test_a_legacy_count_is_checked_against_the_pickle_and_the_bytes_left(tmp_path, limited):
  path = tmp_path / "count.pth"
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (4,), (1,), count=1 << 40)},
              legacy=True)
  _refused(limited(path), "holds 1,099,511,627,776 elements where its tensors declared 4")
  write_views(path, {"w": View(np.arange(4, dtype=np.float32), (4,), (1,), numel=1 << 40,
                               count=1 << 40)}, legacy=True)
  _refused(limited(path), "bytes left in the file")


def test_shared_references_are_converted_once_and_nesting_is_bounded(tmp_path, limited):
  # 60 levels of [x, x]: 2^60 paths through a few hundred bytes of pickle.
  shared = []
  for _ in range(60):
    shared = [shared, shared]
  path = tmp_path / "shared.pth"
  write_pickle(path, pickle.dumps({"w": 1, "junk": shared}, protocol=2))
  start = time.time()
  assert os.path.getsize(path) < 2000 and limited(path)["outcome"] == "ValueError"  # no tensors
  assert time.time() - start < 5
  deep = []
  for _ in range(200):
    deep = [deep]
  write_pickle(path, pickle.dumps({"junk": deep}, protocol=2))
  _refused(limited(path), "more than 64 deep")


def test_build_cannot_alter_an_allowed_global_for_later_loads(tmp_path):
  ok = tmp_path / "ok.pth"
  write_zip(ok, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
  before = torch_checkpoint.load_state_dict(ok)
  state = pickle.dumps({"fn": "x"}, protocol=2)[2:-1]  # a dict, as BUILD's state
  for global_ in (b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n",
                  b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n"):
    for build in (state + b"b", b"N" + state + b"\x86b"):  # __setstate__, and slot attributes
      bad = tmp_path / "build.pth"
      write_pickle(bad, b"\x80\x02" + global_ + build + b".")
      with pytest.raises(ValueError, match="tries to change an allowed global"):
        torch_checkpoint.load(bad)
  after = torch_checkpoint.load_state_dict(ok)
  np.testing.assert_array_equal(after["w"], before["w"])


@pytest.mark.parametrize("data", [b"", b"\x80\x02", b"\x80\x02(]q\x00.", b"garbage" * 10,
                                  b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(tR.",
                                  b"\x80\x02]q\x00(K\x01h\x05e."])
def test_malformed_pickles_are_one_value_error(tmp_path, data):
  path = tmp_path / "bad.pth"
  write_pickle(path, data)
  with pytest.raises(ValueError, match="bad.pth"):
    torch_checkpoint.load_state_dict(path)
  path.write_bytes(data)  # the same bytes as a legacy stream
  with pytest.raises(ValueError):
    torch_checkpoint.load_state_dict(path)


def test_npz_refuses_pickles_lies_and_bombs(tmp_path, limited):
  np.savez(tmp_path / "objects.npz", w=np.array([{"a": 1}], dtype=object))
  _refused(limited(tmp_path / "objects.npz"), "holds Python objects")
  np.savez_compressed(tmp_path / "bomb.npz", w=np.zeros(8 << 20, np.float32))
  _refused(limited(tmp_path / "bomb.npz"), "inflates to")
  # A header declaring 2^36 floats in a record of a few bytes.
  good = tmp_path / "good.npz"
  np.savez(good, w=np.arange(3, dtype=np.float32))
  with zipfile.ZipFile(good) as z:
    member = z.read("w.npy")
  forged = member.replace(b"(3,)", b"(68719476736,)")
  with zipfile.ZipFile(tmp_path / "forged.npz", "w") as z:
    z.writestr("w.npy", forged)
  _refused(limited(tmp_path / "forged.npz"), "declares shape (68719476736,)")
  result = limited(good)
  assert result["outcome"] == "ok" and result["arrays"]["w"][:2] == [[3], "float32"]
  np.testing.assert_array_equal(npz_file.load(str(good))["w"], np.arange(3, dtype=np.float32))


# ----------------------------------------------------------------------------
# Fuzzing: crafted views and mutated real files.
# ----------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get(
    "FGIR_JAX_FUZZ_RANDOM"), suppress_health_check=[HealthCheck.too_slow])
_FUZZ_DIR = None


def _fuzz_path(name):
  global _FUZZ_DIR
  if _FUZZ_DIR is None:
    import tempfile  # pylint: disable=g-import-not-at-top
    _FUZZ_DIR = tempfile.mkdtemp(prefix="fgir_jax_fuzz_")
  return os.path.join(_FUZZ_DIR, name)


DTYPES = (np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_)
_LIMIT = 1 << 48  # the reader's bound on any size, stride, offset or count
_NUMBER = st.one_of(st.integers(0, 6), st.integers(-3, 80_000),
                    st.sampled_from([1 << 31, 1 << 40, _LIMIT, 1 << 62, -(1 << 40)]))


@st.composite
def crafted_views(draw):
  dtype = draw(st.sampled_from(DTYPES))
  n = draw(st.integers(0, 40))
  values = (np.arange(n) % 7).astype(dtype)
  ndim = draw(st.integers(0, 4))
  size = draw(st.lists(st.one_of(st.integers(0, 5), _NUMBER), min_size=ndim, max_size=ndim))
  stride = draw(st.lists(_NUMBER, min_size=ndim, max_size=draw(st.sampled_from([ndim] * 9 + [ndim + 1]))))
  offset = draw(st.one_of(st.integers(0, 8), _NUMBER))
  numel = draw(st.one_of(st.none(), st.none(), st.integers(0, 50), _NUMBER))
  count = draw(st.one_of(st.none(), st.none(), st.integers(0, 50), _NUMBER))
  return View(values, size, stride, offset, numel, count)


def _expected(view, legacy):
  """The array a correct reader returns for a crafted view, or None where it must refuse."""
  n = view.values.size
  declared = n if view.numel is None else view.numel
  count = n if view.count is None else view.count
  numbers = [declared, view.offset, *view.size, *view.stride]
  if any(not 0 <= v < _LIMIT for v in numbers) or len(view.size) != len(view.stride):
    return None
  if (declared != n if not legacy else declared > n or count != declared):
    return None  # a zip record of other than the declared bytes; a stream's count disagreeing
  numel = int(np.prod(view.size, dtype=object)) if view.size else 1
  if int(np.prod([max(a, 1) for a in view.size], dtype=object)) >= _LIMIT or numel > declared:
    return None
  if numel and view.offset + sum((a - 1) * b for a, b in zip(view.size, view.stride)) >= declared:
    return None
  if numel == 0:
    return np.zeros(view.size, view.values.dtype)
  return np.lib.stride_tricks.as_strided(view.values[view.offset:], view.size,
                                         [s * view.values.itemsize for s in view.stride]).copy()


@FUZZ
@given(view=crafted_views(), legacy=st.booleans(), deflate=st.booleans())
def test_fuzz_crafted_views_load_exactly_or_raise_value_error(limited, view, legacy, deflate):
  import hashlib  # pylint: disable=g-import-not-at-top
  path = _fuzz_path("view.pth")
  try:
    write_views(path, {"w": view}, legacy=legacy, deflate=deflate)
  except (struct_error, OverflowError):
    return  # a count the legacy stream cannot even hold (>= 2^63): nothing to read
  result = limited(path)
  want = _expected(view, legacy)
  if want is None:
    assert result["outcome"] == "ValueError", (result, vars(view))
  else:
    assert result["outcome"] == "ok", (result, vars(view))
    shape, dtype, digest = result["arrays"]["w"]
    assert (tuple(shape), dtype) == (want.shape, str(want.dtype))
    assert digest == hashlib.sha256(want.tobytes()).hexdigest()


def _real_file(legacy):
  path = _fuzz_path(f"real_{legacy}.pth")
  if not os.path.exists(path):
    rng = np.random.default_rng(0)
    state = {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "bn.running_mean": rng.normal(size=4).astype(np.float64),
             "bn.num_batches_tracked": np.array(3, np.int64)}
    (write_legacy if legacy else write_zip)(path, state)
  with open(path, "rb") as f:
    return f.read()


@FUZZ
@given(legacy=st.booleans(), data=st.data())
def test_fuzz_mutated_real_checkpoints_load_or_raise_value_error(limited, legacy, data):
  raw = bytearray(_real_file(legacy))
  for _ in range(data.draw(st.integers(1, 6))):
    at = data.draw(st.integers(0, len(raw) - 1))
    kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
    byte = data.draw(st.integers(0, 255))
    if kind == "flip":
      raw[at] ^= 1 << (byte % 8)
    elif kind == "set":
      raw[at] = byte
    elif kind == "insert":
      raw[at:at] = bytes([byte])
    else:
      del raw[at]
  raw = raw[:data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw
  path = _fuzz_path("mutated.pth")
  with open(path, "wb") as f:
    f.write(raw)
  result = limited(path)
  assert result["outcome"] in ("ok", "ValueError"), result
