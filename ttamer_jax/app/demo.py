"""``ttamer demo``: the whole job on a built-in workload, network -> traces -> policy -> report.

Used by ``ttamer demo`` and the reproduction scripts of ``benchmarks/``:

1. :func:`prepare` runs a workload of :data:`WORKLOADS` (the one registry of built-in
   workloads): it trains (or loads from a cache) the workload's early-exit network
   and records exit traces on its calibration and test splits, with per-stage costs
   measured once (wall clock, on the calibration split) and shared by both: each
   stage timed alone (``costs="measured"``) or as the serving path runs it, its
   per-stage overhead included (``costs="served"``). Trace-only workloads sample
   their traces (``synthetic``) or time scikit-learn models (``sklearn``).
2. :func:`~ttamer_jax.app.compare.compare_policies` sweeps every policy family on both
   splits.
3. :func:`run_demo` deploys the policy :func:`~ttamer_jax.fit_policy` chooses by
   cross-fitting, reports it on the test split (served, for a network) and writes the
   plots, the policy, the traces and the report.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ttamer_jax.app import compare, reports
from ttamer_jax.app.reports import Run
from ttamer_jax.core.heuristics import FixedExitPolicy
from ttamer_jax.core.policies import RecallPolicy
from ttamer_jax.data import model_cascade, policy_io, synthetic
from ttamer_jax.data.cascade_io import save_cascade
from ttamer_jax.data.discretise import DeployedPolicy
from ttamer_jax.data.files import interrupts_deferred, write_text
from ttamer_jax.data.fitting import fit_cascade
from ttamer_jax.data.paths import check_matplotlib, check_output
from ttamer_jax.data.traces import ExitTraces, save_traces
from ttamer_jax.evaluation import selection

# Per-stage costs the traces carry (and policies are fitted on): "measured", each
# stage (block + head) timed alone; "served", each stage as the policy-guided
# Server runs it (serving_costs.served_stage_costs), with the per-stage overhead serving
# adds (compaction, exit signal, discretiser, policy step, padding).
COST_OPTIONS = ("measured", "served")
# Measured wall-clock seconds of `ttamer demo` (the default workload, the defaults) -- quoted
# by README.md, docs/cli.md and `ttamer demo --help` through :func:`demo_timing_text`
# (tests/test_docs.py checks that they agree). Reproduce with
#   rm -rf /tmp/c && time ttamer demo --cache-dir /tmp/c --out /tmp/d1   # first run
#   time ttamer demo --cache-dir /tmp/c --out /tmp/d2                    # cached
DEMO_TIMING = dict(first_s=35, cached_s=19, train_s=12,
                   machine="2 CPU cores (Intel Xeon VM, quiet: load average 1)")


def demo_timing_text() -> str:
  """The demo's measured duration as one phrase (what the docs and ``--help`` quote)."""
  t = DEMO_TIMING
  return (f"{t['first_s']} s the first time ({t['train_s']} s of it training and timing the "
          f"models), {t['cached_s']} s once the compiled programs are cached; measured on "
          f"{t['machine']}")


# Families shown in the demo's exit histograms.
HISTOGRAM_POLICIES = ("recall", "no_recall", "confidence", "patience", "hindsight")


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
  if costs == "served" and not is_network(workload):
    raise ValueError(f"costs: 'served' needs a network workload ({', '.join(NETWORK_WORKLOADS)}), "
                     f"got {workload!r}")
  return costs


def serving_probe(calibration: ExitTraces, num_states: int = 8) -> DeployedPolicy:
  """The deployed policy whose serving path :func:`prepare` times for ``costs="served"``.

  The policy deployed is chosen after the costs are known, so this is the demo's
  default design instead: ``num_states`` quantile bins of the signal the fitted
  policies read (:func:`~ttamer_jax.app.compare.resolve_signals`), whose discretiser
  every stage runs as a deployed policy's does. Its policy runs every stage; the timing
  replaces it with fixed exits
  (:func:`~ttamer_jax.networks.serving_costs.served_stage_costs`).

  Args:
    calibration: traces ``[N, n]`` the discretiser is fitted on.
    num_states: score bins per stage.

  Returns:
    A deployed fixed-exit policy at the last of the ``n`` stages.
  """
  score, _, _ = compare.resolve_signals(calibration)
  n = calibration.num_stages
  fitted = fit_cascade(calibration, num_states, score=score)
  return fitted.deploy(FixedExitPolicy(exit_stage=n - 1, num_stages=n))


# ------------------------------------------------------------------ workloads
def _synthetic(*, seed: int, quick: bool, **_) -> Prepared:
  """Traces sampled from a known over-thinking cascade (5 stages, 8 states; no network)."""
  cascade = synthetic.synthetic_cascade(seed, num_stages=5, num_states=8, regime="overthink")
  k_cal, k_test = jax.random.split(jax.random.PRNGKey(seed))
  sizes = (2000, 2000) if quick else (20000, 20000)
  cal = synthetic.workload_traces(k_cal, cascade, sizes[0])
  test = synthetic.workload_traces(k_test, cascade, sizes[1])
  return Prepared(name="synthetic-overthink", calibration=cal, test=test, model=None,
                  info={"cascade_costs": np.asarray(cascade.costs).tolist()})


def _sklearn(*, seed: int, quick: bool, **_) -> Prepared:
  """Five heterogeneous scikit-learn models on generated tabular data, measured latency."""
  mc = model_cascade.model_cascade(seed=seed, num_samples=8000 if quick else 24000)
  return Prepared(name=mc.name, calibration=mc.calibration, test=mc.test, model=None,
                  info=dict(mc.info, stages=list(mc.stages), costs="measured"))


def _network(workload: str, *, seed: int, quick: bool, cache_dir: str, progress: bool,
             costs: str) -> Prepared:
  """An early-exit network of :mod:`ttamer_jax.networks.workloads` (``workload`` names
  its builder): trained or loaded from ``cache_dir``, then profiled on both splits."""
  from ttamer_jax.networks import profiling, serving_costs, workloads

  wl = getattr(workloads, workload)(seed=seed)
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
    seconds = serving_costs.served_stage_costs(model, serving_probe(cal), wl.calibration.x,
                                               repeats=5 if quick else 15)
    cal = cal.replace(costs=serving_costs.cost_shares(seconds))
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


# --quick serves with two bucket sizes (as the notebooks' small mode): one kernel per stage
# and size to compile instead of up to sixteen -- 20 of the quick demo's 50 s were the
# default buckets' compilations. The served time then includes more padding.
QUICK_BUCKETS = (64, 512)

# The built-in workloads, name -> loader(seed=, quick=, cache_dir=, progress=, costs=).
# Network workloads: "digits" (scikit-learn's bundled 8x8 digits, early-exit CNN),
# "sequences" (generated token sequences, early-exit Transformer), "mnist1d" (MNIST-1D
# generated offline, 16,000 samples, early-exit 1-D CNN).
WORKLOADS: dict[str, Callable[..., Prepared]] = {
    "digits": functools.partial(_network, "digits"),
    "sequences": functools.partial(_network, "sequences"),
    "synthetic": _synthetic,
    "mnist1d": functools.partial(_network, "mnist1d"),
    "sklearn": _sklearn,
}


# What `ttamer demo` runs without --workload: the model cascade, 7,200 held-out requests
# (where the policies differ, their intervals separate); digits' 360 did not.
DEFAULT_WORKLOAD = "sklearn"


def is_network(workload: str) -> bool:
  """Whether the registered ``workload`` trains a network (and so can be served)."""
  loader = WORKLOADS.get(workload)
  return isinstance(loader, functools.partial) and loader.func is _network


NETWORK_WORKLOADS = tuple(name for name in WORKLOADS if is_network(name))


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
    quick: a smoke run (tests, notebooks in a hurry): a network trains a tenth of the
      steps; ``sklearn`` generates a third of the requests, ``synthetic`` a tenth.
    progress: show the training progress bar.
    costs: per-stage costs of both splits (:data:`COST_OPTIONS`): ``"measured"``,
      each stage timed alone (:func:`~ttamer_jax.networks.profiling.collect_traces`);
      ``"served"`` (network workloads only), each stage's seconds per request as
      the default :class:`~ttamer_jax.Server` runs it on the calibration inputs
      (:func:`~ttamer_jax.networks.serving_costs.served_stage_costs` with
      :func:`serving_probe`), per-stage overhead included, as shares floored above
      0 (:func:`~ttamer_jax.networks.serving_costs.cost_shares`). Compiles the server
      once per process (a few seconds).

  Returns:
    The :class:`Prepared` traces: calibration and test splits ``[N, n]`` with the same
    per-stage costs, the network (``None`` for trace-only workloads) and what happened.

  Raises:
    ValueError: an unknown workload, or ``costs`` it cannot have.
  """
  if workload not in WORKLOADS:
    raise ValueError(f"workload: must be one of {tuple(WORKLOADS)}, got {workload!r}")
  check_costs(costs, workload)
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  return WORKLOADS[workload](seed=seed, quick=quick, cache_dir=cache_dir, progress=progress,
                             costs=costs)


# ------------------------------------------------------------------ the demo
def index_shown(comparison: compare.PolicyComparison, sel: selection.PolicySelection,
                tolerance: float) -> tuple[DeployedPolicy, float, Any, str]:
  """The recall policy whose index table the demo draws and whose cascade it saves.

  The deployed policy itself when it is a recall policy (it has an index table): the
  heatmap, ``chosen_lam`` and ``cascade.npz`` then are the saved policy's. A simple rule
  or a no-recall policy has no index: then the recall family of the comparison at its
  operating point, chosen by the rule selection deploys with
  (:func:`~ttamer_jax.app.compare.recall_operating_lam`).

  Args:
    comparison: every family's sweeps on the calibration and test splits.
    sel: the selection whose policy is deployed.
    tolerance: accuracy tolerance of the operating point.

  Returns:
    ``(policy, lam, cascade, what)``: the deployed recall policy, the ``lam`` it is the
    optimum at, the fitted cascade it is the optimum of (``ttamer solve cascade.npz --lam
    lam`` gives its index) and a phrase naming it.
  """
  if isinstance(sel.deployed.policy, RecallPolicy) and sel.fitted is not None:
    return (sel.deployed, float(sel.solve_lam), sel.fitted.cascade,
            f"the deployed {sel.chosen.name}")
  lam = compare.recall_operating_lam(comparison, tolerance)
  return (comparison.fitted.recall_policy(lam), lam, comparison.fitted.cascade,
          "the recall family's operating point")


# Every file `ttamer demo` writes into its --out folder.
DEMO_FILES = ("pareto.png", "index_heatmap.png", "exit_histograms.png", "policy.npz", "policy.json",
              "calibration_traces.npz", "test_traces.npz", "cascade.npz", "report.md",
              "results.json")


def run_demo(out: str = "ttamer_demo_out", *, workload: str = "sklearn", quick: bool = False,
             states: int = 8, tolerance: float = 0.01, seed: int = 0, cache_dir: str | None = None,
             plots: bool = True, progress: bool = False, costs: str = "measured",
             log: Callable[[str], None] | None = None) -> Run:
  """``ttamer demo``: the whole job on a built-in workload, written to the folder ``out``.

  :func:`prepare` -> :func:`~.compare.compare_policies` -> :func:`~.compare.summarise`
  (every family's frontier, measured on the test split); deploys the policy that
  :func:`~ttamer_jax.fit_policy` chooses by cross-fitting on the calibration split
  (least cost within ``tolerance`` of the last exit's error) and reports it measured
  on the test split next to its model check and, for a network workload, served
  (:func:`~ttamer_jax.networks.serving_costs.served_wall_time`: its wall time next to the
  full network's, ``selected["served"]``); writes the plots (``plots``), the
  policy, the traces, the cascade of the index drawn (:func:`index_shown`), ``report.md`` and
  ``results.json`` (the result). ``log``: receives the status lines (``None``: silent).
  ``costs``: the per-stage costs the policies are fitted on (:func:`prepare`; the
  report and ``info["costs"]`` say which).
  The checkpoint cache: ``cache_dir`` (default :func:`default_cache_dir`; ``""``: off).
  The ``ttamer demo`` program also keeps its compiled programs there
  (:func:`~ttamer_jax.app.cli.enable_compilation_cache`); this function leaves JAX's
  process-wide settings alone.

  Returns:
    The :class:`~ttamer_jax.app.reports.Run` of ``ttamer demo``: its ``result`` is what
    ``results.json`` holds.
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
  if is_network(workload):
    latency = ("per-exit latency, and each stage's latency as the serving path runs it"
               if costs == "served" else "per-exit latency")
    say(f"[1/4] {workload}: train the early-exit network or load it from the cache "
        f"({cache or 'caching off'}); record exit traces and {latency} ...")
  elif workload == "sklearn":
    say(f"[1/4] {workload}: train five scikit-learn models of increasing cost; record each "
        "one's confidence, answer and measured latency per request ...")
  prep = prepare(workload, seed=seed, cache_dir=cache, quick=quick, progress=progress,
                 costs=costs)
  say(f"[2/4] fit a {states}-state cascade on {prep.calibration.num_samples} "
      "calibration requests; sweep every policy family ...")
  score, conf, entropy = compare.resolve_signals(prep.calibration)
  comp = compare.compare_policies(prep.calibration, prep.test, num_states=states, score=score,
                                  confidence_score=conf, entropy_score=entropy, progress=progress)
  summary = compare.summarise(comp, tolerance)
  points = summary["operating_points"]
  say("[3/4] choose the policy to deploy by cross-fitting on the calibration split ...")
  sel = selection.fit_policy(prep.calibration, tolerance=tolerance, key=jax.random.PRNGKey(seed),
                             progress=progress)
  deployed = sel.deployed
  shown, lam, cascade, index_of = index_shown(comp, sel, tolerance)
  # The answer: the deployed policy against the best simple rule, paired, held out; J at
  # the lam the deployed optimum was solved at (a rule: the index drawn's). Its replay of
  # the deployed policy is the demo's one held-out measurement of it (the default
  # candidates always include the rules, so there is an answer).
  answer = compare.versus_best_rule(sel, prep.test, lam=sel.solve_lam if sel.solve_lam is not None
                                    else lam, key=jax.random.PRNGKey(seed))
  held = answer["deployed"]["test"]
  selected = dict(name=sel.chosen.name, kind=sel.chosen.candidate.kind,
                  ttamer=sel.chosen.candidate.ttamer,
                  solve_lam=sel.solve_lam, tolerance_met=sel.tolerance_met,
                  cross_fitted=dict(error=sel.chosen.error, cost_norm=sel.chosen.cost_norm),
                  test=dict(error=held["error"][0], error_ci=held["error"][1:],
                            cost_norm=held["cost_norm"][0], cost_norm_ci=held["cost_norm"][1:]),
                  runner_up=None if sel.runner_up is None else sel.runner_up.name,
                  model_check=None if sel.model_check is None else sel.model_check.as_dict(),
                  notes=list(sel.notes))
  if prep.model is not None:  # served wall time on the test split, next to every exit's
    from ttamer_jax.networks import serving_costs
    buckets = QUICK_BUCKETS if quick else serving_costs.DEFAULT_BUCKETS
    selected["served"] = serving_costs.served_wall_time(prep.model, deployed, *prep.test_inputs,
                                                        buckets=buckets)
  say(f"[4/4] write the plots, the policy ({sel.chosen.name}) and the report ...")

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
          full_error=comp.full_error["test"], tolerance=tolerance,
          points=compare.pareto_marks(points), num_requests=prep.test.num_samples)
      files["index_heatmap"] = plotting.plot_index_heatmap(
          shown.policy.index, at("index_heatmap.png"), lam=lam,
          title=f"{prep.name}: dynamic index of {index_of}")
      stops, recalled = {}, {}
      for name in HISTOGRAM_POLICIES:
        row = next(r for r in points if r["policy"] == name)
        i = compare.chosen_index(comp.calibration[name], row["chosen_param"])
        if i is not None:
          stops[name] = np.asarray(comp.test[name].stop_histogram)[i]
          recalled[name] = np.asarray(comp.test[name].recalled_histogram)[i]
      if stops:
        files["exit_histograms"] = plotting.plot_exit_histograms(
            stops, at("exit_histograms.png"), recalled=recalled,
            num_requests=prep.test.num_samples,
            title=f"{prep.name}: exits at each policy's operating point (test split)")
    fitted_on = {"costs": prep.info["costs"]} if "costs" in prep.info else {}
    meta = policy_io.save_policy(at("policy.npz"), deployed, lam=sel.solve_lam,
                                 full_cost=sel.full_cost, metadata=dict(
                                     source="ttamer demo", workload=prep.name, tolerance=tolerance,
                                     chosen=sel.chosen.name, **fitted_on))
    files["policy"], files["policy_metadata"] = at("policy.npz"), policy_io.sidecar_path(at("policy.npz"))
    save_traces(at("calibration_traces.npz"), prep.calibration)
    save_traces(at("test_traces.npz"), prep.test)
    save_cascade(at("cascade.npz"), cascade)
    files.update(calibration_traces=at("calibration_traces.npz"), test_traces=at("test_traces.npz"),
                 cascade=at("cascade.npz"))
    files["report"], files["results"] = at("report.md"), at("results.json")

    info = {k: v for k, v in prep.info.items() if k != "checkpoint"}
    result = dict(workload=prep.name, quick=quick, seconds=time.perf_counter() - t0, info=info,
                  calibration_requests=prep.calibration.num_samples,
                  test_requests=prep.test.num_samples, chosen_lam=lam, answer=answer,
                  selected=selected,
                  policy=meta, files=files, **summary)
    notes = dict(num_stages=prep.calibration.num_stages, trained=prep.model is not None,
                 states=states, tolerance=tolerance)
    write_text(at("report.md"), reports.demo_report(result, notes))
    write_text(at("results.json"), reports.dumps(result) + "\n")
  return Run(result, notes)
