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
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

# torch/serialization.py's constants for the legacy stream.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

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


class _StorageType:
  """Stand-in for a torch storage class: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
  """One storage of the file: raw bytes, filled when the format provides them."""

  def __init__(self, dtype, numel: int):
    self.dtype, self.numel, self.data = dtype, int(numel), None

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

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
  """A tensor as the pickle describes it: a strided view of a storage."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def materialise(self, big_endian: bool) -> np.ndarray:
    flat = self.storage.array(big_endian)
    if not self.size:
      values = flat[self.offset:self.offset + 1].reshape(())
    else:
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
      if any(n == 0 for n in self.size):
        values = np.zeros(self.size, flat.dtype)
      elif last >= len(flat) or self.offset < 0:
        raise ValueError("a tensor reaches past the end of its storage; the file is corrupt.")
      else:
        values = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.size, tuple(s * flat.itemsize for s in self.stride))
    values = np.array(values)  # an owned, native-order copy
    values = values.astype(values.dtype.newbyteorder("="))
    if self.storage.dtype == "bfloat16":
      values = (values.astype(np.uint32) << 16).view(np.float32)
    return values


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: nothing to keep
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, *unused):
  del requires_grad, backward_hooks, unused
  if isinstance(storage, _Storage) and storage.dtype == np.uint8 and dtype != np.uint8:
    # Untyped storage: the tensor says what its bytes are.
    storage.dtype = dtype
    storage.numel = storage.numel // storage.itemsize
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused  # requires_grad, backward hooks, python state
  return data


def _torch_size(values=()):
  return tuple(values)


def _allowed_global(module: str, name: str):
  """The stand-in for an allowed global, or None."""
  if module == "collections" and name == "OrderedDict":
    return collections.OrderedDict
  if module == "torch._utils":
    return {"_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor,
            "_rebuild_tensor_v3": _rebuild_tensor_v3, "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter}.get(name)
  if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
    return _StorageType(name)
  if module == "torch" and name in TORCH_DTYPES:
    return TORCH_DTYPES[name]
  if module == "torch" and name == "Size":
    return _torch_size
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
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
      raise ValueError(f"{self._path} holds a persistent object {pid!r:.60} that is not a "
                       "tensor storage; it is not a checkpoint of tensors.")
    storage_type, key = pid[1], _ascii(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"{self._path}: storage {key!r} has no known tensor type.")
    return self._storage_for(key, storage_type.dtype, int(pid[4]))


def _ascii(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _resolve(obj, big_endian: bool):
  """Tensor references -> arrays throughout dicts, lists and tuples."""
  if isinstance(obj, _TensorRef):
    return obj.materialise(big_endian)
  if isinstance(obj, Mapping):
    return type(obj)((k, _resolve(v, big_endian)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, big_endian) for v in obj)
  return obj


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
      raise ValueError(f"{path} is a zip archive without <name>/data.pkl; it is not a torch "
                       "checkpoint (a TorchScript archive, or another kind of file).")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
    storages = {}

    def storage_for(key, dtype, numel):
      if key not in storages:
        storage = _Storage(dtype, numel)
        record = f"{prefix}data/{key}"
        if record not in names:
          raise ValueError(f"{path} lacks the record {record}; the file is truncated or corrupt.")
        storage.data = archive.read(record)
        storages[key] = storage
      return storages[key]

    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), path, storage_for).load()
  return _resolve(obj, byteorder == "big")


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
  for key in _PlainUnpickler(f, path).load():
    storage = storages.get(_ascii(key))
    if storage is None:
      raise ValueError(f"{path} lists storage {key!r} that no tensor uses; the file is corrupt.")
    count_bytes = f.read(8)
    if len(count_bytes) < 8:
      raise ValueError(f"{path} ends before the bytes of storage {key!r}; it is truncated.")
    (count,) = struct.unpack("<q" if not big_endian else ">q", count_bytes)
    storage.data = f.read(count * storage.itemsize)
  return _resolve(obj, big_endian)


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
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, "rb") as f:
    try:
      return _load_legacy(path, f)
    except (pickle.UnpicklingError, EOFError, struct.error) as e:
      raise ValueError(f"{path} is not a readable torch checkpoint ({e}); it may be truncated "
                       "or not a .pth file at all.") from e


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
