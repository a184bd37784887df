"""Reads an .npz of weights without trusting it: no pickles, and no member larger than it holds.

    arrays = npz_file.load("resnet18.npz")   # {name: np.ndarray}

`np.load` allocates each array from the shape its header declares before
reading a byte, so a small crafted file can ask for gigabytes; it is only
safe with allow_pickle=False for the pickles. Here each member's header is
read first and checked against its zip record, and only then its bytes.
Only NumPy and the standard library are imported.
"""

from __future__ import annotations

import math
import zipfile
import zlib

import numpy as np

# A member of an .npz may inflate at most this many times its compressed size (weights
# compress far less; zero arrays more, but they are small), plus a MiB.
_NPZ_INFLATION = 16


def load(path: str) -> dict[str, np.ndarray]:
  """{name: array} of an .npz, each member's size checked before it is read.

  Every member must be a .npy of a plain (non-object) dtype whose header's
  shape matches the bytes its zip record declares, and a compressed record may
  inflate at most _NPZ_INFLATION times: no file makes the reader allocate more
  than it holds. A malformed file raises ValueError naming the problem.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      return {info.filename[:-len(".npy")]: _npz_member(archive, info, path)
              for info in archive.infolist()}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, TypeError, SyntaxError) as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise
    raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120] if str(e) else ''}).") from None


def _npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> np.ndarray:
  name = info.filename
  if not name.endswith(".npy"):
    raise ValueError(f"{path}: member {name!r:.60} is not a .npy array; it is not an .npz of "
                     "weights.")
  if (info.compress_type != zipfile.ZIP_STORED
      and info.file_size > _NPZ_INFLATION * info.compress_size + (1 << 20)):
    raise ValueError(f"{path}: member {name!r:.60} inflates to {info.file_size:,} bytes from "
                     f"{info.compress_size:,}; the file is crafted or corrupt.")
  with archive.open(info) as f:
    try:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
    except ValueError as e:
      raise ValueError(f"{path}: member {name!r:.60} has no valid .npy header ({e}).") from None
    if dtype.hasobject:
      raise ValueError(f"{path}: member {name!r:.60} holds Python objects (a pickle); weights "
                       "are plain numbers, and pickles are never loaded.")
    need = math.prod(shape) * dtype.itemsize
    if need > info.file_size:
      raise ValueError(f"{path}: member {name!r:.60} declares shape {shape} ({need:,} bytes) in "
                       f"a record of {info.file_size:,}; the file is truncated or crafted.")
    data = f.read(need)
  if len(data) < need:
    raise ValueError(f"{path}: member {name!r:.60} is truncated.")
  array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
  return array.astype(array.dtype.newbyteorder("="), copy=True)
