"""Accuracy/cost frontiers: sweeps, Pareto fronts, area between frontiers.

* :func:`sweep_recall` / :func:`sweep_no_recall`: solve the fitted model for a
  vector of ``lam`` (one batched solve) and replay every policy on held-out traces
  (:func:`~ttamer_jax.core.replay.replay_totals`: blocks of requests, memory bounded).
* :func:`sweep_policies`: replay a batched heuristic (leaves with a leading grid
  axis, e.g. from :func:`confidence_grid`) over its whole parameter grid in one call.
* :func:`pareto_front`, :func:`frontier_gap` (area between two staircase
  frontiers), :func:`tuned_objective` (pick a grid point on one split, score it on
  another), :func:`cheapest_within` (least cost within a tolerance of an error).
* :func:`hindsight_sweep`: the per-request oracle over a ``lam`` grid (not deployable).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import heuristics, kernel, validation
from ttamer_jax.core.kernel import DEFAULT_PRECISION
from ttamer_jax.core.policies import NoRecallPolicy, RecallPolicy
from ttamer_jax.core.protocol import check_line_policy
from ttamer_jax.core.replay import replay_totals_trusted
from ttamer_jax.core.solvers import solve_no_recall_compiled, solve_recall_lams
from ttamer_jax.core.struct import pytree_dataclass, trusted
from ttamer_jax.data.discretise import trace_scores
from ttamer_jax.data.fitting import FittedCascade
from ttamer_jax.data.traces import ExitTraces


@pytree_dataclass
class ReplaySweep:
  """Held-out outcome of a family of policies, one row per parameter value.

  Attributes:
    param: ``[P]`` the swept parameter (``lam``, a threshold, a patience, ...).
    error: ``[P]`` mean true loss of the answered stage.
    cost: ``[P]`` mean cost (raw units).
    cost_norm: ``[P]`` ``cost`` / mean cost of running every stage.
    stop_histogram: ``[P, n]`` fraction of requests stopping after each stage.
    answer_histogram: ``[P, n]`` fraction answered by each stage.
    recalled_histogram: ``[P, n]`` fraction answered by each stage although a later
      stage was consulted (recall: the answer is an earlier exit than the last one
      run); zero for policies that answer with the last stage they consult. ``None``
      when not recorded.
  """

  param: chex.Array
  error: chex.Array
  cost: chex.Array
  cost_norm: chex.Array
  stop_histogram: chex.Array
  answer_histogram: chex.Array
  recalled_histogram: chex.Array | None = None

  def objective(self, lam) -> chex.Array:
    """``[P]`` unit-free ``J = lam * error + (1 - lam) * cost_norm``."""
    return lam * self.error + (1 - lam) * self.cost_norm

  def rows(self) -> list[dict]:
    return [dict(param=float(p), error=float(e), cost=float(c), cost_norm=float(cn))
            for p, e, c, cn in zip(*(np.asarray(x) for x in (self.param, self.error, self.cost,
                                                             self.cost_norm)))]


# The one lam grid of the library's sweeps: ttamer fit's operating points (selection),
# the demo's and `ttamer sweep`'s frontiers. A lam sweep reaches only the vertices of
# the fitted model's convex frontier, and near lam = 1 one point of error trades against
# a few percent of cost, so 41 even values get 16 more in [0.98, 0.9999]. Selection
# replays every candidate x fold at each value: 230 values made it 3x slower.
LAMS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 41), 1.0 - np.geomspace(1e-4, 2e-2, 16)]))


# What a frontier sweep called inside jit names instead (docs/jit.md): they sum on the
# host (replay_totals) and bin with quantiles.
JIT_SWEEP = ("inside jit, jax.vmap ttamer_jax.recall_policy (or a heuristic) over lam and replay "
             "the states with ttamer_jax.replay (docs/jit.md)")


def _check_traces(traces, n):
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  if traces.num_stages != n:
    raise ValueError(f"traces: have {traces.num_stages} stages, the policies {n}")


def _finish(param, loss, cost, stop_h, ans_h, rec_h, traces) -> ReplaySweep:
  full = float(np.asarray(traces.cost_matrix(), np.float64).sum(axis=1).mean())
  cost = np.asarray(cost, np.float64)
  return ReplaySweep(param=np.asarray(param), error=np.asarray(loss, np.float64), cost=cost,
                     cost_norm=cost / full if full > 0 else np.zeros_like(cost),
                     stop_histogram=np.asarray(stop_h), answer_histogram=np.asarray(ans_h),
                     recalled_histogram=np.asarray(rec_h))


def _lams(lams):
  lams = validation.as_numpy("lams", lams, ndim=1)
  if lams.size == 0:
    raise ValueError("lams: empty")
  validation.check_lam(lams)
  return lams


@functools.partial(jax.jit, static_argnums=(4,))
def _line_policies(cascade, lams, grid, pos, recall: bool):
  """The optimal policies of every ``lam`` (leading axis ``L``): recall ones from one
  batched solve (``lam`` folded into each stage's matrix product)."""
  lams = lams.astype(cascade.values.dtype)
  if recall:
    index = solve_recall_lams(cascade, lams, grid, pos).index
    return trusted(RecallPolicy, index=index, values=cascade.values, lam=lams)
  stop = jax.vmap(lambda lam: solve_no_recall_compiled(cascade, lam, DEFAULT_PRECISION).stop)(lams)
  return trusted(NoRecallPolicy, stop=stop)


def _grid_stats(policies, states, losses, costs, scores, preds, policy_axes=0):
  tot = replay_totals_trusted(policies, states, losses, costs, scores, preds, policy_axes=policy_axes)
  num = tot.num
  return (tot.loss / num, tot.cost / num, tot.stop_counts / num, tot.answer_counts / num,
          tot.recalled_counts / num)


def _sweep(fitted: FittedCascade, traces: ExitTraces, lams, recall: bool) -> ReplaySweep:
  validation.refuse_traced("sweep_recall" if recall else "sweep_no_recall", JIT_SWEEP,
                           fitted=fitted, traces=traces, lams=lams)
  if not isinstance(fitted, FittedCascade):
    raise ValueError(f"fitted: expected a FittedCascade, got {type(fitted).__name__}")
  lams = _lams(lams)
  _check_traces(traces, fitted.cascade.num_stages)
  states = fitted.discretiser(trace_scores(traces, fitted.score_name), traces.preds)
  grid, pos = kernel.prepare_grid(fitted.cascade.values)
  policies = _line_policies(fitted.cascade, jnp.asarray(lams, fitted.cascade.values.dtype), grid,
                            pos, recall)
  out = _grid_stats(policies, states, traces.losses, traces.costs, None, traces.preds,
                    RecallPolicy.lam_grid_axes() if recall else 0)
  return _finish(lams, *out, traces)


def sweep_recall(fitted: FittedCascade, traces: ExitTraces, lams: Any) -> ReplaySweep:
  """Recall-optimal policies of ``fitted`` for every ``lam`` replayed on ``traces``
  (one batched solve, then every policy replayed in blocks of requests).

  Args:
    fitted: the :class:`~ttamer_jax.data.FittedCascade` the policies solve.
    traces: held-out :class:`ExitTraces`.
    lams: ``[L]`` trade-off weights.

  Returns:
    A :class:`~ttamer_jax.evaluation.ReplaySweep` with ``param [L]`` (the lams) and
    ``[L]`` error, cost and normalised cost.
  """
  return _sweep(fitted, traces, lams, True)


def sweep_no_recall(fitted: FittedCascade, traces: ExitTraces, lams: Any) -> ReplaySweep:
  """The no-recall optimum of ``fitted`` for every ``lam`` replayed on ``traces``."""
  return _sweep(fitted, traces, lams, False)


def sweep_policies(policies, params: Any, traces: ExitTraces, *, score_name: str | None = None
                   ) -> ReplaySweep:
  """Replays a batched heuristic over its whole grid on ``traces`` in one call.

  Args:
    policies: a heuristic from :mod:`ttamer_jax.core.heuristics` whose array leaves have
      a leading grid axis of size ``P``.
    params: ``[P]`` the parameter reported for each grid point.
    traces: the traces to replay on.
    score_name: the signal the heuristic reads (default: primary scores).
  """
  validation.refuse_traced("sweep_policies", JIT_SWEEP, policies=policies, params=params,
                           traces=traces)
  params = validation.as_numpy("params", params, ndim=1)
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(policies)}
  if sizes != {params.shape[0]}:
    raise ValueError(f"policies: leading grid axes {sorted(sizes)} must all equal len(params) = "
                     f"{params.shape[0]}")
  check_line_policy(policies, "policies")
  if policies.observes in ("states", "true_losses"):
    raise ValueError(f"policies: {type(policies).__name__} is not a score-reading heuristic")
  _check_traces(traces, policies.num_stages)
  scores = trace_scores(traces, score_name)
  states = np.zeros(np.shape(traces.scores), np.int32)
  out = _grid_stats(policies, states, traces.losses, traces.costs, scores, traces.preds)
  return _finish(params, *out, traces)


def hindsight_sweep(traces: ExitTraces, lams: Any) -> ReplaySweep:
  """The per-request oracle for every ``lam`` on ``traces`` (not deployable).

  Each request stops where :func:`~ttamer_jax.hindsight_policy` would (same
  rule, :func:`ttamer_jax.core.heuristics.hindsight_stops`) and is answered by
  its consulted stage of least true loss (the earliest on ties).
  """
  validation.refuse_traced("hindsight_sweep", "inside jit, ttamer_jax.prophet_value is the "
                           "hindsight optimum of a model (docs/jit.md)", traces=traces, lams=lams)
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  lams = _lams(lams)
  losses = np.asarray(traces.losses, np.float64)
  costs = np.asarray(traces.costs, np.float64)
  stops = heuristics.hindsight_stops(losses, costs, lams)                    # [L, N]
  n = losses.shape[1]
  rows = np.arange(losses.shape[0])
  cum = np.cumsum(np.broadcast_to(costs, losses.shape), axis=1)
  err, cost, stop_h, ans_h, rec_h = [], [], [], [], []
  for stop in stops:
    answer = np.argmin(np.where(np.arange(n)[None, :] <= stop[:, None], losses, np.inf), axis=1)
    err.append(losses[rows, answer].mean())
    cost.append(cum[rows, stop].mean())
    stop_h.append(np.bincount(stop, minlength=n) / stop.size)
    ans_h.append(np.bincount(answer, minlength=n) / answer.size)
    rec_h.append(np.bincount(answer[answer < stop], minlength=n) / answer.size)
  return _finish(lams, np.asarray(err), np.asarray(cost), np.asarray(stop_h), np.asarray(ans_h),
                 np.asarray(rec_h), traces)


# ------------------------------------------------------------------ grids
JIT_GRID = ("build the grid outside jit; inside it, a heuristic takes traced thresholds "
            "(ttamer_jax.confidence_threshold, ttamer_jax.per_stage_thresholds)")


def _levels(num: int) -> np.ndarray:
  return np.linspace(0.0, 1.0, validation.check_positive_int("num", num))


def _pooled_thresholds(scores: np.ndarray, num: int) -> np.ndarray:
  t = np.quantile(scores.reshape(-1), _levels(num))
  return np.unique(np.concatenate([[-np.inf], t, [np.inf]]))


def confidence_grid(traces: ExitTraces, score_name: str | None = None, num: int = 64):
  """One threshold for every stage (``score >= t``) at quantiles of the pooled scores
  (plus ``-inf``/``+inf``: always the first / always the last exit)."""
  validation.refuse_traced("confidence_grid", JIT_GRID, traces=traces)
  t = _pooled_thresholds(np.asarray(trace_scores(traces, score_name)), num)
  n = traces.num_stages
  return heuristics.ThresholdPolicy(thresholds=np.repeat(t[:, None], n, 1), direction="above"), t


def entropy_grid(traces: ExitTraces, score_name: str | None = "entropy", num: int = 64):
  """One entropy threshold for every stage (``score <= t``)."""
  validation.refuse_traced("entropy_grid", JIT_GRID, traces=traces)
  t = _pooled_thresholds(np.asarray(trace_scores(traces, score_name)), num)
  n = traces.num_stages
  return heuristics.ThresholdPolicy(thresholds=np.repeat(t[:, None], n, 1), direction="below"), t


def per_stage_grid(traces: ExitTraces, score_name: str | None = None, num: int = 64,
                   direction: str = "above"):
  """Per-stage thresholds at a common quantile level ``q`` of each stage's own scores
  (exit at stage i iff its score is in stage i's top ``1 - q``); ``params`` = ``q``."""
  validation.refuse_traced("per_stage_grid", JIT_GRID, traces=traces)
  scores = np.asarray(trace_scores(traces, score_name), np.float64)
  levels = _levels(num)
  t = np.quantile(scores, levels, axis=0)                          # [P, n]
  # Open the ends so the grid spans "always exit first" to "never exit early".
  t[0], t[-1] = -np.inf, np.inf
  return heuristics.ThresholdPolicy(thresholds=t, direction=direction), levels


def patience_grid(num_stages: int):
  """Patience ``1..n`` (``n``: effectively the full model unless all exits agree)."""
  p = np.arange(1, validation.check_positive_int("num_stages", num_stages) + 1)
  return heuristics.PatiencePolicy(patience=p, num_stages=num_stages), p


def fixed_exit_grid(num_stages: int):
  k = np.arange(validation.check_positive_int("num_stages", num_stages))
  return heuristics.FixedExitPolicy(exit_stage=k, num_stages=num_stages), k


def heuristic_sweeps(calibration: ExitTraces, traces: ExitTraces, *,
                     confidence_score: str | None = None, entropy_score: str | None = None,
                     num: int = 64) -> dict[str, ReplaySweep]:
  """Every heuristic over its grid (thresholds from ``calibration``) replayed on ``traces``.

  Keys: ``"confidence"``, ``"per_stage"`` (on ``confidence_score``), ``"entropy"``
  (when ``entropy_score`` is given), ``"patience"``, ``"fixed_exit"``.
  """
  validation.refuse_traced("heuristic_sweeps", JIT_SWEEP, calibration=calibration, traces=traces)
  n = calibration.num_stages
  grids = {"confidence": (confidence_grid(calibration, confidence_score, num), confidence_score),
           "per_stage": (per_stage_grid(calibration, confidence_score, num), confidence_score)}
  if entropy_score is not None:
    grids["entropy"] = (entropy_grid(calibration, entropy_score, num), entropy_score)
  grids["patience"] = (patience_grid(n), None)
  grids["fixed_exit"] = (fixed_exit_grid(n), None)
  return {name: sweep_policies(pol, params, traces, score_name=score)
          for name, ((pol, params), score) in grids.items()}


# ------------------------------------------------------------------ frontiers
def pareto_front(cost: Any, error: Any) -> np.ndarray:
  """Indices of the non-dominated ``(cost, error)`` points, by increasing cost.

  A point is dominated when another has cost ``<=`` and error ``<=`` with one
  strict; of identical points the first is kept.
  """
  cost = validation.as_numpy("cost", cost, ndim=1).astype(np.float64)
  error = validation.as_numpy("error", error, ndim=1).astype(np.float64)
  validation.check_shape("error", error, cost.shape)
  validation.check_finite("cost", cost)
  validation.check_finite("error", error)
  order = np.lexsort((np.arange(cost.size), error, cost))
  keep, best = [], np.inf
  for i in order:
    if error[i] < best:
      keep.append(i)
      best = error[i]
  return np.asarray(keep, np.int64)


def staircase(cost: Any, error: Any, at: Any) -> np.ndarray:
  """Least error reachable with cost ``<= at`` (``inf`` below the cheapest point)."""
  idx = pareto_front(cost, error)
  c, e = np.asarray(cost, np.float64)[idx], np.asarray(error, np.float64)[idx]
  pos = np.searchsorted(c, np.asarray(at, np.float64), side="right") - 1
  return np.where(pos >= 0, e[np.maximum(pos, 0)], np.inf)


@pytree_dataclass
class FrontierGap:
  """Area between two staircase frontiers ``b - a`` over a common cost range.

  Attributes:
    area: ``[]`` ``integral (err_b(c) - err_a(c)) dc`` over ``[low, high]``
      (positive: ``a`` reaches lower error at equal cost).
    mean_gap: ``[]`` ``area / (high - low)``: the average error difference.
    low: ``[]``; high: ``[]`` the cost range (both frontiers defined on it).
  """

  area: chex.Array
  mean_gap: chex.Array
  low: chex.Array
  high: chex.Array


def frontier_gap(cost_a: Any, error_a: Any, cost_b: Any, error_b: Any, *,
                 cost_range: Any = None) -> FrontierGap:
  """Exact area between the staircases of two point sets (see :class:`FrontierGap`).

  The default range runs from the larger of the two cheapest costs (where both
  frontiers exist) to the largest cost of either set.
  """
  ca = validation.as_numpy("cost_a", cost_a, ndim=1).astype(np.float64)
  cb = validation.as_numpy("cost_b", cost_b, ndim=1).astype(np.float64)
  for name, c, e in (("a", ca, error_a), ("b", cb, error_b)):
    if c.size < 1:
      raise ValueError(f"cost_{name}: empty frontier (need at least one point)")
    validation.check_finite(f"cost_{name}", c)
    e = validation.as_numpy(f"error_{name}", e, ndim=1)
    validation.check_shape(f"error_{name}", e, c.shape)
    validation.check_finite(f"error_{name}", e)
  if cost_range is None:
    low, high = max(ca.min(), cb.min()), max(ca.max(), cb.max())
  else:
    rng = validation.as_numpy("cost_range", cost_range, ndim=1).astype(np.float64)
    validation.check_shape("cost_range", rng, (2,))
    validation.check_finite("cost_range", rng)
    low, high = float(rng[0]), float(rng[1])
    if low < max(ca.min(), cb.min()):
      raise ValueError(f"cost_range: low {low} is below the cheapest point of a frontier")
  if not high > low:
    return FrontierGap(area=np.asarray(0.0), mean_gap=np.asarray(0.0), low=np.asarray(low),
                       high=np.asarray(high))
  cuts = np.unique(np.concatenate([[low, high], ca[(ca > low) & (ca < high)], cb[(cb > low) & (cb < high)]]))
  left = cuts[:-1]
  diff = staircase(cb, error_b, left) - staircase(ca, error_a, left)
  area = float(np.sum(diff * np.diff(cuts)))
  return FrontierGap(area=np.asarray(area), mean_gap=np.asarray(area / (high - low)),
                     low=np.asarray(low), high=np.asarray(high))


def tuned_objective(calibration: ReplaySweep, held_out: ReplaySweep, lam) -> tuple[int, float]:
  """``(index, held-out objective)`` of the grid point best on ``calibration`` at ``lam``."""
  validation.check_scalar_lam(lam)
  if np.shape(calibration.param) != np.shape(held_out.param):
    raise ValueError("calibration and held_out sweeps must share one grid")
  i = int(np.argmin(np.asarray(calibration.objective(lam))))
  return i, float(np.asarray(held_out.objective(lam))[i])


def cheapest_within(cost: Any, error: Any, reference_error: float,
                    tolerance: float) -> tuple[int, bool]:
  """``(index, met)``: the cheapest grid point whose error is within ``tolerance`` of
  ``reference_error`` (``met`` true), else the point of least error (``met`` false).

  The one rule behind an operating point ("least cost within one point of the full
  model's error") and ``ttamer fit --lam auto``. ``cost`` and ``error`` are ``[P]``
  values of one grid (e.g. a :class:`ReplaySweep`'s ``cost_norm`` and ``error``);
  ties go to the first point. Compared in the arrays' own dtype.
  """
  cost = validation.as_numpy("cost", cost, ndim=1)
  error = validation.as_numpy("error", error, ndim=1)
  validation.check_shape("error", error, cost.shape)
  if cost.size < 1:
    raise ValueError("cost: empty grid (need at least one point)")
  ok = np.flatnonzero(error <= reference_error + tolerance)
  if ok.size:
    return int(ok[np.argmin(cost[ok])]), True
  return int(np.argmin(error)), False
