"""Ctrl-C (SIGINT) during ``ttamer fit``, ``sweep``, ``evaluate`` and ``demo`` (issue 24,
RELIABILITY.md case R4): exit code 130, the last line on stderr ``ttamer CMD:
interrupted``, no traceback, no crash (it was SIGSEGV, exit 139, in 5 of 16 tries), and
no output file -- not a temporary one, not one output of several.

Each run is the real ``python -m ttamer_jax`` on small traces with the compilation cache
off, interrupted while it works: right after the first line it prints on stderr (a
progress line, the demo's step line, evaluate's warning), so the interrupt lands in
compilation or computation, never in Python's import of JAX (which is not ttamer's to
handle: Python ends the process by SIGINT there). The evaluate run lands, more often than
not, in JAX's garbage-collector callback, where Python swallows the ``KeyboardInterrupt``
(the command then ran on to exit 0): the program's handler sends the signal again
(``cli._interrupt``). Five runs, each ~5-20 s.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import ttamer_jax as tj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("interrupt")
  rng = np.random.default_rng(0)
  for name, num in (("cal", 300), ("small", 20)):
    conf = rng.uniform(0, 1, (num, 3))
    tj.save_traces(root / f"{name}.npz", tj.ExitTraces(
        scores=conf, preds=rng.integers(0, 5, (num, 3)),
        losses=(rng.uniform(0, 1, (num, 3)) > conf).astype(float), costs=[1.0, 2.0, 3.0],
        signals={"max_softmax": conf}))
  values = np.array([[0.6, 0.2], [0.5, 0.1], [0.3, 0.0]])
  index = np.array([[0.4, 0.4], [0.4, 0.4], [np.inf, np.inf]])
  tj.save_policy(root / "pol.npz", tj.DeployedPolicy(
      policy=tj.core.RecallPolicy(index=index, values=values, lam=0.8),
      discretiser=tj.data.Discretiser(edges=np.full((3, 1), 0.5)), score_name="max_softmax"))
  return root


CASES = {
    # command line, the stderr line after which Ctrl-C comes, outputs that must not appear
    "fit": (["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "c.npz"], "fit: cross-fitting"),
    "sweep": (["sweep", "cal.npz", "--plot", "f.png", "--lam", "0:1:11"], "sweep:"),
    "evaluate": (["evaluate", "pol.npz", "small.npz", "--resamples", "1000000"], "warning:"),
    "demo": (["demo", "--workload", "synthetic", "--quick", "--out", "d"], "[2/4]"),
}
RUNS = [("fit", 0.0), ("fit", 3.0), ("sweep", 0.0), ("evaluate", 0.0), ("demo", 1.0)]


def _interrupted(cwd, argv, marker, delay):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  # Under a parent that ignores SIGINT (a background job) the child would inherit that.
  restore = (None if signal.getsignal(signal.SIGINT) != signal.SIG_IGN
             else lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  proc = subprocess.Popen(
      [sys.executable, "-m", "ttamer_jax", *argv, "--cache-dir", ""], cwd=cwd, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if marker in line:
      break
  if delay:
    try:
      proc.wait(delay)
    except subprocess.TimeoutExpired:
      pass
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, "".join(seen) + err


@pytest.mark.parametrize("command, delay", RUNS, ids=[f"{c}+{d:g}s" for c, d in RUNS])
def test_ctrl_c_exits_130_with_nothing_written(inputs, tmp_path, command, delay):
  for name in ("cal.npz", "small.npz", "pol.npz", "pol.json"):
    os.link(inputs / name, tmp_path / name)
  before = sorted(os.listdir(tmp_path))
  argv, marker = CASES[command]
  code, out, err = _interrupted(tmp_path, argv, marker, delay)
  assert code == 130, (code, err[-2000:])
  assert err.splitlines()[-1] == f"ttamer {command}: interrupted", err[-2000:]
  assert "Traceback" not in err, err[-2000:]
  assert sorted(os.listdir(tmp_path)) == before   # no output, no temporary file


# A command whose clean-up fails while a Ctrl-C unwinds it: the clean-up's OSError
# replaces the KeyboardInterrupt. Before, the OSError was reported as a usage error (exit 2) and the
# process went through the interpreter's teardown, which races XLA's threads (one SIGABRT
# in ~80 random tries, RELIABILITY.md R4).
_FAILED_CLEANUP = """
import os, signal, sys, time
import jax.numpy as jnp
from ttamer_jax.app import cli

def command(args):
  jnp.arange(4.0).sum().block_until_ready()   # XLA's threads are up
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
  finally:
    raise OSError("clean-up failed")

cli.COMMANDS["fit"] = command
sys.argv = ["ttamer", "fit", "cal.npz", "--out", "p.npz"]
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(cli.main())
"""


def test_an_error_while_an_interrupt_unwinds_still_exits_130(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  restore = (None if signal.getsignal(signal.SIGINT) != signal.SIG_IGN
             else lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  proc = subprocess.run([sys.executable, "-c", _FAILED_CLEANUP], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120, preexec_fn=restore)
  assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
  assert proc.stderr.splitlines()[-1] == "ttamer fit: interrupted", proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr[-2000:]
