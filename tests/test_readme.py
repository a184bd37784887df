"""The README's code examples run as printed (a user copies them first)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section):
  """The ```python blocks under the README heading `section`."""
  text = README.read_text()
  start = text.index(section)
  end = text.find("\n## ", start + len(section))
  return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.mark.parametrize("section", ["## Use the loss and miner from your own JAX code"])
def test_readme_examples_run(section, capsys):
  blocks = python_blocks(section)
  assert blocks, f"no python example under {section!r}"
  for block in blocks:
    exec(compile(block, f"README.md: {section}", "exec"), {"__name__": "readme"})  # noqa: S102
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) >= 5  # three steps, the whole-set mining, the vmapped losses
