"""The whole job on one workload: network -> traces -> fitted policy -> frontiers.

Used by ``ttamer demo`` and ``scripts/reproduce_early_exit.py``:

1. :func:`prepare` trains (or loads from a cache) the workload's early-exit network
   and records exit traces on its calibration and test splits, with per-stage costs
   measured once (wall clock, on the calibration split) and shared by both: each
   stage timed alone (``costs="measured"``) or as the serving path runs it, its
   per-stage overhead included (``costs="served"``).
2. :func:`compare_policies` fits a cascade on the calibration traces, sweeps ``lam``
   for the recall and no-recall optima, sweeps each heuristic over its own grid
   (thresholds taken from the calibration traces), and computes the hindsight
   oracle -- on both splits, so operating points can be *chosen* on calibration
   and *reported* on test.
3. :func:`operating_points` answers "at what latency does each policy stay within
   one point of the full network's accuracy?", honestly: the point is picked on
   the calibration split and its held-out cost and error are reported (plus the
   optimistic read-off of the test frontier itself, labelled as such).

Each ``ttamer`` command is one function here returning a :class:`Run` (its JSON
result, and what its text report adds): :func:`run_demo`, :func:`fit_and_save`,
:func:`evaluate_files`, :func:`sweep_files`, :func:`solve_file`. They check their
input files and output folders before any work, raise ``ValueError`` (one line)
on bad input, and write nothing then; :mod:`.reports` turns a :class:`Run` into text.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ttamer_jax.app import reports
from ttamer_jax.core import solvers, validation
from ttamer_jax.core.heuristics import FixedExitPolicy
from ttamer_jax.core.progress import progress_iter
from ttamer_jax.data import policy_io, synthetic
from ttamer_jax.data.cascade_io import load_cascade, save_cascade
from ttamer_jax.data.discretise import PRIMARY_SCORE, DeployedPolicy, trace_scores
from ttamer_jax.data.files import check_replaceable, interrupts_deferred, write_text
from ttamer_jax.data.fitting import FittedCascade, fit_cascade
from ttamer_jax.data.tables import read_traces
from ttamer_jax.data.traces import ExitTraces, save_traces, split_traces
from ttamer_jax.evaluation import frontier, metrics, selection
from ttamer_jax.evaluation.frontier import ReplaySweep

WORKLOADS = ("digits", "sequences", "synthetic", "mnist1d", "sklearn")
NETWORK_WORKLOADS = ("digits", "sequences", "mnist1d")
# Per-stage costs the traces carry (and policies are fitted on): "measured", each
# stage (block + head) timed alone; "served", each stage as the policy-guided
# Server runs it (serving.served_stage_costs), with the per-stage overhead serving
# adds (compaction, exit signal, discretiser, policy step, padding).
COST_OPTIONS = ("measured", "served")
# Measured wall-clock seconds of `ttamer demo` (digits, the defaults) -- quoted by
# README.md, docs/cli.md and `ttamer demo --help` through :func:`demo_timing_text`
# (tests/test_docs.py checks that they agree). Reproduce with
#   rm -rf /tmp/c && time ttamer demo --cache-dir /tmp/c --out /tmp/d1   # first run
#   time ttamer demo --cache-dir /tmp/c --out /tmp/d2                    # cached
DEMO_TIMING = dict(first_s=170, cached_s=40, train_s=35,
                   machine="2 CPU cores (AMD EPYC VM, shared with other jobs: load average 5-7)")


def demo_timing_text() -> str:
  """The demo's measured duration as one phrase (what the docs and ``--help`` quote)."""
  t = DEMO_TIMING
  return (f"{t['first_s']} s the first time ({t['train_s']} s of it training the network), "
          f"{t['cached_s']} s once the network and the compiled programs are cached; measured on "
          f"{t['machine']}")
POLICIES = ("recall", "no_recall", "confidence", "per_stage", "entropy", "patience",
            "fixed_exit", "hindsight")
# lam values at which the demo and `sweep` report the held-out objective.
OBJECTIVE_LAMS = (0.5, 0.9, 0.97, 0.99)
# Families shown in the demo's exit histograms (the comparison).
HISTOGRAM_POLICIES = ("recall", "no_recall", "confidence", "patience", "hindsight")
# Cost budgets (shares of the full cost) at which the demo and `sweep` report each
# family's least held-out error.
COST_BUDGETS = (0.10, 0.25, 0.50, 0.75)


def default_lams(num: int = 201) -> np.ndarray:
  """``num`` evenly spaced ``lam`` values plus 30 more in ``[0.99, 0.9999]``, where one
  point of error trades against a few percent of cost. A lam sweep only reaches the
  vertices of the fitted model's convex frontier, so the grid must be dense."""
  return np.unique(np.concatenate([np.linspace(0.0, 1.0, num), 1.0 - np.geomspace(1e-4, 1e-2, 30)]))


def default_cache_dir() -> str:
  """Per-user cache for trained checkpoints (``$TTAMER_CACHE`` overrides)."""
  base = os.environ.get("TTAMER_CACHE") or os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ttamer_jax") if not os.environ.get("TTAMER_CACHE") else base


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Traces of one workload, ready for fitting.

  Attributes:
    name: workload name.
    calibration: traces the policies are fitted / tuned on.
    test: held-out traces they are evaluated on.
    model: the trained network (``None`` for trace-only workloads).
    info: what happened: per-exit test accuracy, training seconds or "loaded",
      checkpoint path, ``costs`` (which per-stage costs the traces carry) and
      ``stage_cost_share`` (those costs); with ``costs="served"`` also
      ``measured_stage_cost_share``, ``served_stage_cost_share`` and
      ``served_us_per_request`` (the raw served costs, microseconds per request).
    test_inputs: ``(x, y)`` of the test split (for serving benchmarks), or ``None``.
  """

  name: str
  calibration: ExitTraces
  test: ExitTraces
  model: Any
  info: Mapping[str, Any]
  test_inputs: Any = None


def check_costs(costs: str, workload: str) -> str:
  """``costs`` must be one of :data:`COST_OPTIONS`; ``"served"`` needs a network to serve."""
  if costs not in COST_OPTIONS:
    raise ValueError(f"costs: must be one of {COST_OPTIONS}, got {costs!r}")
  if costs == "served" and workload not in NETWORK_WORKLOADS:
    raise ValueError(f"costs: 'served' needs a network workload ({', '.join(NETWORK_WORKLOADS)}), "
                     f"got {workload!r}")
  return costs


def serving_probe(calibration: ExitTraces, num_states: int = 8) -> DeployedPolicy:
  """The deployed policy whose serving path :func:`prepare` times for ``costs="served"``.

  The policy deployed is chosen after the costs are known, so this is the demo's
  default design instead: ``num_states`` quantile bins of the signal the fitted
  policies read (:func:`resolve_signals`), whose discretiser every stage runs as a
  deployed policy's does. Its policy runs every stage; the timing replaces it with
  fixed exits (:func:`~ttamer_jax.networks.serving.served_stage_costs`)."""
  score, _, _ = resolve_signals(calibration)
  n = calibration.num_stages
  fitted = fit_cascade(calibration, num_states, score=score)
  return fitted.deploy(FixedExitPolicy(exit_stage=n - 1, num_stages=n))


def prepare(workload: str, *, seed: int = 0, cache_dir: str | None = None, quick: bool = False,
            progress: bool = True, costs: str = "measured") -> Prepared:
  """Trains or loads the workload's network and collects calibration and test traces.

  Args:
    workload: ``"digits"`` (scikit-learn's bundled 8x8 digits, early-exit CNN),
      ``"sequences"`` (generated token sequences, early-exit Transformer),
      ``"mnist1d"`` (MNIST-1D generated offline, 16,000 samples, early-exit 1-D CNN),
      ``"sklearn"`` (a cascade of five heterogeneous scikit-learn models on generated
      tabular data, measured latency; no network) or ``"synthetic"`` (traces sampled
      from a known over-thinking cascade).
    seed: seed of the split, the network and the training.
    cache_dir: where trained checkpoints are kept (default
      :func:`default_cache_dir`; ``""`` disables caching).
    quick: train a tenth of the steps (tests, notebooks in a hurry).
    progress: show the training progress bar.
    costs: per-stage costs of both splits (:data:`COST_OPTIONS`): ``"measured"``,
      each stage timed alone (:func:`~ttamer_jax.networks.profiling.collect_traces`);
      ``"served"`` (network workloads only), each stage's seconds per request as
      the default :class:`~ttamer_jax.Server` runs it on the calibration inputs
      (:func:`~ttamer_jax.networks.serving.served_stage_costs` with
      :func:`serving_probe`), per-stage overhead included, as shares floored above
      0 (:func:`~ttamer_jax.networks.serving.cost_shares`). Compiles the server
      once per process (a few seconds).
  """
  from ttamer_jax.networks import profiling, workloads

  if workload not in WORKLOADS:
    raise ValueError(f"workload: must be one of {WORKLOADS}, got {workload!r}")
  check_costs(costs, workload)
  if workload == "synthetic":
    cascade = synthetic.synthetic_cascade(seed, num_stages=5, num_states=8, regime="overthink")
    k_cal, k_test = jax.random.split(jax.random.PRNGKey(seed))
    sizes = (2000, 2000) if quick else (20000, 20000)
    cal = synthetic.workload_traces(k_cal, cascade, sizes[0])
    test = synthetic.workload_traces(k_test, cascade, sizes[1])
    return Prepared(name="synthetic-overthink", calibration=cal, test=test, model=None,
                    info={"cascade_costs": np.asarray(cascade.costs).tolist()})
  if workload == "sklearn":
    from ttamer_jax.networks import model_cascade
    mc = model_cascade.model_cascade(seed=seed, num_samples=8000 if quick else 24000)
    return Prepared(name=mc.name, calibration=mc.calibration, test=mc.test, model=None,
                    info=dict(mc.info, stages=list(mc.stages), costs="measured"))
  builders = dict(digits=workloads.digits, sequences=workloads.sequences,
                  mnist1d=workloads.mnist1d)
  wl = builders[workload](seed=seed)
  config = wl.train_config
  if quick:
    config = dataclasses.replace(config, num_steps=max(50, config.num_steps // 10),
                                 warmup_steps=min(config.warmup_steps, 10))
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  checkpoint = None
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    checkpoint = os.path.join(cache_dir, f"{wl.name}-seed{seed}-steps{config.num_steps}.npz")
  model, info = workloads.trained_model(wl, seed=seed, checkpoint=checkpoint, config=config,
                                        progress=progress)
  cal = profiling.collect_traces(model, wl.calibration.x, wl.calibration.y, cost="measured",
                                 repeats=10 if quick else 20)
  flops = profiling.measure_stage_costs(model, wl.calibration.x, repeats=5, timed=False).flops
  info = dict(info, checkpoint=checkpoint, costs=costs,
              stage_cost_share=np.asarray(cal.costs).tolist(),
              flops_per_sample=np.asarray(flops).tolist())
  if costs == "served":
    from ttamer_jax.networks import serving
    seconds = serving.served_stage_costs(model, serving_probe(cal), wl.calibration.x,
                                         repeats=5 if quick else 15)
    cal = cal.replace(costs=serving.cost_shares(seconds))
    info.update(measured_stage_cost_share=info["stage_cost_share"],
                served_stage_cost_share=np.asarray(cal.costs).tolist(),
                stage_cost_share=np.asarray(cal.costs).tolist(),
                served_us_per_request=(1e6 * seconds).tolist())
  # One set of costs for both splits: the test split is profiled for its signals
  # only, then given the calibration split's latencies.
  test = profiling.collect_traces(model, wl.test.x, wl.test.y, cost="flops")
  test = test.replace(costs=cal.costs)
  return Prepared(name=wl.name, calibration=cal, test=test, model=model, info=info,
                  test_inputs=(wl.test.x, wl.test.y))


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
    lams: ``lam`` grid (default :func:`default_lams`).
    feature: categorical feature crossed with the score bins (``"agree_prev"``).
    progress: a progress bar over (split, family); each family's sweep is one
      compiled call.
  """
  lams = default_lams() if lams is None else validation.as_numpy("lams", lams, ndim=1)
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


# The Markdown tables of operating_points / objectives_at live in reports; these
# names stay for scripts and notebooks.
format_operating_points = reports.format_operating_points
format_objectives = reports.format_objectives


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


def recall_lam(comparison: PolicyComparison, tolerance: float = 0.01) -> float:
  """The recall ``lam`` to deploy: the operating point chosen on calibration
  (:func:`~ttamer_jax.evaluation.frontier.cheapest_within`), or, when no grid point
  is within ``tolerance``, the ``lam`` of least calibration error."""
  cal = comparison.calibration["recall"]
  i, _ = frontier.cheapest_within(cal.cost_norm, cal.error, comparison.full_error["calibration"],
                                  tolerance)
  return float(np.asarray(cal.param)[i])


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


# ------------------------------------------------------------------ commands
@dataclasses.dataclass(frozen=True)
class Run:
  """What one ``ttamer`` command did.

  Attributes:
    result: its JSON document (``ttamer ... --json`` prints ``reports.dumps(result)``).
    notes: what only its text report shows (resolved signal names, options);
      ``reports.<command>_text(result, notes)`` is the text.
  """

  result: dict
  notes: dict = dataclasses.field(default_factory=dict)


def check_input(path: str, what: str) -> str:
  """``path`` must be an existing file (not a folder); ``what`` names it in the error."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such {what} file")
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory, not a {what} file")
  if not os.path.isfile(path):  # a FIFO would block the read, a device never end
    raise ValueError(f"{path}: is not a regular file (a FIFO or a device?), not a {what} file")
  return path


def check_output(path: str, what: str) -> str:
  """An output file: a file name (not empty, not ending in a separator) whose folder
  exists and is writable, and which is missing or a regular file (a FIFO or a device
  would be replaced); checked before any work."""
  if not path:
    raise ValueError(f"'': empty {what} file name")
  if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
    raise ValueError(f"{path}: ends with {path[-1]!r}, a folder; give a {what} file name")
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory; give a {what} file name")
  if not os.path.isdir(folder):
    raise ValueError(f"{path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"{path}: folder {folder} is not writable")
  check_replaceable(path)
  return path


def same_file(a: str, b: str) -> bool:
  """Whether ``a`` and ``b`` name one file, whether or not it exists yet: the same path
  once links and ``..`` are resolved, or (both existing) the same file (hard links)."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_outputs(outputs: list[tuple[str, str, str]], *inputs: str | None) -> None:
  """Every output of a command, ``(label, path, kind)`` (files it writes beside them
  included), is a valid output (:func:`check_output`), none is an input, and no two are
  one file -- the second write would replace the first; checked before any work."""
  for i, (label, path, kind) in enumerate(outputs):
    check_output(path, kind)
    check_distinct(path, label, *inputs)
    for other, other_path, _ in outputs[:i]:
      if same_file(path, other_path):
        raise ValueError(f"{label} {path}: is also {other} ({other_path}); each output needs a "
                         "file of its own")


def check_plot(path: str, what: str = "--plot") -> str:
  """A plot to write: its folder must exist and be writable, its name must end in an
  image type matplotlib writes (``.png``, ``.pdf``, ``.svg``, ...), and matplotlib
  must be installed -- checked before any work."""
  from ttamer_jax.app import plotting

  check_output(path, "plot")
  check_matplotlib(what)
  return plotting.check_image_path(path, what)


def check_distinct(output: str, what: str, *inputs: str | None) -> None:
  """An output file must not be one of the input files (it would overwrite it)."""
  for path in inputs:
    if path and same_file(output, path):
      raise ValueError(f"{what} {output}: is an input file of this command; choose another name")


def read_traces_file(path: str, what: str = "traces") -> ExitTraces:
  """An input traces file (``.npz``, ``.csv``, ``.parquet``/``.pq``; chosen by extension,
  :func:`~ttamer_jax.read_traces`): it must exist; a bad file or a missing table
  dependency is a one-line ``ValueError``."""
  check_input(path, what)
  try:
    return read_traces(path)
  except ImportError as e:
    raise ValueError(f"{path}: {e}") from None


def check_matplotlib(what: str) -> None:
  """``what`` (a flag, a command) needs matplotlib: a one-line error without it."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ValueError(f"{what} needs matplotlib (pip install matplotlib)") from None


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


def fit_and_save(traces_path: str, out: str, *, states: int | None = None, lam: Any = "auto",
                 tolerance: float = 0.01, score: str | None = None, feature: str | None = None,
                 binning: str | None = None, cascade_out: str | None = None,
                 candidates: str = "auto", folds: int = 5, seed: int = 0,
                 progress: bool = False) -> Run:
  """``ttamer fit``: chooses a policy by cross-fitting on a traces file and saves it.

  :func:`~ttamer_jax.fit_policy` replays every candidate (T-Tamer optima over several
  state designs, and the simple rules) out of fold on the traces and keeps the best
  by replay, never by a model's own value. ``lam="auto"``: the least cross-fitted
  cost whose cross-fitted error is within ``tolerance`` of the last exit's (when
  none is, the most accurate candidate, and the result says so). Saves the policy
  to ``out`` (+ its JSON sidecar) and, with ``cascade_out``, the chosen model's
  fitted cascade (none when a simple rule is chosen). Result: ``{policy, metadata,
  lam, lam_choice, in_sample, selection, cascade}``.
  """
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
  score, _, _ = resolve_signals(traces, score)
  cands = fit_candidates(traces, candidates, states=states, score=score, feature=feature,
                         binning=binning)
  auto = lam == "auto"
  sel = selection.fit_policy(traces, None if auto else float(lam),
                             tolerance=tolerance if auto else None, folds=folds,
                             candidates=cands, key=jax.random.PRNGKey(seed), progress=progress)
  report_lam = sel.solve_lam if sel.solve_lam is not None else (None if auto else float(lam))
  if auto:
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


def evaluate_files(policy_path: str, traces_path: str, *, lam: float | None = None,
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


def _pareto_marks(points: list[dict]) -> dict:
  return {r["policy"]: (r["chosen_cost"], r["chosen_error"]) for r in points}


def sweep_files(traces_path: str, *, calibration_path: str | None = None, split: float = 0.5,
                seed: int = 0, lams: Any = None, states: int = 8, score: str | None = None,
                confidence_score: str | None = None, feature: str | None = None,
                tolerance: float = 0.01, plot: str | None = None, progress: bool = False) -> Run:
  """``ttamer sweep``: every family's frontier, fitted on calibration, measured held out.

  Fits on ``calibration_path`` (or the first part of a random ``split`` of the
  traces) and measures on the traces (or the rest). ``plot``: also draw the
  Pareto plot there. Result: :func:`summarise` plus ``{traces, calibration, how,
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
  score, conf, entropy = resolve_signals(calibration, score, confidence_score)
  resolve_signals(test, score, conf)
  comp = compare_policies(calibration, test, num_states=states, score=score, confidence_score=conf,
                          entropy_score=entropy, lams=lams, feature=feature, progress=progress)
  result = summarise(comp, tolerance)
  result.update(traces=traces_path, calibration=calibration_path, how=how,
                lams=np.asarray(comp.lams))
  if plot is not None:
    result["plot"] = plotting.plot_pareto(
        comp.test, plot, title="held-out frontiers", cost_label="mean cost / cost of every stage",
        error_label="held-out error (mean loss)", full_error=comp.full_error["test"],
        tolerance=tolerance, points=_pareto_marks(result["operating_points"]))
  return Run(result, dict(score=score, confidence_score=conf, entropy_score=entropy,
                          tolerance=tolerance))


def solve_file(cascade_path: str, *, lams: Any = None, plot: str | None = None) -> Run:
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


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Keeps XLA's compiled programs in ``<cache_dir>/xla`` (JAX's persistent compilation
  cache), so that a second ``ttamer demo`` loads what the first one compiled instead of
  compiling it again (most of a cached demo's time without it). A cache the user set up
  (``$JAX_COMPILATION_CACHE_DIR``) is left as it is. Returns the folder in use, or
  ``None`` when ``cache_dir`` is empty (caching off) and none is set.

  JAX reads this setting when it compiles its first program; call it before.
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not cache_dir:
    return current or None
  path = os.path.join(cache_dir, "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the many small ones too
  return path


# Every file `ttamer demo` writes into its --out folder.
DEMO_FILES = ("pareto.png", "index_heatmap.png", "exit_histograms.png", "policy.npz", "policy.json",
              "calibration_traces.npz", "test_traces.npz", "cascade.npz", "report.md",
              "results.json")


def run_demo(out: str = "ttamer_demo_out", *, workload: str = "digits", quick: bool = False,
             states: int = 8, tolerance: float = 0.01, seed: int = 0, cache_dir: str | None = None,
             plots: bool = True, progress: bool = False, costs: str = "measured",
             log: Callable[[str], None] | None = None) -> Run:
  """``ttamer demo``: the whole job on a built-in workload, written to the folder ``out``.

  :func:`prepare` -> :func:`compare_policies` -> :func:`summarise` (every family's
  frontier, measured on the test split); deploys the policy that
  :func:`~ttamer_jax.fit_policy` chooses by cross-fitting on the calibration split
  (least cost within ``tolerance`` of the last exit's error) and reports it measured
  on the test split next to its model check and, for a network workload, served
  (:func:`~ttamer_jax.networks.serving.benchmark`: its wall time next to the full
  network's, ``selected["served"]``); writes the plots (``plots``), the
  policy, the traces, the recall family's cascade, ``report.md`` and
  ``results.json`` (the result). ``log``: receives the status lines (``None``: silent).
  ``costs``: the per-stage costs the policies are fitted on (:func:`prepare`; the
  report and ``info["costs"]`` say which).
  The checkpoint cache: ``cache_dir`` (default :func:`default_cache_dir`; ``""``: off).
  The ``ttamer demo`` program also keeps its compiled programs there
  (:func:`enable_compilation_cache`); this function leaves JAX's process-wide settings
  alone.
  """
  from ttamer_jax.app import plotting

  say = log or (lambda text: None)
  check_costs(costs, workload)
  if not out:
    raise ValueError("--out '': empty folder name")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out}: exists and is not a folder")
  if os.path.isdir(out):  # files it will replace: regular files only (no FIFO, no device)
    for name in DEMO_FILES:
      check_output(os.path.join(out, name), "demo output")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ValueError(f"--out {out}: folder {parent} does not exist")
  if plots:
    check_matplotlib("ttamer demo (plots; or pass --no-plots)")
  t0 = time.perf_counter()
  cache = default_cache_dir() if cache_dir is None else cache_dir
  if workload != "synthetic":
    latency = ("per-exit latency, and each stage's latency as the serving path runs it"
               if costs == "served" else "per-exit latency")
    say(f"[1/4] {workload}: train the early-exit network or load it from the cache "
        f"({cache or 'caching off'}); record exit traces and {latency} ...")
  prep = prepare(workload, seed=seed, cache_dir=cache, quick=quick, progress=progress,
                 costs=costs)
  say(f"[2/4] fit a {states}-state cascade on {prep.calibration.num_samples} "
      "calibration requests; sweep every policy family ...")
  score, conf, entropy = resolve_signals(prep.calibration)
  comp = compare_policies(prep.calibration, prep.test, num_states=states, score=score,
                          confidence_score=conf, entropy_score=entropy, progress=progress)
  summary = summarise(comp, tolerance)
  points = summary["operating_points"]
  lam = recall_lam(comp, tolerance)
  say("[3/4] choose the policy to deploy by cross-fitting on the calibration split ...")
  sel = selection.fit_policy(prep.calibration, tolerance=tolerance, key=jax.random.PRNGKey(seed),
                             progress=progress)
  deployed = sel.deployed
  held = metrics.evaluate(deployed, prep.test, sel.solve_lam if sel.solve_lam is not None else 1.0,
                          num_resamples=200)
  selected = dict(name=sel.chosen.name, ttamer=sel.chosen.candidate.ttamer,
                  solve_lam=sel.solve_lam, tolerance_met=sel.tolerance_met,
                  cross_fitted=dict(error=sel.chosen.error, cost_norm=sel.chosen.cost_norm),
                  test=dict(error=float(held.error), error_ci=held.error_ci.tolist(),
                            cost_norm=float(held.cost_norm), cost_norm_ci=held.cost_norm_ci.tolist()),
                  runner_up=None if sel.runner_up is None else sel.runner_up.name,
                  model_check=None if sel.model_check is None else sel.model_check.as_dict(),
                  notes=list(sel.notes))
  if prep.model is not None:  # served wall time on the test split, next to every exit's
    from ttamer_jax.networks import serving
    selected["served"] = serving.benchmark(prep.model, deployed, *prep.test_inputs).as_dict()
  say(f"[4/4] write the plots, the policy ({sel.chosen.name}) and the report ...")
  recall_policy = comp.fitted.recall_policy(lam)

  with interrupts_deferred():  # every file of the folder, or on Ctrl-C none
    os.makedirs(out, exist_ok=True)
    files = {}
    at = lambda name: os.path.join(out, name)
    with_cost = (f"{prep.info.get('costs', 'measured')} latency" if prep.model is not None
                 else "cost")
    if plots:
      files["pareto_plot"] = plotting.plot_pareto(
          comp.test, at("pareto.png"), title=f"{prep.name}: held-out accuracy / {with_cost} frontiers",
          cost_label=f"mean {with_cost} / full network", error_label="test error rate",
          full_error=comp.full_error["test"], tolerance=tolerance, points=_pareto_marks(points))
      files["index_heatmap"] = plotting.plot_index_heatmap(
          recall_policy.policy.index, at("index_heatmap.png"), lam=lam,
          title=f"{prep.name}: dynamic index of the recall family's operating point")
      stops, recalled = {}, {}
      for name in HISTOGRAM_POLICIES:
        row = next(r for r in points if r["policy"] == name)
        i = chosen_index(comp.calibration[name], row["chosen_param"])
        if i is not None:
          stops[name] = np.asarray(comp.test[name].stop_histogram)[i]
          recalled[name] = np.asarray(comp.test[name].recalled_histogram)[i]
      if stops:
        files["exit_histograms"] = plotting.plot_exit_histograms(
            stops, at("exit_histograms.png"), recalled=recalled,
            title=f"{prep.name}: exits at each policy's operating point (test split)")
    fitted_on = {"costs": prep.info["costs"]} if "costs" in prep.info else {}
    meta = policy_io.save_policy(at("policy.npz"), deployed, lam=sel.solve_lam,
                                 full_cost=sel.full_cost, metadata=dict(
                                     source="ttamer demo", workload=prep.name, tolerance=tolerance,
                                     chosen=sel.chosen.name, **fitted_on))
    files["policy"], files["policy_metadata"] = at("policy.npz"), policy_io.sidecar_path(at("policy.npz"))
    save_traces(at("calibration_traces.npz"), prep.calibration)
    save_traces(at("test_traces.npz"), prep.test)
    save_cascade(at("cascade.npz"), comp.fitted.cascade)
    files.update(calibration_traces=at("calibration_traces.npz"), test_traces=at("test_traces.npz"),
                 cascade=at("cascade.npz"))
    files["report"], files["results"] = at("report.md"), at("results.json")

    info = {k: v for k, v in prep.info.items() if k != "checkpoint"}
    result = dict(workload=prep.name, quick=quick, seconds=time.perf_counter() - t0, info=info,
                  calibration_requests=prep.calibration.num_samples,
                  test_requests=prep.test.num_samples, chosen_lam=lam, selected=selected,
                  policy=meta, files=files, **summary)
    notes = dict(num_stages=prep.calibration.num_stages, trained=prep.model is not None,
                 states=states, tolerance=tolerance)
    write_text(at("report.md"), reports.demo_report(result, notes))
    write_text(at("results.json"), reports.dumps(result) + "\n")
  return Run(result, notes)


def run_bench(*, quick: bool = False, full: bool = False, gpu: bool = False,
              require_gpu: bool = False, repeats: int = 7, sections: str = "", out: str,
              budget_s: float = 0.0, quiet_stdout: bool = False) -> tuple[int, dict | None]:
  """``ttamer bench``: the suite of ``scripts/bench.py`` (:mod:`.bench`) with these flags
  (the ``--quick`` sizes unless ``full``).

  Returns ``(exit code, results JSON or None)``; ``quiet_stdout`` sends the tables to
  stderr (for ``--json``).
  """
  import contextlib
  import json
  import sys

  if quick and full:
    raise ValueError("--quick and --full exclude each other")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from ttamer_jax.app import bench

  names = [x.strip() for x in sections.split(",") if x.strip()]
  unknown = sorted(set(names) - set(bench.SECTIONS))
  if unknown or not names:
    raise ValueError(f"--sections: unknown {unknown or 'empty'}; choose from {','.join(bench.SECTIONS)}")
  if repeats < 1:
    raise ValueError(f"--repeats {repeats} must be >= 1")
  check_output(out, "results")
  argv = ([] if full else ["--quick"]) + (["--gpu"] if gpu else []) + (
      ["--require-gpu"] if require_gpu else []) + [
          "--repeats", str(repeats), "--sections", ",".join(names), "--out", out,
          "--budget-s", str(budget_s)]
  if not quiet_stdout:
    return bench.main(argv), None
  with contextlib.redirect_stdout(sys.stderr):  # tables to stderr, JSON to stdout
    code = bench.main(argv)
  if not os.path.exists(out):
    return code, None
  with open(out) as f:
    return code, json.load(f)
