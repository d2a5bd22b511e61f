"""The one recall kernel: the x-grid and the backward step (DESIGN.md sections 3-4).

Every recall solver runs the same recursion over the best-so-far ``x`` (a scaled
loss ``lam * l``) and the current state ``s``:

    V(x, s)    = min(x, cont(x, s))
    cont(x, s) = stage_cost + E[ G(x, t) | s ]          G(x, t) = V_next(min(x, lam l_next(t)), t)

The line (:func:`ttamer_jax.solve_recall`), the factored model (soft state
aggregation), the graph solver, the soft-min relaxation and batched sweeps differ
only in how they take the expectation -- their *continuation*. Everything else
is here, written once:

* the x-grid: :func:`prepare_grid` (sorted distinct losses and each loss's row,
  built on the host) or :func:`grid_in_program` (inside a transformation);
* :func:`carried_table`: ``G`` from ``V_next``, a select against one gathered row;
* :func:`stop_or_continue`: ``V`` and the dynamic index of one stage;
* :func:`backward_scan`: the stage loop of a line, optionally in blocks of x rows.

Index convention: stop iff ``x <= index[stage, s]``. The stored threshold lies
strictly *between* the largest grid value where stopping is optimal and the next
grid value (their midpoint), never on a reachable ``lam * loss``, so a decision
does not depend on the last bit of that product: a policy solved in float32 makes
the same decisions in float64 or in another runtime. ``-inf``: never stop there;
``+inf``: stop whatever ``x``.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.shapes import bucket_size

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
# Grids of up to this many distinct losses share one size (and one compiled solver).
GRID_MINIMUM = 8

# Above this many bytes per [M, K] value table the line solver processes the
# x-grid in row blocks, keeping two tables alive per stage instead of four.
CHUNK_TABLE_BYTES = 1 << 28

# Up to this many states a batch of lams is solved in the trailing layout (tables
# [M, K, C]) with the expectation as K multiply-adds per entry: at K = 8..32 that
# runs 1.4-2.9x faster on CPUs than the product of the leading layout (a
# [C M, K] x [K, K] GEMM is too thin to run at the matmul rate; BENCHMARKS.md).
SMALL_K = 32


# ------------------------------------------------------------------ the grid
def prepare_grid(values: Any) -> tuple[np.ndarray, np.ndarray]:
  """The x-grid and each loss's row in it, computed once on the host.

  Sorting inside ``jit`` is slow on CPUs (XLA's sort of ``n K = 1536`` floats
  takes about as long as a whole ``K = 64`` solve), so callers holding concrete
  losses build the grid here, outside the compiled solver.

  Args:
    values: concrete ``[n, K]`` losses.

  Returns:
    ``(grid [M], pos [n, K] int32)``: the sorted distinct losses (dtype of
    ``values``), padded with copies of the largest to ``M = bucket_size(distinct)``
    so that cascades fitted on other data (another fold, another lam) reuse the
    compiled solver; ``pos[i, s]`` = first row of ``values[i, s]`` in ``grid``.
    Repeating the top value is valid for the kernel: those rows are never a loss's
    row and only repeat the top row, whose threshold is ``+inf`` (see :func:`row_thresholds`).
  """
  values = np.asarray(values)
  grid = np.unique(values)
  size = bucket_size(grid.size, minimum=GRID_MINIMUM)
  grid = np.concatenate([grid, np.full(size - grid.size, grid[-1], grid.dtype)])
  return grid, np.searchsorted(grid, values).astype(np.int32)


def grid_size_for(values: Any) -> int:
  """Number of distinct losses when they are concrete, else ``n*K``."""
  if validation.is_concrete(values):
    return int(np.unique(np.asarray(values)).size)
  return int(np.prod(values.shape[-2:]))


def grid_in_program(values: chex.Array, grid_size: int) -> tuple[chex.Array, chex.Array]:
  """:func:`prepare_grid` for traced losses; ``grid_size`` is static.

  ``grid_size = n*K`` keeps duplicates (always valid); a smaller one must be at
  least the number of distinct values (deduplicated, padded with the maximum).
  """
  flat = values.reshape(-1)
  if grid_size == flat.shape[0]:
    grid = jnp.sort(flat)
  else:
    grid = jnp.unique(flat, size=grid_size, fill_value=jnp.max(flat))
  return grid, jnp.searchsorted(grid, values).astype(jnp.int32)


def grid_for(values: Any) -> tuple[Any, Any]:
  """:func:`prepare_grid` for concrete losses (host), :func:`grid_in_program` for traced
  ones (duplicates kept: ``M = n K``)."""
  if validation.is_concrete(values):
    return prepare_grid(values)
  return grid_in_program(values, grid_size_for(values))


def pad_grids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-instance grids of ``values [I, n, K]`` padded with their maximum to one size ``M``.

  :func:`prepare_grid` of every instance at once (one sort of the ``[I, n K]``
  losses instead of ``I`` calls: 256 instances took 12 ms in a Python loop). Padding
  with the top value is valid for the kernel: padded rows are never the row of a
  loss (``pos`` points at first occurrences) and only repeat the top row.
  """
  values = np.asarray(values)
  num, n, k = values.shape
  if num > 1 and (values == values[:1]).all():   # one loss grid for all (e.g. a shared discretisation)
    grid, pos = prepare_grid(values[0])
    return np.repeat(grid[None], num, axis=0), np.repeat(pos[None], num, axis=0)
  flat = values.reshape(num, n * k)
  order = np.argsort(flat, axis=1, kind="stable")
  rows = np.arange(num)[:, None]
  ordered = flat[rows, order]
  # Rank of each sorted entry among its row's distinct values (equal values share one).
  rank = np.zeros((num, n * k), np.int32)
  np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1, out=rank[:, 1:])
  size = bucket_size(int(rank[:, -1].max()) + 1, minimum=GRID_MINIMUM)
  grid = np.repeat(ordered[:, -1:], size, axis=1)
  grid[rows, rank] = ordered                        # duplicates write the same value
  pos = np.empty_like(rank)
  pos[rows, order] = rank
  return grid, pos.reshape(num, n, k)


def default_x_chunk(grid_size: int, num_states: int, itemsize: int = 4) -> int | None:
  """Rows per x-grid block for a ``[grid_size, num_states]`` table, or ``None``
  (no chunking) when one table is below :data:`CHUNK_TABLE_BYTES`."""
  row_bytes = num_states * itemsize
  if grid_size * row_bytes <= CHUNK_TABLE_BYTES:
    return None
  # Blocks of ~CHUNK_TABLE_BYTES / 8 keep the per-block temporaries small.
  return int(max(1, min(grid_size, (CHUNK_TABLE_BYTES // 8) // row_bytes)))


# ------------------------------------------------------------------ one step
# Every step below takes optional batch axes (a batch of ``lam`` sharing one grid), in
# one of two layouts. Leading (the default): tables ``[..., R, K]``; the continuation's
# product then runs on the whole batch at once -- one ``(C R) x K`` by ``K x K`` matrix
# product per stage instead of many small ones. Trailing (``batch_last``): tables
# ``[R, K, C]``, the batch in the minor axis, where every elementwise pass vectorises
# over the batch -- what small ``K`` needs, whose products are too small for a GEMM
# (:data:`SMALL_K`).
def at_losses(v: chex.Array, pos_row: chex.Array, batch_last: bool = False) -> chex.Array:
  """``V(lam l(t), t)``: row ``pos_row[t]`` of column ``t`` of ``v [..., M, K]``
  (``[..., K]``), or of ``v [M, K, C]`` with ``batch_last`` (``[K, C]``)."""
  cols = jnp.arange(pos_row.shape[0])
  return v[pos_row, cols] if batch_last else v[..., pos_row, cols]


def carried_table(v_next: chex.Array, grid_rows: chex.Array, at_l: chex.Array,
                  l_next: chex.Array, batch_last: bool = False) -> chex.Array:
  """``G[x, t] = V_next(min(x, lam l_next(t)), t)`` on rows ``grid_rows`` of the grid.

  ``x`` itself while ``x <= l(t)`` (compared unscaled), else the row of ``l(t)``
  (``at_l``, from :func:`at_losses`): a select instead of a gather.
  """
  keep = grid_rows[:, None] <= l_next[None, :]
  if batch_last:
    return jnp.where(keep[:, :, None], v_next, at_l[None])
  return jnp.where(keep, v_next, at_l[..., None, :])


def row_thresholds(xs: chex.Array, axis: int = -1) -> chex.Array:
  """The index each grid row stands for: ``[..., M]`` for the sorted scaled grid ``xs [..., M]``
  (the grid along ``axis``).

  Row ``r``'s threshold is the midpoint of ``xs[r]`` and the next larger grid value
  (strictly between them unless they are adjacent floats), ``+inf`` where no larger
  value follows. It is non-decreasing in ``r`` (so are ``xs`` and the next larger
  value), so the threshold of the *last* row where stopping is optimal is the
  *largest* threshold over the stopping rows: :func:`stop_or_continue` gets the index
  from the same max-reduction that finds that row, and nothing is searched
  afterwards (a vmapped ``searchsorted`` per stage x lam x state cost several times
  the whole recursion at small K). Equal grid values (duplicates, or distinct losses
  that ``lam`` scales to one float) share one threshold. O(M) per grid, once per solve.
  """
  xs = jnp.moveaxis(xs, axis, -1)
  inf = jnp.full(xs.shape[:-1] + (1,), jnp.inf, xs.dtype)
  # Row j starts a new grid value iff it exceeds row j-1; the next larger value after
  # row r is the first start past r, a reversed running minimum (starts increase).
  starts = jnp.where(xs[..., 1:] > xs[..., :-1], xs[..., 1:], jnp.inf)
  nxt = jax.lax.cummin(jnp.concatenate([starts, inf], axis=-1), axis=xs.ndim - 1, reverse=True)
  # min(xs, nxt) is xs. Written so, the sum's operand is not the product lam * grid,
  # which XLA:CPU would contract with the add into one multiply-add (a barrier does
  # not survive its pipeline): the midpoint is the rounded sum of two rounded grid
  # values, the same bits in every program and in NumPy.
  mid = jnp.where(jnp.isinf(nxt), jnp.inf, 0.5 * (jnp.minimum(xs, nxt) + nxt)).astype(xs.dtype)
  return jnp.moveaxis(mid, -1, axis)


def stop_or_continue(xs: chex.Array, cont: chex.Array, thresholds: chex.Array,
                     batch_last: bool = False) -> tuple[chex.Array, chex.Array]:
  """``(V, index)`` of one stage on rows ``xs`` of the grid: ``[..., R, K]`` and
  ``[..., K]`` for ``xs [..., R]``; ``[R, K, C]`` and ``[K, C]`` for ``xs [R, C]``
  with ``batch_last``.

  ``V = min(x, cont)`` (ties stop). ``index[s]`` is the largest of these rows'
  ``thresholds`` (:func:`row_thresholds`, same shape as ``xs``) where stopping is
  optimal: the threshold just above the last stopping row, ``-inf`` if there is none
  (never stop). Over blocks of rows the index is the maximum of the blocks'.
  """
  x, rows_axis = (xs[:, None, :], 0) if batch_last else (xs[..., :, None], -2)
  thr = thresholds[:, None, :] if batch_last else thresholds[..., :, None]
  index = jnp.max(jnp.where(x <= cont, thr, -jnp.inf), axis=rows_axis)
  return jnp.minimum(x, cont), index


# ------------------------------------------------------------------ a line
Continuation = Callable[[chex.Array, Any], chex.Array]


def backward_scan(xs: chex.Array, grid: chex.Array, pos: chex.Array, values: chex.Array,
                  stage_costs: chex.Array, stage_data: Any, continuation: Continuation, *,
                  x_chunk: int | None = None, beta: chex.Array | None = None,
                  with_index: bool = True,
                  batch_last: bool = False) -> tuple[chex.Array, chex.Array | None]:
  """The backward pass over a line of ``n`` stages.

  Args:
    xs: ``[..., M]`` scaled grid ``lam * grid`` (sorted unless ``beta`` is given);
      leading axes are a batch of ``lam`` sharing the grid, solved together.
    grid: ``[M]`` unscaled grid, containing every entry of ``values``.
    pos: ``[n, K]`` int32 row of each ``values[i, s]`` in ``grid``.
    values: ``[n, K]`` unscaled losses.
    stage_costs: ``[n-1, ...]`` weighted cost of consulting stage ``i+1`` (e.g.
      ``(1-lam) costs[1:]``), per batch entry.
    stage_data: pytree with leading axis ``n-1``: what ``continuation`` needs per
      stage (a transition matrix, a pair of factors, ...).
    continuation: ``(G [..., R, K], data_i) -> [..., R, K]`` expectation over the next
      state, ``E[G(x, t) | s]``.
    x_chunk: rows of the grid per block (bounds memory at about ``2 M K``; unbatched
      ``xs`` only); the grid is padded to whole blocks with its top value.
    beta: soft-min temperature of the relaxation (``V = softmin(x, cont)``, no
      index); ``None`` for the exact recursion.
    with_index: also compute the dynamic index (skipped: one pass less per stage).
    batch_last: ``xs`` is ``[M, C]`` and the tables ``[M, K, C]`` (the trailing layout
      above; exact recursion, no ``x_chunk``); ``continuation`` then maps ``[R, K, C]``
      to ``[R, K, C]``.

  Returns:
    ``(V_1 [..., M, K], index [..., n, K])`` (``V_1 [M, K, C]`` with ``batch_last``)
    -- ``index`` is ``None`` when ``beta`` is given or ``with_index`` is false.
  """
  n, k = values.shape
  dtype = values.dtype
  if batch_last and (beta is not None or xs.ndim != 2):
    raise ValueError("batch_last: needs xs [M, C] and the exact recursion (no beta)")
  batch = xs.shape[1:] if batch_last else xs.shape[:-1]
  m = grid.shape[0]
  chunked = x_chunk is not None and x_chunk < m and not batch
  if chunked:
    pad = (-m) % x_chunk
    grid = jnp.concatenate([grid, jnp.full((pad,), grid[-1], grid.dtype)])
    xs = jnp.concatenate([xs, jnp.full((pad,), xs[-1], xs.dtype)])
  rows = grid.shape[0]
  indexed = beta is None and with_index
  # Each row's threshold, once per solve: a stage's index is then one max-reduction.
  thresholds = row_thresholds(xs, axis=0 if batch_last else -1) if indexed else xs
  none = jnp.zeros(((k,) + batch) if batch_last else (batch + (k,)), dtype)
  table_shape = ((rows, k) + batch) if batch_last else (batch + (rows, k))
  column = lambda a: a[:, None, :] if batch_last else a[..., :, None]   # x as a table column

  def stage_rows(v_rows, grid_rows, xs_rows, thr_rows, at_l, l_next, cost, data):
    g = carried_table(v_rows, grid_rows, at_l, l_next, batch_last)
    cont = (cost if batch_last else cost[..., None, None]) + continuation(g, data)
    if beta is not None:
      return soft_choose(column(xs_rows), cont, beta), none
    if not with_index:
      return jnp.minimum(column(xs_rows), cont), none
    return stop_or_continue(xs_rows, cont, thr_rows, batch_last)

  def step(v_next, stage):
    l_next, p_next, cost, data = stage
    at_l = at_losses(v_next, p_next, batch_last)
    if not chunked:
      return stage_rows(v_next, grid, xs, thresholds, at_l, l_next, cost, data)
    blocks = (v_next.reshape(-1, x_chunk, k), grid.reshape(-1, x_chunk), xs.reshape(-1, x_chunk),
              thresholds.reshape(-1, x_chunk))
    v_new, index = jax.lax.map(lambda b: stage_rows(*b, at_l, l_next, cost, data), blocks)
    return v_new.reshape(rows, k), jnp.max(index, axis=0)

  v_last = jnp.broadcast_to(column(xs), table_shape).astype(dtype)
  v_first, sigmas = jax.lax.scan(
      step, v_last, (values[1:], pos[1:], stage_costs, stage_data), reverse=True)
  if not indexed:
    return v_first, None
  if batch_last:   # the index is [C, n, K] in both layouts
    sigmas = jnp.swapaxes(sigmas, -1, -2)                                        # [n-1, C, K]
  index = jnp.concatenate([sigmas, jnp.full((1,) + batch + (k,), jnp.inf, dtype)], axis=0)
  return v_first, jnp.moveaxis(index, 0, -2)


def soft_choose(x: chex.Array, cont: chex.Array, beta: chex.Array) -> chex.Array:
  """``softmin_beta(x, cont)``; ``beta = 0`` is the exact ``min`` (one jitted body for both)."""
  safe = jnp.where(beta > 0, beta, 1.0)
  return jnp.where(beta > 0, -safe * jnp.logaddexp(-x / safe, -cont / safe), jnp.minimum(x, cont))


def line_value(v_first: chex.Array, pos_first: chex.Array, init: chex.Array, first_cost: chex.Array,
               precision=DEFAULT_PRECISION, batch_last: bool = False) -> chex.Array:
  """``[...]`` ``J = first_cost + sum_s init[s] V_1(lam l_1(s), s)`` (``[C]`` with ``batch_last``)."""
  start = at_losses(v_first, pos_first, batch_last)
  if batch_last:
    return first_cost + jnp.dot(init, start, precision=precision)
  return first_cost + jnp.dot(start, init, precision=precision)
