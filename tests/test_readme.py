"""Every Python example of the README and the docs runs as written (each in a fresh namespace,
in a temporary folder, on the CPU)."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _examples():
  for page in PAGES:
    text = open(page, encoding="utf-8").read()
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
      yield pytest.param(block, id=f"{os.path.relpath(page, REPO)}#{i}")


@pytest.mark.parametrize("code", list(_examples()))
def test_example_runs(code, tmp_path, monkeypatch, capsys):
  if "faiss_export." in code:
    pytest.importorskip("faiss")  # installed in CI (requirements.txt)
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "example", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
