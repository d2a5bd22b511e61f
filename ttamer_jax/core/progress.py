"""One progress helper for every long loop (training, sweeps, reports, selection).

On a terminal it draws a tqdm bar on stderr. When stderr is not a terminal (a
log file, CI, a notebook's captured output) it prints one plain line every
``interval`` seconds -- position, rate and ETA, plus whatever the caller sets
with ``set_postfix_str`` -- instead of hundreds of carriage-return updates.
Disabled, it is the bare iterable.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

# Seconds between plain progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 5.0


def _fmt_seconds(s: float) -> str:
  s = max(0.0, s)
  return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class LogProgress:
  """An iterable that prints ``desc: i/total (pct) elapsed, ETA[, postfix]`` lines.

  Lines go to ``stream`` at most every ``interval`` seconds, plus one at the end. The
  ETA uses the rate after the first item (a first step that compiles would make it
  absurd) and is left out until two items are done.
  """

  def __init__(self, iterable: Iterable[T], *, desc: str, total: int | None = None,
               interval: float = LOG_INTERVAL_S, stream=None):
    self.iterable = iterable
    self.desc = desc
    self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__")
                                                  else None)
    self.interval = interval
    self.stream = stream
    self.postfix = ""
    self.count = 0
    # Items per second after the first one (which often includes compilation), for the
    # ETA; None until two items are done.
    self.rate = None

  def set_postfix_str(self, text: str) -> None:
    self.postfix = text

  def line(self, elapsed: float) -> str:
    where = f"{self.count}/{self.total}" if self.total else f"{self.count}"
    text = f"{self.desc}: {where}"
    if self.total:
      text += f" ({100 * self.count / self.total:.0f}%)"
    text += f", {_fmt_seconds(elapsed)} elapsed"
    if self.total and self.count < self.total and self.rate is not None:
      text += f", ETA {_fmt_seconds((self.total - self.count) / self.rate)}"
    if self.postfix:
      text += f", {self.postfix}"
    return text

  def __iter__(self) -> Iterator[T]:
    stream = self.stream or sys.stderr
    start = last = time.perf_counter()
    first = None
    for item in self.iterable:
      yield item
      self.count += 1
      now = time.perf_counter()
      if first is None:
        first = now
      elif now > first:
        self.rate = (self.count - 1) / (now - first)
      if now - last >= self.interval:
        print(self.line(now - start), file=stream, flush=True)
        last = now
    print(self.line(time.perf_counter() - start), file=stream, flush=True)


def progress_iter(iterable: Iterable[T], *, desc: str, total: int | None = None,
                  enabled: bool = True, interval: float = LOG_INTERVAL_S):
  """``iterable`` with progress on stderr: tqdm on a terminal, plain lines otherwise.

  The result supports ``set_postfix_str`` in every mode (a no-op when disabled).
  """
  if not enabled:
    return _Quiet(iterable)
  if sys.stderr.isatty():
    try:
      from tqdm.auto import tqdm
    except ImportError:
      pass
    else:
      return tqdm(iterable, desc=desc, total=total, leave=False)
  return LogProgress(iterable, desc=desc, total=total, interval=interval)


class _Quiet:
  def __init__(self, iterable):
    self.iterable = iterable

  def set_postfix_str(self, text: str) -> None:
    pass

  def __iter__(self):
    return iter(self.iterable)
