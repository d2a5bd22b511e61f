#!/usr/bin/env python3
"""Accuracy/cost frontiers of recall-optimal policies vs the deployed heuristics.

Built-in workload: exit traces sampled from :func:`ttamer_jax.overthinking_cascade`
(a cascade whose deeper models sometimes "over-think") with correlated mistakes and
max-softmax / entropy / learned-error signals. The traces are split in two: the
policies are fitted (and the heuristics' grids built and tuned) on the calibration
half and every number below is measured on the held-out half.

Writes to ``--out`` (default ``./frontier_out``): ``frontier.png`` (the frontiers),
``frontier.csv`` (every swept point), ``summary.json`` (all tables).

    PYTHONPATH=. python benchmarks/frontier.py [--out DIR] [--samples N] [--aggregation]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="./frontier_out", help="output folder (default ./frontier_out)")
  p.add_argument("--samples", type=int, default=60_000, help="traces in total, split 50/50 (default 60000)")
  p.add_argument("--stages", type=int, default=5, help="stages of the built-in cascade (default 5)")
  p.add_argument("--true-states", type=int, default=16, help="resolution of the true cascade (default 16)")
  p.add_argument("--bins", type=int, default=12, help="score bins of the fitted model (default 12)")
  p.add_argument("--lams", type=int, default=64, help="lam values in the recall sweep (default 64)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--aggregation", action="store_true",
                 help="also run soft state aggregation at K = --agg-states (slow: ~1 min)")
  p.add_argument("--agg-states", type=int, default=1000)
  args = p.parse_args(argv)
  for name in ("samples", "stages", "true_states", "bins", "lams", "agg_states"):
    if getattr(args, name) < (2 if name in ("samples", "stages", "lams") else 1):
      p.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is too small")
  return args


def main(argv=None) -> int:
  args = _parse(argv)
  import jax

  import ttamer_jax as tj
  from ttamer_jax.app import plotting

  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  key = jax.random.PRNGKey(args.seed)
  k_tr, k_split, k_slo, k_pert = jax.random.split(key, 4)
  cascade = tj.overthinking_cascade(args.stages, args.true_states)
  traces = tj.workload_traces(k_tr, cascade, args.samples)
  calib, held = tj.data.split_traces(k_split, traces, 0.5)
  print(f"Workload: over-thinking cascade, {args.stages} stages, true resolution {args.true_states}; "
        f"{calib.num_samples} calibration + {held.num_samples} held-out traces (0/1 loss).")
  fit = tj.fit_cascade(calib, args.bins, score="error_prob")
  fit_agree = tj.fit_cascade(calib, 2 * args.bins, score="error_prob", feature="agree_prev")
  print(f"Fitted: {args.bins} quantile bins of 'error_prob' (recall, no-recall); "
        f"x agree-with-previous-exit ({2 * args.bins} states) for recall+agree.\n")

  lams = np.linspace(0.0, 1.0, args.lams + 1)[1:]
  sweeps = {"recall": tj.sweep_recall(fit, held, lams),
            "recall_agree": tj.sweep_recall(fit_agree, held, lams),
            "no_recall": tj.evaluation.sweep_no_recall(fit, held, lams)}
  heur_held = tj.evaluation.heuristic_sweeps(calib, held, confidence_score="max_softmax", entropy_score="entropy")
  heur_cal = tj.evaluation.heuristic_sweeps(calib, calib, confidence_score="max_softmax", entropy_score="entropy")
  names = ("confidence", "per_stage", "entropy", "patience", "fixed_exit")
  sweeps.update({k: heur_held[k] for k in names})
  sweeps["hindsight"] = tj.evaluation.hindsight_sweep(held, lams)
  fronts = {name: tj.evaluation.pareto_front(sw.cost_norm, sw.error) for name, sw in sweeps.items()}

  # ---- table 1: frontiers
  ref = sweeps["recall"]
  print("Frontiers on held-out traces (cost normalised by the full cascade). gap = mean error "
        "difference to the recall frontier over the common cost range (> 0: recall is better).")
  print(f"{'method':>13} {'points':>6} {'pareto':>6} {'min cost':>9} {'min error':>10} {'gap vs recall':>14}")
  table1 = []
  for name, sw in sweeps.items():
    gap = tj.evaluation.frontier_gap(ref.cost_norm, ref.error, sw.cost_norm, sw.error)
    row = dict(method=name, points=int(np.size(sw.param)), pareto=int(fronts[name].size),
               min_cost=float(np.min(sw.cost_norm)), min_error=float(np.min(sw.error)),
               gap_vs_recall=float(gap.mean_gap), gap_range=[float(gap.low), float(gap.high)])
    table1.append(row)
    print(f"{name:>13} {row['points']:6d} {row['pareto']:6d} {row['min_cost']:9.4f} {row['min_error']:10.4f} "
          f"{row['gap_vs_recall']:+14.5f}")

  # ---- table 2: objective at fixed lam (heuristics tuned on the calibration half)
  print("\nHeld-out objective lam*error + (1-lam)*cost at fixed lam; policies fitted / heuristics "
        "tuned on the calibration half (lower is better; +- is one standard error).")
  lam_points = (0.3, 0.5, 0.7, 0.9)
  cols = ["recall", "recall_agree", "no_recall", *names, "hindsight"]
  print(f"{'lam':>4} " + " ".join(f"{c:>13}" for c in cols))
  table2 = []
  for lam in lam_points:
    ev = tj.evaluate(fit.recall_policy(lam), held, lam)
    ev_agree = tj.evaluate(fit_agree.recall_policy(lam), held, lam)
    ev_nr = tj.evaluate(fit.no_recall_policy(lam), held, lam)
    row = {"lam": lam, "recall": float(ev.objective), "recall_se": float(ev.objective_se),
           "recall_agree": float(ev_agree.objective), "no_recall": float(ev_nr.objective)}
    for k in names:
      row[k] = tj.evaluation.tuned_objective(heur_cal[k], heur_held[k], lam)[1]
    row["hindsight"] = float(tj.evaluate(tj.hindsight_policy(held.losses, held.costs, lam),
                                                 held, lam).objective)
    table2.append(row)
    cells = [f"{row['recall']:.4f}+-{row['recall_se']:.4f}"] + [f"{row[c]:13.4f}" for c in cols[1:]]
    print(f"{lam:4.1f} {cells[0]:>13} " + " ".join(cells[1:]))

  # ---- table 3: SLOs
  print("\nSLO policies (bisection on lam + per-request coin between the two bracketing policies; "
        "constraint met in expectation on the calibration half), achieved on held-out data "
        "with 95% bootstrap intervals:")
  full_cost = float(np.asarray(calib.cost_matrix(), np.float64).sum(1).mean())
  err_lo, err_hi = float(np.min(ref.error)), float(np.max(ref.error))
  table3 = []
  for kind, target in (("error", err_lo + 0.25 * (err_hi - err_lo)), ("error", err_lo + 0.5 * (err_hi - err_lo)),
                       ("cost", 0.35 * full_cost), ("cost", 0.6 * full_cost)):
    make = tj.evaluation.least_cost_policy if kind == "error" else tj.evaluation.least_error_policy
    pol = make(fit, target, key=k_slo, calibration=calib)
    rep = tj.evaluation.evaluate_slo(pol, held)
    ev = rep.evaluation
    row = dict(kind=kind, target=target, lam_low=float(pol.lam_low), lam_high=float(pol.lam_high),
               prob_high=float(pol.prob_high), achieved=float(rep.achieved),
               achieved_ci=[float(x) for x in rep.achieved_ci], met=bool(rep.met),
               error=float(ev.error), cost_norm=float(ev.cost_norm))
    table3.append(row)
    what = "error <= " if kind == "error" else "cost  <= "
    print(f"  {what}{target:.4f}: lam in [{row['lam_low']:.7f}, {row['lam_high']:.7f}] "
          f"p(high)={row['prob_high']:.3f} -> achieved {row['achieved']:.4f} "
          f"[{row['achieved_ci'][0]:.4f}, {row['achieved_ci'][1]:.4f}] met={row['met']}; "
          f"error {row['error']:.4f}, cost/full {row['cost_norm']:.3f}")

  # ---- table 4: robustness
  print("\nRobustness at lam = 0.7 (objective; degradation = original - refitted, 95% interval):")
  lam = 0.7
  refit = tj.fit_cascade(held, discretiser=fit.discretiser, score="error_prob")
  rob = tj.split_robustness(fit.recall_policy(lam), refit.recall_policy(lam), held, lam)
  table4 = [dict(setting="other split (fit on calibration, refit on held-out)", objective=float(rob.objective),
                 refit=float(rob.refit_objective), degradation=float(rob.degradation),
                 ci=[float(x) for x in rob.degradation_ci])]
  for strength in (0.1, 0.3):
    pert = tj.evaluation.perturb_cascade(k_pert, fit.cascade, strength)
    mr = tj.evaluation.model_robustness(fit.recall_policy(lam).policy, pert, lam)
    table4.append(dict(setting=f"model transitions perturbed {strength:.0%} (exact)", objective=float(mr.objective),
                       refit=float(mr.refit_objective), degradation=float(mr.degradation),
                       ci=[float(x) for x in mr.degradation_ci]))
  for row in table4:
    print(f"  {row['setting']:>52}: {row['objective']:.5f} vs refit {row['refit']:.5f} -> "
          f"{row['degradation']:+.5f} [{row['ci'][0]:+.5f}, {row['ci'][1]:+.5f}]")

  # ---- optional: aggregation
  table5 = []
  if args.aggregation:
    print(f"\nSoft state aggregation at K = {args.agg_states}, lam = 0.5, float64: the policy solved on "
          "the q-meta-state model, evaluated exactly on the true model, vs the exact optimum.")
    with jax.enable_x64(True):
      cases = {"over-thinking (smooth)": tj.overthinking_cascade(args.stages, args.agg_states),
               "random sparse rows, Dirichlet(0.05)": tj.random_cascade(
                   jax.random.PRNGKey(args.seed), args.stages, args.agg_states, concentration=0.05,
                   cost_scale=0.2)}
      for label, big in cases.items():
        jax.block_until_ready(tj.solve_recall(big, 0.5))   # compile
        t_exact = time.perf_counter()
        exact = float(jax.block_until_ready(tj.solve_recall(big, 0.5)).value)
        t_exact = time.perf_counter() - t_exact
        print(f"  {label}: exact optimum {exact:.8f} (dense O(M K^2) solve {t_exact:.3f} s)")
        for r in tj.evaluation.aggregation_report(big, 0.5, (25, 50, 100, 200), progress=sys.stderr.isatty()):
          row = {k: float(getattr(r, k)) for k in r.__dataclass_fields__}
          row["cascade"], row["exact_solve_seconds"] = label, t_exact
          table5.append(row)
          print(f"    q = {int(row['num_meta']):4d}: aggregated model's own value {row['model_value']:.8f}, "
                f"its policy on the true model {row['policy_value']:.8f}, relative gap "
                f"{row['relative_gap']:.2e}, weighted KL {row['kl']:.2e}, factored solve "
                f"{row['solve_seconds']:.3f} s")

  # ---- outputs
  with open(os.path.join(args.out, "frontier.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "param", "error", "cost", "cost_norm", "pareto"])
    for name, sw in sweeps.items():
      on = set(fronts[name].tolist())
      for i, r in enumerate(sw.rows()):
        w.writerow([name, r["param"], r["error"], r["cost"], r["cost_norm"], int(i in on)])
  summary = dict(args=vars(args), frontiers=table1, fixed_lam=table2, slo=table3, robustness=table4,
                 aggregation=table5)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plotting.plot_pareto(
      sweeps, os.path.join(args.out, "frontier.png"),
      title=f"Over-thinking cascade ({args.stages} stages): held-out frontiers, fitted on "
            f"{calib.num_samples} calibration traces",
      error_label="error rate of the answer (held-out)",
      cost_label="mean cost / cost of the full cascade (held-out)")
  print(f"\nWrote {args.out}/frontier.png, frontier.csv, summary.json ({time.time() - t0:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
