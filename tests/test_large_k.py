"""Large-K paths of solve_recall: x-grid chunking and the automatic switch to soft
state aggregation above a configurable K."""

import warnings

import jax
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj
from ttamer_jax.core import kernel  # the grid helpers are internal: tested here directly
from ttamer_jax.core.solvers import solve_recall_on_grid


@pytest.mark.parametrize("shared", [True, False])
def test_x_chunking_matches_unchunked_and_numpy_reference(shared):
  with jax.enable_x64(True):
    c = tj.random_cascade(jax.random.PRNGKey(3), 5, 6, shared_grid=shared)
    full = tj.solve_recall(c, 0.4, x_chunk=None)
    for chunk in (1, 4, 7, 1000):
      part = tj.solve_recall(c, 0.4, x_chunk=chunk)
      assert abs(float(part.value) - float(full.value)) <= 1e-12
      np.testing.assert_allclose(part.index, full.index, rtol=1e-12, atol=1e-12)
    value, _, _ = ref.numpy_recall(c, 0.4)
    assert abs(float(full.value) - value) <= 1e-9


def test_default_chunk_only_above_the_table_size_limit():
  assert kernel.default_x_chunk(1024, 1024) is None
  rows = kernel.default_x_chunk(12 * 8192, 8192)
  assert rows is not None and rows * 8192 * 4 <= kernel.CHUNK_TABLE_BYTES


def test_grid_and_positions():
  values = np.array([[0.5, 0.1], [0.1, 0.9]], np.float32)
  grid, pos = kernel.prepare_grid(values)
  # The distinct losses, then the top one repeated up to the bucketed size.
  assert grid.size == kernel.GRID_MINIMUM
  np.testing.assert_array_equal(grid[:3], np.array([0.1, 0.5, 0.9], np.float32))
  np.testing.assert_array_equal(grid[3:], np.float32(0.9))
  np.testing.assert_array_equal(pos, [[1, 0], [0, 2]])
  assert pos.dtype == np.int32 and grid.dtype == np.float32


def test_grid_padding_changes_neither_values_nor_index():
  """The bucketed grid (top value repeated) solves exactly as the distinct grid."""
  c = tj.random_cascade(jax.random.PRNGKey(9), 5, 7)
  grid, pos = kernel.prepare_grid(c.values)
  distinct = np.unique(np.asarray(c.values))
  assert grid.size > distinct.size
  for lam in (0.0, 0.3, 1.0):
    padded = solve_recall_on_grid(c, lam, grid, pos)
    exact = solve_recall_on_grid(c, lam, distinct, np.searchsorted(distinct, c.values))
    assert float(padded.value) == float(exact.value)
    np.testing.assert_array_equal(padded.index, exact.index)


def test_aggregation_switch_warns_and_solves_the_factorised_model():
  c = tj.random_cascade(jax.random.PRNGKey(5), 4, 12, concentration=0.3)
  with pytest.warns(UserWarning, match=r"K = 12 states > aggregate_above = 8: .*rank-3 product"):
    approx = tj.solve_recall(c, 0.5, aggregate_above=8, num_meta=3)
  agg, _ = tj.core.aggregate_cascade(c, 3)
  direct = tj.core.solve_recall_aggregated(agg, 0.5)
  assert abs(float(approx.value) - float(direct.value)) <= 1e-6
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # exact below the threshold, or when disabled
    exact = tj.solve_recall(c, 0.5, aggregate_above=None)
    assert float(tj.solve_recall(c, 0.5, aggregate_above=12).value) == float(exact.value)
    assert float(tj.solve_recall(c, 0.5).value) == float(exact.value)  # default K limit


@pytest.mark.parametrize("kwargs, match", [
    (dict(x_chunk=0), "x_chunk = 0 must be >= 1"),
    (dict(aggregate_above=0), "aggregate_above = 0 must be >= 1"),
    (dict(aggregate_above=2, num_meta=0), "num_meta = 0 must be >= 1"),
])
def test_option_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tj.solve_recall(tj.demo_cascade(), 0.5, **kwargs)
