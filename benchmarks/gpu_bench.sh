#!/usr/bin/env bash
# The benchmark suite at accelerator sizes, in one command, on a machine with a
# CUDA GPU and JAX (with its CUDA plugin) already installed. Installs nothing.
#
#   bash benchmarks/gpu_bench.sh                  # prints the tables, writes bench_results_gpu.json
#   BENCH_OUT=/tmp/gpu.json bash benchmarks/gpu_bench.sh --sections floor,sweep
#
# Sizes (benchmarks/bench.py --gpu): K up to 8192 against the solver's own matmuls and
# the GPU's measured matmul rate, sweeps of up to 65536 lams, 10^8 Monte-Carlo
# paths, a K = 8192 solve with its peak memory. Whole run bounded by TIME_LIMIT_S
# (default 460 s, under 8 minutes; at the limit bench.py is interrupted and still
# prints and writes what it measured); sections still pending after BUDGET_S
# (default 330 s) are skipped and listed. Measured on an H200: about 7 minutes
# (benchmarks/bench.py --gpu, 2026-11-28; see BENCHMARKS.md).
#
# Environment: PYTHON (default python3), BENCH_OUT (JSON path), TIME_LIMIT_S,
# BUDGET_S. Extra arguments go to benchmarks/bench.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
TIME_LIMIT_S="${TIME_LIMIT_S:-460}"
BUDGET_S="${BUDGET_S:-330}"
BENCH_OUT="${BENCH_OUT:-bench_results_gpu.json}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_bench: no '$PY' on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
"$PY" - <<'PYEOF' || exit 2
import sys
try:
  import jax
except Exception as e:  # noqa: BLE001
  sys.exit(f"gpu_bench: cannot import jax ({e}). Install jax with CUDA support first "
           "(e.g. pip install 'jax[cuda12]'); this script installs nothing.")
try:
  devices = jax.devices()
except Exception as e:  # noqa: BLE001
  sys.exit(f"gpu_bench: JAX found no usable backend ({e}).")
if jax.default_backend() != "gpu":
  sys.exit(f"gpu_bench: JAX sees no GPU (backend {jax.default_backend()!r}, devices {devices}). "
           "Check the CUDA driver (nvidia-smi) and that jax's CUDA plugin is installed. "
           "For a CPU run use: python benchmarks/bench.py")
print(f"gpu_bench: jax {jax.__version__}, {len(devices)} device(s): {devices[0].device_kind}")
PYEOF
command -v nvidia-smi >/dev/null 2>&1 && \
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true

set +e
timeout --signal=INT --kill-after=20 "$TIME_LIMIT_S" \
  "$PY" benchmarks/bench.py --gpu --require-gpu --budget-s "$BUDGET_S" --out "$BENCH_OUT" "$@"
status=$?
set -e
if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
  echo "gpu_bench: stopped after ${TIME_LIMIT_S} s (raise TIME_LIMIT_S, or pass --sections)" >&2
fi
exit "$status"
