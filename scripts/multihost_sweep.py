"""A sweep sharded over several hosts with JAX's own distributed runtime.

Every host runs this same script (JAX's multi-controller model: one process per
host, identical programs and arguments). ``jax.distributed.initialize`` joins
the processes; :func:`ttamer_jax.sweep` then shards the pair grid over the
devices of *all* hosts, and ``process_allgather`` brings the values to each host.

On a cluster (one process per host)::

    # host 0 (the coordinator) and hosts 1..N-1, with the same --coordinator:
    python scripts/multihost_sweep.py --coordinator HOST0:12345 \\
        --num-processes N --process-id I [--instances 64 --lams 256 --states 64]

Under SLURM, Open MPI, or on Cloud TPU pods ``jax.distributed.initialize()``
finds all three by itself: pass ``--auto``.

On one machine, as a test of the multi-process path (two CPU processes with
two devices each, talking over localhost)::

    python scripts/multihost_sweep.py --local 2 --devices-per-process 2

The coordinator prints the result table's shape, the devices and processes it
was sharded over, and the largest difference from single solves of a few pairs.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(args) -> int:
  """Starts ``args.local`` processes of this script on localhost and waits."""
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={args.devices_per_process}")
  env["JAX_PLATFORMS"] = "cpu"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  procs = []
  for pid in range(args.local):
    cmd = [sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", str(args.local), "--process-id", str(pid),
           "--instances", str(args.instances), "--lams", str(args.lams),
           "--states", str(args.states), "--stages", str(args.stages), "--cpu-collectives"]
    procs.append(subprocess.Popen(cmd, env=env))
  try:
    codes = [p.wait(timeout=args.timeout) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    print(f"multihost_sweep: processes did not finish within {args.timeout} s", file=sys.stderr)
    return 1
  return max(codes)


def run(args) -> int:
  import jax
  if args.cpu_collectives:
    # Cross-process collectives on CPU (process_allgather) go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  import numpy as np
  from jax.experimental import multihost_utils

  import ttamer_jax as tj
  from ttamer_jax import sweep

  # Same seed on every process: identical inputs, as multi-controller JAX needs.
  keys = jax.random.split(jax.random.PRNGKey(0), args.instances)
  cascades = jax.vmap(lambda k: tj.random_cascade(k, args.stages, args.states))(keys)
  lams = np.linspace(0.0, 1.0, args.lams)
  result = sweep(cascades, lams, return_tables=False)      # mesh: all global devices
  values = np.asarray(multihost_utils.process_allgather(result.value, tiled=True))

  # Spot-check a few pairs against single solves on this process's devices.
  worst = 0.0
  for i, j in [(0, 0), (args.instances - 1, args.lams - 1), (args.instances // 2, args.lams // 2)]:
    c = jax.tree.map(lambda a: a[i], cascades)
    worst = max(worst, abs(float(tj.solve_recall(c, float(lams[j])).value) - float(values[i, j])))
  ok = worst <= 1e-6
  if jax.process_index() == 0:
    print(f"processes: {jax.process_count()}, devices: {jax.device_count()} "
          f"({jax.local_device_count()} per process), value table {values.shape}, "
          f"sharded over {len(result.value.sharding.device_set)} devices, "
          f"max |sweep - single solve| on spot checks = {worst:.2e} -> {'OK' if ok else 'MISMATCH'}")
  jax.distributed.shutdown()
  return 0 if ok else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--coordinator", help="HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--auto", action="store_true",
                      help="let jax.distributed.initialize() detect the cluster")
  parser.add_argument("--local", type=int, default=0,
                      help="start this many processes on localhost (CPU) and wait for them")
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument("--cpu-collectives", action="store_true",
                      help="use gloo for cross-process collectives on CPU")
  parser.add_argument("--instances", type=int, default=8)
  parser.add_argument("--lams", type=int, default=64)
  parser.add_argument("--states", type=int, default=16)
  parser.add_argument("--stages", type=int, default=6)
  parser.add_argument("--timeout", type=float, default=300.0)
  args = parser.parse_args()
  if args.local:
    return launch_local(args)
  if not args.auto and (args.coordinator is None or args.num_processes is None
                        or args.process_id is None):
    parser.error("give --coordinator, --num-processes and --process-id (or --auto, or --local N)")
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
