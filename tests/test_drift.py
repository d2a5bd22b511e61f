"""Degradation under drift and the re-fit trigger (tj.DriftMonitor, tj.drift_test, docs/drift.md).

* the building blocks against independent recounts: state counts, Holm's
  step-down adjustment, the monitor's sliding window, and the G / Pearson
  statistics against ``scipy.stats.chi2_contingency``;
* without drift the trigger fires at a rate consistent with ``alpha``;
* under drift it fires, on the stages whose states moved;
* the whole procedure: a policy fitted on calibration traces loses objective on
  drifted traffic, the monitor flags it, and re-fitting on fresh drifted traces
  recovers the optimum (exact values on the known cascades, and paired
  standard-error tolerances on held-out traces).

The numbers quoted in docs/drift.md are printed by
``pytest tests/test_drift.py -s -k "null or procedure or moved"``.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import ttamer_jax as tj
from ttamer_jax.networks import profiling


# ------------------------------------------------------------------ building blocks
def test_state_counts_match_a_loop_recount():
  rng = np.random.default_rng(0)
  states = rng.integers(-1, 5, size=(300, 4))
  counts = tj.evaluation.state_counts(states, 5)
  assert counts.shape == (4, 5) and counts.dtype == np.int64
  for i in range(4):
    for s in range(5):
      assert counts[i, s] == sum(1 for r in range(300) if states[r, i] == s)
  assert (counts.sum(axis=1) == (states >= 0).sum(axis=0)).all()  # -1: not observed


def _holm_by_definition(p):
  """``adj_(k) = min(1, max_{j <= k} (m - j + 1) p_(j))`` over the ascending order."""
  m = len(p)
  order = sorted(range(m), key=lambda i: p[i])
  out, running = [0.0] * m, 0.0
  for rank, i in enumerate(order):
    running = max(running, (m - rank) * p[i])
    out[i] = min(1.0, running)
  return np.array(out)


def test_holm_matches_the_step_down_definition():
  rng = np.random.default_rng(1)
  for _ in range(50):
    m = int(rng.integers(1, 9))
    p = rng.choice([0.0, 0.001, 0.01, 0.02, 0.04, 0.3, 1.0], size=m) if rng.random() < 0.5 \
        else rng.uniform(0, 0.2, m)  # ties and exact 0 / 1 half of the time
    np.testing.assert_allclose(tj.evaluation.holm(p), _holm_by_definition(list(p)), rtol=0, atol=1e-15)
  # Holm rejects H_(k) iff every p_(j), j <= k, is <= alpha / (m - j + 1).
  p = np.array([0.01, 0.04, 0.03, 0.005])
  assert list(tj.evaluation.holm(p) <= 0.05) == [True, False, False, True]


def test_g_and_chi2_statistics_match_scipy():
  rng = np.random.default_rng(2)
  for _ in range(30):
    k = int(rng.integers(2, 7))
    n = int(rng.integers(1, 4))
    probs = rng.dirichlet(np.full(k, 5.0), size=n)
    ref = np.stack([rng.multinomial(int(rng.integers(300, 3000)), p) for p in probs])
    shifted = 0.8 * probs + 0.2 * rng.dirichlet(np.full(k, 5.0), size=n)
    obs = np.stack([rng.multinomial(int(rng.integers(300, 3000)), p) for p in shifted])
    for test, lambda_ in (("g", "log-likelihood"), ("chi2", None)):
      rep = tj.evaluation.two_sample_test(ref, obs, test=test, alpha=0.05, min_count=1)
      for i in range(n):
        table = np.stack([ref[i], obs[i]])
        if stats.contingency.expected_freq(table).min() < 5:
          continue  # sparse columns are pooled: compared in the next test
        stat, p, dof, _ = stats.chi2_contingency(table, correction=False, lambda_=lambda_)
        np.testing.assert_allclose(rep.statistic[i], stat, rtol=1e-9)
        np.testing.assert_allclose(rep.p_value[i], p, rtol=1e-6, atol=1e-300)
        assert rep.dof[i] == dof == k - 1
        tv = 0.5 * np.abs(ref[i] / ref[i].sum() - obs[i] / obs[i].sum()).sum()
        np.testing.assert_allclose(rep.distance[i], tv, rtol=1e-12)
      np.testing.assert_allclose(rep.adjusted_p, _holm_by_definition(list(rep.p_value)), atol=1e-15)
      assert rep.refit == bool((rep.adjusted_p <= 0.05).any())


def test_sparse_states_are_pooled_and_small_stages_not_tested():
  ref = np.array([[500, 400, 3, 1, 0], [10, 10, 10, 10, 10]])
  obs = np.array([[480, 420, 2, 4, 0], [10, 10, 10, 10, 10]])
  rep = tj.evaluation.two_sample_test(ref, obs, min_count=60)
  pooled = np.array([[500, 400, 4], [480, 420, 6]])  # states 2 and 3 pooled, empty state 4 dropped
  stat, p, dof, _ = stats.chi2_contingency(pooled, correction=False, lambda_="log-likelihood")
  np.testing.assert_allclose([rep.statistic[0], rep.p_value[0]], [stat, p], rtol=1e-9)
  assert rep.dof[0] == dof == 2
  # Stage 1 has 50 < min_count observations: not tested, p = 1.
  assert rep.dof[1] == 0 and rep.p_value[1] == 1 and not rep.drifted[1]
  assert rep.adjusted_p[0] == rep.p_value[0]  # one tested stage: no correction


def test_monitor_window_counts_match_a_recount():
  rng = np.random.default_rng(3)
  n, k, window = 3, 4, 25
  mon = tj.DriftMonitor(np.ones((n, k), np.int64), window=window, min_count=1)
  seen = [[] for _ in range(n)]
  for step in range(40):
    if step == 30:
      mon.reset()
      seen = [[] for _ in range(n)]
    batch = rng.integers(-1, k, size=(int(rng.integers(0, 60)), n))
    if step % 3 == 2:
      stage = int(rng.integers(n))
      mon.observe(stage, batch[:, 0])
      seen[stage].extend(int(s) for s in batch[:, 0] if s >= 0)
    else:
      mon.update(batch)
      for i in range(n):
        seen[i].extend(int(s) for s in batch[:, i] if s >= 0)
    want = np.array([[seen[i][-window:].count(s) for s in range(k)] for i in range(n)])
    np.testing.assert_array_equal(mon.counts, want)
    np.testing.assert_array_equal(mon.check().num_observed, want.sum(axis=1))


# ------------------------------------------------------------------ (a) no drift
ALPHA = 0.05
SIMS = 200
# Under no drift, refits ~ Binomial(SIMS, q) with q <= ALPHA (Holm; the chi-square
# approximation is accurate at these counts). One-sided 1e-3 bounds:
UPPER = int(stats.binom.isf(1e-3, SIMS, ALPHA))   # 21 for (200, 0.05)
LOWER = int(stats.binom.ppf(1e-3, SIMS, ALPHA))   # 3: a single stage is not conservative


def _null_refits(rng, n, test, n_ref=2000, n_obs=1000, k=6):
  """Refits over SIMS null simulations: both samples from the same random state
  distribution per stage (Dirichlet(2) rows, so that sparse states are pooled)."""
  fired = 0
  for _ in range(SIMS):
    probs = rng.dirichlet(np.full(k, 2.0), size=n)
    ref = np.stack([rng.multinomial(n_ref, p) for p in probs])
    obs = np.stack([rng.multinomial(n_obs, p) for p in probs])
    fired += tj.evaluation.two_sample_test(ref, obs, alpha=ALPHA, test=test).refit
  return fired


@pytest.mark.parametrize("test", ["g", "chi2"])
def test_null_false_positive_rate_is_consistent_with_alpha(test):
  single = _null_refits(np.random.default_rng(10), 1, test)
  family = _null_refits(np.random.default_rng(11), 4, test)
  print(f"\nnull, {test}-test, alpha {ALPHA}: {single}/{SIMS} refits with 1 stage, "
        f"{family}/{SIMS} with 4 stages (Holm); binomial bounds [{LOWER}, {UPPER}]")
  assert LOWER <= single <= UPPER
  assert family <= UPPER


# ------------------------------------------------------------------ the cascades
K, N_STAGES, LAM = 6, 4, 0.7
NUM = 6000  # every trace set has this size: sample_traces compiles once


def _harder_later(cascade):
  """Drift of the dynamics: a request's difficulty bin rises by about one at every
  stage (later blocks stop helping), values given the state unchanged."""
  s, t = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
  rows = np.exp(-np.abs(t - np.minimum(s + 1, K - 1)) / 0.7)
  rows /= rows.sum(axis=1, keepdims=True)
  return tj.Cascade.from_arrays(np.asarray(cascade.values, np.float64),
                                np.asarray(cascade.init, np.float64),
                                np.broadcast_to(rows, (N_STAGES - 1, K, K)),
                                np.asarray(cascade.costs, np.float64))


def _harder_entry(cascade):
  """Drift of the entry only: harder requests arrive (``init`` reversed), same dynamics."""
  return cascade.replace(init=cascade.init[::-1])


C0 = tj.synthetic_cascade(1, N_STAGES, K, regime="improving")
C1 = _harder_later(C0)
C2 = _harder_entry(C0)


def _traces(cascade, seed):
  return tj.sample_traces(jax.random.PRNGKey(seed), cascade, NUM)


def _halves(traces):
  """``(calibration, traffic)``: the first 2000 requests and the other 4000."""
  return traces.subset(np.arange(2000)), traces.subset(np.arange(2000, NUM))


def _fit(calibration):
  # K uniform bins on [0, 1] recover the true states of sample_traces exactly, so
  # exact metrics on the true cascades apply to the fitted policies.
  return tj.fit_cascade(calibration, K, binning="uniform", score_range=(0.0, 1.0)).recall_policy(LAM)


def _exact(cascade, deployed):
  return float(tj.policy_metrics(cascade, deployed.policy).objective(LAM))


def _optimum(cascade):
  return float(tj.solve_recall(cascade, LAM).value)


CAL0, TRAFFIC0 = _halves(_traces(C0, 10))
P0 = _fit(CAL0)


def test_null_traffic_from_the_calibration_process_does_not_trigger():
  """Three fresh 2000-request samples of the calibration process (alpha = 0.01 each,
  so P(two or more false alarms) <= 3e-4) and the same through the monitor."""
  fresh = _traces(C0, 20)
  fired = [tj.drift_test(P0, CAL0, fresh.subset(np.arange(j * 2000, (j + 1) * 2000))).refit
           for j in range(3)]
  assert sum(fired) <= 1, fired
  mon = tj.DriftMonitor.from_traces(P0, CAL0, window=2000)
  states = tj.reference_states(P0, TRAFFIC0)
  alarms = 0
  for start in range(0, 4000, 250):     # served in batches of 250, checked after each
    report = mon.update(states[start:start + 250]).check()
    alarms += report.refit
  assert not report.refit               # P <= alpha = 0.01 for one check
  print(f"\nnull traces: {sum(fired)} of 3 fresh samples and {alarms} of 16 monitor checks alarmed")


# ------------------------------------------------------------------ (b) drift
def test_drift_triggers_on_the_stages_that_moved():
  _, traffic1 = _halves(_traces(C1, 12))
  rep = tj.drift_test(P0, CAL0, traffic1)
  assert rep.refit
  assert not rep.drifted[0] and rep.drifted[1]  # the entry is unchanged; stage 1 moved
  _, traffic2 = _halves(_traces(C2, 14))
  rep2 = tj.drift_test(P0, CAL0, traffic2)
  assert rep2.refit and rep2.drifted[0]
  # An entry shift with unchanged dynamics leaves the fitted policy (near-)optimal:
  # the index does not depend on ``init``. The test sees the shift, not the regret.
  regret2 = _exact(C2, P0) - _optimum(C2)
  print(f"\nentry shift: flagged stages {np.flatnonzero(rep2.drifted).tolist()}, regret of the "
        f"stale policy {regret2:.4f} (optimum {_optimum(C2):.4f})")
  assert regret2 <= 0.005


# ------------------------------------------------------------------ (c) the procedure
def test_procedure_detects_degradation_and_refit_recovers():
  cal1, traffic1 = _halves(_traces(C1, 12))
  # 1. Before drift: the fitted policy is near-optimal on its own process.
  j00, opt0 = _exact(C0, P0), _optimum(C0)
  assert j00 - opt0 <= 0.003
  # 2. Drifted traffic: the stale policy loses objective against the optimum.
  j01, opt1 = _exact(C1, P0), _optimum(C1)
  assert j01 - opt1 >= 0.02
  # 3. The monitor, fed by batches of served states, flags it.
  mon = tj.DriftMonitor.from_traces(P0, CAL0, window=1000)
  served = tj.reference_states(P0, traffic1)
  first_alarm = None
  for b, start in enumerate(range(0, 4000, 250)):
    mon.update(served[start:start + 250])
    if first_alarm is None and mon.check().refit:
      first_alarm = (b + 1) * 250
  assert first_alarm is not None and first_alarm <= 1000
  # 4. Re-fit on fresh drifted traces (same bins) and compare on held-out traffic.
  p1 = _fit(cal1)
  j11 = _exact(C1, p1)
  assert j11 - opt1 <= 0.2 * (j01 - opt1)
  stale = tj.compare(P0, p1, traffic1, LAM, num_resamples=200)
  assert float(stale.diff) >= 3 * float(stale.diff_se)  # the refit is significantly better
  oracle = p1.replace(policy=tj.recall_policy(C1, LAM))
  gap = tj.compare(p1, oracle, traffic1, LAM, num_resamples=200)
  assert float(gap.diff) <= 3 * float(gap.diff_se) + 0.005  # and within noise of the optimum
  # 5. The new policy and its calibration traces re-arm the monitor: no alarm.
  mon2 = tj.DriftMonitor.from_traces(p1, cal1, window=1000)
  mon2.update(tj.reference_states(p1, traffic1)[-1000:])
  assert not mon2.check().refit
  print(f"\nprocedure (lam {LAM}): exact objective on the calibration process {j00:.4f} "
        f"(optimum {opt0:.4f}); on drifted traffic stale {j01:.4f}, re-fitted {j11:.4f}, "
        f"optimum {opt1:.4f}; held-out paired diff stale - refit {float(stale.diff):.4f} "
        f"+- {float(stale.diff_se):.4f}, refit - optimum {float(gap.diff):.4f} +- "
        f"{float(gap.diff_se):.4f}; first alarm after {first_alarm} requests (window 1000)")


# ------------------------------------------------------------------ serving feeds the monitor
def test_served_states_equal_the_offline_reference_states():
  """``ServeResult.states`` (what the monitor consumes online) = the states that
  :func:`tj.reference_states` computes offline from the same requests' traces."""
  model = tj.networks.EarlyExitMLP((4,), 3, hidden=8, num_blocks=3, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  logits = np.asarray(model(x).logits)                        # [B, n, C]
  scores = np.stack([np.asarray(profiling.exit_signal("max_softmax", logits[:, i], None))
                     for i in range(3)], axis=1)
  preds = logits.argmax(-1)
  edges = np.quantile(scores, [0.25, 0.5, 0.75], axis=0).T     # 4 bins per stage
  cascade = tj.synthetic_cascade(0, 3, 4, regime="random")
  deployed = tj.DeployedPolicy(tj.recall_policy(cascade, 0.8), tj.data.Discretiser(edges), "max_softmax")
  traces = tj.ExitTraces(scores=scores, preds=preds, losses=np.zeros((64, 3)),
                        costs=np.ones(3), signals={"max_softmax": scores})
  result = tj.Server(model, deployed, buckets=(64,))(x)
  want = np.asarray(tj.reference_states(deployed, traces))
  assert len(np.unique(result.stop_stage)) >= 2  # requests stop at different stages
  np.testing.assert_array_equal(result.states, want)
  mon = tj.DriftMonitor(tj.evaluation.reference_counts(deployed, traces), window=100, min_count=1)
  np.testing.assert_array_equal(mon.update(result.states).counts, tj.evaluation.state_counts(want, 4))
