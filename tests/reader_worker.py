"""A worker that loads weight files under a memory and time limit, one forked child per file.

    python tests/reader_worker.py HEADROOM_MB SECONDS   # paths on stdin, one JSON line out each

Each child limits its address space (RLIMIT_AS) to what it already maps plus
HEADROOM_MB, sets an alarm, loads the file with the torch-free
reader (.pth/.pt) or the .npz reader, and reports {"outcome": "ok", "arrays":
{name: [shape, dtype, sha256]}} or {"outcome": "ValueError", "message"} or
{"outcome": TYPE, "message"} for anything else; a child killed by a signal
(the alarm, or the kernel) is reported as {"outcome": "killed", "signal"}.
The readers are imported from their files, not through the fgir_jax packages,
so the child holds NumPy and nothing of JAX.
"""

import hashlib
import importlib.util
import json
import os
import resource
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name, relpath):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


torch_checkpoint = _module("torch_checkpoint", "fgir_jax/models/torch_checkpoint.py")
npz_file = _module("npz_file", "fgir_jax/models/npz_file.py")


def _load(path):
  if path.endswith(".npz"):
    return npz_file.load(path)
  return torch_checkpoint.load_state_dict(path)


def _mapped_bytes():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) << 10
  raise RuntimeError("no VmSize in /proc/self/status")


def _child(path, headroom_mb, seconds, out):
  limit = _mapped_bytes() + (headroom_mb << 20)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  signal.alarm(seconds)
  try:
    arrays = _load(path)
    result = {"outcome": "ok", "arrays": {
        k: [list(v.shape), str(v.dtype), hashlib.sha256(v.tobytes()).hexdigest()]
        for k, v in arrays.items()}}
  except ValueError as e:
    result = {"outcome": "ValueError", "message": str(e)}
  except BaseException as e:  # noqa: BLE001 - reported: the test fails on it
    result = {"outcome": type(e).__name__, "message": str(e)[:300]}
  os.write(out, (json.dumps(result) + "\n").encode())
  os._exit(0)


def main():
  headroom_mb, seconds = int(sys.argv[1]), int(sys.argv[2])
  for line in sys.stdin:
    path = line.rstrip("\n")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(read)
      _child(path, headroom_mb, seconds, write)
    os.close(write)
    with os.fdopen(read) as pipe:
      reply = pipe.read().strip()
    _, status = os.waitpid(pid, 0)
    if not reply:
      reply = json.dumps({"outcome": "killed", "signal": os.WTERMSIG(status)
                          if os.WIFSIGNALED(status) else None})
    sys.stdout.write(reply + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
