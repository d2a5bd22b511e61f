"""The bodies of the ``ttamer`` commands: one function per command but ``demo``
(:func:`ttamer_jax.app.demo.run_demo`) and ``bench`` (the harness in ``benchmarks/``).

Each takes the command's options as arguments, checks its input files and output
paths before any work (:mod:`ttamer_jax.data.paths`), raises ``ValueError`` (one line)
on bad input and writes nothing then, and returns a :class:`~.reports.Run`: the JSON
result, and what the text report adds (:mod:`.reports` turns it into text).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from ttamer_jax.app import compare, reports
from ttamer_jax.app.reports import Run
from ttamer_jax.core import solvers
from ttamer_jax.data import policy_io
from ttamer_jax.data.cascade_io import load_cascade, save_cascade
from ttamer_jax.data.discretise import PRIMARY_SCORE
from ttamer_jax.data.files import interrupts_deferred
from ttamer_jax.data.paths import (
  check_distinct,
  check_input,
  check_matplotlib,
  check_output,
  check_outputs,
  read_traces_file,
)
from ttamer_jax.data.traces import ExitTraces, split_traces
from ttamer_jax.evaluation import metrics, selection


def check_plot(path: str, what: str = "--plot") -> str:
  """A plot to write: its folder must exist and be writable, its name must end in an
  image type matplotlib writes (``.png``, ``.pdf``, ``.svg``, ...), and matplotlib
  must be installed -- checked before any work."""
  from ttamer_jax.app import plotting

  check_output(path, "plot")
  check_matplotlib(what)
  return plotting.check_image_path(path, what)


def _check_feature(feature: str | None, states: int) -> None:
  if feature == "agree_prev" and states % 2:
    raise ValueError(f"--states {states} must be even with --feature agree_prev")


CANDIDATE_SETS = ("auto", "all", "ttamer", "recall")


def fit_candidates(traces: ExitTraces, which: str, *, states: int | None, score: str | None,
                   feature: str | None, binning: str | None) -> tuple:
  """The candidates of ``ttamer fit --candidates which``: ``"all"`` (every default
  candidate: T-Tamer designs and simple rules), ``"ttamer"`` (the T-Tamer ones),
  ``"recall"`` (only the recall optimum of the ``states``/``score``/``feature``/
  ``binning`` design: still cross-fitted and model-checked) or ``"auto"``: ``"recall"``
  when a state design (``states``, ``feature`` or ``binning``) is given, else ``"all"``.
  ``states=None`` / ``binning=None``: 8 / quantile."""
  if which not in CANDIDATE_SETS:
    raise ValueError(f"candidates: must be one of {CANDIDATE_SETS}, got {which!r}")
  if which == "auto":
    which = "recall" if any(x is not None for x in (states, feature, binning)) else "all"
  states = 8 if states is None else states
  binning = "quantile" if binning is None else binning
  if which == "recall":
    return (selection.Candidate("recall", None if score == PRIMARY_SCORE else score, states,
                                binning=binning, feature=feature),)
  cands = selection.default_candidates(traces)
  return tuple(c for c in cands if c.ttamer) if which == "ttamer" else cands


def fit(traces_path: str, out: str, *, states: int | None = None, lam: float | None = None,
        tolerance: float = 0.01, score: str | None = None, feature: str | None = None,
        binning: str | None = None, cascade_out: str | None = None, candidates: str = "auto",
        folds: int = 5, seed: int = 0, progress: bool = False) -> Run:
  """``ttamer fit``: chooses a policy by cross-fitting on a traces file and saves it.

  :func:`~ttamer_jax.fit_policy` replays every candidate (T-Tamer optima over several
  state designs, and the simple rules) out of fold on the traces and keeps the best
  by replay, never by a model's own value. ``lam=None`` (``--lam auto``): the least
  cross-fitted cost whose cross-fitted error is within ``tolerance`` of the last exit's
  (when none is, the most accurate candidate, and the result says so); ``tolerance`` is
  ignored when ``lam`` is given. ``lam`` and ``tolerance`` become one
  :class:`~ttamer_jax.evaluation.selection.OperatingPoint`, validated before any work. Saves the policy
  to ``out`` (+ its JSON sidecar) and, with ``cascade_out``, the chosen model's
  fitted cascade (none when a simple rule is chosen). Result: ``{policy, metadata,
  lam, lam_choice, in_sample, selection, cascade}``.
  """
  point = selection.OperatingPoint(lam=lam, tolerance=tolerance if lam is None else None)
  check_input(traces_path, "traces")
  outputs = [("--out", out, "policy")]
  if out:  # save_policy writes a .json copy beside the policy
    outputs.append(("the .json copy of --out", policy_io.sidecar_path(out), "policy metadata"))
  if cascade_out is not None:
    outputs.append(("--cascade-out", cascade_out, "cascade"))
  check_outputs(outputs, traces_path)
  _check_feature(feature, 8 if states is None else states)
  if folds < 2:
    raise ValueError(f"--folds {folds}: cross-fitting needs at least 2 folds")
  traces = read_traces_file(traces_path)
  if folds > traces.num_samples:
    count = f"{traces.num_samples} request{'s' if traces.num_samples > 1 else ''}"
    raise ValueError(f"{traces_path}: {count}, fewer than --folds {folds} "
                     "(cross-fitting needs a request in every fold)")
  score, _, _ = compare.resolve_signals(traces, score)
  cands = fit_candidates(traces, candidates, states=states, score=score, feature=feature,
                         binning=binning)
  sel = selection.select(traces, point, folds=folds, candidates=cands,
                         key=jax.random.PRNGKey(seed), progress=progress)
  report_lam = sel.solve_lam if sel.solve_lam is not None else point.lam
  if point.lam is None:
    how = (f"auto: least cross-fitted cost within {reports.tolerance_text(tolerance)} of the last "
           "exit's error" if sel.tolerance_met else
           "auto: no candidate within the tolerance; the most accurate validated policy")
  else:
    how = "given"
  full_error = sel.reference_error
  j_lam = 1.0 if report_lam is None else report_lam
  ev = metrics.evaluate(sel.deployed, traces, j_lam, num_resamples=200)
  in_sample = dict(error=float(ev.error), cost_norm=float(ev.cost_norm), full_error=full_error,
                   num_samples=traces.num_samples)
  with interrupts_deferred():  # the policy, its copy and the cascade: all or none on Ctrl-C
    meta = policy_io.save_policy(out, sel.deployed, lam=report_lam, full_cost=sel.full_cost,
                                 metadata=dict(source="ttamer fit",
                                               traces=os.path.abspath(traces_path), lam_choice=how,
                                               chosen=sel.chosen.name,
                                               cross_fitted_objective=sel.chosen.objective,
                                               in_sample=in_sample))
    wrote_cascade = None
    if cascade_out and sel.fitted is not None:
      save_cascade(cascade_out, sel.fitted.cascade)
      wrote_cascade = cascade_out
  result = dict(policy=out, metadata=meta, lam=report_lam, lam_choice=how, in_sample=in_sample,
                selection=sel.as_dict(), cascade=wrote_cascade)
  notes = dict(num_samples=traces.num_samples, num_stages=traces.num_stages, folds=folds,
               sidecar=policy_io.sidecar_path(out), cascade_requested=cascade_out,
               warnings=[n for n in sel.notes])
  return Run(result, notes)


# Fewest held-out requests whose bootstrap intervals `ttamer evaluate` reports without a
# warning: a resample of a handful of requests repeats the same few values.
MIN_INTERVAL_REQUESTS = 30


def evaluate(policy_path: str, traces_path: str, *, lam: float | None = None,
             resamples: int = 1000, level: float = 0.95, seed: int = 0,
             log: Callable[[str], None] | None = None) -> Run:
  """``ttamer evaluate``: replays a policy file on a traces file, with bootstrap CIs.

  ``lam``: of the reported objective (default: the one the policy file records).
  When the ``.json`` copy beside the policy disagrees with the ``.npz``
  (:func:`~ttamer_jax.data.policy_io.sidecar_differences`: a hand edit), the ``.npz``
  rules and ``log`` receives one warning line saying so (also in ``warnings``).
  Result: ``{policy, traces, lam, metadata, evaluation, full_error, warnings}``.
  """
  check_input(policy_path, "policy")
  traces = read_traces_file(traces_path)
  deployed, meta = policy_io.load_policy(policy_path, with_metadata=True)
  warnings = []
  differs = policy_io.sidecar_differences(policy_path, meta)
  if differs:
    more = f"; {len(differs) - 3} more" if len(differs) > 3 else ""
    warnings.append(
        f"{policy_io.sidecar_path(policy_path)} differs from {policy_path} "
        f"({'; '.join(differs[:3])}{more}); the .npz rules, edits to the .json copy change "
        "nothing (pass --lam, or save a new policy with ttamer fit or ttamer_jax.save_policy)")
  if traces.num_samples < MIN_INTERVAL_REQUESTS:
    warnings.append(f"{traces_path} holds {traces.num_samples} request"
                    f"{'s' if traces.num_samples > 1 else ''}: the bootstrap intervals need many "
                    f"more (under {MIN_INTERVAL_REQUESTS} they understate the uncertainty"
                    f"{'; from 1 request they are a single point' if traces.num_samples == 1 else ''})")
  for line in warnings:
    (log or (lambda text: None))(f"warning: {line}")
  if deployed.num_stages != traces.num_stages:
    raise ValueError(f"{policy_path}: policy built for {deployed.num_stages} stages, but "
                     f"{traces_path} has {traces.num_stages}")
  lam = lam if lam is not None else meta.get("lam")
  if not isinstance(lam, (int, float)):
    raise ValueError(f"{policy_path}: the policy records no single lam; pass --lam")
  ev = metrics.evaluate(deployed, traces, lam, key=jax.random.PRNGKey(seed),
                        num_resamples=resamples, level=level)
  full_error = float(np.asarray(traces.losses)[:, -1].mean())
  return Run(dict(policy=policy_path, traces=traces_path, lam=float(lam), metadata=meta,
                  evaluation=ev.as_dict(), full_error=full_error, warnings=warnings),
             dict(num_samples=traces.num_samples, level=level, resamples=resamples))


def sweep(traces_path: str, *, calibration_path: str | None = None, split: float = 0.5,
          seed: int = 0, lams: Any = None, states: int = 8, score: str | None = None,
          confidence_score: str | None = None, feature: str | None = None,
          tolerance: float = 0.01, plot: str | None = None, progress: bool = False) -> Run:
  """``ttamer sweep``: every family's frontier, fitted on calibration, measured held out.

  Fits on ``calibration_path`` (or the first part of a random ``split`` of the
  traces) and measures on the traces (or the rest). ``plot``: also draw the
  Pareto plot there. Result: :func:`~.compare.summarise` plus ``{traces, calibration, how,
  lams[, plot]}``.
  """
  from ttamer_jax.app import plotting

  check_input(traces_path, "traces")
  if calibration_path:
    check_input(calibration_path, "calibration traces")
  if plot is not None:
    check_plot(plot)
    check_distinct(plot, "--plot", traces_path, calibration_path)
  _check_feature(feature, states)
  traces = read_traces_file(traces_path)
  if calibration_path:
    calibration, test = read_traces_file(calibration_path, "calibration traces"), traces
    if calibration.num_stages != test.num_stages:
      raise ValueError(f"{calibration_path}: {calibration.num_stages} stages, but {traces_path} "
                       f"has {test.num_stages}")
    how = f"fitted on {calibration_path}, measured on {traces_path}"
  else:
    calibration, test = split_traces(jax.random.PRNGKey(seed), traces, split)
    how = (f"{traces_path} split {calibration.num_samples} / {test.num_samples} at random "
           f"(seed {seed}): fitted on the first part, measured on the second")
  score, conf, entropy = compare.resolve_signals(calibration, score, confidence_score)
  compare.resolve_signals(test, score, conf)
  comp = compare.compare_policies(calibration, test, num_states=states, score=score, confidence_score=conf,
                          entropy_score=entropy, lams=lams, feature=feature, progress=progress)
  result = compare.summarise(comp, tolerance)
  result.update(traces=traces_path, calibration=calibration_path, how=how,
                lams=np.asarray(comp.lams))
  if plot is not None:
    result["plot"] = plotting.plot_pareto(
        comp.test, plot, title="held-out frontiers", cost_label="mean cost / cost of every stage",
        error_label="held-out error (mean loss)", full_error=comp.full_error["test"],
        tolerance=tolerance, points=compare.pareto_marks(result["operating_points"]))
  return Run(result, dict(score=score, confidence_score=conf, entropy_score=entropy,
                          tolerance=tolerance))


def solve(cascade_path: str, *, lams: Any = None, plot: str | None = None) -> Run:
  """``ttamer solve``: exact hindsight, recall and no-recall values of a cascade file
  for each ``lam`` (default ``0, 0.1, ..., 1``), and the recall index tables.
  ``plot``: heatmap of the index table (one ``lam`` only). Result: ``{cascade,
  num_stages, num_states, solutions: [{lam, hindsight, recall, no_recall, index}][, plot]}``.
  """
  from ttamer_jax.app import plotting

  check_input(cascade_path, "cascade")
  lams = np.linspace(0.0, 1.0, 11) if lams is None else np.atleast_1d(np.asarray(lams, np.float64))
  if plot is not None:
    check_plot(plot)
    check_distinct(plot, "--plot", cascade_path)
    if lams.size != 1:
      raise ValueError("--plot draws one index table: give a single --lam value")
  cascade = load_cascade(cascade_path)
  rows = []
  for lam in lams:
    sol = solvers.solve_recall(cascade, float(lam))
    rows.append(dict(lam=float(lam), hindsight=float(solvers.prophet_value(cascade, float(lam))),
                     recall=float(sol.value),
                     no_recall=float(solvers.solve_no_recall(cascade, float(lam)).value),
                     index=np.asarray(sol.index)))
  result = dict(cascade=cascade_path, num_stages=cascade.num_stages,
                num_states=cascade.num_states, solutions=rows)
  if plot is not None:
    result["plot"] = plotting.plot_index_heatmap(rows[0]["index"], plot, lam=rows[0]["lam"],
                                                 title="recall policy's dynamic index")
  return Run(result)
