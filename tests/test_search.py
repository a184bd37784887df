"""Search a trained work directory: image queries, adding a folder to the index, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fgir_jax import index as index_lib
from fgir_jax.train import pipeline
from fgir_jax.commands import search
from conftest import copy_run
from test_pipeline import REPO, tiny_config


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
  """A finished tiny run (a copy: test_index_mode_adds_a_folder grows it), and its config."""
  return tiny_config(), copy_run(tiny_run, tmp_path_factory.mktemp("search") / "run")


def _write_queries(config, directory, rows):
  """Test-split images of the run written as PNG files (what a user would pass)."""
  ds = pipeline.data_stage.load_dataset(config)
  test_rows = np.flatnonzero(~ds.is_train)[rows]
  paths = []
  os.makedirs(directory, exist_ok=True)
  for r in test_rows:
    path = os.path.join(directory, f"query_{r}.png")
    Image.fromarray(ds.images[r]).save(path)
    paths.append(path)
  return paths, ds.labels[test_rows], ds


def test_evaluate_writes_the_database_index(trained):
  config, workdir = trained
  for bits in (8, 12):
    idx = index_lib.HammingIndex.load(os.path.join(workdir, "index", f"index_{bits}.npz"))
    codes = np.load(os.path.join(workdir, "codes", f"codes_{bits}.npz"))
    assert idx.bits == bits
    np.testing.assert_array_equal(idx.codes, codes["database"])
    assert len(idx.class_names) == 4 and len(idx) == 24
    assert os.path.exists(os.path.join(workdir, "index", f"index_{bits}.json"))


def test_search_returns_brute_force_top_k_of_the_encoded_query(trained, tmp_path):
  config, workdir = trained
  queries, _, _ = _write_queries(config, str(tmp_path / "q"), [0, 3])
  lines = []
  out = search.search_command(config, workdir, queries, k=5, echo=lines.append,
                              out_dir=str(tmp_path))
  assert out["bits"] == 12  # the longest code length by default
  searcher = search.Searcher(config, workdir)
  codes = searcher.encode_files(queries)
  db = index_lib.unpack_codes(searcher.index.codes, 12)
  for q, result in enumerate(out["queries"]):
    d = (codes[q][None, :] != db).sum(1)
    order = np.lexsort((np.arange(len(d)), d))[:5]  # distance, then database order
    assert [r["item"] for r in result["results"]] == order.tolist()
    assert [r["distance"] for r in result["results"]] == d[order].tolist()
    assert [r["rank"] for r in result["results"]] == [1, 2, 3, 4, 5]
  assert sum(line.startswith("query ") for line in lines) == 2
  assert os.path.getsize(out["grid"]) > 1000 and open(out["grid"], "rb").read(4) == b"\x89PNG"


def test_query_encoding_matches_training(trained, tmp_path):
  """A database image given as a query file gets its own database code back."""
  config, workdir = trained
  ds = pipeline.data_stage.load_dataset(config)
  row = int(np.flatnonzero(ds.is_train)[2])
  path = str(tmp_path / "db.png")
  Image.fromarray(ds.images[row]).save(path)
  searcher = search.Searcher(config, workdir, bits=8)
  code = searcher.encode_files([path])
  # The same pixels through the same crop and networks: the code stored for item 2.
  stored = index_lib.unpack_codes(searcher.index.codes[2:3], 8)
  assert (code != stored).sum() <= 1  # PNG round trip and re-crop may flip a bit at most


def test_index_mode_adds_a_folder(trained, tmp_path):
  config, workdir = trained
  names = search.Searcher(config, workdir).index.class_names
  folder = tmp_path / "new"
  _write_queries(config, str(folder / names[1]), [0])
  _write_queries(config, str(folder), [1])  # at the top: no class
  before = len(index_lib.HammingIndex.load(os.path.join(workdir, "index", "index_12.npz")))
  out = search.index_command(config, workdir, str(folder), echo=lambda _: None)
  idx = index_lib.HammingIndex.load(os.path.join(workdir, "index", "index_12.npz"))
  assert out["added"] == 2 and len(idx) == before + 2
  assert sorted(idx.labels[before:].tolist()) == [-1, 1]
  assert all(os.path.isabs(p) and os.path.exists(p) for p in idx.paths[before:])
  # The new items are searchable by their own image.
  res = search.search_command(config, workdir, [idx.paths[-1]], k=len(idx), echo=lambda _: None,
                              out_dir=str(tmp_path))
  assert before + 1 in [r["item"] for r in res["queries"][0]["results"]]


def test_errors_are_one_clear_line(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(FileNotFoundError, match="query image .*missing.png does not exist"):
    search.search_command(config, workdir, [str(tmp_path / "missing.png")])
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="cannot decode image"):
    search.search_command(config, workdir, [str(bad)])
  with pytest.raises(ValueError, match="no 32-bit model .* it has 8, 12-bit codes"):
    search.search_command(config, workdir, [str(bad)], bits=32)
  with pytest.raises(ValueError, match="needs at least one --query"):
    search.search_command(config, workdir, [])
  empty = str(tmp_path / "untrained")
  os.makedirs(empty)
  with pytest.raises(ValueError, match="has no trained model and index yet"):
    search.search_command(config, empty, [str(bad)])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    search.index_command(config, workdir, str(tmp_path / "nowhere"))


def test_search_command_line(trained, tmp_path):
  config, workdir = trained
  queries, _, _ = _write_queries(config, str(tmp_path / "q"), [1])
  overrides = _tiny_overrides()
  base = [sys.executable, os.path.join(REPO, "launch.py"), "--config",
          os.path.join(REPO, "configs", "demo.py") + ":scratch", "--workdir", workdir] + overrides
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(base + ["--mode", "search", "--query", queries[0], "--k", "3"],
                        capture_output=True, text=True, env=env, timeout=300, check=False,
                        cwd=tmp_path)  # the picture goes to the current folder
  assert done.returncode == 0, done.stderr[-2000:]
  ranks = [line.split()[0] for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
  assert "rank  distance" in done.stdout and ranks == ["1", "2", "3"]
  done = subprocess.run(base + ["--mode", "search", "--query", str(tmp_path / "nope.jpg")],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: query image")


def _tiny_overrides():
  """tiny_config() as command-line overrides of configs/demo.py:scratch."""
  return ["--config.data.synthetic.num_classes=4", "--config.data.synthetic.per_class=8",
          "--config.data.synthetic.size=32", "--config.data.synthetic.test_fraction=0.25",
          "--config.data.image_size=32", "--config.stage1.epochs=2", "--config.stage1.batch_size=8",
          "--config.stage2.epochs=2", "--config.stage2.mine_every=1", "--config.stage2.bits=8,12",
          "--config.stage2.batch_size=16", "--config.stage2.eval_every=1",
          "--config.progress=False"]


def test_the_search_table_is_aligned_whatever_the_class_names():
  rows = [{"rank": 1, "distance": 0, "item": 4, "class_name": "a", "path": "/x/a.jpg"},
          {"rank": 10, "distance": 12, "item": 7, "class_name": "yellow-crown/2-stripes/dot",
           "path": None}]
  lines = search._table(rows)  # pylint: disable=protected-access
  assert lines[0].split() == ["rank", "distance", "class", "path"]
  starts = {line.index(p) for line, p in zip(lines[1:], ("/x/a.jpg", "(database item 7)"))}
  assert len(starts) == 1 and lines[0].index("path") in starts
