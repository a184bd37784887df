"""A one-line progress bar on stderr for long loops (decoding, epochs, encoding).

No dependency: on a terminal the line is redrawn at most 5 times a second; in a
log file (CI, nohup) a new line is written every 10% so logs stay short.
"""

from __future__ import annotations

import sys
import time


class Progress:
  """count/total, percent, items per second and time left."""

  def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "img"):
    self.total, self.desc, self.unit, self.count = total, desc, unit, 0
    self.enabled = enabled and total > 0
    self.tty = getattr(sys.stderr, "isatty", lambda: False)()
    self.start = self.last = time.perf_counter()
    self.last_pct = -10

  def update(self, count: int) -> None:
    self.count += count
    now = time.perf_counter()
    pct = 100 * self.count // max(self.total, 1)
    due = (now - self.last >= 0.2) if self.tty else (pct >= self.last_pct + 10)
    if self.enabled and (due or self.count >= self.total):
      self.last, self.last_pct = now, pct
      self._draw(now)

  def _draw(self, now: float) -> None:
    rate = self.count / max(now - self.start, 1e-9)
    eta = max(self.total - self.count, 0) / rate if rate > 0 else 0.0
    line = (f"{self.desc}: {self.count}/{self.total} ({100 * self.count / self.total:.0f}%) "
            f"{rate:.0f} {self.unit}/s, {int(eta) // 60}:{int(eta) % 60:02d} left")
    sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\n")
      sys.stderr.flush()

  @property
  def rate(self) -> float:
    return self.count / max(time.perf_counter() - self.start, 1e-9)
