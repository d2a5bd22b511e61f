"""The whole job on one workload: network -> traces -> fitted policy -> frontiers.

Used by ``ttamer demo`` and ``scripts/reproduce_early_exit.py``:

1. :func:`prepare` trains (or loads from a cache) the workload's early-exit network
   and records exit traces on its calibration and test splits, with per-stage costs
   measured once (wall clock, on the calibration split) and shared by both.
2. :func:`compare_policies` fits a cascade on the calibration traces, sweeps ``lam``
   for the recall and no-recall optima, sweeps each heuristic over its own grid
   (thresholds taken from the calibration traces), and computes the hindsight
   oracle -- on both splits, so operating points can be *chosen* on calibration
   and *reported* on test.
3. :func:`operating_points` answers "at what latency does each policy stay within
   one point of the full network's accuracy?", honestly: the point is picked on
   the calibration split and its held-out cost and error are reported (plus the
   optimistic read-off of the test frontier itself, labelled as such).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np

from ttamer_jax import frontier, validation
from ttamer_jax.discretise import PRIMARY_SCORE
from ttamer_jax.fitting import FittedCascade, fit_cascade
from ttamer_jax.frontier import SweepResult
from ttamer_jax.traces import ExitTraces

WORKLOADS = ("digits", "sequences", "synthetic")
POLICIES = ("recall", "no_recall", "confidence", "per_stage", "entropy", "patience",
            "fixed_exit", "hindsight")


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
      measured per-stage milliseconds, checkpoint path.
    test_inputs: ``(x, y)`` of the test split (for serving benchmarks), or ``None``.
  """

  name: str
  calibration: ExitTraces
  test: ExitTraces
  model: Any
  info: Mapping[str, Any]
  test_inputs: Any = None


def prepare(workload: str, *, seed: int = 0, cache_dir: str | None = None, quick: bool = False,
            progress: bool = True) -> Prepared:
  """Trains or loads the workload's network and collects calibration and test traces.

  Args:
    workload: ``"digits"`` (scikit-learn's bundled 8x8 digits, early-exit CNN),
      ``"sequences"`` (generated token sequences, early-exit Transformer) or
      ``"synthetic"`` (traces sampled from a known over-thinking cascade).
    seed: seed of the split, the network and the training.
    cache_dir: where trained checkpoints are kept (default
      :func:`default_cache_dir`; ``""`` disables caching).
    quick: train a tenth of the steps (tests, notebooks in a hurry).
    progress: show the training progress bar.
  """
  from ttamer_jax import profiling, workloads

  if workload not in WORKLOADS:
    raise ValueError(f"workload: must be one of {WORKLOADS}, got {workload!r}")
  if workload == "synthetic":
    cascade = workloads.synthetic_cascade(seed, num_stages=5, num_states=8, regime="overthink")
    k_cal, k_test = jax.random.split(jax.random.PRNGKey(seed))
    sizes = (2000, 2000) if quick else (20000, 20000)
    cal = frontier.workload_traces(k_cal, cascade, sizes[0])
    test = frontier.workload_traces(k_test, cascade, sizes[1])
    return Prepared(name="synthetic-overthink", calibration=cal, test=test, model=None,
                    info={"cascade_costs": np.asarray(cascade.costs).tolist()})
  wl = workloads.digits(seed=seed) if workload == "digits" else workloads.sequences(seed=seed)
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
  # One set of measured costs for both splits: the test split is profiled for its
  # signals only, then given the calibration split's latencies.
  test = profiling.collect_traces(model, wl.test.x, wl.test.y, cost="flops")
  test = test.replace(costs=cal.costs)
  costs = profiling.measure_stage_costs(model, wl.calibration.x, repeats=5, timed=False)
  info = dict(info, checkpoint=checkpoint, stage_cost_share=np.asarray(cal.costs).tolist(),
              flops_per_sample=np.asarray(costs.flops).tolist())
  return Prepared(name=wl.name, calibration=cal, test=test, model=model, info=info,
                  test_inputs=(wl.test.x, wl.test.y))


def hindsight_sweep(traces: ExitTraces, lams: Any) -> SweepResult:
  """The per-request oracle for every ``lam`` on ``traces`` (not deployable)."""
  lams = validation.as_numpy("lams", lams, ndim=1)
  validation.check_lam(lams)
  losses = np.asarray(traces.losses, np.float64)
  cum = np.cumsum(np.asarray(traces.cost_matrix(), np.float64), axis=1)
  best = np.minimum.accumulate(losses, axis=1)
  n = losses.shape[1]
  rows = np.arange(losses.shape[0])
  err, cost, stop_h, ans_h = [], [], [], []
  for lam in lams:
    stop = np.argmin(lam * best + (1 - lam) * cum, axis=1)
    answer = np.argmin(np.where(np.arange(n)[None, :] <= stop[:, None], losses, np.inf), axis=1)
    err.append(losses[rows, answer].mean())
    cost.append(cum[rows, stop].mean())
    stop_h.append(np.bincount(stop, minlength=n) / stop.size)
    ans_h.append(np.bincount(answer, minlength=n) / answer.size)
  full = cum[:, -1].mean()
  cost = np.asarray(cost)
  return SweepResult(param=lams, error=np.asarray(err), cost=cost,
                     cost_norm=cost / full if full > 0 else np.zeros_like(cost),
                     stop_histogram=np.asarray(stop_h), answer_histogram=np.asarray(ans_h))


@dataclasses.dataclass(frozen=True)
class PolicyComparison:
  """Every policy family's sweep on the calibration and the test split.

  Attributes:
    fitted: the cascade fitted on the calibration traces.
    lams: ``[L]`` the ``lam`` values of the recall / no-recall / hindsight sweeps.
    calibration: ``{policy: SweepResult}`` on the calibration traces.
    test: ``{policy: SweepResult}`` on the test traces (same grids, same order).
    full_error: ``{"calibration": e, "test": e}`` error of always answering with the last exit.
  """

  fitted: FittedCascade
  lams: np.ndarray
  calibration: Mapping[str, SweepResult]
  test: Mapping[str, SweepResult]
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
      ("hindsight", lambda tr: {"hindsight": hindsight_sweep(tr, lams)}),
  ]
  splits = {"calibration": calibration, "test": test}
  out = {split: {} for split in splits}
  jobs = [(split, name, fn) for split in splits for name, fn in families]
  bar = _progress_bar(jobs, enabled=progress)
  for split, name, fn in bar:
    if hasattr(bar, "set_postfix_str"):
      bar.set_postfix_str(f"{split}: {name}")
    out[split].update(fn(splits[split]))
  full = {split: float(np.asarray(t.losses)[:, -1].mean()) for split, t in splits.items()}
  return PolicyComparison(fitted=fitted, lams=lams, calibration=out["calibration"],
                          test=out["test"], full_error=full)


def _progress_bar(items, *, enabled: bool):
  if not enabled:
    return items
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return items
  return tqdm(items, desc="sweep", leave=False)


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
    ok = np.flatnonzero(np.asarray(cal.error) <= comparison.full_error["calibration"] + tolerance)
    if ok.size:
      i = ok[np.argmin(np.asarray(cal.cost_norm)[ok])]
      row.update(chosen_param=float(np.asarray(cal.param)[i]),
                 chosen_cost=float(np.asarray(test.cost_norm)[i]),
                 chosen_error=float(np.asarray(test.error)[i]))
    else:
      row.update(chosen_param=None, chosen_cost=None, chosen_error=None)
    ok = np.flatnonzero(np.asarray(test.error) <= comparison.full_error["test"] + tolerance)
    if ok.size:
      j = ok[np.argmin(np.asarray(test.cost_norm)[ok])]
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


def frontier_gaps(comparison: PolicyComparison) -> dict[str, float]:
  """Mean error gap (family minus recall) between held-out frontiers over their common cost range."""
  rec = comparison.test["recall"]
  return {name: float(frontier.frontier_gap(rec.cost_norm, rec.error, r.cost_norm, r.error).mean_gap)
          for name, r in comparison.test.items() if name != "recall"}


def _fmt(v, pct=False):
  if v is None:
    return "-"
  return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def format_operating_points(rows: list[dict], full_error: Mapping[str, float],
                            tolerance: float = 0.01) -> str:
  """Markdown table of :func:`operating_points`."""
  lines = [f"Full network: test error {100 * full_error['test']:.2f}% "
           f"(calibration {100 * full_error['calibration']:.2f}%); target: within "
           f"{100 * tolerance:.0f} point.",
           "",
           "| policy | setting (chosen on calibration) | test latency / full | test error | "
           "test-frontier latency (optimistic) | its error |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['policy']} | {_fmt(r['chosen_param'])} | {_fmt(r['chosen_cost'], True)} | "
                 f"{_fmt(r['chosen_error'], True)} | {_fmt(r['frontier_cost'], True)} | "
                 f"{_fmt(r['frontier_error'], True)} |")
  return "\n".join(lines)


def format_objectives(rows: list[dict]) -> str:
  names = [k for k in rows[0] if k != "lam"]
  lines = ["| lam | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for r in rows:
    best = min(r[n] for n in names if n != "hindsight")
    cells = [(f"**{r[n]:.4f}**" if r[n] == best else f"{r[n]:.4f}") for n in names]
    lines.append(f"| {r['lam']:.2f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
