"""Ctrl-C at random moments: runs ``python -m ttamer_jax`` fit / sweep / evaluate / demo on
small traces (compilation cache off) and sends SIGINT after a random delay.

Each run must exit 130 with the last stderr line ``ttamer[ CMD]: interrupted`` and leave
no output and no temporary file -- or, when it finished before the signal, exit 0 with
every output complete. RELIABILITY.md (case R4) reports a run; tests/test_interrupt.py
checks five fixed points of the same.

    python scripts/interrupt_loop.py --tries 20 --max-delay 15
"""

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

import ttamer_jax as tj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {  # command line, the outputs a finished run has written
    "fit": (["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "c.npz", "--no-progress"],
            {"p.npz", "p.json"}),
    "sweep": (["sweep", "cal.npz", "--plot", "f.png", "--no-progress"], {"f.png"}),
    "evaluate": (["evaluate", "pol.npz", "cal.npz", "--resamples", "200000"], set()),
    "demo": (["demo", "--workload", "synthetic", "--quick", "--out", "d", "--no-progress"], {"d"}),
}


def inputs(folder):
  rng = np.random.default_rng(0)
  conf = rng.uniform(0, 1, (200, 3))
  traces = tj.ExitTraces(scores=conf, preds=rng.integers(0, 5, (200, 3)),
                         losses=(rng.uniform(0, 1, (200, 3)) > conf).astype(float),
                         costs=[1.0, 2.0, 3.0], signals={"max_softmax": conf})
  tj.save_traces(os.path.join(folder, "cal.npz"), traces)
  tj.save_policy(os.path.join(folder, "pol.npz"),
                 tj.fit_cascade(traces, 4, score="max_softmax").recall_policy(0.8))


def one_run(folder, command, delay):
  argv, outputs = COMMANDS[command]
  before = set(os.listdir(folder))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  restore = (None if signal.getsignal(signal.SIGINT) != signal.SIG_IGN
             else lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  proc = subprocess.Popen([sys.executable, "-m", "ttamer_jax", *argv, "--cache-dir", ""],
                          cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=restore)
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=600)
  new = set(os.listdir(folder)) - before
  last = (err.strip().splitlines() or [""])[-1]
  if proc.returncode == 130:
    ok = not new and last.startswith("ttamer") and last.endswith(": interrupted")
  else:
    ok = proc.returncode == 0 and new == outputs
  ok = ok and "Traceback" not in err
  return proc.returncode, ok, last if ok else err[-3000:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tries", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min-delay", type=float, default=0.5)
  parser.add_argument("--max-delay", type=float, default=15.0)
  parser.add_argument("--commands", default=",".join(COMMANDS))
  args = parser.parse_args()
  rng = random.Random(args.seed)
  commands = args.commands.split(",")
  outcomes = collections.Counter()
  with tempfile.TemporaryDirectory() as root:
    inputs(root)
    for i in range(args.tries):
      command, delay = rng.choice(commands), rng.uniform(args.min_delay, args.max_delay)
      folder = os.path.join(root, f"run{i}")
      os.mkdir(folder)
      for name in ("cal.npz", "pol.npz", "pol.json"):
        shutil.copy(os.path.join(root, name), folder)
      code, ok, last = one_run(folder, command, delay)
      outcomes[(code, ok)] += 1
      print(f"{command:9s} SIGINT at {delay:5.2f} s: exit {code}, {'ok' if ok else 'FAILED'} ({last})",
            flush=True)
  print("outcomes (exit code, ok):", dict(outcomes))
  return 0 if all(ok for _, ok in outcomes) else 1


if __name__ == "__main__":
  sys.exit(main())
