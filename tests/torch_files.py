"""Writes PyTorch checkpoint files by hand, without torch, for the tests of the torch-free reader.

Both formats torch writes: the zip archive (torch >= 1.6) and the legacy
stream. The pickle names torch's globals (`torch._utils._rebuild_tensor_v2`,
`torch.FloatStorage`, ...) exactly as torch.save does, through a Pickler that
writes a GLOBAL opcode for stand-in functions instead of importing the module.
`extra` puts any other global into the file, to check that it is refused.
"""

import collections
import io
import pickle
import struct
import types
import zipfile

import numpy as np

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


def named_global(module: str, name: str):
  """A function that pickles as GLOBAL module.name and must never be called."""
  def stand_in(*args):
    raise AssertionError(f"{module}.{name} was called while writing")
  stand_in.__module__, stand_in.__qualname__, stand_in.__name__ = module, name, name
  return stand_in


class _Storage:
  def __init__(self, key: str, array: np.ndarray, numel=None):
    self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)
    self.numel = self.array.size if numel is None else numel  # what the pickle declares


class _Tensor:
  def __init__(self, storage: _Storage, shape, strides, offset=0):
    self.storage, self.shape, self.strides, self.offset = storage, shape, strides, offset

  def __reduce__(self):
    return (named_global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.shape, self.strides, False,
             collections.OrderedDict()))


class _Call:
  """Pickles as a call of any global with arguments: a checkpoint that would run code."""

  def __init__(self, module, name, args):
    self.module, self.name, self.args = module, name, args

  def __reduce__(self):
    return named_global(self.module, self.name), self.args


class _Writer(pickle._Pickler):  # pylint: disable=protected-access  (the Python pickler)
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def save_global(self, obj, name=None):
    self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[types.FunctionType] = save_global

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    storage_type = named_global("torch", _STORAGE_NAMES[obj.array.dtype])
    record = ("storage", storage_type, obj.key, "cpu", obj.numel)
    return record + (None,) if self.legacy else record


def _tensors(state: dict):
  """{name: array} -> ({name: _Tensor}, [storages]) with C-order strides."""
  storages, tensors = [], collections.OrderedDict()
  for i, (name, array) in enumerate(state.items()):
    array = np.asarray(array)
    storage = _Storage(str(i), array)
    storages.append(storage)
    strides = tuple(s // array.itemsize for s in np.ascontiguousarray(array).strides)[:array.ndim]
    tensors[name] = _Tensor(storage, tuple(array.shape), strides)
  return tensors, storages


def _pickle(obj, legacy: bool) -> bytes:
  buf = io.BytesIO()
  _Writer(buf, legacy).dump(obj)
  return buf.getvalue()


def write_zip(path, state: dict, extra=None, wrap: str | None = None) -> None:
  """torch.save's zip format; `extra` = (module, name, args) adds a call of that global."""
  tensors, storages = _tensors(state)
  obj = tensors if wrap is None else {wrap: tensors}
  if extra is not None:
    obj = dict(obj, payload=_Call(*extra))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", _pickle(obj, legacy=False))
    z.writestr("archive/byteorder", "little")
    for s in storages:
      z.writestr(f"archive/data/{s.key}", s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
    z.writestr("archive/version", "3\n")


def write_legacy(path, state: dict, extra=None, truncate: int = 0) -> None:
  """torch.save's legacy format (_use_new_zipfile_serialization=False); `truncate` drops bytes."""
  tensors, storages = _tensors(state)
  obj = tensors if extra is None else dict(tensors, payload=_Call(*extra))
  out = io.BytesIO()
  for header in (0x1950A86A20F9469CFC6C, 1001,
                 {"protocol_version": 1001, "little_endian": True,
                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
    pickle.dump(header, out, protocol=2)
  out.write(_pickle(obj, legacy=True))
  pickle.dump([s.key for s in storages], out, protocol=2)
  for s in storages:
    out.write(struct.pack("<q", s.array.size))
    out.write(s.array.tobytes())
  data = out.getvalue()
  with open(path, "wb") as f:
    f.write(data[:len(data) - truncate] if truncate else data)


def lite_state_dict(net, seed: int = 0, image_shape=(1, 32, 32, 3)) -> dict:
  """Random weights in lukemelas' layout for the EfficientNet-Lite `net` (a RetrievalNet).

  Names and shapes follow the importer's mapping (the real ImageNet file and
  the reference-logits test check that mapping); values are NumPy draws.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fgir_jax.models import efficientnet_import  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(image_shape)))
  rng = np.random.default_rng(seed)
  state = {}
  for name, collection, path in efficientnet_import._backbone_mapping(  # pylint: disable=protected-access
      shapes["params"]["backbone"]):
    leaf = shapes[collection]
    for key in path:
      leaf = leaf[key]
    shape = tuple(leaf.shape)
    if len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    if name.endswith("running_var"):
      state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif name.endswith(".weight") and len(shape) == 1:
      state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 10
      state[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
  return state


# ----------------------------------------------------------------------------
# Crafted files: what a hostile or broken checkpoint can declare.
# ----------------------------------------------------------------------------
class View:
  """A tensor over a storage of `values`, at any offset, sizes and strides; `numel` overrides
  the storage's element count the pickle declares, `count` the legacy stream's."""

  def __init__(self, values, size, stride, offset=0, numel=None, count=None):
    self.values, self.size, self.stride, self.offset = np.asarray(values), size, stride, offset
    self.numel, self.count = numel, count


def write_views(path, views: dict, legacy=False, deflate=False) -> None:
  """A checkpoint of crafted views {name: View}, each over its own storage."""
  storages, tensors = [], collections.OrderedDict()
  for i, (name, view) in enumerate(views.items()):
    storage = _Storage(str(i), view.values, view.numel)
    storages.append(storage)
    tensors[name] = _Tensor(storage, tuple(view.size), tuple(view.stride), view.offset)
  if legacy:
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                                   "little_endian": True}):
      pickle.dump(header, out, protocol=2)
    out.write(_pickle(tensors, legacy=True))
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s, view in zip(storages, views.values()):
      out.write(struct.pack("<q", s.array.size if view.count is None else view.count))
      out.write(s.array.tobytes())
    with open(path, "wb") as f:
      f.write(out.getvalue())
    return
  kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
  with zipfile.ZipFile(path, "w", kind) as z:
    z.writestr("archive/data.pkl", _pickle(tensors, legacy=False))
    z.writestr("archive/byteorder", "little")
    for s in storages:
      z.writestr(f"archive/data/{s.key}", s.array.tobytes())


def write_pickle(path, data: bytes) -> None:
  """A zip checkpoint whose data.pkl is `data`, raw pickle bytes."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", data)
    z.writestr("archive/byteorder", "little")
