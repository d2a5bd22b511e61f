"""Soft-min DP convergence and gradients; soft threshold policies and their tuning."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj


@pytest.mark.parametrize("seed", range(3))
def test_soft_dp_converges_within_stated_bound(seed):
  c = tj.random_cascade(jax.random.PRNGKey(seed), 5, 4)
  for lam in (0.3, 0.8):
    exact_r = float(tj.solve_recall(c, lam).value)
    exact_nr = float(tj.solve_no_recall(c, lam).value)
    gaps_r = []
    for beta in (0.3, 0.1, 0.03, 0.01, 0.001):
      bound = tj.soft_min_error_bound(5, beta)
      gap_r = exact_r - float(tj.soft_solve_recall(c, lam, beta))
      gap_nr = exact_nr - float(tj.core.soft_solve_no_recall(c, lam, beta))
      assert -1e-6 <= gap_r <= bound + 1e-6
      assert -1e-6 <= gap_nr <= bound + 1e-6
      gaps_r.append(gap_r)
    assert all(a >= b - 1e-6 for a, b in zip(gaps_r, gaps_r[1:]))  # shrinks as beta -> 0
    np.testing.assert_allclose(tj.soft_solve_recall(c, lam, 0.0), exact_r, rtol=1e-6)
    np.testing.assert_allclose(tj.core.soft_solve_no_recall(c, lam, 0.0), exact_nr, rtol=1e-6)


def _brute_consult_probabilities(c, lam):
  paths, probs = ref.path_probabilities(c)
  res = tj.core.replay_cascade(tj.recall_policy(c, lam), c, paths)
  stop = np.asarray(res.stop_stage)
  return np.array([np.sum(probs * (stop >= i)) for i in range(c.num_stages)])


@pytest.mark.parametrize("seed", range(3))
def test_cost_gradient_is_envelope_theorem_derivative(seed):
  with jax.enable_x64(True):
    c = ref.tiny_cascade(np.random.default_rng(seed), 4, 3)
    for lam in (0.3, 0.7):
      consult = _brute_consult_probabilities(c, lam)
      np.testing.assert_allclose(tj.consult_probabilities(c, lam), consult, atol=1e-12)
      exact_grad = jax.grad(lambda costs: tj.solve_recall(c.replace(costs=costs), lam).value)(c.costs)
      np.testing.assert_allclose(exact_grad, (1 - lam) * consult, atol=1e-12)
      soft_grad = jax.grad(lambda costs: tj.soft_solve_recall(c.replace(costs=costs), lam, 1e-7))(c.costs)
      np.testing.assert_allclose(soft_grad, (1 - lam) * consult, atol=1e-6)


def _central_difference(f, x, h=1e-6):
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in itertools.product(*map(range, x.shape)):
    e = np.zeros_like(x)
    e[idx] = h
    grad[idx] = (float(f(jnp.asarray(x + e))) - float(f(jnp.asarray(x - e)))) / (2 * h)
  return grad


@pytest.mark.parametrize("solver", [tj.soft_solve_recall, tj.core.soft_solve_no_recall])
def test_soft_dp_gradients_match_finite_differences(solver):
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    n, k, lam, beta = 3, 3, 0.6, 0.05
    values = jnp.asarray(rng.uniform(0, 1, (n, k)))
    init_logits = jnp.asarray(rng.normal(size=k))
    trans_logits = jnp.asarray(rng.normal(size=(n - 1, k, k)))
    costs = jnp.asarray(rng.uniform(0, 0.2, n))

    def value(values=values, init_logits=init_logits, trans_logits=trans_logits, costs=costs):
      return solver(tj.cascade_from_logits(values, init_logits, trans_logits, costs), lam, beta)

    for name, arg in (("values", values), ("init_logits", init_logits),
                      ("trans_logits", trans_logits), ("costs", costs)):
      auto = jax.grad(lambda a: value(**{name: a}))(arg)
      numeric = _central_difference(lambda a: value(**{name: a}), arg)
      np.testing.assert_allclose(auto, numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def _loop_threshold_objective(t, scores, losses, costs, lam, recall):
  """Plain loop over samples: first stage with score >= t (last otherwise)."""
  total = 0.0
  n = scores.shape[1]
  for s, l in zip(scores, losses):
    stop = next((i for i in range(n) if s[i] >= t[i]), n - 1)
    answer = int(np.argmax(s[:stop + 1])) if recall else stop
    total += lam * l[answer] + (1 - lam) * costs[:stop + 1].sum()
  return total / len(scores)


@pytest.mark.parametrize("recall", [False, True])
def test_hard_threshold_objective_matches_loop_and_soft_converges(recall):
  rng = np.random.default_rng(3)
  scores = rng.uniform(size=(300, 4)).astype(np.float32)
  losses = (rng.uniform(size=(300, 4)) < 0.3).astype(np.float32)
  costs = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  t = np.array([0.7, 0.5, 0.6, 0.9], np.float32)
  hard = float(tj.core.threshold_objective(t, scores, losses, costs, 0.6, 0, recall=recall))
  np.testing.assert_allclose(hard, _loop_threshold_objective(t, scores, losses, costs, 0.6, recall),
                             rtol=1e-5)
  soft = [float(tj.core.threshold_objective(t, scores, losses, costs, 0.6, tau, recall=recall,
                                       answer_tau=tau)) for tau in (1e-3, 1e-5)]
  assert abs(soft[-1] - hard) < 1e-3 and abs(soft[-1] - hard) <= abs(soft[0] - hard) + 1e-6


def test_threshold_on_cascade_equals_enumeration():
  with jax.enable_x64(True):
    c = ref.tiny_cascade(np.random.default_rng(5), 4, 3)
    state_scores = 1.0 - np.asarray(c.values)
    t = np.array([0.6, 0.5, 0.7, 0.0])
    lam = 0.7
    paths, probs = ref.path_probabilities(c)
    scores = state_scores[np.arange(4)[None, :], paths]
    losses = np.asarray(c.values)[np.arange(4)[None, :], paths]
    per_path = np.array([_loop_threshold_objective(t, s[None], l[None], np.asarray(c.costs), lam, False)
                         for s, l in zip(scores, losses)])
    np.testing.assert_allclose(tj.core.threshold_objective_on_cascade(t, state_scores, c, lam, 0),
                               np.sum(probs * per_path), atol=1e-12)


def _confidence_traces(key, c, num):
  """Traces whose score is the calibrated confidence 1 - values[i, state]."""
  states = np.asarray(tj.core.sample_states(key, c, num))
  losses = np.asarray(c.values)[np.arange(c.num_stages)[None, :], states]
  return 1.0 - losses, losses


@pytest.mark.parametrize("alpha", [4.0, 10.0])
def test_gap_instance_tuned_thresholds_lose_factor_alpha(alpha):
  c = tj.gap_instance(alpha)
  scores, losses = _confidence_traces(jax.random.PRNGKey(0), c, 20_000)
  tuned = tj.tune_thresholds(jax.random.PRNGKey(1), scores, losses, c.costs, 1.0, steps=100, restarts=4)
  recall_opt = float(tj.solve_recall(c, 1.0).value)
  assert float(tuned.hard_objective) >= alpha / 2 * recall_opt
  # ...and the recall hybrid (same thresholds, answer the most confident exit) closes the gap.
  hybrid = tj.tune_thresholds(jax.random.PRNGKey(1), scores, losses, c.costs, 1.0, recall=True,
                              steps=100, restarts=4)
  assert float(hybrid.hard_objective) <= 1.05 * recall_opt + 1e-3


@pytest.mark.parametrize("seed", range(2))
def test_tuned_thresholds_never_beat_exact_recall_optimum(seed):
  c = tj.random_cascade(jax.random.PRNGKey(seed), 5, 6, cost_scale=0.1)
  lam = 0.5
  train_s, train_l = _confidence_traces(jax.random.PRNGKey(10 + seed), c, 5_000)
  test_s, test_l = _confidence_traces(jax.random.PRNGKey(20 + seed), c, 100_000)
  recall_opt = float(tj.solve_recall(c, lam).value)
  for recall in (False, True):
    tuned = tj.tune_thresholds(jax.random.PRNGKey(seed), train_s, train_l, c.costs, lam,
                               recall=recall, steps=150, restarts=4)
    t = jnp.asarray(tuned.thresholds)
    stop = jnp.asarray(test_s >= t[None, :])
    stop = stop.at[:, -1].set(True)
    first = jnp.argmax(stop, axis=1)
    answer = first if not recall else jnp.asarray([np.argmax(s[:f + 1]) for s, f in zip(test_s, np.asarray(first))])
    per = lam * test_l[np.arange(len(test_l)), np.asarray(answer)] + (1 - lam) * np.cumsum(
        np.asarray(c.costs))[np.asarray(first)]
    se = per.std(ddof=1) / np.sqrt(per.size)
    assert per.mean() >= recall_opt - 4 * se
    if not recall:  # exact, no Monte-Carlo error: a threshold rule is a no-recall policy
      exact = float(tj.core.threshold_objective_on_cascade(t, 1.0 - c.values, c, lam, 0))
      assert exact >= float(tj.solve_no_recall(c, lam).value) - 1e-6


def test_grid_search_finds_best_single_threshold():
  rng = np.random.default_rng(0)
  scores = rng.uniform(size=(500, 3)).astype(np.float32)
  losses = (rng.uniform(size=(500, 3)) < 1 - scores).astype(np.float32)
  costs = np.array([0.1, 0.1, 0.1], np.float32)
  t, obj = tj.grid_search_threshold(scores, losses, costs, 0.5, num_candidates=64)
  cands = np.quantile(scores.reshape(-1), np.linspace(0, 1, 64))
  brute = min(_loop_threshold_objective(np.full(3, c), scores, losses, costs, 0.5, False) for c in cands)
  brute = min(brute, _loop_threshold_objective(np.full(3, np.inf), scores, losses, costs, 0.5, False))
  np.testing.assert_allclose(obj, brute, rtol=1e-5)


def test_bad_beta_and_lam_raise():
  c = tj.random_cascade(jax.random.PRNGKey(0), 3, 2)
  with pytest.raises(ValueError, match="beta"):
    tj.soft_solve_recall(c, 0.5, -1.0)
  with pytest.raises(ValueError, match="lam"):
    tj.core.soft_solve_no_recall(c, 2.0, 0.1)


def test_recall_threshold_on_cascade_matches_policy_metrics_and_enumeration():
  import ttamer_jax as tj
  with jax.enable_x64(True):
    c = ref.tiny_cascade(np.random.default_rng(8), 4, 3, ties=True)
    scores = 1.0 - np.asarray(c.values)
    lam = 0.6
    for t in (np.array([0.7, 0.5, 0.6, 0.0]), np.array([2.0, 2.0, 0.1, 0.0])):
      exact = float(tj.core.recall_threshold_objective_on_cascade(t, scores, c, lam, 0))
      # The same rule as a state policy: index +inf where the rule stops, -inf elsewhere.
      index = np.where(scores >= t[:, None], np.inf, -np.inf)
      index[-1] = np.inf
      policy = tj.core.RecallPolicy(index=jnp.asarray(index), values=c.values, lam=jnp.asarray(lam))
      m = tj.policy_metrics(c, policy)
      assert abs(exact - (lam * float(m.loss) + (1 - lam) * float(m.cost))) <= 1e-12
      paths, probs = ref.path_probabilities(c)
      path_scores = scores[np.arange(4)[None, :], paths]
      losses = np.asarray(c.values)[np.arange(4)[None, :], paths]
      per = np.array([_loop_threshold_objective(t, s[None], l[None], np.asarray(c.costs), lam, True)
                      for s, l in zip(path_scores, losses)])
      assert abs(exact - np.sum(probs * per)) <= 1e-12


def test_cascade_tuning_reaches_exhaustive_optimum_and_never_beats_dp():
  c = tj.overthinking_cascade(4, 6)
  scores = 1.0 - np.asarray(c.values)
  lam = 0.9
  recall_opt = float(tj.solve_recall(c, lam).value)
  no_recall_opt = float(tj.solve_no_recall(c, lam).value)
  for recall, floor in ((False, no_recall_opt), (True, recall_opt)):
    _, best = tj.exhaustive_thresholds_on_cascade(c, scores, lam, recall=recall)
    tuned = tj.tune_thresholds_on_cascade(jax.random.PRNGKey(0), c, scores, lam, recall=recall,
                                          steps=200, restarts=8)
    assert float(best) >= floor - 1e-6           # thresholds are policies: never beat the DP
    assert float(tuned.hard_objective) >= float(best) - 1e-6
    assert float(tuned.hard_objective) <= float(best) * 1.02 + 1e-6   # tuner finds (near) the best rule


def test_batch_serving_cost_is_smooth_and_tracks_the_hard_fit():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(256, 3, 5)) * 3.0, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 256))
  costs = jnp.asarray([0.2, 0.3, 0.5])
  value, grad = jax.value_and_grad(lambda z: tj.batch_serving_cost(z, labels, costs, 0.7))(logits)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert float(jnp.abs(grad).sum()) > 0
  # The soft fit is a valid cascade, and with hard memberships it equals fit_cascade's
  # calibrated losses on uniform bins (smoothing 0 on values, shrinkage the same).
  probs = jax.nn.softmax(logits, -1)
  conf = probs.max(-1)
  err = 1.0 - jnp.take_along_axis(probs, labels[:, None, None], -1)[..., 0]
  soft = tj.core.soft_fitted_cascade(conf, err, costs, num_states=4, width=1e-4, smoothing=1e-9)
  np.testing.assert_allclose(np.asarray(soft.trans).sum(-1), 1.0, rtol=1e-5)
  bins = np.minimum((np.asarray(conf) * 4).astype(int), 3)
  for i in range(3):
    for b in range(4):
      sel = bins[:, i] == b
      if sel.sum() > 0:
        np.testing.assert_allclose(soft.values[i, b], np.asarray(err)[sel, i].mean(), rtol=1e-3)


def _serving_cost(logits, labels):
  return 2.0 * tj.batch_serving_cost(logits, labels, jnp.asarray([0.3, 0.3, 0.4]), 0.8)


def test_training_with_the_serving_cost_as_auxiliary_loss():
  from flax import nnx
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(128, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, 128).astype(np.int32)
  config = tj.networks.TrainConfig(num_steps=6, batch_size=32, learning_rate=1e-2, warmup_steps=1)
  make = lambda: tj.networks.EarlyExitMLP((8, 8, 1), 10, hidden=16, num_blocks=3, rngs=nnx.Rngs(0))
  plain = tj.train(make(), x, y, config, progress=False)
  assert np.all(plain.aux_loss == 0)
  model = make()
  hist = tj.train(model, x, y, config, progress=False, aux_loss=_serving_cost)
  assert np.all(np.isfinite(hist.aux_loss)) and np.all(hist.aux_loss > 0)
  # The total loss is the plain loss plus the auxiliary term at the same parameters (step 0).
  np.testing.assert_allclose(hist.loss[0], plain.loss[0] + hist.aux_loss[0], rtol=1e-5)
