"""Reads PyTorch `.pth` checkpoints without torch, and without running any code from them.

A `.pth` file is a pickle, and unpickling can call any importable function,
so `pickle.load` on a downloaded file runs whatever it names. This reader
unpickles with an allow-list: the few globals a file of tensors needs
(torch's tensor and parameter rebuild functions, its storage types and dtypes,
`collections.OrderedDict`) map to local stand-ins that build NumPy arrays;
any other global stops the load with a ValueError before anything is called.

Both of torch's formats are read:
- the zip archive of torch >= 1.6 (`<name>/data.pkl` + one record per storage
  in `<name>/data/<key>`, `<name>/byteorder`);
- the legacy stream of older versions (magic number, protocol, system info,
  the pickle, the storage keys, then each storage as an int64 element count
  followed by its bytes), as torchvision's and lukemelas' older files are.

    state = torch_checkpoint.load("resnet18-f37072fd.pth")   # {name: np.ndarray}

The file is not trusted with memory either. Before any byte is copied, every
tensor view is checked against its storage (offset, sizes and strides
non-negative and bounded; no view holds more elements than its storage; the
view's highest element inside it) and every storage against the file (its
bytes no more than the file holds; a zip record's declared inflated size
checked before it is read, and read no further; a legacy element count equal
to the one the pickle declared, and no more than the bytes left). Pickled
objects are converted once each (shared references stay shared), nested at
most `MAX_DEPTH` deep and `MAX_OBJECTS` many; the allow-listed globals are
fresh stand-ins that the pickle's BUILD opcode cannot alter. Every malformed
file raises one ValueError that names the problem.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

# torch/serialization.py's constants for the legacy stream.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# Bounds on the pickled object graph and on one tensor's shape.
MAX_DEPTH = 64
MAX_OBJECTS = 1_000_000
MAX_DIMS = 32
_MAX_INDEX = 1 << 48  # far beyond any real tensor, and no int64 overflow in offsets

# torch storage class -> NumPy dtype. bfloat16 has no NumPy dtype: its bits
# are read as uint16 and widened to float32 (exact).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
# torch dtype objects, as `_rebuild_tensor_v3` and tensor metadata name them.
TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": "bfloat16", "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _Frozen:
  """Base of the stand-ins for allow-listed globals: BUILD (which sets state or attributes on
  the object a pickle built) cannot change them."""
  __slots__ = ()

  def __setstate__(self, state):
    raise ValueError("the file tries to change an allowed global (a BUILD of it); a checkpoint "
                     "of tensors never does.")

  def __setattr__(self, name, value):
    raise ValueError("the file tries to change an allowed global (a BUILD of it); a checkpoint "
                     "of tensors never does.")


class _Callable(_Frozen):
  """An allow-listed function or class, as the pickle calls it."""
  __slots__ = ("fn",)

  def __init__(self, fn):
    object.__setattr__(self, "fn", fn)

  def __call__(self, *args):
    return self.fn(*args)


class _StorageType(_Frozen):
  """Stand-in for a torch storage class: only its dtype matters."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", STORAGE_DTYPES[name])


class _Dtype(_Frozen):
  """Stand-in for a torch dtype object (`torch.float32`)."""
  __slots__ = ("dtype",)

  def __init__(self, dtype):
    object.__setattr__(self, "dtype", dtype)


def _itemsize(dtype) -> int:
  return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _count(value, what: str, limit: int = _MAX_INDEX) -> int:
  """A non-negative int below `limit` from the file, or a ValueError naming `what`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{what} is {type(value).__name__}, not an integer; the file is corrupt.")
  if not 0 <= int(value) < limit:
    raise ValueError(f"{what} {int(value)} is out of range; the file is corrupt or crafted.")
  return int(value)


class _Storage:
  """One storage of the file: raw bytes, filled when the format provides them."""

  def __init__(self, dtype, numel: int):
    self.dtype, self.numel, self.data = dtype, numel, None

  @property
  def itemsize(self) -> int:
    return _itemsize(self.dtype)

  def array(self, big_endian: bool) -> np.ndarray:
    if self.data is None:
      raise ValueError("the checkpoint references a storage whose bytes are missing; "
                       "the file is truncated or corrupt.")
    raw_dtype = np.uint16 if self.dtype == "bfloat16" else np.dtype(self.dtype)
    raw_dtype = np.dtype(raw_dtype).newbyteorder(">" if big_endian else "<")
    need = self.numel * self.itemsize
    if len(self.data) < need:
      raise ValueError(f"a storage holds {len(self.data)} bytes where {need} are needed; "
                       "the file is truncated or corrupt.")
    return np.frombuffer(self.data, raw_dtype, count=self.numel)


class _TensorRef:
  """A tensor as the pickle describes it: a strided view of a storage, checked to lie inside it."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise ValueError("a tensor's storage is not a storage of the file; the file is corrupt.")
    size, stride = _shape(size, "size"), _shape(stride, "stride")
    if len(size) != len(stride):
      raise ValueError(f"a tensor has {len(size)} sizes but {len(stride)} strides; the file is "
                       "corrupt.")
    self.storage, self.offset = storage, _count(offset, "a tensor's storage offset")
    self.size, self.stride = size, stride

  def check(self) -> None:
    """The view inside its storage, and no larger than it (once the storage's type is known)."""
    numel = math.prod(self.size)
    if math.prod(max(n, 1) for n in self.size) >= _MAX_INDEX:  # an empty (0, 2^40, 2^40) too
      raise ValueError(f"a tensor's shape {self.size} is out of range; the file is corrupt or "
                       "crafted.")
    if numel > self.storage.numel:
      raise ValueError(f"a tensor of shape {self.size} ({numel} elements) views a storage of "
                       f"{self.storage.numel}; a checkpoint's tensors never hold more elements "
                       "than their storage.")
    if numel:
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if last >= self.storage.numel:
        raise ValueError(f"a tensor reaches element {last} of a storage of {self.storage.numel}; "
                         "the file is corrupt.")

  def materialise(self, big_endian: bool) -> np.ndarray:
    self.check()
    flat = self.storage.array(big_endian)
    if any(n == 0 for n in self.size):
      values = np.zeros(self.size, flat.dtype)
    else:
      # Checked above: offset >= 0, strides >= 0, and the last element inside `flat`.
      values = np.lib.stride_tricks.as_strided(
          flat[self.offset:], self.size, tuple(s * flat.itemsize for s in self.stride))
    values = np.array(values)  # an owned, native-order copy
    values = values.astype(values.dtype.newbyteorder("="))
    if self.storage.dtype == "bfloat16":
      values = (values.astype(np.uint32) << 16).view(np.float32)
    return values


def _shape(values, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
    raise ValueError(f"a tensor's {what} is not a tuple of at most {MAX_DIMS} integers; the "
                     "file is corrupt.")
  return tuple(_count(v, f"a tensor's {what} entry") for v in values)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: nothing to keep
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, *unused):
  del requires_grad, backward_hooks, unused
  if not isinstance(dtype, _Dtype):
    raise ValueError("a tensor's dtype is not a torch dtype; the file is corrupt.")
  if isinstance(storage, _Storage) and storage.dtype == np.uint8 and dtype.dtype != np.uint8:
    # Untyped storage: the tensor says what its bytes are.
    storage.dtype = dtype.dtype
    storage.numel = storage.numel // storage.itemsize
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused  # requires_grad, backward hooks, python state
  return data


def _torch_size(values=()):
  return tuple(values)


def _allowed_global(module: str, name: str):
  """A fresh stand-in for an allowed global, or None."""
  if module == "collections" and name == "OrderedDict":
    return _Callable(collections.OrderedDict)
  if module == "torch._utils":
    fn = {"_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor,
          "_rebuild_tensor_v3": _rebuild_tensor_v3, "_rebuild_parameter": _rebuild_parameter,
          "_rebuild_parameter_with_state": _rebuild_parameter}.get(name)
    return None if fn is None else _Callable(fn)
  if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
    return _StorageType(name)
  if module == "torch" and name in TORCH_DTYPES:
    return _Dtype(TORCH_DTYPES[name])
  if module == "torch" and name == "Size":
    return _Callable(_torch_size)
  return None


class _Unpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves globals only from the allow-list."""

  def __init__(self, file, path: str, storage_for):
    super().__init__(file)
    self._path, self._storage_for = path, storage_for

  def find_class(self, module, name):
    found = _allowed_global(module, name)
    if found is None:
      raise ValueError(
          f"{self._path} names the global {module}.{name}, which a file of tensors does not "
          "need; it was refused and nothing from the file was run. Load only checkpoints you "
          "trust, or re-save this one as a plain state dict of tensors.")
    return found

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) < 5 or not isinstance(pid[0], (str, bytes))
        or _ascii(pid[0]) != "storage"):
      raise ValueError(f"{self._path} holds a persistent object {pid!r:.60} that is not a "
                       "tensor storage; it is not a checkpoint of tensors.")
    storage_type, key = pid[1], _ascii(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"{self._path}: storage {key!r:.40} has no known tensor type.")
    numel = _count(pid[4], f"storage {key!r:.40}'s element count")
    return self._storage_for(key, storage_type.dtype, numel)


def _ascii(value) -> str:
  if isinstance(value, bytes):
    return value.decode("ascii", "replace")
  if isinstance(value, (str, int)):
    return str(value)
  raise ValueError(f"a storage key is a {type(value).__name__}; the file is corrupt.")


class _Resolver:
  """Tensor references -> arrays throughout dicts, lists and tuples, each object once.

  Shared references stay shared (a pickle can reference one list from many
  places, which a naive walk would convert again at every reference), and the
  walk stops at MAX_DEPTH levels and MAX_OBJECTS objects.
  """

  def __init__(self, path: str, big_endian: bool):
    self.path, self.big_endian = path, big_endian
    self.done = {}  # id -> (object, converted); the object is kept so ids stay unique
    self.count = 0

  def __call__(self, obj, depth: int = 0):
    if depth > MAX_DEPTH:
      raise ValueError(f"{self.path} nests objects more than {MAX_DEPTH} deep; a checkpoint of "
                       "tensors does not.")
    key = id(obj)
    if key in self.done:
      return self.done[key][1]
    self.count += 1
    if self.count > MAX_OBJECTS:
      raise ValueError(f"{self.path} holds more than {MAX_OBJECTS:,} objects; a checkpoint of "
                       "tensors does not.")
    if isinstance(obj, _TensorRef):
      out = obj.materialise(self.big_endian)
    elif isinstance(obj, Mapping):
      out = type(obj)((self(k, depth + 1), self(v, depth + 1)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
      out = type(obj)(self(v, depth + 1) for v in obj)
    elif isinstance(obj, _Frozen):
      raise ValueError(f"{self.path} holds a torch global as data, not a tensor; it is not a "
                       "checkpoint of tensors.")
    else:
      out = obj
    self.done[key] = (obj, out)
    return out


def _check_views(obj, path: str) -> None:
  """Every tensor view inside its storage, before any storage's bytes are read."""
  seen, stack = set(), [obj]
  while stack:
    item = stack.pop()
    if id(item) in seen:
      continue
    seen.add(id(item))
    if len(seen) > MAX_OBJECTS:
      raise ValueError(f"{path} holds more than {MAX_OBJECTS:,} objects; a checkpoint of "
                       "tensors does not.")
    if isinstance(item, _TensorRef):
      item.check()
    elif isinstance(item, Mapping):
      stack.extend(item.keys())
      stack.extend(item.values())
    elif isinstance(item, (list, tuple)):
      stack.extend(item)


def _load_zip(path: str):
  file_bytes = os.path.getsize(path)
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
      raise ValueError(f"{path} is a zip archive without <name>/data.pkl; it is not a torch "
                       "checkpoint (a TorchScript archive, or another kind of file).")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = _read_record(archive, prefix + "byteorder", 16, path).decode("ascii").strip()
    storages = {}

    def storage_for(key, dtype, numel):
      if key not in storages:
        storages[key] = _Storage(dtype, numel)
      return storages[key]

    data_pkl = _read_record(archive, pickles[0], file_bytes, path)
    obj = _Unpickler(io.BytesIO(data_pkl), path, storage_for).load()
    _check_views(obj, path)
    for key, storage in storages.items():
      need = storage.numel * storage.itemsize
      if need > file_bytes:
        raise ValueError(f"{path}: storage {key!r:.40} declares {need:,} bytes, more than the "
                         f"file's {file_bytes:,}; the file is corrupt or crafted.")
      record = f"{prefix}data/{key}"
      if record not in names:
        raise ValueError(f"{path} lacks the record {record}; the file is truncated or corrupt.")
      storage.data = _read_record(archive, record, need, path, exact=True)
  return _Resolver(path, byteorder == "big")(obj)


def _read_record(archive: zipfile.ZipFile, name: str, limit: int, path: str,
                 exact: bool = False) -> bytes:
  """A zip record's bytes, checked by its declared size before it is inflated: at most
  `limit` bytes (exactly `limit` when `exact`), so no record makes the reader allocate more."""
  info = archive.getinfo(name)
  if info.file_size > limit or (exact and info.file_size != limit):
    raise ValueError(f"{path}: record {name} holds {info.file_size:,} bytes where "
                     f"{'its tensors declare' if exact else 'at most'} {limit:,}; the file is "
                     "corrupt or crafted.")
  with archive.open(info) as f:
    data = f.read(limit)
  if exact and len(data) != limit:
    raise ValueError(f"{path}: record {name} is truncated.")
  return data


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy header pickles: numbers, strings, dicts and lists only."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    raise ValueError(f"{self._path} names the global {module}.{name} in its header; it was "
                     "refused and nothing from the file was run.")


def _load_legacy(path: str, f):
  header = _PlainUnpickler(f, path)
  if header.load() != LEGACY_MAGIC:
    raise ValueError(f"{path} is neither a zip archive nor a legacy torch file (no magic number).")
  if header.load() != LEGACY_PROTOCOL:
    raise ValueError(f"{path} uses an unknown legacy torch protocol.")
  sys_info = header.load()
  big_endian = isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False
  storages = {}

  def storage_for(key, dtype, numel):
    if key not in storages:
      storages[key] = _Storage(dtype, numel)
    return storages[key]

  obj = _Unpickler(f, path, storage_for).load()
  _check_views(obj, path)
  keys = _PlainUnpickler(f, path).load()
  if not isinstance(keys, (list, tuple)):
    raise ValueError(f"{path} has no list of storage keys after its pickle; it is corrupt.")
  file_bytes = os.path.getsize(path)
  for key in keys:
    storage = storages.get(_ascii(key))
    if storage is None:
      raise ValueError(f"{path} lists storage {key!r:.40} that no tensor uses; the file is "
                       "corrupt.")
    count_bytes = f.read(8)
    if len(count_bytes) < 8:
      raise ValueError(f"{path} ends before the bytes of storage {key!r:.40}; it is truncated.")
    (count,) = struct.unpack("<q" if not big_endian else ">q", count_bytes)
    left = file_bytes - f.tell()
    if count != storage.numel or count * storage.itemsize > left:
      raise ValueError(f"{path}: storage {key!r:.40} holds {count:,} elements where its tensors "
                       f"declared {storage.numel:,}, with {left:,} bytes left in the file; the "
                       "file is corrupt or crafted.")
    storage.data = f.read(count * storage.itemsize)
  return _Resolver(path, big_endian)(obj)


# What a malformed file can raise inside the readers: all become one ValueError.
_MALFORMED = (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile,
              zipfile.LargeZipFile, zlib.error, IndexError, KeyError, AttributeError, TypeError,
              OverflowError, RecursionError, UnicodeDecodeError, NotImplementedError,
              MemoryError)


def load(path: str | os.PathLike):
  """The object a torch checkpoint holds, tensors as NumPy arrays; never imports torch.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file names a global outside the allow-list (nothing from
      it is run), or it is not a torch checkpoint, or it is truncated.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist.")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, "rb") as f:
      return _load_legacy(path, f)
  except (FileNotFoundError, PermissionError):
    raise
  except _MALFORMED + (OSError,) as e:  # OSError: a zip's offsets pointing outside the file
    reason = str(e).splitlines()[0][:160] if str(e) else ""
    raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {reason}); "
                     "it may be truncated, corrupt, or not a .pth file at all.") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} of a checkpoint that holds a state dict (or {"state_dict": ...})."""
  obj = load(path)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]  # training checkpoints wrap the weights
  if not isinstance(obj, Mapping):
    raise ValueError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a state dict of tensors.")
  arrays = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not arrays:
    raise ValueError(f"{os.fspath(path)!r} holds no tensors.")
  return arrays
