"""The work directory of a run: resolved config, stage markers, metrics, results.

Layout:
    config.json          the resolved config the run was started with
    metrics.jsonl        one JSON object per line: {"stage", "epoch", ...}
    stages/<name>.json   written when a stage finishes; a finished stage is skipped
    ckpt/<stage>/        Orbax checkpoints of each training stage
    results.json         the final numbers (see DESIGN.md)

A directory made by a different config is refused (one line naming the keys
that differ) unless the config says `overwrite=True`; keys that only choose
what to run (`stages`, `overwrite`) may change between runs of one experiment.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

# Keys that select what to run or how to report, not what is computed.
_RUN_ONLY_KEYS = ("stages", "overwrite", "progress")
# Outputs a fresh start removes; the decode cache is content-keyed and kept.
_DERIVED = ("stages", "ckpt", "saliency", "stage2", "metrics.jsonl", "results.json",
            "report.md", "plots", "index")


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _comparable(config_dict: dict) -> dict:
  # Device settings too: a run may resume on another machine with other devices.
  return {k: v for k, v in _flatten(config_dict).items()
          if k not in _RUN_ONLY_KEYS and not k.startswith("parallel.")}


def write_json(path: str, obj: Any) -> None:
  """Writes atomically: a crash never leaves half a file behind."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)


def _json_default(obj):
  if hasattr(obj, "tolist"):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class Workdir:
  """Paths and bookkeeping of one run's directory."""

  def __init__(self, path: str, config_dict: dict, overwrite: bool = False):
    self.path = os.path.abspath(path)
    os.makedirs(self.path, exist_ok=True)
    self._claim(config_dict, overwrite)

  def _claim(self, config_dict: dict, overwrite: bool) -> None:
    saved_path = self.file("config.json")
    if os.path.exists(saved_path):
      with open(saved_path) as f:
        saved = _comparable(json.load(f))
      current = _comparable(json.loads(json.dumps(config_dict, default=_json_default)))
      differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      if differ and not overwrite:
        shown = ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
        raise ValueError(
            f"{self.path} holds a run made with a different config ({shown} differ); "
            "use another --workdir, or pass --config.overwrite=True to start it afresh.")
      if differ:
        self._clear()
    write_json(saved_path, config_dict)

  def _clear(self) -> None:
    for name in _DERIVED:
      target = self.file(name)
      if os.path.isdir(target):
        shutil.rmtree(target)
      elif os.path.exists(target):
        os.remove(target)

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def dir(self, *parts: str) -> str:
    path = self.file(*parts)
    os.makedirs(path, exist_ok=True)
    return path

  # ---- stages ---------------------------------------------------------------
  def done(self, stage: str) -> dict | None:
    path = self.file("stages", f"{stage}.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def mark_done(self, stage: str, summary: dict) -> None:
    self.dir("stages")
    write_json(self.file("stages", f"{stage}.json"), dict(summary, finished=time.time()))

  # ---- metrics ----------------------------------------------------------------
  def log(self, stage: str, **values) -> None:
    """Appends one JSON line; numbers are made plain floats so any reader can parse them."""
    row = {"stage": stage, "time": round(time.time(), 3)}
    row.update({k: _plain(v) for k, v in values.items()})
    with open(self.file("metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")

  def read_log(self, stage: str | None = None) -> list[dict]:
    path = self.file("metrics.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if stage is None or r["stage"] == stage]


def _plain(value):
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return value
