"""Fitting cascades to traces: discretisers, smoothing by hand, recovery of a known cascade."""

import jax
import numpy as np
import pytest

import ttamer_jax as tj


def _hand_traces(scores, preds=None, losses=None, costs=None):
  scores = np.asarray(scores, float)
  num, n = scores.shape
  return tj.ExitTraces(scores=scores, preds=np.zeros((num, n), int) if preds is None else preds,
                      losses=np.zeros((num, n)) if losses is None else losses,
                      costs=np.ones(n) if costs is None else costs)


# ------------------------------------------------------------------ discretiser
def test_quantile_and_uniform_edges():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(1000, 3)) * [1.0, 2.0, 0.5]
  d = tj.fit_discretiser(scores, 5)
  np.testing.assert_allclose(d.edges, np.quantile(scores, [0.2, 0.4, 0.6, 0.8], axis=0).T.astype(np.float32))
  states = np.asarray(d(scores))
  for i in range(3):  # quantile bins hold N / B samples each
    np.testing.assert_allclose(np.bincount(states[:, i], minlength=5), 200, atol=1)
  u = tj.fit_discretiser(scores, 4, binning="uniform")
  lo, hi = scores.min(0), scores.max(0)
  np.testing.assert_allclose(u.edges, (lo[:, None] + (hi - lo)[:, None] * [0.25, 0.5, 0.75]), rtol=1e-6)
  r = tj.fit_discretiser(scores, 4, binning="uniform", score_range=(0, 1))
  np.testing.assert_allclose(r.edges, np.tile([0.25, 0.5, 0.75], (3, 1)))
  one = tj.fit_discretiser(scores, 1)
  assert one.edges.shape == (3, 0) and np.all(np.asarray(one(scores)) == 0)


def test_discretiser_validation():
  with pytest.raises(ValueError, match="binning: must be one of"):
    tj.fit_discretiser(np.zeros((3, 2)), 2, binning="log")
  with pytest.raises(ValueError, match="num_states = 0 must be >= 1"):
    tj.fit_discretiser(np.zeros((3, 2)), 0)
  with pytest.raises(ValueError, match=r"scores\[1, 0\] is nan"):
    tj.fit_discretiser([[0.0, 1.0], [np.nan, 1.0]], 2)
  with pytest.raises(ValueError, match="score_range: low 1.0 must be < high 0.0"):
    tj.fit_discretiser(np.zeros((3, 2)), 2, binning="uniform", score_range=(1, 0))
  with pytest.raises(ValueError, match=r"edges\[0, 1\] = 0.0 < edges\[0, 0\] = 1.0"):
    tj.data.Discretiser(edges=np.array([[1.0, 0.0]]))
  with pytest.raises(ValueError, match="feature: must be one of"):
    tj.fit_discretiser(np.zeros((3, 2)), 2, feature="agree")


# ------------------------------------------------------------------ smoothing by hand
def test_laplace_smoothing_by_hand():
  # Uniform bins on [0, 1] with K = 3: states [[0, 1], [0, 1], [1, 1]]; state 2 never seen.
  tr = _hand_traces([[0.1, 0.5], [0.2, 0.6], [0.5, 0.4]], losses=[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]],
                    costs=[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  fit = tj.fit_cascade(tr, 3, binning="uniform", score_range=(0, 1), smoothing=1.0, loss_smoothing=1.0)
  c = fit.cascade
  np.testing.assert_allclose(c.init, np.array([2 + 1, 1 + 1, 0 + 1]) / 6, rtol=1e-6)
  np.testing.assert_allclose(c.trans[0], [[1 / 5, 3 / 5, 1 / 5], [1 / 4, 2 / 4, 1 / 4], [1 / 3] * 3], rtol=1e-6)
  m0, m1 = 2 / 3, 1 / 3  # stage mean losses
  np.testing.assert_allclose(c.values, [[(1 + m0) / 3, (1 + m0) / 2, m0], [m1, (1 + m1) / 4, m1]], rtol=1e-6)
  # Mean stage costs [3, 4], stored as shares of the full cost 7 (unit-free lam).
  np.testing.assert_allclose(c.costs, [3.0 / 7, 4.0 / 7], rtol=1e-6)
  assert float(fit.cost_scale) == pytest.approx(7.0)
  np.testing.assert_array_equal(fit.counts, [[2, 1, 0], [0, 3, 0]])
  mle = tj.fit_cascade(tr, 3, binning="uniform", score_range=(0, 1), smoothing=0.0, loss_smoothing=0.0)
  np.testing.assert_allclose(mle.cascade.init, [2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(mle.cascade.trans[0], [[0, 1, 0], [0, 1, 0], [1 / 3] * 3], rtol=1e-6)
  np.testing.assert_allclose(mle.cascade.values, [[0.5, 1.0, m0], [m1, 1 / 3, m1]], rtol=1e-6)
  # Marginal prior: pseudo-counts K * a * (next stage's state frequencies) = [0, 3, 0].
  marg = tj.fit_cascade(tr, 3, binning="uniform", score_range=(0, 1), prior="marginal")
  np.testing.assert_allclose(marg.cascade.trans[0], [[0, 1, 0], [0, 1, 0], [0, 1, 0]], atol=1e-7)


def test_agree_prev_states_by_hand():
  tr = _hand_traces([[0.1, 0.9, 0.9], [0.9, 0.1, 0.1]], preds=[[4, 4, 5], [1, 2, 2]])
  fit = tj.fit_cascade(tr, 4, binning="uniform", score_range=(0, 1), feature="agree_prev", smoothing=1.0)
  states = np.asarray(fit.discretiser(tr.scores, tr.preds))
  # state = 2 * bin + agree-with-previous; the first stage never agrees.
  np.testing.assert_array_equal(states, [[0, 3, 2], [2, 0, 1]])
  assert fit.discretiser.num_states == 4 and fit.cascade.num_states == 4
  # First stage: only even states possible, Laplace over those two.
  np.testing.assert_allclose(fit.cascade.init, [2 / 4, 0, 2 / 4, 0])
  deployed = fit.recall_policy(0.5)
  obs = deployed.observe(1, np.asarray([0.9, 0.1]), np.asarray([4, 2]), np.asarray([4, 1]))
  np.testing.assert_array_equal(obs.state, [3, 0])
  with pytest.raises(ValueError, match="num_states = 5 must be even"):
    tj.fit_cascade(tr, 5, feature="agree_prev")


def test_fit_argument_errors():
  tr = _hand_traces([[0.1, 0.5], [0.2, 0.6]])
  with pytest.raises(ValueError, match="smoothing = -1.0 must be"):
    tj.fit_cascade(tr, 2, smoothing=-1.0)
  with pytest.raises(ValueError, match="prior: must be one of"):
    tj.fit_cascade(tr, 2, prior="jeffreys")
  with pytest.raises(ValueError, match="no signal named 'entropy'"):
    tj.fit_cascade(tr, 2, score="entropy")
  with pytest.raises(ValueError, match="traces: expected ExitTraces"):
    tj.fit_cascade(np.zeros((2, 2)), 2)
  d3 = tj.fit_discretiser(np.zeros((2, 3)), 2)
  with pytest.raises(ValueError, match="discretiser: has 3 stages but the traces have 2"):
    tj.fit_cascade(tr, discretiser=d3)
  d2 = tj.fit_discretiser(np.zeros((2, 2)), 2)
  with pytest.raises(ValueError, match="num_states = 3 but the given discretiser has 2"):
    tj.fit_cascade(tr, 3, discretiser=d2)
  refit = tj.fit_cascade(tr, discretiser=d2)
  assert refit.discretiser is d2


# ------------------------------------------------------------------ recovery
def _recovery_errors(cascade, num, seed):
  tr = tj.sample_traces(jax.random.PRNGKey(seed), cascade, num)
  fit = tj.fit_cascade(tr, cascade.num_states, binning="uniform", score_range=(0, 1), smoothing=1.0,
                      loss_smoothing=1.0)
  states = np.asarray(fit.discretiser(tr.scores))
  np.testing.assert_array_equal(states, np.floor(np.asarray(tr.scores) * cascade.num_states))
  k = cascade.num_states
  p = np.asarray(cascade.trans, np.float64)
  est = np.asarray(fit.cascade.trans, np.float64)
  n_s = np.asarray(fit.counts, np.float64)[:-1, :, None]          # visits of the source state
  bias = k / (n_s + k)                                            # Laplace shift of a proportion
  tol = 4 * np.sqrt(p * (1 - p) / np.maximum(n_s, 1)) + bias
  assert np.all(np.abs(est - p) <= tol)
  v = np.asarray(cascade.values, np.float64)
  cnt = np.asarray(fit.counts, np.float64)
  vtol = 4 * np.sqrt(v * (1 - v) / np.maximum(cnt, 1)) + 1 / (cnt + 1)
  assert np.all(np.abs(np.asarray(fit.cascade.values) - v) <= vtol)
  return np.abs(est - p).max(), np.abs(np.asarray(fit.cascade.values) - v).max(), fit


# One cascade shape and sample size for the Monte-Carlo tests, so jit caches hit.
_N = 80_000


def _known():
  return tj.random_cascade(jax.random.PRNGKey(11), 3, 4, concentration=2.0)


def test_fitting_recovers_a_known_cascade_with_error_shrinking_in_n():
  c = _known()
  small = _recovery_errors(c, 2_000, 0)
  big = _recovery_errors(c, _N, 1)
  # 40x the data: the error should shrink ~6x; require at least 2.5x.
  assert big[0] * 2.5 < small[0]
  assert big[1] * 2.5 < small[1]
  # The fitted model's optimum is close to the true one.
  # The fitted model's optimum is close to the true one (costs as shares of the full cost).
  unit_free = c.replace(costs=np.asarray(c.costs) / np.sum(np.asarray(c.costs)))
  for lam in (0.3, 0.8):
    assert abs(float(tj.solve_recall(big[2].cascade, lam).value)
               - float(tj.solve_recall(unit_free, lam).value)) < 0.01


# ------------------------------------------------------------------ skip line
def test_skip_line_direct_estimates_match_products_on_markov_data():
  c = _known()
  tr = tj.sample_traces(jax.random.PRNGKey(6), c, _N)
  g = tj.data.fit_skip_line(tr, 4, binning="uniform", score_range=(0, 1), smoothing=0.0)
  graph = g.graph
  assert graph.edge_src == (0, 0, 1) and graph.edge_dst == (1, 2, 2)
  true = np.asarray(c.trans, np.float64)
  expected = [true[0], true[0] @ true[1], true[1]]
  counts = np.asarray(g.counts, np.float64)
  for e, (u, p) in enumerate(zip(graph.edge_src, expected)):
    se = np.sqrt(p * (1 - p) / counts[u][:, None])
    assert np.all(np.abs(np.asarray(graph.edge_trans[e]) - p) <= 4 * se + 1e-6)
  costs = np.asarray(c.costs, np.float64)
  costs = costs / costs.sum()  # shares of consulting every stage: unit-free lam
  assert float(g.cost_scale) == pytest.approx(float(np.sum(np.asarray(c.costs, np.float64))), rel=1e-6)
  np.testing.assert_allclose(graph.edge_costs, [costs[1], costs[1] + costs[2], costs[2]], rtol=1e-6)
  np.testing.assert_allclose(graph.entry_costs, [costs[0]], rtol=1e-6)
  heads = tj.data.fit_skip_line(tr, 4, block_costs=[1.0, 2.0, 4.0], head_costs=[0.1, 0.2, 0.4], skip_first=True)
  # Shares of consulting every stage in turn (blocks 7 + heads 0.7).
  np.testing.assert_allclose(heads.graph.edge_costs, np.array([2.2, 6.4, 4.4]) / 7.7, rtol=1e-6)
  np.testing.assert_allclose(heads.graph.entry_costs, np.array([1.1, 3.2, 7.4]) / 7.7, rtol=1e-6)
  assert heads.graph.entry_nodes == (0, 1, 2)
  # The solver runs on the fitted graph and agrees with the true skip-line's optimum.
  unit_free = c.replace(costs=np.asarray(c.costs) / np.sum(np.asarray(c.costs)))
  assert abs(float(tj.solve_recall(graph, 0.5).value)
             - float(tj.solve_recall(tj.skip_line(unit_free), 0.5).value)) < 0.01


def test_skip_line_direct_estimates_are_right_when_the_chain_is_not_markov():
  """Stage 3 copies stage 1's state; stage 2 is independent noise. The product of
  consecutive transitions says "uniform", the direct estimate says "identity"."""
  rng = np.random.default_rng(0)
  num = 30_000
  s0, s1 = rng.integers(0, 3, num), rng.integers(0, 3, num)
  states = np.stack([s0, s1, s0], axis=1)
  tr = _hand_traces((states + rng.uniform(size=states.shape)) / 3)
  g = tj.data.fit_skip_line(tr, 3, binning="uniform", score_range=(0, 1), smoothing=1.0)
  direct = np.asarray(g.graph.edge_trans[1])            # edge 0 -> 2
  assert np.all(np.diag(direct) > 0.99)
  line = tj.fit_cascade(tr, 3, binning="uniform", score_range=(0, 1))
  product = np.asarray(line.cascade.trans[0] @ line.cascade.trans[1])
  np.testing.assert_allclose(product, 1 / 3, atol=0.03)
  with pytest.raises(ValueError, match="'agree_prev' is undefined on a skip-line"):
    tj.data.fit_skip_line(tr, discretiser=tj.fit_discretiser(tr.scores, 2, feature="agree_prev"))


def test_column_quantiles_are_numpys_linear_quantiles_exactly():
  from ttamer_jax.data.fitting import column_quantiles
  rng = np.random.default_rng(0)
  for trial in range(300):
    num, cols = int(rng.integers(1, 50)), int(rng.integers(1, 4))
    x = (rng.normal(size=(num, cols)) if trial % 3
         else rng.integers(0, 4, (num, cols)) * 0.1)            # ties
    if trial % 5 == 0:
      x = x[:, 0]                                                # pooled, 1-D
    b = int(rng.integers(2, 40))
    levels = np.arange(1, b) / b if trial % 2 else np.linspace(0, 1, b)
    np.testing.assert_array_equal(column_quantiles(x, levels), np.quantile(x, levels, axis=0))


def test_request_buckets_pad_by_at_most_a_quarter_above_the_minimum():
  from ttamer_jax.data.fitting import MIN_REQUEST_BUCKET, request_bucket
  nums = np.unique(np.geomspace(1, 3e6, 4000).astype(int))
  sizes = np.array([request_bucket(n) for n in nums])
  assert (sizes >= nums).all() and (np.diff(sizes) >= 0).all()
  assert (sizes[nums <= MIN_REQUEST_BUCKET] == MIN_REQUEST_BUCKET).all()
  big = nums > MIN_REQUEST_BUCKET
  assert (sizes[big] <= nums[big] * 1.25).all()
  assert len(set(sizes)) < 50    # a few compiled shapes up to millions of requests
