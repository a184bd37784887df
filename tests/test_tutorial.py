"""docs/tutorial.md, run as written on a small folder of photos the test makes (CI-sized: each
training command gets overrides that shrink the images and the epochs)."""

import os
import re
import shlex
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = os.path.join(REPO, "docs", "tutorial.md")
# The same method, small: 64 px images, one stage-1 epoch, two stage-2 epochs at 8 bits.
SMALL = ["--config.data.image_size=64", "--config.stage1.epochs=1", "--config.stage2.epochs=2",
         "--config.stage2.bits=8", "--config.progress=False"]


def _commands():
  text = open(TUTORIAL, encoding="utf-8").read()
  blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
  return [shlex.split(line) for block in blocks for line in block.splitlines()
          if line.startswith("fgir-jax ")]


def _photos(root, classes=3, per_class=6, seed=0):
  """Folders of drawn birds, one class per folder, as JPEG files."""
  from fgir_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.make_synthetic(num_classes=classes, per_class=per_class, size=64, seed=seed)
  for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
    folder = os.path.join(root, f"class_{int(label)}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"img_{i}.jpg"), quality=95)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_tutorial_runs_as_written(tmp_path):
  commands = _commands()
  assert [c[c.index("--mode") + 1] if "--mode" in c else "train" for c in commands] == [
      "train", "search", "serve", "index"]
  _photos(str(tmp_path / "photos"))
  _photos(str(tmp_path / "more_photos"), classes=2, per_class=2, seed=1)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  for command in commands:
    # `fgir-jax` is `python -m fgir_jax`; the training command gets the CI-sized overrides.
    argv = [sys.executable, "-m", "fgir_jax"] + command[1:]
    if "--mode" not in command:
      argv += SMALL
    if "serve" in command:
      port = _free_port()
      argv[argv.index("--port") + 1] = str(port)
      server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
      try:
        _wait_for_health(port, server)
      finally:
        server.terminate()
        server.wait(timeout=30)
      continue
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
  run = tmp_path / "runs" / "mine"
  assert (run / "report.md").exists() and (run / "examples" / "query_1.jpg").exists()
  assert (tmp_path / "search_results.png").exists()
  with open(run / "additions" / "index_8.json") as f:
    assert len(__import__("json").load(f)["images"]) == 4


def _wait_for_health(port, server):
  import httpx  # pylint: disable=g-import-not-at-top
  deadline = time.time() + 180
  while time.time() < deadline:
    if server.poll() is not None:
      pytest.fail("the server stopped: " + server.stdout.read()[-2000:])
    try:
      if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).json()["status"] == "ok":
        return
    except httpx.HTTPError:
      time.sleep(0.5)
  pytest.fail("the server did not answer within 3 minutes")
