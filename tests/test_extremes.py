"""Numerics at the extremes (RELIABILITY.md, "numerics"): n = 1, K = 1, lam in {0, 1},
costs 1e-8..1e8, equal losses, near-deterministic transitions, exact ties, K = 4096.

Every float32 result is compared with the float64 solve of the same cascade and must
lie within the documented bound (docs/formulation.md, "Precision"):

    |J_float32 - J_float64| <= 4 n eps32 (max loss + sum of costs),   eps32 = 2^-23.
"""

import jax
import numpy as np
import pytest
import reference as ref
from fuzzing import record

import ttamer_jax as tj

EPS32 = float(np.finfo(np.float32).eps)


def float32_bound(values, costs):
  return 4.0 * values.shape[0] * EPS32 * (float(np.max(values)) + float(np.sum(costs)))


def solve_all(values, init, trans, costs, lam):
  """``{name: (float32 value, float64 value)}`` of the three exact solvers."""
  out = {}
  c32 = tj.Cascade(values, init, trans, costs)
  with jax.enable_x64(True):
    c64 = tj.Cascade(values, init, trans, costs)
    v64 = dict(recall=float(tj.solve_recall(c64, lam).value),
               no_recall=float(tj.solve_no_recall(c64, lam).value),
               prophet=float(tj.prophet_value(c64, lam)))
  v32 = dict(recall=float(tj.solve_recall(c32, lam).value),
             no_recall=float(tj.solve_no_recall(c32, lam).value),
             prophet=float(tj.prophet_value(c32, lam)))
  for name in v64:
    out[name] = (v32[name], v64[name])
  return out


def check_precision(values, init, trans, costs, lam):
  bound = float32_bound(values, costs)
  results = solve_all(values, init, trans, costs, lam)
  for name, (a, b) in results.items():
    assert np.isfinite(a) and np.isfinite(b), (name, a, b)
    assert abs(a - b) <= bound, (name, a, b, bound)
  return results


def cascade64(values, init, trans, costs):
  """The cascade in float64 (references must not see float32-rounded inputs)."""
  with jax.enable_x64(True):
    return tj.Cascade(values, init, trans, costs)


def random_arrays(seed, n, k, conc=1.0):
  rng = np.random.default_rng(seed)
  values = rng.uniform(0, 1, (n, k))
  init = rng.dirichlet(np.full(k, conc))
  trans = rng.dirichlet(np.full(k, conc), size=(n - 1, k)).reshape(n - 1, k, k)
  costs = rng.uniform(0.01, 0.2, n)
  return values, init, trans, costs


# ------------------------------------------------------------------ n = 1, K = 1
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_single_stage_is_the_closed_form(lam):
  values, init, _, costs = random_arrays(0, 1, 5)
  trans = np.zeros((0, 5, 5))
  exact = lam * float(init @ values[0]) + (1 - lam) * costs[0]
  results = check_precision(values, init, trans, costs, lam)
  for name, (_, v64) in results.items():
    assert v64 == pytest.approx(exact, rel=1e-12, abs=1e-15), name
  index = np.asarray(tj.solve_recall(tj.Cascade(values, init, trans, costs), lam).index)
  assert index.shape == (1, 5) and np.all(np.isposinf(index))  # the only stage always stops
  record("numerics.extreme", "closed form")


def test_single_state_chain_is_deterministic_brute_force():
  # K = 1: every stage's loss is known in advance; the optimum is a min over stopping stages.
  values = np.array([[0.9], [0.5], [0.45], [0.1]])
  costs = np.array([0.05, 0.1, 0.02, 0.3])
  init, trans = np.ones(1), np.ones((3, 1, 1))
  for lam in (0.0, 0.25, 0.5, 0.8, 1.0):
    totals = [lam * values[:i + 1, 0].min() + (1 - lam) * costs[:i + 1].sum() for i in range(4)]
    results = check_precision(values, init, trans, costs, lam)
    # Deterministic: hindsight and recall coincide; no-recall answers the stopped stage.
    assert results["recall"][1] == pytest.approx(min(totals), abs=1e-12)
    assert results["prophet"][1] == pytest.approx(min(totals), abs=1e-12)
    no_rec = [lam * values[i, 0] + (1 - lam) * costs[:i + 1].sum() for i in range(4)]
    assert results["no_recall"][1] == pytest.approx(min(no_rec), abs=1e-12)
    record("numerics.extreme", "closed form")


# ------------------------------------------------------------------ lam in {0, 1}
@pytest.mark.parametrize("seed", range(3))
def test_lam_zero_pays_only_the_first_stage(seed):
  values, init, trans, costs = random_arrays(seed, 4, 6)
  for name, (v32, v64) in check_precision(values, init, trans, costs, 0.0).items():
    assert v64 == pytest.approx(costs[0], rel=1e-12), name
  record("numerics.extreme", "closed form")


@pytest.mark.parametrize("seed", range(3))
def test_lam_one_recall_equals_hindsight_equals_expected_minimum(seed):
  # No cost: consulting everything is free, so recall is as good as hindsight.
  values, init, trans, costs = random_arrays(seed, 3, 3)
  c = cascade64(values, init, trans, costs)
  expected_min = ref.brute_prophet(c, 1.0)
  results = check_precision(values, init, trans, costs, 1.0)
  assert results["recall"][1] == pytest.approx(expected_min, abs=1e-12)
  assert results["prophet"][1] == pytest.approx(expected_min, abs=1e-12)
  assert results["no_recall"][1] == pytest.approx(ref.brute_no_recall(c, 1.0), abs=1e-12)
  record("numerics.extreme", "closed form")


# ------------------------------------------------------------------ scales
@pytest.mark.parametrize("exponent", [-8, 0, 8])
def test_costs_and_losses_across_sixteen_decades(exponent):
  values, init, trans, costs = random_arrays(exponent + 10, 5, 8)
  rng = np.random.default_rng(exponent + 100)
  costs = 10.0 ** rng.uniform(-8, 8, 5)                # one cascade spans 1e-8..1e8
  values = values * 10.0 ** exponent
  for lam in (1e-6, 0.5, 1 - 1e-6):
    results = check_precision(values, init, trans, costs, lam)
    r, nr, hs = (results[k][0] for k in ("recall", "no_recall", "prophet"))
    tol = 2 * float32_bound(values, costs)
    assert hs <= r + tol and r <= nr + tol
    record("numerics.extreme", "within float32 bound")


def test_all_losses_equal_stops_at_once():
  values = np.full((4, 3), 0.25)
  _, init, trans, _ = random_arrays(1, 4, 3)
  costs = np.array([0.1, 0.2, 0.3, 0.4])
  for lam in (0.0, 0.5, 1.0):
    results = check_precision(values, init, trans, costs, lam)
    # Nothing to gain from another stage: every solver stops after the first.
    for name, (_, v64) in results.items():
      assert v64 == pytest.approx(lam * 0.25 + (1 - lam) * 0.1, abs=1e-15), name
    policy = tj.recall_policy(tj.Cascade(values, init, trans, costs), lam)
    states = np.asarray(tj.core.sample_states(jax.random.PRNGKey(0), tj.Cascade(values, init, trans, costs), 50))
    res = tj.core.replay_cascade(policy, tj.Cascade(values, init, trans, costs), states)
    assert np.all(np.asarray(res.stop_stage) == 0)
    record("numerics.extreme", "closed form")


@pytest.mark.parametrize("seed", range(3))
def test_near_deterministic_transitions(seed):
  # Entries of 1e-12 beside ~1: probabilities below float32 resolution of 1.
  rng = np.random.default_rng(seed)
  n, k = 4, 5
  values = rng.uniform(0, 1, (n, k))
  perm = [rng.permutation(k) for _ in range(n - 1)]
  trans = np.stack([np.where(np.eye(k)[:, p] > 0, 1.0, 1e-12) for p in perm])
  trans /= trans.sum(-1, keepdims=True)
  init = np.where(np.arange(k) == seed % k, 1.0, 1e-12)
  init /= init.sum()
  costs = rng.uniform(0.01, 0.1, n)
  for lam in (0.2, 0.7):
    results = check_precision(values, init, trans, costs, lam)
    c = cascade64(values, init, trans, costs)
    assert results["recall"][1] == pytest.approx(ref.brute_recall(c, lam), abs=1e-9)
    record("numerics.extreme", "within float32 bound")


# ------------------------------------------------------------------ ties
def test_exact_tie_stops_in_both_solvers():
  # K = 1, n = 2, lam = 1/2: stopping (1/2 * 1) and continuing (1/2 * 1 + 1/2 * 0) tie exactly.
  values, init, trans, costs = np.array([[1.0], [0.0]]), np.ones(1), np.ones((1, 1, 1)), np.array([0.0, 1.0])
  c = tj.Cascade(values, init, trans, costs)
  index = np.asarray(tj.solve_recall(c, 0.5).index)
  assert 0.5 * 1.0 <= index[0, 0]                      # documented rule: ties stop
  assert bool(np.asarray(tj.solve_no_recall(c, 0.5).stop)[0, 0])
  res = tj.core.replay_cascade(tj.recall_policy(c, 0.5), c, np.zeros((3, 2), np.int32))
  assert np.all(np.asarray(res.stop_stage) == 0)
  # The tie rule is deterministic: the same table on every call.
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(tj.solve_recall(c, 0.5).index), index)
  record("numerics.extreme", "tie stops")


# ------------------------------------------------------------------ K = 4096
def test_k4096_solves_without_nan_and_matches_the_float64_closed_form():
  # n = 2 has a closed form: J = (1-lam) c0 + sum_s init[s] min(lam v0[s],
  # (1-lam) c1 + lam sum_t trans[s, t] min(v0[s], v1[t])) -- O(K^2) in NumPy float64.
  k, lam = 4096, 0.6
  rng = np.random.default_rng(7)
  values = rng.uniform(0, 1, (2, k))
  init = rng.dirichlet(np.ones(k))
  trans = rng.dirichlet(np.ones(k), size=(1, k)).reshape(1, k, k)
  costs = np.array([0.05, 0.02])
  c = tj.Cascade(values, init, trans, costs)
  result = tj.solve_recall(c, lam, aggregate_above=None)
  index = np.asarray(result.index)
  assert not np.isnan(index).any() and np.all(np.isposinf(index[-1]))
  v0, v1 = np.asarray(c.values, np.float64)        # the float32 inputs, exactly
  p0, tr = np.asarray(c.init, np.float64), np.asarray(c.trans, np.float64)[0]
  c0, c1 = np.asarray(c.costs, np.float64)
  cont = (1 - lam) * c1 + lam * np.einsum("st,st->s", tr, np.minimum(v0[:, None], v1[None, :]))
  exact = (1 - lam) * c0 + p0 @ np.minimum(lam * v0, cont)
  assert abs(float(result.value) - exact) <= float32_bound(values, costs)
  # The stop rule of the table agrees with the float64 comparison away from ties.
  clear = np.abs(lam * v0 - cont) > 1e-5
  np.testing.assert_array_equal((lam * v0 <= index[0])[clear], (lam * v0 <= cont)[clear])
  record("numerics.extreme", "within float32 bound")
