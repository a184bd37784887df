"""bench/cub_protocol.py, the GPU run of the paper's protocol, rehearsed tiny on the CPU."""

import os
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_protocol_script_runs_the_ablation_and_packs_its_results(tmp_path):
  # The same launch.py --mode ablate command as on the GPU, on tiny synthetic
  # birds: every variant runs, the shared stages are reused, and the summary
  # and the archive hold what docs/real-birds.md's GPU paragraph is written from.
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "cub_protocol.py"), "--cpu-smoke",
       "--workdir", str(tmp_path / "run"), "--out", str(out)],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = (out / "protocol.md").read_text()
  assert "exit status 0" in summary and "--config configs/cub.py:gpu" in summary
  for variant in ("full", "no_enhance", "no_saliency", "triplet", "ce"):
    assert f"| {variant} | stage2_8 |" in summary, variant
  assert "| triplet | stage1 | reused from full |" in summary
  assert "| full | stage1 | reused" not in summary
  assert "adaptive triplet beats CE features" in summary  # the ablation's answers
  with tarfile.open(out / "protocol.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"ablation.md", "ablation.json", "run.log", "full/results.json", "full/report.md",
          "ce/results.json", "full/plots/map_vs_bits.png"} <= names
  assert not any("ckpt" in name or "cache" in name for name in names)
