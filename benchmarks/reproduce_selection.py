"""Does the policy `ttamer fit` hands a user hold up on held-out traffic?

    python benchmarks/reproduce_selection.py                       # every workload, 3 seeds (~1-2 h, 2 cores)
    python benchmarks/reproduce_selection.py --workloads sklearn --seeds 0 --out sel_out

For each workload and seed: the calibration traces are the only data the choice
sees (:func:`ttamer_jax.fit_policy`, 5-fold cross-fitting over every default
candidate); at each ``lam`` the selected policy, every simple rule (each tuned on
the same calibration split: thresholds and parameter chosen there), the plain
recall optimum over 8 max-softmax bins (what ``ttamer fit`` returned before
selection) and the no-recall optimum are replayed on the held-out test split.
Reported per workload and lam, over seeds:

* held-out ``J = lam * error + (1 - lam) * cost share`` of the selected policy, of
  the best simple rule (the rule family of least cross-fitted ``J`` on calibration,
  i.e. what a careful user of thresholds would have deployed) and of every baseline;
* the paired bootstrap interval of ``J(selected) - J(best rule)`` on the test
  requests, and that difference in standard errors;
* the model check: modelled ``J`` of the selected (or best T-Tamer) candidate vs the
  cross-fitted and the held-out measured ``J``;
* what was selected.

Workloads: ``mnist1d`` (MNIST-1D, 16,000 samples, early-exit 1-D CNN), ``sklearn``
(five heterogeneous scikit-learn models on generated tabular data, measured
latency), ``digits`` (scikit-learn's digits, early-exit CNN), ``sequences``
(generated tokens, early-exit Transformer) and ``synthetic`` (a known
over-thinking cascade). Writes ``<out>/selection.md`` and ``<out>/selection.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

import ttamer_jax as tj
from ttamer_jax.app import demo, reports
from ttamer_jax.evaluation import selection
from ttamer_jax.evaluation.metrics import normalised_objective

LAMS = (0.5, 0.8, 0.9, 0.95, 0.99)
WORKLOADS = ("mnist1d", "sklearn", "digits", "sequences", "synthetic")
BASELINES = {
    "recall_8bins": tj.evaluation.Candidate("recall", "max_softmax", 8),
    "no_recall_8bins": tj.evaluation.Candidate("no_recall", "max_softmax", 8),
    "confidence": tj.evaluation.Candidate("confidence", "max_softmax"),
    "per_stage": tj.evaluation.Candidate("per_stage", "max_softmax"),
    "patience": tj.evaluation.Candidate("patience"),
    "fixed_exit": tj.evaluation.Candidate("fixed_exit"),
}
RULES = ("confidence", "per_stage", "patience", "fixed_exit")


def _objective(res, lam, full) -> np.ndarray:
  """``[N]`` per-request unit-free ``J`` of a replay (the measure selection scores with)."""
  return normalised_objective(res.loss, res.cost, lam, full)


def previous_rule(scores):
  """The choice rule before issue 23: least cross-fitted J, a T-Tamer candidate within
  one paired SE of the best winning the tie (kept here to measure the change)."""
  best = min(scores, key=lambda s: s.objective)
  if best.candidate.ttamer:
    return best
  tied = [s for s in scores if s.candidate.ttamer
          and selection.paired_se(s, best)[0] <= selection.paired_se(s, best)[1]]
  return min(tied, key=lambda s: s.objective) if tied else best


def run_one(prep, lam: float, seed: int, num_resamples: int) -> dict:
  cal, test = prep.calibration, prep.test
  key = jax.random.PRNGKey(seed)
  t0 = time.perf_counter()
  sel = tj.fit_policy(cal, lam, key=key, num_resamples=num_resamples)
  fit_seconds = time.perf_counter() - t0
  full = test.full_cost()
  per = {"selected": _objective(tj.replay_traces(sel.deployed, test), lam, full)}
  point = selection.OperatingPoint(lam, None)
  old = previous_rule(list(sel.scores))
  per["previous_rule"] = (per["selected"] if old is sel.chosen else _objective(
      tj.replay_traces(selection.refit(old.candidate, cal, point, key=key).deployed, test), lam, full))
  for name, cand in BASELINES.items():
    fitted = selection.refit(cand, cal, point, key=key)
    per[name] = _objective(tj.replay_traces(fitted.deployed, test), lam, full)
  cv = {s.candidate: s for s in sel.scores}
  best_rule = min(RULES, key=lambda r: cv[BASELINES[r]].objective if BASELINES[r] in cv else np.inf)
  d = per["selected"] - per[best_rule]
  se = float(d.std(ddof=1) / np.sqrt(d.size))
  boot = tj.evaluation.bootstrap_means(jax.random.fold_in(key, 7), d[:, None], num_resamples)[:, 0]
  check = sel.model_check
  out = dict(
      lam=lam, selected=sel.chosen.name, selected_is_ttamer=sel.chosen.candidate.ttamer,
      previous_rule_selected=old.name,
      runner_up=None if sel.runner_up is None else sel.runner_up.name,
      cross_fitted_j=sel.chosen.objective, fit_seconds=fit_seconds,
      test_j={k: float(v.mean()) for k, v in per.items()},
      test_se={k: float(v.std(ddof=1) / np.sqrt(v.size)) for k, v in per.items()},
      best_rule=best_rule, diff=float(d.mean()), diff_se=se,
      diff_ci=np.quantile(boot, [0.025, 0.975]).tolist(), notes=list(sel.notes))
  if check is not None:
    modelled = check.cross_fitted["objective"].predicted
    out.update(check_policy=check.policy, modelled_j=modelled,
               cross_fitted_measured_j=check.cross_fitted["objective"].measured,
               check_consistent=check.consistent)
    if check.policy == sel.chosen.name:
      out["test_minus_modelled"] = out["test_j"]["selected"] - check.in_sample["objective"].predicted
  return out


def subsample(prep, size, seed: int):
  """``prep`` with a random ``size`` of its calibration requests (``None``: all of them)."""
  if size is None or size >= prep.calibration.num_samples:
    return prep
  keep = np.sort(np.random.default_rng(1000 + seed).permutation(prep.calibration.num_samples)[:size])
  return dataclasses.replace(prep, calibration=prep.calibration.subset(keep))


def run_workload(name: str, seeds, args) -> list[dict]:
  rows = []
  for seed in seeds:
    t0 = time.perf_counter()
    full_prep = demo.prepare(name, seed=seed, cache_dir=args.cache_dir, quick=args.quick,
                                 progress=sys.stderr.isatty())
    for size in args.sizes:
      prep = subsample(full_prep, size, seed)
      print(f"[{name} seed {seed}] {prep.calibration.num_samples} calibration / "
            f"{prep.test.num_samples} test requests, {prep.calibration.num_stages} stages "
            f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
      rows += [run_row(prep, size, lam, seed, args) for lam in args.lams]
  return rows


def run_row(prep, size, lam: float, seed: int, args) -> dict:
  row = run_one(prep, lam, seed, args.resamples)
  row.update(workload=prep.name if size is None else f"{prep.name} @{size}", seed=seed,
             calibration=prep.calibration.num_samples, test=prep.test.num_samples)
  print(f"  lam {lam}: selected {row['selected']} J {row['test_j']['selected']:.4f} vs "
        f"{row['best_rule']} {row['test_j'][row['best_rule']]:.4f} "
        f"(diff {row['diff']:+.4f} +- {row['diff_se']:.4f}; previous rule "
        f"{row['test_j']['previous_rule']:.4f}; fit {row['fit_seconds']:.1f} s)",
        file=sys.stderr, flush=True)
  return row


def summary(rows: list[dict]) -> tuple[str, dict]:
  workloads = list(dict.fromkeys(r["workload"] for r in rows))
  lines = ["| workload | lam | selected (seeds) | J selected | J best rule | rel. diff | worst seed diff / SE "
           "| J previous rule | J plain recall | modelled J (cross-fitted) vs measured |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  rel_by_workload, violations = {}, []
  for w in workloads:
    rel_all = []
    for lam in sorted({r["lam"] for r in rows if r["workload"] == w}):
      rs = [r for r in rows if r["workload"] == w and r["lam"] == lam]
      js = np.mean([r["test_j"]["selected"] for r in rs])
      jr = np.mean([r["test_j"][r["best_rule"]] for r in rs])
      jp = np.mean([r["test_j"]["recall_8bins"] for r in rs])
      jo = np.mean([r["test_j"]["previous_rule"] for r in rs])
      rel = (js - jr) / jr if jr > 0 else 0.0
      rel_all.append(rel)
      z = max(r["diff"] / r["diff_se"] if r["diff_se"] > 0 else 0.0 for r in rs)
      if z > 1:
        violations.append((w, lam, z))
      names = sorted({r["selected"] for r in rs})
      mc = [f"{r['modelled_j']:.4f}/{r['cross_fitted_measured_j']:.4f}" for r in rs if "modelled_j" in r]
      lines.append(f"| {w} | {lam} | {'; '.join(names)} | {js:.4f} | {jr:.4f} | {100 * rel:+.1f}% | "
                   f"{z:+.2f} | {jo:.4f} | {jp:.4f} | {', '.join(mc)} |")
    rel_by_workload[w] = float(np.mean(rel_all))
  mean_rel = float(np.mean(list(rel_by_workload.values()))) if rel_by_workload else 0.0
  lines += ["", "Mean relative difference of held-out J, selected vs best simple rule, per workload: "
            + ", ".join(f"{w} {100 * v:+.1f}%" for w, v in rel_by_workload.items())
            + f"; over the workloads {100 * mean_rel:+.1f}%.",
            "Cells where the selected policy is worse than the best rule by more than one standard "
            "error in some seed: " + (", ".join(f"{w} lam {l} ({z:.1f} SE)" for w, l, z in violations)
                                     or "none") + "; by more than two: "
            + (", ".join(f"{w} lam {l} ({z:.1f} SE)" for w, l, z in violations if z > 2) or "none")
            + "."]
  return "\n".join(lines), dict(relative_by_workload=rel_by_workload, mean_relative=mean_rel,
                                violations=violations)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workloads", default=",".join(WORKLOADS))
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--lams", default=",".join(map(str, LAMS)))
  ap.add_argument("--out", default="selection_out")
  ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  ap.add_argument("--resamples", type=int, default=1000)
  ap.add_argument("--cache-dir", default=None)
  ap.add_argument("--calibration-sizes", default="full",
                  help="comma-separated: 'full' and/or numbers of calibration requests to "
                       "subsample (e.g. full,500,1000); the test split is unchanged")
  args = ap.parse_args(argv)
  args.sizes = [None if x.strip() == "full" else int(x) for x in args.calibration_sizes.split(",")]
  args.lams = [float(x) for x in args.lams.split(",")]
  seeds = [int(x) for x in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  rows = []
  t0 = time.perf_counter()
  for w in [x.strip() for x in args.workloads.split(",") if x.strip()]:
    rows += run_workload(w, seeds, args)
    table, stats = summary(rows)
    with open(os.path.join(args.out, "selection.json"), "w") as f:
      f.write(reports.dumps(dict(rows=rows, stats=stats)) + "\n")
    with open(os.path.join(args.out, "selection.md"), "w") as f:
      f.write(f"# Selected policy vs the simple rules, held out\n\n`python benchmarks/reproduce_selection.py "
              f"{' '.join(argv or sys.argv[1:])}` ({time.perf_counter() - t0:.0f} s)\n\n{table}\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
