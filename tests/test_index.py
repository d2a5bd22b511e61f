"""The dynamic index from the stage step (``kernel.row_thresholds`` + ``stop_or_continue``)
against the implementation it replaced: the largest stopping ``x`` of a stage, then a
vmapped ``searchsorted`` for the next grid value and their midpoint (kept here, verbatim,
as the reference). Same values, bit for bit, on random and adversarial inputs; and the
solvers' tables against a float64 NumPy backward pass that uses that reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax.core import graph as graph_mod
from ttamer_jax.core import kernel, solvers


# ------------------------------------------------------------------ the reference
def reference_index_from_last_stop(xs, last_stop):
  """The replaced ``kernel.index_from_last_stop``: ``[..., K]`` thresholds strictly
  between ``last_stop`` and the next value of the sorted grid ``xs [..., M]``."""
  if xs.ndim > 1:
    return jax.vmap(reference_index_from_last_stop)(xs, last_stop)
  nxt_row = jnp.searchsorted(xs, last_stop, side="right")
  nxt = jnp.where(nxt_row < xs.shape[0], xs[jnp.minimum(nxt_row, xs.shape[0] - 1)], jnp.inf)
  mid = jnp.where(jnp.isinf(nxt), jnp.inf, 0.5 * (last_stop + nxt))
  return jnp.where(last_stop == -jnp.inf, -jnp.inf, mid).astype(xs.dtype)


@jax.jit
def reference_stage(xs, cont):
  """The replaced stage step on ``xs [..., M]``, ``cont [..., M, K]``: ``(V, index)``."""
  x = xs[..., :, None]
  last_stop = jnp.max(jnp.where(x <= cont, x, -jnp.inf), axis=-2)
  return jnp.minimum(x, cont), reference_index_from_last_stop(xs, last_stop)


@jax.jit
def new_stage(xs, cont):
  return kernel.stop_or_continue(xs, cont, kernel.row_thresholds(xs))


@jax.jit
def new_stage_trailing(xs, cont):
  """The trailing layout: ``xs [M, C]``, ``cont [M, K, C]``; returned as ``[C, M, K]`` / ``[C, K]``."""
  v, index = kernel.stop_or_continue(xs, cont, kernel.row_thresholds(xs, axis=0), batch_last=True)
  return jnp.moveaxis(v, -1, 0), index.T


# ------------------------------------------------------------------ the cases
def _grid(rng, c, m, dtype, kind):
  """``[C, M]`` sorted scaled grids of one kind of adversity."""
  if kind == "random":
    g = rng.uniform(0, 1, (c, m))
  elif kind == "ties":          # few distinct values, each repeated
    g = rng.integers(0, 3, (c, m)) / 2.0
  elif kind == "padded":        # a grid padded with copies of its top value
    g = rng.uniform(0, 1, (c, m))
    g[:, m // 2:] = g.max(axis=1, keepdims=True)
  elif kind == "lam_zero":      # lam = 0 scales every loss to one value
    g = np.zeros((c, m))
  elif kind == "close":         # neighbours one ulp apart (lam scaling merges or keeps them)
    base = rng.uniform(0.1, 1, (c, 1)).astype(dtype)
    g = base * np.ones((c, m), dtype)
    for j in range(1, m):
      g[:, j] = np.nextafter(g[:, j - 1], np.asarray(np.inf, dtype)) if j % 2 else g[:, j - 1]
  elif kind == "large":
    g = rng.uniform(0, 1, (c, m)) * np.asarray(1e30 if dtype == np.float32 else 1e300)
  else:
    raise ValueError(kind)
  return np.sort(np.asarray(g, dtype), axis=1)


def _cont(rng, xs, k, dtype, kind):
  """``[C, M, K]`` continuations: stopping rows in every pattern, ties, none, all."""
  c, m = xs.shape
  x = xs[:, :, None]
  if kind == "threshold":       # a monotone stop region, as the theory says
    cont = x + rng.uniform(-0.5, 0.5, (c, 1, k)) * (1 + np.abs(x).max())
  elif kind == "scattered":     # any pattern of stopping rows (rounding can break monotonicity)
    stop = rng.random((c, m, k)) < 0.5
    cont = np.where(stop, x + rng.uniform(0, 1, (c, m, k)), x - rng.uniform(0.01, 1, (c, m, k)))
  elif kind == "ties":          # cont == x exactly: ties stop
    cont = np.where(rng.random((c, m, k)) < 0.5, np.broadcast_to(x, (c, m, k)), x - 1)
  elif kind == "never":         # every row continues: index -inf
    cont = x - 1 - np.abs(x)
  elif kind == "always":        # every row stops: the top row's threshold, +inf
    cont = x + 1 + np.abs(x)
  else:
    raise ValueError(kind)
  return np.asarray(cont, dtype)


GRIDS = ("random", "ties", "padded", "lam_zero", "close", "large")
CONTS = ("threshold", "scattered", "ties", "never", "always")


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("grid_kind", GRIDS)
def test_stage_index_matches_the_searchsorted_reference(x64, grid_kind):
  dtype = np.float64 if x64 else np.float32
  rng = np.random.default_rng(GRIDS.index(grid_kind) + 10 * x64)
  with jax.enable_x64(x64):
    for m in (1, 2, 7, 8, 33):
      xs = _grid(rng, 5, m, dtype, grid_kind)
      for cont_kind in CONTS:
        cont = _cont(rng, xs, 4, dtype, cont_kind)
        want_v, want = (np.asarray(a) for a in reference_stage(xs, cont))
        assert want.dtype == dtype
        got_v, got = (np.asarray(a) for a in new_stage(xs, cont))          # leading layout
        np.testing.assert_array_equal(got, want, err_msg=f"{grid_kind} {cont_kind} M={m}")
        np.testing.assert_array_equal(got_v, want_v)
        got_v, got = (np.asarray(a) for a in new_stage_trailing(xs.T, np.moveaxis(cont, 0, -1)))
        np.testing.assert_array_equal(got, want, err_msg=f"trailing {grid_kind} {cont_kind} M={m}")
        np.testing.assert_array_equal(got_v, want_v)
        for i in range(xs.shape[0]):                                        # one grid, no batch
          v1, i1 = new_stage(xs[i], cont[i])
          np.testing.assert_array_equal(np.asarray(i1), want[i])
        if cont_kind == "never":
          assert np.all(want == -np.inf)
        if cont_kind == "always":
          assert np.all(want == np.inf)


def test_row_thresholds_are_non_decreasing_and_strictly_between_grid_values():
  """What lets a max-reduction find the index: thresholds grow with the row, and each is
  the midpoint of its row's value and the next larger one (+inf at the top), strictly
  between them unless they are adjacent floats."""
  rng = np.random.default_rng(3)
  for kind in GRIDS:
    xs = _grid(rng, 6, 16, np.float32, kind)
    thr = np.asarray(jax.jit(kernel.row_thresholds)(xs))
    assert np.all(thr[:, 1:] >= thr[:, :-1]), kind
    for row, t in zip(xs, thr):
      above = [row[row > v].min() if (row > v).any() else np.inf for v in row]
      above = np.asarray(above, np.float32)
      np.testing.assert_array_equal(t, np.where(np.isinf(above), np.inf, (row + above) / 2))
      room = np.nextafter(row, np.float32(np.inf)) < above     # else the midpoint rounds to an end
      assert np.all((t > row) & ((t < above) | np.isinf(above)) | ~room), kind
      assert np.all((row <= t) & (t <= above)), kind
    np.testing.assert_array_equal(np.asarray(kernel.row_thresholds(xs.T, axis=0)), thr.T)


# ------------------------------------------------------------------ whole solves
def _numpy_index(cascade, lam):
  """``[n, K]`` index of a float64 NumPy backward pass with the reference index."""
  values, trans, costs = (np.asarray(a, np.float64) for a in (cascade.values, cascade.trans,
                                                               cascade.costs))
  n, k = values.shape
  grid = np.unique(values)
  pos = np.searchsorted(grid, values)
  xs = lam * grid
  cols = np.arange(k)
  v = np.repeat(xs[:, None], k, axis=1)
  index = np.full((n, k), np.inf)
  for i in range(n - 2, -1, -1):
    g = np.where(grid[:, None] <= values[i + 1][None, :], v, v[pos[i + 1], cols][None, :])
    cont = (1 - lam) * costs[i + 1] + g @ trans[i].T
    last_stop = np.where(xs[:, None] <= cont, xs[:, None], -np.inf).max(axis=0)
    index[i] = np.asarray(reference_index_from_last_stop(jnp.asarray(xs), jnp.asarray(last_stop)))
    v = np.minimum(xs[:, None], cont)
  return index


@pytest.mark.parametrize("k", [5, 40])   # both layouts of a lam batch (kernel.SMALL_K = 32)
def test_solver_tables_match_a_numpy_pass_with_the_reference_index(k):
  """Every solver path that builds the index -- one solve, one solve in row blocks, a lam
  batch, a sweep and the graph solver -- against the reference, in float64 (no rounding
  ties between NumPy's and XLA's products on these random instances)."""
  lams = np.array([0.05, 0.3, 0.6, 0.95])
  with jax.enable_x64(True):
    for seed, shared in ((0, False), (1, True)):
      c = tj.random_cascade(jax.random.PRNGKey(seed), 5, k, shared_grid=shared)
      c = tj.Cascade.from_arrays(*(np.asarray(a, np.float64) for a in
                                   (c.values, c.init, c.trans, c.costs)))
      want = np.stack([_numpy_index(c, lam) for lam in lams])
      assert np.isfinite(want[:, :-1]).any() and np.isinf(want[:, :-1]).any()   # both kinds of rows
      grid, pos = kernel.prepare_grid(np.asarray(c.values))
      batch = solvers.solve_recall_lams(c, lams, grid, pos)
      np.testing.assert_array_equal(np.asarray(batch.index), want)
      np.testing.assert_array_equal(np.asarray(tj.sweep(c, lams).index), want)
      for j, lam in enumerate(lams):
        np.testing.assert_array_equal(np.asarray(tj.solve_recall(c, lam).index), want[j])
        blocks = tj.solve_recall(c, lam, x_chunk=3)    # rows in blocks, the last one padded
        np.testing.assert_array_equal(np.asarray(blocks.index), want[j])
        line = graph_mod.solve_graph_recall(graph_mod.line_graph(c), lam)
        np.testing.assert_array_equal(np.asarray(line.index), want[j])
