"""Soft state aggregation: the factorised solver is exact for the factorised model,
fitting recovers exact factorisations, and the report's numbers are consistent."""

import jax
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj


def _random_factors(rng, n, k, q):
  a = rng.dirichlet(np.ones(q), size=(n - 1, k))
  b = rng.dirichlet(np.ones(k) * 0.5, size=(n - 1, q))
  values = rng.uniform(0, 1, (n, k))
  return tj.core.AggregatedCascade(values=values, init=rng.dirichlet(np.ones(k)), membership=a, emission=b,
                             costs=rng.uniform(0, 0.2, n))


@pytest.mark.parametrize("seed,n,k,q", [(0, 4, 6, 2), (1, 3, 5, 5), (2, 5, 7, 3), (3, 2, 4, 1)])
def test_factored_solver_equals_dense_solver_float64(seed, n, k, q):
  with jax.enable_x64(True):
    agg = _random_factors(np.random.default_rng(seed), n, k, q)
    dense = agg.dense()
    for lam in (0.0, 0.3, 0.7, 1.0):
      fac = tj.core.solve_recall_aggregated(agg, lam)
      exact = tj.solve_recall(dense, lam)
      assert abs(float(fac.value) - float(exact.value)) <= 1e-12
      if lam < 1:  # at lam = 1 every "no improvement possible" state is a tie x == cont,
        # decided by rounding; the policies still attain the same value (below).
        np.testing.assert_allclose(fac.index, exact.index, rtol=0, atol=1e-12)
      policy = tj.core.aggregated_policy(agg, lam)
      assert abs(float(tj.policy_metrics(dense, policy).objective(lam)) - float(exact.value)) <= 1e-12
      # And against the plain NumPy DP of tests/reference.py.
      assert abs(float(fac.value) - ref.numpy_recall(dense, lam)[0]) <= 1e-9


def test_q_equal_k_is_the_exact_model():
  with jax.enable_x64(True):
    c = ref.tiny_cascade(np.random.default_rng(4), 4, 5)
    agg, kl = tj.core.aggregate_cascade(c, 5)
    np.testing.assert_array_equal(kl, 0.0)
    np.testing.assert_allclose(agg.dense().trans, c.trans, atol=1e-15)
    for lam in (0.2, 0.9):
      assert abs(float(tj.core.solve_recall_aggregated(agg, lam).value) - float(tj.solve_recall(c, lam).value)) <= 1e-12


def _block_cascade(rng, n, k, q):
  """Transitions with q distinct rows (states in blocks): exactly of rank q."""
  blocks = np.repeat(np.arange(q), k // q)
  rng.shuffle(blocks)
  rows = rng.dirichlet(np.ones(k), size=(n - 1, q))
  trans = rows[:, blocks, :]
  return tj.Cascade(values=rng.uniform(0, 1, (n, k)), init=rng.dirichlet(np.ones(k)), trans=trans,
                    costs=rng.uniform(0, 0.1, n)), blocks


def test_fitting_recovers_block_structured_transitions_exactly():
  with jax.enable_x64(True):
    c, blocks = _block_cascade(np.random.default_rng(5), 4, 24, 4)
    agg, kl = tj.core.aggregate_cascade(c, 4)
    assert np.all(kl < 1e-10)
    np.testing.assert_allclose(agg.dense().trans, c.trans, atol=1e-9)
    # Hard aggregation: every state belongs to one meta-state, and states of one block share it.
    a = np.asarray(agg.membership)
    np.testing.assert_allclose(a.max(-1), 1.0, atol=1e-9)
    for i in range(3):
      meta = a[i].argmax(-1)
      assert len({(b, m) for b, m in zip(blocks, meta)}) == 4
    for lam in (0.3, 0.8):
      exact = float(tj.solve_recall(c, lam).value)
      assert abs(float(tj.core.solve_recall_aggregated(agg, lam).value) - exact) <= 1e-9
      policy = tj.core.aggregated_policy(agg, lam)
      assert abs(float(tj.policy_metrics(c, policy).objective(lam)) - exact) <= 1e-9


def test_report_on_a_smooth_cascade():
  """The aggregated policy, evaluated exactly on the true model, is never better
  than the optimum, and gets close as q grows."""
  with jax.enable_x64(True):
    c = tj.overthinking_cascade(4, 60)
    rep = tj.evaluation.aggregation_report(c, 0.5, (3, 10, 30), num_iters=30)
    exact = float(tj.solve_recall(c, 0.5).value)
    gaps = []
    for r in rep:
      assert float(r.exact) == pytest.approx(exact, abs=1e-12)
      assert float(r.policy_value) >= exact - 1e-12
      gaps.append(float(r.relative_gap))
    assert gaps[-1] <= gaps[0] and gaps[-1] < 1e-3
    kls = [float(r.kl) for r in rep]
    assert kls[0] > kls[1] > kls[2] >= 0


def test_fitted_factors_are_stochastic_and_em_beats_the_mean_row():
  with jax.enable_x64(True):
    c = tj.random_cascade(jax.random.PRNGKey(0), 3, 20, concentration=0.3)
    agg, kl = tj.core.aggregate_cascade(c, 5)
    np.testing.assert_allclose(np.asarray(agg.membership).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(agg.emission).sum(-1), 1.0, atol=1e-12)
    # A one-meta-state model (every row = the weighted mean row) is a feasible point:
    # the fit must do at least as well in weighted KL.
    w = ref.stage_marginals(c)[:-1]
    t = np.asarray(c.trans, np.float64)
    for i in range(2):
      mean_row = w[i] @ t[i]
      kl_mean = np.sum(w[i][:, None] * np.where(t[i] > 0, t[i] * np.log(t[i] / mean_row), 0.0))
      assert kl[i] < kl_mean


def test_validation():
  c = tj.random_cascade(jax.random.PRNGKey(0), 3, 4)
  with pytest.raises(ValueError, match="num_meta = 5 must be <= the number of states K = 4"):
    tj.core.aggregate_cascade(c, 5)
  with pytest.raises(ValueError, match="num_meta = 0 must be >= 1"):
    tj.core.aggregate_cascade(c, 0)
  rng = np.random.default_rng(0)
  good = dict(values=rng.uniform(size=(3, 4)), init=np.full(4, 0.25),
              membership=np.full((2, 4, 2), 0.5), emission=np.full((2, 2, 4), 0.25), costs=np.zeros(3))
  tj.core.AggregatedCascade(**good)
  with pytest.raises(ValueError, match=r"membership\[0, 0\] sums to 1.5"):
    membership = np.concatenate([np.full((2, 4, 1), 1.0), np.full((2, 4, 1), 0.5)], -1)
    tj.core.AggregatedCascade(**{**good, "membership": membership})
  with pytest.raises(ValueError, match=r"emission: expected shape \(2, 2, 4\)"):
    tj.core.AggregatedCascade(**{**good, "emission": np.full((2, 3, 4), 0.25)})
  with pytest.raises(ValueError, match=r"membership: expected shape \(2, 4, q\)"):
    tj.core.AggregatedCascade(**{**good, "membership": np.full((2, 5, 2), 0.5)})
  with pytest.raises(ValueError, match=r"lam = 1.5 is outside"):
    tj.core.solve_recall_aggregated(tj.core.AggregatedCascade(**good), 1.5)
