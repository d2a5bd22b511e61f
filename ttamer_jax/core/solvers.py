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
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import kernel, validation
from ttamer_jax.core.factored import AggregatedCascade, aggregate_cascade, solve_recall_aggregated
from ttamer_jax.core.graph import RoutingGraph, solve_graph_recall
from ttamer_jax.core.kernel import DEFAULT_PRECISION
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.solutions import NoRecallSolution, RecallSolution


def _check_inputs(cascade: Cascade, lam: Any) -> None:
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  validation.check_scalar_lam(lam)


# Above this many states ``solve_recall`` solves a soft state aggregation of the
# cascade (:mod:`ttamer_jax.core.factored`, ``DEFAULT_NUM_META`` meta-states)
# instead of the exact model, with a warning. ``None``: always exact. The exact
# solver still runs at K = 8192 (O(M K) memory; 0.24 s on an H200, minutes on a CPU).
AGGREGATE_ABOVE_K: int | None = 8192
DEFAULT_NUM_META = 256


def solve_recall(cascade, lam, *, precision=DEFAULT_PRECISION, x_chunk: int | None = None,
                 aggregate_above: int | None | str = "auto", num_meta: int = DEFAULT_NUM_META):
  """Optimal policy with recall by backward dynamic programming.

  On a :class:`~ttamer_jax.RoutingGraph` this is :func:`~ttamer_jax.core.solve_graph_recall`;
  on an :class:`~ttamer_jax.core.AggregatedCascade`, :func:`~ttamer_jax.core.solve_recall_aggregated`.

  Above ``aggregate_above`` states (``"auto"``: :data:`AGGREGATE_ABOVE_K`) the
  cascade's transitions are first factorised through ``num_meta`` meta-states
  (:func:`~ttamer_jax.core.aggregate_cascade`) and the factorised model is solved in
  ``O(n M K q)``; a ``UserWarning`` says so and how far the factors are from the
  true transitions. The result is then the optimum of that approximate model,
  not of ``cascade``. ``aggregate_above=None`` always solves exactly.

  Args:
    cascade: a :class:`Cascade` (or a ``RoutingGraph`` / ``AggregatedCascade``).
    lam: scalar trade-off weight in ``[0, 1]``.
    precision: matmul precision (``HIGHEST`` keeps float32 exact-ish on GPUs).
    x_chunk: rows of the x-grid processed at a time (bounds memory at about
      ``2 M K`` instead of ``4 M K`` floats); ``None`` chooses by size
      (:func:`~ttamer_jax.core.kernel.default_x_chunk`). Only the summation order
      of the matrix products depends on it: values agree to rounding, and a
      threshold can move only where stopping and continuing tie to rounding.
    aggregate_above: ``"auto"``, ``None`` or a state count (see above).
    num_meta: meta-states ``q`` of the aggregation.

  Returns:
    :class:`RecallSolution` (:class:`~ttamer_jax.core.GraphSolution` on a graph).
  """
  if isinstance(cascade, RoutingGraph):
    return solve_graph_recall(cascade, lam, precision=precision)
  if isinstance(cascade, AggregatedCascade):
    return solve_recall_aggregated(cascade, lam, precision=precision)
  _check_inputs(cascade, lam)
  if x_chunk is not None:
    x_chunk = validation.check_positive_int("x_chunk", x_chunk)
  if not validation.is_concrete(cascade.values):
    # Inside a transformation: the grid is built in the program (duplicates kept).
    grid, pos = kernel.grid_for(cascade.values)
    return solve_recall_on_grid(cascade, lam, grid, pos, precision, None)
  threshold = AGGREGATE_ABOVE_K if aggregate_above == "auto" else aggregate_above
  if threshold is not None:
    threshold = validation.check_positive_int("aggregate_above", threshold)
    num_meta = validation.check_positive_int("num_meta", num_meta)
    if cascade.num_states > threshold and num_meta < cascade.num_states:
      return _solve_recall_aggregated(cascade, lam, threshold, num_meta, precision)
  grid, pos = kernel.prepare_grid(cascade.values)
  if validation.is_concrete(lam):
    # One signature for Python floats, NumPy scalars of any width and 0-d
    # arrays: a new lam (or a new lam type) never recompiles.
    lam = np.asarray(lam, grid.dtype)
  if x_chunk is None:
    x_chunk = kernel.default_x_chunk(grid.size, cascade.num_states, grid.dtype.itemsize)
  if x_chunk is not None and x_chunk >= grid.size:
    x_chunk = None  # one block: the same program as no chunking.
  return solve_recall_on_grid(cascade, lam, grid, pos, precision, x_chunk)


def _solve_recall_aggregated(cascade: Cascade, lam, threshold: int, num_meta: int,
                             precision) -> RecallSolution:
  agg, kl = aggregate_cascade(cascade, num_meta)
  warnings.warn(
      f"solve_recall: K = {cascade.num_states} states > aggregate_above = {threshold}: solving "
      f"a soft state aggregation instead of the exact model -- every transition matrix is "
      f"approximated by a rank-{num_meta} product A @ B through {num_meta} meta-states (mean "
      f"visit-weighted KL to the true rows {float(np.mean(kl)):.3g} nats), so the value and "
      f"thresholds are those of the approximate model. Pass aggregate_above=None for the exact "
      f"solver (O(M K) memory, O(n M K^2) time).", UserWarning, stacklevel=3)
  return solve_recall_aggregated(agg, lam, precision=precision)


@functools.partial(jax.jit, static_argnums=(4, 5))
def solve_recall_on_grid(cascade: Cascade, lam, grid, pos, precision=DEFAULT_PRECISION,
                         x_chunk: int | None = None) -> RecallSolution:
  """The compiled line solver given the x-grid (:func:`~ttamer_jax.core.kernel.prepare_grid`).

  The one entry point of every line solve (``solve_recall``, sweeps, frontiers):
  inputs are trusted (validated at the boundary). ``grid`` ``[M]`` must be
  sorted and contain every entry of ``values`` (repeats allowed: padding with
  the maximum is how batches of cascades with different grids share one shape);
  ``pos`` ``[n, K]`` int32 is the first row of each ``values[i, s]`` in
  ``grid``. ``lam`` is traced: a new ``lam`` never recompiles. Vmappable over
  ``lam`` and over batches of all array arguments.
  """
  dtype = cascade.values.dtype
  lam = jnp.asarray(lam, dtype)
  grid = grid.astype(dtype)
  continuation = lambda g, t_mat: jnp.einsum("xt,st->xs", g, t_mat, precision=precision)
  v_first, index = kernel.backward_scan(
      lam * grid, grid, pos, cascade.values, (1 - lam) * cascade.costs[1:], cascade.trans,
      continuation, x_chunk=x_chunk)
  value = kernel.line_value(v_first, pos[0], cascade.init, (1 - lam) * cascade.costs[0], precision)
  return RecallSolution(value=value, index=index)


@functools.partial(jax.jit, static_argnums=(4, 5))
def solve_recall_lams(cascade: Cascade, lams, grid, pos, precision=DEFAULT_PRECISION,
                      with_index: bool = True) -> RecallSolution:
  """:func:`solve_recall_on_grid` for a batch ``lams [C]`` sharing one cascade and grid.

  The batch is folded into the tables: ``[C, M, K]`` for ``K >`` :data:`~ttamer_jax.core.kernel.SMALL_K`,
  so each stage is one ``(C M) x K`` by ``K x K`` matrix product instead of ``C`` small
  ones; ``[M, K, C]`` for smaller ``K``, where the expectation is ``K`` multiply-adds
  per entry vectorised over the lams (kernel's two layouts). Returns ``value [C]`` and ``index
  [C, n, K]`` (``None`` without ``with_index``). Trusted inputs, as
  :func:`solve_recall_on_grid`.
  """
  dtype = cascade.values.dtype
  lams = jnp.asarray(lams, dtype)
  grid = grid.astype(dtype)
  stage_costs = (1 - lams)[None, :] * cascade.costs[1:, None]                       # [n-1, C]
  batch_last = cascade.num_states <= kernel.SMALL_K
  if batch_last:
    # Tables [M, K, C]: E[G | s] as K multiply-adds per entry, vectorised over the lams.
    continuation = lambda g, t_mat: jnp.sum(t_mat.T[None, :, :, None] * g[:, :, None, :], axis=1)
    xs = grid[:, None] * lams[None, :]                                               # [M, C]
  else:
    continuation = lambda g, t_mat: jnp.einsum("...xt,st->...xs", g, t_mat, precision=precision)
    xs = lams[:, None] * grid[None, :]                                               # [C, M]
  v_first, index = kernel.backward_scan(
      xs, grid, pos, cascade.values, stage_costs, cascade.trans, continuation,
      with_index=with_index, batch_last=batch_last)
  value = kernel.line_value(v_first, pos[0], cascade.init, (1 - lams) * cascade.costs[0],
                            precision, batch_last)
  return RecallSolution(value=value, index=index)


def solve_no_recall(cascade: Cascade, lam, *, precision=DEFAULT_PRECISION) -> NoRecallSolution:
  """Optimal stopping without recall (answer = last consulted stage).

  ``W_n(s) = lam l_n(s)``; ``W_i(s) = min(lam l_i(s), (1-lam) c_{i+1} + trans_i W_{i+1})``.

  Args:
    cascade: the line, ``n`` stages of ``K`` states.
    lam: ``[]`` trade-off weight in [0, 1] (may be traced).
    precision: ``jax.lax.Precision`` of the matrix products.

  Returns:
    A :class:`~ttamer_jax.core.NoRecallSolution`: ``value []`` and the ``stop
    [n, K]`` bool table.
  """
  _check_inputs(cascade, lam)
  return solve_no_recall_compiled(cascade, lam, precision)


@functools.partial(jax.jit, static_argnums=(2,))
def solve_no_recall_compiled(cascade: Cascade, lam, precision=DEFAULT_PRECISION
                             ) -> NoRecallSolution:
  """The compiled no-recall recursion (trusted inputs; vmappable over ``lam`` and cascades)."""
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

  Args:
    cascade: the line, ``n`` stages of ``K`` states.
    lam: ``[]`` trade-off weight in [0, 1] (may be traced).
    chunk_size: breakpoints per forward pass (memory ``chunk_size * K``).
    precision: ``jax.lax.Precision`` of the matrix products.

  Returns:
    ``[]`` the hindsight optimum, a lower bound on every policy's objective.
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
