"""Line solvers against brute force, NumPy references, closed forms and orderings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st

import ttamer_jax as tj

TINY_CASES = [
    # (seed, n, K, flags)
    (0, 1, 1, {}), (1, 1, 3, {}), (2, 2, 2, {}), (3, 3, 3, {}), (4, 4, 3, {}), (5, 4, 2, {}),
    (6, 3, 3, dict(zero_prob=True)), (7, 4, 3, dict(zero_prob=True)),
    (8, 3, 3, dict(ties=True)), (9, 4, 3, dict(ties=True, zero_prob=True)),
    (10, 3, 2, dict(zero_costs=True)), (11, 4, 3, dict(zero_costs=True, ties=True)),
]
LAMS = [0.0, 0.2, 0.5, 0.9, 1.0]


def _tiny(seed, n, k, flags):
  return ref.tiny_cascade(np.random.default_rng(seed), n, k, **flags)


@pytest.mark.parametrize("case", TINY_CASES)
def test_all_solvers_match_brute_force_float32(case):
  c = _tiny(*case)
  for lam in LAMS:
    np.testing.assert_allclose(tj.solve_recall(c, lam).value, ref.brute_recall(c, lam), rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(tj.solve_no_recall(c, lam).value, ref.brute_no_recall(c, lam), rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(tj.prophet_value(c, lam), ref.brute_prophet(c, lam), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("case", TINY_CASES[::2])
def test_all_solvers_match_brute_force_float64_to_1e9(case):
  with jax.enable_x64(True):
    c = _tiny(*case)
    assert c.values.dtype == jnp.float64
    for lam in LAMS:
      r = tj.solve_recall(c, lam).value
      assert r.dtype == jnp.float64
      assert abs(float(r) - ref.brute_recall(c, lam)) <= 1e-9
      assert abs(float(tj.solve_no_recall(c, lam).value) - ref.brute_no_recall(c, lam)) <= 1e-9
      assert abs(float(tj.prophet_value(c, lam)) - ref.brute_prophet(c, lam)) <= 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_match_numpy_references_including_policy_tables(seed):
  rng = np.random.default_rng(100 + seed)
  with jax.enable_x64(True):
    c = ref.tiny_cascade(rng, 5, 6)
    for lam in (0.3, 0.7):
      value, grid, stops = ref.numpy_recall(c, lam)
      sol = tj.solve_recall(c, lam)
      assert abs(float(sol.value) - value) <= 1e-9
      index = np.asarray(sol.index)
      for i in range(c.num_stages - 1):
        np.testing.assert_array_equal(lam * grid[:, None] <= index[i][None, :], stops[i])
      assert np.all(np.isposinf(index[-1]))
      nr_value, nr_stop = ref.numpy_no_recall(c, lam)
      nr = tj.solve_no_recall(c, lam)
      assert abs(float(nr.value) - nr_value) <= 1e-9
      np.testing.assert_array_equal(nr.stop, nr_stop)
      assert abs(float(tj.prophet_value(c, lam)) - ref.numpy_prophet(c, lam)) <= 1e-9


def test_prophet_chunking_gives_same_value():
  c = tj.random_cascade(jax.random.PRNGKey(3), 4, 8)
  whole = tj.prophet_value(c, 0.6)
  chunked = tj.prophet_value(c, 0.6, chunk_size=5)  # 32 breakpoints -> 7 padded chunks
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0, 10.0])
def test_gap_instance_values(alpha):
  c = tj.gap_instance(alpha)
  np.testing.assert_allclose(tj.solve_recall(c, 1.0).value, alpha**-3, rtol=1e-6)
  np.testing.assert_allclose(tj.prophet_value(c, 1.0), alpha**-3, rtol=1e-6)
  np.testing.assert_allclose(tj.solve_no_recall(c, 1.0).value, alpha**-2, rtol=1e-6)


def _reservation_value(grid, probs, unit_cost):
  """xi with E[(xi - l)+] = unit_cost for a discrete loss distribution."""
  order = np.argsort(grid)
  grid, probs = grid[order], probs[order]
  for m in range(1, len(grid) + 1):
    p, pv = probs[:m].sum(), (probs[:m] * grid[:m]).sum()
    xi = (unit_cost + pv) / p
    upper = grid[m] if m < len(grid) else np.inf
    if grid[m - 1] <= xi <= upper:
      return xi
  raise AssertionError("no reservation value")


@pytest.mark.parametrize("lam,cost", [(0.5, 0.03), (0.8, 0.05), (0.3, 0.004)])
def test_iid_uniform_losses_match_reservation_value(lam, cost):
  k, n = 11, 200
  grid = np.linspace(0, 1, k)
  probs = np.full(k, 1 / k)
  c = tj.core.iid_cascade(grid, probs, cost, n)
  xi = _reservation_value(grid, probs, (1 - lam) * cost / lam)
  assert (1 - np.mean(grid <= xi)) ** (n - 1) < 1e-12  # horizon long enough to be stationary
  sol = tj.solve_recall(c, lam)
  np.testing.assert_allclose(sol.value, lam * xi, rtol=1e-5)
  # Early stages stop exactly at the grid points at or below xi; the stored threshold lies
  # midway to the next grid point, off every reachable lam * loss (docs/policy_format.md).
  last_stop = grid[grid <= xi].max()
  next_point = grid[grid > last_stop].min()
  np.testing.assert_allclose(sol.index[0], lam * (last_stop + next_point) / 2, rtol=1e-6)


def test_lam_zero_pays_only_first_cost():
  c = tj.random_cascade(jax.random.PRNGKey(1), 5, 4, cost_scale=1.0)
  for solve in (lambda c, l: tj.solve_recall(c, l).value, lambda c, l: tj.solve_no_recall(c, l).value,
                tj.prophet_value):
    np.testing.assert_allclose(solve(c, 0.0), c.costs[0], rtol=1e-6)


def test_vmap_over_64_lams_equals_python_loop():
  c = tj.random_cascade(jax.random.PRNGKey(2), 6, 5)
  lams = jnp.linspace(0.0, 1.0, 64)
  for solve in (tj.solve_recall, tj.solve_no_recall):
    batched = jax.vmap(lambda l: solve(c, l))(lams)
    looped = [solve(c, float(l)) for l in lams]
    np.testing.assert_allclose(batched.value, [s.value for s in looped], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.vmap(lambda l: tj.solve_recall(c, l).index)(lams),
                             np.stack([tj.solve_recall(c, float(l)).index for l in lams]), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda l: tj.prophet_value(c, l))(lams),
                             [tj.prophet_value(c, float(l)) for l in lams], rtol=1e-6, atol=1e-7)


def test_vmap_over_batch_of_cascades_equals_loop():
  keys = jax.random.split(jax.random.PRNGKey(4), 8)
  batch = jax.vmap(lambda key: tj.random_cascade(key, 4, 3))(keys)
  batched = jax.vmap(lambda c: tj.solve_recall(c, 0.6))(batch)
  for b, key in enumerate(keys):
    single = tj.solve_recall(tj.random_cascade(key, 4, 3), 0.6)
    np.testing.assert_allclose(batched.value[b], single.value, rtol=1e-6)
    np.testing.assert_allclose(batched.index[b], single.index, rtol=1e-6)
  nr = jax.vmap(lambda c: tj.solve_no_recall(c, 0.6).value)(batch)
  pv = jax.vmap(lambda c: tj.prophet_value(c, 0.6))(batch)
  assert np.all(np.asarray(pv) <= np.asarray(batched.value) + 1e-6)
  assert np.all(np.asarray(batched.value) <= np.asarray(nr) + 1e-6)


def test_jit_and_eager_agree():
  c = tj.random_cascade(jax.random.PRNGKey(5), 4, 4)
  jitted = (tj.solve_recall(c, 0.4).value, tj.solve_no_recall(c, 0.4).value, tj.prophet_value(c, 0.4))
  with jax.disable_jit():
    eager = (tj.solve_recall(c, 0.4).value, tj.solve_no_recall(c, 0.4).value, tj.prophet_value(c, 0.4))
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  outer = jax.jit(lambda c, l: tj.solve_recall(c, l).value)(c, 0.4)
  np.testing.assert_allclose(outer, jitted[0], rtol=1e-6)


def test_stages_with_different_value_sets_use_union_grid():
  # Stage 2's values are not stage 1's: the x-grid must hold both.
  c = tj.Cascade.from_arrays(values=[[0.5, 0.9], [0.1, 0.7], [0.3, 0.2]], init=[0.4, 0.6],
                             trans=[[[0.5, 0.5], [0.2, 0.8]], [[0.9, 0.1], [0.3, 0.7]]],
                             costs=[0.0, 0.05, 0.05])
  for lam in (0.5, 1.0):
    np.testing.assert_allclose(tj.solve_recall(c, lam).value, ref.brute_recall(c, lam), rtol=1e-6)


@st.composite
def cascades(draw):
  n = draw(st.integers(1, 4))
  k = draw(st.integers(1, 4))
  seed = draw(st.integers(0, 2**31 - 1))
  flags = dict(zero_prob=draw(st.booleans()), ties=draw(st.booleans()), zero_costs=draw(st.booleans()))
  return ref.tiny_cascade(np.random.default_rng(seed), n, k, **flags)


@given(cascades(), st.floats(0.0, 1.0))
def test_ordering_prophet_recall_no_recall(c, lam):
  p = float(tj.prophet_value(c, lam))
  r = float(tj.solve_recall(c, lam).value)
  nr = float(tj.solve_no_recall(c, lam).value)
  tol = 1e-6 * max(1.0, abs(nr))
  assert p <= r + tol and r <= nr + tol


@given(cascades(), st.floats(0.0, 1.0), st.integers(0, 3), st.floats(0.0, 1.0))
def test_recall_value_non_increasing_when_a_cost_drops(c, lam, stage, frac):
  stage = stage % c.num_stages
  cheaper = c.replace(costs=c.costs.at[stage].multiply(frac))
  assert float(tj.solve_recall(cheaper, lam).value) <= float(tj.solve_recall(c, lam).value) + 1e-6
