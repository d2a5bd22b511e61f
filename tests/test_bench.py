"""Smoke test of the benchmark harness (``benchmarks/bench.py``, also run by ``ttamer
bench`` from a checkout): its references and correctness checks at tiny sizes (timings
are measured but never asserted)."""

import importlib
import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

import ttamer_jax as tj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def import_benchmark(name: str):
  """The module ``benchmarks/<name>.py`` of this checkout (not installed with the package)."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  return importlib.import_module(name)


bench = import_benchmark("bench")

TINY = dict(numpy_k=[4, 6], mdp_k=[3, 4], sweep_k=[4], sweep_sizes=[1, 16], loop_cap=4,
            mc_k=4, mc_paths=[4000], mc_numpy_cap=4000, max_round_s=0.2,
            profile_cases=((8, True),), batch_cases=[(4, 1, 8), (5, 3, 4)],
            replay_n=300, replay_ref_n=100, replay_policies=6, matmul_n=64)


@pytest.mark.parametrize("shared", [True, False])
def test_numpy_recursion_matches_solver(shared):
  c = bench.bench_cascade(3, 5, 7, shared)
  arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
  for lam in (0.0, 0.37, 1.0):
    assert bench.agree(float(tj.solve_recall(c, lam).value),
                       float(bench.numpy_solve_recall(*arrays, lam)))


def test_explicit_mdp_generic_backward_induction_matches_solver():
  pytest.importorskip("scipy")
  c = bench.bench_cascade(4, 4, 3, False)
  arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
  for lam in (0.2, 0.8):
    p, r, start, horizon = bench.explicit_mdp(*arrays, lam)
    v = np.zeros(r.shape[0])
    for _ in range(horizon):  # backward induction written out, independent of mdp_solver()
      v = np.maximum(r[:, 0] + p[0] @ v, r[:, 1] + p[1] @ v)
    assert bench.agree(float(tj.solve_recall(c, lam).value), start(v))


def test_pymdptoolbox_finite_horizon_matches_solver():
  pytest.importorskip("mdptoolbox")
  label, solve = bench.mdp_solver()
  assert label == "pymdptoolbox FiniteHorizon"
  c = bench.bench_cascade(5, 4, 3, True)
  arrays = [np.asarray(a) for a in (c.values, c.init, c.trans, c.costs)]
  p, r, start, horizon = bench.explicit_mdp(*arrays, 0.6)
  assert bench.agree(float(tj.solve_recall(c, 0.6).value), start(solve(p, r, horizon)))


def test_benchmark_sections_pass_their_checks_at_tiny_sizes():
  checks = bench.Checks()
  rows = bench.bench_numpy(TINY, 4, 1, checks)
  assert [r["K"] for r in rows if r["kind"] == "one solve"] == TINY["numpy_k"]
  if importlib.util.find_spec("scipy") is not None:
    rows, label = bench.bench_mdp(TINY, 4, 1, checks)
    assert len(rows) == 2 and all(r["max_abs_diff"] <= 1e-5 for r in rows)
  rows = bench.bench_sweep(TINY, 4, 1, checks)
  assert {(r["instances"], r["lams"]) for r in rows} == {(1, 1), (1, 16), (4, 4)}
  bench.bench_mc(TINY, 4, 1, checks)
  bench.bench_profile(TINY, 4, checks)
  rows = bench.bench_batch(TINY, 4, 1, checks)
  assert [(r["K"], r["instances"], r["lams"]) for r in rows] == TINY["batch_cases"]
  for r in rows:   # the issue-25 columns: the tables' cost against values only and the products
    assert r["tables_ms"] > 0 and r["tables_over_values"] > 0 and r["tables_over_products"] > 0
    assert r["met"] == (r["tables_over_values"] <= 1.3 and r["tables_over_products"] <= 1.3)
  rows = bench.bench_replay(TINY, 1, checks)
  assert [r["P"] for r in rows] == [6, 6] and all(r["N"] == 300 for r in rows)
  failed = [c for c in checks.items if not c["ok"]]
  assert not failed, failed
  names = " ".join(c["check"] for c in checks.items)
  for expected in ("numpy recursion agrees", "sweep agrees", "Monte-Carlo within 4 SE",
                   "no f64 array ops", "no recompilation", "gathers fused", "donates",
                   "batched NumPy sweep agrees", "replay_totals agrees"):
    assert expected in names


@pytest.mark.parametrize("lams", [[0.0, 0.4, 1.0], [0.7]])
def test_batched_numpy_sweep_matches_single_numpy_solves(lams):
  """The batch reference against the one-solve NumPy recursion (itself checked against
  the solver above): distinct grids per instance, so padding of the grids is exercised."""
  cascades = [bench.bench_cascade(20 + i, 4, 5, shared=False) for i in range(3)]
  arrays = [np.stack([np.asarray(getattr(c, f)) for c in cascades])
            for f in ("values", "init", "trans", "costs")]
  batched = bench.numpy_sweep(*arrays, np.asarray(lams, np.float32))
  for i, c in enumerate(cascades):
    single = [bench.numpy_solve_recall(*(a[i] for a in arrays), lam) for lam in lams]
    np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-6)


def test_gpu_mode_code_path_runs_on_cpu_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  code = bench.main(["--gpu", "--quick", "--sections", "numpy,memory", "--repeats", "1",
                     "--out", str(out)])
  assert code == 0
  results = json.loads(out.read_text())
  assert results["mode"] == "gpu_quick" and results["checks"]
  assert all(c["ok"] for c in results["checks"])
  mem = results["memory"]
  assert {r["K"] for r in mem} == {64, 256}
  # O(M K): the temporaries are a few tables, independent of n.
  assert all(r["temp_over_one_table"] < 6 for r in mem)
  assert jax.default_backend() == "cpu"


def test_require_gpu_fails_clearly_without_one(capsys):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  assert bench.main(["--require-gpu", "--sections", "memory"]) == 2
  assert "--require-gpu" in capsys.readouterr().err


def test_ttamer_bench_runs_this_harness():
  """`ttamer bench` finds this file beside the package and hands it its arguments; the
  flags are the harness's own (one parser), with the command's defaults."""
  from ttamer_jax.app import cli
  assert cli.bench_harness() == os.path.join(BENCHMARKS, "bench.py")
  ttamer = bench.build_parser("ttamer").parse_args([])
  script = bench.build_parser().parse_args([])
  assert (ttamer.out, script.out) == ("ttamer_bench.json", "bench_results.json")
  assert bench.check_args(script) == [s for s in bench.SECTIONS if s not in bench.OPT_IN]
  quick = bench.build_parser().parse_args(["--quick"])
  assert bench.check_args(quick) == list(bench.SECTIONS)
  for argv, message in ((["--quick", "--full"], "exclude each other"),
                        (["--repeats", "0"], "--repeats 0"), (["--sections", "floor,nope"], "nope")):
    with pytest.raises(ValueError, match=message):
      bench.check_args(bench.build_parser().parse_args(argv))


def test_select_section_measures_a_fresh_process(capsys):
  """The select section at its smallest: one fresh process, one cold fit_policy call
  on generated 300 x 3 traces; the table's columns, and positive numbers."""
  checks = bench.Checks()
  cfg = dict(select_source="synthetic", select_stages=3, select_runs=[("b", [300])])
  rows = bench.bench_select(cfg, checks)
  assert checks.ok, checks.items
  assert [r["case"] for r in rows] == ["(b) fit_policy, cold"]
  (row,) = rows
  assert list(row) == ["case", "requests", "stages", "wall_s", "compilations", "peak_rss_MiB"]
  assert (row["requests"], row["stages"]) == (300, 3)
  assert row["wall_s"] > 0 and row["compilations"] > 0 and row["peak_rss_MiB"] > 0
  bench.print_table("select", rows)
  assert "wall_s | compilations | peak_rss_MiB" in capsys.readouterr().out
