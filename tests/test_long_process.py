"""One long-lived process fitting many calibration sets (issue 24, RELIABILITY.md case G5).

A service that re-fits its policy as traffic comes in calls ``tj.fit_policy`` on a new
number of requests each time. Before request padding (``data.fitting.request_bucket``:
every count up to 4096 shares one program per shape) each new count compiled 40-100
programs and the process grew by 60-190 MB per count. The bound tested here, in a fresh
process without the persistent compilation cache: 20 fits (default candidates) on
200..219 requests x 3 stages; each new count compiles at most 2 programs, and the
resident memory after the last fit stays within 1.5x of that after the first.
"""

import json
import os
import subprocess
import sys
import textwrap

MAX_NEW_PROGRAMS = 2     # per new number of requests
MAX_RSS_GROWTH = 1.5     # RSS after the 20th fit / RSS after the first

FITS = textwrap.dedent("""
    import json, os
    import jax
    import numpy as np
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiled.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    import ttamer_jax as tj

    def rss():
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    out = []
    for num in range(200, 220):
      rng = np.random.default_rng(num)
      conf = rng.uniform(0, 1, (num, 3))
      traces = tj.ExitTraces(scores=conf, preds=rng.integers(0, 5, (num, 3)),
                             losses=(rng.uniform(0, 1, (num, 3)) > conf).astype(float),
                             costs=[1.0, 2.0, 3.0], signals={"max_softmax": conf})
      before = len(compiled)
      tj.fit_policy(traces, 0.9, num_resamples=100)
      out.append((len(compiled) - before, rss()))
    print(json.dumps(out))
""")


def test_twenty_fits_on_twenty_request_counts_stay_bounded():
  if not os.path.exists("/proc/self/statm"):
    import pytest
    pytest.skip("resident memory read from /proc (Linux)")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "-c", FITS], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  programs = [p for p, _ in out]
  rss = [r for _, r in out]
  print(f"\nprograms compiled per fit: {programs}; RSS after fit 1 {rss[0] / 2**20:.0f} MiB, "
        f"after fit 20 {rss[-1] / 2**20:.0f} MiB (x{rss[-1] / rss[0]:.3f}), "
        f"largest x{max(rss) / rss[0]:.3f}")
  assert programs[0] >= 1                                 # the listener sees compilations
  assert max(programs[1:]) <= MAX_NEW_PROGRAMS, programs
  assert max(rss) <= MAX_RSS_GROWTH * rss[0], [r / rss[0] for r in rss]
