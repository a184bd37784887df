"""The documentation site holds every config key, every public module and every page."""

import glob
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

from fgir_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _leaf_keys(tree, prefix=""):
  for key, value in tree.items():
    if hasattr(value, "items"):
      yield from _leaf_keys(value, prefix + key + ".")
    else:
      yield prefix + key


def test_every_config_key_has_a_meaning_and_no_meaning_is_stale():
  keys = set(_leaf_keys(config_lib.base_config()))
  assert keys - set(config_lib.KEY_DOCS) == set(), "keys without a KEY_DOCS entry"
  assert set(config_lib.KEY_DOCS) - keys == set(), "KEY_DOCS entries for keys that are gone"


def _load_hooks():
  spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(REPO, "docs", "hooks.py"))
  hooks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hooks)
  return hooks


def test_config_page_gets_one_row_per_key_with_its_default():
  hooks = _load_hooks()
  page = _read(os.path.join(REPO, "docs", "config.md"))
  assert hooks.PLACEHOLDER in page
  table = hooks.on_page_markdown(page, None, None, None)
  rows = [line for line in table.splitlines() if line.startswith("| `")]
  config = config_lib.base_config()
  assert sorted(row.split("`")[1] for row in rows) == sorted(_leaf_keys(config))
  beta_row = next(row for row in rows if row.startswith("| `stage2.beta`"))
  assert f"`{config.stage2.beta}`" in beta_row and "hardness" in beta_row


def test_a_key_without_a_meaning_fails_the_build(monkeypatch):
  hooks = _load_hooks()
  monkeypatch.delitem(config_lib.KEY_DOCS, "stage2.beta")
  with pytest.raises(ValueError, match="stage2.beta has no entry in config.KEY_DOCS"):
    hooks.config_table()


def _public_modules():
  for path in glob.glob(os.path.join(REPO, "fgir_jax", "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    rel = rel.removesuffix(".__init__")
    if rel.endswith("__main__") or any(part.startswith("_") for part in rel.split(".")):
      continue
    yield rel


def test_api_reference_documents_every_public_module_once():
  directives = []
  for page in glob.glob(os.path.join(REPO, "docs", "api", "*.md")):
    directives += re.findall(r"^::: (\S+)$", _read(page), flags=re.MULTILINE)
  assert sorted(directives) == sorted(set(directives)), "a module documented twice"
  assert set(_public_modules()) - set(directives) == set(), "public modules not in docs/api/"


def test_every_page_is_in_the_navigation():
  nav = _read(os.path.join(REPO, "mkdocs.yml"))
  pages = [os.path.relpath(p, os.path.join(REPO, "docs")).replace(os.sep, "/")
           for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)]
  assert [p for p in pages if f": {p}" not in nav] == []


def test_site_builds_in_strict_mode(tmp_path):
  # CI installs mkdocs (requirements.txt); a broken link or docstring fails here.
  if os.environ.get("CI") != "true":
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "site" / "config" / "index.html").is_file()
  # Each public name has one documented home: the module that defines it, never a
  # package or module that re-exports it.
  ids = []
  for page in glob.glob(str(tmp_path / "site" / "api" / "*" / "index.html")):
    ids += re.findall(r'id="(fgir_jax(?:\.\w+)+)"', _read(page))
  assert len(ids) > 200 and len(ids) == len(set(ids))
  homes = [_defining_module(name) for name in ids]
  assert [(name, home) for name, home in zip(ids, homes) if home is not None
          and not name.startswith(home + ".")] == []


def _defining_module(name: str):
  """The module that defines the module-level function or class `name`; None otherwise."""
  module, _, attr = name.rpartition(".")
  try:
    obj = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError):
    return None  # a member of a class, or a submodule
  if inspect.isfunction(obj) or inspect.isclass(obj):
    return obj.__module__
  return None
