"""Progress of long loops (decoding, epochs, encoding) through tqdm, honest about the first step.

On a terminal: a live tqdm bar on stderr. In a log file (stderr not a
terminal): no bar at all; a whole-set pass writes one line when it ends
("saliency maps: 2889 img in 64 s, 45 img/s"), and an epoch writes nothing
here (its stage prints one line per epoch, with `summary()` in it).

The first update of a loop usually includes XLA compiling the step, so the
clock starts after it: rates and time left appear only once measured.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
  """count/total with a rate and time left measured after the first update."""

  def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "img",
               log_line: bool = True, stream=None):
    self.total, self.desc, self.unit, self.count = int(total), desc, unit, 0
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled and total > 0
    self.tty = getattr(self.stream, "isatty", lambda: False)()
    self.log_line = log_line
    self.start = time.perf_counter()
    self.first_done = None  # (time, count) after the first update: the measured part starts
    self._bar = None

  def update(self, count: int) -> None:
    self.count += count
    if self.first_done is None:
      self.first_done = (time.perf_counter(), self.count)
      if self.enabled and self.tty:
        # initial= keeps the first update (compiling) out of tqdm's rate and time left.
        self._bar = tqdm(total=self.total, initial=self.count, desc=self.desc, unit=self.unit,
                         file=self.stream, leave=True, dynamic_ncols=True, mininterval=0.2)
      return
    if self._bar is not None:
      self._bar.update(count)

  @property
  def rate(self) -> float:
    """Items per second after the first update (0 until measured)."""
    if self.first_done is None:
      return 0.0
    seconds = time.perf_counter() - self.first_done[0]
    done = self.count - self.first_done[1]
    return done / seconds if seconds > 0 and done > 0 else 0.0

  def summary(self) -> str:
    """"52 s, 28 img/s": the whole time and the measured rate."""
    seconds = time.perf_counter() - self.start
    rate = self.rate
    return f"{seconds:.0f} s" + (f", {rate:.0f} {self.unit}/s" if rate else "")

  def close(self, completed: bool = True) -> None:
    """Ends the bar; in a log, one summary line unless the work failed (completed=False)."""
    if self._bar is not None:
      self._bar.close()
    elif self.enabled and not self.tty and self.log_line and completed:
      self.stream.write(f"{self.desc}: {self.count} {self.unit} in {self.summary()}\n")
      self.stream.flush()
