"""The ``ttamer`` command line: the whole job, and each of its steps, from a terminal.

    ttamer demo                                   # digits early-exit network -> frontiers, plots, policy
    ttamer fit TRACES.npz --states 8 --out policy.npz
    ttamer evaluate policy.npz TRACES.npz
    ttamer sweep TRACES.npz --lam 0:1:101 --plot frontier.png
    ttamer solve CASCADE.npz --lam 0.3
    ttamer bench

Every command takes ``--json`` (machine-readable result on stdout; progress and
messages go to stderr). Exit codes: 0 success; 2 bad arguments or a bad file (one
line on stderr, no traceback, no output file written); 1 ``ttamer bench`` checks
failed; 130 interrupted. The file formats are in ``docs/trace_format.md``,
``docs/policy_format.md`` and :mod:`ttamer_jax.cascade_io`; the commands in
``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

EXIT_USAGE = 2
# lam values at which the demo and `sweep` report the held-out objective.
OBJECTIVE_LAMS = (0.5, 0.9, 0.97, 0.99)
# Families shown in the demo's exit histograms (the comparison).
HISTOGRAM_POLICIES = ("recall", "no_recall", "confidence", "patience", "hindsight")
# Upper bounds on counts given on the command line: beyond them a typo (an extra
# zero or three) would run for hours or exhaust memory instead of failing fast.
MAX_LAM_VALUES = 100_000
MAX_RESAMPLES = 1_000_000
# Seeds become jax.random.PRNGKey(seed): larger ones overflow (or, above 2**32, alias
# smaller seeds' keys without x64).
MAX_SEED = 2**32 - 1


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr and exit code 2, no traceback."""

  def error(self, message):
    message = " ".join(message.split())  # an argument may hold a newline: still one line
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------ helpers
def lam_values(text: str) -> np.ndarray:
  """Parses a ``lam`` spec: ``0.3``, ``0.1,0.5,0.9`` or ``START:STOP:NUM`` (inclusive linspace)."""
  text = text.strip()
  try:
    if ":" in text:
      parts = text.split(":")
      if len(parts) != 3:
        raise ValueError
      start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
      if num < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: NUM must be >= 1")
      if num > MAX_LAM_VALUES:
        raise argparse.ArgumentTypeError(f"{text!r}: NUM must be <= {MAX_LAM_VALUES}")
      lams = np.linspace(start, stop, num)
    else:
      lams = np.asarray([float(x) for x in text.split(",")], np.float64)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a lam value, a comma-separated list or START:STOP:NUM") from None
  if lams.size > MAX_LAM_VALUES:
    raise argparse.ArgumentTypeError(f"{text[:40]!r}...: more than {MAX_LAM_VALUES} lam values")
  if lams.size == 0 or not np.all(np.isfinite(lams)) or lams.min() < 0 or lams.max() > 1:
    raise argparse.ArgumentTypeError(f"{text!r}: every lam must lie in [0, 1]")
  return lams


def _lam_or_auto(text: str):
  return "auto" if text.strip() == "auto" else _single_lam(text)


def _single_lam(text: str) -> float:
  lams = lam_values(text)
  if lams.size != 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected one lam value")
  return float(lams[0])


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
  return value


def _resamples(text: str) -> int:
  value = _positive_int(text)
  if value > MAX_RESAMPLES:
    raise argparse.ArgumentTypeError(f"{text!r} must be <= {MAX_RESAMPLES}")
  return value


def _seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if not 0 <= value <= MAX_SEED:
    raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, {MAX_SEED}]")
  return value


def _seconds(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
  return value


def _fraction(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 1)")
  return value


def _need_file(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such {what} file")
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory, not a {what} file")
  return path


def _need_target(path: str, what: str) -> str:
  """An output file's folder must exist (checked before any work is done)."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory; give a {what} file name")
  if not os.path.isdir(folder):
    raise ValueError(f"{path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"{path}: folder {folder} is not writable")
  return path


def _need_matplotlib(flag: str) -> None:
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ValueError(f"{flag} needs matplotlib (pip install matplotlib)") from None


def _write_text(path: str, text: str) -> None:
  from ttamer_jax._io import write_text
  write_text(path, text)


def jsonable(x: Any) -> Any:
  """Plain JSON values; non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
    arr = np.asarray(x)
    return jsonable(arr.tolist()) if arr.ndim else jsonable(arr.item())
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return jsonable(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
  return x


def _dump(result: Mapping) -> str:
  return json.dumps(jsonable(result), indent=2, allow_nan=False)


def _show_progress(args) -> bool:
  return sys.stderr.isatty() and not getattr(args, "no_progress", False)


def _progress(iterable, *, desc: str, total: int | None = None, enabled: bool = True):
  """A tqdm bar on stderr (plain iteration when tqdm is missing or disabled)."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return iterable
  return tqdm(iterable, desc=desc, total=total, leave=False, disable=not enabled)


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}%"


def _say(args, text: str = "") -> None:
  """Status lines: stderr, so that stdout stays clean for ``--json``."""
  if not args.json:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ comparison
def resolve_signals(traces, score: str | None = None, confidence_score: str | None = None):
  """``(score, confidence_score, entropy_score)`` defaults for a set of traces.

  The fitted policies and the confidence heuristics read ``max_softmax`` when the
  traces have it, else the primary ``scores``; the entropy heuristic runs when an
  ``entropy`` signal exists. Explicit names are checked.
  """
  from ttamer_jax.discretise import trace_scores

  signals = dict(traces.signals or {})
  default = "max_softmax" if "max_softmax" in signals else "scores"
  score = default if score is None else score
  confidence_score = default if confidence_score is None else confidence_score
  for name in (score, confidence_score):
    trace_scores(traces, name)  # ValueError naming the missing signal
  return score, confidence_score, "entropy" if "entropy" in signals else None


def chosen_index(sweep, param) -> int | None:
  """Index of ``param`` in a sweep's grid (``None`` when ``param`` is ``None``)."""
  if param is None:
    return None
  return int(np.flatnonzero(np.asarray(sweep.param) == param)[0])


def _setting(name: str, param) -> str:
  if param is None:
    return "-"
  if name in ("recall", "no_recall", "hindsight"):
    return f"lam={param:.4g}"
  if name == "per_stage":
    return f"q={param:.3g}"
  if name == "patience":
    return f"k={int(param)}"
  if name == "fixed_exit":
    return f"exit {int(param)}"
  return f"t={param:.3g}"


def format_table(points: list[dict], objectives: list[dict]) -> str:
  """Plain-text table: each family's operating point and held-out objectives."""
  from ttamer_jax.plotting import LABELS

  names = [r["policy"] for r in points]
  best = {}
  for row in objectives:  # best deployable value per lam (the oracle is not deployable)
    best[row["lam"]] = min(row[n] for n in names if n != "hindsight")
  header = ["policy", "setting", "latency", "error"] + [f"J({r['lam']:.2f})" for r in objectives]
  rows = []
  for r in points:
    name = r["policy"]
    label = LABELS.get(name, name).replace(" (not deployable)", "*")
    cells = [label, _setting(name, r["chosen_param"]), _pct(r["chosen_cost"]), _pct(r["chosen_error"])]
    for o in objectives:
      mark = "<" if name != "hindsight" and o[name] == best[o["lam"]] else " "
      cells.append(f"{o[name]:.4f}{mark}")
    rows.append(cells)
  widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(c) for c in rows]
  return "\n".join(lines)


def _table_legend(tolerance: float, full_error: Mapping[str, float], cost_word: str) -> str:
  from ttamer_jax.plotting import _points
  return (f"setting: cheapest grid point whose calibration error is within {_points(tolerance)} "
          f"of the full model's ({100 * full_error['calibration']:.2f}%); {cost_word} "
          f"(share of the full model's) and error measured on the held-out split (full model: "
          f"{100 * full_error['test']:.2f}% error).\n"
          f"J(lam) = lam * error + (1 - lam) * {cost_word}, held out, setting tuned on calibration "
          "per lam; lower is better, < marks the best deployable policy. "
          "*hindsight is the per-request oracle, not deployable.")


def _comparison_result(comp, tolerance: float) -> dict:
  from ttamer_jax import pipeline

  points = pipeline.operating_points(comp, tolerance=tolerance)
  objectives = pipeline.objectives_at(comp, OBJECTIVE_LAMS)
  return dict(full_error=dict(comp.full_error), operating_points=points, objectives=objectives,
              frontier_gaps=pipeline.frontier_gaps(comp),
              frontiers={k: v.rows() for k, v in comp.test.items()},
              fitted=dict(num_stages=comp.fitted.cascade.num_stages,
                          num_states=comp.fitted.cascade.num_states,
                          score=comp.fitted.score_name))


def _recall_lam(comp, points: list[dict]) -> float:
  """The recall operating point chosen on calibration; without one (no setting is
  within tolerance) the lam of least calibration error."""
  row = next(r for r in points if r["policy"] == "recall")
  if row["chosen_param"] is not None:
    return float(row["chosen_param"])
  cal = comp.calibration["recall"]
  return float(np.asarray(cal.param)[int(np.argmin(np.asarray(cal.error)))])


# ------------------------------------------------------------------ demo
def _demo(args) -> int:
  from ttamer_jax import pipeline, plotting, policy_io
  from ttamer_jax.cascade_io import save_cascade
  from ttamer_jax.traces import save_traces

  out = args.out
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out}: exists and is not a folder")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ValueError(f"--out {out}: folder {parent} does not exist")
  if not args.no_plots:
    _need_matplotlib("ttamer demo (plots; or pass --no-plots)")
  progress = _show_progress(args)
  t0 = time.perf_counter()
  cache = pipeline.default_cache_dir() if args.cache_dir is None else args.cache_dir
  if args.workload != "synthetic":
    _say(args, f"[1/3] {args.workload}: train the early-exit network or load it from the cache "
               f"({cache or 'caching off'}); record exit traces and per-exit latency ...")
  prep = pipeline.prepare(args.workload, seed=args.seed, cache_dir=cache, quick=args.quick,
                          progress=progress)
  _say(args, f"[2/3] fit a {args.states}-state cascade on {prep.calibration.num_samples} "
             "calibration requests; sweep every policy family ...")
  score, conf, entropy = resolve_signals(prep.calibration)
  comp = pipeline.compare_policies(prep.calibration, prep.test, num_states=args.states, score=score,
                               confidence_score=conf, entropy_score=entropy, progress=progress)
  result = _comparison_result(comp, args.tolerance)
  points = result["operating_points"]
  lam = _recall_lam(comp, points)
  deployed = comp.fitted.recall_policy(lam)
  _say(args, f"[3/3] write the plots, the policy (recall optimum at lam = {lam:.4g}) and the report ...")

  os.makedirs(out, exist_ok=True)
  files = {}
  at = lambda name: os.path.join(out, name)
  with_cost = "measured latency" if prep.model is not None else "cost"
  if not args.no_plots:
    marks = {r["policy"]: (r["chosen_cost"], r["chosen_error"]) for r in points}
    files["pareto_plot"] = plotting.plot_pareto(
        comp.test, at("pareto.png"), title=f"{prep.name}: held-out accuracy / {with_cost} frontiers",
        cost_label=f"mean {with_cost} / full network", error_label="test error rate",
        full_error=comp.full_error["test"], tolerance=args.tolerance, points=marks)
    files["index_heatmap"] = plotting.plot_index_heatmap(
        deployed.policy.index, at("index_heatmap.png"), lam=lam,
        title=f"{prep.name}: recall policy's dynamic index")
    stops, answers = {}, {}
    for name in HISTOGRAM_POLICIES:
      row = next(r for r in points if r["policy"] == name)
      i = chosen_index(comp.calibration[name], row["chosen_param"])
      if i is not None:
        stops[name] = np.asarray(comp.test[name].stop_histogram)[i]
        answers[name] = np.asarray(comp.test[name].answer_histogram)[i]
    if stops:
      files["exit_histograms"] = plotting.plot_exit_histograms(
          stops, at("exit_histograms.png"), answers=answers,
          title=f"{prep.name}: exits at each policy's operating point (test split)")
  meta = policy_io.save_policy(at("policy.npz"), deployed, lam=lam, metadata=dict(
      source="ttamer demo", workload=prep.name, tolerance=args.tolerance))
  files["policy"], files["policy_metadata"] = at("policy.npz"), policy_io.sidecar_path(at("policy.npz"))
  save_traces(at("calibration_traces.npz"), prep.calibration)
  save_traces(at("test_traces.npz"), prep.test)
  save_cascade(at("cascade.npz"), comp.fitted.cascade)
  files.update(calibration_traces=at("calibration_traces.npz"), test_traces=at("test_traces.npz"),
               cascade=at("cascade.npz"))

  info = {k: v for k, v in prep.info.items() if k != "checkpoint"}
  seconds = time.perf_counter() - t0
  result = dict(workload=prep.name, quick=args.quick, seconds=seconds, info=info,
                calibration_requests=prep.calibration.num_samples,
                test_requests=prep.test.num_samples, chosen_lam=lam, policy=meta,
                files=files, **result)
  files["report"], files["results"] = at("report.md"), at("results.json")
  result["files"] = files
  _write_text(at("report.md"), _demo_report(prep, comp, result, args))
  _write_text(at("results.json"), _dump(result) + "\n")
  if args.json:
    print(_dump(result))
    return 0
  print(_demo_header(prep, result, args))
  print()
  print(format_table(points, result["objectives"]))
  print()
  print(_table_legend(args.tolerance, comp.full_error, with_cost.split()[-1]))
  print(f"\nwrote ({seconds:.0f} s):")
  for key, path in files.items():
    print(f"  {key:<19} {path}")
  q = lambda p: p if " " not in p else f'"{p}"'
  print("\nnext:")
  print(f"  ttamer evaluate {q(files['policy'])} {q(files['test_traces'])}")
  print(f"  ttamer sweep {q(files['test_traces'])} --calibration {q(files['calibration_traces'])} "
        f"--plot frontier.png")
  print(f"  ttamer solve {q(files['cascade'])} --lam {lam:.4g}")
  return 0


def _demo_header(prep, result, args) -> str:
  lines = [f"ttamer demo: {prep.name}, {prep.calibration.num_stages} exits"]
  info = result["info"]
  if prep.model is not None:
    how = ("loaded from the cache" if info.get("loaded")
           else f"trained in {info.get('train_seconds') or 0:.0f} s"
           + (" (--quick: a tenth of the steps)" if args.quick else ""))
    lines.append(f"network {how}; test accuracy per exit: "
                 + " ".join(_pct(a) for a in info["test_accuracy"])
                 + "; measured latency share per exit: "
                 + " ".join(f"{c:.2f}" for c in info["stage_cost_share"]))
  lines.append(f"{result['calibration_requests']} calibration / {result['test_requests']} test "
               f"requests; fitted {args.states} bins of {result['fitted']['score']} per exit")
  return "\n".join(lines)


def _demo_report(prep, comp, result, args) -> str:
  from ttamer_jax import pipeline

  files = result["files"]
  header = _demo_header(prep, result, args).split("\n")
  lines = [f"# ttamer demo: {prep.name}, {prep.calibration.num_stages} exits", "",
           "  \n".join(header[1:]),
           "", "## Latency to stay within the tolerance of the full network's accuracy", "",
           pipeline.format_operating_points(result["operating_points"], comp.full_error,
                                            args.tolerance), "",
           "## Held-out objective lam * error + (1 - lam) * latency (setting tuned on calibration)",
           "", pipeline.format_objectives(result["objectives"]), "",
           "Mean error gap to the recall frontier over the common latency range (positive: recall "
           "better): " + ", ".join(f"{k} {v:+.4f}" for k, v in result["frontier_gaps"].items()) + ".",
           "", f"Deployed policy: recall optimum at lam = {result['chosen_lam']:.4g} -> "
           f"`{os.path.basename(files['policy'])}`.", ""]
  for key, title in (("pareto_plot", "frontiers"), ("index_heatmap", "dynamic index"),
                     ("exit_histograms", "exit histograms")):
    if key in files:
      lines += [f"![{title}]({os.path.basename(files[key])})", ""]
  lines.append(f"({result['seconds']:.0f} s; `ttamer demo"
               + (" --quick" if args.quick else "") + "`)")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ fit
def _fit(args) -> int:
  from ttamer_jax import evaluation, frontier, pipeline, policy_io
  from ttamer_jax.cascade_io import save_cascade
  from ttamer_jax.fitting import fit_cascade
  from ttamer_jax.plotting import _points
  from ttamer_jax.traces import load_traces

  _need_file(args.traces, "traces")
  _need_target(args.out, "policy")
  if args.cascade_out:
    _need_target(args.cascade_out, "cascade")
  if args.feature == "agree_prev" and args.states % 2:
    raise ValueError(f"--states {args.states} must be even with --feature agree_prev")
  traces = load_traces(args.traces)
  score, _, _ = resolve_signals(traces, args.score)
  fitted = fit_cascade(traces, args.states, score=score, feature=args.feature, binning=args.binning)
  full_error = float(np.asarray(traces.losses)[:, -1].mean())
  if args.lam == "auto":
    sweep = frontier.sweep_recall(fitted, traces, pipeline.default_lams())
    err, cost = np.asarray(sweep.error), np.asarray(sweep.cost_norm)
    ok = np.flatnonzero(err <= full_error + args.tolerance)
    i = ok[np.argmin(cost[ok])] if ok.size else int(np.argmin(err))
    lam, how = float(np.asarray(sweep.param)[i]), (
        f"auto: cheapest lam within {_points(args.tolerance)} of the last exit's error on "
        "these traces" if ok.size else "auto: lam of least error on these traces")
  else:
    lam, how = float(args.lam), "given"
  deployed = fitted.recall_policy(lam)
  ev = evaluation.evaluate(deployed, traces, lam, num_resamples=200)
  in_sample = dict(error=float(ev.error), cost_norm=float(ev.cost_norm), full_error=full_error,
                   num_samples=traces.num_samples)
  meta = policy_io.save_policy(args.out, deployed, lam=lam, metadata=dict(
      source="ttamer fit", traces=os.path.abspath(args.traces), lam_choice=how,
      in_sample=in_sample))
  if args.cascade_out:
    save_cascade(args.cascade_out, fitted.cascade)
  result = dict(policy=args.out, metadata=meta, lam=lam, lam_choice=how, in_sample=in_sample,
                cascade=args.cascade_out)
  if args.json:
    print(_dump(result))
    return 0
  c = fitted.cascade
  print(f"fitted {c.num_stages} stages x {c.num_states} states on {traces.num_samples} requests "
        f"(score {fitted.score_name}" + (f", feature {args.feature}" if args.feature else "") + ")")
  print(f"recall policy at lam = {lam:.4g} ({how})")
  print(f"on these traces (in-sample, optimistic): error {_pct(ev.error)} (last exit "
        f"{_pct(full_error)}), cost {_pct(ev.cost_norm)} of running every stage")
  print(f"wrote {args.out} (+ {policy_io.sidecar_path(args.out)})"
        + (f" and {args.cascade_out}" if args.cascade_out else ""))
  print(f"next: ttamer evaluate {args.out} HELD_OUT_TRACES.npz")
  return 0


# ------------------------------------------------------------------ evaluate
def _evaluate(args) -> int:
  import jax

  from ttamer_jax import evaluation, policy_io
  from ttamer_jax.traces import load_traces

  _need_file(args.policy, "policy")
  _need_file(args.traces, "traces")
  traces = load_traces(args.traces)
  deployed, meta = policy_io.load_policy(args.policy, with_metadata=True)
  if deployed.num_stages != traces.num_stages:
    raise ValueError(f"{args.policy}: policy built for {deployed.num_stages} stages, but "
                     f"{args.traces} has {traces.num_stages}")
  lam = args.lam if args.lam is not None else meta.get("lam")
  if not isinstance(lam, (int, float)):
    raise ValueError(f"{args.policy}: the policy records no single lam; pass --lam")
  ev = evaluation.evaluate(deployed, traces, lam, key=jax.random.PRNGKey(args.seed),
                           num_resamples=args.resamples, level=args.level)
  full_error = float(np.asarray(traces.losses)[:, -1].mean())
  result = dict(policy=args.policy, traces=args.traces, lam=float(lam), metadata=meta,
                evaluation=ev.as_dict(), full_error=full_error)
  if args.json:
    print(_dump(result))
    return 0
  kind = meta["policy"]["type"]
  print(f"policy {args.policy}: {kind}, {meta['num_stages']} stages x {meta['num_states']} states, "
        f"score {meta['score_name']}")
  print(f"traces {args.traces}: {traces.num_samples} requests; lam = {float(lam):.4g}")
  level = f"{100 * args.level:g}% bootstrap CI, {args.resamples} resamples"
  ci = lambda v, lo_hi, f: f"{f(v)}  [{f(lo_hi[0])}, {f(lo_hi[1])}]"
  print(f"  error      {ci(ev.error, ev.error_ci, _pct):<28} last exit alone: {_pct(full_error)}")
  print(f"  cost       {ci(ev.cost_norm, ev.cost_norm_ci, _pct):<28} of running every stage")
  print(f"  objective  {ci(ev.objective, ev.objective_ci, lambda v: f'{float(v):.4f}'):<28} "
        "lam * error + (1 - lam) * cost")
  print(f"  ({level})")
  hist = lambda h: "  ".join(f"{i}: {_pct(v)}" for i, v in enumerate(np.asarray(h)))
  print(f"  stopped after exit   {hist(ev.stop_histogram)}")
  print(f"  answered by exit     {hist(ev.answer_histogram)}")
  return 0


# ------------------------------------------------------------------ sweep
def _sweep(args) -> int:
  import jax

  from ttamer_jax import pipeline, plotting
  from ttamer_jax.traces import load_traces, split_traces

  _need_file(args.traces, "traces")
  if args.calibration:
    _need_file(args.calibration, "calibration traces")
  if args.plot:
    _need_target(args.plot, "plot")
    _need_matplotlib("--plot")
  if args.feature == "agree_prev" and args.states % 2:
    raise ValueError(f"--states {args.states} must be even with --feature agree_prev")
  traces = load_traces(args.traces)
  if args.calibration:
    calibration, test = load_traces(args.calibration), traces
    if calibration.num_stages != test.num_stages:
      raise ValueError(f"{args.calibration}: {calibration.num_stages} stages, but {args.traces} "
                       f"has {test.num_stages}")
    how = f"fitted on {args.calibration}, measured on {args.traces}"
  else:
    calibration, test = split_traces(jax.random.PRNGKey(args.seed), traces, args.split)
    how = (f"{args.traces} split {calibration.num_samples} / {test.num_samples} at random "
           f"(seed {args.seed}): fitted on the first part, measured on the second")
  score, conf, entropy = resolve_signals(calibration, args.score, args.confidence_score)
  resolve_signals(test, score, conf)
  lams = args.lam if args.lam is not None else None
  comp = pipeline.compare_policies(calibration, test, num_states=args.states, score=score,
                                   confidence_score=conf, entropy_score=entropy, lams=lams,
                                   feature=args.feature, progress=_show_progress(args))
  result = _comparison_result(comp, args.tolerance)
  result.update(traces=args.traces, calibration=args.calibration, how=how,
                lams=np.asarray(comp.lams))
  if args.plot:
    marks = {r["policy"]: (r["chosen_cost"], r["chosen_error"]) for r in result["operating_points"]}
    result["plot"] = plotting.plot_pareto(comp.test, args.plot, title="held-out frontiers",
                                          cost_label="mean cost / cost of every stage",
                                          error_label="held-out error (mean loss)",
                                          full_error=comp.full_error["test"],
                                          tolerance=args.tolerance, points=marks)
  if args.json:
    print(_dump(result))
    return 0
  print(how)
  print(f"{comp.fitted.cascade.num_states} states of {score} per stage; {len(comp.lams)} lam values; "
        f"thresholds on {conf}" + (f" and {entropy}" if entropy else ""))
  print()
  print(format_table(result["operating_points"], result["objectives"]))
  print()
  print(_table_legend(args.tolerance, comp.full_error, "cost"))
  if args.plot:
    print(f"\nwrote {args.plot}")
  return 0


# ------------------------------------------------------------------ solve
def format_index(index) -> str:
  """The ``[n, K]`` index table as text (``stop``/``go`` for ``+inf``/``-inf``)."""
  idx = np.asarray(index, np.float64)
  cell = lambda v: "stop" if v == np.inf else "go" if v == -np.inf else f"{v:.4g}"
  cols = [[f"s={s}"] + [cell(v) for v in idx[:, s]] for s in range(idx.shape[1])]
  widths = [max(len(x) for x in c) for c in cols]
  head = "stage  " + "  ".join(c[0].rjust(w) for c, w in zip(cols, widths))
  rows = [f"{i:>5}  " + "  ".join(c[i + 1].rjust(w) for c, w in zip(cols, widths))
          for i in range(idx.shape[0])]
  return "\n".join([head] + rows)


def _solve(args) -> int:
  import ttamer_jax as tj
  from ttamer_jax import plotting
  from ttamer_jax.cascade_io import load_cascade

  _need_file(args.cascade, "cascade")
  lams = lam_values("0:1:11") if args.lam is None else args.lam
  if args.plot:
    _need_target(args.plot, "plot")
    _need_matplotlib("--plot")
    if lams.size != 1:
      raise ValueError("--plot draws one index table: give a single --lam value")
  cascade = load_cascade(args.cascade)
  rows = []
  for lam in lams:
    sol = tj.solve_recall(cascade, float(lam))
    rows.append(dict(lam=float(lam), hindsight=float(tj.prophet_value(cascade, float(lam))),
                     recall=float(sol.value),
                     no_recall=float(tj.solve_no_recall(cascade, float(lam)).value),
                     index=np.asarray(sol.index)))
  result = dict(cascade=args.cascade, num_stages=cascade.num_stages,
                num_states=cascade.num_states, solutions=rows)
  if args.plot:
    result["plot"] = plotting.plot_index_heatmap(rows[0]["index"], args.plot, lam=rows[0]["lam"],
                                                 title="recall policy's dynamic index")
  if args.json:
    print(_dump(result))
    return 0
  print(f"{args.cascade}: {cascade.num_stages} stages x {cascade.num_states} states. Optimal "
        "J = lam * E[loss] + (1 - lam) * E[cost] (lower is better):")
  print(f"{'lam':>6}  {'hindsight':>10}  {'recall':>10}  {'no-recall':>10}  {'no-recall/recall':>16}")
  for r in rows:
    ratio = r["no_recall"] / r["recall"] if r["recall"] > 0 else float("nan")
    print(f"{r['lam']:6.3f}  {r['hindsight']:10.5f}  {r['recall']:10.5f}  {r['no_recall']:10.5f}  "
          f"{ratio:16.3f}")
  if lams.size == 1:
    if cascade.num_states <= 24:
      print(f"\nrecall policy (lam = {rows[0]['lam']:.4g}): after stage i in state s, stop iff "
            "lam * best loss so far <= index[i, s]")
      print(format_index(rows[0]["index"]))
    else:
      print(f"\nindex table {cascade.num_stages} x {cascade.num_states}: too wide to print "
            "(use --json or --plot)")
  if args.plot:
    print(f"\nwrote {args.plot}")
  return 0


# ------------------------------------------------------------------ bench
def _bench(args) -> int:
  if args.quick and args.full:
    raise ValueError("--quick and --full exclude each other")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from ttamer_jax import bench

  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = sorted(set(sections) - set(bench.SECTIONS))
  if unknown or not sections:
    raise ValueError(f"--sections: unknown {unknown or 'empty'}; choose from {','.join(bench.SECTIONS)}")
  if args.repeats < 1:
    raise ValueError(f"--repeats {args.repeats} must be >= 1")
  _need_target(args.out, "results")
  argv = ([] if args.full else ["--quick"]) + (["--gpu"] if args.gpu else []) + (
      ["--require-gpu"] if args.require_gpu else []) + [
          "--repeats", str(args.repeats), "--sections", ",".join(sections), "--out", args.out,
          "--budget-s", str(args.budget_s)]
  if not args.json:
    return bench.main(argv)
  with contextlib.redirect_stdout(sys.stderr):  # tables to stderr, JSON to stdout
    code = bench.main(argv)
  if os.path.exists(args.out):
    with open(args.out) as f:
      print(_dump(json.load(f)))
  return code


# ------------------------------------------------------------------ parser
_EPILOG = """\
Exit codes: 0 success, 2 bad arguments or a bad file (one line on stderr, nothing
written), 1 `ttamer bench` checks failed. --json prints a machine-readable result
on stdout. File formats: docs/trace_format.md, docs/policy_format.md, docs/cli.md."""


def build_parser() -> argparse.ArgumentParser:
  from ttamer_jax import __version__

  fmt = argparse.RawDescriptionHelpFormatter
  parser = _Parser(prog="ttamer", formatter_class=fmt, epilog=_EPILOG, description=(
      "Optimal exit and routing policies for cascaded and early-exit ML serving.\n\n"
      "Start with `ttamer demo`: it trains a small early-exit network, fits the optimal\n"
      "policy and compares it with the usual heuristics. Each command has --help."))
  parser.add_argument("--version", action="version", version=f"ttamer_jax {__version__}")
  sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True,
                              metavar="COMMAND")

  def add(name, help, description):
    p = sub.add_parser(name, help=help, description=description, formatter_class=fmt,
                       epilog=_EPILOG)
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON result")
    return p

  demo = add("demo", "the whole job on a built-in workload: train, fit, compare, plot, save",
             "Trains (or loads from the cache) the digits early-exit CNN, records exit traces\n"
             "with measured per-exit latency, fits a cascade on the calibration split, sweeps\n"
             "lam for the recall and no-recall optima and every heuristic (confidence,\n"
             "per-stage and entropy thresholds, patience, fixed exit) plus the hindsight\n"
             "oracle, and compares them on the held-out test split. Writes to --out: pareto.png,\n"
             "index_heatmap.png, exit_histograms.png, policy.npz (the recall policy chosen on\n"
             "calibration) + policy.json, the traces, cascade.npz, report.md, results.json.\n\n"
             "  ttamer demo                 # ~40 s on 2 CPU cores the first time, ~15 s cached\n"
             "  ttamer demo --quick --out /tmp/demo")
  demo.add_argument("--out", default="ttamer_demo_out", help="output folder (default ./ttamer_demo_out)")
  demo.add_argument("--quick", action="store_true",
                    help="train a tenth of the steps (a smoke run; worse network)")
  demo.add_argument("--workload", default="digits", choices=("digits", "sequences", "synthetic"),
                    help="built-in workload (default digits; synthetic: no network)")
  demo.add_argument("--states", type=_positive_int, default=8,
                    help="score bins per exit of the fitted cascade (default 8)")
  demo.add_argument("--tolerance", type=_fraction, default=0.01,
                    help="accuracy tolerance of the operating points (default 0.01 = 1 point)")
  demo.add_argument("--seed", type=_seed, default=0, help="seed of the split and training (default 0)")
  demo.add_argument("--cache-dir", default=None,
                    help="checkpoint cache (default $TTAMER_CACHE or ~/.cache/ttamer_jax; '' disables)")
  demo.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
  demo.add_argument("--no-progress", action="store_true", help="no progress bars")

  fit = add("fit", "fit a cascade to exit traces and save the recall-optimal policy",
            "Discretises each exit's score into K states (quantile bins), fits the Markov\n"
            "cascade (calibrated loss per state, smoothed transitions) and saves the\n"
            "recall-optimal policy at lam as a policy file (docs/policy_format.md).\n\n"
            "  ttamer fit calibration_traces.npz --states 8 --out policy.npz\n"
            "  ttamer fit traces.npz --states 16 --feature agree_prev --lam 0.95 --out p.npz")
  fit.add_argument("traces", metavar="TRACES.npz", help="exit traces (docs/trace_format.md)")
  fit.add_argument("--out", required=True, metavar="POLICY.npz", help="policy file to write")
  fit.add_argument("--states", type=_positive_int, default=8, metavar="K",
                   help="states per stage (default 8; with agree_prev, K/2 bins x agree)")
  fit.add_argument("--lam", type=_lam_or_auto, default="auto",
                   help="trade-off weight in [0, 1] of loss vs cost, or 'auto' (default): the "
                        "cheapest lam whose error on the traces is within --tolerance of the last "
                        "exit's")
  fit.add_argument("--tolerance", type=_fraction, default=0.01,
                   help="accuracy tolerance of --lam auto (default 0.01)")
  fit.add_argument("--score", default=None, metavar="NAME",
                   help="signal to discretise (default max_softmax if recorded, else the primary "
                        "scores; 'scores' names the primary scores)")
  fit.add_argument("--feature", default=None, choices=("agree_prev",),
                   help="cross the bins with 'prediction agrees with the previous exit'")
  fit.add_argument("--binning", default="quantile", choices=("quantile", "uniform"),
                   help="score bins (default quantile)")
  fit.add_argument("--cascade-out", default=None, metavar="CASCADE.npz",
                   help="also save the fitted cascade (for `ttamer solve`)")

  ev = add("evaluate", "replay a policy file on held-out traces, with bootstrap CIs",
           "Replays the policy on every request of the traces with the true losses and\n"
           "costs: error, cost (share of running every stage), objective, exit histograms,\n"
           "each with a percentile-bootstrap confidence interval.\n\n"
           "  ttamer evaluate policy.npz test_traces.npz")
  ev.add_argument("policy", metavar="POLICY.npz", help="policy file (ttamer fit / save_policy)")
  ev.add_argument("traces", metavar="TRACES.npz", help="held-out exit traces")
  ev.add_argument("--lam", type=_single_lam, default=None,
                  help="lam of the reported objective (default: the policy's)")
  ev.add_argument("--resamples", type=_resamples, default=1000, help="bootstrap resamples (1000)")
  ev.add_argument("--level", type=_fraction, default=0.95, help="confidence level (0.95)")
  ev.add_argument("--seed", type=_seed, default=0, help="bootstrap seed (0)")

  sw = add("sweep", "frontiers of the recall optimum vs every heuristic on traces",
           "Fits a cascade on calibration traces (--calibration, or a random split of\n"
           "TRACES), sweeps lam for the recall and no-recall optima, each heuristic over its\n"
           "own grid, and the hindsight oracle, and reports them on the held-out traces.\n\n"
           "  ttamer sweep traces.npz --lam 0:1:101 --plot frontier.png\n"
           "  ttamer sweep test.npz --calibration cal.npz --states 16")
  sw.add_argument("traces", metavar="TRACES.npz", help="exit traces (held-out ones with --calibration)")
  sw.add_argument("--lam", type=lam_values, default=None,
                  help="lam grid: START:STOP:NUM, a list a,b,c or one value (default: 201 even "
                       "values plus 30 in [0.99, 0.9999])")
  sw.add_argument("--calibration", default=None, metavar="CAL.npz",
                  help="fit on these traces instead of a split of TRACES")
  sw.add_argument("--split", type=_fraction, default=0.5,
                  help="share of TRACES used for fitting without --calibration (default 0.5)")
  sw.add_argument("--states", type=_positive_int, default=8, metavar="K", help="states per stage (8)")
  sw.add_argument("--score", default=None, metavar="NAME", help="signal the fitted policies discretise")
  sw.add_argument("--confidence-score", default=None, metavar="NAME",
                  help="signal of the confidence heuristics (higher = more confident)")
  sw.add_argument("--feature", default=None, choices=("agree_prev",), help="see `ttamer fit`")
  sw.add_argument("--tolerance", type=_fraction, default=0.01,
                  help="accuracy tolerance of the operating points (0.01)")
  sw.add_argument("--seed", type=_seed, default=0, help="seed of the split (0)")
  sw.add_argument("--plot", default=None, metavar="OUT.png", help="write the Pareto plot here")
  sw.add_argument("--no-progress", action="store_true", help="no progress bar")

  so = add("solve", "exact recall / no-recall / hindsight values and the index table of a cascade",
           "Solves a cascade file (values/init/trans/costs; written by `ttamer demo`,\n"
           "`ttamer fit --cascade-out` or ttamer_jax.cascade_io.save_cascade) exactly.\n\n"
           "  ttamer solve cascade.npz --lam 0.3\n"
           "  ttamer solve cascade.npz --lam 0:1:21 --json")
  so.add_argument("cascade", metavar="CASCADE.npz", help="cascade file")
  so.add_argument("--lam", type=lam_values, default=None,
                  help="one value, a list a,b,c or START:STOP:NUM (default 0:1:11)")
  so.add_argument("--plot", default=None, metavar="OUT.png",
                  help="heatmap of the index table (one --lam value)")

  be = add("bench", "speed and memory benchmarks of the solvers (quick sizes by default)",
           "The benchmark suite of scripts/bench.py (BENCHMARKS.md): each solver timed next\n"
           "to NumPy / a general MDP solver, sweeps, Monte-Carlo, memory, profile checks.\n"
           "Defaults to the --quick sizes (under a minute); --full runs the CPU sizes.\n\n"
           "  ttamer bench\n"
           "  ttamer bench --sections numpy,sweep --repeats 3 --json")
  be.add_argument("--quick", action="store_true", help="small sizes (the default)")
  be.add_argument("--full", action="store_true", help="the full CPU sizes (~10 min on 2 cores)")
  be.add_argument("--gpu", action="store_true", help="accelerator sizes (K up to 8192)")
  be.add_argument("--require-gpu", action="store_true", help="fail unless JAX's backend is a GPU")
  be.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement (7)")
  be.add_argument("--sections", default="floor,sweep,large,memory,numpy,mdp,mc,profile",
                  help="comma-separated subset of floor,sweep,large,memory,numpy,mdp,mc,profile")
  be.add_argument("--out", default="ttamer_bench.json", help="results JSON (./ttamer_bench.json)")
  be.add_argument("--budget-s", type=_seconds, default=0.0,
                  help="skip the remaining sections after this many seconds (0: no limit)")
  return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _demo, "fit": _fit, "evaluate": _evaluate, "sweep": _sweep, "solve": _solve,
    "bench": _bench}


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}"
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.split())


def main(argv=None) -> int:
  """Runs ``ttamer`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
  args = build_parser().parse_args(argv)
  try:
    return COMMANDS[args.command](args)
  except BrokenPipeError:  # `ttamer ... | head`: stop quietly (Python docs' recipe)
    with contextlib.suppress(OSError):
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except (ValueError, OSError) as e:
    print(f"ttamer {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print(f"ttamer {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
