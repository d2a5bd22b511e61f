"""How much do tuned threshold heuristics leave on the table? (issue: differentiable relaxation)

    python benchmarks/relaxation_report.py                 # ~2-4 min on 2 CPU cores
    python benchmarks/relaxation_report.py --quick         # smaller tuning budget

Part 1 -- cascades, evaluated exactly (no sampling error). A threshold rule reads a
confidence per (stage, state), here the calibrated one ``1 - values``. Columns:
the exact recall optimum (DP), the no-recall optimum (DP), the best single
threshold (exhaustive over the distinct scores), gradient-tuned per-stage
thresholds (optax on the sigmoid relaxation, tau annealed, restarts; hard rule
evaluated), the gradient-tuned recall-threshold hybrid (same rule, answers with
the best consulted stage), and -- where the rule space is small enough -- the best
per-stage rule and the best hybrid found by enumerating every rule. Gaps are
relative to the recall optimum: (J - J*) / J*. Includes the gap instance, where
any threshold rule must lose a factor alpha.

Part 2 -- workloads, on held-out traces: everything tuned or fitted on the
calibration split, scored on the test split (digits CNN, sequence Transformer,
synthetic over-thinking traces; networks come from the same cache as
``benchmarks/reproduce_early_exit.py``). "recall" is the recall optimum of the
cascade fitted on calibration (8 max-softmax bins), replayed on test.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import ttamer_jax as tj
from ttamer_jax.app import demo

LAMS = (0.5, 0.7, 0.9, 0.97)


def _gap(j, opt):
  return (j - opt) / opt if opt > 0 else float("nan")


def cascade_rows(name, cascade, lams, tuning):
  scores = 1.0 - np.asarray(cascade.values)
  rows = []
  for lam in lams:
    recall = float(tj.solve_recall(cascade, lam).value)
    no_recall = float(tj.solve_no_recall(cascade, lam).value)
    single = min(float(tj.core.threshold_objective_on_cascade(t, scores, cascade, lam, 0))
                 for t in np.concatenate([np.unique(scores), [np.inf]]))
    key = jax.random.PRNGKey(0)
    tuned = float(tj.tune_thresholds_on_cascade(key, cascade, scores, lam, **tuning).hard_objective)
    hybrid = float(tj.tune_thresholds_on_cascade(key, cascade, scores, lam, recall=True,
                                                 **tuning).hard_objective)
    row = dict(instance=name, lam=lam, recall=recall, no_recall=no_recall, single=single,
               tuned=tuned, hybrid=hybrid)
    try:
      row["exhaustive"] = float(tj.exhaustive_thresholds_on_cascade(cascade, scores, lam)[1])
      row["exhaustive_hybrid"] = float(
          tj.exhaustive_thresholds_on_cascade(cascade, scores, lam, recall=True)[1])
    except ValueError:
      row["exhaustive"] = row["exhaustive_hybrid"] = None
    rows.append(row)
  return rows


def workload_rows(name, lams, tuning, cache_dir):
  prep = demo.prepare(name, seed=0, cache_dir=cache_dir, progress=False)
  cal, test = prep.calibration, prep.test
  fitted = tj.fit_cascade(cal, 8, score="max_softmax")
  s_cal, s_test = np.asarray(cal.signals["max_softmax"]), np.asarray(test.signals["max_softmax"])
  l_cal, l_test = np.asarray(cal.losses), np.asarray(test.losses)
  costs = np.asarray(cal.costs)
  rows = []
  for lam in lams:
    held = lambda t, recall: float(tj.core.threshold_objective(np.asarray(t), s_test, l_test, costs, lam, 0,
                                                          recall=recall))
    recall = tj.evaluate(fitted.recall_policy(lam), test, lam).objective
    no_recall = tj.evaluate(fitted.no_recall_policy(lam), test, lam).objective
    t_single, _ = tj.grid_search_threshold(s_cal, l_cal, costs, lam)
    key = jax.random.PRNGKey(0)
    tuned = tj.tune_thresholds(key, s_cal, l_cal, costs, lam, **tuning)
    hybrid = tj.tune_thresholds(key, s_cal, l_cal, costs, lam, recall=True, **tuning)
    rows.append(dict(instance=prep.name, lam=lam, recall=float(recall), no_recall=float(no_recall),
                     single=held(np.full(cal.num_stages, float(t_single)), False),
                     tuned=held(tuned.thresholds, False), hybrid=held(hybrid.thresholds, True),
                     exhaustive=None, exhaustive_hybrid=None))
  return rows


COLUMNS = ("no_recall", "single", "tuned", "hybrid", "exhaustive", "exhaustive_hybrid")
HEAD = ("no-recall opt", "best single thr.", "tuned per-stage", "tuned recall hybrid",
        "best per-stage (all rules)", "best hybrid (all rules)")


def table(rows):
  lines = ["| instance | lam | recall optimum J* | " + " | ".join(HEAD) + " |",
           "|---|---|---|" + "---|" * len(COLUMNS)]
  for r in rows:
    cells = []
    for c in COLUMNS:
      v = r[c]
      cells.append("-" if v is None else f"{v:.4f} ({100 * _gap(v, r['recall']):+.1f}%)")
    lines.append(f"| {r['instance']} | {r['lam']:.2f} | {r['recall']:.4f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="relaxation_out")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--workloads", nargs="*", default=list(demo.WORKLOADS))
  args = parser.parse_args(argv)
  tuning = dict(steps=100, restarts=4) if args.quick else dict(steps=300, restarts=8)
  t0 = time.perf_counter()
  cascades = [("gap alpha=4", tj.gap_instance(4.0)), ("gap alpha=10", tj.gap_instance(10.0)),
              ("overthinking (5x8)", tj.overthinking_cascade(5, 8)),
              ("random A (5x6)", tj.random_cascade(jax.random.PRNGKey(1), 5, 6, cost_scale=0.1)),
              ("random B (5x6)", tj.random_cascade(jax.random.PRNGKey(2), 5, 6, cost_scale=0.1))]
  part1 = []
  for name, c in cascades:
    lams = (1.0,) if name.startswith("gap") else LAMS
    part1 += cascade_rows(name, c, lams, tuning)
    print(f"[cascade] {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
  part2 = []
  for name in args.workloads:
    part2 += workload_rows(name, LAMS, tuning, args.cache_dir)
    print(f"[workload] {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
  text = ["# Tuned thresholds vs the exact recall optimum", "",
          "Objective `lam * loss + (1 - lam) * cost` (lower is better); in brackets the gap to the "
          "recall optimum J*.", "", "## Part 1: cascades, exact evaluation", "", table(part1), "",
          "## Part 2: workloads, held-out traces (tuned/fitted on calibration)", "",
          table(part2) if part2 else "(skipped)", "",
          f"Total {time.perf_counter() - t0:.0f} s."]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "relaxation_report.md"), "w") as f:
    f.write("\n".join(text) + "\n")
  with open(os.path.join(args.out, "relaxation_report.json"), "w") as f:
    json.dump(dict(cascades=part1, workloads=part2), f, indent=1)
  print("\n".join(text))


if __name__ == "__main__":
  main()
