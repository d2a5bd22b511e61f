"""Numerics and conventions across precisions (issue 14): float64 replay, thresholds off
the knife-edge, threshold dtypes, uniform return types, states you already know, SLO
policies of a plain Cascade; and the replay / evaluation / frontier / SLO suites run
again under ``jax_enable_x64``."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj


def _reachable(c, lam):
  """Every reachable ``(stage, x = lam * best, state)`` of a float64 run (x as a float64)."""
  values = np.asarray(c.values, np.float64)
  n, _ = values.shape
  return [(i, lam * b, s) for i in range(n) for b in np.unique(values[: i + 1]) for s in
          range(values.shape[1])]


# ------------------------------------------------------------------ float64 replay
def test_replay_under_x64_the_minimal_case_of_the_issue():
  with jax.enable_x64(True):
    c = tj.demo_cascade(3, 2)
    pol = tj.recall_policy(c, 0.9)
    res = tj.replay(pol, np.zeros((4, 3), int), np.zeros((4, 3), np.float32), np.asarray(c.costs))
    assert res.stop_stage.shape == (4,)
    traces = tj.sample_traces(jax.random.PRNGKey(0), c, 500, loss="expected")
    fitted = tj.data.fit_cascade_from_states(np.asarray(traces.signals["state_score"] * 2).astype(int),
                                        traces.losses, traces.costs, 2)
    ev = tj.evaluate(fitted.recall_policy(0.9), tj.data.traces_with_states(
        np.asarray(traces.signals["state_score"] * 2).astype(int), traces.losses, traces.costs), 0.9)
    assert np.isfinite(float(ev.objective))


def test_a_grid_of_policies_is_refused_by_name():
  c = tj.demo_cascade(3, 2)
  grid = jax.vmap(lambda lam: tj.recall_policy(c, lam))(np.asarray([0.3, 0.9]))
  with pytest.raises(ValueError, match=r"is a grid of policies \(batch shape \(2,\)\)"):
    tj.replay(grid, np.zeros((4, 3), int), np.zeros((4, 3)), np.asarray(c.costs))


# ------------------------------------------------------------------ knife-edge
@pytest.mark.parametrize("seed", range(6))
def test_float32_and_float64_solves_decide_alike_on_every_reachable_state(seed):
  c32 = tj.random_cascade(jax.random.PRNGKey(seed), 4, 5, cost_scale=0.2)
  arrays = {f: np.asarray(getattr(c32, f), np.float32) for f in ("values", "init", "trans", "costs")}
  for lam in (0.3, 0.6, 0.9):
    idx32 = np.asarray(tj.solve_recall(c32, lam).index, np.float64)
    with jax.enable_x64(True):
      c64 = tj.Cascade(**{k: v.astype(np.float64) for k, v in arrays.items()})
      idx64 = np.asarray(tj.solve_recall(c64, lam).index)
    for i, x, s in _reachable(c32, lam):
      # The same rule evaluated in float64 (x) and in float32 (x32) on both tables.
      x32 = np.float32(lam) * np.float32(x / lam) if lam > 0 else 0.0
      decisions = {x <= idx32[i, s], x <= idx64[i, s], np.float32(x32) <= np.float32(idx32[i, s])}
      assert len(decisions) == 1, (seed, lam, i, s, x, idx32[i, s], idx64[i, s])


def test_saved_float32_policy_scores_its_reported_value_in_float64(tmp_path):
  c = tj.demo_cascade()
  for lam in (0.3, 0.5, 0.8):
    sol = tj.solve_recall(c, lam)
    policy = tj.recall_policy(c, lam)
    disc = tj.data.Discretiser.identity(c.num_stages, c.num_states)
    path = tmp_path / f"p{lam}.npz"
    tj.save_policy(path, tj.DeployedPolicy(policy=policy, discretiser=disc, score_name="state"))
    with jax.enable_x64(True):
      loaded = tj.load_policy(path)
      c64 = tj.Cascade(*(np.asarray(getattr(c, f), np.float64)
                         for f in ("values", "init", "trans", "costs")))
      # The float64 session reads lam from the file as float64 and the index as float32.
      p64 = loaded.policy.replace(lam=np.asarray(float(loaded.policy.lam), np.float64))
      scored = float(tj.policy_metrics(c64, p64).objective(lam))
    assert scored == pytest.approx(float(sol.value), rel=1e-6)
    assert scored == pytest.approx(ref.numpy_recall(c, lam)[0], rel=1e-6)


def test_index_is_strictly_between_grid_values():
  c = tj.demo_cascade()
  lam = 0.3
  xs = lam * np.unique(np.asarray(c.values, np.float64))
  idx = np.asarray(tj.solve_recall(c, lam).index, np.float64)
  finite = idx[np.isfinite(idx)]
  assert finite.size and not np.isin(finite.astype(np.float32), xs.astype(np.float32)).any()
  for t in finite:  # a midpoint between two consecutive grid values
    below, above = xs[xs < t].max(), xs[xs > t].min()
    assert t == pytest.approx((below + above) / 2, rel=1e-6)
  graph = tj.core.solve_graph_recall(tj.core.line_graph(c), lam)
  np.testing.assert_allclose(graph.index, idx, rtol=1e-6)


# ------------------------------------------------------------------ conventions
def test_threshold_compares_in_the_session_precision():
  with jax.enable_x64(True):
    pol = tj.confidence_threshold(0.1, 2)
    assert pol.thresholds.dtype == np.float64
    res = tj.replay(pol, np.zeros((1, 2), int), np.zeros((1, 2)), np.ones(2),
                    scores=np.full((1, 2), 0.1))
    assert int(res.stop_stage[0]) == 0  # 0.1 >= 0.1 stops at the first exit
  assert tj.confidence_threshold(0.1, 2).thresholds.dtype == np.float32


def test_graph_and_line_policies_take_the_unscaled_best_loss():
  c = tj.demo_cascade(4, 5)
  lam = 0.6
  line = tj.recall_policy(c, lam)
  graph = tj.core.graph_policy(tj.core.line_graph(c), lam)
  values = np.asarray(c.values)
  for i in range(3):
    for s in range(5):
      for best in np.unique(values[: i + 1]):
        stop, _ = graph.decide(i, s, best)
        assert bool(stop) == bool(line.should_stop(i, s, best)) == bool(lam * best <= line.index[i, s])


def test_exhaustive_thresholds_return_jax_arrays_like_the_other_tuners():
  c = tj.demo_cascade(3, 4)
  scores = np.tile(np.linspace(0.2, 0.9, 4), (3, 1))
  t, obj = tj.exhaustive_thresholds_on_cascade(c, scores, 0.7)
  t2, obj2 = tj.grid_search_threshold(np.random.default_rng(0).random((50, 3)), np.zeros((50, 3)),
                                      np.ones(3), 0.7)
  for a in (t, obj, t2, obj2):
    assert isinstance(a, jax.Array)
  assert t.shape == (3,) and obj.shape == ()


# ------------------------------------------------------------------ known states
def test_fit_from_known_states_recovers_the_chain():
  c = tj.demo_cascade(4, 6)
  states = np.asarray(tj.core.sample_states(jax.random.PRNGKey(3), c, 40_000))
  losses = np.asarray(c.values)[np.arange(4)[None], states]
  fit = tj.data.fit_cascade_from_states(states, losses, c.costs, 6, smoothing=0.0, loss_smoothing=0.0)
  counts = np.asarray(fit.counts, np.float64)
  true = np.asarray(c.trans, np.float64)
  se = np.sqrt(true * (1 - true) / np.maximum(counts[:-1], 1)[:, :, None])
  assert np.all(np.abs(np.asarray(fit.cascade.trans) - true) <= 4 * se + 1e-6)
  np.testing.assert_allclose(fit.cascade.values, c.values, rtol=1e-5)
  assert fit.score_name == "state"
  traces = tj.data.traces_with_states(states, losses, c.costs)
  np.testing.assert_array_equal(np.asarray(fit.discretiser(traces.signals["state"])), states)
  with pytest.raises(ValueError, match=r"states\[0, 0\] = 7 is outside \[0, 5\]"):
    tj.data.fit_cascade_from_states(np.full((2, 4), 7), np.zeros((2, 4)), c.costs, 6)
  with pytest.raises(ValueError, match="states: must hold integers"):
    tj.data.fit_cascade_from_states(np.full((2, 4), 0.5), np.zeros((2, 4)), c.costs)


def test_slo_policies_of_a_plain_cascade():
  c = tj.demo_cascade(4, 6)
  slo = tj.evaluation.least_cost_policy(c, 0.15, key=jax.random.PRNGKey(0))
  assert slo.source == "model" and float(slo.expected_loss) == pytest.approx(0.15, abs=1e-6)
  exact = tj.policy_metrics(c, slo.deployed.policy)
  assert float(exact.loss) == pytest.approx(0.15, abs=1e-5)
  budget = tj.evaluation.least_error_policy(c, 0.4, key=jax.random.PRNGKey(0))
  assert float(tj.policy_metrics(c, budget.deployed.policy).cost) == pytest.approx(0.4, abs=1e-5)
  with pytest.raises(ValueError, match="calibration: measuring on traces needs a FittedCascade"):
    tj.evaluation.least_cost_policy(c, 0.15, key=jax.random.PRNGKey(0),
                         calibration=tj.sample_traces(jax.random.PRNGKey(1), c, 10))


# ------------------------------------------------------------------ both precisions
X64_SUITES = ["tests/test_simulation.py", "tests/test_evaluation.py", "tests/test_frontier.py",
              "tests/test_slo.py"]


def test_replay_evaluation_frontier_and_slo_suites_pass_under_x64():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_ENABLE_X64="1")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-k", "not under_x64", *X64_SUITES], cwd=root, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout.splitlines()[-1]
