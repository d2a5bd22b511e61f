"""Fitting a cascade is counting, and counting is a matrix product (DESIGN.md section 11).

With ``A_i [N, K]`` the one-hot (or soft) state assignments of stage ``i`` and
``w [N]`` request weights::

    init      = smooth( w @ A_0 )
    trans_i   = smooth( A_i^T diag(w) A_{i+1} )                  (rows normalised)
    values_i  = ( A_i^T (w * loss_i) + m * mean_loss_i ) / ( A_i^T w + m )
    costs     = weighted mean stage costs / their sum              (unit-free lam)

:func:`fit_cascade_arrays` is that one pure function: it runs under ``jit``,
``vmap`` (over ``weights``: cross-fitting folds, bootstrap resamples) and, with
soft assignments, ``grad``. Every fit of the library -- :func:`ttamer_jax.fit_cascade`,
:func:`ttamer_jax.data.fit_cascade_from_states`, the relaxation's soft fit and the
batched selection -- counts through :func:`fitted_tables`.

Smoothing (``smoothing = a``): a row with counts ``C[t]`` becomes
``(C[t] + a * prior[t]) / (sum C + a * sum prior)``; ``prior`` is 1 on every
possible state (``"uniform"``: Laplace for ``a = 1``) or ``K`` times the next
stage's empirical state distribution (``"marginal"``). A row with no mass at all
falls back to the normalised prior. Losses are shrunk to the stage's mean loss with
``loss_smoothing`` pseudo-samples.

Padding is free: requests of weight 0 count for nothing, and states outside
``possible`` get zero probability (they are never entered), so folds, resamples
and candidates of different ``K`` share one compiled program.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.struct import trusted

PRIORS = ("uniform", "marginal")


def smoothed_rows(counts: chex.Array, smoothing, prior: chex.Array) -> chex.Array:
  """``(counts + a prior) / (row sum + a sum prior)``; rows with no mass get the prior."""
  num = counts + smoothing * prior
  total = num.sum(-1, keepdims=True)
  fallback = prior / jnp.maximum(prior.sum(-1, keepdims=True), jnp.finfo(prior.dtype).tiny)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, num / safe, jnp.broadcast_to(fallback, num.shape))


def marginal_prior(possible: chex.Array, mass: chex.Array) -> chex.Array:
  """``K`` times the empirical state distribution ``mass [K]`` on the possible states
  (the possible states themselves when nothing was seen)."""
  freq = mass * possible
  total = freq.sum()
  return jnp.where(total > 0, possible.sum() * freq / jnp.where(total > 0, total, 1.0), possible)


def _nonzero(x):
  return jnp.where(x > 0, x, 1.0)


def state_counts(assign: chex.Array, losses: chex.Array, weights: chex.Array):
  """``(counts [n, K], loss sums [n, K], pair counts [n-1, K, K])`` of soft or one-hot
  assignments ``[N, n, K]``: the products ``w @ A_i``, ``A_i^T (w * loss_i)`` and
  ``A_i^T diag(w) A_{i+1}`` (differentiable in ``assign``)."""
  weighted = assign * weights[:, None, None]                            # [N, n, K]
  counts = weighted.sum(0)
  # Two passes (sum, then the residuals about each state's mean): float32 sums of
  # many near-equal losses stay accurate to rounding of the mean, not N times it.
  mean = jnp.einsum("rik,ri->ik", weighted, losses) / _nonzero(counts)
  residual = jnp.einsum("rik,rik->ik", weighted, losses[:, :, None] - mean[None])
  pairs = jnp.einsum("rik,ril->ikl", weighted[:, :-1], assign[:, 1:])
  return counts, counts * mean + residual, pairs


def hard_state_counts(states: chex.Array, losses: chex.Array, weights: chex.Array, k: int):
  """:func:`state_counts` of int states ``[N, n]``: the same products with one-hot
  matrices, computed as segment sums (``O(N n)`` instead of ``O(N n K^2)``)."""
  n = states.shape[1]
  sum_into = lambda ids, x, size: jax.ops.segment_sum(x, ids, num_segments=size)
  counts = jnp.stack([sum_into(states[:, i], weights, k) for i in range(n)])
  # Two passes, as state_counts.
  mean = jnp.stack([sum_into(states[:, i], weights * losses[:, i], k)
                    for i in range(n)]) / _nonzero(counts)
  residual = jnp.stack([sum_into(states[:, i], weights * (losses[:, i] - mean[i, states[:, i]]), k)
                        for i in range(n)])
  sums = counts * mean + residual
  pairs = jnp.stack([sum_into(states[:, i] * k + states[:, i + 1], weights, k * k).reshape(k, k)
                     for i in range(n - 1)]) if n > 1 else jnp.zeros((0, k, k), weights.dtype)
  return counts, sums, pairs


def fitted_tables(assign: chex.Array, losses: chex.Array, weights: chex.Array,
                  possible: chex.Array, first_possible: chex.Array, smoothing,
                  loss_smoothing, marginal: bool = False, num_states: int | None = None):
  """``(values [n, K], init [K], trans [n-1, K, K], counts [n, K])`` of one fit.

  Args:
    assign: ``[N, n, K]`` state assignments (one-hot, or soft rows summing to 1), or
      ``[N, n]`` int states with ``num_states`` given.
    losses: ``[N, n]`` true losses.
    weights: ``[N]`` request weights (0: not counted, e.g. padding or a held-out fold).
    possible: ``[K]`` 1 on the states a stage can be in (0 on padding states).
    first_possible: ``[K]`` the states the first stage can be in.
    smoothing, loss_smoothing: pseudo-counts (module docstring); may be traced.
    marginal: static; ``prior="marginal"`` instead of ``"uniform"``.
    num_states: static ``K`` of int ``assign``.
  """
  dtype = jnp.result_type(float) if num_states is not None else assign.dtype
  w = weights.astype(dtype)
  losses = losses.astype(dtype)
  if num_states is not None:
    counts, sums, pairs = hard_state_counts(assign, losses, w, num_states)
  else:
    counts, sums, pairs = state_counts(assign, losses, w)
  total = jnp.maximum(w.sum(), jnp.finfo(dtype).tiny)
  first_pass = w @ losses / total
  stage_mean = (first_pass + w @ (losses - first_pass) / total)[:, None]  # [n, 1], two passes
  denom = counts + loss_smoothing
  values = jnp.where(denom > 0, (sums + loss_smoothing * stage_mean) / jnp.where(denom > 0, denom, 1),
                     stage_mean)
  # Padding states never occur; give them a loss already in the grid (state 0's).
  values = jnp.where(possible > 0, values, values[:, :1])
  first = first_possible.astype(dtype)
  possible = possible.astype(dtype)
  init_prior = marginal_prior(first, counts[0]) if marginal else first
  init = smoothed_rows(counts[0], smoothing, init_prior)
  if marginal:
    row_prior = jax.vmap(lambda m: marginal_prior(possible, m))(counts[1:])[:, None, :]
  else:
    row_prior = jnp.broadcast_to(possible, pairs.shape)
  trans = smoothed_rows(pairs, smoothing, row_prior)
  return values, init, trans, counts


def unit_free(stage_costs: chex.Array) -> chex.Array:
  """``stage_costs / stage_costs.sum()`` (all-zero costs stay zero): ``lam`` has no unit."""
  full = stage_costs.sum()
  return jnp.where(full > 0, stage_costs / jnp.where(full > 0, full, 1.0), 0.0)


def weighted_stage_costs(costs: chex.Array, weights: chex.Array) -> chex.Array:
  """``[n]`` mean stage costs: ``costs`` itself when ``[n]``, the weighted mean of ``[N, n]``."""
  if costs.ndim == 1:
    return costs
  w = weights.astype(costs.dtype)
  return w @ costs / jnp.maximum(w.sum(), jnp.finfo(costs.dtype).tiny)


def _is_soft(states) -> bool:
  return jnp.issubdtype(jnp.result_type(states), jnp.floating) and np.ndim(states) == 3


def fit_cascade_arrays(states: Any, losses: Any, costs: Any, num_states: int, *,
                       weights: Any = None, smoothing: Any = 1.0, loss_smoothing: Any = 1.0,
                       prior: str = "uniform") -> Cascade:
  """The cascade fitted to states already known, as one pure function of arrays.

  The same numbers as :func:`ttamer_jax.data.fit_cascade_from_states` (which calls
  this), but usable inside ``jit``, ``vmap`` (e.g. over ``weights`` for folds or
  bootstrap resamples) and ``grad`` (soft ``states``).

  Args:
    states: ``[N, n]`` int states in ``0..K-1``, or ``[N, n, K]`` soft assignments
      (rows summing to 1; differentiable).
    losses: ``[N, n]`` true losses (>= 0).
    costs: ``[n]`` or ``[N, n]`` costs (>= 0; per-request costs are averaged with
      ``weights``).
    num_states: static ``K``.
    weights: ``[N]`` request weights (default: all 1); 0 leaves a request out.
    smoothing: Dirichlet pseudo-count per possible cell of ``init``/``trans`` rows.
    loss_smoothing: pseudo-samples at the stage's mean loss in each state's loss.
    prior: static; ``"uniform"`` or ``"marginal"``.

  Returns:
    :class:`~ttamer_jax.Cascade` whose ``costs`` are shares of running every stage.

  Concrete inputs are validated (``ValueError`` naming the field); traced ones are
  trusted, as everywhere inside a transformation.
  """
  k = validation.check_positive_int("num_states", num_states)
  if prior not in PRIORS:
    raise ValueError(f"prior: must be one of {PRIORS}, got {prior!r}")
  soft = _is_soft(states)
  if all(validation.is_concrete(x) for x in (states, losses, costs, weights, smoothing,
                                              loss_smoothing)):
    _check_arrays(states, losses, costs, weights, smoothing, loss_smoothing, k, soft)
  dtype = jnp.result_type(float)
  assign = jnp.asarray(states, dtype) if soft else jnp.asarray(states, jnp.int32)
  losses = jnp.asarray(losses, dtype)
  num = losses.shape[0]
  w = jnp.ones(num, dtype) if weights is None else jnp.asarray(weights, dtype)
  ones = jnp.ones(k, dtype)
  values, init, trans, _ = fitted_tables(assign, losses, w, ones, ones, smoothing, loss_smoothing,
                                         prior == "marginal", None if soft else k)
  stage_costs = weighted_stage_costs(jnp.asarray(costs, dtype), w)
  return trusted(Cascade, values=values, init=init, trans=trans, costs=unit_free(stage_costs))


def _check_arrays(states, losses, costs, weights, smoothing, loss_smoothing, k, soft):
  for name, v in (("smoothing", smoothing), ("loss_smoothing", loss_smoothing)):
    validation.as_nonnegative_scalar(name, v)
  if soft:
    st = validation.as_numpy("states", states, ndim=3)
    if st.shape[-1] != k:
      raise ValueError(f"states: soft assignments have {st.shape[-1]} states, num_states = {k}")
    validation.check_finite("states", st)
    if np.any(st < 0) or not np.allclose(st.sum(-1), 1.0, atol=1e-4):
      raise ValueError("states: soft assignments must be >= 0 with rows summing to 1")
  else:
    st = validation.as_numpy("states", states, ndim=2, kind="int")
    validation.check_int_range("states", st, 0, k)
  num, n = st.shape[:2]
  if num < 1 or n < 1:
    raise ValueError(f"states: expected N, n >= 1, got shape {st.shape}")
  lo = validation.as_numpy("losses", losses, ndim=2)
  validation.check_shape("losses", lo, (num, n))
  validation.check_finite("losses", lo)
  if np.any(lo < 0):
    raise ValueError("losses: must be >= 0")
  co = validation.as_numpy("costs", costs)
  if co.shape not in ((n,), (num, n)):
    raise ValueError(f"costs: expected shape ({n},) or ({num}, {n}), got {co.shape}")
  validation.check_finite("costs", co)
  if np.any(co < 0):
    raise ValueError("costs: must be >= 0")
  if weights is not None:
    w = validation.as_numpy("weights", weights, ndim=1)
    validation.check_shape("weights", w, (num,))
    validation.check_finite("weights", w)
    if np.any(w < 0):
      raise ValueError("weights: must be >= 0")
    if not np.any(w > 0):
      raise ValueError("weights: all zero (no request counted)")
