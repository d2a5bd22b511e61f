"""How would each choice rule have done on held-out traffic? Every candidate, every cell.

    python benchmarks/choice_rules.py       # 5 workloads x 3 seeds x 3 sizes (~20 min, 2 cores)
    python benchmarks/choice_rules.py --workloads synthetic --sizes 500 --out rules_out

For each workload, seed, calibration size and ``lam`` (the cells of
``benchmarks/reproduce_selection.py``): one :func:`ttamer_jax.fit_policy` on the calibration
split, then *every* scored candidate's refit (:meth:`PolicySelection.refit_of`, no new
fitting) replayed on the held-out test split. Any choice rule is then a function of the
cross-fitted scores, and its held-out ``J`` is looked up, so rules are compared on the same
fits. Reported per rule: cells (seeds counted apart) where the chosen policy is worse than
the best simple rule (the rule of least cross-fitted ``J``, what a careful user of thresholds
deploys) by more than 2 paired standard errors on the test split, the worst such ratio, and
the mean relative held-out ``J`` against the best rule at full size. ``--load`` re-evaluates
saved cells (``<out>/cells_<workload>.pkl``) without fitting.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

import jax
import numpy as np

import ttamer_jax as tj
from ttamer_jax.app import demo
from ttamer_jax.evaluation import selection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce_selection as rs  # noqa: E402


def least_j(scores):
  return min(scores, key=lambda s: s.objective)


RULES = {
    "library (default rule, designs earn their place)": selection.one_se_choice,
    "least cross-fitted J": least_j,
    "one-SE rule only": selection.simplest_within_one_se,
    "previous rule (T-Tamer wins ties)": rs.previous_rule,
}


def collect(name: str, seeds, sizes, args) -> list[dict]:
  cells = []
  for seed in seeds:
    full_prep = demo.prepare(name, seed=seed, cache_dir=args.cache_dir, progress=False)
    for size in sizes:
      prep = rs.subsample(full_prep, size, seed)
      cal, test = prep.calibration, prep.test
      full = test.full_cost()
      for lam in rs.LAMS:
        t0 = time.perf_counter()
        sel = tj.fit_policy(cal, lam, key=jax.random.PRNGKey(seed), num_resamples=100)
        held = {s.candidate: rs._j(tj.replay_traces(sel.refit_of(s.candidate).deployed, test),
                                   lam, full).astype(np.float32) for s in sel.scores}
        cells.append(dict(workload=name, seed=seed, size=cal.num_samples, full=size is None,
                          lam=lam, scores=[s for s in sel.scores], held=held))
        print(f"[{name} seed {seed}] {cal.num_samples} requests, lam {lam}: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
  return cells


def evaluate(cells) -> list[str]:
  lines = ["| rule | cells worse than the best rule by > 2 SE | worst (SE) | rule chosen | "
           "mean rel. held-out J vs best rule, full size |", "|---|---|---|---|---|"]
  detail = []
  for label, rule in RULES.items():
    bad, worst, rel, simple = [], 0.0, [], 0
    for c in cells:
      rules = [s for s in c["scores"] if s.candidate in rs.BASELINES.values()
               and not s.candidate.ttamer]
      best_rule = least_j(rules)
      chosen = rule(list(c["scores"]))
      simple += not chosen.candidate.ttamer
      d = c["held"][chosen.candidate].astype(np.float64) - c["held"][best_rule.candidate]
      se = d.std(ddof=1) / np.sqrt(d.size)
      z = d.mean() / se if se > 0 else 0.0
      worst = max(worst, z)
      if c["full"]:
        rel.append(d.mean() / c["held"][best_rule.candidate].mean())
      if z > 2:
        bad.append(f"{c['workload']}@{c['size']} lam {c['lam']} seed {c['seed']}: "
                   f"{chosen.name} ({z:.1f} SE)")
    lines.append(f"| {label} | {len(bad)} of {len(cells)} | {worst:.1f} | "
                 f"{100 * simple / len(cells):.0f}% | {100 * np.mean(rel):+.1f}% |")
    detail += [f"* {label}: " + ("; ".join(bad) if bad else "none")]
  return lines + ["", "Cells worse than the best rule by more than 2 SE:"] + detail


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workloads", default=",".join(rs.WORKLOADS))
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--sizes", default="full,500,1000", help="calibration sizes ('full': all)")
  ap.add_argument("--out", default="choice_rules_out")
  ap.add_argument("--cache-dir", default=None)
  ap.add_argument("--load", action="store_true", help="re-evaluate saved cells")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  sizes = [None if s == "full" else int(s) for s in args.sizes.split(",")]
  cells = []
  for name in args.workloads.split(","):
    path = os.path.join(args.out, f"cells_{name}.pkl")
    if args.load:
      with open(path, "rb") as f:
        cells += pickle.load(f)
      continue
    new = collect(name, seeds, sizes, args)
    with open(path, "wb") as f:
      pickle.dump(new, f)
    cells += new
  text = "\n".join(evaluate(cells))
  with open(os.path.join(args.out, "choice_rules.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
