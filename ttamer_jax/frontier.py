"""Accuracy/cost frontiers: sweeps, Pareto fronts, area between frontiers.

* :func:`sweep_recall` / :func:`sweep_no_recall`: solve the fitted model for a
  vector of ``lam`` and replay every policy on held-out traces -- one jitted,
  ``vmap``-ed call.
* :func:`sweep_policies`: replay a batched heuristic (leaves with a leading grid
  axis, e.g. from :func:`confidence_grid`) over its whole parameter grid in one call.
* :func:`pareto_front`, :func:`frontier_gap` (area between two staircase
  frontiers), :func:`tuned_objective` (pick a grid point on one split, score it on
  another).
* :func:`overthinking_cascade` and :func:`workload_traces`: the built-in workload
  of ``scripts/frontier.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax import baselines, validation
from ttamer_jax._struct import pytree_dataclass
from ttamer_jax.discretise import trace_scores
from ttamer_jax.fitting import FittedCascade
from ttamer_jax.model import Cascade
from ttamer_jax.policies import NoRecallPolicy, RecallPolicy
from ttamer_jax.simulation import _replay
from ttamer_jax.solvers import DEFAULT_PRECISION, _solve_no_recall, _solve_recall, grid_size_for
from ttamer_jax.traces import ExitTraces, sample_traces


@pytree_dataclass
class SweepResult:
  """Held-out outcome of a family of policies, one row per parameter value.

  Attributes:
    param: ``[P]`` the swept parameter (``lam``, a threshold, a patience, ...).
    error: ``[P]`` mean true loss of the answered stage.
    cost: ``[P]`` mean cost (raw units).
    cost_norm: ``[P]`` ``cost`` / mean cost of running every stage.
    stop_histogram: ``[P, n]`` fraction of requests stopping after each stage.
    answer_histogram: ``[P, n]`` fraction answered by each stage.
  """

  param: chex.Array
  error: chex.Array
  cost: chex.Array
  cost_norm: chex.Array
  stop_histogram: chex.Array
  answer_histogram: chex.Array

  def objective(self, lam) -> chex.Array:
    """``[P]`` ``lam * error + (1 - lam) * cost``."""
    return lam * self.error + (1 - lam) * self.cost

  def rows(self) -> list[dict]:
    return [dict(param=float(p), error=float(e), cost=float(c), cost_norm=float(cn))
            for p, e, c, cn in zip(*(np.asarray(x) for x in (self.param, self.error, self.cost,
                                                             self.cost_norm)))]


def _stats(res, n):
  hist = lambda s: jnp.mean(jax.nn.one_hot(s, n), axis=0)
  return res.loss.mean(), res.cost.mean(), hist(res.stop_stage), hist(res.answer_stage)


def _check_traces(traces, n):
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  if traces.num_stages != n:
    raise ValueError(f"traces: have {traces.num_stages} stages, the policies {n}")


def _finish(param, loss, cost, stop_h, ans_h, traces) -> SweepResult:
  full = float(np.asarray(traces.cost_matrix(), np.float64).sum(axis=1).mean())
  cost = np.asarray(cost, np.float64)
  return SweepResult(param=np.asarray(param), error=np.asarray(loss, np.float64), cost=cost,
                     cost_norm=cost / full if full > 0 else np.zeros_like(cost),
                     stop_histogram=np.asarray(stop_h), answer_histogram=np.asarray(ans_h))


def _lams(lams):
  lams = validation.as_numpy("lams", lams, ndim=1)
  if lams.size == 0:
    raise ValueError("lams: empty")
  validation.check_lam(lams)
  return lams


@functools.partial(jax.jit, static_argnums=(6, 7))
def _sweep_line(cascade, lams, states, losses, costs, preds, grid_size, recall: bool):
  n = cascade.num_stages
  zeros = jnp.zeros(states.shape, losses.dtype)

  def one(lam):
    lam = lam.astype(cascade.values.dtype)
    if recall:
      sol = _solve_recall(cascade, lam, grid_size, DEFAULT_PRECISION)
      policy = RecallPolicy(index=sol.index, values=cascade.values, lam=lam)
    else:
      sol = _solve_no_recall(cascade, lam, DEFAULT_PRECISION)
      policy = NoRecallPolicy(stop=sol.stop)
    return _stats(_replay(policy, states, losses, costs, zeros, preds), n)

  return jax.vmap(one)(lams)


def _sweep(fitted: FittedCascade, traces: ExitTraces, lams, recall: bool) -> SweepResult:
  if not isinstance(fitted, FittedCascade):
    raise ValueError(f"fitted: expected a FittedCascade, got {type(fitted).__name__}")
  lams = _lams(lams)
  _check_traces(traces, fitted.cascade.num_stages)
  states = fitted.discretiser(trace_scores(traces, fitted.score_name), traces.preds)
  out = _sweep_line(fitted.cascade, jnp.asarray(lams), states, traces.losses, traces.costs,
                    traces.preds, grid_size_for(fitted.cascade.values), recall)
  return _finish(lams, *out, traces)


def sweep_recall(fitted: FittedCascade, traces: ExitTraces, lams: Any) -> SweepResult:
  """Recall-optimal policies of ``fitted`` for every ``lam`` replayed on ``traces``
  (one compiled call: ``vmap`` over ``lam`` of solve + replay)."""
  return _sweep(fitted, traces, lams, True)


def sweep_no_recall(fitted: FittedCascade, traces: ExitTraces, lams: Any) -> SweepResult:
  """The no-recall optimum of ``fitted`` for every ``lam`` replayed on ``traces``."""
  return _sweep(fitted, traces, lams, False)


@jax.jit
def _sweep_batched(policies, states, losses, costs, scores, preds):
  n = states.shape[1]
  return jax.vmap(lambda p: _stats(_replay(p, states, losses, costs, scores, preds), n))(policies)


def sweep_policies(policies, params: Any, traces: ExitTraces, *, score_name: str | None = None
                   ) -> SweepResult:
  """Replays a batched heuristic over its whole grid on ``traces`` in one call.

  Args:
    policies: a heuristic from :mod:`ttamer_jax.baselines` whose array leaves have
      a leading grid axis of size ``P``.
    params: ``[P]`` the parameter reported for each grid point.
    traces: the traces to replay on.
    score_name: the signal the heuristic reads (default: primary scores).
  """
  params = validation.as_numpy("params", params, ndim=1)
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(policies)}
  if sizes != {params.shape[0]}:
    raise ValueError(f"policies: leading grid axes {sorted(sizes)} must all equal len(params) = "
                     f"{params.shape[0]}")
  if getattr(policies, "reads_state", True) or getattr(policies, "reads_true_loss", False):
    raise ValueError(f"policies: {type(policies).__name__} is not a score-reading heuristic")
  _check_traces(traces, policies.num_stages)
  scores = trace_scores(traces, score_name)
  states = jnp.zeros(traces.scores.shape, jnp.int32)
  out = _sweep_batched(policies, states, traces.losses, traces.costs, scores, traces.preds)
  return _finish(params, *out, traces)


# ------------------------------------------------------------------ grids
def _levels(num: int) -> np.ndarray:
  return np.linspace(0.0, 1.0, validation.check_positive_int("num", num))


def _pooled_thresholds(scores: np.ndarray, num: int) -> np.ndarray:
  t = np.quantile(scores.reshape(-1), _levels(num))
  return np.unique(np.concatenate([[-np.inf], t, [np.inf]]))


def confidence_grid(traces: ExitTraces, score_name: str | None = None, num: int = 64):
  """One threshold for every stage (``score >= t``) at quantiles of the pooled scores
  (plus ``-inf``/``+inf``: always the first / always the last exit)."""
  t = _pooled_thresholds(np.asarray(trace_scores(traces, score_name)), num)
  n = traces.num_stages
  return baselines.ThresholdPolicy(thresholds=np.repeat(t[:, None], n, 1), direction="above"), t


def entropy_grid(traces: ExitTraces, score_name: str | None = "entropy", num: int = 64):
  """One entropy threshold for every stage (``score <= t``)."""
  t = _pooled_thresholds(np.asarray(trace_scores(traces, score_name)), num)
  n = traces.num_stages
  return baselines.ThresholdPolicy(thresholds=np.repeat(t[:, None], n, 1), direction="below"), t


def per_stage_grid(traces: ExitTraces, score_name: str | None = None, num: int = 64,
                   direction: str = "above"):
  """Per-stage thresholds at a common quantile level ``q`` of each stage's own scores
  (exit at stage i iff its score is in stage i's top ``1 - q``); ``params`` = ``q``."""
  scores = np.asarray(trace_scores(traces, score_name), np.float64)
  levels = _levels(num)
  t = np.quantile(scores, levels, axis=0)                          # [P, n]
  # Open the ends so the grid spans "always exit first" to "never exit early".
  t[0], t[-1] = -np.inf, np.inf
  return baselines.ThresholdPolicy(thresholds=t, direction=direction), levels


def patience_grid(num_stages: int):
  """Patience ``1..n`` (``n``: effectively the full model unless all exits agree)."""
  p = np.arange(1, validation.check_positive_int("num_stages", num_stages) + 1)
  return baselines.PatiencePolicy(patience=p, stages=num_stages), p


def fixed_exit_grid(num_stages: int):
  k = np.arange(validation.check_positive_int("num_stages", num_stages))
  return baselines.FixedExitPolicy(exit_stage=k, stages=num_stages), k


def heuristic_sweeps(calibration: ExitTraces, traces: ExitTraces, *,
                     confidence_score: str | None = None, entropy_score: str | None = None,
                     num: int = 64) -> dict[str, SweepResult]:
  """Every heuristic over its grid (thresholds from ``calibration``) replayed on ``traces``.

  Keys: ``"confidence"``, ``"per_stage"`` (on ``confidence_score``), ``"entropy"``
  (when ``entropy_score`` is given), ``"patience"``, ``"fixed_exit"``.
  """
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


def tuned_objective(calibration: SweepResult, held_out: SweepResult, lam) -> tuple[int, float]:
  """``(index, held-out objective)`` of the grid point best on ``calibration`` at ``lam``."""
  validation.check_scalar_lam(lam)
  if np.shape(calibration.param) != np.shape(held_out.param):
    raise ValueError("calibration and held_out sweeps must share one grid")
  i = int(np.argmin(np.asarray(calibration.objective(lam))))
  return i, float(np.asarray(held_out.objective(lam))[i])


# ------------------------------------------------------------------ workload
def overthinking_cascade(num_stages: int = 5, num_states: int = 16, *, overthink: float = 0.15,
                         decay: float = 0.75) -> Cascade:
  """A built-in cascade with over-thinking, defined at any resolution ``K``.

  State ``s`` is a bin of a latent difficulty ``u = (s + 0.5) / K``; stage ``i``'s
  error probability is ``u * decay**i``. Between stages ``u`` drifts 0.125 easier
  (Laplace kernel, width 0.1) or, with probability ``overthink``, the deeper model
  over-thinks and ``u`` jumps 0.25 harder (width 0.1875). ``init ~ exp(-3u)``; costs
  grow 1.6x per stage and sum to 1. The kernels live in ``u`` units, so ``K = 16``
  and ``K = 1000`` describe the same workload; ``(5, 8)`` is
  :func:`~ttamer_jax.demo_cascade` exactly.
  """
  n = validation.check_positive_int("num_stages", num_stages)
  k = validation.check_positive_int("num_states", num_states)
  u = (np.arange(k) + 0.5) / k
  values = np.stack([u * decay**i for i in range(n)])
  d = u[None, :] - u[:, None]
  easier = np.exp(-np.abs(d + 0.125) / 0.1)
  harder = np.exp(-np.abs(d - 0.25) / 0.1875)
  row = ((1 - overthink) * easier / easier.sum(1, keepdims=True)
         + overthink * harder / harder.sum(1, keepdims=True))
  init = np.exp(-3 * u)
  costs = 1.6 ** np.arange(n)
  return Cascade(values=values, init=init / init.sum(),
                 trans=np.broadcast_to(row / row.sum(1, keepdims=True), (n - 1, k, k)),
                 costs=costs / costs.sum())


def workload_traces(key: chex.PRNGKey, cascade: Cascade, num_samples: int, *,
                    num_classes: int = 10, repeat_mistake: float = 0.7) -> ExitTraces:
  """Synthetic exit traces of ``cascade`` with the signals real exits expose.

  States and 0/1 losses as :func:`~ttamer_jax.traces.sample_traces`
  (``"bernoulli"``). Exits of one network make correlated mistakes: a wrong exit
  that follows a wrong exit repeats its prediction with probability
  ``repeat_mistake``, otherwise picks a uniformly random wrong class. Signals:
  ``"error_prob"`` (a learned error estimate: the bin of the true error
  probability plus within-bin jitter; also the primary score), ``"max_softmax"``
  (``1 - p_err * (0.85 + 0.3 u)`` clipped to ``[1/C, 1]``, ``u`` the jitter) and
  ``"entropy"`` (entropy of a softmax with that max, times log-normal noise).
  """
  k_tr, k_noise, k_rep, k_wrong = jax.random.split(key, 4)
  tr = sample_traces(k_tr, cascade, num_samples, loss="bernoulli", num_classes=num_classes)
  k, n = cascade.num_states, tr.num_stages
  score = np.asarray(tr.scores, np.float64)
  state = np.minimum(np.floor(score * k), k - 1).astype(np.int64)
  jitter = score * k - state
  p_err = np.asarray(cascade.values, np.float64)[np.arange(n)[None, :], state]
  conf = np.clip(1 - p_err * (0.85 + 0.3 * jitter), 1.0 / num_classes, 1.0)
  rest = np.maximum(1 - conf, 1e-12) / max(num_classes - 1, 1)
  entropy = -(conf * np.log(conf) + (1 - conf) * np.log(rest))
  noise = np.exp(0.1 * np.asarray(jax.random.normal(k_noise, entropy.shape)))
  wrong = np.asarray(tr.losses) > 0
  labels = np.asarray(tr.labels)
  repeat = np.asarray(jax.random.uniform(k_rep, wrong.shape)) < repeat_mistake
  offset = np.asarray(jax.random.randint(k_wrong, wrong.shape, 1, max(num_classes, 2)))
  preds = np.where(wrong, (labels[:, None] + offset) % num_classes, labels[:, None])
  for i in range(1, n):
    copy = wrong[:, i] & wrong[:, i - 1] & repeat[:, i]
    preds[:, i] = np.where(copy, preds[:, i - 1], preds[:, i])
  signals = {"error_prob": score, "max_softmax": conf, "entropy": np.maximum(entropy, 0.0) * noise}
  return ExitTraces(scores=score, preds=preds, losses=tr.losses, costs=tr.costs, signals=signals,
                    labels=labels)
