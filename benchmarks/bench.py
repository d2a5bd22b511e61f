"""Speed and memory of the solvers, each measured next to what a user would
otherwise use, in one run.

    python benchmarks/bench.py                 # CPU sizes (~10 min on 2 cores), writes bench_results.json
    python benchmarks/bench.py --quick         # small sizes, a smoke run (~1 min)
    python benchmarks/bench.py --gpu           # accelerator sizes: K up to 8192, sweeps up to 65536 lams
    python benchmarks/bench.py --gpu --quick   # the --gpu code path at tiny sizes (runs on a CPU)
    python benchmarks/bench.py --sections floor,numpy   # a subset
    python benchmarks/bench.py --sections select --select-traces ttamer_demo_out/calibration_traces.npz
    ttamer bench                            # the same, --quick sizes by default (--full for CPU sizes)

Sections (each a table, all in the JSON; all but the opt-in ``select`` run by
default, and it too with ``--quick``):
  floor    ``solve_recall`` vs its own n-1 matrix products, and vs the machine's
           measured matmul rate;
  numpy    vs a vectorised NumPy implementation of the same recursion (one solve,
           and a 256-lam sweep vs a NumPy loop);
  mdp      vs a general finite-horizon MDP solver on the equivalent explicit MDP
           (state = (stage, best-so-far, state)): pymdptoolbox's ``FiniteHorizon``
           when installed, else a generic sparse backward induction (labelled);
  sweep    ``ttamer_jax.sweep`` over S = I x L pairs in one call vs a Python loop
           of single ``solve_recall`` calls (solves/s);
  batch    ``ttamer_jax.sweep`` over lams and over many cascades: with its policy tables
           vs without them (goal <= 1.3x) and vs its own stage products alone
           (``batch_products_fn``; goal <= 1.3x), with the same recursion vectorised
           over the whole batch in NumPy and the measured matmul rate as references;
  replay   ``replay_totals`` of 256-policy grids (recall lam grid, threshold grid) on
           N = 10^6 requests x 8 stages: stage-steps/s (goal >= 2e8) vs the one-policy
           replay vmapped over the grid, and the blocked program's XLA temp memory;
  mc       Monte-Carlo (sample + replay of the recall policy): stage-steps/s vs a
           vectorised NumPy sampler + replay;
  memory   XLA's buffer assignment of the compiled solver: temp bytes vs one
           ``[M, K]`` table (O(M K), not O(n M K));
  large    one K = 4096 (``--gpu``: 8192) solve: time and measured peak memory;
  profile  HLO checks: no float64 ops under x64 with float32 inputs, no
           recompilation per lam, gathers fused, sweep buffers donated, and the
           in-jit grid sort the public solver now avoids;
  select   the validated fitting path (cross-fitted selection, ``fit_policy`` at
           lam 0.9), each run in a fresh process with JAX's persistent compilation
           cache off: wall seconds of each call, XLA compilations during it and the
           process's peak RSS (ru_maxrss, so far). (a) the whole ``ttamer fit TRACES
           --lam 0.9 --out P`` command (wall time of the process) on
           ``--select-traces PATH`` (e.g. the demo's calibration_traces.npz), else
           on generated 400 x 4 traces; (b) 10^4 requests x 4 stages, cold then
           warm (second call, same data); (c) 10^5 x 4, cold and warm; (d) 10^4,
           then 10^4 + 37, then 3,001 requests in one process. Traces: 4 of the 5
           stages of ``model_cascade`` (scikit-learn, trained offline, ~1 min; fixed
           costs), rows resampled with a fixed seed past its 10,500; ``--quick``:
           synthetic traces, (a) and 2000, 2000, 2037. Opt-in (~4 min, 2 cores):
           ``python benchmarks/bench.py --sections select [--select-traces PATH]``;
  compile  first-call time of solve / sweep / replay / evaluate / fit in a fresh
           process, and the number of compilations as the batch size varies.

Timing: every ratio is measured in alternating rounds (a, b, a, b, ...) after a
warm-up (compile) call, with ``block_until_ready``; the reported ratio is the
median of the per-round ratios, so load on a shared machine hits both sides
alike. Correctness checks (values agree to 1e-5, Monte-Carlo within 4 standard
errors of the exact value, the profile checks) are recorded; the script exits
with status 1 if one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

# The one place the harness's memory setting is made, before JAX starts a backend: grow
# GPU memory on demand (JAX preallocates 75% otherwise), so that the large-K worker
# process can allocate beside this one and peaks are the program's own.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a file from a checkout (python benchmarks/bench.py) or loaded by `ttamer bench`:
# the checkout's ttamer_jax and this folder's modules are importable either way.
sys.path[:0] = [p for p in (os.path.dirname(HERE), HERE) if p not in sys.path]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from reference_solvers import explicit_mdp, mdp_solver, numpy_monte_carlo, numpy_solve_recall, numpy_sweep  # noqa: E402

import ttamer_jax as tj  # noqa: E402
from ttamer_jax.core import kernel, sharded  # noqa: E402
from ttamer_jax.core.solvers import solve_recall_on_grid  # noqa: E402

P = kernel.DEFAULT_PRECISION
TOL = 1e-5  # |value - reference| <= TOL * max(1, |reference|)

# select: (case, request counts) per fresh process -- "a" the whole `ttamer fit` command,
# else one fit_policy call per count -- on traces of select_stages exits cut from
# select_source (see bench_select).
SELECT_FULL = dict(select_source="model_cascade", select_stages=4,
                   select_runs=[("a", [400]), ("b", [10_000, 10_000]),
                                ("c", [100_000, 100_000]), ("d", [10_000, 10_037, 3_001])])
SELECT_QUICK = dict(select_source="synthetic", select_stages=4,
                    select_runs=[("a", [400]), ("b", [2000, 2000, 2037])])

# Sizes per mode: floor/memory K lists, distinct-grid K cap, NumPy/MDP K lists,
# sweep (K list, pair counts, loop cap), Monte-Carlo path counts (NumPy cap), large K.
CONFIGS = {
    "cpu": dict(floor_k=[64, 256, 512, 1024, 2048], distinct_max_k=1024,
                numpy_k=[8, 16, 32, 64, 128, 256], mdp_k=[8, 16, 32, 64, 128],
                sweep_k=[8, 64], sweep_sizes=[1, 16, 256, 4096], loop_cap=1024,
                mc_k=16, mc_paths=[10**6, 10**7], mc_numpy_cap=10**7,
                memory_k=[64, 256, 512, 1024, 2048, 4096], large_k=4096,
                matmul_n=2048, max_round_s=30.0, **SELECT_FULL,
                batch_cases=[(8, 1, 4096), (32, 1, 4096), (128, 1, 512), (256, 1, 64),
                             (8, 256, 16), (32, 64, 64)],
                replay_n=10**6, replay_ref_n=10**5, replay_policies=256),
    "quick": dict(floor_k=[16, 64], distinct_max_k=64, numpy_k=[8, 32], mdp_k=[4, 8],
                  sweep_k=[8], sweep_sizes=[1, 16, 256], loop_cap=64,
                  mc_k=8, mc_paths=[10**5], mc_numpy_cap=10**5,
                  memory_k=[64, 128], large_k=256, matmul_n=512, **SELECT_QUICK,
                  max_round_s=5.0, batch_cases=[(8, 1, 256), (8, 16, 16)],
                  replay_n=20_000, replay_ref_n=5000, replay_policies=64, compile_quick=True),
    "gpu": dict(floor_k=[256, 1024, 2048, 4096, 8192], distinct_max_k=4096,
                numpy_k=[8, 32, 128, 256], mdp_k=[8, 16, 32],
                sweep_k=[64, 256], sweep_sizes=[1, 16, 256, 4096, 65536], loop_cap=256,
                mc_k=16, mc_paths=[10**6, 10**7, 10**8], mc_numpy_cap=10**7,
                memory_k=[1024, 4096, 8192], large_k=8192, matmul_n=8192, **SELECT_FULL,
                max_round_s=8.0,
                batch_cases=[(8, 1, 4096), (32, 1, 4096), (128, 1, 512), (256, 1, 256),
                             (8, 256, 16), (32, 64, 64)],
                replay_n=10**7, replay_ref_n=10**6, replay_policies=256),
    "gpu_quick": dict(floor_k=[64, 128], distinct_max_k=64, numpy_k=[8], mdp_k=[4],
                      sweep_k=[16], sweep_sizes=[1, 16, 1024], loop_cap=16,
                      mc_k=8, mc_paths=[10**5], mc_numpy_cap=10**5,
                      memory_k=[64, 256], large_k=256, matmul_n=256, **SELECT_QUICK,
                      max_round_s=5.0, batch_cases=[(8, 1, 256), (8, 16, 16)],
                      replay_n=20_000, replay_ref_n=5000, replay_policies=64,
                      compile_quick=True),
}
SECTIONS = ("floor", "sweep", "batch", "replay", "large", "memory", "numpy", "mdp", "mc",
            "profile", "select", "compile")
# Run only when named (--sections) outside --quick: the full select takes ~4 min.
OPT_IN = ("select",)


# ------------------------------------------------------------------ timing
def _run(fn, args):
  return jax.block_until_ready(fn(*args))


def paired_times(fn_a, args_a, fn_b, args_b, *, repeats: int, max_seconds: float,
                 settle: bool = False):
  """Median times of ``fn_a`` and ``fn_b`` and the median of their per-round ratio,
  alternating a and b so load changes hit both alike. At least 3 rounds; stops
  early after ``max_seconds``.

  ``settle``: one untimed call of each side before its timed call in every round.
  For two runtimes (JAX vs NumPy): OpenBLAS's threads keep spinning after a NumPy
  product and XLA's thread pool sleeps between calls, so a call right after the
  other side's ran up to 2x slower (a K = 128 sweep: 182 ms right after NumPy,
  89 ms back to back) -- a cost neither pays when run on its own."""
  _run(fn_a, args_a)
  _run(fn_b, args_b)
  ta, tb = [], []
  start = time.perf_counter()
  for r in range(repeats):
    for fn, args, out in ((fn_a, args_a, ta), (fn_b, args_b, tb)):
      if settle:
        _run(fn, args)
      t0 = time.perf_counter()
      _run(fn, args)
      out.append(time.perf_counter() - t0)
    if r >= 2 and time.perf_counter() - start > max_seconds:
      break
  ratio = statistics.median(a / b for a, b in zip(ta, tb))
  return statistics.median(ta), statistics.median(tb), ratio


def agree(a: float, b: float) -> bool:
  return abs(a - b) <= TOL * max(1.0, abs(b))


class Checks:
  """Named pass/fail results, printed and stored in the JSON."""

  def __init__(self):
    self.items = []

  def add(self, name: str, ok: bool, detail: str = ""):
    self.items.append(dict(check=name, ok=bool(ok), detail=detail))
    if not ok:
      print(f"  CHECK FAILED: {name}: {detail}", flush=True)

  @property
  def ok(self) -> bool:
    return all(c["ok"] for c in self.items)


# --------------------------------------------------------------- instances
def _cascade_from(values, init, trans, costs) -> tj.Cascade:
  """A Cascade without re-validating arrays valid by construction (at K = 8192
  validation would copy gigabytes to the host)."""
  probe = object.__new__(tj.Cascade)
  for f in ("values", "init", "trans", "costs"):
    object.__setattr__(probe, f, 0)
  return jax.tree.unflatten(jax.tree.structure(probe), [values, init, trans, costs])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_arrays(key, n, k, shared):
  # Dirichlet(1) rows as normalised exponentials: as tj.random_cascade, but
  # without gamma sampling, which is slow at K = 8192.
  kv, ki, kt, kc = jax.random.split(key, 4)
  if shared:
    values = jnp.broadcast_to(jnp.linspace(0.0, 1.0, k), (n, k))
  else:
    values = jax.random.uniform(kv, (n, k))
  expo = lambda key, shape: -jnp.log(jax.random.uniform(key, shape, minval=1e-12))
  init = expo(ki, (k,))
  trans = expo(kt, (n - 1, k, k))
  costs = 0.05 * jax.random.uniform(kc, (n,))
  return values, init / init.sum(), trans / trans.sum(-1, keepdims=True), costs


def bench_cascade(seed: int, n: int, k: int, shared: bool) -> tj.Cascade:
  return _cascade_from(*_random_arrays(jax.random.PRNGKey(seed), n, k, shared))


def compiled_solver(c: tj.Cascade):
  """The public solver's compiled core with its NumPy grid, and its arguments."""
  grid, pos = kernel.prepare_grid(c.values)
  chunk = kernel.default_x_chunk(grid.size, c.num_states, grid.dtype.itemsize)
  fn = jax.jit(lambda c, lam, g, p: solve_recall_on_grid(c, lam, g, p, P, chunk))
  return fn, (jnp.asarray(grid), jnp.asarray(pos))


# ---------------------------------------------------------------- sections
def matmul_fn(size: int, dtype=jnp.float32):
  """``(fn, (a,), flops)``: one ``[size, size] @ [size, size]`` at the solver's precision."""
  a = jax.random.uniform(jax.random.PRNGKey(0), (size, size), dtype)
  return jax.jit(lambda a: jnp.dot(a, a, precision=P)), (a,), 2 * size**3


def matmul_rate(size: int, dtype=jnp.float32) -> float:
  """Measured GFLOP/s of one ``[size, size] @ [size, size]`` at the solver's precision."""
  mm, args, flops = matmul_fn(size, dtype)
  _run(mm, args)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    _run(mm, args)
    times.append(time.perf_counter() - t0)
  return flops / statistics.median(times) / 1e9


def matmul_floor_fn(grid_size: int):
  """The solver's own matrix products alone: n-1 dependent [M, K] @ [K, K]^T."""

  @jax.jit
  def floor(trans):
    k = trans.shape[-1]
    g = jnp.ones((grid_size, k), trans.dtype) / k

    def body(g, t_mat):
      return jnp.einsum("xt,st->xs", g, t_mat, precision=P), None

    return jax.lax.scan(body, g, trans, reverse=True)[0]

  return floor


def bench_floor(cfg, n, repeats, peak_gflops):
  rows = []
  for shared in (True, False):
    for k in cfg["floor_k"]:
      if not shared and k > cfg["distinct_max_k"]:
        continue
      c = bench_cascade(k, n, k, shared)
      solve, (grid, pos) = compiled_solver(c)
      m = int(grid.shape[0])
      t_solve, t_floor, ratio = paired_times(
          solve, (c, 0.5, grid, pos), matmul_floor_fn(m), (c.trans,),
          repeats=repeats, max_seconds=cfg["max_round_s"])
      gflops = 2 * (n - 1) * m * k * k / t_solve / 1e9
      rows.append(dict(grid="shared" if shared else "distinct", K=k, M=m,
                       solve_ms=1e3 * t_solve, floor_ms=1e3 * t_floor, ratio=ratio,
                       gflops=gflops, frac_of_matmul_peak=gflops / peak_gflops))
      print(f"  floor {rows[-1]['grid']} K={k}: ratio {ratio:.2f}", flush=True)
  return rows


def bench_numpy(cfg, n, repeats, checks):
  rows = []
  for k in cfg["numpy_k"]:
    c = bench_cascade(100 + k, n, k, shared=False)
    arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
    jax_value = float(tj.solve_recall(c, 0.5).value)
    np_value = float(numpy_solve_recall(*arrays, 0.5))
    checks.add(f"numpy recursion agrees K={k}", agree(jax_value, np_value),
               f"jax {jax_value:.9g} numpy {np_value:.9g}")
    t_jax, t_np, ratio = paired_times(
        lambda: tj.solve_recall(c, 0.5).value, (), lambda: numpy_solve_recall(*arrays, 0.5), (),
        repeats=max(repeats, 15), max_seconds=cfg["max_round_s"])
    rows.append(dict(kind="one solve", K=k, M=int(np.unique(arrays[0]).size), jax_ms=1e3 * t_jax,
                     numpy_ms=1e3 * t_np, speedup=1 / ratio, max_abs_diff=abs(jax_value - np_value)))
    print(f"  numpy K={k}: speedup {1 / ratio:.2f}", flush=True)
  # A 256-lam sweep: one call vs the NumPy function in a loop over lam.
  lams = np.linspace(0.0, 1.0, 256)
  for k in cfg["numpy_k"][:3]:
    c = bench_cascade(200 + k, n, k, shared=True)
    arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
    swept = np.asarray(tj.sweep(c, lams, return_tables=False).value)
    looped = np.array([numpy_solve_recall(*arrays, lam) for lam in lams])
    diff = float(np.max(np.abs(swept - looped)))
    checks.add(f"numpy loop agrees with sweep K={k}", diff <= TOL, f"max diff {diff:.2e}")
    t_jax, t_np, ratio = paired_times(
        lambda: tj.sweep(c, lams, return_tables=False).value, (),
        lambda: [numpy_solve_recall(*arrays, lam) for lam in lams], (),
        repeats=repeats, max_seconds=cfg["max_round_s"])
    rows.append(dict(kind="256-lam sweep", K=k, M=k, jax_ms=1e3 * t_jax, numpy_ms=1e3 * t_np,
                     speedup=1 / ratio, max_abs_diff=diff))
  return rows


def bench_mdp(cfg, n, repeats, checks):
  label, solve_mdp = mdp_solver()
  rows = []
  for k in cfg["mdp_k"]:
    nonzeros = (n - 1) * k**3
    if nonzeros * 48 > 4 << 30:  # COO build + CSR, float64 and int64: keep under ~4 GiB
      print(f"  mdp K={k}: skipped ({nonzeros:.3g} nonzeros would not fit)", flush=True)
      continue
    c = bench_cascade(300 + k, n, k, shared=True)
    arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
    t0 = time.perf_counter()
    p, r, start, horizon = explicit_mdp(*arrays, 0.5)
    t_build = time.perf_counter() - t0
    mdp_value = start(solve_mdp(p, r, horizon))
    jax_value = float(tj.solve_recall(c, 0.5).value)
    checks.add(f"MDP solver agrees K={k}", agree(jax_value, mdp_value),
               f"jax {jax_value:.9g} {label} {mdp_value:.9g}")
    t_jax, t_mdp, ratio = paired_times(
        lambda: tj.solve_recall(c, 0.5).value, (), lambda: solve_mdp(p, r, horizon), (),
        repeats=repeats, max_seconds=cfg["max_round_s"])
    rows.append(dict(K=k, mdp_states=r.shape[0], mdp_nonzeros=int(p[1].nnz), jax_ms=1e3 * t_jax,
                     mdp_solve_ms=1e3 * t_mdp, mdp_build_ms=1e3 * t_build, speedup=1 / ratio,
                     max_abs_diff=abs(jax_value - mdp_value)))
    print(f"  mdp K={k}: speedup {1 / ratio:.0f}", flush=True)
  return rows, label


def bench_sweep(cfg, n, repeats, checks):
  rows = []
  for k in cfg["sweep_k"]:
    for size in cfg["sweep_sizes"]:
      side = int(round(size ** 0.5))
      layouts = [(1, size)] + ([(side, size // side)] if size >= 16 and side * side == size else [])
      for num, num_lams in layouts:
        keys = jax.random.split(jax.random.PRNGKey(k + size), num)
        batch = jax.vmap(lambda key: _cascade_from(*_random_arrays(key, n, k, True)))(keys)
        lams = np.linspace(0.0, 1.0, num_lams)
        singles = [_cascade_from(*(a[i] for a in (batch.values, batch.init, batch.trans,
                                                   batch.costs))) for i in range(num)]
        pairs = [(i, float(l)) for i in range(num) for l in lams]
        step = max(1, len(pairs) // cfg["loop_cap"])
        timed = pairs[::step][:cfg["loop_cap"]]  # the loop's rate is per solve
        swept = tj.sweep(batch, lams, return_tables=False).value
        got = np.asarray(swept).reshape(-1)[[i * num_lams + j for i in range(num)
                                             for j in range(num_lams)][::step][:cfg["loop_cap"]]]
        ref = np.array([float(tj.solve_recall(singles[i], lam).value) for i, lam in timed])
        diff = float(np.max(np.abs(got - ref)))
        checks.add(f"sweep agrees with single solves K={k} {num}x{num_lams}", diff <= TOL,
                   f"max diff {diff:.2e}")
        t_sweep, t_loop, ratio = paired_times(
            lambda: tj.sweep(batch, lams, return_tables=False).value, (),
            lambda: [tj.solve_recall(singles[i], lam).value for i, lam in timed], (),
            repeats=repeats, max_seconds=cfg["max_round_s"])
        sweep_rate, loop_rate = size / t_sweep, len(timed) / t_loop
        # Per-solve time ratio from the paired rounds (loop / sweep).
        rows.append(dict(K=k, instances=num, lams=num_lams, pairs=size, sweep_ms=1e3 * t_sweep,
                         sweep_solves_per_s=sweep_rate, loop_solves_per_s=loop_rate,
                         loop_pairs_timed=len(timed), speedup=size / len(timed) / ratio))
        print(f"  sweep K={k} {num}x{num_lams}: {sweep_rate:.0f}/s vs loop {loop_rate:.0f}/s",
              flush=True)
  return rows


def bench_mc(cfg, n, repeats, checks):
  k = cfg["mc_k"]
  c = bench_cascade(400, n, k, shared=False)
  lam = 0.5
  policy = tj.recall_policy(c, lam)
  exact = float(tj.solve_recall(c, lam).value)
  arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
  index = np.asarray(policy.index)
  key = jax.random.PRNGKey(1)
  rows = []
  for paths in cfg["mc_paths"]:
    run_jax = lambda: tj.monte_carlo(key, c, policy, lam, paths)
    est = run_jax()
    z = abs(float(est.objective) - exact) / float(est.objective_se)
    checks.add(f"JAX Monte-Carlo within 4 SE of exact ({paths} paths)", z <= 4, f"z = {z:.2f}")
    row = dict(K=k, n=n, paths=paths)
    if paths <= cfg["mc_numpy_cap"]:
      np_mean, np_se = numpy_monte_carlo(0, *arrays, index, lam, paths)
      z_np = abs(np_mean - exact) / np_se
      checks.add(f"NumPy Monte-Carlo within 4 SE of exact ({paths} paths)", z_np <= 4,
                 f"z = {z_np:.2f}")
      t_jax, t_np, ratio = paired_times(
          lambda: run_jax().objective, (),
          lambda: numpy_monte_carlo(0, *arrays, index, lam, paths), (),
          repeats=min(repeats, 3), max_seconds=cfg["max_round_s"])
      row.update(jax_s=t_jax, numpy_s=t_np, jax_steps_per_s=paths * n / t_jax,
                 numpy_steps_per_s=paths * n / t_np, speedup=1 / ratio)
    else:
      t_jax = statistics.median(_timed(lambda: run_jax().objective) for _ in range(3))
      row.update(jax_s=t_jax, numpy_s=None, jax_steps_per_s=paths * n / t_jax,
                 numpy_steps_per_s=None, speedup=None)
    rows.append(row)
    print(f"  mc {paths} paths: {row['jax_steps_per_s']:.3g} stage-steps/s", flush=True)
  return rows


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _abstract_cascade(n, k, dtype=jnp.float32):
  shapes = [(n, k), (k,), (n - 1, k, k), (n,)]
  return _cascade_from(*(jax.ShapeDtypeStruct(s, dtype) for s in shapes))


def bench_memory(cfg, n):
  """XLA's buffer assignment of the compiled solver (compiled, not run)."""
  rows = []
  for shared in (True, False):
    for k in cfg["memory_k"]:
      m = k if shared else n * k
      c = _abstract_cascade(n, k)
      chunk = kernel.default_x_chunk(m, k)
      compiled = solve_recall_on_grid.lower(
          c, 0.5, jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((n, k), jnp.int32),
          P, chunk).compile()
      mem = compiled.memory_analysis()
      table = m * k * 4
      rows.append(dict(grid="shared" if shared else "distinct", K=k, M=m, x_chunk=chunk or m,
                       temp_MiB=mem.temp_size_in_bytes / 2**20,
                       input_MiB=mem.argument_size_in_bytes / 2**20, one_table_MiB=table / 2**20,
                       temp_over_one_table=mem.temp_size_in_bytes / table,
                       n_tables_MiB=n * table / 2**20))
  return rows


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


@functools.partial(jax.jit, static_argnums=(1, 2))
def _large_arrays(key, n, k):
  # Shared grid; transitions made one stage at a time (lax.map) so generating
  # them peaks at the inputs plus one [K, K] temporary, below the solve's peak.
  ki, kt, kc = jax.random.split(key, 3)
  expo = lambda key, shape: -jnp.log(jax.random.uniform(key, shape, minval=1e-12))
  normalise = lambda e: e / e.sum(-1, keepdims=True)
  trans = jax.lax.map(lambda key: normalise(expo(key, (k, k))), jax.random.split(kt, n - 1))
  values = jnp.broadcast_to(jnp.linspace(0.0, 1.0, k), (n, k))
  return values, normalise(expo(ki, (k,))), trans, 0.05 * jax.random.uniform(kc, (n,))


def large_worker(n: int, k: int) -> dict:
  """One K x K solve in this (fresh) process, with its measured peak memory."""
  device = jax.devices()[0]
  t0 = time.perf_counter()
  c = _cascade_from(*jax.block_until_ready(_large_arrays(jax.random.PRNGKey(500), n, k)))
  t_make = time.perf_counter() - t0
  solve, (grid, pos) = compiled_solver(c)
  t0 = time.perf_counter()
  compiled = solve.lower(c, 0.5, grid, pos).compile()
  t_compile = time.perf_counter() - t0
  temp = compiled.memory_analysis().temp_size_in_bytes
  on_cpu = device.platform == "cpu"
  before = _rss_bytes() if on_cpu else (device.memory_stats() or {}).get("bytes_in_use", 0)
  t0 = time.perf_counter()
  sol = jax.block_until_ready(compiled(c, 0.5, grid, pos))
  t_solve = time.perf_counter() - t0
  if on_cpu:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    how = "process max RSS - RSS before the solve (fresh process)"
  else:
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    how = "device peak_bytes_in_use - bytes_in_use before the solve (fresh process)"
  table = k * k * 4
  return dict(K=k, M=int(grid.shape[0]), n=n, make_s=t_make, compile_s=t_compile,
              solve_s=t_solve, gflops=2 * (n - 1) * k**3 / t_solve / 1e9,
              xla_temp_MiB=temp / 2**20, measured_peak_extra_MiB=max(peak - before, 0) / 2**20,
              one_table_MiB=table / 2**20, inputs_MiB=(n - 1) * table / 2**20,
              value=float(sol.value), how_measured=how)


# ------------------------------------------------------------------ select
# The validated fitting path (``ttamer fit`` / ``fit_policy``), every process fresh and
# JAX's persistent compilation cache off, so "cold" is what a new user process pays.
SELECT_LAM = 0.9
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# model_cascade's stages kept for n stages: the first n - 1 and boosting. Its measured
# timings are replaced by these fixed ms per request (tree, logistic, naive_bayes,
# forest, boosting; medians once measured on a 2-core CPU), so the files are
# deterministic; fit_policy normalises costs by their sum, so only ratios matter.
SELECT_MC_COSTS = (0.0011, 0.0031, 0.0029, 0.105, 0.096)
# `ttamer fit` in this (fresh) interpreter as `python -m ttamer_jax` runs it, with a
# listener that counts XLA compilations; reports them and the peak RSS at exit.
SELECT_CLI = """\
import atexit, resource, runpy, sys, jax
n = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: n.append(1) if event == {event!r} else None)
atexit.register(lambda: print("SELECT " + '{{"compilations": %d, "peak_rss_MiB": %.1f}}' % (
    len(n), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True))
sys.argv = ["ttamer"] + sys.argv[1:]
runpy.run_module("ttamer_jax", run_name="__main__", alter_sys=True)
""".format(event=COMPILE_EVENT)


def select_base_traces(source: str, stages: int) -> tj.ExitTraces:
  """Calibration traces the ``select`` files are cut from: ``"model_cascade"`` (five
  scikit-learn models, 10,500 requests; ~1 min to train) or ``"synthetic"`` (4000)."""
  if source == "synthetic":
    return tj.synthetic_workload(seed=0, num_stages=stages, sizes=(1, 4000, 1)).calibration
  from ttamer_jax.data.model_cascade import model_cascade
  cal = model_cascade(seed=0, num_samples=30_000, fractions=(0.3, 0.35, 0.35),
                      repeats=1).calibration
  cols = [*range(stages - 1), 4]
  pick = lambda a: np.asarray(a)[:, cols]
  return tj.ExitTraces(scores=pick(cal.scores), preds=pick(cal.preds), losses=pick(cal.losses),
                       costs=np.asarray(SELECT_MC_COSTS, np.float32)[cols],
                       signals={k: pick(v) for k, v in cal.signals.items()}, labels=cal.labels)


def select_traces_file(folder: str, base: tj.ExitTraces, num: int, tag: str) -> str:
  """``num`` requests of ``base`` saved in ``folder`` (once): its first rows, or rows
  drawn with replacement (fixed seed) when it has fewer."""
  path = os.path.join(folder, f"{tag}_{num}x{base.num_stages}.npz")
  if not os.path.exists(path):
    rows = (np.arange(num) if num <= base.num_samples
            else np.random.default_rng(0).integers(0, base.num_samples, num))
    tj.save_traces(path, base.subset(rows))
  return path


def select_worker(calls) -> list:
  """``fit_policy(traces, SELECT_LAM)`` on each ``[case, path]`` in turn, in this (fresh)
  process: wall seconds of the call (loading excluded), XLA compilations during it,
  and the process's peak RSS so far."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(secs) if event == COMPILE_EVENT else None)
  rows = []
  for case, path in calls:
    traces = tj.load_traces(path)
    before, t0 = len(compiles), time.perf_counter()
    tj.fit_policy(traces, SELECT_LAM)
    wall = time.perf_counter() - t0
    rows.append(dict(case=case, requests=traces.num_samples, stages=traces.num_stages,
                     wall_s=wall, compilations=len(compiles) - before,
                     peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
  return rows


def _select_process(args, env, checks, what):
  """Runs ``args`` (prints ``SELECT <json>``); returns (the JSON or None, wall seconds)."""
  import subprocess
  t0 = time.perf_counter()
  proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
  wall = time.perf_counter() - t0
  line = next((l for l in proc.stdout.splitlines() if l.startswith("SELECT ")), None)
  ok = proc.returncode == 0 and line is not None
  checks.add(f"{what} runs (fresh process)", ok, "" if ok else (proc.stderr or proc.stdout)[-400:])
  return (json.loads(line[len("SELECT "):]) if ok else None), wall


def _call_labels(sizes):
  return ["cold" if i == 0 else "warm (same data)" if num == sizes[i - 1] else "new N"
          for i, num in enumerate(sizes)]


def bench_select(cfg, checks):
  """Each run of ``cfg["select_runs"]`` (``(case, sizes)``) in a fresh process: ``"a"``,
  the whole ``ttamer fit`` command on ``cfg["select_traces"]`` (else generated traces
  of ``sizes[0]`` requests), timed from outside; else one ``fit_policy`` call per size."""
  import tempfile
  stages, source = cfg.get("select_stages", 4), cfg.get("select_source", "model_cascade")
  given = cfg.get("select_traces")
  runs = [(case, list(sizes)) for case, sizes in cfg["select_runs"]]
  rows = []
  with tempfile.TemporaryDirectory(prefix="ttamer_bench_select_") as folder:
    # The same ttamer_jax (as bench_large); no persistent cache: none given, none on.
    root = os.path.dirname(os.path.dirname(os.path.abspath(tj.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_ENABLE_COMPILATION_CACHE="false", TTAMER_CACHE=os.path.join(folder, "cache"),
               PYTHONPATH=os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p))
    base = []  # generated once, on first use

    def path(num):
      if not base:
        t0 = time.perf_counter()
        base.append(select_base_traces(source, stages))
        print(f"  {source} traces ({base[0].num_samples} x {stages}): "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
      return select_traces_file(folder, base[0], num, source)

    for case, sizes in runs:
      if case == "a":
        traces = given or path(sizes[0])
        data = tj.load_traces(traces)
        args = [sys.executable, "-c", SELECT_CLI, "fit", traces, "--lam", str(SELECT_LAM),
                "--out", os.path.join(folder, "policy.npz")]
        out, wall = _select_process(args, env, checks, "(a) ttamer fit")
        new = [dict(case="(a) ttamer fit, whole command", requests=data.num_samples,
                    stages=data.num_stages, wall_s=wall, **out)] if out else []
      else:
        calls = [[f"({case}) fit_policy, {label}", path(num)]
                 for label, num in zip(_call_labels(sizes), sizes)]
        args = [sys.executable, os.path.abspath(__file__), "--select-worker", json.dumps(calls)]
        new = _select_process(args, env, checks, f"({case}) fit_policy on {sizes}")[0] or []
      for r in new:
        print(f"  {r['case']}: {r['requests']} x {r['stages']}, {r['wall_s']:.1f} s, "
              f"{r['compilations']} compilations, peak RSS {r['peak_rss_MiB']:.0f} MiB", flush=True)
      rows += new
  return rows


def bench_large(cfg, n, checks):
  import subprocess
  k = cfg["large_k"]
  # A fresh interpreter, so the measured peak is this solve's alone; it imports
  # this module from the same ttamer_jax (installed or on PYTHONPATH).
  root = os.path.dirname(os.path.dirname(os.path.abspath(tj.__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--large-worker", str(k)],
                        capture_output=True, text=True, timeout=900, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("LARGE ")]
  ok = proc.returncode == 0 and bool(lines)
  checks.add(f"K={k} solve runs (fresh process)", ok,
             "" if ok else f"exit {proc.returncode}: {proc.stderr[-1500:]}")
  if not ok:
    return []
  row = json.loads(lines[-1][len("LARGE "):])
  checks.add(f"K={k} solve finite", np.isfinite(row["value"]), f"value {row['value']:.6g}")
  return [row]


def bench_profile(cfg, n, checks):
  rows = []
  # 1. No float64 arithmetic under x64 with float32 inputs (only the scalar lam
  #    parameter arrives as f64 and is cast once).
  with jax.enable_x64(True):
    c = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), bench_cascade(600, n, 16, False))
    grid, pos = kernel.prepare_grid(c.values)
    hlo = solve_recall_on_grid.lower(c, 0.5, grid, pos, P, None).compile().as_text()
  f64_arrays = sum("f64[" in line and "f64[]" not in line for line in hlo.splitlines())
  f64_scalar = sum("f64[]" in line for line in hlo.splitlines())
  checks.add("no f64 array ops under x64 with f32 inputs", f64_arrays == 0,
             f"{f64_arrays} f64 array lines, {f64_scalar} f64 scalar lines (lam parameter)")
  rows.append(dict(check="f64 array ops (x64 on, f32 cascade)", result=f64_arrays))
  # 2. No recompilation per lam (public solver and sweep).
  c = bench_cascade(601, n, 32, False)
  tj.solve_recall(c, 0.5)
  tj.sweep(c, np.linspace(0, 1, 8))
  events = []
  listener = lambda name, *a, **kw: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for lam in (0.1, 0.2, np.float32(0.3), np.float64(0.4), 1.0):
      tj.solve_recall(c, lam)
    tj.sweep(c, np.linspace(0.2, 0.9, 8))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  compiles = events.count("/jax/core/compile/backend_compile_duration")
  checks.add("no recompilation for new lam values", compiles == 0, f"{compiles} compiles")
  rows.append(dict(check="compiles for 5 new lams + 1 new sweep", result=compiles))
  # 3. Per-stage kernels: every gather fused (no stand-alone gather in the loop).
  grid, pos = kernel.prepare_grid(c.values)
  hlo = solve_recall_on_grid.lower(c, 0.5, grid, pos, P, None).compile().as_text()
  body = _while_body(hlo)
  kernels = [l for l in body
             if " = " in l and any(op in l for op in (" fusion(", " gather(", " dot(", " custom-call("))]
  loose_gathers = sum(" gather(" in l for l in body)
  checks.add("gathers fused into the stage kernels", loose_gathers == 0,
             f"{loose_gathers} stand-alone gathers in the loop body")
  rows.append(dict(check="kernels per stage (fusions + dots) / stand-alone gathers",
                   result=f"{len(kernels)} / {loose_gathers}"))
  # 4. Sweep donates its lam grid to the value output.
  batch = jax.vmap(lambda key: _cascade_from(*_random_arrays(key, n, 8, True)))(
      jax.random.split(jax.random.PRNGKey(0), 2))
  aliased = _sweep_aliases(batch, np.linspace(0, 1, 4))
  checks.add("sweep donates its lam buffer (input_output_alias)", aliased)
  rows.append(dict(check="sweep input/output alias present", result=aliased))
  # 5. What moving the grid sort out of jit bought: the previous public path
  #    (validate, count distinct values in NumPy, sort + unique + searchsorted
  #    inside the program) vs the current one (grid and positions in NumPy).
  @jax.jit
  def in_program(c, lam):
    grid, pos = kernel.grid_in_program(c.values, kernel.grid_size_for(c.values))
    return solve_recall_on_grid(c, lam, grid, pos, P, None)

  old_public = in_program

  for k, shared in cfg.get("profile_cases", ((16, True), (64, True), (128, True), (64, False))):
    c = bench_cascade(602 + k, n, k, shared)
    t_new, t_old, ratio = paired_times(lambda: tj.solve_recall(c, 0.5).value, (),
                                       lambda: old_public(c, 0.5).value, (), repeats=21,
                                       max_seconds=cfg["max_round_s"])
    rows.append(dict(check=f"solve_recall before / after (grid built in NumPy), K={k} "
                           f"{'shared' if shared else 'distinct'}",
                     result=f"{t_old * 1e3:.3g} ms / {t_new * 1e3:.3g} ms = {1 / ratio:.2f}x"))
  return rows


def _while_body(hlo: str):
  """Lines of the optimized HLO's while-loop body computation(s)."""
  bodies = set()
  for line in hlo.splitlines():
    if " while(" in line and "body=" in line:
      bodies.add(line.split("body=")[1].split(",")[0].split()[0].strip("%"))
  out, inside = [], False
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      name = line.split()[0].strip("%") if line.split() else ""
      inside = name in bodies
      continue
    if inside:
      out.append(line)
  return out


def _sweep_aliases(batch, lams) -> bool:
  values, init, trans, costs = (np.asarray(getattr(batch, f)) for f in ("values", "init", "trans", "costs"))
  grid, pos = kernel.pad_grids(values)
  mesh = sharded.auto_mesh(sharded.default_mesh())
  num, num_lams = values.shape[0], lams.size
  axis = sharded.choose_axis("auto", num, num_lams, mesh.size)
  fn = sharded.compiled_sweep(mesh, axis, "recall", num, num_lams, num, num_lams, True, P)
  lam_grid = np.broadcast_to(lams.astype(np.float32), (num, num_lams)).copy()
  if mesh.size != 1:
    return True  # padding would change shapes; the single-device program shows the alias.
  text = fn.lower(values, init, trans, costs, grid, pos.astype(np.int32), lam_grid).compile().as_text()
  return "input_output_alias" in text


# ---------------------------------------------------------- batched sweeps
def batch_products_fn(num: int, num_lams: int, m: int, k: int):
  """The stage products of :func:`tj.sweep` alone on the same batch: per ``(instance, lam
  chunk)`` the ``n - 1`` dependent expectations ``E[G | s]`` of the solver's layout (lam-minor
  ``[M, K, C]`` multiply-adds up to ``kernel.SMALL_K``, else ``[C, M, K] x [K, K]``), in the
  sweep's default chunk of lams and batch of instances (the bench's lam counts are bucket sizes
  that the chunk divides, so the sweep pads nothing), without the selects, minima and look-ups
  around them -- what a sweep cannot go below with XLA's arithmetic."""
  pairs = sharded._default_pairs("recall", m, 0, k, 4, jax.devices()[0].platform)
  inst_batch, lam_batch = sharded._batch_sizes(pairs, num, num_lams)
  chunks = -(-num_lams // lam_batch)
  trailing = k <= kernel.SMALL_K

  def chunk(trans, scale):
    shape = (m, k, lam_batch) if trailing else (lam_batch, m, k)
    g = jnp.full(shape, 1.0 / k, trans.dtype) * scale   # distinct per chunk: nothing hoisted

    def body(g, t_mat):
      if trailing:
        return jnp.sum(t_mat.T[None, :, :, None] * g[:, :, None, :], axis=1), None
      return jnp.einsum("...xt,st->...xs", g, t_mat, precision=P), None

    return jnp.sum(jax.lax.scan(body, g, trans, reverse=True)[0])

  def one_instance(trans):
    return jax.lax.map(lambda s: chunk(trans, s), 1.0 + jnp.arange(chunks, dtype=trans.dtype))

  return jax.jit(lambda trans: sharded._map(one_instance, trans, inst_batch, num))


def bench_batch(cfg, n, repeats, checks):
  """``tj.sweep`` over lams and over many cascades vs :func:`numpy_sweep` on the same
  batch (float32 both), its arithmetic rate vs the matmul rate in the same rounds, and
  the default sweep (with policy tables) vs values only and vs its products alone."""
  rows = []
  matmul, square, mm_flops = matmul_fn(cfg["matmul_n"])
  for k, num, num_lams in cfg["batch_cases"]:
    keys = jax.random.split(jax.random.PRNGKey(700 + k + num), num)
    batch = jax.vmap(lambda key: _cascade_from(*_random_arrays(key, n, k, True)))(keys)
    arrays = [np.asarray(a) for a in (batch.values, batch.init, batch.trans, batch.costs)]
    lams = np.linspace(0.0, 1.0, num_lams, dtype=np.float32)
    cascades = batch if num > 1 else jax.tree.map(lambda a: a[0], batch)
    run = lambda: tj.sweep(cascades, lams, return_tables=False).value
    got = np.asarray(run()).reshape(num, num_lams)
    diff = float(np.max(np.abs(got - numpy_sweep(*arrays, lams))))
    checks.add(f"batched NumPy sweep agrees K={k} {num}x{num_lams}", diff <= TOL,
               f"max diff {diff:.2e}")
    t_jax, t_np, ratio = paired_times(run, (), lambda: numpy_sweep(*arrays, lams), (),
                                      repeats=repeats, max_seconds=cfg["max_round_s"], settle=True)
    flops = 2 * (n - 1) * k**3 * num * num_lams   # M = K: one shared grid
    gflops = flops / t_jax / 1e9
    # The matmul rate in the same rounds (one measurement of it at start-up moved
    # between 180 and 400 GFLOP/s on a shared 2-core machine).
    _, t_mm, mm_ratio = paired_times(run, (), matmul, square, repeats=repeats,
                                     max_seconds=cfg["max_round_s"], settle=True)
    frac = flops / (mm_flops * mm_ratio)
    # The sweep's own products alone, on the same batch: NumPy time / their time is the
    # largest speedup this arithmetic allows, whatever the passes around it cost.
    products = batch_products_fn(num, num_lams, int(kernel.pad_grids(arrays[0])[0].shape[1]), k)
    _, t_products, products_ratio = paired_times(
        run, (), products, (jnp.asarray(arrays[2]),), repeats=repeats,
        max_seconds=cfg["max_round_s"], settle=True)
    # The default sweep, policy tables included, against the same sweep without them and
    # against its products: what the tables and the passes around the products cost.
    tabled = lambda: tj.sweep(cascades, lams).index
    t_tables, _, tables_ratio = paired_times(tabled, (), run, (), repeats=repeats,
                                             max_seconds=cfg["max_round_s"])
    _, _, tables_products = paired_times(tabled, (), products, (jnp.asarray(arrays[2]),),
                                         repeats=repeats, max_seconds=cfg["max_round_s"])
    goal = "tables <= 1.3x values only, <= 1.3x products"
    met = tables_ratio <= 1.3 and tables_products <= 1.3
    rows.append(dict(K=k, instances=num, lams=num_lams, sweep_ms=1e3 * t_jax,
                     numpy_ms=1e3 * t_np, speedup=1 / ratio, gflops=gflops,
                     matmul_gflops=mm_flops / t_mm / 1e9, frac_of_matmul=frac, goal=goal,
                     met=met, max_abs_diff=diff, products_ms=1e3 * t_products,
                     sweep_over_products=products_ratio,
                     numpy_over_products=t_np / t_products, tables_ms=1e3 * t_tables,
                     tables_over_values=tables_ratio, tables_over_products=tables_products))
    print(f"  batch K={k} {num}x{num_lams}: {1 / ratio:.1f}x numpy, {gflops:.0f} GFLOP/s, "
          f"{100 * frac:.0f}% of the matmul rate in the same rounds; its products alone "
          f"{1e3 * t_products:.1f} ms ({products_ratio:.2f}x of the sweep's time; NumPy / "
          f"products {t_np / t_products:.1f}x); with tables {1e3 * t_tables:.1f} ms: "
          f"{tables_ratio:.2f}x values only, {tables_products:.2f}x products", flush=True)
  return rows


# ------------------------------------------------------------ grid replays
def _replay_instance(n: int, k: int, num: int, num_policies: int):
  """Requests sampled from a random cascade, a recall ``lam`` grid and a threshold grid."""
  cascade = tj.random_cascade(jax.random.PRNGKey(800), n, k)
  # Host arrays, as traces loaded from files are.
  states = np.asarray(tj.core.sample_states(jax.random.PRNGKey(801), cascade, num))   # [N, n]
  losses = np.asarray(cascade.values)[np.arange(n), states]                      # [N, n]
  scores = np.random.default_rng(802).random((num, n), np.float32)
  lams = np.linspace(0.02, 0.98, num_policies, dtype=np.float32)
  index = tj.sweep(cascade, lams).index                                           # [P, n, K]
  recall = tj.core.RecallPolicy(index=index, values=cascade.values, lam=jnp.asarray(lams))
  thresholds = tj.core.ThresholdPolicy(
      thresholds=jnp.broadcast_to(jnp.linspace(0.0, 1.0, num_policies)[:, None],
                                  (num_policies, n)))
  return cascade, states, losses, scores, recall, thresholds


def _one_policy(policies, axes, p):
  pick = lambda ax, sub: sub if ax is None else jax.tree.map(lambda x: x[p], sub)
  return jax.tree.map(pick, axes, policies, is_leaf=lambda x: x is None)


def bench_replay(cfg, repeats, checks):
  """``tj.core.replay_totals`` of 256-policy grids on ``N`` requests x 8 stages (stage-steps
  per second) vs the one-policy replay vmapped over the grid, unblocked, on fewer
  requests; agreement with one-policy replays; XLA temp memory of the blocked program."""
  from ttamer_jax.core import replay as replay_module
  n, k, num, num_ref, size = 8, 16, cfg["replay_n"], cfg["replay_ref_n"], cfg["replay_policies"]
  cascade, states, losses, scores, recall, thresholds = _replay_instance(n, k, num, size)
  costs = np.asarray(cascade.costs)
  rows = []
  families = (("recall lam grid", recall, tj.core.RecallPolicy.lam_grid_axes(), None),
              ("threshold grid", thresholds, 0, scores))
  for name, grid, axes, sc in families:
    run = lambda s=states, l=losses, sc=sc: tj.core.replay_totals(grid, s, l, costs, scores=sc,
                                                             policy_axes=axes).loss
    tot = tj.core.replay_totals(grid, states, losses, costs, scores=sc, policy_axes=axes)
    worst = 0.0
    for p in (0, size // 2, size - 1):
      one = tj.replay(_one_policy(grid, axes, p), states, losses, costs, scores=sc)
      ref = float(np.asarray(one.loss, np.float64).sum())
      worst = max(worst, abs(float(tot.loss[p]) - ref) / max(1.0, abs(ref)))
    checks.add(f"replay_totals agrees with one-policy replays ({name})", worst <= 1e-5,
               f"max rel diff {worst:.2e}")
    # Reference: the one-policy replay vmapped over the grid, per-request outputs
    # summed afterwards (what a user writes), on num_ref requests.
    vmapped = jax.jit(lambda g, s, l, co, sc: jax.tree.map(
        lambda x: x.sum(-1), jax.vmap(replay_module.replay_compiled,
                                      in_axes=(axes, None, None, None, None, None))(
            g, s, l, co, sc, jnp.zeros(s.shape, jnp.int32))))
    s_ref, l_ref = states[:num_ref], losses[:num_ref]
    sc_ref = np.zeros_like(l_ref) if sc is None else sc[:num_ref]
    t_ours, t_ref, _ = paired_times(lambda: run(s_ref, l_ref, sc_ref), (),
                                    lambda: vmapped(grid, s_ref, l_ref, costs, sc_ref).loss, (),
                                    repeats=repeats, max_seconds=cfg["max_round_s"])
    t_full = statistics.median(_timed(run) for _ in range(min(repeats, 3)))
    block, num_blocks = replay_module.grid_block(num, size)
    rows_of = lambda dtype: jax.ShapeDtypeStruct((block * num_blocks, n), dtype)
    compiled = replay_module._replay_totals.lower(
        grid, rows_of(jnp.int32), rows_of(jnp.float32), rows_of(jnp.float32),
        rows_of(jnp.float32), rows_of(jnp.int32),
        jax.ShapeDtypeStruct((block * num_blocks,), jnp.float32), replay_module.static_axes(axes),
        block).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows.append(dict(policies=name, P=size, N=num, stages=n,
                     steps_per_s=num * n * size / t_full, seconds=t_full,
                     ref_N=num_ref, steps_per_s_at_ref_N=num_ref * n * size / t_ours,
                     vmapped_ref_steps_per_s=num_ref * n * size / t_ref,
                     xla_temp_MiB=temp / 2**20,
                     inputs_MiB=(states.nbytes + losses.nbytes) / 2**20,
                     unblocked_outputs_MiB=4 * size * num * 4 / 2**20,
                     goal_met=num * n * size / t_full >= 2e8))
    print(f"  replay {name}: {rows[-1]['steps_per_s']:.3g} stage-steps/s "
          f"(vmapped reference {rows[-1]['vmapped_ref_steps_per_s']:.3g} at N={num_ref})",
          flush=True)
  return rows


# ------------------------------------------------------------- compile time
def compile_worker(quick: bool) -> dict:
  """First-call time of each public entry point in this (fresh) process, and the XLA
  compilations when the batch size then varies: the main program compiles once per
  bucket of sizes (``core.shapes.bucket_size``), not once per size."""
  from ttamer_jax.core.shapes import bucket_size
  compiles = []  # (program name, seconds)
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, fun_name="", **kw: compiles.append((fun_name, secs))
      if event == "/jax/core/compile/backend_compile_duration" else None)
  n, k = 4, 12
  cascade = tj.overthinking_cascade(n, k)
  traces = tj.workload_traces(jax.random.PRNGKey(0), cascade, 2000 if quick else 20000)
  lam = 0.9

  def first_call(name, fn):
    before, t0 = len(compiles), time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return dict(entry=name, first_call_s=first, second_call_s=time.perf_counter() - t0,
                compiles=len(compiles) - before,
                compile_s=sum(t for _, t in compiles[before:]))

  rows = [first_call("solve_recall", lambda: tj.solve_recall(cascade, lam).value)]
  policy = tj.recall_policy(cascade, lam)
  states = np.asarray(tj.core.sample_states(jax.random.PRNGKey(1), cascade, traces.num_samples))
  losses = np.asarray(cascade.values)[np.arange(n), states]                       # [N, n]
  threshold = tj.core.ThresholdPolicy(thresholds=np.full(n, 0.8, np.float32))
  rows += [
      first_call("sweep (64 lams)", lambda: tj.sweep(cascade, np.linspace(0, 1, 64)).value),
      first_call("replay", lambda: tj.replay(policy, states, losses, cascade.costs).loss),
      first_call("evaluate", lambda: tj.evaluate(threshold, traces, lam,
                                                 num_resamples=200).objective),
      first_call("fit_policy", lambda: (tj.fit_policy(traces, lam), 0)[1]),
  ]
  # Then batches of 12 (quick: 7) random sizes between 1000 and 2000, as a server or a
  # tuning loop sees them: compilations of the entry's main program vs the buckets
  # those sizes fall in (before bucketing: one per size).
  sizes = sorted(np.random.default_rng(0).integers(1000, 2000, 7 if quick else 12).tolist())
  for name, program, call, bucket in (
      ("replay, N varies", "replay_compiled",
       lambda m: tj.replay(policy, states[:m], losses[:m], cascade.costs).loss, bucket_size),
      ("sweep, lams vary", "local",
       lambda m: tj.sweep(cascade, np.linspace(0, 1, m // 10)).value,
       lambda m: bucket_size(m // 10, minimum=1)),
      ("evaluate, N varies", "replay_compiled",
       lambda m: tj.evaluate(threshold, traces.subset(np.arange(m)), lam,
                             num_resamples=200).objective, bucket_size)):
    before = len(compiles)
    t0 = time.perf_counter()
    for m in sizes:
      jax.block_until_ready(call(m))
    new = compiles[before:]
    rows.append(dict(entry=name, first_call_s=None, second_call_s=None, compiles=len(new),
                     compile_s=sum(t for _, t in new), sizes=len(sizes),
                     buckets=len({bucket(m) for m in sizes}),
                     program_compiles=sum(p == f"jit({program})" for p, _ in new),
                     total_s=time.perf_counter() - t0))
  return dict(rows=rows)


def bench_compile(cfg, checks):
  import subprocess
  args = [sys.executable, os.path.abspath(__file__), "--compile-worker"]
  args += ["quick"] if cfg.get("compile_quick") else ["full"]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
  line = next((l for l in proc.stdout.splitlines() if l.startswith("COMPILE ")), None)
  checks.add("compile-time worker runs (fresh process)", line is not None,
             proc.stderr[-800:] if line is None else "")
  if line is None:
    return []
  rows = json.loads(line[len("COMPILE "):])["rows"]
  for r in rows:
    if "buckets" in r:
      checks.add(f"{r['entry']}: main program compiled at most once per bucket",
                 r["program_compiles"] <= r["buckets"],
                 f"{r['program_compiles']} compilations, {r['sizes']} sizes in "
                 f"{r['buckets']} buckets")
  return rows


# ------------------------------------------------------------------- output
def print_table(title, rows):
  if not rows:
    return
  print(f"\n## {title}")
  cols = list(rows[0])
  fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
  widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
  print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
  print("-|-".join("-" * w for w in widths))
  for r in rows:
    print(" | ".join(fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def machine_info():
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
              load_avg=os.getloadavg(), devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind, backend=jax.default_backend(),
              jax=jax.__version__, numpy=np.__version__, python=platform.python_version())


def run_section(name, cfg, n, repeats, peak, checks, results, titles):
  if name == "floor":
    return bench_floor(cfg, n, repeats, peak)
  if name == "numpy":
    return bench_numpy(cfg, n, repeats, checks)
  if name == "mdp":
    rows, label = bench_mdp(cfg, n, repeats, checks)
    results["mdp_solver"] = label
    titles["mdp"] += f": {label}"
    return rows
  if name == "sweep":
    return bench_sweep(cfg, n, repeats, checks)
  if name == "mc":
    return bench_mc(cfg, n, repeats, checks)
  if name == "memory":
    return bench_memory(cfg, n)
  if name == "large":
    return bench_large(cfg, n, checks)
  if name == "select":
    return bench_select(cfg, checks)
  if name == "batch":
    return bench_batch(cfg, n, repeats, checks)
  if name == "replay":
    return bench_replay(cfg, repeats, checks)
  if name == "compile":
    return bench_compile(cfg, checks)
  return bench_profile(cfg, n, checks)


# The defaults of the two entry points: this file runs the CPU sizes, `ttamer bench`
# (a smoke run from the package's command line) the --quick sizes.
ENTRY_DEFAULTS = {"script": dict(out="bench_results.json", quick=False),
                  "ttamer": dict(out="ttamer_bench.json", quick=True)}


def build_parser(entry: str = "script", *, prog: str | None = None,
                 parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The harness's one argument parser.

  Args:
    entry: ``"script"`` (``python benchmarks/bench.py``: the CPU sizes, writes
      ``bench_results.json``) or ``"ttamer"`` (``ttamer bench``: the ``--quick`` sizes
      unless ``--full``, writes ``ttamer_bench.json``).
    prog: program name in usage and error lines.
    parser_class: the parser class (``ttamer`` passes its one-line-error parser).

  Returns:
    The parser; :func:`main` runs what it parses.
  """
  defaults = ENTRY_DEFAULTS[entry]
  parser = parser_class(prog=prog, description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes, a smoke run" + (" (the default)" if defaults["quick"] else ""))
  parser.add_argument("--full", action="store_true",
                      help="the full CPU sizes (~10 min on 2 cores)" + (
                          "" if defaults["quick"] else " (the default)"))
  parser.add_argument("--gpu", action="store_true", help="accelerator sizes (K up to 8192)")
  parser.add_argument("--require-gpu", action="store_true",
                      help="fail unless JAX's default backend is a GPU")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement (7)")
  parser.add_argument("--sections", default=None,
                      help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; "
                           f"outside --quick all but {','.join(OPT_IN)}, which runs only when named)")
  parser.add_argument("--select-traces", default=None, metavar="PATH",
                      help="select section: case (a) fits these traces (e.g. the demo's "
                           "calibration_traces.npz) instead of generated ones")
  parser.add_argument("--out", default=defaults["out"], help=f"results JSON ({defaults['out']})")
  parser.add_argument("--budget-s", type=float, default=0.0,
                      help="skip the remaining sections once this many seconds have passed "
                           "(0: no limit); skipped sections are listed in the JSON")
  parser.add_argument("--json", action="store_true",
                      help="print the results JSON on stdout (the tables go to stderr)")
  parser.add_argument("--cache-dir", default=None, metavar="DIR",
                      help="keep compiled programs in DIR/xla (default: off -- the harness times "
                           "compilation, which a warm cache would replace by loading)")
  parser.add_argument("--large-worker", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--select-worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--compile-worker", choices=("quick", "full"), help=argparse.SUPPRESS)
  parser.set_defaults(entry=entry)
  return parser


def check_args(args: argparse.Namespace) -> list[str]:
  """Validates the parsed flags before any work; returns the sections to run.

  Args:
    args: what :func:`build_parser`'s parser returned.

  Returns:
    The section names, in the order given (default: every section, the opt-in ones
    only with the quick sizes).

  Raises:
    ValueError: ``--quick`` with ``--full``, ``--repeats`` below 1, an unknown or empty
      ``--sections``, a negative ``--budget-s``.
  """
  if args.quick and args.full:
    raise ValueError("--quick and --full exclude each other")
  if args.repeats < 1:
    raise ValueError(f"--repeats {args.repeats} must be >= 1")
  if not args.budget_s >= 0:
    raise ValueError(f"--budget-s {args.budget_s} must be >= 0")
  if args.sections is None:
    # The opt-in sections join a default run only in an explicit --quick run of this
    # file; `ttamer bench` (quick by default) leaves them out.
    opt_in = args.quick and args.entry == "script"
    return [s for s in SECTIONS if opt_in or s not in OPT_IN]
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown or not sections:
    raise ValueError(f"--sections: unknown {unknown or 'empty'}; choose from {','.join(SECTIONS)}")
  return sections


def main(argv=None, *, entry: str = "script", prog: str | None = None,
         parser_class: type = argparse.ArgumentParser) -> int:
  """Runs the harness with ``argv`` (default ``sys.argv[1:]``); see :func:`build_parser`.

  Args:
    argv: the flags of :func:`build_parser`.
    entry, prog, parser_class: as :func:`build_parser`.

  Returns:
    0 when every check passed, 1 when one failed, 2 for ``--require-gpu`` without a GPU.

  Raises:
    ValueError: bad flags (:func:`check_args`) or an unwritable ``--out``.
  """
  args = build_parser(entry, prog=prog, parser_class=parser_class).parse_args(argv)
  if args.large_worker:
    print("LARGE " + json.dumps(large_worker(12, args.large_worker)), flush=True)
    return 0
  if args.compile_worker:
    print("COMPILE " + json.dumps(compile_worker(args.compile_worker == "quick")), flush=True)
    return 0
  if args.select_worker:
    print("SELECT " + json.dumps(select_worker(json.loads(args.select_worker))), flush=True)
    return 0
  sections = check_args(args)
  from ttamer_jax.data.paths import check_output
  check_output(args.out, "results")
  if args.cache_dir:
    from ttamer_jax.app.cli import enable_compilation_cache
    enable_compilation_cache(args.cache_dir)
  args.quick = args.quick or (ENTRY_DEFAULTS[entry]["quick"] and not args.full)
  if not args.json:
    return run(args, sections)
  with contextlib.redirect_stdout(sys.stderr):  # tables to stderr, JSON to stdout
    code = run(args, sections)
  if os.path.exists(args.out):
    with open(args.out) as f:
      print(f.read().rstrip())
  return code


def run(args: argparse.Namespace, sections: list[str]) -> int:
  """Runs ``sections`` with the checked flags ``args``; writes ``args.out``.

  Returns:
    0 when every check passed, 1 when one failed, 2 for ``--require-gpu`` without a GPU.
  """
  if args.require_gpu and jax.default_backend() != "gpu":
    print(f"bench.py: --require-gpu but JAX's backend is {jax.default_backend()!r} "
          f"(devices: {jax.devices()})", file=sys.stderr)
    return 2
  mode = ("gpu_quick" if args.quick else "gpu") if args.gpu else ("quick" if args.quick else "cpu")
  cfg = CONFIGS[mode]
  if args.select_traces:
    cfg = dict(cfg, select_traces=args.select_traces)
  n = 12
  checks = Checks()
  results = dict(machine=machine_info(), mode=mode, command=" ".join(["python"] + sys.argv),
                 n=n, precision=str(P), config=cfg)
  print(f"machine: {results['machine']}\nmode: {mode}", flush=True)
  start = time.perf_counter()
  peak = matmul_rate(cfg["matmul_n"])
  results["matmul_peak_gflops"] = peak
  print(f"measured matmul rate ({cfg['matmul_n']}^3, {P}): {peak:.1f} GFLOP/s", flush=True)
  titles = dict(
      floor=f"solve_recall vs its own matmuls (n = {n}; peak matmul {peak:.0f} GFLOP/s)",
      numpy="solve_recall vs a vectorised NumPy recursion (speedup = numpy / jax)",
      mdp="solve_recall vs a general finite-horizon MDP solver",
      sweep="sweep(): one call vs a Python loop of solve_recall (solves/s)",
      mc="Monte-Carlo sample + replay of the recall policy (stage-steps/s)",
      memory="solver memory (XLA buffer assignment, compiled not run)",
      large="one large-K solve", profile="profile checks",
      select=f"validated fitting path (ttamer fit / fit_policy, lam {SELECT_LAM}), each run "
             "a fresh process, no persistent compilation cache",
      batch="sweep() over lams / many cascades: with tables vs values only vs its own "
            "products; the recursion vectorised over the batch in NumPy (float32 both)",
      replay="replay_totals of policy grids on N requests x 8 stages (stage-steps/s)",
      compile="first call of each public entry point (fresh process) and compilations "
              "as the batch size varies")
  done = []
  for name in sections:
    if args.budget_s and time.perf_counter() - start > args.budget_s:
      results.setdefault("skipped_sections", []).append(name)
      print(f"[{name}] skipped: over the {args.budget_s:.0f} s budget", flush=True)
      continue
    t0 = time.perf_counter()
    print(f"[{name}]", flush=True)
    try:
      rows = run_section(name, cfg, n, args.repeats, peak, checks, results, titles)
    except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: report what was measured
      print(f"[{name}] interrupted", flush=True)
      results["interrupted_in"] = name
      checks.add(f"section {name} ran", False, "interrupted")
      break
    except Exception:  # noqa: BLE001 -- record, and go on with the other sections
      import traceback
      err = traceback.format_exc()
      print(err, flush=True)
      checks.add(f"section {name} ran", False, err.strip().splitlines()[-1])
      results.setdefault("errors", {})[name] = err
      continue
    done.append(name)
    results[name] = rows
    results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
  results["total_seconds"] = time.perf_counter() - start
  results["checks"] = checks.items
  results["machine"]["load_avg_end"] = os.getloadavg()
  print(f"\nmachine: {results['machine']}")
  for name in done:
    print_table(titles[name], results[name])
  if results.get("skipped_sections"):
    print(f"\nskipped (time budget): {', '.join(results['skipped_sections'])}")
  print_table("checks", checks.items)
  print(f"\ntotal {results['total_seconds']:.0f} s; all checks passed: {checks.ok}")
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2, default=str)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")
  return 0 if checks.ok else 1


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ValueError as e:  # bad flags: one line and exit code 2, as `ttamer bench` does
    print(f"bench.py: error: {e}", file=sys.stderr)
    sys.exit(2)
