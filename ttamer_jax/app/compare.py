"""Every policy family on one pair of splits: fitted on calibration, measured held out.

:func:`compare_policies` fits a cascade on the calibration traces, sweeps ``lam`` for the
recall and no-recall optima, sweeps each heuristic over its own grid (thresholds taken
from the calibration traces) and computes the hindsight oracle -- on both splits, so an
operating point is *chosen* on calibration and *reported* on test. The functions after
it read a :class:`PolicyComparison` as plain values (:func:`summarise`), which
``ttamer demo`` and ``ttamer sweep`` print and save.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.progress import progress_iter
from ttamer_jax.data.discretise import PRIMARY_SCORE, trace_scores
from ttamer_jax.data.fitting import FittedCascade, fit_cascade
from ttamer_jax.data.traces import ExitTraces
from ttamer_jax.evaluation import frontier, metrics, selection
from ttamer_jax.evaluation.frontier import ReplaySweep

POLICIES = ("recall", "no_recall", "confidence", "per_stage", "entropy", "patience",
            "fixed_exit", "hindsight")
# lam values at which the demo and `sweep` report the held-out objective.
OBJECTIVE_LAMS = (0.5, 0.9, 0.97, 0.99)
# Cost budgets (shares of the full cost) at which the demo and `sweep` report each
# family's least held-out error.
COST_BUDGETS = (0.10, 0.25, 0.50, 0.75)


@dataclasses.dataclass(frozen=True)
class PolicyComparison:
  """Every policy family's sweep on the calibration and the test split.

  Attributes:
    fitted: the cascade fitted on the calibration traces.
    lams: ``[L]`` the ``lam`` values of the recall / no-recall / hindsight sweeps.
    calibration: ``{policy: ReplaySweep}`` on the calibration traces.
    test: ``{policy: ReplaySweep}`` on the test traces (same grids, same order).
    full_error: ``{"calibration": e, "test": e}`` error of always answering with the last exit.
  """

  fitted: FittedCascade
  lams: np.ndarray
  calibration: Mapping[str, ReplaySweep]
  test: Mapping[str, ReplaySweep]
  full_error: Mapping[str, float]


def compare_policies(calibration: ExitTraces, test: ExitTraces, *, num_states: int = 8,
                     score: str | None = "max_softmax", confidence_score: str | None = "max_softmax",
                     entropy_score: str | None = "entropy", lams: Any = None,
                     feature: str | None = None, progress: bool = False) -> PolicyComparison:
  """Fits on ``calibration`` and sweeps every policy family on both splits.

  Args:
    calibration, test: exit traces of the same stages.
    num_states: states of the fitted cascade (score bins, times 2 with ``feature``).
    score: signal the fitted recall / no-recall policies discretise (``None`` or
      ``"scores"``: the primary ``scores``).
    confidence_score: signal the confidence-threshold heuristics compare
      (``score >= t``; higher = more confident).
    entropy_score: signal of the entropy heuristic (``score <= t``; ``None`` or
      absent: skipped).
    lams: ``lam`` grid (default :data:`~ttamer_jax.evaluation.frontier.LAMS`).
    feature: categorical feature crossed with the score bins (``"agree_prev"``).
    progress: a progress bar over (split, family); each family's sweep is one
      compiled call.
  """
  lams = frontier.LAMS if lams is None else validation.as_numpy("lams", lams, ndim=1)
  signals = dict(calibration.signals or {})
  # The primary signal may be named like everywhere else ("scores") or left as None.
  score = None if score == PRIMARY_SCORE else score
  confidence_score = None if confidence_score == PRIMARY_SCORE else confidence_score
  for name, value in (("score", score), ("confidence_score", confidence_score)):
    if value is not None and value not in signals:
      raise ValueError(f"{name}: traces have no signal {value!r} (have {sorted(signals)})")
  if entropy_score is not None and entropy_score not in signals:
    entropy_score = None
  fitted = fit_cascade(calibration, num_states, score=score, feature=feature)
  families = [
      ("recall", lambda tr: {"recall": frontier.sweep_recall(fitted, tr, lams)}),
      ("no-recall", lambda tr: {"no_recall": frontier.sweep_no_recall(fitted, tr, lams)}),
      ("heuristics", lambda tr: frontier.heuristic_sweeps(
          calibration, tr, confidence_score=confidence_score, entropy_score=entropy_score)),
      ("hindsight", lambda tr: {"hindsight": frontier.hindsight_sweep(tr, lams)}),
  ]
  splits = {"calibration": calibration, "test": test}
  out = {split: {} for split in splits}
  jobs = [(split, name, fn) for split in splits for name, fn in families]
  bar = progress_iter(jobs, desc="sweep", enabled=progress)
  for split, name, fn in bar:
    bar.set_postfix_str(f"{split}: {name}")
    out[split].update(fn(splits[split]))
  full = {split: float(np.asarray(t.losses)[:, -1].mean()) for split, t in splits.items()}
  return PolicyComparison(fitted=fitted, lams=lams, calibration=out["calibration"],
                          test=out["test"], full_error=full)


def operating_points(comparison: PolicyComparison, *, tolerance: float = 0.01) -> list[dict]:
  """Least cost within ``tolerance`` of the full network's error, per policy family.

  ``chosen_*``: the cheapest grid point whose *calibration* error is within
  ``tolerance`` of the calibration full-network error, evaluated on test (what a
  practitioner would deploy). ``frontier_*``: the cheapest point of the *test*
  sweep within ``tolerance`` of the test full error (optimistic: picked on the
  data it is scored on). ``None`` where no grid point qualifies.
  """
  rows = []
  for name in comparison.test:
    cal, test = comparison.calibration[name], comparison.test[name]
    row = {"policy": name}
    i, met = frontier.cheapest_within(cal.cost_norm, cal.error, comparison.full_error["calibration"],
                                      tolerance)
    if met:
      row.update(chosen_param=float(np.asarray(cal.param)[i]),
                 chosen_cost=float(np.asarray(test.cost_norm)[i]),
                 chosen_error=float(np.asarray(test.error)[i]))
    else:
      row.update(chosen_param=None, chosen_cost=None, chosen_error=None)
    j, met = frontier.cheapest_within(test.cost_norm, test.error, comparison.full_error["test"],
                                      tolerance)
    if met:
      row.update(frontier_cost=float(np.asarray(test.cost_norm)[j]),
                 frontier_error=float(np.asarray(test.error)[j]))
    else:
      row.update(frontier_cost=None, frontier_error=None)
    rows.append(row)
  return rows


def objectives_at(comparison: PolicyComparison, lams: Any) -> list[dict]:
  """Held-out objective of each family at each ``lam``, its grid point tuned on calibration."""
  rows = []
  for lam in validation.as_numpy("lams", lams, ndim=1):
    row = {"lam": float(lam)}
    for name in comparison.test:
      _, value = frontier.tuned_objective(comparison.calibration[name], comparison.test[name], lam)
      row[name] = value
    rows.append(row)
  return rows


def errors_at_budgets(comparison: PolicyComparison, budgets: Any = COST_BUDGETS) -> list[dict]:
  """Least held-out error each family reaches at cost share ``<= budget``, per budget.

  Read off each family's held-out (test) frontier with
  :func:`~ttamer_jax.evaluation.frontier.staircase` (optimistic: the point is picked
  on the data it is scored on, like the ``frontier_*`` columns of
  :func:`operating_points`). Rows ``{policy, error: [B], cost: [B]}`` in the order of
  ``budgets``; ``cost`` is the cost share of the frontier point that reaches that
  error. ``None`` where the family has no grid point at or below the budget.
  """
  budgets = validation.as_numpy("budgets", budgets, ndim=1).astype(np.float64)
  rows = []
  for name, res in comparison.test.items():
    cost, error = np.asarray(res.cost_norm, np.float64), np.asarray(res.error, np.float64)
    front = frontier.pareto_front(cost, error)
    errs = frontier.staircase(cost, error, budgets)
    row = dict(policy=name, error=[], cost=[])
    for b, e in zip(budgets, errs):
      if np.isfinite(e):
        at = front[np.searchsorted(cost[front], b, side="right") - 1]
        row["error"].append(float(e))
        row["cost"].append(float(cost[at]))
      else:
        row["error"].append(None)
        row["cost"].append(None)
    rows.append(row)
  return rows


def frontier_gaps(comparison: PolicyComparison) -> dict[str, float]:
  """Mean error gap (family minus recall) between held-out frontiers over their common cost range."""
  rec = comparison.test["recall"]
  return {name: float(frontier.frontier_gap(rec.cost_norm, rec.error, r.cost_norm, r.error).mean_gap)
          for name, r in comparison.test.items() if name != "recall"}


def summarise(comparison: PolicyComparison, tolerance: float = 0.01,
              objective_lams: Any = OBJECTIVE_LAMS, budgets: Any = COST_BUDGETS) -> dict:
  """A comparison as plain values: operating points, held-out objectives at
  ``objective_lams``, least held-out errors at the cost ``budgets``, frontier gaps,
  every family's test frontier, the fitted cascade."""
  comp = comparison
  return dict(full_error=dict(comp.full_error),
              operating_points=operating_points(comp, tolerance=tolerance),
              objectives=objectives_at(comp, objective_lams),
              budgets=[float(b) for b in budgets], errors_at_budgets=errors_at_budgets(comp, budgets),
              frontier_gaps=frontier_gaps(comp),
              frontiers={k: v.rows() for k, v in comp.test.items()},
              fitted=dict(num_stages=comp.fitted.cascade.num_stages,
                          num_states=comp.fitted.cascade.num_states,
                          score=comp.fitted.score_name))


def recall_operating_lam(comparison: PolicyComparison, tolerance: float = 0.01) -> float:
  """The recall family's ``lam`` at its operating point, by the rule selection deploys with.

  :meth:`~ttamer_jax.evaluation.selection.OperatingPoint.pick` on the calibration sweep:
  the cheapest grid point within ``tolerance`` of the last exit's calibration error,
  else the point of least calibration error -- how :func:`~ttamer_jax.fit_policy` solves
  a recall candidate in tolerance mode, on the same grid, so the demo's heatmap shows
  the lam a recall policy of this design is deployed at.

  Args:
    comparison: the families' sweeps; ``comparison.calibration["recall"]`` has ``[L]`` points.
    tolerance: accuracy tolerance (error share).

  Returns:
    The chosen ``lam`` of the recall sweep's grid.
  """
  cal = comparison.calibration["recall"]
  point = selection.OperatingPoint(lam=None, tolerance=tolerance)
  i = point.pick(np.asarray(cal.error), np.asarray(cal.cost_norm),
                 comparison.full_error["calibration"])
  return float(np.asarray(cal.param)[i])


def pareto_marks(points: list[dict]) -> dict:
  """``{policy: (cost, error)}`` of each family's chosen operating point, for the Pareto plot.

  Args:
    points: rows of :func:`operating_points`.

  Returns:
    The held-out cost share and error of each row's chosen point (``None`` where none).
  """
  return {r["policy"]: (r["chosen_cost"], r["chosen_error"]) for r in points}


def chosen_index(sweep: ReplaySweep, param) -> int | None:
  """Index of ``param`` in a sweep's grid (``None`` when ``param`` is ``None``)."""
  if param is None:
    return None
  return int(np.flatnonzero(np.asarray(sweep.param) == param)[0])


def resolve_signals(traces: ExitTraces, score: str | None = None,
                    confidence_score: str | None = None):
  """``(score, confidence_score, entropy_score)`` defaults for a set of traces.

  The fitted policies and the confidence heuristics read ``max_softmax`` when the
  traces have it, else the primary ``scores``; the entropy heuristic runs when an
  ``entropy`` signal exists. Explicit names are checked.
  """
  signals = dict(traces.signals or {})
  default = "max_softmax" if "max_softmax" in signals else "scores"
  score = default if score is None else score
  confidence_score = default if confidence_score is None else confidence_score
  for name in (score, confidence_score):
    trace_scores(traces, name)  # ValueError naming the missing signal
  return score, confidence_score, "entropy" if "entropy" in signals else None


# ------------------------------------------------------------------ the answer
def _held_out(policy, traces: ExitTraces) -> tuple[np.ndarray, np.ndarray]:
  """Per-request ``(loss [N], cost share [N])`` of a deployed ``policy`` replayed on ``traces``."""
  out = metrics.replay_traces(policy, traces)
  return (np.asarray(out.loss, np.float64),
          np.asarray(out.cost, np.float64) / float(traces.full_cost()))


def _summary(loss: np.ndarray, cost: np.ndarray, lam: float, means: np.ndarray,
             level: float) -> dict:
  """Held-out error, cost share and ``J`` with intervals from resample means ``[R, 2]``."""
  samples = np.stack([means[:, 0], means[:, 1], lam * means[:, 0] + (1 - lam) * means[:, 1]], 1)
  ci = metrics.percentile_ci(samples, level)
  value = [loss.mean(), cost.mean(), lam * loss.mean() + (1 - lam) * cost.mean()]
  return {k: [float(v), float(lo), float(hi)]
          for k, v, (lo, hi) in zip(("error", "cost_norm", "objective"), value, ci)}


def verdict(diff: Mapping[str, list], tolerance: float | None) -> str:
  """``"better"``, ``"no better"`` or ``"worse"`` from paired differences deployed - rule
  (``[mean, lo, hi]`` of ``error``, ``cost_norm``, ``objective``): on ``J``'s interval
  at a target ``lam``; in tolerance mode on the cost's, the error's staying within
  ``tolerance`` of the rule's."""
  if tolerance is None:
    _, lo, hi = diff["objective"]
    return "better" if hi < 0 else "worse" if lo > 0 else "no better"
  _, lo, hi = diff["cost_norm"]
  if hi < 0 and diff["error"][2] <= tolerance:
    return "better"
  if lo > 0 or diff["error"][1] > tolerance:
    return "worse"
  return "no better"


def versus_best_rule(sel: selection.PolicySelection, test: ExitTraces, *, lam: float,
                     key: Any = None, num_resamples: int = 1000, level: float = 0.95) -> dict:
  """The demo's answer: the deployed policy against the best simple rule, held out.

  The rule is the one ``sel`` would have deployed had only the simple rules been
  candidates (:func:`~ttamer_jax.evaluation.selection.best_simple_rule`), refitted on
  the same calibration split. Both are replayed on ``test``; the differences
  (deployed - rule) are paired request by request, their intervals from one bootstrap.
  When the selection deployed that rule itself, the best T-Tamer design (the highest
  ranked) is measured against it too (``"best_ttamer"``), so the answer still says
  what T-Tamer would have done.

  Args:
    sel: the selection whose policy is deployed.
    test: held-out traces ``[N, n]``.
    lam: weight of the error in the reported ``J = lam * error + (1 - lam) * cost``.
    key, num_resamples, level: the paired bootstrap.

  Returns:
    A JSON-able dict: ``lam``, ``mode`` ("lam" / "tolerance"), ``tolerance``,
    ``deployed`` and ``rule`` (``name``, ``ttamer``, ``kind``, ``param`` -- the solved
    ``lam`` or the rule's parameter -- and ``test``: ``error``,
    ``cost_norm``, ``objective`` as ``[value, lo, hi]``), ``diff`` (deployed - rule,
    same keys), ``verdict`` (:func:`verdict`), ``same`` (the rule is the deployed
    policy) and ``best_ttamer`` (``None`` unless ``same``: the same fields for the
    best T-Tamer design against the rule), or ``None`` when ``sel`` scored no rule.
  """
  rule = selection.best_simple_rule(sel)
  if rule is None:
    return None
  key = np.zeros(2, np.uint32) if key is None else key
  same = rule.candidate == sel.chosen.candidate
  others = [] if not same else [s for s in sel.scores if s.candidate.ttamer][:1]
  names = [sel.chosen, rule] + others
  refits = [None] + [sel.refit_of(s.candidate) for s in names[1:]]
  policies = [sel.deployed] + [r.deployed for r in refits[1:]]
  params = [sel.solve_lam if not same else refits[1].param] + [r.param for r in refits[1:]]
  outcomes = [_held_out(p, test) for p in policies]
  means = metrics.bootstrap_means(key, np.stack([c for o in outcomes for c in o], 1),
                                  num_resamples).reshape(num_resamples, len(outcomes), 2)
  summaries = [_summary(*o, lam, means[:, i], level) for i, o in enumerate(outcomes)]
  tolerance = sel.tolerance if sel.lam is None else None

  def against_rule(i):
    d = [o - r for o, r in zip(outcomes[i], outcomes[1])]
    out = _summary(*d, lam, means[:, i] - means[:, 1], level)
    return out, verdict(out, tolerance)

  described = lambda i: dict(name=names[i].name, ttamer=names[i].candidate.ttamer,
                             kind=names[i].candidate.kind, param=params[i], test=summaries[i])
  diff, word = against_rule(0)
  best = None
  if others:
    best_diff, best_word = against_rule(2)
    best = dict(described(2), diff=best_diff, verdict=best_word)
  return dict(lam=float(lam), mode="lam" if sel.lam is not None else "tolerance",
              tolerance=tolerance, level=level, deployed=described(0), rule=described(1),
              diff=diff, verdict=word, same=same, best_ttamer=best)
