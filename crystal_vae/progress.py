"""Progress lines for work that can run longer than a few seconds.

    progress = Progress("evaluate: rebuilt", total=len(crystals))
    for batch in batches:
      ...
      progress.advance(len(batch))   # prints at most every `every` seconds, and at the end

Each line says how many of how many are done, the time spent and the time left, e.g.
`evaluate: rebuilt 96/256 crystals (38%), 41 s, about 1 min 8 s left`.
"""

import sys
import time


def format_duration(seconds: float) -> str:
  """`42 s`, `3 min 5 s`, `1 h 2 min`."""
  seconds = int(round(max(seconds, 0.0)))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Progress:
  """Counts work done and prints a line at most every `every` seconds, and one when done
  (`total` <= 0: an unknown total, lines of the count so far)."""

  def __init__(self, what: str, total: int, unit: str = "crystals", every: float = 10.0,
               stream=None):
    self.what, self.total, self.unit, self.every = what, int(total), unit, every
    self.stream = stream if stream is not None else sys.stdout
    self.done = 0
    self.start = self.last = time.monotonic()

  def line(self) -> str:
    elapsed = time.monotonic() - self.start
    if self.total <= 0:  # an unknown total: the count so far
      return f"{self.what} {self.done} {self.unit}, {format_duration(elapsed)}"
    text = f"{self.what} {self.done}/{self.total} {self.unit}"
    text += f" ({100 * self.done / self.total:.0f}%)"
    text += f", {format_duration(elapsed)}"
    if 0 < self.done < self.total:
      text += f", about {format_duration(elapsed * (self.total - self.done) / self.done)} left"
    return text

  def advance(self, count: int = 1) -> None:
    self.done += count
    now = time.monotonic()
    if (0 < self.total <= self.done) or now - self.last >= self.every:
      self.last = now
      print(self.line(), file=self.stream, flush=True)
