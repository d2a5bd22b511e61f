"""Speed and memory of the solvers: ``python scripts/bench.py [--quick] [--gpu] ...``.

A thin wrapper: the benchmark suite lives in :mod:`ttamer_jax.app.bench` (also run by
``ttamer bench``); see its docstring for the sections and flags. Every name of
that module is re-exported here, so ``tests/test_bench.py`` and older imports of
this file keep working.
"""

import os
import sys

# Before JAX starts a backend: grow GPU memory on demand (see ttamer_jax.app.bench).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttamer_jax.app import bench as _bench  # noqa: E402

globals().update({k: v for k, v in vars(_bench).items() if not k.startswith("__")})

if __name__ == "__main__":
  sys.exit(_bench.main())
