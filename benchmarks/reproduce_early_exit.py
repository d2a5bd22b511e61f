"""Network -> exit traces -> optimal policy -> frontier and faster serving, per workload.

    python benchmarks/reproduce_early_exit.py                  # all workloads, ~3-5 min on 2 CPU cores
    python benchmarks/reproduce_early_exit.py --workloads digits --out early_exit_out

For each workload (``digits``: scikit-learn's bundled 8x8 digits with the early-exit
CNN; ``sequences``: generated token sequences with the early-exit Transformer;
``synthetic``: traces sampled from a known over-thinking cascade) it trains the
network (or loads it from the cache), collects exit traces with measured per-stage
latency on the calibration split, fits a cascade there, sweeps ``lam`` for the
recall and no-recall optima and every heuristic over its own grid, and writes
``<out>/<workload>_pareto.png`` (held-out error vs normalised measured latency), a
markdown report ``<out>/report.md`` and ``<out>/results.json``. For the network
workloads it also serves the test split with the recall policy chosen on the
calibration split and times it against the full network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ttamer_jax.app import compare, demo, plotting, reports


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def run_workload(name: str, args) -> tuple[str, dict]:
  t0 = time.perf_counter()
  prep = demo.prepare(name, seed=args.seed, cache_dir=args.cache_dir, quick=args.quick,
                      progress=sys.stderr.isatty())
  comp = compare.compare_policies(prep.calibration, prep.test, num_states=args.states)
  points = compare.operating_points(comp, tolerance=args.tolerance)
  objectives = compare.objectives_at(comp, [0.5, 0.9, 0.97, 0.99])
  gaps = compare.frontier_gaps(comp)
  plot = plotting.plot_pareto(
      {k: v for k, v in comp.test.items() if k != "fixed_exit"},
      os.path.join(args.out, f"{name}_pareto.png"), title=f"{prep.name}: held-out frontiers",
      cost_label="mean measured latency / full network", error_label="test error rate",
      full_error=comp.full_error["test"])
  lines = [f"## {prep.name}", ""]
  if prep.model is not None:
    acc = np.asarray(prep.info["test_accuracy"])
    how = "loaded from cache" if prep.info["loaded"] else f"trained in {prep.info['train_seconds']:.0f} s"
    lines += [f"Network {how}; test accuracy per exit: "
              + ", ".join(f"{100 * a:.1f}%" for a in acc) + ". Measured latency share per stage: "
              + ", ".join(f"{c:.3f}" for c in prep.info["stage_cost_share"]) + ".", ""]
  lines += [f"Calibration {prep.calibration.num_samples} / test {prep.test.num_samples} requests; "
            f"fitted {args.states} max-softmax bins per exit.", "",
            "### Latency to stay within 1 point of the full network's accuracy", "",
            reports.format_operating_points(points, comp.full_error, args.tolerance), "",
            "### Held-out objective lam * error + (1 - lam) * latency (setting tuned on calibration)",
            "", reports.format_objectives(objectives), "",
            "Mean error gap to the recall frontier over the common latency range (positive: recall "
            "better): " + ", ".join(f"{k} {v:+.4f}" for k, v in gaps.items()) + ".", ""]
  serving_result = None
  if prep.model is not None:
    from ttamer_jax.networks import serving_costs
    chosen = next(r for r in points if r["policy"] == "recall")
    if chosen["chosen_param"] is not None:
      deployed = comp.fitted.recall_policy(chosen["chosen_param"])
      x, y = prep.test_inputs
      bench = serving_costs.served_wall_time(prep.model, deployed, x, y, buckets=(32, 128, 512),
                                             repeats=5)
      serving_result = dict(lam=chosen["chosen_param"], serve_ms=1e3 * bench["serve_seconds"],
                            full_ms=1e3 * bench["full_seconds"], speedup=bench["speedup"],
                            serve_accuracy=bench["serve_accuracy"],
                            full_accuracy=bench["full_accuracy"],
                            mean_stages=bench["mean_stages"], batch=bench["batch_size"])
      lines += ["### Serving the test split with that recall policy", "",
                f"`serve` (bucketed compaction) {1e3 * bench['serve_seconds']:.1f} ms vs full "
                f"network {1e3 * bench['full_seconds']:.1f} ms on {bench['batch_size']} requests "
                f"(**{bench['speedup']:.2f}x**); accuracy {100 * bench['serve_accuracy']:.1f}% vs "
                f"{100 * bench['full_accuracy']:.1f}%; {bench['mean_stages']:.2f} stages per request on "
                "average. Wall time includes per-stage dispatch and host round trips that the "
                "per-stage latency model above does not count.", ""]
  lines += [f"![{prep.name} frontiers]({os.path.basename(plot)})", "",
            f"({time.perf_counter() - t0:.0f} s)", ""]
  result = dict(workload=prep.name, info=prep.info, full_error=comp.full_error,
                operating_points=points, objectives=objectives, frontier_gaps=gaps,
                serving=serving_result, plot=plot,
                frontiers={k: v.rows() for k, v in comp.test.items()})
  return "\n".join(lines), result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", nargs="+", default=list(demo.WORKLOADS),
                      choices=tuple(demo.WORKLOADS))
  parser.add_argument("--out", default="early_exit_out")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--states", type=int, default=8, help="score bins per exit of the fitted cascade")
  parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy tolerance (0.01 = 1 point)")
  parser.add_argument("--cache-dir", default=None, help="checkpoint cache (default ~/.cache/ttamer_jax)")
  parser.add_argument("--quick", action="store_true", help="train a tenth of the steps")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  sections, results = ["# Early-exit reproduction", ""], []
  for name in args.workloads:
    print(f"[{name}] ...", flush=True)
    text, result = run_workload(name, args)
    print(text, flush=True)
    sections.append(text)
    results.append(result)
  sections.append(f"Total {time.perf_counter() - t0:.0f} s. Command: `python benchmarks/reproduce_early_exit.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]) + "`")
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("\n".join(sections) + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(_jsonable(results), f, indent=1)
  print(f"wrote {args.out}/report.md, results.json and the plots ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
