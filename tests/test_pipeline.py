"""The end-to-end job (app.demo, app.compare, app.commands): traces -> fitted policy ->
comparison -> operating points."""

import os
import pathlib
import re

import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax.app import commands, demo, reports
from ttamer_jax.app import compare as C
from ttamer_jax.evaluation import frontier
from ttamer_jax.networks import serving_costs


@pytest.fixture(scope="module")
def synthetic():
  return demo.prepare("synthetic", seed=0, quick=True)


@pytest.fixture(scope="module")
def digits_cache(ttamer_cache):
  """The run's checkpoint cache (conftest.py): the quick digits network is trained once per
  run, by whichever of this module, the CLI's demo and the notebooks comes first."""
  return pathlib.Path(ttamer_cache)


def test_hindsight_sweep_matches_the_oracle_policy_replay(synthetic):
  lams = np.array([0.0, 0.4, 0.9, 1.0])
  sweep = tj.evaluation.hindsight_sweep(synthetic.test, lams)
  for i, lam in enumerate(lams):
    oracle = tj.hindsight_policy(synthetic.test.losses, synthetic.test.costs, lam)
    res = tj.replay_traces(oracle, synthetic.test)
    np.testing.assert_allclose(sweep.error[i], np.asarray(res.loss).mean(), rtol=1e-6)
    np.testing.assert_allclose(sweep.cost[i], np.asarray(res.cost).mean(), rtol=1e-5)
    stop, answer = np.asarray(res.stop_stage), np.asarray(res.answer_stage)
    np.testing.assert_allclose(sweep.recalled_histogram[i],
                               np.bincount(answer[answer < stop], minlength=synthetic.test.num_stages)
                               / stop.size, atol=1e-12)


def test_comparison_on_the_overthinking_workload(synthetic):
  comp = C.compare_policies(synthetic.calibration, synthetic.test, num_states=8)
  assert set(comp.test) == {"recall", "no_recall", "confidence", "per_stage", "entropy",
                            "patience", "fixed_exit", "hindsight"}
  for name, res in comp.test.items():
    assert res.param.shape == comp.calibration[name].param.shape
  # The oracle bounds every deployable policy at every lam, up to float32 rounding: the
  # replay's totals are float32 sums (their last bits depend on how the lam grid is
  # blocked), the oracle's cost at lam = 0 is a stage cost exactly.
  hind = comp.test["hindsight"]
  rec = comp.test["recall"]
  lam = comp.lams
  assert np.all(hind.objective(lam) <= rec.objective(lam) + 4 * np.finfo(np.float32).eps)
  # Recall beats no-recall where over-thinking bites (high lam), on held-out data.
  rows = {r["lam"]: r for r in C.objectives_at(comp, [0.97])}
  assert rows[0.97]["recall"] < rows[0.97]["no_recall"]
  points = {r["policy"]: r for r in C.operating_points(comp, tolerance=0.01)}
  fixed = points["fixed_exit"]
  # Always answering with the last exit qualifies by definition and costs the full model.
  assert fixed["frontier_cost"] is not None and fixed["frontier_cost"] <= 1.0 + 1e-6  # float32 costs
  text = reports.format_operating_points(list(points.values()), comp.full_error)
  assert "| recall |" in text
  # Only the recall optimum (and the oracle) answer with an earlier exit than the last one run.
  for name in ("no_recall", "confidence", "per_stage", "entropy", "patience", "fixed_exit"):
    assert np.all(np.asarray(comp.test[name].recalled_histogram) == 0), name
  assert np.asarray(comp.test["recall"].recalled_histogram).sum() > 0
  # The budget table is each family's held-out staircase read at the budgets.
  rows = {r["policy"]: r for r in C.errors_at_budgets(comp)}
  assert set(rows) == set(comp.test)
  for name, res in comp.test.items():
    expected = frontier.staircase(res.cost_norm, res.error, C.COST_BUDGETS)
    for e, c, want, budget in zip(rows[name]["error"], rows[name]["cost"], expected, C.COST_BUDGETS):
      assert (e is None) == (not np.isfinite(want))
      if e is not None:
        assert e == pytest.approx(want) and c <= budget
        # the point used is on the family's grid, with that error
        assert np.any((np.asarray(res.cost_norm) == c) & (np.asarray(res.error) == e))


def test_operating_points_choose_on_calibration_and_report_test():
  res = lambda err, cost: tj.evaluation.ReplaySweep(param=np.array([1.0, 2.0, 3.0]), error=np.array(err),
                                         cost=np.array(cost), cost_norm=np.array(cost),
                                         stop_histogram=np.zeros((3, 2)), answer_histogram=np.zeros((3, 2)))
  comp = C.PolicyComparison(fitted=None, lams=np.array([0.5]),
                            calibration={"a": res([0.30, 0.105, 0.10], [0.2, 0.5, 1.0])},
                            test={"a": res([0.30, 0.125, 0.09], [0.25, 0.55, 1.0])},
                            full_error={"calibration": 0.10, "test": 0.10})
  (row,) = C.operating_points(comp, tolerance=0.01)
  assert row["chosen_param"] == 2.0 and row["chosen_cost"] == 0.55 and row["chosen_error"] == 0.125
  assert row["frontier_cost"] == 1.0 and row["frontier_error"] == 0.09


def test_errors_at_budgets_least_error_within_each_budget():
  res = lambda err, cost: tj.evaluation.ReplaySweep(param=np.arange(4.0), error=np.array(err),
                                         cost=np.array(cost), cost_norm=np.array(cost),
                                         stop_histogram=np.zeros((4, 2)), answer_histogram=np.zeros((4, 2)))
  # costs 0.2 < 0.3 < 0.4 < 0.8; the point at 0.3 is dominated (more error than the one at 0.2)
  test = {"a": res([0.30, 0.35, 0.20, 0.10], [0.2, 0.3, 0.4, 0.8]),
          "b": res([0.25, 0.25, 0.25, 0.25], [0.6, 0.7, 0.8, 0.9])}
  comp = C.PolicyComparison(fitted=None, lams=np.array([0.5]), calibration=test, test=test,
                            full_error={"calibration": 0.1, "test": 0.1})
  a, b = C.errors_at_budgets(comp, [0.1, 0.25, 0.5, 0.75])
  assert a == dict(policy="a", error=[None, 0.30, 0.20, 0.20], cost=[None, 0.2, 0.4, 0.4])
  assert b == dict(policy="b", error=[None, None, None, 0.25], cost=[None, None, None, 0.6])
  text = reports.format_budgets([a, b], [0.1, 0.25, 0.5, 0.75])
  assert text.splitlines()[0].split("  ")[0] == "policy"
  assert "cost <= 25%" in text and "20.0%<" in text and "25.0%<" not in text.splitlines()[3]
  legend = reports.budget_legend([a, b])
  assert "-: the family has no setting" in legend  # every "-" cell is explained
  assert "-:" not in reports.budget_legend([dict(policy="a", error=[0.2], cost=[0.1])])


def test_prepare_and_compare_reject_bad_arguments(synthetic, tmp_path):
  with pytest.raises(ValueError, match="workload"):
    demo.prepare("imagenet")
  for workload in ("sklearn", "synthetic"):  # nothing to serve: refused before any work
    message = (f"costs: 'served' needs a network workload (digits, sequences, mnist1d), "
               f"got '{workload}'")
    with pytest.raises(ValueError, match=re.escape(message)):
      demo.prepare(workload, costs="served")
    with pytest.raises(ValueError, match=re.escape(message)):
      demo.run_demo(str(tmp_path / "d"), workload=workload, costs="served", plots=False)
  with pytest.raises(ValueError, match=re.escape("costs: must be one of ('measured', 'served'), "
                                                 "got 'bogus'")):
    demo.prepare("digits", costs="bogus", cache_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="score: traces have no signal 'nope'"):
    C.compare_policies(synthetic.calibration, synthetic.test, score="nope")
  with pytest.raises(ValueError, match="lam"):
    tj.evaluation.hindsight_sweep(synthetic.test, [1.5])


def test_digits_pipeline_quick(digits_cache):
  prep = demo.prepare("digits", seed=0, quick=True, cache_dir=str(digits_cache), progress=False)
  assert prep.calibration.num_stages == 4 and prep.test.num_samples > 300
  np.testing.assert_allclose(np.sum(prep.calibration.costs), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(prep.test.costs, prep.calibration.costs)
  assert prep.info["costs"] == "measured" and "served_stage_cost_share" not in prep.info
  assert prep.info["checkpoint"] and (digits_cache / prep.info["checkpoint"].split("/")[-1]).exists()
  again = demo.prepare("digits", seed=0, quick=True, cache_dir=str(digits_cache), progress=False)
  assert again.info["loaded"]
  np.testing.assert_array_equal(again.test.preds, prep.test.preds)
  comp = C.compare_policies(prep.calibration, prep.test, num_states=4, lams=np.linspace(0, 1, 11))
  assert np.all(np.isfinite(comp.test["recall"].error))


def test_digits_served_costs_are_positive_shares_on_both_splits(digits_cache):
  """costs="served": both splits carry the serving path's per-stage costs, as floored
  shares of the served seconds; info keeps the measured shares beside them."""
  prep = demo.prepare("digits", seed=0, quick=True, cache_dir=str(digits_cache), progress=False,
                   costs="served")
  costs = np.asarray(prep.calibration.costs)
  assert costs.shape == (4,) and np.all(costs > 0)
  np.testing.assert_allclose(costs.sum(), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(prep.test.costs, costs)
  info = prep.info
  assert info["costs"] == "served"
  assert info["stage_cost_share"] == info["served_stage_cost_share"] == costs.tolist()
  served = np.asarray(info["served_us_per_request"])
  assert served.shape == (4,) and np.all(served >= 0) and served.sum() > 0
  np.testing.assert_allclose(costs, serving_costs.cost_shares(served), rtol=1e-5)
  measured = np.asarray(info["measured_stage_cost_share"])
  assert measured.shape == (4,) and np.all(measured > 0)
  np.testing.assert_allclose(measured.sum(), 1.0, rtol=1e-5)


def test_the_primary_signal_may_be_named_scores(synthetic):
  lams = np.array([0.5, 0.97])
  named = C.compare_policies(synthetic.calibration, synthetic.test, num_states=4, lams=lams,
                             score="scores", confidence_score="scores")
  default = C.compare_policies(synthetic.calibration, synthetic.test, num_states=4, lams=lams,
                               score=None, confidence_score=None)
  for family in ("recall", "confidence"):
    np.testing.assert_array_equal(named.test[family].error, default.test[family].error)
    np.testing.assert_array_equal(named.test[family].cost, default.test[family].cost)


def test_cheapest_within_one_rule():
  cost, error = np.array([0.2, 0.5, 0.5, 1.0]), np.array([0.30, 0.105, 0.104, 0.10])
  assert frontier.cheapest_within(cost, error, 0.10, 0.01) == (1, True)  # ties: the first
  assert frontier.cheapest_within(cost, error, 0.10, 0.0) == (3, True)
  assert frontier.cheapest_within(cost, error, 0.05, 0.01) == (3, False)  # none: least error
  assert frontier.cheapest_within(cost, error, 0.10, 0.30) == (0, True)
  # Compared in the arrays' dtype, as the sweeps are (float32 error vs a float reference).
  err32 = np.array([0.11], np.float32)
  assert frontier.cheapest_within([1.0], err32, 0.1, 0.01) == (0, bool(err32[0] <= 0.1 + 0.01))
  with pytest.raises(ValueError, match="error"):
    frontier.cheapest_within([0.1, 0.2], [0.1], 0.1, 0.01)
  with pytest.raises(ValueError, match="empty"):
    frontier.cheapest_within([], [], 0.1, 0.01)


def _comparison(cal_err, cal_cost):
  res = lambda err, cost: tj.evaluation.ReplaySweep(param=np.array([0.2, 0.5, 0.9]), error=np.array(err),
                                         cost=np.array(cost), cost_norm=np.array(cost),
                                         stop_histogram=np.zeros((3, 2)),
                                         answer_histogram=np.zeros((3, 2)))
  return C.PolicyComparison(fitted=None, lams=np.array([0.2, 0.5, 0.9]),
                            calibration={"recall": res(cal_err, cal_cost)},
                            test={"recall": res(cal_err, cal_cost)},
                            full_error={"calibration": 0.10, "test": 0.10})


def test_deployed_lam_is_the_operating_point_else_least_error():
  comp = _comparison([0.30, 0.105, 0.10], [0.2, 0.5, 1.0])
  (row,) = C.operating_points(comp, tolerance=0.01)
  assert C.recall_operating_lam(comp, 0.01) == row["chosen_param"] == 0.5
  comp = _comparison([0.30, 0.125, 0.12], [0.2, 0.5, 1.0])  # nothing within one point
  (row,) = C.operating_points(comp, tolerance=0.01)
  assert row["chosen_param"] is None and C.recall_operating_lam(comp, 0.01) == 0.9


def test_fit_and_save_chooses_lam_by_the_same_rule(synthetic, tmp_path):
  """A given state design (states=4) means the one recall candidate; lam auto then solves it
  at the cheapest lam within tolerance on the traces -- the rule of operating points."""
  traces = synthetic.calibration
  path, out = str(tmp_path / "t.npz"), str(tmp_path / "p.npz")
  tj.save_traces(path, traces)
  run = commands.fit(path, out, states=4, tolerance=0.02)
  fitted = tj.fit_cascade(traces, 4, score="max_softmax")
  lams = frontier.LAMS
  sweep = tj.sweep_recall(fitted, traces, lams)
  full = float(np.asarray(traces.losses)[:, -1].mean())
  i, met = frontier.cheapest_within(sweep.cost_norm, sweep.error, full, 0.02)
  assert met and run.result["lam"] == pytest.approx(float(lams[i]))
  sel = run.result["selection"]
  assert sel["chosen"]["name"] == "recall[max_softmax, 4 quantile states]"
  assert run.result["lam_choice"].startswith("auto: least cross-fitted cost within 2 points")
  assert run.notes["sidecar"] == str(tmp_path / "p.json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.npz", "t.npz"]
  with pytest.raises(ValueError, match="must be even"):
    commands.fit(path, str(tmp_path / "q.npz"), states=3, feature="agree_prev")
  assert not (tmp_path / "q.npz").exists()


def test_demo_keeps_compiled_programs_in_its_cache(tmp_path):
  """enable_compilation_cache: XLA programs go to <cache>/xla; a cache the user set,
  or caching off, is left alone. In a fresh process (JAX reads it at the first compile)."""
  import os
  import subprocess
  import sys

  script = ("import sys, jax, jax.numpy as jnp\n"
            "from ttamer_jax.app import cli\n"
            "print(cli.enable_compilation_cache(sys.argv[1]))\n"
            "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PLATFORMS"] = "cpu"
  run = lambda arg, **extra: subprocess.run([sys.executable, "-c", script, arg], env=dict(env, **extra),
                                            capture_output=True, text=True, check=True).stdout.strip()
  assert run(str(tmp_path / "c")) == str(tmp_path / "c" / "xla")
  assert os.listdir(tmp_path / "c" / "xla")  # the program was written
  assert run("") == "None" and sorted(os.listdir(tmp_path)) == ["c"]  # caching off
  mine = str(tmp_path / "mine")
  assert run(str(tmp_path / "d"), JAX_COMPILATION_CACHE_DIR=mine) == mine  # the user's wins
  assert not (tmp_path / "d").exists()
