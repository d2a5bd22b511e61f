"""What the application prints and writes as text: tables, reports, JSON.

Pure functions of plain values -- the result documents of the
:mod:`.commands` (dicts of numbers, strings and arrays) and a few options -- each
returning a string or a JSON-ready value, so each is tested without running a
command. The ``*_text(result, notes)`` functions are the text faces of the
commands (``notes``: what only the text shows, see :class:`Run`);
``--json`` prints :func:`dumps` of the same ``result``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np


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


# What each policy family is called in tables, legends and plots.
LABELS = {
    "recall": "recall optimum", "no_recall": "no-recall optimum",
    "confidence": "confidence threshold", "per_stage": "per-stage thresholds",
    "entropy": "entropy threshold", "patience": "patience", "fixed_exit": "fixed exit",
    "hindsight": "hindsight oracle (not deployable)", "recall_agree": "recall, state x agreement",
}


# The mark of the family whose policy ttamer deploys (the demo's policy.npz).
DEPLOYED_MARK = " (ttamer)"


def row_label(name: str, deployed: str | None = None) -> str:
  """A family's name in a text table: ``*`` for the oracle, :data:`DEPLOYED_MARK` on the
  ``deployed`` family (a selection candidate's ``kind``)."""
  return (LABELS.get(name, name).replace(" (not deployable)", "*")
          + (DEPLOYED_MARK if name == deployed else ""))


# ------------------------------------------------------------------ values
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


def dumps(result: Mapping) -> str:
  """The JSON document of a result (indented; strict: no NaN/Infinity literals)."""
  return json.dumps(jsonable(result), indent=2, allow_nan=False)


def pct(v) -> str:
  """``0.123 -> "12.3%"``; ``None -> "-"``."""
  return "-" if v is None else f"{100 * v:.1f}%"


def tolerance_text(tolerance: float) -> str:
  """An accuracy tolerance in points of error: ``0.01 -> "1 point"``, ``0.02 -> "2 points"``."""
  pts = 100 * tolerance
  return f"{pts:g} point" + ("" if pts == 1 else "s")


def setting_label(name: str, param) -> str:
  """A family's grid parameter as a setting (``lam=0.9``, ``t=0.8``, ``k=2``, ``exit 1``)."""
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


# ------------------------------------------------------------------ tables
def format_table(points: list[dict], objectives: list[dict], cost_word: str = "latency",
                 deployed: str | None = None) -> str:
  """Plain-text table: each family's operating point and held-out objectives (``-``: no
  setting of the family within the tolerance, :func:`table_legend` says so); the
  ``deployed`` family's row is marked (:func:`row_label`)."""
  names = [r["policy"] for r in points]
  best = {}
  for row in objectives:  # best deployable value per lam (the oracle is not deployable)
    best[row["lam"]] = min(row[n] for n in names if n != "hindsight")
  header = ["policy", "setting", cost_word, "error"] + [f"J({r['lam']:.2f})" for r in objectives]
  rows = []
  for r in points:
    name = r["policy"]
    cells = [row_label(name, deployed), setting_label(name, r["chosen_param"]), pct(r["chosen_cost"]),
             pct(r["chosen_error"])]
    for o in objectives:
      mark = "<" if name != "hindsight" and o[name] == best[o["lam"]] else " "
      cells.append(f"{o[name]:.4f}{mark}")
    rows.append(cells)
  widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(c) for c in rows]
  return "\n".join(lines)


def table_legend(tolerance: float, full_error: Mapping[str, float], cost_word: str,
                 points: list[dict] | None = None, deployed: str | None = None) -> str:
  """What the columns of :func:`format_table` mean (and its ``-`` cells, when the
  operating ``points`` have any; its mark, when a family is ``deployed``)."""
  dash = any(r["chosen_param"] is None for r in points or [])
  return (f"setting: cheapest grid point whose calibration error is within "
          f"{tolerance_text(tolerance)} of the full model's ({100 * full_error['calibration']:.2f}%); "
          f"{cost_word} (share of the full model's) and error measured on the held-out split (full "
          f"model: {100 * full_error['test']:.2f}% error).\n"
          f"J(lam) = lam * error + (1 - lam) * {cost_word}, held out, setting tuned on calibration "
          "per lam; lower is better, < marks the best deployable policy. "
          "*hindsight is the per-request oracle, not deployable."
          + (f"\n-: no setting of that family is within {tolerance_text(tolerance)} of the full "
             "model's error on calibration (see the budget table for what it reaches)."
             if dash else "")
          + (f"\n{DEPLOYED_MARK.strip()}: the family of the policy ttamer deploys (policy.npz, the "
             "answer above); its row is the family's own operating point, with the table's "
             "states." if deployed else ""))


def format_budgets(rows: list[dict], budgets: list[float], cost_word: str = "cost",
                   deployed: str | None = None) -> str:
  """Plain-text table of :func:`~ttamer_jax.app.compare.errors_at_budgets`: each
  family's least held-out error at each cost budget; ``<`` marks the least deployable
  error per budget, ``-`` a family with no point at or below that budget."""
  header = ["policy"] + [f"{cost_word} <= {100 * b:g}%" for b in budgets]
  best = []
  for j in range(len(budgets)):
    vals = [r["error"][j] for r in rows if r["policy"] != "hindsight" and r["error"][j] is not None]
    best.append(min(vals) if vals else None)
  lines = []
  for r in rows:
    name = r["policy"]
    cells = [row_label(name, deployed)]
    for j, e in enumerate(r["error"]):
      mark = "<" if name != "hindsight" and e is not None and e == best[j] else " "
      cells.append(pct(e) + mark)
    lines.append(cells)
  widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines])


def budget_legend(rows: list[dict], cost_word: str = "cost") -> str:
  """What :func:`format_budgets` shows (and its ``-`` cells, when there are any)."""
  dash = any(e is None for r in rows for e in r["error"])
  return (f"least held-out error with {cost_word} share at or below each budget, read off each "
          "family's held-out frontier (optimistic: the point is picked on the data it is scored "
          "on); < marks the least deployable error."
          + (f"\n-: the family has no setting whose held-out {cost_word} share is at or below "
             "that budget." if dash else ""))


def gaps_line(gaps: Mapping[str, float], cost_word: str = "cost") -> str:
  """The mean error gap of each family to the recall frontier, as one line."""
  return (f"mean error gap to the recall frontier over the common {cost_word} range (positive: "
          "recall more accurate at equal cost): "
          + ", ".join(f"{row_label(k)} {v:+.4f}"
                      for k, v in gaps.items()) + ".")


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


def _cell(v, pct_value=False):
  if v is None:
    return "-"
  return f"{100 * v:.1f}%" if pct_value else f"{v:.4f}"


def format_operating_points(rows: list[dict], full_error: Mapping[str, float],
                            tolerance: float = 0.01, deployed: str | None = None) -> str:
  """Markdown table of :func:`~ttamer_jax.app.compare.operating_points` (the ``deployed``
  family marked)."""
  lines = [f"Full network: test error {100 * full_error['test']:.2f}% "
           f"(calibration {100 * full_error['calibration']:.2f}%); target: within "
           f"{100 * tolerance:.0f} point.",
           "",
           "| policy | setting (chosen on calibration) | test latency / full | test error | "
           "test-frontier latency (optimistic) | its error |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    mark = DEPLOYED_MARK if r["policy"] == deployed else ""
    lines.append(f"| {r['policy']}{mark} | {_cell(r['chosen_param'])} | {_cell(r['chosen_cost'], True)} | "
                 f"{_cell(r['chosen_error'], True)} | {_cell(r['frontier_cost'], True)} | "
                 f"{_cell(r['frontier_error'], True)} |")
  if any(r["chosen_param"] is None or r["frontier_cost"] is None for r in rows):
    lines += ["", f"-: no setting of that family is within {tolerance_text(tolerance)} of the full "
              "network's error (on calibration for the chosen setting, on test for the frontier)."]
  return "\n".join(lines)


def format_objectives(rows: list[dict]) -> str:
  """Markdown table of :func:`~ttamer_jax.app.compare.objectives_at` (best deployable in bold)."""
  names = [k for k in rows[0] if k != "lam"]
  lines = ["| lam | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for r in rows:
    best = min(r[n] for n in names if n != "hindsight")
    cells = [(f"**{r[n]:.4f}**" if r[n] == best else f"{r[n]:.4f}") for n in names]
    lines.append(f"| {r['lam']:.2f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------ commands
def _ci(lo_hi) -> str:
  return f"[{float(lo_hi[0]):.4f}, {float(lo_hi[1]):.4f}]"


def model_check_lines(check: Mapping) -> list[str]:
  """The modelled-vs-measured table of a :class:`~ttamer_jax.ModelCheck` (``as_dict``)."""
  lines = [f"model check of {check['policy']} (J at lam = {check['lam']:.4g}): modelled = the "
           "fitted model's exact prediction, measured = replay on traces",
           f"  {'':<13} {'':<6} {'modelled':>9} {'measured':>9}  95% bootstrap CI"]
  for where, key in (("in sample", "in_sample"), ("cross-fitted", "cross_fitted")):
    for name, label in (("error", "error"), ("cost_norm", "cost"), ("objective", "J")):
      q = check[key][name]
      flag = "" if q["inside"] else "   <- outside"
      lines.append(f"  {where:<13} {label:<6} {q['predicted']:9.4f} {q['measured']:9.4f}  "
                   f"{_ci(q['ci'])}{flag}")
      where = ""
  return lines


def fit_text(result: Mapping, notes: Mapping) -> str:
  """``ttamer fit``: the cross-fitted choice, the runner-up, the model check, files written."""
  sel, ins, out = result["selection"], result["in_sample"], result["policy"]
  chosen, runner = sel["chosen"], sel["runner_up"]
  target = (f"lam = {sel['lam']:.4g}" if sel["lam"] is not None else
            f"least cost within {tolerance_text(sel['tolerance'])} of the last exit's error")
  what = "J" if sel["lam"] is not None else "cost"
  lines = [f"{notes['num_samples']} requests x {notes['num_stages']} stages; chose by "
           f"{notes['folds']}-fold cross-fitting among {len(sel['candidates'])} candidates "
           f"({target}); every number below is measured by replay unless marked modelled",
           f"  chosen     {chosen['name']}",
           f"             cross-fitted {what} {chosen['objective']:.4f} "
           f"{_ci(chosen['objective_ci'])}, error {pct(chosen['error'])}, cost "
           f"{pct(chosen['cost_norm'])} of running every stage"]
  if runner is not None:
    d = sel["versus_runner_up"]
    lines += [f"  runner-up  {runner['name']}",
              f"             cross-fitted {what} {runner['objective']:.4f} "
              f"{_ci(runner['objective_ci'])}; chosen - runner-up {d['diff']:+.4f} "
              f"{_ci(d['diff_ci'])}"]
  rules = [c for c in sel["candidates"] if not c["ttamer"]]
  if rules and chosen["ttamer"]:
    best = rules[0]
    lines.append(f"  best simple rule: {best['name']}, cross-fitted {what} {best['objective']:.4f} "
                 f"{_ci(best['objective_ci'])}")
  lines.append(f"  policy at lam = {result['lam']:.4g} ({result['lam_choice']})"
               if result["lam"] is not None else f"  ({result['lam_choice']})")
  lines.append(f"  on these traces (in sample, optimistic): error {pct(ins['error'])} (last exit "
               f"{pct(ins['full_error'])}), cost {pct(ins['cost_norm'])} of running every stage")
  if sel["model_check"] is not None:
    lines += model_check_lines(sel["model_check"])
  for w in notes["warnings"]:
    lines.append(f"warning: {w}")
  wrote = f"wrote {out} (+ {notes['sidecar']})" + (
      f" and {result['cascade']}" if result["cascade"] else "")
  if notes["cascade_requested"] and not result["cascade"]:
    wrote += (f"; not {notes['cascade_requested']}: the chosen policy is a simple rule, it has "
              "no fitted cascade")
  lines += [wrote, f"next: ttamer evaluate {out} HELD_OUT_TRACES.npz"]
  return "\n".join(lines)


def evaluate_text(result: Mapping, notes: Mapping) -> str:
  """``ttamer evaluate``: error, cost and objective with their intervals, exit histograms."""
  meta, ev = result["metadata"], result["evaluation"]
  ci = lambda v, lo_hi, f: f"{f(v)}  [{f(lo_hi[0])}, {f(lo_hi[1])}]"
  hist = lambda h: "  ".join(f"{i}: {pct(v)}" for i, v in enumerate(np.asarray(h)))
  return "\n".join([
      f"policy {result['policy']}: {meta['policy']['type']}, {meta['num_stages']} stages x "
      f"{meta['num_states']} states, score {meta['score_name']}",
      f"traces {result['traces']}: {notes['num_samples']} requests; lam = {result['lam']:.4g}",
      f"  error      {ci(ev['error'], ev['error_ci'], pct):<28} last exit alone: "
      f"{pct(result['full_error'])}",
      f"  cost       {ci(ev['cost_norm'], ev['cost_norm_ci'], pct):<28} of running every stage",
      f"  objective  {ci(ev['objective'], ev['objective_ci'], lambda v: f'{float(v):.4f}'):<28} "
      "lam * error + (1 - lam) * cost share (measured)",
      f"  ({100 * notes['level']:g}% bootstrap CI, {notes['resamples']} resamples)",
      f"  stopped after exit   {hist(ev['stop_histogram'])}",
      f"  answered by exit     {hist(ev['answer_histogram'])}"])


def sweep_text(result: Mapping, notes: Mapping) -> str:
  """``ttamer sweep``: how it was split, the table of operating points and objectives."""
  entropy = notes["entropy_score"]
  lines = [result["how"],
           f"{result['fitted']['num_states']} states of {notes['score']} per stage; "
           f"{len(result['lams'])} lam values; thresholds on {notes['confidence_score']}"
           + (f" and {entropy}" if entropy else ""), "",
           format_table(result["operating_points"], result["objectives"], "cost"), "",
           table_legend(notes["tolerance"], result["full_error"], "cost",
                        result["operating_points"]), "",
           format_budgets(result["errors_at_budgets"], result["budgets"]), "",
           budget_legend(result["errors_at_budgets"]), "",
           gaps_line(result["frontier_gaps"])]
  if "plot" in result:
    lines.append(f"\nwrote {result['plot']}")
  return "\n".join(lines)


def solve_text(result: Mapping, notes: Mapping | None = None) -> str:
  """``ttamer solve``: the three optimal values per lam; one lam: the index table."""
  rows = result["solutions"]
  lines = [f"{result['cascade']}: {result['num_stages']} stages x {result['num_states']} states. "
           "Optimal J = lam * E[loss] + (1 - lam) * E[cost] of the cascade model (modelled: "
           "exact values of the model, not measured on traces; lower is better):",
           f"{'lam':>6}  {'hindsight':>10}  {'recall':>10}  {'no-recall':>10}  {'no-recall/recall':>16}"]
  for r in rows:
    ratio = r["no_recall"] / r["recall"] if r["recall"] > 0 else float("nan")
    lines.append(f"{r['lam']:6.3f}  {r['hindsight']:10.5f}  {r['recall']:10.5f}  "
                 f"{r['no_recall']:10.5f}  {ratio:16.3f}")
  if len(rows) == 1:
    if result["num_states"] <= 24:
      lines += [f"\nrecall policy (lam = {rows[0]['lam']:.4g}): after stage i in state s, stop iff "
                "lam * best loss so far <= index[i, s]", format_index(rows[0]["index"])]
    else:
      lines.append(f"\nindex table {result['num_stages']} x {result['num_states']}: too wide to "
                   "print (use --json or --plot)")
  if "plot" in result:
    lines.append(f"\nwrote {result['plot']}")
  return "\n".join(lines)


def demo_header(result: Mapping, notes: Mapping) -> str:
  """The demo's first lines: workload, network, requests and the fitted states."""
  lines = [f"ttamer demo: {result['workload']}, {notes['num_stages']} exits"]
  info = result["info"]
  if notes["trained"]:
    how = ("loaded from the cache" if info.get("loaded")
           else f"trained in {info.get('train_seconds') or 0:.0f} s"
           + (" (--quick: a tenth of the steps)" if result["quick"] else ""))
    measured = info.get("measured_stage_cost_share", info["stage_cost_share"])
    lines.append(f"network {how}; test accuracy per exit: "
                 + " ".join(pct(a) for a in info["test_accuracy"])
                 + "; measured latency share per exit: "
                 + " ".join(f"{c:.2f}" for c in measured))
  if info.get("costs"):
    lines.append(costs_line(info))
  lines.append(f"{result['calibration_requests']} calibration / {result['test_requests']} test "
               f"requests; fitted {notes['states']} bins of {result['fitted']['score']} per exit")
  return "\n".join(lines)


def costs_line(info: Mapping) -> str:
  """Which per-stage costs the demo's policies were fitted on (``info["costs"]``)."""
  head = f"costs: {info['costs']} (the policies are fitted and the latencies reported on them): "
  if info["costs"] == "served":
    return (head + "each stage's latency as the serving path runs it, per-stage overhead "
            "included; share per exit " + " ".join(f"{c:.2f}" for c in info["stage_cost_share"])
            + " (" + " ".join(f"{u:.1f}" for u in info["served_us_per_request"])
            + " us per request)")
  return head + ("each stage timed alone (--costs served: as the serving path runs it, "
                 "per-stage overhead included)")


def demo_report(result: Mapping, notes: Mapping) -> str:
  """The demo's ``report.md``: the Markdown tables, the deployed policy and the plots."""
  files = result["files"]
  header = demo_header(result, notes).split("\n")
  lines = [f"# ttamer demo: {result['workload']}, {notes['num_stages']} exits", "",
           "  \n".join(header[1:]), "", "## The answer", "", "```",
           *answer_lines(result.get("answer"), "latency"), "```",
           "", "## Latency to stay within the tolerance of the full network's accuracy", "",
           format_operating_points(result["operating_points"], result["full_error"],
                                   notes["tolerance"], result["selected"].get("kind")), "",
           "## Held-out objective lam * error + (1 - lam) * latency (setting tuned on calibration)",
           "", format_objectives(result["objectives"]), "",
           "## Least held-out error within a latency budget", "", "```",
           format_budgets(result["errors_at_budgets"], result["budgets"], "latency",
                          result["selected"].get("kind")), "```", "",
           budget_legend(result["errors_at_budgets"], "latency"), "",
           "Mean error gap to the recall frontier over the common latency range (positive: recall "
           "better): " + ", ".join(f"{k} {v:+.4f}" for k, v in result["frontier_gaps"].items()) + ".",
           "", "## The deployed policy", "", *selected_lines(result["selected"],
                                                         os.path.basename(files["policy"])), ""]
  for key, title in (("pareto_plot", "frontiers"), ("index_heatmap", "dynamic index"),
                     ("exit_histograms", "exit histograms")):
    if key in files:
      lines += [f"![{title}]({os.path.basename(files[key])})", ""]
  lines.append(f"({result['seconds']:.0f} s; `ttamer demo"
               + (" --quick" if result["quick"] else "") + "`)")
  return "\n".join(lines) + "\n"


def _points(v: float) -> str:
  """A difference of shares in points: ``-0.268 -> "-26.8"``."""
  return f"{100 * v:+.1f}"


def _triple(name: str, t: list, as_points: bool = False) -> str:
  """``error 32.4% [30.5%, 34.3%]`` (or in points, for differences)."""
  f = _points if as_points else pct
  unit = " points" if as_points else ""
  return f"{name} {f(t[0])}{unit} [{f(t[1])}, {f(t[2])}]"


def rule_setting(kind: str, param) -> str:
  """A simple rule's tuned parameter as the selection grids it: the quantile level of
  the calibration scores (thresholds), the patience, the exit."""
  if param is None:
    return ""
  if kind in ("confidence", "per_stage"):
    return f" at the {100 * param:.3g}% quantile of the calibration scores"
  return f" (k={int(param)})" if kind == "patience" else f" (exit {int(param)})"


def verdict_sentence(answer: Mapping, diff: Mapping, word: str) -> str:
  """The plain sentence of one comparison (its paired ``diff`` to the best simple rule
  and its ``word``, :func:`~ttamer_jax.app.compare.verdict`)."""
  rule = answer["rule"]["name"]
  if answer["mode"] == "lam":
    d = diff["objective"]
    ci = f"[{d[1]:+.4f}, {d[2]:+.4f}]"
    if word == "better":
      return f"Better than {rule} by {-d[0]:.4f} in J({answer['lam']:.3g}) {ci}."
    if word == "worse":
      return f"Worse than {rule} by {d[0]:.4f} in J({answer['lam']:.3g}) {ci}."
    return f"No better than {rule}: the difference in J({answer['lam']:.3g}) {ci} includes 0."
  cost, err = diff["cost_norm"], diff["error"]
  tol = tolerance_text(answer["tolerance"])
  errors = f"error {_points(err[0])} points [{_points(err[1])}, {_points(err[2])}]"
  if word == "better":
    return (f"Better than {rule}: {-100 * cost[0]:.1f} points less cost "
            f"[{-100 * cost[2]:.1f}, {-100 * cost[1]:.1f}], {errors} (the tolerance allows "
            f"{tol} more).")
  if word == "worse":
    why = (f"{100 * cost[0]:.1f} points more cost [{_points(cost[1])}, {_points(cost[2])}]"
           if cost[1] > 0 else f"its {errors} exceeds the rule's by more than {tol}")
    return f"Worse than {rule}: {why}."
  if cost[2] < 0:  # cheaper, but the error may be beyond the tolerance
    return (f"No better than {rule} for certain: {-100 * cost[0]:.1f} points less cost "
            f"[{-100 * cost[2]:.1f}, {-100 * cost[1]:.1f}], but its {errors} may exceed the rule's "
            f"by more than the {tol} of tolerance (too few held-out requests to tell).")
  return (f"No better than {rule}: the cost difference {_points(cost[0])} points "
          f"[{_points(cost[1])}, {_points(cost[2])}] includes 0 ({errors}).")


def answer_lines(answer: Mapping | None, cost_word: str = "cost") -> list[str]:
  """The demo's answer, first: the deployed policy held out, the best simple rule tuned
  on the same calibration split, their paired difference and a plain sentence
  (:func:`~ttamer_jax.app.compare.versus_best_rule`)."""
  if answer is None:
    return ["(no simple rule among the candidates: nothing to compare the deployed policy with)"]
  lam = answer["lam"]
  level = f"{100 * answer['level']:g}%"

  def measured(t):
    return (f"{_triple('error', t['error'])}, {_triple(cost_word, t['cost_norm'])} of every exit, "
            f"J({lam:.3g}) {t['objective'][0]:.4f} [{t['objective'][1]:.4f}, {t['objective'][2]:.4f}]")

  def differences(d):
    return (f"{_triple('error', d['error'], True)}, {_triple(cost_word, d['cost_norm'], True)}, "
            f"J {d['objective'][0]:+.4f} [{d['objective'][1]:+.4f}, {d['objective'][2]:+.4f}]")

  dep, rule = answer["deployed"], answer["rule"]
  what = "T-Tamer: the exact optimum of a fitted model" if dep["ttamer"] else "a simple rule"
  lines = [f"The answer (held out; {level} intervals, paired bootstrap; J = lam * error + "
           f"(1 - lam) * {cost_word}, lam = {lam:.3g}):",
           f"  deployed (ttamer): {dep['name']} ({what})",
           f"    {measured(dep['test'])}",
           f"  best simple rule tuned on the same calibration split: {rule['name']}"
           f"{rule_setting(rule['kind'], rule['param'])}",
           f"    {measured(rule['test'])}"]
  if not answer["same"]:
    lines += [f"  deployed - rule: {differences(answer['diff'])}",
              "  => " + verdict_sentence(answer, answer["diff"], answer["verdict"])]
    return lines
  how = ("cheaper within the tolerance" if answer["mode"] == "tolerance"
         else "better by 3 paired standard errors")
  lines.append(f"  => ttamer deploys that rule itself: on cross-fitting no T-Tamer design was {how}.")
  best = answer["best_ttamer"]
  if best is not None:
    lines += [f"  the best T-Tamer design, {best['name']}, held out:",
              f"    {measured(best['test'])}",
              f"    minus the rule: {differences(best['diff'])}",
              "    " + verdict_sentence(answer, best["diff"], best["verdict"])]
  return lines


def selected_lines(sel: Mapping, policy_file: str) -> list[str]:
  """The demo's deployed policy: what cross-fitting chose, measured on the test split,
  and the model check (modelled vs measured)."""
  lines = [f"{policy_file}: {sel['name']}, chosen by cross-fitting on the calibration split "
           f"(least cost within the tolerance of the last exit's error"
           + ("" if sel["tolerance_met"] else "; none reached it: the most accurate") + ").",
           f"Measured on the test split: error {pct(sel['test']['error'])} "
           f"[{pct(sel['test']['error_ci'][0])}, {pct(sel['test']['error_ci'][1])}], cost "
           f"{pct(sel['test']['cost_norm'])} of running every exit (cross-fitted on calibration: "
           f"error {pct(sel['cross_fitted']['error'])}, cost {pct(sel['cross_fitted']['cost_norm'])})."]
  if sel.get("served") is not None:
    lines.append(served_line(sel["served"]))
  if sel["model_check"] is not None:
    lines += model_check_lines(sel["model_check"])
  lines += [f"warning: {n}" for n in sel["notes"]]
  return lines


def served_line(served: Mapping) -> str:
  """The deployed policy served by the network (``serving_costs.served_wall_time``), timed next
  to the full network (every exit) on the same requests."""
  ms = lambda s: f"{1e3 * s:.1f} ms"
  return (f"Served on the test split ({served['batch_size']} requests, median of "
          f"{served['repeats']} calls): {ms(served['serve_seconds'])} against "
          f"{ms(served['full_seconds'])} for the full network, every exit "
          f"({served['speedup']:.2f}x); {served['mean_stages']:.2f} exits run per request; "
          f"accuracy {pct(served['serve_accuracy'])} served, {pct(served['full_accuracy'])} "
          "at the last exit.")


def demo_text(result: Mapping, notes: Mapping) -> str:
  """``ttamer demo``: the comparison table, the files written and the next commands."""
  files = result["files"]
  cost_word = "latency" if notes["trained"] else "cost"
  q = lambda p: p if " " not in p else f'"{p}"'
  deployed = result["selected"].get("kind")
  lines = [demo_header(result, notes), "", *answer_lines(result.get("answer"), cost_word), "",
           format_table(result["operating_points"], result["objectives"], cost_word, deployed), "",
           table_legend(notes["tolerance"], result["full_error"], cost_word,
                        result["operating_points"], deployed), "",
           format_budgets(result["errors_at_budgets"], result["budgets"], cost_word, deployed), "",
           budget_legend(result["errors_at_budgets"], cost_word), "",
           gaps_line(result["frontier_gaps"], cost_word), "",
           *selected_lines(result["selected"], "policy.npz"),
           f"\nwrote ({result['seconds']:.0f} s):"]
  lines += [f"  {key:<19} {path}" for key, path in files.items()]
  lines += ["\nnext:", f"  ttamer evaluate {q(files['policy'])} {q(files['test_traces'])}",
            f"  ttamer sweep {q(files['test_traces'])} --calibration "
            f"{q(files['calibration_traces'])} --plot frontier.png",
            f"  ttamer solve {q(files['cascade'])} --lam {result['chosen_lam']:.4g}"]
  return "\n".join(lines)
