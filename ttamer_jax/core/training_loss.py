"""The serving cost of what would be deployed, as a differentiable training loss.

``fit_policy`` deploys a policy built from three ingredients: a per-exit *signal*
(max-softmax, or a learned error head's output), the deployed discretiser's bin
*edges* over that signal, and the per-exit 0/1 *loss*, with costs as shares of the
full network (``lam`` has no unit). :func:`serving_loss` keeps all three and relaxes
only what has no gradient:

* a request's bin becomes a soft membership, ``sigmoid((s - e_{k-1}) / w) -
  sigmoid((s - e_k) / w)`` (rows sum to one; as ``w -> 0`` it is the deployed bin);
* the cascade is fitted to those memberships by the same counting as ``fit_cascade``
  (:func:`ttamer_jax.fit_cascade_arrays`);
* its recall value is the soft-min DP (:func:`ttamer_jax.soft_solve_recall`).

The gradient reaches the network through the signals: moving a request's signal across
an edge moves its loss into another bin, so the term rewards signals that separate
right from wrong answers at the edges the policy uses. With the 0/1 loss it does *not*
reach the logits through the loss itself (0/1 has no gradient); pass a smooth loss
(``1 - p(label)``) for that. At initialisation an exit whose signals all sit far from
the edges (e.g. max-softmax ~ 1/C against edges fitted on a trained network) gets
almost no gradient (~sigmoid' of many widths): train with the exit losses alone first
(a warm-up), then fit the edges and add the term -- see docs/training.md.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import counting, relaxation, validation

DEFAULT_WIDTH = 0.5       # soft-edge width, as a fraction of the stage's mean gap between edges
SINGLE_EDGE_WIDTH = 0.05  # the width (in signal units) when a stage has one edge: no gap to scale by


def soft_bins(signals: chex.Array, edges: chex.Array, width: chex.Array) -> chex.Array:
  """``[B, n, K]`` soft memberships of the bins ``edges`` cut the signals into.

  Args:
    signals: ``[B, n]`` per-exit signals.
    edges: ``[n, K-1]`` sorted inner edges per exit (a deployed ``Discretiser.edges``).
    width: ``[n]`` (or scalar) > 0 softness per exit, in signal units.

  Returns:
    ``[B, n, K]``: membership of bin ``k`` = ``P(e_{k-1} <= s < e_k)`` under logistic
    noise of scale ``width`` (``e_0 = -inf``, ``e_K = inf``); each row sums to one.
  """
  width = jnp.broadcast_to(jnp.asarray(width, signals.dtype), edges.shape[:1])
  above = jax.nn.sigmoid((signals[..., None] - edges) / width[:, None])        # [B, n, K-1]
  ones = jnp.ones(above.shape[:-1] + (1,), above.dtype)
  upper = jnp.concatenate([ones, above], axis=-1)           # P(s >= e_{k-1})
  lower = jnp.concatenate([above, jnp.zeros_like(ones)], axis=-1)  # P(s >= e_k)
  return upper - lower


def default_widths(edges: chex.Array) -> chex.Array:
  """``[n]`` soft-edge widths: :data:`DEFAULT_WIDTH` x each stage's mean gap between
  its edges (:data:`SINGLE_EDGE_WIDTH` where a stage has one edge or all edges tie).

  Args:
    edges: ``[n, K-1]`` sorted edges (may be traced).

  Returns:
    ``[n]`` widths > 0.
  """
  edges = jnp.asarray(edges)
  if edges.shape[1] < 2:
    return jnp.full(edges.shape[:1], SINGLE_EDGE_WIDTH, edges.dtype)
  gap = (edges[:, -1] - edges[:, 0]) / (edges.shape[1] - 1)
  return jnp.where(gap > 0, DEFAULT_WIDTH * gap, SINGLE_EDGE_WIDTH).astype(edges.dtype)


def quantile_edges(signals: chex.Array, num_states: int) -> chex.Array:
  """``[n, K-1]`` the edges ``fit_policy``'s quantile discretiser would put on these signals.

  Usable inside ``jit``: refitting the edges to each batch's signals gives the term the
  bins the network would be deployed with now (wrap in ``jax.lax.stop_gradient``).

  Args:
    signals: ``[B, n]`` per-exit signals.
    num_states: static ``K >= 2``.

  Returns:
    ``[n, K-1]`` the ``1/K, ..., (K-1)/K`` quantiles of each exit's signals (NumPy's
    default, linear interpolation, as ``fit_discretiser(..., binning="quantile")``).
  """
  k = validation.check_positive_int("num_states", num_states)
  if k < 2:
    raise ValueError(f"num_states = {k} must be >= 2 (one bin has no edges)")
  levels = jnp.arange(1, k, dtype=jnp.result_type(float)) / k
  return jnp.quantile(signals, levels, axis=0).T


def exit_outcomes(logits: chex.Array, labels: chex.Array) -> tuple[chex.Array, chex.Array]:
  """The deployed ingredients an early-exit network's logits give.

  Args:
    logits: ``[B, n, C]`` per-exit class logits.
    labels: ``[B]`` int labels.

  Returns:
    ``(confidence [B, n], error [B, n])``: max-softmax (the default exit signal) and the
    0/1 loss (``argmax != label``, no gradient), as ``fit_policy`` scores them.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  wrong = jnp.argmax(logits, axis=-1) != labels[:, None]
  return probs.max(-1), jax.lax.stop_gradient(wrong.astype(probs.dtype))


def _check(signals, losses, costs, edges, lam, beta, width):
  validation.check_scalar_lam(lam)
  concrete = [x for x in (signals, losses, costs, edges, beta, width) if x is not None]
  if not all(validation.is_concrete(x) for x in concrete):
    return
  s = validation.as_numpy("signals", signals, ndim=2)
  validation.check_finite("signals", s)
  loss = validation.as_numpy("losses", losses, ndim=2)
  validation.check_shape("losses", loss, s.shape)
  validation.check_finite("losses", loss)
  validation.check_nonnegative("losses", loss)
  c = validation.as_numpy("costs", costs, ndim=1)
  validation.check_shape("costs", c, s.shape[1:])
  validation.check_finite("costs", c)
  validation.check_nonnegative("costs", c)
  e = validation.as_numpy("edges", edges, ndim=2)
  if e.shape[0] != s.shape[1] or e.shape[1] < 1:
    raise ValueError(f"edges: expected shape [{s.shape[1]}, K-1] with K >= 2 (one row per exit), "
                     f"got {list(e.shape)}")
  validation.check_finite("edges", e)
  if (np.diff(e, axis=1) < 0).any():
    raise ValueError("edges: must be non-decreasing along each exit (a Discretiser's edges)")
  b = validation.as_float_scalar("beta", beta)
  if not b >= 0:
    raise ValueError(f"beta = {b!r} must be >= 0")
  if width is not None:
    w = validation.as_numpy("width", width)
    if w.ndim > 1 or (w.ndim == 1 and w.shape != (s.shape[1],)):
      raise ValueError(f"width: expected a scalar or shape [{s.shape[1]}], got {list(w.shape)}")
    if not (np.isfinite(w).all() and (w > 0).all()):
      raise ValueError(f"width: must be finite and > 0, got {w.tolist()}")


def serving_loss(signals: chex.Array, losses: chex.Array, costs: chex.Array, edges: chex.Array,
                 lam: Any, *, beta: Any = 0.01, width: Any = None, smoothing: Any = 1.0
                 ) -> chex.Array:
  """Differentiable ``J*`` of the recall policy fitted to this batch with the deployed bins.

  The value the exact recall policy would reach on this batch if the batch were its
  calibration set, with the deployed discretiser's edges (made soft), the deployed loss
  and unit-free costs (module docstring). ``lam`` may be traced (schedule it without
  recompiling); costs in any unit give the same value and gradient.

  Args:
    signals: ``[B, n]`` the exit signal the deployed policy reads (e.g. the confidence
      of :func:`exit_outcomes`, or an error head's ``sigmoid`` output).
    losses: ``[B, n]`` per-exit loss >= 0 (0/1 error as deployed, or a smooth surrogate).
    costs: ``[n]`` stage costs >= 0 in any unit (divided by their sum).
    edges: ``[n, K-1]`` the deployed ``Discretiser.edges`` (e.g.
      ``fit_policy(...).deployed.discretiser.edges``), ``K >= 2``.
    lam: weight of the loss, in ``[0, 1]``; may be traced.
    beta: soft-min temperature >= 0 (``0``: the exact DP's value, kinked).
    width: soft-edge width, scalar or ``[n]``, in signal units (default
      :func:`default_widths` of ``edges``).
    smoothing: pseudo-counts of the fit, as ``fit_cascade``'s.

  Returns:
    ``[]`` the soft recall value ``J_soft`` (within ``(n - 1) beta log 2`` of the fitted
    cascade's exact ``J*`` for hard memberships).

  Raises:
    ValueError: for concrete inputs, a ``lam`` outside ``[0, 1]``, non-finite signals,
      losses, costs or edges, negative losses or costs, unsorted edges or shapes that do
      not match (traced inputs are trusted, as everywhere inside ``jit``).
  """
  _check(signals, losses, costs, edges, lam, beta, width)
  signals = jnp.asarray(signals)
  dtype = jnp.result_type(signals.dtype, jnp.float32)
  signals = signals.astype(dtype)
  edges = jnp.asarray(edges, dtype)
  width = default_widths(edges) if width is None else width
  assign = soft_bins(signals, edges, jnp.asarray(width, dtype))
  cascade = counting.fit_cascade_arrays(assign, jnp.asarray(losses, dtype),
                                        jnp.asarray(costs, dtype), edges.shape[1] + 1,
                                        smoothing=smoothing, loss_smoothing=smoothing)
  return relaxation.soft_solve_recall(cascade, jnp.asarray(lam, dtype), jnp.asarray(beta, dtype))
