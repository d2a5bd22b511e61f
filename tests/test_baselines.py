"""Heuristic baselines as line policies: NumPy references, the serving protocol, grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj

NUM, N = 400, 4


def _traces(seed=0, per_sample_costs=False):
  rng = np.random.default_rng(seed)
  # Few prediction values so that runs of agreeing exits are common.
  costs = rng.uniform(0.1, 1, (NUM, N)) if per_sample_costs else np.array([0.1, 0.2, 0.3, 0.4])
  return tj.ExitTraces(scores=rng.uniform(size=(NUM, N)), preds=rng.integers(0, 3, (NUM, N)),
                      losses=rng.uniform(size=(NUM, N)), costs=costs,
                      signals={"entropy": rng.uniform(0, 2, (NUM, N))})


def _outcome(stop, answer, tr):
  rows = np.arange(NUM)
  costs = np.cumsum(np.broadcast_to(np.asarray(tr.costs), (NUM, N)), axis=1)
  return stop, answer, np.asarray(tr.losses)[rows, answer], costs[rows, stop]


def _check(res, expected):
  stop, answer, loss, cost = expected
  np.testing.assert_array_equal(res.stop_stage, stop)
  np.testing.assert_array_equal(res.answer_stage, answer)
  np.testing.assert_allclose(res.loss, loss, rtol=1e-6)
  np.testing.assert_allclose(res.cost, cost, rtol=1e-5)


def _first_true(mask):
  mask = mask.copy()
  mask[:, -1] = True
  return np.argmax(mask, axis=1)


# ------------------------------------------------------------------ NumPy references
@pytest.mark.parametrize("per_sample_costs", [False, True])
def test_thresholds_match_numpy(per_sample_costs):
  tr = _traces(1, per_sample_costs)
  s, e = np.asarray(tr.scores), np.asarray(tr.signals["entropy"])
  stop = _first_true(s >= 0.7)
  _check(tj.replay_traces(tj.confidence_threshold(0.7, N), tr), _outcome(stop, stop, tr))
  t = np.array([0.9, 0.6, 0.3, 0.5])
  stop = _first_true(s >= t)
  _check(tj.replay_traces(tj.per_stage_thresholds(t), tr), _outcome(stop, stop, tr))
  stop = _first_true(e <= 0.5)
  _check(tj.replay_traces(tj.core.entropy_threshold(0.5, N), tr, score_name="entropy"), _outcome(stop, stop, tr))


def test_patience_matches_numpy():
  tr = _traces(2)
  preds = np.asarray(tr.preds)
  run = np.ones((NUM, N), int)
  for i in range(1, N):
    run[:, i] = np.where(preds[:, i] == preds[:, i - 1], run[:, i - 1] + 1, 1)
  for p in (1, 2, 3, 4):
    stop = _first_true(run >= p)
    _check(tj.replay_traces(tj.core.PatiencePolicy(p, N), tr), _outcome(stop, stop, tr))
  # Patience 1 is the first exit; patience 2 by hand on one request.
  one = tj.ExitTraces(scores=np.zeros((1, 4)), preds=[[5, 6, 6, 6]], losses=np.zeros((1, 4)), costs=np.ones(4))
  assert int(tj.replay_traces(tj.core.PatiencePolicy(2, 4), one).stop_stage[0]) == 2
  assert int(tj.replay_traces(tj.core.PatiencePolicy(3, 4), one).stop_stage[0]) == 3


def test_fixed_exit_and_hindsight_match_numpy():
  tr = _traces(3, per_sample_costs=True)
  for k in range(N):
    stop = np.full(NUM, k)
    _check(tj.replay_traces(tj.core.FixedExitPolicy(k, N), tr), _outcome(stop, stop, tr))
  losses = np.asarray(tr.losses, np.float64)
  cum = np.cumsum(np.asarray(tr.costs, np.float64), axis=1)
  for lam in (0.0, 0.4, 1.0):
    totals = lam * np.minimum.accumulate(losses, axis=1) + (1 - lam) * cum
    stop = np.argmin(totals, axis=1)
    answer = np.array([np.argmin(losses[r, :stop[r] + 1]) for r in range(NUM)])
    res = tj.replay_traces(tj.hindsight_policy(tr.losses, tr.costs, lam), tr)
    _check(res, _outcome(stop, answer, tr))
    # The oracle's per-request objective is the per-request minimum over every policy.
    np.testing.assert_allclose(res.objective(lam), totals.min(axis=1), rtol=1e-5, atol=1e-6)
    for other in (tj.confidence_threshold(0.5, N), tj.core.PatiencePolicy(2, N), tj.core.FixedExitPolicy(1, N)):
      assert np.all(np.asarray(tj.replay_traces(other, tr).objective(lam)) >= np.asarray(res.objective(lam)) - 1e-6)


# ------------------------------------------------------------------ serving protocol
def _serve(deployed, tr, score_name):
  """A serving loop written against the protocol only: observe, estimate, step."""
  policy = deployed.policy
  scores = np.asarray(tr.scores if score_name == "scores" else tr.signals[score_name])
  preds = np.asarray(tr.preds)
  carry = policy.initial_carry(NUM)
  active = np.ones(NUM, bool)
  best = np.full(NUM, np.inf)
  best_stage = np.zeros(NUM, int)
  stop_stage = np.zeros(NUM, int)
  for i in range(N):
    obs = deployed.observe(i, jnp.asarray(scores[:, i]), jnp.asarray(preds[:, i]),
                           None if i == 0 else jnp.asarray(preds[:, i - 1]))
    if policy.recall:
      est = np.asarray(policy.estimate(i, obs))
      better = active & ((i == 0) | (est < best))
      best, best_stage = np.where(better, est, best), np.where(better, i, best_stage)
    carry, stop = policy.step(carry, i, obs, jnp.asarray(best))
    stop = active & (np.asarray(stop) | (i == N - 1))
    stop_stage = np.where(stop, i, stop_stage)
    active &= ~stop
  return stop_stage, best_stage if policy.recall else stop_stage


@pytest.mark.parametrize("name", ["confidence", "entropy", "patience", "fixed", "recall"])
def test_deployed_policies_serve_like_replay(name):
  tr = _traces(4)
  single = tj.data.Discretiser.single_bin(N)
  if name == "recall":
    fit = tj.fit_cascade(tr, 6, feature="agree_prev")
    deployed, score = fit.recall_policy(0.6), "scores"
  else:
    policy, score = {"confidence": (tj.confidence_threshold(0.6, N), "scores"),
                     "entropy": (tj.core.entropy_threshold(0.7, N), "entropy"),
                     "patience": (tj.core.PatiencePolicy(2, N), "scores"),
                     "fixed": (tj.core.FixedExitPolicy(2, N), "scores")}[name]
    deployed = tj.DeployedPolicy(policy=policy, discretiser=single, score_name=score)
  stop, answer = _serve(deployed, tr, score)
  res = tj.replay_traces(deployed, tr)
  np.testing.assert_array_equal(res.stop_stage, stop)
  np.testing.assert_array_equal(res.answer_stage, answer)
  step = jax.jit(lambda c, i, o, b: deployed.policy.step(c, i, o, b))  # usable inside jit
  obs = deployed.observe(1, jnp.asarray(tr.scores[:, 1]), tr.preds[:, 1], tr.preds[:, 0])
  _, stop1 = step(deployed.policy.initial_carry(NUM), 1, obs, jnp.zeros(NUM))
  assert stop1.shape == (NUM,) and stop1.dtype == bool


def test_grid_replay_is_the_batch_of_single_replays():
  tr = _traces(5)
  grid = tj.core.ThresholdPolicy(thresholds=np.array([[0.2] * N, [0.5] * N, [0.9] * N]))
  states = jnp.zeros((NUM, N), jnp.int32)
  batched = jax.vmap(lambda p: tj.replay(p, states, tr.losses, tr.costs, scores=tr.scores, preds=tr.preds))(grid)
  for j, t in enumerate((0.2, 0.5, 0.9)):
    single = tj.replay_traces(tj.confidence_threshold(t, N), tr)
    np.testing.assert_array_equal(batched.stop_stage[j], single.stop_stage)
  pat = tj.core.PatiencePolicy(patience=np.array([1, 2, 3]), num_stages=N)
  batched = jax.vmap(lambda p: tj.replay(p, states, tr.losses, tr.costs, scores=tr.scores, preds=tr.preds))(pat)
  for j, p in enumerate((1, 2, 3)):
    np.testing.assert_array_equal(batched.stop_stage[j], tj.replay_traces(tj.core.PatiencePolicy(p, N), tr).stop_stage)


def test_bad_parameters_raise():
  with pytest.raises(ValueError, match="direction: must be one of"):
    tj.core.ThresholdPolicy(thresholds=np.zeros(3), direction="up")
  with pytest.raises(ValueError, match=r"thresholds\[1\] is nan"):
    tj.per_stage_thresholds([0.1, np.nan])
  with pytest.raises(ValueError, match="patience = 0 must be >= 1"):
    tj.core.PatiencePolicy(0, 3)
  with pytest.raises(ValueError, match="exit_stage = 3 outside 0..2"):
    tj.core.FixedExitPolicy(3, 3)
  with pytest.raises(ValueError, match="num_stages = 0 must be >= 1"):
    tj.confidence_threshold(0.5, 0)
  with pytest.raises(ValueError, match=r"costs: expected shape \(3,\)"):
    tj.hindsight_policy(np.zeros((2, 3)), np.zeros(4), 0.5)
  with pytest.raises(ValueError, match="lam = 2.0 is outside"):
    tj.hindsight_policy(np.zeros((2, 3)), np.zeros(3), 2.0)
  tr = _traces(6)
  with pytest.raises(ValueError, match="built for 3 requests, replayed on 400"):
    tj.replay_traces(tj.hindsight_policy(np.zeros((3, N)), np.zeros(N), 0.5), tr)
  with pytest.raises(ValueError, match="traces: have 4 stages but the policy was built for 3"):
    tj.replay_traces(tj.core.FixedExitPolicy(1, 3), tr)
  with pytest.raises(ValueError, match="RecallPolicy reads discretised states"):
    tj.replay_traces(tj.core.RecallPolicy(index=np.zeros((N, 2)), values=np.zeros((N, 2)), lam=0.5), tr)
  with pytest.raises(ValueError, match="no signal named 'max_softmax'"):
    tj.replay_traces(tj.confidence_threshold(0.5, N), tr, score_name="max_softmax")
