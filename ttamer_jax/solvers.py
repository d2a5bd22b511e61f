"""Exact solvers on a line cascade (DESIGN.md section 3).

All three are pure functions of ``(cascade, lam)``, compiled with ``jax.jit`` and
``vmap``-able over ``lam`` and over batches of equally shaped cascades.

Conventions:
  * ``x`` is the best-so-far *scaled* loss ``lam * min_j l_j``. Its possible values
    are ``lam * grid`` where ``grid`` is the sorted union of all ``values`` entries
    (``M`` points; ``M = K`` when every stage shares one value grid).
  * Ties stop: the recall policy stops iff ``x <= index[i, s]``; the no-recall
    policy stops iff ``lam * l_i(s) <= continuation``. Stopping never costs more.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax import validation
from ttamer_jax._struct import pytree_dataclass
from ttamer_jax.model import Cascade

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


@pytree_dataclass
class RecallSolution:
  """Optimal policy with recall.

  Attributes:
    value: ``[]`` optimal objective ``J*_recall``.
    index: ``[n, K]`` dynamic index ``sigma``: after stage ``i`` in state ``s`` stop
      iff ``x <= index[i, s]`` (``-inf``: never stop there; last row ``+inf``:
      always stop).
  """

  value: chex.Array
  index: chex.Array


@pytree_dataclass
class NoRecallSolution:
  """Optimal stopping rule without recall (the best any threshold heuristic can do).

  Attributes:
    value: ``[]`` optimal objective ``J*_no_recall``.
    stop: ``[n, K]`` bool, stop after stage ``i`` in state ``s`` (answer with it);
      the last row is all true.
  """

  value: chex.Array
  stop: chex.Array


def value_grid(values: chex.Array, grid_size: int) -> chex.Array:
  """Sorted ``[grid_size]`` grid of unscaled loss values containing every entry.

  ``grid_size`` must be static: ``n*K`` (plain sort, duplicates kept, always
  valid) or at least the number of distinct values (deduplicated, padded with the
  maximum).
  """
  flat = values.reshape(-1)
  if grid_size == flat.shape[0]:
    return jnp.sort(flat)
  return jnp.unique(flat, size=grid_size, fill_value=jnp.max(flat))


def grid_size_for(values: Any) -> int:
  """Number of distinct loss values when they are concrete, else ``n*K``."""
  if validation.is_concrete(values):
    return int(np.unique(np.asarray(values)).size)
  return int(np.prod(values.shape[-2:]))


def grid_and_positions(values: Any) -> tuple[np.ndarray, np.ndarray]:
  """The x-grid and each loss's row in it, computed once in NumPy.

  Sorting inside ``jit`` is slow on CPU (XLA's sort of ``n K = 1536`` floats takes
  ~0.2 ms, as long as the whole K = 64 solve), so callers holding concrete values
  build the grid here, outside the compiled solver.

  Args:
    values: concrete ``[n, K]`` losses.

  Returns:
    ``(grid [M], pos [n, K] int32)``: the sorted distinct values (in the dtype of
    ``values``) and ``pos[i, s]`` = row of ``values[i, s]`` in ``grid``.
  """
  values = np.asarray(values)
  grid = np.unique(values)
  return grid, np.searchsorted(grid, values).astype(np.int32)


# Above this many bytes per [M, K] value table the public solver processes the
# x-grid in row blocks (see ``_solve_recall_on_grid``), keeping two tables alive
# per stage instead of four.
CHUNK_TABLE_BYTES = 1 << 28


def default_x_chunk(grid_size: int, num_states: int, itemsize: int = 4) -> int | None:
  """Rows per x-grid block for a ``[grid_size, num_states]`` table, or ``None``
  (no chunking) when one table is below :data:`CHUNK_TABLE_BYTES`."""
  row_bytes = num_states * itemsize
  if grid_size * row_bytes <= CHUNK_TABLE_BYTES:
    return None
  # Blocks of ~CHUNK_TABLE_BYTES / 8 keep the per-block temporaries small.
  return int(max(1, min(grid_size, (CHUNK_TABLE_BYTES // 8) // row_bytes)))


def _check_inputs(cascade: Cascade, lam: Any) -> None:
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  validation.check_scalar_lam(lam)


# Above this many states ``solve_recall`` solves a soft state aggregation of the
# cascade (``ttamer_jax.aggregation``, ``DEFAULT_NUM_META`` meta-states) instead
# of the exact model, with a warning. ``None``: always exact. The exact solver
# still runs at K = 8192 (O(M K) memory; 0.24 s on an H200, minutes on a CPU).
AGGREGATE_ABOVE_K: int | None = 8192
DEFAULT_NUM_META = 256


def solve_recall(cascade, lam, *, precision=DEFAULT_PRECISION, x_chunk: int | None = None,
                 aggregate_above: int | None | str = "auto", num_meta: int = DEFAULT_NUM_META):
  """Optimal policy with recall by backward dynamic programming.

  On a :class:`~ttamer_jax.routing.RoutingGraph` this dispatches to the graph
  solver (:func:`ttamer_jax.routing.solve_graph_recall`).

  Above ``aggregate_above`` states (``"auto"``: :data:`AGGREGATE_ABOVE_K`) the
  cascade's transitions are first factorised through ``num_meta`` meta-states
  (:func:`ttamer_jax.aggregation.aggregate_cascade`) and the factorised model is
  solved in ``O(n M K q)``; a ``UserWarning`` says so and how far the factors
  are from the true transitions. The result is then the optimum of that
  approximate model, not of ``cascade``. ``aggregate_above=None`` always solves
  exactly.

  Args:
    cascade: a :class:`Cascade` (or a ``RoutingGraph``).
    lam: scalar trade-off weight in ``[0, 1]``.
    precision: matmul precision (``HIGHEST`` keeps float32 exact-ish on GPUs).
    x_chunk: rows of the x-grid processed at a time (bounds memory at about
      ``2 M K`` instead of ``4 M K`` floats); ``None`` chooses by size
      (:func:`default_x_chunk`). Only the summation order of the matrix
      products depends on it: values agree to rounding, and a threshold can
      move only where stopping and continuing tie to rounding (e.g. ``lam = 1``).
    aggregate_above: ``"auto"``, ``None`` or a state count (see above).
    num_meta: meta-states ``q`` of the aggregation.

  Returns:
    :class:`RecallSolution`.
  """
  from ttamer_jax import routing  # routing builds on this module.
  if isinstance(cascade, routing.RoutingGraph):
    return routing.solve_graph_recall(cascade, lam, precision=precision)
  _check_inputs(cascade, lam)
  if x_chunk is not None:
    x_chunk = validation.check_positive_int("x_chunk", x_chunk)
  if not validation.is_concrete(cascade.values):
    return _solve_recall(cascade, lam, grid_size_for(cascade.values), precision)
  threshold = AGGREGATE_ABOVE_K if aggregate_above == "auto" else aggregate_above
  if threshold is not None:
    threshold = validation.check_positive_int("aggregate_above", threshold)
    num_meta = validation.check_positive_int("num_meta", num_meta)
    if cascade.num_states > threshold and num_meta < cascade.num_states:
      return _solve_recall_aggregated(cascade, lam, threshold, num_meta, precision)
  grid, pos = grid_and_positions(cascade.values)
  if validation.is_concrete(lam):
    # One signature for Python floats, NumPy scalars of any width and 0-d
    # arrays: a new lam (or a new lam type) never recompiles.
    lam = np.asarray(lam, grid.dtype)
  if x_chunk is None:
    x_chunk = default_x_chunk(grid.size, cascade.num_states, grid.dtype.itemsize)
  if x_chunk is not None and x_chunk >= grid.size:
    x_chunk = None  # one block: the same program as no chunking.
  return _solve_recall_on_grid(cascade, lam, grid, pos, precision, x_chunk)


def _solve_recall_aggregated(cascade: Cascade, lam, threshold: int, num_meta: int,
                             precision) -> RecallSolution:
  import warnings
  from ttamer_jax import aggregation  # aggregation builds on this module.
  agg, kl = aggregation.aggregate_cascade(cascade, num_meta)
  warnings.warn(
      f"solve_recall: K = {cascade.num_states} states > aggregate_above = {threshold}: solving "
      f"a soft state aggregation instead of the exact model -- every transition matrix is "
      f"approximated by a rank-{num_meta} product A @ B through {num_meta} meta-states (mean "
      f"visit-weighted KL to the true rows {float(np.mean(kl)):.3g} nats), so the value and "
      f"thresholds are those of the approximate model. Pass aggregate_above=None for the exact "
      f"solver (O(M K) memory, O(n M K^2) time).", UserWarning, stacklevel=3)
  return aggregation.solve_recall_aggregated(agg, lam, precision=precision)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _solve_recall(cascade: Cascade, lam, grid_size: int, precision) -> RecallSolution:
  """Traced-values entry point: builds the grid inside the program."""
  grid = value_grid(cascade.values, grid_size)           # [M] unscaled
  pos = jnp.searchsorted(grid, cascade.values).astype(jnp.int32)  # [n, K]
  return _recall_backward(cascade, lam, grid, pos, precision, None)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _solve_recall_on_grid(cascade: Cascade, lam, grid, pos, precision,
                          x_chunk: int | None) -> RecallSolution:
  """The compiled solver given the grid (see :func:`grid_and_positions`).

  ``grid`` ``[M]`` must be sorted and contain every entry of ``values`` (repeated
  entries are allowed: padding with the maximum is how batches of cascades with
  different grids share one shape); ``pos`` ``[n, K]`` int32 is the first row of
  each ``values[i, s]`` in ``grid``. ``lam`` is traced: a new ``lam`` never
  recompiles. Vmappable over ``lam`` and over batches of all array arguments.
  """
  return _recall_backward(cascade, lam, grid, pos, precision, x_chunk)


def _recall_backward(cascade: Cascade, lam, grid, pos, precision, x_chunk):
  values, trans, costs = cascade.values, cascade.trans, cascade.costs
  n, k = values.shape
  dtype = values.dtype
  lam = jnp.asarray(lam, dtype)
  grid = grid.astype(dtype)
  m = grid.shape[0]
  chunked = x_chunk is not None and x_chunk < m
  if chunked:
    # Pad the grid to whole blocks with copies of its top value: padded rows
    # are never the row of a loss (``pos`` points at first occurrences) and
    # only repeat the top row's values and thresholds.
    grid = jnp.concatenate([grid, jnp.full(((-m) % x_chunk,), grid[-1], dtype)])
  xs = lam * grid                                # [M] best-so-far candidates
  rows = grid.shape[0]

  def stage_rows(v_rows, grid_rows, xs_rows, at_l, t_mat, l_next, c_next):
    # G[x, t] = V_{i+1}(min(x, l_{i+1}(t)), t): x itself while x <= l(t), else the
    # row of l(t) -- a select against one gathered row instead of a full gather.
    g = jnp.where(grid_rows[:, None] <= l_next[None, :], v_rows, at_l[None, :])   # [R, K]
    cont = (1 - lam) * c_next + jnp.einsum(
        "xt,st->xs", g, t_mat, precision=precision)                               # [R, K]
    sigma = jnp.max(jnp.where(xs_rows[:, None] <= cont, xs_rows[:, None], -jnp.inf), axis=0)
    return jnp.minimum(xs_rows[:, None], cont), sigma

  def backward(v_next, stage):
    t_mat, l_next, p_next, c_next = stage
    at_l = jnp.take_along_axis(v_next, p_next[None, :], axis=0)[0]                # [K]
    if not chunked:
      return stage_rows(v_next, grid, xs, at_l, t_mat, l_next, c_next)
    blocks = (v_next.reshape(-1, x_chunk, k), grid.reshape(-1, x_chunk), xs.reshape(-1, x_chunk))
    v_new, sigmas = jax.lax.map(
        lambda b: stage_rows(*b, at_l, t_mat, l_next, c_next), blocks)
    return v_new.reshape(rows, k), jnp.max(sigmas, axis=0)

  v_last = jnp.broadcast_to(xs[:, None], (rows, k))
  v_first, sigmas = jax.lax.scan(
      backward, v_last, (trans, values[1:], pos[1:], costs[1:]), reverse=True)
  index = jnp.concatenate([sigmas, jnp.full((1, k), jnp.inf, dtype)], axis=0)
  v_start = jnp.take_along_axis(v_first, pos[0][None, :], axis=0)[0]      # V_1(lam l_1(s), s)
  value = (1 - lam) * costs[0] + jnp.dot(cascade.init, v_start, precision=precision)
  return RecallSolution(value=value, index=index)


def solve_no_recall(cascade: Cascade, lam, *, precision=DEFAULT_PRECISION) -> NoRecallSolution:
  """Optimal stopping without recall (answer = last consulted stage).

  ``W_n(s) = lam l_n(s)``; ``W_i(s) = min(lam l_i(s), (1-lam) c_{i+1} + trans_i W_{i+1})``.
  """
  _check_inputs(cascade, lam)
  return _solve_no_recall(cascade, lam, precision)


@functools.partial(jax.jit, static_argnums=(2,))
def _solve_no_recall(cascade: Cascade, lam, precision) -> NoRecallSolution:
  values, costs = cascade.values, cascade.costs
  n, k = values.shape
  lam = jnp.asarray(lam, values.dtype)

  def backward(w_next, stage):
    t_mat, l_here, c_next = stage
    cont = (1 - lam) * c_next + jnp.dot(t_mat, w_next, precision=precision)
    stop_value = lam * l_here
    return jnp.minimum(stop_value, cont), stop_value <= cont

  w_first, stops = jax.lax.scan(
      backward, lam * values[-1], (cascade.trans, values[:-1], costs[1:]), reverse=True)
  stop = jnp.concatenate([stops, jnp.ones((1, k), bool)], axis=0)
  value = (1 - lam) * costs[0] + jnp.dot(cascade.init, w_first, precision=precision)
  return NoRecallSolution(value=value, stop=stop)


def prophet_value(cascade: Cascade, lam, *, chunk_size: int = 4096,
                  precision=DEFAULT_PRECISION) -> chex.Array:
  """Exact hindsight optimum ``E[min_k (lam min_{j<=k} l_j + (1-lam) C_k)]``.

  With nonnegative costs this equals ``E[B]``, ``B = min_j (lam l_j + (1-lam) C_j)``
  (``C_j = c_1 + ... + c_j``). ``B`` takes at most ``n K`` values (breakpoints);
  ``P(B > b)`` is a masked forward pass of the chain, run for every breakpoint at
  once (``chunk_size`` breakpoints per pass bounds memory at ``chunk_size * K``),
  and ``E[B]`` integrates the resulting step function exactly.
  """
  _check_inputs(cascade, lam)
  chunk_size = validation.check_positive_int("chunk_size", chunk_size)
  return _prophet_value(cascade, lam, chunk_size, precision)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prophet_value(cascade: Cascade, lam, chunk_size: int, precision) -> chex.Array:
  values, costs = cascade.values, cascade.costs
  lam = jnp.asarray(lam, values.dtype)
  stage_totals = lam * values + (1 - lam) * jnp.cumsum(costs)[:, None]     # [n, K]
  breaks = jnp.sort(stage_totals.reshape(-1))                             # [nK]

  def survival(b):  # [B] breakpoints -> [B] P(min_j stage_totals_j > b)
    alive = lambda j: stage_totals[j][None, :] > b[:, None]
    mass0 = cascade.init[None, :] * alive(0)

    def forward(mass, stage):
      t_mat, totals = stage
      mass = jnp.dot(mass, t_mat, precision=precision)
      return mass * (totals[None, :] > b[:, None]), None

    mass, _ = jax.lax.scan(forward, mass0, (cascade.trans, stage_totals[1:]))
    return mass.sum(-1)

  num = breaks.shape[0]
  if num <= chunk_size:
    surv = survival(breaks)
  else:
    pad = (-num) % chunk_size
    padded = jnp.concatenate([breaks, jnp.full((pad,), breaks[-1])])
    surv = jax.lax.map(survival, padded.reshape(-1, chunk_size)).reshape(-1)[:num]
  # E[B] = b_0 + sum_m P(B > b_m) (b_{m+1} - b_m).
  return breaks[0] + jnp.sum(surv[:-1] * jnp.diff(breaks))
