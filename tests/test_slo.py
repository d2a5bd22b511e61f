"""SLO policies: randomised mixtures, exactness in expectation, Lagrangian duality,
and the constraint met on held-out data."""

import functools

import jax
import numpy as np
import pytest

import ttamer_jax as tj

N_SPLIT = 20_000


@functools.lru_cache(maxsize=None)
def _setup():
  c = tj.overthinking_cascade(4, 4)
  tr = tj.sample_traces(jax.random.PRNGKey(21), c, 2 * N_SPLIT, loss="bernoulli")
  cal, held = tr.subset(np.arange(N_SPLIT)), tr.subset(np.arange(N_SPLIT, 2 * N_SPLIT))
  fit = tj.fit_cascade(cal, 4, binning="uniform", score_range=(0, 1))
  return c, cal, held, fit


# ------------------------------------------------------------------ mixture
def test_mixture_coins_are_reproducible_and_have_the_right_rate():
  c = tj.overthinking_cascade(4, 4)
  a, b = tj.recall_policy(c, 0.2), tj.recall_policy(c, 0.9)
  mix = tj.core.MixturePolicy(first=a, second=b, prob_second=0.3, key=jax.random.PRNGKey(5))
  coin = np.asarray(mix.initial_carry(50_000)[0])
  assert abs(coin.mean() - 0.3) <= 4 * np.sqrt(0.3 * 0.7 / 50_000)
  np.testing.assert_array_equal(coin, np.asarray(mix.initial_carry(50_000)[0]))
  other = mix.replace(key=jax.random.fold_in(jax.random.PRNGKey(5), 1))
  assert not np.array_equal(coin, np.asarray(other.initial_carry(50_000)[0]))
  typed = tj.core.MixturePolicy(first=a, second=b, prob_second=0.3, key=jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(typed.initial_carry(100)[0]), coin[:100])
  # The step follows the coin's policy.
  states = np.asarray(tj.core.sample_states(jax.random.PRNGKey(0), c, 1000))
  for p, pure in ((0.0, a), (1.0, b)):
    m = mix.replace(prob_second=np.float32(p))
    np.testing.assert_array_equal(tj.core.replay_cascade(m, c, states).stop_stage,
                                  tj.core.replay_cascade(pure, c, states).stop_stage)
  res = tj.core.replay_cascade(mix, c, states)
  coin = np.asarray(mix.initial_carry(1000)[0])
  expect = np.where(coin, tj.core.replay_cascade(b, c, states).stop_stage,
                    tj.core.replay_cascade(a, c, states).stop_stage)
  np.testing.assert_array_equal(res.stop_stage, expect)
  with pytest.raises(ValueError, match=r"prob_second = 1.5 must be a scalar in \[0, 1\]"):
    tj.core.MixturePolicy(first=a, second=b, prob_second=1.5, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="must share the recall flag"):
    tj.core.MixturePolicy(first=a, second=tj.core.no_recall_policy(c, 0.5), prob_second=0.5, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"key: expected a PRNG key"):
    tj.core.MixturePolicy(first=a, second=b, prob_second=0.5, key=np.zeros(3, np.uint32))


# ------------------------------------------------------------------ exactness and duality
def test_least_cost_policy_is_exact_in_expectation_and_meets_the_dual_bound():
  with jax.enable_x64(True):
    c = tj.overthinking_cascade(4, 6)
    fit = tj.data.FittedCascade(cascade=c, discretiser=tj.fit_discretiser(np.zeros((1, 4)), 6), counts=np.zeros((4, 6)))
    lams = np.linspace(0, 1, 2001)
    j_star = np.array([float(tj.solve_recall(c, lam).value) for lam in lams])
    full = tj.policy_metrics(c, tj.recall_policy(c, 1.0))
    cheap = tj.policy_metrics(c, tj.recall_policy(c, 0.0))
    for frac in (0.3, 0.7):
      target = float(full.loss) + frac * (float(cheap.loss) - float(full.loss))
      pol = tj.evaluation.least_cost_policy(fit, target, key=jax.random.PRNGKey(0))
      assert pol.kind == "error" and pol.source == "model"
      m = tj.policy_metrics(c, pol.deployed.policy)
      assert abs(float(m.loss) - target) <= 1e-9 and abs(float(pol.expected_loss) - target) <= 1e-9
      assert abs(float(m.cost) - float(pol.expected_cost)) <= 1e-9
      assert 0 < float(pol.lam_low) <= float(pol.lam_high) < 1 and 0 <= float(pol.prob_high) <= 1
      # Weak duality: min E[cost] s.t. E[loss] <= target  >=  (J*(lam) - lam target) / (1 - lam)
      # for every lam; the randomised optimum attains the maximum of the dual.
      dual = np.max((j_star[:-1] - lams[:-1] * target) / (1 - lams[:-1]))
      assert float(pol.expected_cost) >= dual - 1e-9
      assert float(pol.expected_cost) <= dual + 1e-4
    for budget_frac in (0.3, 0.6):
      budget = float(cheap.cost) + budget_frac * (float(full.cost) - float(cheap.cost))
      pol = tj.evaluation.least_error_policy(fit, budget, key=jax.random.PRNGKey(0))
      m = tj.policy_metrics(c, pol.deployed.policy)
      assert abs(float(m.cost) - budget) <= 1e-9
      dual = np.max((j_star[1:] - (1 - lams[1:]) * budget) / lams[1:])
      assert float(m.loss) >= dual - 1e-9 and float(m.loss) <= dual + 1e-4


def test_slack_and_infeasible_targets():
  with jax.enable_x64(True):
    c = tj.overthinking_cascade(4, 6)
    fit = tj.data.FittedCascade(cascade=c, discretiser=tj.fit_discretiser(np.zeros((1, 4)), 6), counts=np.zeros((4, 6)))
    best = float(tj.policy_metrics(c, tj.recall_policy(c, 1.0)).loss)
    with pytest.raises(ValueError, match="infeasible, the least error"):
      tj.evaluation.least_cost_policy(fit, 0.5 * best, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="infeasible, the least mean cost"):
      tj.evaluation.least_error_policy(fit, 0.5 * float(c.costs[0]), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="target = -0.1 must be"):
      tj.evaluation.least_cost_policy(fit, -0.1, key=jax.random.PRNGKey(0))
    slack = tj.evaluation.least_cost_policy(fit, 1.0, key=jax.random.PRNGKey(0))   # lam = 0 already meets it
    assert float(slack.lam_low) == float(slack.lam_high) == 0.0
    assert float(slack.expected_cost) == pytest.approx(float(c.costs[0]))
    rich = tj.evaluation.least_error_policy(fit, 10.0, key=jax.random.PRNGKey(0))
    assert float(rich.lam_low) == float(rich.lam_high) == 1.0
    assert float(rich.expected_loss) == pytest.approx(best)


# ------------------------------------------------------------------ held-out
@pytest.mark.parametrize("source", ["model", "traces"])
def test_slo_policies_meet_their_constraint_on_held_out_data(source):
  c, cal, held, fit = _setup()
  calibration = cal if source == "traces" else None
  full = float(np.sum(np.asarray(c.costs)))
  for kind, target in (("error", 0.2), ("cost", 0.3 * full)):
    make = tj.evaluation.least_cost_policy if kind == "error" else tj.evaluation.least_error_policy
    pol = make(fit, target, key=jax.random.PRNGKey(1), calibration=calibration)
    assert pol.source == source
    # Met exactly in expectation on the fitting source ...
    assert float(pol.expected_loss if kind == "error" else pol.expected_cost) == pytest.approx(target, abs=1e-6)
    # ... and on held-out data the target lies inside the bootstrap interval. (The
    # per-request coins are random bits: under jax_enable_x64 they are a different
    # sample, for which this fixed-seed 95% check is not the one calibrated here; the
    # one-sided and the exact checks below hold in both precisions.)
    rep = tj.evaluation.evaluate_slo(pol, held)
    if not jax.config.jax_enable_x64:
      assert rep.achieved_ci[0] <= target <= rep.achieved_ci[1], (kind, source, rep.achieved,
                                                                  rep.achieved_ci)
    assert bool(rep.met)
    # The true expectation (the traces were sampled from c on the same states) is close too.
    exact = tj.policy_metrics(c, pol.deployed.policy)
    got = float(exact.loss if kind == "error" else exact.cost)
    se = float(rep.evaluation.error_se) if kind == "error" else 0.0
    assert abs(got - target) <= 4 * max(se, 1e-3)
