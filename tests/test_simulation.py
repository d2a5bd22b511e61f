"""Replay and Monte-Carlo: exact expectations over every path and sampling checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj


def _exact_policy_objective(policy, cascade, lam):
  paths, probs = ref.path_probabilities(cascade)
  res = tj.core.replay_cascade(policy, cascade, paths)
  return float(np.sum(probs * np.asarray(res.objective(lam), np.float64)))


@pytest.mark.parametrize("seed,flags", [(0, {}), (1, dict(ties=True)), (2, dict(zero_prob=True)),
                                         (3, dict(zero_costs=True, ties=True))])
def test_policies_attain_their_dp_value_exactly(seed, flags):
  """Running the shipped index table over every path reproduces the DP value."""
  with jax.enable_x64(True):
    c = ref.tiny_cascade(np.random.default_rng(seed), 4, 3, **flags)
    for lam in (0.0, 0.3, 0.7, 1.0):
      assert abs(_exact_policy_objective(tj.recall_policy(c, lam), c, lam)
                 - float(tj.solve_recall(c, lam).value)) <= 1e-9
      assert abs(_exact_policy_objective(tj.core.no_recall_policy(c, lam), c, lam)
                 - float(tj.solve_no_recall(c, lam).value)) <= 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_monte_carlo_within_four_standard_errors(seed):
  c = tj.random_cascade(jax.random.PRNGKey(seed), 6, 5)
  for lam in (0.3, 0.8):
    for policy, value in ((tj.recall_policy(c, lam), tj.solve_recall(c, lam).value),
                          (tj.core.no_recall_policy(c, lam), tj.solve_no_recall(c, lam).value)):
      est = tj.monte_carlo(jax.random.PRNGKey(100 + seed), c, policy, lam, 100_000, chunk_size=30_000)
      assert float(est.num_paths) == 100_000
      np.testing.assert_allclose(est.stop_histogram.sum(), 1.0, rtol=1e-5)
      assert abs(float(est.objective) - float(value)) <= 4 * float(est.objective_se)
      np.testing.assert_allclose(est.objective, lam * est.loss + (1 - lam) * est.cost, rtol=1e-4)


def test_sample_states_follow_the_chain_and_skip_impossible_states():
  c = tj.Cascade.from_arrays(values=np.zeros((3, 4)), init=[0.0, 0.5, 0.2, 0.3],
                             trans=[[[0.1, 0.0, 0.9, 0.0]] * 4, [[0.0, 0.25, 0.25, 0.5]] * 4],
                             costs=np.zeros(3))
  n = 200_000
  states = np.asarray(tj.core.sample_states(jax.random.PRNGKey(0), c, n))
  assert states.shape == (n, 3) and states.dtype == np.int32
  for stage, p in enumerate([c.init, c.trans[0, 0], c.trans[1, 0]]):
    freq = np.bincount(states[:, stage], minlength=4) / n
    p = np.asarray(p, np.float64)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * se + 1e-12)
    assert np.all(freq[p == 0] == 0)


def test_replay_answers_and_costs_by_hand():
  # Two requests, three stages, K = 2; recall index stops at stage 1 for the first.
  policy = tj.core.RecallPolicy(index=jnp.array([[-jnp.inf, -jnp.inf], [1.0, -jnp.inf], [jnp.inf, jnp.inf]]),
                           values=jnp.array([[0.9, 0.5], [0.2, 0.8], [0.6, 0.1]]), lam=jnp.array(1.0))
  states = np.array([[0, 0, 1], [1, 1, 0]])
  losses = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
  res = tj.replay(policy, states, losses, costs=np.array([1.0, 2.0, 4.0]))
  np.testing.assert_array_equal(res.stop_stage, [1, 2])
  np.testing.assert_array_equal(res.answer_stage, [1, 0])  # stage 0 (0.5) beats 0.8 and 0.6
  np.testing.assert_array_equal(res.loss, [0.0, 0.0])
  np.testing.assert_array_equal(res.cost, [3.0, 7.0])
  per_request = tj.replay(policy, states, losses, costs=np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
  np.testing.assert_array_equal(per_request.cost, [2.0, 6.0])


def test_replay_rejects_bad_input():
  c = tj.random_cascade(jax.random.PRNGKey(0), 3, 2)
  policy = tj.recall_policy(c, 0.5)
  states = np.zeros((5, 3), int)
  with pytest.raises(ValueError, match="states: has 4 stages but the policy was built for 3"):
    tj.replay(policy, np.zeros((5, 4), int), np.zeros((5, 4)), np.zeros(4))
  with pytest.raises(ValueError, match=r"losses: expected shape \(5, 3\)"):
    tj.replay(policy, states, np.zeros((5, 2)), np.zeros(3))
  with pytest.raises(ValueError, match=r"losses\[0, 1\] is nan"):
    tj.replay(policy, states, np.array([[0, np.nan, 0]] * 5), np.zeros(3))
  with pytest.raises(ValueError, match=r"costs: expected shape"):
    tj.replay(policy, states, np.zeros((5, 3)), np.zeros(2))
  with pytest.raises(ValueError, match="states: must hold integers"):
    tj.replay(policy, np.full((5, 3), 0.5), np.zeros((5, 3)), np.zeros(3))
  with pytest.raises(ValueError, match="N = 0"):
    tj.replay(policy, np.zeros((0, 3), int), np.zeros((0, 3)), np.zeros(3))
  with pytest.raises(ValueError, match="cascade: has 4 stages"):
    tj.monte_carlo(jax.random.PRNGKey(0), tj.random_cascade(jax.random.PRNGKey(0), 4, 2), policy, 0.5, 10)
  with pytest.raises(ValueError, match="num_paths"):
    tj.monte_carlo(jax.random.PRNGKey(0), c, policy, 0.5, 0)


def test_online_step_inside_jit():
  c = tj.random_cascade(jax.random.PRNGKey(1), 4, 3)
  policy = tj.recall_policy(c, 0.5)
  decide = jax.jit(lambda stage, state, best: policy.should_stop(stage, state, best))
  assert bool(decide(3, 0, 1.0))  # the last stage always stops
  assert decide(0, 1, 0.0).dtype == bool


def test_replay_refuses_a_grid_of_policies_naming_the_policy():
  # A batch of heuristics (fields with a leading grid axis) would otherwise fail inside the
  # scan with a broadcasting error that names nothing.
  import ttamer_jax as tj
  states, losses, costs = np.zeros((5, 3), np.int32), np.ones((5, 3)), np.ones(3)
  scores, preds = np.zeros((5, 3)), np.zeros((5, 3), np.int32)
  for grid in (tj.core.FixedExitPolicy(jnp.array([0, 1]), 3),
               tj.core.ThresholdPolicy(thresholds=np.zeros((2, 3)))):
    with pytest.raises(ValueError, match="policy: .*grid of policies"):
      tj.replay(grid, states, losses, costs, scores=scores, preds=preds)
  single = tj.replay(tj.core.FixedExitPolicy(1, 3), states, losses, costs, scores=scores, preds=preds)
  np.testing.assert_array_equal(np.asarray(single.stop_stage), 1)
