"""Conversion between `fgir_jax.index.HammingIndex` and faiss binary indexes (flat, HNSW, IVF).

faiss is optional: it is imported only inside these functions, and without it
they raise one ImportError that says how to install it.
"""

from __future__ import annotations

import math
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np

from fgir_jax import _validate
from fgir_jax.index import HammingIndex
from fgir_jax.topk import check_positive

FAISS_KINDS = ("flat", "hnsw", "ivf")
_FAISS_HINT = ("faiss is not installed: pip install faiss-cpu (or fgir_jax[faiss]) "
               "to use the faiss helpers.")



def to_faiss(index: HammingIndex, kind: str = "flat", **opts):
  """The index's codes in a faiss binary index (labels and paths stay behind).

  Args:
    index: a HammingIndex whose code length is a multiple of 8 (faiss's rule).
    kind: "flat" (IndexBinaryFlat: exact), "hnsw" (IndexBinaryHNSW; options
      M=32, ef_construction, ef_search) or "ivf" (IndexBinaryIVF trained on the
      codes; options nlist=round(sqrt(n)), nprobe=min(nlist, 16)).
  Returns:
    The faiss index; faiss ids are the HammingIndex ids.
  """
  faiss = _import_faiss()
  _validate.check_choice(kind, FAISS_KINDS, "kind")
  allowed = {"flat": (), "hnsw": ("M", "ef_construction", "ef_search"),
             "ivf": ("nlist", "nprobe")}[kind]
  unknown = sorted(set(opts) - set(allowed))
  if unknown:
    raise ValueError(
        f"to_faiss(kind={kind!r}) got unknown options {', '.join(unknown)}; "
        f"it accepts {', '.join(allowed) or 'none'}.")
  if index.bits % 8:
    raise ValueError(
        f"faiss binary indexes need a code length that is a multiple of 8, got {index.bits} bits; "
        "train 8k-bit codes (e.g. 16, 32, 48, 64) to export them.")
  codes, bits = index.codes, index.bits
  if kind == "flat":
    out = faiss.IndexBinaryFlat(bits)
  elif kind == "hnsw":
    out = faiss.IndexBinaryHNSW(bits, check_positive(opts.get("M", 32), "M"))
    if "ef_construction" in opts:
      out.hnsw.efConstruction = check_positive(opts["ef_construction"], "ef_construction")
    if "ef_search" in opts:
      out.hnsw.efSearch = check_positive(opts["ef_search"], "ef_search")
  else:
    out = _faiss_ivf(faiss, codes, bits, opts)
  if len(codes):
    out.add(np.ascontiguousarray(codes))
  return out


def _faiss_ivf(faiss, codes: np.ndarray, bits: int, opts: dict):
  """An IndexBinaryIVF trained on `codes` (not yet filled)."""
  n = codes.shape[0]
  nlist = check_positive(opts.get("nlist", max(1, round(math.sqrt(n)))), "nlist")
  if nlist > n:
    raise ValueError(
        f"an IVF index with nlist={nlist} needs at least {nlist} codes to train on, the index "
        f"holds {n}; add codes or pass a smaller nlist.")
  quantizer = faiss.IndexBinaryFlat(bits)
  out = faiss.IndexBinaryIVF(quantizer, bits, nlist)  # keeps a reference to quantizer
  out.train(np.ascontiguousarray(codes))
  out.nprobe = check_positive(opts.get("nprobe", min(nlist, 16)), "nprobe")
  return out


def from_faiss(faiss_index, labels=None, paths: Sequence[str] | None = None,
               class_names: Sequence[str] | None = None) -> HammingIndex:
  """A HammingIndex holding a faiss binary index's codes (ids 0..n-1, as
  faiss's `add` numbers them); labels, paths and class names as in `add`.

  Flat indexes are read directly, HNSW through their flat storage, IVF with
  `reconstruct_n` (a direct map is made for the call and dropped after, so the
  faiss index is left as it was).
  """
  faiss = _import_faiss()
  if not isinstance(faiss_index, faiss.IndexBinary):
    raise ValueError(
        "from_faiss needs a faiss binary index (IndexBinaryFlat, IndexBinaryHNSW or "
        f"IndexBinaryIVF), got {type(faiss_index).__name__}.")
  index = HammingIndex(faiss_index.d, class_names=class_names)
  index.add(_faiss_codes(faiss, faiss_index), labels=labels, paths=paths)
  return index


def _faiss_codes(faiss, index) -> np.ndarray:
  """(ntotal, d / 8) uint8 codes of a faiss binary index."""
  n, nbytes = index.ntotal, index.d // 8
  if n == 0:
    return np.zeros((0, nbytes), np.uint8)
  if isinstance(index, faiss.IndexBinaryHNSW):
    index = faiss.downcast_IndexBinary(index.storage)
  if isinstance(index, faiss.IndexBinaryFlat):
    return faiss.vector_to_array(index.xb).reshape(n, nbytes)
  if isinstance(index, faiss.IndexBinaryIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
    index.make_direct_map()
    try:
      return index.reconstruct_n(0, n)
    finally:
      index.set_direct_map_type(faiss.DirectMap.NoMap)
  return index.reconstruct_n(0, n)


def write_faiss(index: HammingIndex, path, kind: str = "flat", **opts) -> pathlib.Path:
  """Writes `to_faiss(index, kind, **opts)` with faiss.write_index_binary (atomically)."""
  faiss = _import_faiss()
  out = to_faiss(index, kind, **opts)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    faiss.write_index_binary(out, tmp)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def read_faiss(path, labels=None, paths: Sequence[str] | None = None,
               class_names: Sequence[str] | None = None) -> HammingIndex:
  """Reads a faiss binary index file into a HammingIndex (see `from_faiss`)."""
  faiss = _import_faiss()
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no faiss index file at {path}; write one with write_faiss.")
  try:
    index = faiss.read_index_binary(str(path))
  except RuntimeError as e:
    raise ValueError(f"{path} is not a faiss binary index file ({e}).") from e
  return from_faiss(index, labels=labels, paths=paths, class_names=class_names)


def _import_faiss():
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_FAISS_HINT) from e
  return faiss


