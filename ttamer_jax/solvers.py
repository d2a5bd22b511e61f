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


def _check_inputs(cascade: Cascade, lam: Any) -> None:
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  validation.check_lam(lam)
  if validation.is_concrete(lam) and np.ndim(lam) != 0:
    raise ValueError(f"lam: expected a scalar, got shape {np.shape(lam)} (vmap over lam for a sweep)")


def solve_recall(cascade, lam, *, precision=DEFAULT_PRECISION):
  """Optimal policy with recall by backward dynamic programming.

  On a :class:`~ttamer_jax.routing.RoutingGraph` this dispatches to the graph
  solver (:func:`ttamer_jax.routing.solve_graph_recall`).

  Args:
    cascade: a :class:`Cascade` (or a ``RoutingGraph``).
    lam: scalar trade-off weight in ``[0, 1]``.
    precision: matmul precision (``HIGHEST`` keeps float32 exact-ish on GPUs).

  Returns:
    :class:`RecallSolution`.
  """
  from ttamer_jax import routing  # routing builds on this module.
  if isinstance(cascade, routing.RoutingGraph):
    return routing.solve_graph_recall(cascade, lam, precision=precision)
  _check_inputs(cascade, lam)
  return _solve_recall(cascade, lam, grid_size_for(cascade.values), precision)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _solve_recall(cascade: Cascade, lam, grid_size: int, precision) -> RecallSolution:
  values, trans, costs = cascade.values, cascade.trans, cascade.costs
  n, k = values.shape
  lam = jnp.asarray(lam, values.dtype)
  grid = value_grid(values, grid_size)           # [M] unscaled
  xs = lam * grid                                # [M] best-so-far candidates
  pos = jnp.searchsorted(grid, values)           # [n, K] grid row of each l_i(s)

  def backward(v_next, stage):
    t_mat, l_next, p_next, c_next = stage
    # G[x, t] = V_{i+1}(min(x, l_{i+1}(t)), t): x itself while x <= l(t), else the
    # row of l(t) -- a select against one gathered row instead of a full gather.
    at_l = jnp.take_along_axis(v_next, p_next[None, :], axis=0)          # [1, K]
    g = jnp.where(grid[:, None] <= l_next[None, :], v_next, at_l)         # [M, K]
    cont = (1 - lam) * c_next + jnp.einsum(
        "xt,st->xs", g, t_mat, precision=precision)                       # [M, K]
    stop = xs[:, None] <= cont
    sigma = jnp.max(jnp.where(stop, xs[:, None], -jnp.inf), axis=0)       # [K]
    return jnp.minimum(xs[:, None], cont), sigma

  v_last = jnp.broadcast_to(xs[:, None], (grid_size, k))
  v_first, sigmas = jax.lax.scan(
      backward, v_last, (trans, values[1:], pos[1:], costs[1:]), reverse=True)
  index = jnp.concatenate([sigmas, jnp.full((1, k), jnp.inf, values.dtype)], axis=0)
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
