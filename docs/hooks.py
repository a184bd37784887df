"""MkDocs hook: fills config.md's key table from the config itself, so it cannot drift."""

from fgir_jax.train import config as config_lib

PLACEHOLDER = "<!-- config-reference -->"


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
  lines = ["| key | default | meaning |", "| --- | --- | --- |"]
  for key, default, meaning in config_lib.reference_rows():
    if not meaning:
      raise ValueError(f"config key {key} has no entry in config.KEY_DOCS; add one.")
    lines.append(f"| `{key}` | `{_cell(default)}` | {_cell(meaning)} |")
  return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):  # pylint: disable=unused-argument
  if PLACEHOLDER in markdown:
    return markdown.replace(PLACEHOLDER, config_table())
  return markdown
