"""Does training with the optimal serving cost as an auxiliary loss move the frontier?

    python benchmarks/serving_cost_training.py            # ~4 min on 2 CPU cores
    python benchmarks/serving_cost_training.py --seeds 0 --aux-weights 1

For each seed, the digits early-exit CNN is trained twice from the same
initialisation and batch order: once with the usual joint exit loss, once with
``aux_weight * batch_serving_cost`` added -- the soft-min optimal recall value of a
cascade fitted (with soft bins) to each training batch's exits, at ``lam`` and the
measured per-stage latency shares (ttamer_jax.batch_serving_cost). Both
networks are then profiled on the calibration split, a cascade is fitted there, and
the recall optimum is swept over lam and scored on the held-out test split
(ttamer_jax.app.compare). Reported per seed: final-exit accuracy, the mean error gap
between the two held-out recall frontiers (positive: the auxiliary loss helped),
the latency to stay within 1 point of the full network, and the held-out
objective at ``lam``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import numpy as np

import ttamer_jax as tj
from ttamer_jax.app import compare
from ttamer_jax.networks import profiling, training, workloads


def evaluate_network(model, wl, costs):
  cal = profiling.collect_traces(model, wl.calibration.x, wl.calibration.y, cost="flops").replace(costs=costs)
  test = profiling.collect_traces(model, wl.test.x, wl.test.y, cost="flops").replace(costs=costs)
  comp = compare.compare_policies(cal, test, num_states=8)
  return comp


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--aux-weights", type=float, nargs="+", default=[1.0, 5.0])
  parser.add_argument("--lam", type=float, default=0.9)
  parser.add_argument("--beta", type=float, default=0.01)
  parser.add_argument("--steps", type=int, default=None, help="training steps (default: the workload's)")
  parser.add_argument("--out", default="serving_cost_out")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  rows = []
  for seed in args.seeds:
    wl = workloads.digits(seed=seed)
    config = wl.train_config if args.steps is None else dataclasses.replace(
        wl.train_config, num_steps=args.steps)
    base = wl.make_model(seed)
    training.train(base, wl.train.x, wl.train.y, config, progress=False)
    # One latency vector for every variant: same architecture, same kernels.
    costs = profiling.collect_traces(base, wl.calibration.x, wl.calibration.y, cost="measured").costs
    variants = [("baseline", 0.0, base)]
    for w in args.aux_weights:
      aux = functools.partial(_weighted_cost, weight=w, costs=tuple(np.asarray(costs).tolist()),
                              lam=args.lam, beta=args.beta)
      model = wl.make_model(seed)
      hist = training.train(model, wl.train.x, wl.train.y, config, progress=False, aux_loss=aux)
      variants.append((f"aux x{w:g}", w, model))
      print(f"seed {seed} aux x{w:g}: serving-cost term {hist.aux_loss[:50].mean():.4f} -> "
            f"{hist.aux_loss[-50:].mean():.4f} over training", flush=True)
    comps = {name: evaluate_network(m, wl, costs) for name, _, m in variants}
    ref = comps["baseline"].test["recall"]
    for name, w, model in variants:
      comp = comps[name]
      rec = comp.test["recall"]
      gap = float(tj.evaluation.frontier_gap(rec.cost_norm, rec.error, ref.cost_norm, ref.error).mean_gap)
      point = next(r for r in compare.operating_points(comp) if r["policy"] == "recall")
      _, obj = tj.evaluation.tuned_objective(comp.calibration["recall"], rec, args.lam)
      rows.append(dict(seed=seed, variant=name, aux_weight=w,
                       final_exit_accuracy=float(training.exit_accuracy(model, wl.test.x, wl.test.y)[-1]),
                       frontier_gain_vs_baseline=gap, latency_within_1pt=point["chosen_cost"],
                       error_there=point["chosen_error"], objective_at_lam=obj))
      print(rows[-1], flush=True)
  lines = ["# Optimal serving cost as an auxiliary training loss (digits CNN)", "",
           f"lam = {args.lam}, beta = {args.beta}; held-out (test split) numbers; frontier gain = mean "
           "error gap between the baseline's and this variant's recall frontiers over their common "
           "latency range (positive: this variant reaches lower error at equal latency).", "",
           "| seed | variant | final-exit acc. | frontier gain vs baseline | latency within 1 pt | "
           "error there | objective at lam |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lat = "-" if r["latency_within_1pt"] is None else f"{100 * r['latency_within_1pt']:.1f}%"
    err = "-" if r["error_there"] is None else f"{100 * r['error_there']:.1f}%"
    lines.append(f"| {r['seed']} | {r['variant']} | {100 * r['final_exit_accuracy']:.1f}% | "
                 f"{r['frontier_gain_vs_baseline']:+.4f} | {lat} | {err} | {r['objective_at_lam']:.4f} |")
  lines += ["", f"Total {time.perf_counter() - t0:.0f} s."]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "serving_cost_training.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, "serving_cost_training.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


def _weighted_cost(logits, labels, *, weight, costs, lam, beta):
  import jax.numpy as jnp
  return weight * tj.batch_serving_cost(logits, labels, jnp.asarray(costs), lam, beta=beta)


if __name__ == "__main__":
  main()
