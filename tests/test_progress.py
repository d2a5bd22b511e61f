"""Progress output: a tqdm bar on a terminal, plain lines every few seconds otherwise."""

import io
import sys

from ttamer_jax.core import progress


class _Clock:
  """perf_counter replacement: each call advances by the next step of ``steps``."""

  def __init__(self, steps):
    self.now, self.steps = 0.0, iter(steps)

  def __call__(self):
    self.now += next(self.steps, 1.0)
    return self.now


def test_log_lines_every_interval_with_step_eta_and_postfix(monkeypatch):
  # start at t=0+; the first item takes 10 s (a compile), then 1 s per item
  monkeypatch.setattr(progress.time, "perf_counter", _Clock([0.0, 10.0] + [1.0] * 20))
  stream = io.StringIO()
  bar = progress.LogProgress(range(8), desc="train Net", interval=2.5, stream=stream)
  for i in bar:
    bar.set_postfix_str(f"loss {1.0 / (i + 1):.4f}")
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  # after item 1 (10 s: no rate yet, no ETA), then every >= 2.5 s, then one final line
  assert lines[0] == "train Net: 1/8 (12%), 10 s elapsed, loss 1.0000"
  assert lines[1] == "train Net: 4/8 (50%), 13 s elapsed, ETA 4 s, loss 0.2500"
  assert lines[2] == "train Net: 7/8 (88%), 16 s elapsed, ETA 1 s, loss 0.1429"
  assert lines[-1] == "train Net: 8/8 (100%), 18 s elapsed, loss 0.1250"
  assert len(lines) == 4


def test_progress_iter_chooses_by_terminal(monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
  bar = progress.progress_iter(range(3), desc="x")
  assert isinstance(bar, progress.LogProgress)
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  from tqdm.auto import tqdm

  bar = progress.progress_iter(range(3), desc="x")
  assert isinstance(bar, tqdm)
  bar.close()
  quiet = progress.progress_iter(range(3), desc="x", enabled=False)
  quiet.set_postfix_str("ignored")
  assert list(quiet) == [0, 1, 2]


def test_disabled_and_log_modes_write_nothing_else(monkeypatch, capsys):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
  assert list(progress.progress_iter(range(3), desc="x", enabled=False)) == [0, 1, 2]
  assert capsys.readouterr().err == ""
  assert list(progress.progress_iter(range(3), desc="x", interval=1e9)) == [0, 1, 2]
  err = capsys.readouterr().err
  assert err.splitlines() == [err.strip()] and err.startswith("x: 3/3 (100%), ")
