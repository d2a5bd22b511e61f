"""The policy a user gets: chosen by cross-fitting, never by the model's own value.

The exact solvers are optimal *for the fitted model*. Whether that model holds
on the user's cascade is an empirical question, so :func:`fit_policy` answers it
on the calibration traces only (DESIGN.md section 5):

1. The requests are split into ``folds`` parts. For every candidate (below) and
   every fold, the candidate is fitted on the other folds and replayed on the
   held-out one, so every request gets an out-of-fold outcome (loss, cost).
2. The cross-fitted objective ``J = lam * error + (1 - lam) * cost / full_cost``
   of each candidate is the mean over all requests, with a bootstrap interval;
   candidates are compared request by request (paired differences).
3. The choice (:func:`one_se_choice`): the best simple rule is the default; a
   T-Tamer design competes only if it beats that rule by more than
   :data:`EARN_SE` paired standard errors; among those, the simplest whose
   cross-fitted ``J`` is within one paired standard error of the least (the
   one-standard-error rule: fewer states, then plainer designs; :func:`simplicity`).
   The chosen candidate is refitted on all the calibration traces and returned
   ready to deploy.

Cross-fitting runs as a few batched programs: every candidate x fold of one family,
and the refit on every request, in one call (:mod:`ttamer_jax.evaluation.crossfit`).
:func:`fit_at` / :func:`refit` fit one candidate on the host (scripts, and the
reference the batched programs are tested against).

Candidates (:func:`default_candidates`): recall and no-recall optima over several
state designs -- score signal, number of bins, binning, the agreement feature,
smoothing, and posterior-answer stages (:mod:`ttamer_jax.data.answers`) -- and
the simple rules people deploy: one confidence threshold, per-stage thresholds,
patience, a fixed exit. Simple rules are tuned on the training folds of each
split (nested), like everything else.

With ``tolerance`` instead of ``lam`` (``ttamer fit --lam auto``) the choice is
the least cross-fitted cost whose cross-fitted error is within ``tolerance`` of
the last exit's error; when no candidate reaches it, the most accurate one, and
the result says so.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import chex
import jax
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.heuristics import FixedExitPolicy, PatiencePolicy, ThresholdPolicy
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.policies import NoRecallPolicy, RecallPolicy
from ttamer_jax.core.progress import progress_iter
from ttamer_jax.data import answers as answer_models
from ttamer_jax.data.discretise import DeployedPolicy, Discretiser, trace_scores
from ttamer_jax.data.fitting import (
  FittedCascade,
  check_table_bytes,
  column_quantiles,
  fit_cascade,
  fit_discretiser,
  mean_stage_costs,
  pad_requests,
  request_bucket,
  unit_free_costs,
)
from ttamer_jax.data.traces import ExitTraces
from ttamer_jax.evaluation import crossfit, model_check
from ttamer_jax.evaluation.frontier import LAMS, cheapest_within, sweep_no_recall, sweep_policies, sweep_recall
from ttamer_jax.evaluation.metrics import (
  Comparison,
  bootstrap_means,
  normalised_objective,
  percentile_ci,
  replay_traces,
)

TTAMER_KINDS = ("recall", "no_recall")
RULE_KINDS = ("confidence", "per_stage", "patience", "fixed_exit")
ANSWERS = ("exits", "posterior")
# Grid of the simple rules' parameters (quantile levels of the training scores).
RULE_LEVELS = np.linspace(0.0, 1.0, 49)


# ------------------------------------------------------------------ candidates
@dataclasses.dataclass(frozen=True)
class Candidate:
  """One way to turn calibration traces into a policy.

  Attributes:
    kind: ``"recall"`` / ``"no_recall"`` (T-Tamer: the exact optimum of a fitted
      model) or a simple rule: ``"confidence"`` (one threshold), ``"per_stage"``
      (a threshold per stage at a common quantile level), ``"patience"``,
      ``"fixed_exit"``.
    score: exit signal the state bins or thresholds read (``None``: primary scores).
    num_states: ``K`` states per stage (T-Tamer; with ``feature``, ``K/2`` bins x 2).
    binning: ``"quantile"`` or ``"uniform"`` bins.
    feature: ``None``, ``"agree_prev"`` or ``"agree_best"`` (agreement with the previous
      exit, or with the most confident earlier exit).
    smoothing: Dirichlet pseudo-count of the transitions (and loss pseudo-samples).
    answers: ``"exits"`` (the stages are the exits) or ``"posterior"``
      (posterior-answer stages).
  """

  kind: str
  score: str | None = None
  num_states: int = 8
  binning: str = "quantile"
  feature: str | None = None
  smoothing: float = 1.0
  answers: str = "exits"

  def __post_init__(self):
    if self.kind not in TTAMER_KINDS + RULE_KINDS:
      raise ValueError(f"kind: must be one of {TTAMER_KINDS + RULE_KINDS}, got {self.kind!r}")
    if self.answers not in ANSWERS:
      raise ValueError(f"answers: must be one of {ANSWERS}, got {self.answers!r}")
    validation.check_positive_int("num_states", self.num_states)

  @property
  def ttamer(self) -> bool:
    """The exact optimum of a fitted model (as opposed to a simple rule)."""
    return self.kind in TTAMER_KINDS

  @property
  def name(self) -> str:
    score = self.score or "scores"
    if not self.ttamer:
      return self.kind if self.kind in ("patience", "fixed_exit") else f"{self.kind}({score})"
    parts = [score, f"{self.num_states} {self.binning} states"]
    if self.answers == "posterior":
      parts.insert(0, "posterior answers")
    if self.feature:
      parts.append(self.feature)
    if self.smoothing != 1.0:
      parts.append(f"smoothing {self.smoothing:g}")
    return f"{self.kind}[{', '.join(parts)}]"


def default_candidates(traces: ExitTraces) -> tuple[Candidate, ...]:
  """The candidate set of :func:`fit_policy` for ``traces``.

  T-Tamer: recall and no-recall optima on the confidence signal (``max_softmax``
  when recorded, else the primary scores) with 4, 8 and 16 quantile bins, 8 bins
  crossed with agreement, 8 bins with heavier smoothing and uniform bins; the same
  on a learned error signal (``error_prob``) when recorded (with agreement with the
  previous exit, and with the most confident earlier exit); posterior-answer
  stages with 4, 8 and 16 bins. Rules: one confidence threshold, per-stage
  thresholds, patience, a fixed exit.

  Args:
    traces: the calibration :class:`ExitTraces` (which signals are recorded).

  Returns:
    A tuple of :class:`~ttamer_jax.evaluation.Candidate`.
  """
  signals = dict(traces.signals or {})
  conf = "max_softmax" if "max_softmax" in signals else None
  scores = [conf] + (["error_prob"] if "error_prob" in signals else [])
  out: list[Candidate] = []
  for score in scores:
    for k in (4, 8, 16):
      out += [Candidate("recall", score, k), Candidate("no_recall", score, k)]
    out.append(Candidate("recall", score, 8, feature="agree_prev"))
    out.append(Candidate("recall", score, 8, feature="agree_best"))
  out += [Candidate("recall", conf, 8, smoothing=10.0),
          Candidate("recall", conf, 8, binning="uniform")]
  for k in (4, 8, 16):
    out += [Candidate("no_recall", conf, k, answers="posterior"),
            Candidate("recall", conf, k, answers="posterior")]
  out += [Candidate("confidence", conf), Candidate("per_stage", conf), Candidate("patience"),
          Candidate("fixed_exit")]
  return tuple(out)


# ------------------------------------------------------------------ fitting one
@dataclasses.dataclass(frozen=True)
class FittedCandidate:
  """A candidate fitted on some traces.

  Attributes:
    candidate: what was fitted.
    deployed: the policy at the requested operating point, ready to replay / serve.
    fitted: the fitted model (T-Tamer), else ``None``.
    param: the operating point: ``lam`` the model was solved at (T-Tamer) or the
      rule's parameter (quantile level, patience, exit stage).
  """

  candidate: Candidate
  deployed: DeployedPolicy
  fitted: FittedCascade | None
  param: float


def fit_model(candidate: Candidate, traces: ExitTraces, *, key: chex.PRNGKey,
              inner_folds: int = 3, virtual: ExitTraces | None = None) -> FittedCascade:
  """The fitted cascade of a T-Tamer candidate on ``traces``.

  Posterior-answer candidates fit their calibrators on all of ``traces`` (for new
  traffic) and the cascade on cross-fitted virtual traces (``virtual``, computed
  here when not given), so the states are not optimistic.
  """
  kwargs = dict(binning=candidate.binning, smoothing=candidate.smoothing,
                loss_smoothing=candidate.smoothing)
  if candidate.answers == "exits":
    return fit_cascade(traces, candidate.num_states, score=candidate.score,
                       feature=candidate.feature, **kwargs)
  if virtual is None:
    virtual = posterior_traces(traces, candidate.score, key=key, folds=inner_folds)
  fitted = fit_cascade(virtual, candidate.num_states, feature=candidate.feature, **kwargs)
  model = answer_models.fit_answer_model(traces, score=candidate.score)
  return dataclasses.replace(fitted, answers=model)


def posterior_traces(traces: ExitTraces, score: str | None, *, key: chex.PRNGKey,
                     folds: int = 3) -> ExitTraces:
  """Cross-fitted virtual posterior-answer traces of ``traces``."""
  ids = answer_models.fold_ids(key, traces.num_samples, min(folds, traces.num_samples))
  return answer_models.cross_fitted_transform(traces, ids, score=score)


def _rule_grid(candidate: Candidate, traces: ExitTraces):
  """``(batched policy [P], params [P])`` of a simple rule, thresholds from ``traces``."""
  n = traces.num_stages
  if candidate.kind == "patience":
    p = np.arange(1, n + 1)
    return PatiencePolicy(patience=p, num_stages=n), p.astype(float)
  if candidate.kind == "fixed_exit":
    k = np.arange(n)
    return FixedExitPolicy(exit_stage=k, num_stages=n), k.astype(float)
  scores = np.asarray(trace_scores(traces, candidate.score), np.float64)
  return ThresholdPolicy(thresholds=rule_thresholds(candidate.kind, scores)), RULE_LEVELS


def rule_thresholds(kind: str, scores: np.ndarray) -> np.ndarray:
  """``[P, n]`` thresholds of a threshold rule at :data:`RULE_LEVELS` quantiles of
  ``scores [N, n]``: pooled over stages (``"confidence"``) or per stage
  (``"per_stage"``); the ends are always the first / always the last exit."""
  pooled = kind == "confidence"
  t = column_quantiles(scores.reshape(-1) if pooled else scores, RULE_LEVELS)
  t[0], t[-1] = -np.inf, np.inf
  return np.repeat(t[:, None], scores.shape[1], 1) if pooled else t


def _rule_at(policies, i: int):
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[i], policies)


def rule_policy(candidate: Candidate, traces: ExitTraces, param: float) -> DeployedPolicy:
  """The simple rule at grid parameter ``param`` with thresholds from ``traces``."""
  policies, params = _rule_grid(candidate, traces)
  i = int(np.argmin(np.abs(params - param)))
  n = traces.num_stages
  name = candidate.score if candidate.score is not None else "scores"
  return DeployedPolicy(policy=_rule_at(policies, i), discretiser=Discretiser.single_bin(n),
                        score_name=name)


# ------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class CandidateScore:
  """Cross-fitted outcome of one candidate (every request replayed out of fold).

  Attributes:
    candidate: the candidate.
    objective: cross-fitted ``J = lam * error + (1 - lam) * cost_norm``; in tolerance
      mode (no ``lam``) the cross-fitted ``cost_norm``, the quantity minimised.
    objective_ci: ``[2]`` bootstrap interval of ``objective``.
    objective_se: its standard error.
    error: cross-fitted mean loss of the answers.
    cost_norm: cross-fitted mean cost / mean cost of running every stage.
    param: ``[F]`` operating point chosen on each training split: the solved
      ``lam`` (T-Tamer) or the rule's parameter.
    per_request: ``[N]`` out-of-fold objective of each request (paired comparisons).
    modelled: ``[2]`` what the fold models predicted for ``(error, cost_norm)``
      (T-Tamer; fold-size weighted), else ``None``.
  """

  candidate: Candidate
  objective: float
  objective_ci: np.ndarray
  objective_se: float
  error: float
  cost_norm: float
  param: np.ndarray
  per_request: np.ndarray = dataclasses.field(repr=False)
  modelled: np.ndarray | None = None
  # [R, 3] bootstrap resample means of (error, cost_norm, objective), resamples shared by
  # every candidate of one selection (paired).
  resample_means: np.ndarray = dataclasses.field(default=None, repr=False)

  def measured(self, lam: float, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted ``(error, cost_norm, J at lam)`` and their bootstrap intervals."""
    r = self.resample_means
    samples = np.stack([r[:, 0], r[:, 1], lam * r[:, 0] + (1 - lam) * r[:, 1]], axis=1)
    means = np.asarray([self.error, self.cost_norm, lam * self.error + (1 - lam) * self.cost_norm])
    return means, percentile_ci(samples, level)

  @property
  def name(self) -> str:
    return self.candidate.name

  def as_dict(self) -> dict:
    return dict(name=self.name, ttamer=self.candidate.ttamer, objective=self.objective,
                objective_ci=[float(x) for x in self.objective_ci], objective_se=self.objective_se,
                error=self.error, cost_norm=self.cost_norm,
                param=[float(x) for x in np.asarray(self.param).reshape(-1)])


@dataclasses.dataclass(frozen=True)
class PolicySelection:
  """What :func:`fit_policy` chose, why, and the policy to deploy.

  Attributes:
    lam: target trade-off weight (``None`` in tolerance mode).
    tolerance: error tolerance of the tolerance mode (``None`` with ``lam``).
    folds: number of cross-fitting folds.
    scores: every candidate's :class:`CandidateScore`, best first.
    chosen: the chosen candidate's score.
    runner_up: the second-best candidate, or ``None``.
    versus_runner_up: paired comparison chosen - runner-up (negative: chosen better).
    deployed: the chosen candidate refitted on all the traces.
    fitted: its fitted model (T-Tamer), else ``None``.
    solve_lam: the ``lam`` the deployed model was solved at (T-Tamer), else ``None``.
    tolerance_met: tolerance mode only: whether the chosen candidate's cross-fitted
      error is within the tolerance of the last exit's (``None`` otherwise).
    reference_error: the last exit's error on the traces.
    full_cost: mean cost of running every stage on the traces (raw units; the unit
      of every normalised cost here).
    model_check: :class:`~ttamer_jax.evaluation.model_check.ModelCheck` of the chosen
      candidate, or of the best T-Tamer candidate when a rule was chosen (``None``
      without T-Tamer candidates).
    notes: plain-language remarks (e.g. "no candidate reaches the tolerance", the
      model check's warning).

  :meth:`refit_of` gives any other scored candidate refitted on all the traces (to
  deploy the runner-up or a simpler design without fitting again).
  """

  lam: float | None
  tolerance: float | None
  folds: int
  scores: tuple[CandidateScore, ...]
  chosen: CandidateScore
  runner_up: CandidateScore | None
  versus_runner_up: Comparison | None
  deployed: DeployedPolicy
  fitted: FittedCascade | None
  solve_lam: float | None
  tolerance_met: bool | None
  reference_error: float
  full_cost: float
  model_check: model_check.ModelCheck | None = None
  notes: tuple[str, ...] = ()
  refits: Callable[[Candidate], FittedCandidate] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  def refit_of(self, candidate: Candidate) -> FittedCandidate:
    """``candidate`` (one of :attr:`scores`) refitted on all the traces, as the
    selection fitted it (same posterior calibrators, same operating-point rule)."""
    if self.refits is None or candidate not in {s.candidate for s in self.scores}:
      raise ValueError(f"candidate: {candidate!r} was not scored by this selection")
    return self.refits(candidate)

  def as_dict(self) -> dict:
    cmp = self.versus_runner_up
    return dict(
        lam=self.lam, tolerance=self.tolerance, folds=self.folds, chosen=self.chosen.as_dict(),
        runner_up=None if self.runner_up is None else self.runner_up.as_dict(),
        versus_runner_up=None if cmp is None else dict(
            diff=float(cmp.diff), diff_se=float(cmp.diff_se),
            diff_ci=[float(x) for x in cmp.diff_ci]),
        solve_lam=self.solve_lam, tolerance_met=self.tolerance_met,
        reference_error=self.reference_error, full_cost=self.full_cost,
        candidates=[s.as_dict() for s in self.scores],
        model_check=None if self.model_check is None else self.model_check.as_dict(),
        notes=list(self.notes))


# ------------------------------------------------------------------ selection
def _cost_share(cost: np.ndarray, full: float) -> np.ndarray:
  """Per-request cost as a share of running every stage (0 when that costs nothing)."""
  return cost / full if full > 0 else np.zeros_like(cost)


def _scores(candidates, outcomes, lam, full) -> list[CandidateScore]:
  """Every candidate's cross-fitted :class:`CandidateScore` (its bootstrap filled in
  by :func:`_bootstrapped`)."""
  # Tolerance mode minimises the cost: its "objective" is the cost share (lam 0).
  j_lam = 0.0 if lam is None else lam
  out = []
  for cand, (loss, cost, params, modelled) in zip(candidates, outcomes):
    obj = normalised_objective(loss, cost, j_lam, full)
    se = float(np.std(obj, ddof=1) / np.sqrt(obj.size)) if obj.size > 1 else 0.0
    out.append(CandidateScore(
        candidate=cand, objective=float(obj.mean()), objective_ci=np.full(2, np.nan),
        objective_se=se, error=float(loss.mean()), cost_norm=float(_cost_share(cost, full).mean()),
        param=np.asarray(params, np.float64), per_request=obj, modelled=modelled))
  return out


def _bootstrapped(scores, outcomes, lam, full, key, num_resamples, level, extra=None):
  """``(scores with their resample means and intervals, extra's resample means)`` from
  one bootstrap shared by every column (resamples paired across candidates).

  Only ``(loss, cost share)`` are resampled per candidate: the objective is linear in
  them, so its resample means follow. ``extra``: ``[N, C]`` more columns resampled with
  the same draws (the model check's in-sample replay).
  """
  j_lam = 0.0 if lam is None else lam
  cols = []
  for loss, cost, _, _ in outcomes:
    cols += [loss, _cost_share(cost, full)]
  width = len(cols)
  if extra is not None:
    cols += list(np.asarray(extra, np.float64).T)
  means = bootstrap_means(key, np.stack(cols, axis=1), num_resamples)
  pairs = means[:, :width].reshape(num_resamples, -1, 2)
  out = []
  for c, s in enumerate(scores):
    m = np.concatenate([pairs[:, c], (j_lam * pairs[:, c, 0] + (1 - j_lam) * pairs[:, c, 1])[:, None]],
                       axis=1)
    out.append(dataclasses.replace(s, objective_ci=percentile_ci(m, level)[2], resample_means=m))
  return out, means[:, width:]


def _paired(a: CandidateScore, b: CandidateScore, level: float) -> Comparison:
  """``a - b`` with the shared bootstrap (paired resamples)."""
  d = a.per_request - b.per_request
  se = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
  ci = percentile_ci((a.resample_means[:, 2] - b.resample_means[:, 2])[:, None], level)[0]
  return Comparison(diff=np.asarray(d.mean()), diff_se=np.asarray(se), diff_ci=ci,
                    objective_a=np.asarray(a.objective), objective_b=np.asarray(b.objective))


def _check_args(traces, folds, candidates):
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  folds = validation.check_positive_int("folds", folds)
  if not 2 <= folds <= traces.num_samples:
    raise ValueError(f"folds = {folds} must lie in [2, N = {traces.num_samples}]")
  candidates = tuple(candidates)
  if not candidates:
    raise ValueError("candidates: empty (need at least one)")
  for c in candidates:
    if not isinstance(c, Candidate):
      raise ValueError(f"candidates: expected Candidate objects, got {type(c).__name__}")
    if c.score is not None:
      trace_scores(traces, c.score)  # ValueError naming a missing signal
    if c.ttamer:                     # before any work: the batch pads every table to its K
      check_table_bytes(c.num_states, max(traces.num_stages - 1, 1))
  names = [c.name for c in candidates]
  if len(set(names)) != len(names):
    dup = next(x for i, x in enumerate(names) if x in names[:i])
    raise ValueError(f"candidates: {dup!r} appears twice")
  return folds, candidates


def fit_policy(traces: ExitTraces, lam: float | None = None, *, tolerance: float | None = None,
               folds: int = 5, candidates: Sequence[Candidate] | None = None,
               key: chex.PRNGKey | None = None, num_resamples: int = 1000, level: float = 0.95,
               progress: bool = False) -> PolicySelection:
  """Chooses, by cross-fitting on ``traces``, the policy to deploy (module docstring).

  Args:
    traces: calibration traces (the only data the choice sees).
    lam: minimise the cross-fitted ``J = lam * error + (1 - lam) * cost_norm``; or
    tolerance: least cross-fitted cost whose cross-fitted error is within this of the
      last exit's error (``ttamer fit --lam auto``); the operating point of every
      candidate (a model's ``lam``, a rule's parameter) is chosen the same way on
      each training split.
    folds: cross-fitting folds.
    candidates: default :func:`default_candidates`.
    key: PRNG key of the folds and the bootstrap (default ``PRNGKey(0)``).
    num_resamples, level: bootstrap of the reported intervals.
    progress: a progress line per candidate.

  Returns:
    A :class:`~ttamer_jax.evaluation.PolicySelection`: the chosen policy refitted on all
    of ``traces``, every candidate's cross-fitted scores and the model check.
  """
  validation.refuse_traced(
      "fit_policy", "inside jit, fit bins outside (ttamer_jax.fit_discretiser), then "
      "ttamer_jax.fit_cascade_arrays with fold weights, ttamer_jax.solve_recall and "
      "ttamer_jax.replay (docs/jit.md)", traces=traces, lam=lam)
  return select(traces, OperatingPoint(lam=lam, tolerance=tolerance), folds=folds,
                candidates=candidates, key=key, num_resamples=num_resamples, level=level,
                progress=progress)


def select(traces: ExitTraces, point: "OperatingPoint", *, folds: int = 5,
           candidates: Sequence[Candidate] | None = None, key: chex.PRNGKey | None = None,
           num_resamples: int = 1000, level: float = 0.95,
           progress: bool = False) -> PolicySelection:
  """:func:`fit_policy` at an operating point already validated (``ttamer fit`` builds one
  from its flags); the arguments and the result are :func:`fit_policy`'s.

  Args:
    traces: calibration traces ``[N, n]``.
    point: least ``J`` at ``point.lam``, or least cost within ``point.tolerance``.
    folds, candidates, key, num_resamples, level, progress: as :func:`fit_policy`.

  Returns:
    The :class:`PolicySelection`.
  """
  lam, tolerance = point.lam, point.tolerance
  candidates = default_candidates(traces) if candidates is None else candidates
  folds, candidates = _check_args(traces, folds, candidates)
  # Keys drawn on the host: jax.random.split / fold_in would each compile a program.
  key = np.zeros(2, np.uint32) if key is None else key
  k_folds, k_inner, k_boot, _ = crossfit.subkeys(key, 4)
  ids = answer_models.fold_ids(k_folds, traces.num_samples, folds)
  full = traces.full_cost()
  reference = float(np.mean(np.asarray(traces.losses, np.float64)[:, -1]))
  batch = _cross_fit_batched(candidates, traces, ids, folds, point, k_inner, progress=progress)
  outcomes = batch.outcomes
  scores = _scores(candidates, outcomes, point.lam, full)
  notes, met = [], None
  if lam is not None:
    chosen = one_se_choice(scores)
    order = sorted(scores, key=lambda s: s.objective)
  else:
    chosen, met = cheapest_within_tolerance(scores, reference, tolerance)
    if not met:
      notes.append(f"no candidate reaches the tolerance: the least cross-fitted error is "
                   f"{chosen.error:.4f}, the last exit's {reference:.4f} + tolerance "
                   f"{tolerance:g}; returning the most accurate validated policy")
    order = sorted(scores, key=lambda s: (s.error > reference + tolerance, s.cost_norm, s.error))
  index_of = {s.candidate: i for i, s in enumerate(scores)}
  ranked = [chosen] + [s for s in order if s is not chosen]
  checked = next((s for s in ranked if s.candidate.ttamer), None)
  extra = None
  if checked is not None:   # the model check's in-sample replay joins the one bootstrap
    loss, cost, pred, solved_lam = batch.in_sample[index_of[checked.candidate]]
    # J at the target lam, or (tolerance mode) at the lam the refit was solved at.
    j_lam = point.lam if point.lam is not None else solved_lam
    extra = np.stack([loss, _cost_share(cost, full), normalised_objective(loss, cost, j_lam, full)],
                     axis=1)
  scores, extra_means = _bootstrapped(scores, outcomes, point.lam, full, k_boot, num_resamples,
                                      level, extra)
  chosen, *rest = [scores[index_of[s.candidate]] for s in ranked]
  runner = rest[0] if rest else None
  versus = None if runner is None else _paired(chosen, runner, level)
  final = batch.final(index_of[chosen.candidate])
  check = None
  if checked is not None:
    checked = scores[index_of[checked.candidate]]
    check = _model_check_of(checked, extra, extra_means, pred, j_lam, level)
    if check.warning():
      notes.append(check.warning())
  return PolicySelection(
      lam=point.lam, tolerance=tolerance, folds=folds, scores=tuple([chosen] + rest),
      chosen=chosen, runner_up=runner, versus_runner_up=versus, deployed=final.deployed,
      fitted=final.fitted, solve_lam=final.param if chosen.candidate.ttamer else None,
      tolerance_met=met, reference_error=reference, full_cost=full, model_check=check,
      notes=tuple(notes), refits=lambda c: batch.final(index_of[c]))


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """How a candidate's operating point is chosen on the traces it is fitted on:
  least ``J`` at ``lam``, or least cost within ``tolerance`` of the last exit's error.

  The one form ``lam`` takes on the fitting path, validated here, where it enters.

  Attributes:
    lam: trade-off weight in ``[0, 1]`` (a Python float), or ``None`` in tolerance mode.
    tolerance: error tolerance ``>= 0`` (a Python float), or ``None`` with ``lam``.

  Raises:
    ValueError: both or neither given, ``lam`` outside ``[0, 1]`` or not a finite
      scalar, ``tolerance`` negative or not finite.
  """

  lam: float | None
  tolerance: float | None

  def __post_init__(self):
    if (self.lam is None) == (self.tolerance is None):
      raise ValueError("give exactly one of lam (minimise J) and tolerance (least cost within "
                       "tolerance of the last exit's error)")
    if self.lam is not None:
      validation.check_scalar_lam(self.lam)
      object.__setattr__(self, "lam", float(self.lam))
    else:
      object.__setattr__(self, "tolerance",
                         float(validation.as_nonnegative_scalar("tolerance", self.tolerance)))

  def pick(self, error: np.ndarray, cost_norm: np.ndarray, reference: float) -> int:
    """Row of a grid's ``(error, cost_norm)`` (ties: the first row)."""
    if self.lam is not None:
      return int(np.argmin(self.lam * error + (1 - self.lam) * cost_norm))
    i, _ = cheapest_within(cost_norm, error, reference, self.tolerance)
    return i


def _model_check_of(score: CandidateScore, columns, resample_means, pred, lam: float,
                    level: float) -> model_check.ModelCheck:
  """The model check of a candidate: what its refit's model predicts next to its replay
  on every request (in sample; ``columns [N, 3]`` of loss, cost share and ``J`` and their
  ``resample_means [R, 3]``), and what the fold models predicted next to the
  cross-fitted replay."""
  with_j = lambda err_cost: np.asarray([*err_cost, lam * err_cost[0] + (1 - lam) * err_cost[1]])
  in_sample = model_check.quantities(with_j(pred), columns.mean(axis=0),
                                     percentile_ci(resample_means, level))
  cross = model_check.quantities(with_j(score.modelled), *score.measured(lam, level))
  return model_check.ModelCheck(policy=score.name, lam=lam, in_sample=in_sample,
                                cross_fitted=cross)


# Simplicity of the simple rules (fewest fitted parameters first).
RULE_ORDER = ("fixed_exit", "confidence", "patience", "per_stage")


def cheapest_within_tolerance(scores: Sequence[CandidateScore], reference: float,
                              tolerance: float) -> tuple[CandidateScore, bool]:
  """Tolerance mode's choice: ``(the least cross-fitted cost whose cross-fitted error is
  within tolerance of reference (ties: a T-Tamer design, then less error), True)``, or
  ``(the most accurate, False)`` when none is."""
  ok = [s for s in scores if s.error <= reference + tolerance]
  if ok:
    return min(ok, key=lambda s: (s.cost_norm, not s.candidate.ttamer, s.error)), True
  return min(scores, key=lambda s: (s.error, s.cost_norm)), False


def best_simple_rule(sel: PolicySelection) -> CandidateScore | None:
  """The simple rule ``sel`` would have deployed had only the rules been candidates:
  least cross-fitted ``J`` among them (``lam`` mode), or tolerance mode's choice among
  them; ``None`` without rules. Deploy it with ``sel.refit_of(rule.candidate)`` -- the
  baseline a careful user of thresholds would have tuned on the same calibration split.
  """
  rules = [s for s in sel.scores if not s.candidate.ttamer]
  if not rules:
    return None
  if sel.lam is not None:
    return min(rules, key=lambda s: s.objective)
  return cheapest_within_tolerance(rules, sel.reference_error, sel.tolerance)[0]


def simplicity(candidate: Candidate) -> tuple:
  """Sort key, simplest first: simple rules, then T-Tamer designs by number of states,
  then by richness (plain exit bins, agreement features, posterior answers; more
  smoothing counts as simpler, a recall index as richer than a stop table)."""
  if not candidate.ttamer:
    return (0, RULE_ORDER.index(candidate.kind), 0, 0, 0.0)
  richness = (2 if candidate.answers == "posterior" else 0) + (1 if candidate.feature else 0)
  return (1, candidate.num_states, richness, int(candidate.kind == "recall"),
          -candidate.smoothing)


def paired_se(a: CandidateScore, b: CandidateScore) -> tuple[float, float]:
  """``(mean, standard error)`` of ``a - b`` request by request."""
  d = a.per_request - b.per_request
  return float(d.mean()), float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0


# A T-Tamer design competes with the best simple rule only when it beats that rule by
# more than this many paired standard errors of cross-fitted J: with 20-30 designs and a
# few hundred requests, a smaller lead is mostly the winner's curse (BENCHMARKS.md,
# "the choice rule": 0 of 225 held-out cells lost to the best rule by > 2 SE).
EARN_SE = 3.0


def one_se_choice(scores: list[CandidateScore]) -> CandidateScore:
  """The candidate to deploy, from the cross-fitted scores.

  1. The best simple rule (least cross-fitted ``J`` among the rules) is the default.
  2. A T-Tamer design competes only if it beats that rule by more than
     :data:`EARN_SE` paired standard errors (without rules among the candidates,
     every design competes).
  3. Among the default and the designs that compete, the one-standard-error rule:
     the simplest (:func:`simplicity`) whose ``J`` is within one paired standard
     error of the least.

  The least cross-fitted ``J`` of many candidates is biased low (the winner's curse
  of the best of many noisy estimates): on 449 calibration requests the richest
  design won by 0.004 +- 0.006 and lost to one confidence threshold on held-out
  traffic at every lam. Steps 1-2 make a design earn its place against what a careful
  user of thresholds would deploy; step 3 prefers the simpler among designs the
  data cannot tell apart.
  """
  rules = [s for s in scores if not s.candidate.ttamer]
  if rules:
    default = min(rules, key=lambda s: s.objective)
    competing = [default]
    for s in scores:
      if s.candidate.ttamer:
        mean, se = paired_se(s, default)
        if mean < -EARN_SE * se:
          competing.append(s)
  else:
    competing = list(scores)
  return simplest_within_one_se(competing)


def simplest_within_one_se(scores: list[CandidateScore]) -> CandidateScore:
  """The one-standard-error rule: the simplest (:func:`simplicity`) of ``scores`` whose
  cross-fitted ``J`` is within one paired standard error of the least."""
  best = min(scores, key=lambda s: s.objective)
  tied = [s for s in scores if s is best or np.less_equal(*paired_se(s, best))]
  return min(tied, key=lambda s: (simplicity(s.candidate), s.objective))


def _last_exit_error(traces: ExitTraces) -> float:
  return float(np.mean(np.asarray(traces.losses, np.float64)[:, -1]))


def _cross_fitted(cand, traces, splits, point, key, cache):
  """Out-of-fold ``(loss [N], cost [N], params [F], modelled [2] or None)`` of a candidate,
  fitted fold by fold on the host: the reference the batched programs are tested against."""
  num = traces.num_samples
  loss, cost, params, modelled = np.zeros(num), np.zeros(num), [], []
  fold_keys = crossfit.subkeys(key, len(splits) + 1)      # as the batched path's inner folds
  for f, (train_idx, held_idx) in enumerate(splits):
    train, held = traces.subset(train_idx), traces.subset(held_idx)
    fold_key = fold_keys[f]
    virtual = None
    if cand.ttamer and cand.answers == "posterior":
      ck = ("posterior", cand.score, f)
      if ck not in cache:
        cache[ck] = posterior_traces(train, cand.score, key=fold_key)
      virtual = cache[ck]
    fitted_candidate = fit_at(cand, train, point, key=fold_key, virtual=virtual)
    res = replay_traces(fitted_candidate.deployed, held)
    loss[held_idx] = np.asarray(res.loss, np.float64)
    cost[held_idx] = np.asarray(res.cost, np.float64)
    params.append(fitted_candidate.param)
    if cand.ttamer:  # what this fold's model predicts for the fold it does not see
      modelled.append(held_idx.size * model_check.predicted(
          fitted_candidate.fitted, fitted_candidate.deployed, 1.0)[:2])
  pred = np.sum(modelled, axis=0) / num if modelled else None
  return loss, cost, np.asarray(params), pred


def fit_at(candidate: Candidate, traces: ExitTraces, point: OperatingPoint, *,
           key: chex.PRNGKey, virtual: ExitTraces | None = None) -> FittedCandidate:
  """The candidate fitted on ``traces`` at the operating point ``point`` chosen there.

  T-Tamer at a given ``lam`` is solved at that ``lam``; in tolerance mode its
  ``lam`` is the cheapest of :data:`~ttamer_jax.evaluation.frontier.LAMS` within
  tolerance when replayed on ``traces`` (the cross-fitted virtual traces for posterior
  answers). Rules take
  thresholds from ``traces`` and the parameter best there.
  """
  if candidate.ttamer:
    if candidate.answers == "posterior" and virtual is None:
      virtual = posterior_traces(traces, candidate.score, key=key)
    fitted = fit_model(candidate, traces, key=key, virtual=virtual)
    lam = point.lam
    if lam is None:
      model_only = dataclasses.replace(fitted, answers=None)
      on = traces if virtual is None else virtual
      sweep = (sweep_recall if candidate.kind == "recall" else sweep_no_recall)(
          model_only, on, LAMS)
      i = point.pick(np.asarray(sweep.error), np.asarray(sweep.cost_norm), _last_exit_error(on))
      lam = float(LAMS[i])
    deployed = (fitted.recall_policy(lam) if candidate.kind == "recall"
                else fitted.no_recall_policy(lam))
    return FittedCandidate(candidate, deployed, fitted, lam)
  policies, params = _rule_grid(candidate, traces)
  sweep = sweep_policies(policies, params, traces, score_name=candidate.score)
  i = point.pick(np.asarray(sweep.error), np.asarray(sweep.cost_norm), _last_exit_error(traces))
  return FittedCandidate(candidate, rule_policy(candidate, traces, float(params[i])), None,
                         float(params[i]))


def refit(candidate: Candidate, traces: ExitTraces, point: OperatingPoint, *,
          key: chex.PRNGKey) -> FittedCandidate:
  """The chosen candidate fitted on all of ``traces`` (operating point chosen there)."""
  return fit_at(candidate, traces, point, key=key)


# ------------------------------------------------------------------ batched cross-fitting
@dataclasses.dataclass(frozen=True)
class _Batch:
  """Outcomes of every candidate of one selection, cross-fitted in batched programs.

  Attributes:
    outcomes: per candidate ``(loss [N], cost [N], params [F], modelled [2] or None)``,
      each request's outcome from the fold that did not see it.
    builders: per candidate, a function building the refit on every request (a
      :class:`FittedCandidate`) from the batch's last "fold".
    in_sample: per T-Tamer candidate ``(loss [N], cost [N], predicted [2], lam)``: the
      refit replayed on every request, what its model predicts, the lam it was solved at.
  """

  outcomes: list
  builders: dict
  in_sample: dict

  def final(self, index: int) -> FittedCandidate:
    return self.builders[index]()


@dataclasses.dataclass(frozen=True)
class _Folds:
  """What every family of one selection shares (host arrays, requests padded to ``size``).

  Attributes:
    traces: the calibration traces.
    ids: ``[N]`` fold of each request.
    weights: ``[G, size]`` training weights of the ``G = F + 1`` fits (the last: every request).
    train: the ``G`` index arrays of those training requests.
    full: ``[G]`` mean raw cost of running every stage on each fit's training requests.
    unit_costs: ``[G, n]`` unit-free stage costs of each fit's training requests.
    raw_costs: ``[n]`` or ``[size, n]`` raw costs of the replays.
    point: how operating points are chosen (``lam``, or ``tolerance``).
  """

  traces: ExitTraces
  ids: np.ndarray
  weights: np.ndarray
  train: tuple
  full: np.ndarray
  unit_costs: np.ndarray
  raw_costs: np.ndarray
  point: "OperatingPoint"

  @property
  def groups(self) -> int:
    return self.weights.shape[0]

  @property
  def size(self) -> int:
    return self.weights.shape[1]

  def out_of_fold(self, per_fit: np.ndarray, first: int) -> np.ndarray:
    """``[N]`` each request's value from the fit (rows ``first..first+F``) that held it out."""
    num = self.ids.size
    return np.asarray(per_fit[first + self.ids, np.arange(num)], np.float64)

  def point_args(self, dtype) -> tuple:
    lam, tol = self.point.lam, self.point.tolerance
    return (np.asarray(0.0 if lam is None else lam, dtype),
            np.asarray(0.0 if tol is None else tol, dtype), lam is None)


def _folds(traces: ExitTraces, ids: np.ndarray, folds: int, point: "OperatingPoint") -> _Folds:
  size = request_bucket(traces.num_samples)
  weights = crossfit.fold_weights(ids, folds, size)
  train = tuple(np.flatnonzero(w[:traces.num_samples] > 0) for w in weights)
  row_costs = np.asarray(traces.cost_matrix(), np.float64)
  raw = np.asarray(traces.costs, np.float64)
  return _Folds(traces=traces, ids=ids, weights=weights, train=train,
                full=np.asarray([row_costs[t].sum(1).mean() for t in train]),
                unit_costs=np.stack([unit_free_costs(row_costs[t].mean(0))[0] for t in train]),
                raw_costs=pad_requests(raw, size) if raw.ndim == 2 else raw, point=point)


class _Tables:
  """Score tables the T-Tamer instances read: one per exit signal, two per (posterior
  signal, fit) -- the fit's training view and its replay view."""

  def __init__(self, size: int):
    self.size, self.index, self.bins = size, {}, {}
    self.scores, self.preds, self.losses = [], [], []

  def discretiser(self, table: int, train: np.ndarray, fold: int, bins: int, binning: str,
                  feature) -> Discretiser:
    """Bins of a table's training scores, fitted once for every candidate that shares
    them (recall and no-recall candidates of one design bin alike)."""
    key = (table, fold, bins, binning, feature)
    if key not in self.bins:
      states = bins * (1 if feature is None else 2)
      self.bins[key] = fit_discretiser(np.asarray(self.scores[table][train], np.float64), states,
                                       binning=binning, feature=feature)
    return self.bins[key]

  def add(self, name, scores, preds, losses) -> None:
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    self.index[name] = len(self.scores)
    self.scores.append(pad_requests(np.asarray(scores, np.float32), self.size))
    self.preds.append(pad_requests(np.asarray(preds, np.int32), self.size))
    self.losses.append(pad_requests(np.asarray(losses, dtype), self.size))

  def stacked(self) -> tuple:
    return tuple(np.stack(t) for t in (self.scores, self.preds, self.losses))


def _cross_fit_batched(candidates, traces: ExitTraces, ids: np.ndarray, folds: int, point,
                       key, progress: bool = False) -> _Batch:
  """Every candidate cross-fitted over ``folds`` and refitted on all requests, in one
  program per family (:mod:`ttamer_jax.evaluation.crossfit`). ``point``: an
  :class:`OperatingPoint`."""
  ctx = _folds(traces, ids, folds, point)
  outcomes: list = [None] * len(candidates)
  builders, in_sample = {}, {}
  ttamer = [(i, c) for i, c in enumerate(candidates) if c.ttamer]
  rules = [(i, c) for i, c in enumerate(candidates) if not c.ttamer]
  tables = _Tables(ctx.size)
  losses, preds = np.asarray(traces.losses, np.float64), np.asarray(traces.preds)
  for _, c in ttamer:
    if c.answers == "exits" and ("exits", c.score) not in tables.index:
      tables.add(("exits", c.score), trace_scores(traces, c.score), preds, losses)
  answers: dict = {}
  steps = [(f"posterior calibrators ({score or 'scores'})",
            functools.partial(lambda s: answers.update({s: _posterior_tables(
                ctx, s or None, key, tables)}), score))
           for score in sorted({c.score or "" for _, c in ttamer if c.answers == "posterior"})]
  for kind in TTAMER_KINDS:
    members = [(i, c) for i, c in ttamer if c.kind == kind]
    if members:
      steps.append((f"{kind} optima", functools.partial(
          _ttamer_family, ctx, kind, members, tables, answers, outcomes, builders, in_sample)))
  if rules:
    steps.append(("simple rules", functools.partial(_rule_families, ctx, rules, outcomes, builders)))
  plural = "s" if len(candidates) != 1 else ""
  for _, step in progress_iter(steps, desc=f"fit: cross-fitting {len(candidates)} candidate{plural} "
                               f"x {folds} folds", enabled=progress):
    step()
  return _Batch(outcomes=outcomes, builders=builders, in_sample=in_sample)


INNER_FOLDS = 3  # cross-fitting of the posterior-answer states inside each fit


def _posterior_tables(ctx: _Folds, score, key, tables: _Tables):
  """Virtual posterior-answer tables of every fit (its training view: nested
  cross-fitted calibrators; its replay view: the calibrator of all its training
  requests), every calibrator fitted in one program. Returns the refit's
  :class:`~ttamer_jax.data.AnswerModel`."""
  traces = ctx.traces
  num = traces.num_samples
  scores = np.asarray(trace_scores(traces, score), np.float64)
  preds = np.asarray(traces.preds, np.int32)
  losses = np.asarray(traces.losses, np.float64)
  unit, loss_scale = answer_models.calibration_scales(scores, losses)
  model_w, inner_ids = [], []
  for g, k in enumerate(crossfit.subkeys(key, ctx.groups)):
    t = ctx.train[g]
    inner = answer_models.fold_ids(k, t.size, min(INNER_FOLDS, t.size))
    inner_ids.append(inner)
    for h in range(INNER_FOLDS + 1):          # the inner fits, then all of t
      w = np.zeros(ctx.size)
      w[t[inner != h] if h < INNER_FOLDS else t] = 1.0
      model_w.append(w)
  per = INNER_FOLDS + 1
  views = []                        # per fit: its training view, then its replay view
  for g in range(ctx.groups):
    own = np.full(ctx.size, g * per + INNER_FOLDS)
    nested = own.copy()
    nested[ctx.train[g]] = g * per + inner_ids[g]
    views += [nested, own]
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  pad = lambda x: pad_requests(x, ctx.size)
  aw, mean, scale, conf, answer = (np.asarray(x) for x in crossfit.answer_fits(
      pad(scores).astype(dtype), pad(preds), (pad(losses) / loss_scale).astype(dtype),
      np.stack(model_w).astype(dtype), unit, np.stack(views).astype(np.int32)))
  rows = np.arange(num)[:, None]
  for g in range(ctx.groups):
    for v, name in enumerate(("fit", "replay")):
      c, a = conf[2 * g + v, :num], answer[2 * g + v, :num]                    # [N, n]
      tables.add(("posterior", score or "", g, name), c, preds[rows, a], losses[rows, a])
  last = ctx.groups * per - 1
  return answer_models.AnswerModel(
      weights=aw[last], mean=mean[last], scale=scale[last], loss_scale=np.asarray(loss_scale),
      score_name=score or "scores", unit_scores=unit)


def _pow2(x: int) -> int:
  return 1 << max(0, int(np.ceil(np.log2(max(x, 1)))))


def _ttamer_family(ctx: _Folds, kind, members, tables: _Tables, answers, outcomes, builders,
                   in_sample):
  """Every (candidate, fit) of one solver kind as one :func:`crossfit.ttamer_outcomes` call."""
  n, groups = ctx.traces.num_stages, ctx.groups
  k_pad = _pow2(max(c.num_states for _, c in members))
  b_pad = _pow2(max(c.num_states // (2 if c.feature else 1) for _, c in members))
  rows, discs = [], []
  for _, c in members:
    bins = c.num_states // 2 if c.feature else c.num_states
    if c.feature and c.num_states % 2:
      raise ValueError(f"candidates: {c.name} has an odd number of states with a feature")
    for g in range(groups):
      if c.answers == "exits":
        fit_t = rep_t = tables.index[("exits", c.score)]
      else:
        fit_t = tables.index[("posterior", c.score or "", g, "fit")]
        rep_t = tables.index[("posterior", c.score or "", g, "replay")]
      disc = tables.discretiser(fit_t, ctx.train[g], g, bins, c.binning, c.feature)
      discs.append(disc)
      edges = np.full((n, b_pad - 1), np.inf, np.float32)   # +inf: padding bins never reached
      edges[:, :bins - 1] = np.asarray(disc.edges)
      rows.append((fit_t, rep_t, g, edges, crossfit.FEATURE_CODES[c.feature], c.num_states,
                   c.smoothing, ctx.unit_costs[g], ctx.full[g]))
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  cols = list(zip(*rows))
  inst = crossfit.Instances(
      fit_table=np.asarray(cols[0], np.int32), replay_table=np.asarray(cols[1], np.int32),
      fold=np.asarray(cols[2], np.int32), edges=np.stack(cols[3]),
      feature=np.asarray(cols[4], np.int32), num_states=np.asarray(cols[5], np.int32),
      smoothing=np.asarray(cols[6], dtype), costs=np.asarray(cols[7], dtype),
      full=np.asarray(cols[8], dtype))
  lam, tol, by_tolerance = ctx.point_args(dtype)
  out = crossfit.ttamer_outcomes(inst, *tables.stacked(), ctx.weights.astype(dtype), k_pad,
                                 kind == "recall", by_tolerance, ctx.raw_costs.astype(dtype), lam,
                                 LAMS.astype(dtype), tol)
  out = jax.tree_util.tree_map(np.asarray, out)
  if ctx.point.lam is not None:   # the given lam itself, not its float32 copy
    out = dataclasses.replace(out, lam=np.full(out.lam.shape, ctx.point.lam))
  num = ctx.traces.num_samples
  held = np.bincount(ctx.ids, minlength=groups - 1)[:groups - 1]
  for m, (i, c) in enumerate(members):
    first, last = m * groups, m * groups + groups - 1
    modelled = (held[:, None] * out.modelled[first:last]).sum(0) / num
    outcomes[i] = (ctx.out_of_fold(out.loss, first), ctx.out_of_fold(out.cost, first),
                   out.lam[first:last].astype(np.float64), modelled.astype(np.float64))
    in_sample[i] = (out.loss[last, :num].astype(np.float64), out.cost[last, :num].astype(np.float64),
                    out.modelled[last].astype(np.float64), float(out.lam[last]))
    builders[i] = functools.partial(_ttamer_final, c, out, last, discs[last], ctx.traces,
                                    answers.get(c.score or "") if c.answers == "posterior" else None)


def _ttamer_final(c, out, last, disc, traces, answers) -> FittedCandidate:
  """The refit (last fit: every request) as a deployable :class:`FittedCandidate`,
  its tables cut back to the candidate's own ``K``."""
  k, lam = c.num_states, float(out.lam[last])
  costs, full = unit_free_costs(mean_stage_costs(traces))
  cascade = Cascade(values=out.values[last][:, :k], init=out.init[last][:k],
                    trans=out.trans[last][:, :k, :k], costs=costs)
  fitted = FittedCascade(cascade=cascade, discretiser=disc, counts=np.rint(out.counts[last][:, :k]),
                         cost_scale=np.asarray(full),
                         score_name=(c.score or "scores") if c.answers == "exits" else "scores",
                         answers=answers)
  if c.kind == "recall":
    policy = RecallPolicy(index=out.table[last][:, :k], values=cascade.values,
                          lam=np.asarray(out.lam[last], np.asarray(cascade.values).dtype))
  else:
    policy = NoRecallPolicy(stop=out.table[last][:, :k] > 0.5)
  return FittedCandidate(c, fitted.deploy(policy), fitted, lam)


def _rule_grids(ctx: _Folds, family: str, members, scores):
  """``(policies with leading axes [len(members) * G, P], params [P])`` of one rule
  family: thresholds at quantiles of each fit's training scores, or fixed grids."""
  n, groups = ctx.traces.num_stages, ctx.groups
  reps = len(members) * groups
  if family == "patience":
    p = np.arange(1, n + 1)
    return PatiencePolicy(patience=np.tile(p, (reps, 1)), num_stages=n), p.astype(float)
  if family == "fixed_exit":
    p = np.arange(n)
    return FixedExitPolicy(exit_stage=np.tile(p, (reps, 1)), num_stages=n), p.astype(float)
  grids = [rule_thresholds(c.kind, scores[t]) for _, c in members for t in ctx.train]
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  return ThresholdPolicy(thresholds=np.stack(grids).astype(dtype)), RULE_LEVELS


def _rule_families(ctx: _Folds, rules, outcomes, builders):
  """Every (rule, fit) as one :func:`crossfit.rule_outcomes` call per policy type."""
  traces, groups = ctx.traces, ctx.groups
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  preds = pad_requests(np.asarray(traces.preds, np.int32), ctx.size)
  losses = pad_requests(np.asarray(traces.losses, dtype), ctx.size)
  calls: dict = {}
  for i, c in rules:
    family = "threshold" if c.kind in ("confidence", "per_stage") else c.kind
    calls.setdefault((family, c.score if family == "threshold" else None), []).append((i, c))
  lam, tol, by_tolerance = ctx.point_args(dtype)
  for (family, score), members in calls.items():
    scores = (np.asarray(trace_scores(traces, score), dtype) if family == "threshold"
              else np.zeros(np.shape(traces.losses), dtype))
    policies, params = _rule_grids(ctx, family, members, scores)
    reps = len(members)
    picked, loss, cost = (np.asarray(x) for x in crossfit.rule_outcomes(
        policies, pad_requests(scores, ctx.size), preds, losses,
        ctx.raw_costs.astype(dtype), np.tile(ctx.weights, (reps, 1)).astype(dtype),
        np.tile(ctx.full, reps).astype(dtype), lam, tol, by_tolerance))
    for m, (i, c) in enumerate(members):
      first, last = m * groups, m * groups + groups - 1
      outcomes[i] = (ctx.out_of_fold(loss, first), ctx.out_of_fold(cost, first),
                     params[picked[first:last]].astype(np.float64), None)
      builders[i] = functools.partial(_rule_final, c, traces, float(params[picked[last]]))


def _rule_final(c, traces, param) -> FittedCandidate:
  return FittedCandidate(c, rule_policy(c, traces, param), None, param)
