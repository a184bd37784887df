"""Two processes joined by jax.distributed on 127.0.0.1 (CPU collectives: gloo).

One run trained by two processes is the run one process trains over two
devices: same results, one copy of each output; a killed process stops the
other promptly with one line, and the same command on both resumes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from configs import demo

def get_config():
  c = demo.get_config("scratch")
  c.data.synthetic.update(num_classes=4, per_class=8, size=32, test_fraction=0.25)
  c.data.image_size = 32
  c.saliency.epochs = 2
  c.stage1.update(epochs=4, batch_size=8)
  c.stage2.update(epochs=2, mine_every=1, bits="8", batch_size=16, eval_every=1)
  c.eval.batch_size = 16
  c.parallel.heartbeat_seconds = 10
  c.progress = False
  return c
"""
HELPERS = """
import sys
import jax
from fgir_jax import parallel
parallel.initialize("127.0.0.1:" + sys.argv[1], 2, int(sys.argv[2]), heartbeat_seconds=10)
import jax.numpy as jnp, numpy as np
assert parallel.on_primary(lambda: {"n": jax.process_index()}) == {"n": 0}
try:
  parallel.on_primary(lambda: 1 / 0)
except (ZeroDivisionError, ValueError) as e:
  print("error on", jax.process_index(), type(e).__name__, e)
mesh = parallel.data_mesh()
rows = parallel.shard_batch(np.arange(8.0).reshape(8, 1), mesh)
print("gathered", parallel.to_host(rows).ravel().tolist())
w = parallel.replicate({"w": np.ones(2, np.float32)}, mesh)
print("sum", float(jax.jit(lambda r, w: (r * w["w"][0]).sum())(rows, w)))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(tmp_path, **extra):
  # The followers' scratch folders go to TMPDIR: the test checks none is left.
  tmp = tmp_path / "tmp"
  tmp.mkdir(exist_ok=True)
  path = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  return dict(os.environ, TMPDIR=str(tmp), JAX_PLATFORMS="cpu", PYTHONPATH=path, **extra)


def _start(args, log_stem, env):
  out, err = open(f"{log_stem}.out", "w"), open(f"{log_stem}.err", "w")
  return subprocess.Popen([sys.executable] + args, cwd=REPO, stdout=out, stderr=err, env=env)


def _train(config, workdir, process_id=None, port=None):
  args = ["launch.py", "--config", config, "--workdir", workdir]
  if process_id is not None:
    args += ["--config.parallel.distributed=True", "--config.parallel.num_processes=2",
             f"--config.parallel.coordinator_address=127.0.0.1:{port}",
             f"--config.parallel.process_id={process_id}"]
  return args


def _both(config, workdir, tmp_path, name):
  port = _free_port()
  return [_start(_train(config, workdir, i, port), str(tmp_path / f"{name}{i}"), _env(tmp_path))
          for i in (0, 1)]


def _our_lines(path) -> list[str]:
  """Output without the log lines of JAX's C++ runtime and gloo."""
  with open(path) as f:
    return [l for l in f.read().splitlines()
            if l.strip() and not l.startswith(("I0000", "W0000", "E0000", "[Gloo]", "WARNING"))
            and "absl::InitializeLog" not in l]


def _files(workdir) -> set:
  """Every file of a run; checkpoints as their steps (ckpt/<stage>/<step>), since a
  multi-host checkpoint's files name the processes that wrote them."""
  out = set()
  for root, _, names in os.walk(workdir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), workdir)
      out.add(os.path.join(*rel.split(os.sep)[:3]) if rel.startswith("ckpt" + os.sep) else rel)
  return out - {".lock", "command.txt", "config.json"}


def _close(a, b, path=""):
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      _close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6), path
  else:
    assert a == b, path


def test_process_helpers_agree_and_pass_on_errors(tmp_path):
  script = tmp_path / "helpers.py"
  script.write_text(HELPERS)
  port = str(_free_port())
  procs = [_start([str(script), port, str(i)], str(tmp_path / f"h{i}"), _env(tmp_path))
           for i in (0, 1)]
  for p in procs:
    assert p.wait(timeout=120) == 0, open(tmp_path / "h0.err").read()[-2000:]
  for i in (0, 1):
    out = [l for l in (tmp_path / f"h{i}.out").read_text().splitlines()
           if not l.startswith("[Gloo]")]
    # Process 0's error reaches both, with its message.
    assert out[0] == f"error on {i} {'ZeroDivisionError' if i == 0 else 'ValueError'} " \
                     "division by zero"
    assert out[1] == "gathered [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]"
    assert out[2] == "sum 28.0"


def test_two_processes_train_one_run_and_resume_after_a_kill(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(CONFIG.format(repo=REPO))
  # The reference: one process, two (simulated) devices, the same global batches.
  one = str(tmp_path / "one")
  ref = _start(_train(str(config), one), str(tmp_path / "ref"),
               _env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert ref.wait(timeout=600) == 0, open(tmp_path / "ref.err").read()[-2000:]

  # Two processes; process 1 is killed once stage 1 has checkpointed its first epoch.
  two = str(tmp_path / "two")
  p0, p1 = _both(str(config), two, tmp_path, "a")
  deadline = time.time() + 600
  while "stage1: epoch 1/4" not in (tmp_path / "a0.out").read_text():
    assert p0.poll() is None and time.time() < deadline, (tmp_path / "a0.err").read_text()[-2000:]
    time.sleep(0.1)
  p1.send_signal(signal.SIGKILL)
  killed = time.time()
  # The other stops promptly, with one line that says what to do.
  assert p0.wait(timeout=60) == 2
  assert time.time() - killed < 30
  lines = _our_lines(tmp_path / "a0.err")
  assert len(lines) == 1 and lines[0].startswith("error: another process of this run stopped")
  assert "run the same command on every process again" in lines[0]
  p1.wait()

  # The same command on both resumes stage 1 and finishes like the one-process run.
  procs = _both(str(config), two, tmp_path, "b")
  for i, p in enumerate(procs):
    assert p.wait(timeout=600) == 0, (tmp_path / f"b{i}.err").read_text()[-2000:]
  assert "stage1: resuming after epoch 1" in (tmp_path / "b0.out").read_text()
  with open(os.path.join(one, "results.json")) as f, open(os.path.join(two, "results.json")) as g:
    _close(json.load(f), json.load(g))
  # One copy of each output: the same files as the one-process run, each log row once,
  # nothing staged and no follower scratch left behind.
  assert _files(two) == _files(one)
  with open(os.path.join(two, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["epoch"] for r in rows if r["stage"] == "stage2_8"] == [1, 2]
  assert [r["epoch"] for r in rows if r["stage"] == "stage1"] == [1, 2, 3, 4]
  assert not os.listdir(tmp_path / "tmp")
  # Process 1 printed nothing of its own but the final line.
  follower = _our_lines(tmp_path / "b1.out")
  assert len(follower) == 1 and follower[0].startswith("mAP: 8 bits")


def test_modes_that_run_in_one_process_refuse_distributed_in_one_line(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(CONFIG.format(repo=REPO))
  out = subprocess.run([sys.executable, "launch.py", "--config", str(config), "--workdir",
                        str(tmp_path / "run"), "--mode", "search", "--query", "x.png",
                        "--config.parallel.distributed=True"],
                       cwd=REPO, capture_output=True, text=True, env=_env(tmp_path), check=False)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: --mode search runs in one process; drop --config.parallel.distributed=True (it is "
      "for training and ablations)."]
  assert not (tmp_path / "run").exists()
