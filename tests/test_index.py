"""Tests for fgir_jax.index: packing, exact Hamming top-k, HammingIndex, faiss export.

Every search result is checked against a brute-force NumPy reference: all
distances, then a stable sort by (distance, database index). Short codes
(8 or 16 bits) over hundreds or thousands of codes make ties the rule, so the
tie order is tested, not just the distances.
"""

import json
import sys

import numpy as np
import jax.numpy as jnp
import pytest

from fgir_jax import faiss_export
from fgir_jax import topk
from fgir_jax.index import HammingIndex, pack_codes, unpack_codes
from fgir_jax.topk import hamming_topk


def brute_force(q_bits, db_bits, k):
  """(distances, indices) of the k nearest, ties in database order."""
  d = (q_bits[:, None, :].astype(bool) != db_bits[None, :, :].astype(bool)).sum(-1)
  order = np.stack([np.lexsort((np.arange(d.shape[1]), row)) for row in d])[:, :k]
  return np.take_along_axis(d, order, 1), order


def random_bits(seed, n, bits):
  return np.random.default_rng(seed).integers(0, 2, (n, bits)).astype(bool)


# ----------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 12, 24, 48, 64])
def test_pack_unpack_round_trip(bits):
  x = random_bits(bits, 7, bits)
  packed = pack_codes(x)
  assert packed.dtype == np.uint8 and packed.shape == (7, -(-bits // 8))
  np.testing.assert_array_equal(packed, np.packbits(x, axis=1))  # faiss's layout too
  np.testing.assert_array_equal(unpack_codes(packed, bits), x.astype(np.uint8))


def test_pack_accepts_signs_and_01_alike():
  x = random_bits(0, 5, 24)
  signs = np.where(x, 1.0, -1.0).astype(np.float32)
  np.testing.assert_array_equal(pack_codes(signs), pack_codes(x.astype(np.int32)))
  np.testing.assert_array_equal(pack_codes(jnp.asarray(signs)), np.packbits(x, axis=1))


def test_pack_and_unpack_reject_bad_input():
  with pytest.raises(ValueError, match="2-d"):
    pack_codes(np.ones(8))
  with pytest.raises(ValueError, match="must hold binary codes"):
    pack_codes(np.full((2, 8), 2))
  with pytest.raises(ValueError, match="packed already"):
    pack_codes(np.full((2, 1), 200, np.uint8))
  packed = pack_codes(random_bits(1, 3, 12))  # 2 bytes
  with pytest.raises(ValueError, match="2 bytes per code but 17-bit codes take 3"):
    unpack_codes(packed, 17)
  with pytest.raises(ValueError, match="beyond bit 10"):
    unpack_codes(np.full((1, 2), 255, np.uint8), 10)
  with pytest.raises(ValueError, match="bits must be a positive integer"):
    unpack_codes(packed, 0)


# ----------------------------------------------------------------------------
# hamming_topk.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k, chunk_size", [(10, None), (37, 64), (500, None)])
def test_topk_matches_brute_force_with_ties(k, chunk_size):
  # 8 bits, 500 codes: ~2 codes per (distance, query) pair would be rare; here
  # every distance level holds dozens, so the order inside ties decides.
  q, db = random_bits(1, 9, 8), random_bits(2, 500, 8)
  dist, idx = hamming_topk(q, db, k, chunk_size=chunk_size)
  ref_dist, ref_idx = brute_force(q, db, k)
  assert dist.dtype == idx.dtype == np.int32
  np.testing.assert_array_equal(dist, ref_dist)
  np.testing.assert_array_equal(idx, ref_idx)


def test_topk_formats_mix_and_k_above_database_is_cut():
  q, db = random_bits(3, 4, 12), random_bits(4, 50, 12)
  signs = jnp.asarray(np.where(q, 1, -1))
  dist, idx = hamming_topk(signs, pack_codes(db), 80)
  ref_dist, ref_idx = brute_force(q, db, 50)
  np.testing.assert_array_equal(dist, ref_dist)
  np.testing.assert_array_equal(idx, ref_idx)


def test_topk_across_group_levels_and_chunks():
  # 100,000 16-bit codes, k = 2: groups of groups (several selection levels),
  # and three database chunks with a short last one.
  assert len(topk._plan(100_000, 2, 1)) >= 2  # the case this test exists for
  q, db = random_bits(5, 12, 16), random_bits(6, 100_000, 16)
  ref = brute_force(q, db, 2)
  for chunk_size in (None, 40_000):
    found = hamming_topk(q, db, 2, chunk_size=chunk_size)
    np.testing.assert_array_equal(np.stack(found), np.stack(ref))
  one = hamming_topk(q[:1], db, 2)  # a single query takes the one-program path
  np.testing.assert_array_equal(np.stack(one), np.stack(ref)[:, :1])


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_every_method_and_backend_sizing_match_brute_force(monkeypatch, backend):
  # The search runs by group minima or by lax.top_k on (distance, index) keys,
  # sized for a CPU or a GPU, whichever the backend's table picks; every
  # combination returns the brute-force neighbours in the stable order: ties
  # by index, across database chunks, one query and many, long codes too.
  monkeypatch.setattr(topk._backend, "backend", lambda: backend)
  cases = [(random_bits(1, 9, 8), random_bits(2, 500, 8), 37, 64),
           (random_bits(3, 300, 8), random_bits(4, 700, 8), 10, None),
           (random_bits(5, 1, 16), random_bits(6, 300, 16), 5, None),
           (random_bits(7, 3, 1024), random_bits(8, 40, 1024), 50, None)]
  for method in topk.METHODS:
    for q, db, k, chunk_size in cases:
      found = hamming_topk(q, db, k, chunk_size=chunk_size, method=method)
      np.testing.assert_array_equal(np.stack(found), np.stack(brute_force(q, db, k)), method)


def test_topk_rejects_bad_arguments():
  q, db = random_bits(7, 2, 16), random_bits(8, 20, 16)
  with pytest.raises(ValueError, match="k must be a positive integer"):
    hamming_topk(q, db, 0)
  with pytest.raises(ValueError, match="16 bits but db_codes has 12"):
    hamming_topk(q, db[:, :12], 3)
  with pytest.raises(ValueError, match="method must be one of 'groups', 'top_k'"):
    hamming_topk(q, db, 3, method="heap")


# ----------------------------------------------------------------------------
# HammingIndex.
# ----------------------------------------------------------------------------


def make_index(bits=16, n=300, seed=10):
  x = random_bits(seed, n, bits)
  labels = np.random.default_rng(seed).integers(0, 4, n)
  index = HammingIndex(bits, class_names=["a", "b", "c", "d"])
  index.add(x[:100], labels=labels[:100], paths=[f"img/{i}.jpg" for i in range(100)])
  index.add(pack_codes(x[100:]), labels=labels[100:])  # packed, paths default to ""
  return index, x, labels


def test_index_add_twice_then_search_equals_brute_force():
  index, x, labels = make_index()
  assert len(index) == 300
  np.testing.assert_array_equal(index.labels, labels)
  assert index.paths[99] == "img/99.jpg" and index.paths[100] == ""
  q = random_bits(11, 9, 16)
  dist, ids = index.search(np.where(q, 1, -1), k=25)
  ref_dist, ref_ids = brute_force(q, x, 25)
  np.testing.assert_array_equal(dist, ref_dist)
  np.testing.assert_array_equal(ids, ref_ids)
  assert index.search(q, k=1000)[0].shape == (9, 300)


def test_index_rejects_wrong_code_length_and_metadata():
  index = HammingIndex(24)
  with pytest.raises(ValueError, match="23 columns but the index holds 24-bit codes"):
    index.add(random_bits(0, 3, 23))
  with pytest.raises(ValueError, match="index is empty"):
    index.search(random_bits(0, 1, 24))
  index.add(random_bits(0, 3, 24))
  with pytest.raises(ValueError, match="2 columns but the index holds 24-bit codes"):
    index.search(np.zeros((1, 2), np.uint8) + 7)
  with pytest.raises(ValueError, match="labels has 2 entries"):
    index.add(random_bits(1, 3, 24), labels=[0, 1])
  with pytest.raises(ValueError, match="paths must be 3 strings"):
    index.add(random_bits(1, 3, 24), paths=["a.jpg"])
  assert len(index) == 3  # failed adds leave the index unchanged


def test_save_load_round_trip(tmp_path):
  index, _, labels = make_index()
  saved = index.save(tmp_path / "cub" / "index")  # no suffix: .npz and .json are added
  assert saved == tmp_path / "cub" / "index.npz"
  # Both files, and no temporary file left behind.
  assert sorted(p.name for p in saved.parent.iterdir()) == ["index.json", "index.npz"]
  loaded = HammingIndex.load(tmp_path / "cub" / "index.npz")
  assert loaded.bits == 16 and loaded.class_names == ["a", "b", "c", "d"]
  np.testing.assert_array_equal(loaded.codes, index.codes)
  np.testing.assert_array_equal(loaded.labels, labels)
  assert loaded.paths == index.paths
  q = random_bits(12, 4, 16)
  np.testing.assert_array_equal(np.stack(loaded.search(q, 7)), np.stack(index.search(q, 7)))
  meta = json.loads((tmp_path / "cub" / "index.json").read_text())
  assert meta["bits"] == 16 and meta["size"] == 300 and meta["data_file"] == "index.npz"
  counts = {c["label"]: (c["name"], c["count"]) for c in meta["classes"]}
  assert counts == {i: ("abcd"[i], int((labels == i).sum())) for i in range(4)}
  assert "fgir_jax" in meta["created_with"]


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no HammingIndex file"):
    HammingIndex.load(tmp_path / "missing")
  np.savez(tmp_path / "other.npz", codes=np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError, match="not a HammingIndex file .missing format"):
    HammingIndex.load(tmp_path / "other.npz")
  (tmp_path / "junk.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="not a HammingIndex file"):
    HammingIndex.load(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------
# faiss.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_faiss_round_trip(kind):
  pytest.importorskip("faiss", reason="faiss-cpu is optional (pip install fgir_jax[faiss])")
  index, _, labels = make_index()
  back = faiss_export.from_faiss(faiss_export.to_faiss(index, kind), labels=index.labels)
  assert back.bits == 16
  np.testing.assert_array_equal(back.codes, index.codes)
  np.testing.assert_array_equal(back.labels, labels)


def test_faiss_flat_search_agrees_and_files_round_trip(tmp_path):
  pytest.importorskip("faiss", reason="faiss-cpu is optional (pip install fgir_jax[faiss])")
  index, _, _ = make_index()
  q = random_bits(13, 6, 16)
  f_dist, _ = faiss_export.to_faiss(index, "flat").search(pack_codes(q), 20)
  dist, _ = index.search(q, 20)
  # faiss's order inside a tie may differ from ours; the distances may not.
  np.testing.assert_array_equal(dist, f_dist)
  path = faiss_export.write_faiss(index, tmp_path / "index.faiss", kind="ivf", nlist=8)
  np.testing.assert_array_equal(faiss_export.read_faiss(path).codes, index.codes)


def test_faiss_argument_errors():
  pytest.importorskip("faiss", reason="faiss-cpu is optional (pip install fgir_jax[faiss])")
  odd = HammingIndex(12)
  odd.add(random_bits(0, 4, 12))
  with pytest.raises(ValueError, match="multiple of 8, got 12 bits"):
    faiss_export.to_faiss(odd)
  index, _, _ = make_index()
  with pytest.raises(ValueError, match="unknown options nlist"):
    faiss_export.to_faiss(index, "hnsw", nlist=4)
  with pytest.raises(ValueError, match="kind must be one of"):
    faiss_export.to_faiss(index, "pq")


def test_missing_faiss_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
  index, _, _ = make_index()
  hint = r"faiss is not installed: pip install faiss-cpu \(or fgir_jax\[faiss\]\)"
  with pytest.raises(ImportError, match=hint):
    faiss_export.to_faiss(index)
