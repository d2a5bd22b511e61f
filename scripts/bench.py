"""Speed and memory of the solvers, as ratios measured side by side in one run.

    python scripts/bench.py                # full run, prints tables, writes bench_results.json
    python scripts/bench.py --quick        # small sizes (a smoke run)

Every timing is the median of ``--repeats`` runs after a warm-up (compile) run,
with ``block_until_ready``. Ratios compare two things measured in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ttamer_jax as tj
from ttamer_jax import solvers


def timeit(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def paired_times(fn_a, args_a, fn_b, args_b, repeats: int = 5):
  """Median times of ``fn_a`` and ``fn_b`` and the median of their per-round ratio,
  alternating a and b so load changes hit both alike."""
  jax.block_until_ready(fn_a(*args_a))
  jax.block_until_ready(fn_b(*args_b))
  ta, tb = [], []
  for _ in range(repeats):
    for fn, args, out in ((fn_a, args_a, ta), (fn_b, args_b, tb)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - t0)
  ratio = statistics.median(a / b for a, b in zip(ta, tb))
  return statistics.median(ta), statistics.median(tb), ratio


def matmul_floor_fn(grid_size: int, precision=solvers.DEFAULT_PRECISION):
  """The solver's own matrix products alone: n-1 dependent [M, K] @ [K, K]^T."""

  @jax.jit
  def floor(trans):
    k = trans.shape[-1]
    g = jnp.ones((grid_size, k), trans.dtype) / k

    def body(g, t_mat):
      return jnp.einsum("xt,st->xs", g, t_mat, precision=precision), None

    return jax.lax.scan(body, g, trans, reverse=True)[0]

  return floor


def bench_solver_vs_matmul(sizes, n, repeats):
  rows = []
  for shared in (True, False):
    for k in sizes:
      c = tj.random_cascade(jax.random.PRNGKey(k), n, k, shared_grid=shared)
      m = solvers.grid_size_for(c.values)
      solve = jax.jit(lambda c, lam: solvers._solve_recall(c, lam, m, solvers.DEFAULT_PRECISION))
      t_solve, t_floor, ratio = paired_times(solve, (c, 0.5), matmul_floor_fn(m), (c.trans,),
                                             repeats=repeats)
      rows.append(dict(grid="shared (M=K)" if shared else "distinct (M=nK)", K=k, M=m,
                       solve_ms=1e3 * t_solve, matmul_floor_ms=1e3 * t_floor, ratio=ratio,
                       gflops=2 * (n - 1) * m * k * k / t_solve / 1e9))
  return rows


def bench_sweep(k, n, num_lams, repeats):
  c = tj.random_cascade(jax.random.PRNGKey(0), n, k, shared_grid=True)
  lams = jnp.linspace(0.0, 1.0, num_lams)
  batched = jax.jit(jax.vmap(lambda lam: tj.solve_recall(c, lam).value))
  t_batched = timeit(batched, lams, repeats=repeats)

  def loop(lams):
    return [tj.solve_recall(c, lam).value for lam in lams]

  lam_list = [float(l) for l in lams]
  t_loop = timeit(loop, lam_list, repeats=max(1, repeats // 2))
  return [dict(K=k, n=n, lams=num_lams, batched_ms=1e3 * t_batched, loop_ms=1e3 * t_loop,
               speedup=t_loop / t_batched, batched_solves_per_s=num_lams / t_batched,
               loop_solves_per_s=num_lams / t_loop)]


def bench_monte_carlo(k, n, num_paths, repeats):
  c = tj.random_cascade(jax.random.PRNGKey(0), n, k)
  policy = tj.recall_policy(c, 0.5)
  key = jax.random.PRNGKey(1)
  run = lambda key: tj.monte_carlo(key, c, policy, 0.5, num_paths).objective
  t = timeit(run, key, repeats=repeats)
  return [dict(K=k, n=n, paths=num_paths, seconds=t, stage_steps_per_s=num_paths * n / t)]


def bench_memory(sizes, n):
  rows = []
  for k in sizes:
    c = tj.random_cascade(jax.random.PRNGKey(k), n, k, shared_grid=True)
    m = solvers.grid_size_for(c.values)
    compiled = jax.jit(
        lambda c, lam: solvers._solve_recall(c, lam, m, solvers.DEFAULT_PRECISION)).lower(c, 0.5).compile()
    mem = compiled.memory_analysis()
    table = m * k * 4
    rows.append(dict(K=k, M=m, n=n, temp_MiB=mem.temp_size_in_bytes / 2**20,
                     input_MiB=mem.argument_size_in_bytes / 2**20,
                     one_table_MiB=table / 2**20, temp_over_one_table=mem.temp_size_in_bytes / table,
                     n_tables_MiB=n * table / 2**20))
  return rows


def print_table(title, rows):
  if not rows:
    return
  print(f"\n## {title}")
  cols = list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
  print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
  print("-|-".join("-" * w for w in widths))
  for r in rows:
    print(" | ".join(fmt(r[c]).rjust(w) for c, w in zip(cols, widths)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default="bench_results.json")
  args = parser.parse_args()
  n = 12
  sizes = [64, 128] if args.quick else [64, 256, 512, 1024]
  paths = 100_000 if args.quick else 1_000_000
  results = dict(
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), devices=[str(d) for d in jax.devices()],
                   jax=jax.__version__),
      solver_vs_matmul=bench_solver_vs_matmul(sizes, n, args.repeats),
      sweep=[row for k in (8, 64) for row in bench_sweep(k, n, 256, args.repeats)],
      monte_carlo=bench_monte_carlo(16, n, paths, args.repeats),
      memory=bench_memory(sizes, n),
  )
  print(f"machine: {results['machine']}")
  print_table("solve_recall vs its own matmuls (n = 12)", results["solver_vs_matmul"])
  print_table("lam sweep: one vmapped call vs a Python loop", results["sweep"])
  print_table("Monte-Carlo replay of the recall policy", results["monte_carlo"])
  print_table("solver memory (XLA buffer assignment)", results["memory"])
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
