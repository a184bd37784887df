"""An index of binary codes with their labels and image paths, searchable by Hamming distance.

* `pack_codes` / `unpack_codes`: (n, bits) codes in {0,1} / {-1,+1} / bool <->
  (n, ceil(bits / 8)) uint8 bytes, as `np.packbits(bits, axis=1)` writes them.
* `HammingIndex`: codes plus labels, image paths and class names; `add`,
  `search`, `save` (one .npz plus a readable .json) and `load`.
The exact top-k kernel the search runs is `fgir_jax.topk.hamming_topk`; the
conversions to and from faiss binary indexes are in `fgir_jax.faiss_export`.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
import jax

from fgir_jax import _validate
from fgir_jax import codes as codes_lib
from fgir_jax.topk import Database, check_positive

_FORMAT = "fgir_jax.HammingIndex"
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------


def pack_codes(codes) -> np.ndarray:
  """(n, bits) codes in {0,1}, {-1,+1} or bool -> (n, ceil(bits / 8)) uint8.

  The bit is `code > 0`; the first bit goes to the high bit of the first byte
  and a length that is not a multiple of 8 is padded with zero bits
  (np.packbits' layout, which faiss binary indexes use as well).
  """
  codes = _host_codes(codes, "codes")
  if codes_lib.is_packed(codes):
    raise ValueError(
        "codes are packed already (uint8 values above 1); use them as they are, "
        "or unpack_codes(codes, bits) for the bits.")
  return np.packbits(codes_lib.unpacked_bits(codes, "codes"), axis=1)


def unpack_codes(packed, bits: int) -> np.ndarray:
  """(n, bytes) packed uint8 -> (n, bits) uint8 in {0, 1}; inverse of `pack_codes`."""
  packed = _host_codes(packed, "packed")
  bits = _check_bits(bits)
  _check_packed(packed, bits, "packed")
  return np.unpackbits(packed, axis=1, count=bits)


def _host_codes(codes, name: str) -> np.ndarray:
  """A 2-d host array, or a clear error."""
  _validate.check_ndim(
      codes, 2, name, "a 2-d array (n, bits) of codes or (n, bytes) of packed uint8")
  if not _validate.is_concrete(codes):
    raise ValueError(f"{name} is a traced value; call this function outside jax.jit.")
  return np.asarray(codes)


def _check_bits(bits) -> int:
  return check_positive(bits, "bits")


def _check_packed(packed: np.ndarray, bits: int, name: str) -> None:
  """uint8 bytes, as many as `bits` needs, with the padding bits zero."""
  if packed.dtype != np.uint8:
    raise ValueError(
        f"{name} must be packed uint8 bytes (from pack_codes or np.packbits), "
        f"got dtype {packed.dtype}.")
  nbytes = -(-bits // 8)
  if packed.shape[1] != nbytes:
    raise ValueError(
        f"{name} has {packed.shape[1]} bytes per code but {bits}-bit codes take {nbytes}; "
        "pass the code length the bytes were packed from.")
  spare = 8 * nbytes - bits
  if spare and packed.size and np.any(packed[:, -1] & np.uint8((1 << spare) - 1)):
    raise ValueError(
        f"{name} has bits set beyond bit {bits} (the zero padding of the last byte); "
        "pack the codes with pack_codes or np.packbits, or pass the full code length.")



class HammingIndex:
  """Binary codes with their labels and image paths, searchable by Hamming distance.

  Codes are kept packed, (n, ceil(bits / 8)) uint8, in the order they were
  added; a code's position is its id in search results. Labels default to -1
  (unlabelled) and paths to "".

    index = HammingIndex(64, class_names=names)
    index.add(db_codes, labels=db_labels, paths=db_paths)
    distances, ids = index.search(query_codes, k=10)
    index.save("runs/cub_index")          # cub_index.npz + cub_index.json
    index = HammingIndex.load("runs/cub_index")
  """

  def __init__(self, bits: int, class_names: Sequence[str] | None = None):
    self.bits = _check_bits(bits)
    self.class_names = _check_class_names(class_names)
    self._codes = np.zeros((0, -(-self.bits // 8)), np.uint8)
    self._labels = np.zeros((0,), np.int64)
    self._paths: list[str] = []
    self._cache = None  # ((k, chunk_size), _Database): the device layout of the last search

  @property
  def codes(self) -> np.ndarray:
    """(n, bytes) packed uint8 codes (read-only)."""
    view = self._codes.view()
    view.flags.writeable = False
    return view

  @property
  def labels(self) -> np.ndarray:
    """(n,) int64 class ids, -1 where none was given (read-only)."""
    view = self._labels.view()
    view.flags.writeable = False
    return view

  @property
  def paths(self) -> list[str]:
    """Image path per code ("" where none was given); a copy."""
    return list(self._paths)

  def __len__(self) -> int:
    return self._codes.shape[0]

  def __repr__(self) -> str:
    return (f"HammingIndex(bits={self.bits}, size={len(self)}, "
            f"classes={len(np.unique(self._labels[self._labels >= 0]))})")

  def add(self, codes, labels=None, paths: Sequence[str] | None = None) -> None:
    """Appends codes (and their labels and paths) after the ones already held.

    Args:
      codes: (n, bits) in {0,1}, {-1,+1} or bool, or (n, ceil(bits / 8))
        packed uint8 (from pack_codes or np.packbits); NumPy or JAX.
      labels: (n,) integer class ids, or None for -1 (unlabelled).
      paths: n strings (image paths), or None for "".
    """
    packed = self._packed(codes, "codes")
    n = packed.shape[0]
    if labels is None:
      labels = np.full((n,), -1, np.int64)
    else:
      _validate.check_labels(labels, n, "labels", against="codes")
      labels = np.asarray(labels).astype(np.int64)
    paths = [""] * n if paths is None else _check_paths(paths, n)
    self._codes = np.concatenate([self._codes, packed])
    self._labels = np.concatenate([self._labels, labels])
    self._paths.extend(paths)
    self._cache = None

  def search(self, query_codes, k: int = 10, *, chunk_size: int | None = None):
    """The k nearest codes to each query; see `hamming_topk`.

    Args:
      query_codes: (n_q, bits) codes or (n_q, bytes) packed uint8, like `add`.
      k: neighbours per query; a k above the index size is cut to it.
      chunk_size: database codes per scanned chunk (default 2**20).
    Returns:
      (distances, ids), each (n_q, min(k, len(self))) int32, sorted by
      ascending distance and, within equal distances, by id. Look up
      `labels[ids]` and `[paths[i] for i in ids[q]]` for the neighbours.
    """
    k = check_positive(k, "k")
    if not len(self):
      raise ValueError("the index is empty; add codes before searching.")
    queries = self._packed(query_codes, "query_codes")
    k = min(k, len(self))
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.int32)
    # The device layout depends on k and chunk_size; repeated searches reuse it.
    key = (k, chunk_size)
    if self._cache is None or self._cache[0] != key:
      self._cache = (key, Database(self._codes, 8 * self._codes.shape[1], k, chunk_size))
    return self._cache[1].search(queries, None)

  def save(self, path) -> pathlib.Path:
    """Writes `<path>.npz` (the data) and `<path>.json` (readable metadata).

    A ".npz" suffix on `path` is optional. Each file is written to a
    temporary name and renamed, so a crash never leaves a half-written index.
    Returns the .npz path.
    """
    data_path, meta_path = _index_paths(path)
    arrays = {
        "format": np.array(_FORMAT), "version": np.array(_FORMAT_VERSION),
        "bits": np.array(self.bits), "codes": self._codes, "labels": self._labels,
        "paths": np.array(self._paths, dtype=str),
        "class_names": np.array(self.class_names or [], dtype=str),
        "has_class_names": np.array(self.class_names is not None),
    }
    _atomic_write(data_path, lambda f: np.savez(f, **arrays))
    meta = json.dumps(self._metadata(data_path.name), indent=2, ensure_ascii=False)
    _atomic_write(meta_path, lambda f: f.write(meta.encode("utf-8")))
    return data_path

  @classmethod
  def load(cls, path) -> "HammingIndex":
    """Reads an index written by `save` (the .npz; the .json is not needed)."""
    data_path, _ = _index_paths(path)
    if not data_path.is_file():
      raise FileNotFoundError(
          f"no HammingIndex file at {data_path}; write one with HammingIndex.save(path).")
    try:
      with np.load(data_path, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    except Exception as e:  # not a zip, truncated, pickled objects, ...
      raise ValueError(
          f"{data_path} is not a HammingIndex file ({type(e).__name__}: {e}); "
          "load files written by HammingIndex.save.") from e
    _check_saved(arrays, data_path)
    names = [str(x) for x in arrays["class_names"]] if bool(arrays["has_class_names"]) else None
    index = cls(int(arrays["bits"]), class_names=names)
    _check_packed(arrays["codes"], index.bits, f"codes in {data_path}")
    index._codes = np.ascontiguousarray(arrays["codes"])
    index._labels = arrays["labels"].astype(np.int64)
    index._paths = [str(x) for x in arrays["paths"]]
    if not len(index._labels) == len(index._paths) == len(index):
      raise ValueError(
          f"{data_path} holds {len(index)} codes but {len(index._labels)} labels and "
          f"{len(index._paths)} paths; the file is damaged, save the index again.")
    return index

  def _packed(self, codes, name: str) -> np.ndarray:
    """Codes in any accepted format -> (n, bytes) packed uint8, or a clear error."""
    codes = _host_codes(codes, name)
    width, nbytes = codes.shape[1], self._codes.shape[1]
    # A uint8 array as wide as the packed bytes is packed, unless it is also as
    # wide as the bits (1-bit codes) and holds only 0s and 1s.
    packed = codes.dtype == np.uint8 and width == nbytes
    if packed and (width != self.bits or codes_lib.is_packed(codes)):
      _check_packed(codes, self.bits, name)
      return np.ascontiguousarray(codes)
    if width == self.bits:
      return np.packbits(codes_lib.unpacked_bits(codes, name), axis=1)
    raise ValueError(
        f"{name} has {width} columns but the index holds {self.bits}-bit codes; pass "
        f"(n, {self.bits}) codes or (n, {nbytes}) packed uint8 bytes.")

  def _metadata(self, data_name: str) -> dict:
    from fgir_jax import __version__  # pylint: disable=import-outside-toplevel
    labels, counts = np.unique(self._labels, return_counts=True)
    names = self.class_names
    classes = []
    for label, count in zip(labels.tolist(), counts.tolist()):
      entry = {"label": label, "count": count}
      if names is not None and 0 <= label < len(names):
        entry["name"] = names[label]
      classes.append(entry)
    return {
        "format": _FORMAT, "version": _FORMAT_VERSION, "data_file": data_name,
        "bits": self.bits, "bytes_per_code": int(self._codes.shape[1]), "size": len(self),
        "classes": classes, "class_names": names,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_with": {"fgir_jax": __version__, "jax": jax.__version__, "numpy": np.__version__},
    }


def _check_class_names(names) -> list[str] | None:
  if names is None:
    return None
  if isinstance(names, (str, bytes)) or not all(isinstance(x, str) for x in names):
    raise ValueError("class_names must be a sequence of strings (one per class id), or None.")
  return list(names)


def _check_paths(paths, n: int) -> list[str]:
  if isinstance(paths, (str, bytes)):
    raise ValueError("paths must be a sequence of strings, one per code, not a single string.")
  paths = [str(p) if isinstance(p, os.PathLike) else p for p in paths]
  if len(paths) != n or not all(isinstance(p, str) for p in paths):
    raise ValueError(f"paths must be {n} strings (one per code), got {len(paths)} items.")
  return paths


def _index_paths(path) -> tuple[pathlib.Path, pathlib.Path]:
  """(data .npz, metadata .json) for a user path with or without ".npz"."""
  data = pathlib.Path(path)
  if data.suffix != ".npz":
    data = data.with_name(data.name + ".npz")
  return data, data.with_suffix(".json")


def _atomic_write(path: pathlib.Path, write) -> None:
  """Calls write(binary file) on a temporary file next to `path`, then renames it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _check_saved(arrays: dict, data_path) -> None:
  """The keys and format tag `save` writes, or a clear error."""
  needed = (
      "format", "version", "bits", "codes", "labels", "paths", "class_names", "has_class_names")
  missing = [name for name in needed if name not in arrays]
  if missing or str(arrays["format"]) != _FORMAT:
    what = f"missing {', '.join(missing)}" if missing else f"format {str(arrays['format'])!r}"
    raise ValueError(
        f"{data_path} is not a HammingIndex file ({what}); "
        "load files written by HammingIndex.save.")
  if int(arrays["version"]) > _FORMAT_VERSION:
    raise ValueError(
        f"{data_path} is format version {int(arrays['version'])}, newer than this fgir_jax "
        f"reads ({_FORMAT_VERSION}); upgrade fgir_jax.")
