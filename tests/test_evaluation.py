"""Held-out evaluation, bootstrap intervals, exact policy metrics and robustness."""

import functools

import jax
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj

# Internal: the paired comparison of two replays (tj.compare replays the policies itself).
from ttamer_jax.evaluation.metrics import compare_results


# ------------------------------------------------------------------ exact metrics
def _enumerate(cascade, policy):
  """E[loss], E[cost], stop and answer histograms over every state path."""
  paths, probs = ref.path_probabilities(cascade)
  n = cascade.num_stages
  losses = np.asarray(cascade.values)[np.arange(n)[None, :], paths]
  res = tj.replay(policy, paths, losses, cascade.costs)
  hist = lambda s: np.bincount(np.asarray(s), probs, n)
  return (float(np.sum(probs * np.asarray(res.loss))), float(np.sum(probs * np.asarray(res.cost))),
          hist(res.stop_stage), hist(res.answer_stage))


@pytest.mark.parametrize("seed,flags", [(0, {}), (1, dict(ties=True)), (2, dict(zero_prob=True)),
                                         (3, dict(ties=True, zero_costs=True))])
def test_policy_metrics_match_enumeration(seed, flags):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    c = ref.tiny_cascade(rng, 4, 3, **flags)
    other = ref.tiny_cascade(rng, 4, 3, ties=True)       # a policy fitted to a different model
    for lam in (0.2, 0.6, 1.0):
      policies = [tj.recall_policy(c, lam), tj.core.no_recall_policy(c, lam), tj.recall_policy(other, lam),
                  tj.core.no_recall_policy(other, lam), tj.core.FixedExitPolicy(2, 4)]
      for policy in policies:
        m = tj.policy_metrics(c, policy)
        loss, cost, stop_h, ans_h = _enumerate(c, policy)
        assert abs(float(m.loss) - loss) <= 1e-12 and abs(float(m.cost) - cost) <= 1e-12
        np.testing.assert_allclose(m.stop_histogram, stop_h, atol=1e-12)
        np.testing.assert_allclose(m.answer_histogram, ans_h, atol=1e-12)
      assert abs(float(tj.policy_metrics(c, policies[0]).objective(lam)) - ref.brute_recall(c, lam)) <= 1e-12
      assert abs(float(tj.policy_metrics(c, policies[1]).objective(lam)) - ref.brute_no_recall(c, lam)) <= 1e-12
      mix = tj.core.MixturePolicy(first=policies[0], second=policies[2], prob_second=0.3, key=jax.random.PRNGKey(0))
      m = tj.policy_metrics(c, mix)
      m0, m2 = tj.policy_metrics(c, policies[0]), tj.policy_metrics(c, policies[2])
      assert abs(float(m.loss) - (0.7 * float(m0.loss) + 0.3 * float(m2.loss))) <= 1e-12


def test_policy_metrics_rejects_what_a_cascade_cannot_model():
  c = ref.tiny_cascade(np.random.default_rng(0), 3, 4)
  with pytest.raises(ValueError, match="ThresholdPolicy reads raw scores"):
    tj.policy_metrics(c, tj.confidence_threshold(0.5, 3))
  with pytest.raises(ValueError, match="PatiencePolicy reads raw scores"):
    tj.policy_metrics(c, tj.core.PatiencePolicy(2, 3))
  with pytest.raises(ValueError, match="built for 4 stages, the cascade has 3"):
    tj.policy_metrics(c, tj.core.FixedExitPolicy(0, 4))
  with pytest.raises(ValueError, match="expected a Cascade"):
    tj.policy_metrics(np.zeros(3), tj.core.FixedExitPolicy(0, 3))


# ------------------------------------------------------------------ held-out evaluation
NUM = 20_000


@functools.lru_cache(maxsize=None)
def _known_setup():
  # Shapes shared with test_frontier / test_slo (4 stages, 4 states, 2 x 20000 samples).
  c = tj.random_cascade(jax.random.PRNGKey(7), 4, 4, concentration=1.5)
  tr = tj.sample_traces(jax.random.PRNGKey(8), c, 2 * NUM, loss="expected").subset(np.arange(NUM))
  disc = tj.fit_discretiser(tr.scores, 4, binning="uniform", score_range=(0, 1))
  return c, tr, disc


def test_evaluate_statistics_match_numpy_and_the_exact_value():
  c, tr, disc = _known_setup()
  lam = 0.6
  deployed = tj.DeployedPolicy(policy=tj.recall_policy(c, lam), discretiser=disc, score_name="scores")
  ev = tj.evaluate(deployed, tr, lam, num_resamples=1000)
  res = tj.replay_traces(deployed, tr)
  loss, cost = np.asarray(res.loss, np.float64), np.asarray(res.cost, np.float64)
  full = float(np.sum(np.asarray(c.costs, np.float64)))
  assert float(ev.error) == pytest.approx(loss.mean(), rel=1e-9)
  assert float(ev.cost) == pytest.approx(cost.mean(), rel=1e-9)
  assert float(ev.cost_norm) == pytest.approx(cost.mean() / full, rel=1e-6)
  obj = lam * loss + (1 - lam) * cost / full  # J is unit-free: cost as a share of the full cost
  assert float(ev.objective) == pytest.approx(obj.mean(), rel=1e-9)
  assert float(ev.objective) == pytest.approx(lam * float(ev.error) + (1 - lam) * float(ev.cost_norm),
                                              rel=1e-9)
  np.testing.assert_allclose(ev.stop_histogram, np.bincount(np.asarray(res.stop_stage), minlength=4) / NUM)
  assert float(np.sum(ev.answer_histogram)) == pytest.approx(1.0)
  for est, ci in ((ev.error, ev.error_ci), (ev.cost, ev.cost_ci), (ev.cost_norm, ev.cost_norm_ci),
                  (ev.objective, ev.objective_ci)):
    assert ci[0] <= float(est) <= ci[1]
  # Percentile bootstrap of a mean ~ normal interval: width ~ 2 * 1.96 * SE.
  se = obj.std(ddof=1) / np.sqrt(NUM)
  assert float(ev.objective_se) == pytest.approx(se, rel=1e-6)
  assert (ev.objective_ci[1] - ev.objective_ci[0]) == pytest.approx(2 * 1.96 * se, rel=0.1)
  # Monte-Carlo agreement with the exact value on the true model (traces sampled from it).
  exact = tj.policy_metrics(c, deployed.policy)
  # (The cascade's J is in its own cost units; evaluate's J in shares of the full cost.)
  raw = lam * float(ev.error) + (1 - lam) * float(ev.cost)
  raw_se = np.std(lam * loss + (1 - lam) * cost, ddof=1) / np.sqrt(NUM)
  assert abs(raw - float(tj.solve_recall(c, lam).value)) <= 4 * raw_se
  assert abs(float(ev.error) - float(exact.loss)) <= 4 * float(ev.error_se)
  cost_se = cost.std(ddof=1) / np.sqrt(NUM)
  assert abs(float(ev.cost) - float(exact.cost)) <= 4 * cost_se
  # Reproducible with the default key; a wider level gives a wider interval.
  again = tj.evaluate(deployed, tr, lam, num_resamples=1000)
  np.testing.assert_array_equal(again.objective_ci, ev.objective_ci)
  wide = tj.evaluate(deployed, tr, lam, num_resamples=1000, level=0.99)
  assert wide.objective_ci[0] < ev.objective_ci[0] and wide.objective_ci[1] > ev.objective_ci[1]
  d = ev.as_dict()
  assert d["num_samples"] == NUM and len(d["stop_histogram"]) == 4


def test_compare_and_split_robustness():
  c, tr, disc = _known_setup()
  lam = 0.6
  a = tj.DeployedPolicy(policy=tj.recall_policy(c, lam), discretiser=disc, score_name="scores")
  b = tj.core.FixedExitPolicy(3, 4)
  cmp = tj.compare(a, b, tr, lam)
  ra, rb = tj.replay_traces(a, tr), tj.replay_traces(b, tr)
  full = tr.full_cost()  # objectives are unit-free: costs as shares of the full cost
  d = (lam * (np.asarray(ra.loss, np.float64) - np.asarray(rb.loss, np.float64))
       + (1 - lam) * (np.asarray(ra.cost, np.float64) - np.asarray(rb.cost, np.float64)) / full)
  assert float(cmp.diff) == pytest.approx(d.mean(), rel=1e-9)
  assert float(cmp.diff_se) == pytest.approx(d.std(ddof=1) / np.sqrt(NUM), rel=1e-6)
  assert cmp.diff_ci[0] <= float(cmp.diff) <= cmp.diff_ci[1]
  assert float(cmp.diff) < 0  # the optimum beats always running 4 stages here
  same = tj.split_robustness(a, a, tr, lam)
  assert float(same.degradation) == 0.0 and list(same.degradation_ci) == [0.0, 0.0]
  # A policy fitted on one split, re-fitted on another: small, measured degradation.
  first, second = tj.data.split_traces(jax.random.PRNGKey(9), tr, 0.5)
  fit1 = tj.fit_cascade(first, discretiser=disc)
  fit2 = tj.fit_cascade(second, discretiser=disc)
  rob = tj.split_robustness(fit1.recall_policy(lam), fit2.recall_policy(lam), second, lam)
  assert rob.degradation_ci[0] <= float(rob.degradation) <= rob.degradation_ci[1]
  assert abs(float(rob.degradation)) < 0.01
  with pytest.raises(ValueError, match="replayed on different numbers of requests"):
    compare_results(ra, tj.replay_traces(b, first), lam)


def test_model_robustness():
  with jax.enable_x64(True):
    c = ref.tiny_cascade(np.random.default_rng(3), 4, 6)
    lam = 0.5
    policy = tj.recall_policy(c, lam)
    same = tj.evaluation.model_robustness(policy, c, lam)
    assert abs(float(same.degradation)) <= 1e-12
    assert tj.evaluation.perturb_cascade(jax.random.PRNGKey(0), c, 0.0).trans.shape == c.trans.shape
    np.testing.assert_allclose(tj.evaluation.perturb_cascade(jax.random.PRNGKey(0), c, 0.0).trans, c.trans, atol=1e-15)
    degr = []
    for seed, strength in ((1, 0.1), (1, 0.5), (1, 1.0), (2, 1.0), (3, 1.0)):
      p = tj.evaluation.perturb_cascade(jax.random.PRNGKey(seed), c, strength)
      np.testing.assert_allclose(np.asarray(p.trans).sum(-1), 1.0, atol=1e-12)
      r = tj.evaluation.model_robustness(policy, p, lam)
      # The re-solved policy is optimal on the perturbed model: never worse.
      assert float(r.degradation) >= -1e-12
      assert float(r.objective) == pytest.approx(float(tj.policy_metrics(p, policy).objective(lam)))
      assert float(r.refit_objective) == pytest.approx(float(tj.solve_recall(p, lam).value))
      degr.append(float(r.degradation))
    assert max(degr) > 1e-4  # a policy solved for another model does lose somewhere
    with pytest.raises(ValueError, match="strength = 1.5 must lie in"):
      tj.evaluation.perturb_cascade(jax.random.PRNGKey(1), c, 1.5)


def test_evaluate_argument_errors():
  c, tr, disc = _known_setup()
  with pytest.raises(ValueError, match="lam = -0.1 is outside"):
    tj.evaluate(tj.core.FixedExitPolicy(0, 4), tr, -0.1)
  with pytest.raises(ValueError, match="level = 1.0 must lie in"):
    tj.evaluate(tj.core.FixedExitPolicy(0, 4), tr, 0.5, level=1.0)
  with pytest.raises(ValueError, match="num_resamples = 0 must be"):
    tj.evaluate(tj.core.FixedExitPolicy(0, 4), tr, 0.5, num_resamples=0)
  with pytest.raises(ValueError, match="traces: expected ExitTraces"):
    tj.evaluate(tj.core.FixedExitPolicy(0, 4), np.zeros((3, 4)), 0.5)


def test_bootstrap_of_few_distinct_rows_matches_the_row_bootstrap_in_distribution():
  # 0/1 losses and a few exits: the draw counts of equal rows are multinomial (the
  # grouped path); continuous columns take the row-by-row path. Same distribution.
  rng = np.random.default_rng(0)
  base = np.stack([rng.integers(0, 2, 40), rng.choice([0.25, 0.5, 1.0], 40)], 1).astype(float)
  grouped = base[rng.integers(0, 40, 6000)]
  jitter = grouped + rng.normal(0, 1e-9, grouped.shape)            # every row distinct
  key = jax.random.PRNGKey(3)
  a = tj.evaluation.bootstrap_means(key, grouped, 4000)
  b = tj.evaluation.bootstrap_means(key, jitter, 4000)
  np.testing.assert_array_equal(a, tj.evaluation.bootstrap_means(key, grouped, 4000))   # deterministic
  sd = grouped.std(0) / np.sqrt(grouped.shape[0])
  for m in (a, b):
    # Mean of 4000 resample means: within 4 standard errors (sd / sqrt(4000)) of the sample mean;
    # their spread within 8% of sd (the SE of an SD estimate from 4000 draws is ~1.1%).
    assert np.all(np.abs(m.mean(0) - grouped.mean(0)) < 4 * sd / np.sqrt(4000))
    assert np.all(np.abs(m.std(0) / sd - 1) < 0.08)
