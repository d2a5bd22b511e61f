"""Does policy-guided serving deliver the saving the measured per-stage costs predict?

    python benchmarks/serving_overhead.py                        # digits, sequences, mnist1d
    python benchmarks/serving_overhead.py --workloads sequences --quick --repeats 3

For each built-in network workload it takes the trained network and the
calibration / test traces the demo prepares (``ttamer_jax.app.demo.prepare``,
checkpoints from the cache), fits

  * ``selected``: the policy ``tj.fit_policy`` chooses (what ``ttamer demo`` deploys;
    reported as not servable when it reads posterior-answer stages), and
  * ``recall``: the recall optimum at the demo's ``lam`` (the cheapest calibration
    point within the tolerance of the last exit's error),

and serves the test inputs with each, interleaving timed calls with the full
network, under each serving program (``--programs``: ``batch``, the default
``Server``, one compiled program per group of chunks with each stage's requests
queued across the group; ``chunk``, one compiled program per chunk; ``stage``, one
kernel per stage with a host round trip per stage; the first listed is reported
without a suffix). The full network is timed as one jitted call on the
whole batch and in the server's chunks; ``full_ms`` is the faster. Per policy it
reports

  * ``share``: the mean share of the full cost the policy runs, by the measured
    per-stage costs of the traces (the costs the policy was fitted on);
  * ``predicted_ms = share * full_ms`` and the saving ratio
    ``(full_ms - served_ms) / (full_ms - predicted_ms)`` (goal: >= 0.8);
  * ``padded_share``: the same share in rows actually computed (continuing
    requests padded to their bucket), the best these buckets allow;

with ``--served-costs`` also each policy's share and saving ratio by the served
costs, and ``modelled_served_ms``: the serving time those costs model
(each request's consulted stages at their served cost per request), next to the
measured one (``served_over_modelled``);

and per workload and program the per-stage overhead ``(all_ms - full_ms) / n``,
where ``all_ms`` serves with a policy that runs every stage (no saving possible).

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

WORKLOADS = ("digits", "sequences", "mnist1d")


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workloads", default=",".join(WORKLOADS),
                 help="comma-separated subset of " + ",".join(WORKLOADS))
  p.add_argument("--quick", action="store_true",
                 help="smoke run: a tenth of the training steps, few repeats")
  p.add_argument("--batch", type=int, default=0,
                 help="requests per served batch (0: the whole test split)")
  p.add_argument("--repeats", type=int, default=9, help="interleaved timed calls of each")
  p.add_argument("--buckets", default="",
                 help="comma-separated bucket sizes (default: the Server's default)")
  p.add_argument("--programs", default="batch,chunk",
                 help="serving programs to time: batch (the default Server: one program per "
                      "group of chunks, each stage's requests queued across the group), chunk "
                      "(one program per chunk), stage (one kernel per stage, host sync per "
                      "stage)")
  p.add_argument("--served-costs", action="store_true",
                 help="also measure the per-stage costs of the serving path "
                      "(serving_costs.served_stage_costs), report each policy's share by them, and "
                      "serve a recall policy fitted on them")
  p.add_argument("--batch-costs", action="store_true",
                 help="also measure each stage's per-batch and per-request served time "
                      "(serving_costs.served_cost_model), report each policy's serving time as "
                      "that model prices it, and refit the recall policy on the per-request "
                      "costs it implies at the policy's own reach (a fixed point)")
  p.add_argument("--tolerance", type=float, default=0.01, help="as ttamer demo")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache-dir", default=None, help="checkpoint cache (default ~/.cache/ttamer_jax)")
  p.add_argument("--out", default="serving_overhead.json")
  args = p.parse_args(argv)
  names = [w.strip() for w in args.workloads.split(",") if w.strip()]
  bad = sorted(set(names) - set(WORKLOADS))
  if bad or not names:
    p.error(f"--workloads: unknown {bad or 'empty'}; choose from {','.join(WORKLOADS)}")
  args.workloads = names
  args.programs = [q.strip() for q in args.programs.split(",") if q.strip()]
  if not args.programs or set(args.programs) - {"batch", "chunk", "stage"}:
    p.error(f"--programs: expected a subset of batch,chunk,stage, got {args.programs}")
  if args.batch < 0:
    p.error("--batch must be >= 0")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  try:
    args.buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip()) or None
  except ValueError:
    p.error(f"--buckets: expected comma-separated ints, got {args.buckets!r}")
  return args


def recall_at_demo_lam(calibration, tolerance):
  """The recall optimum of the demo's design (8 max-softmax bins) at the lam ``ttamer fit``
  deploys it at: the cheapest within ``tolerance`` of the last exit's error."""
  from ttamer_jax.evaluation import selection

  fitted = selection.fit_at(selection.Candidate("recall", "max_softmax", 8), calibration,
                            selection.OperatingPoint(lam=None, tolerance=tolerance),
                            key=jax.random.PRNGKey(0))
  return fitted.deployed, fitted.param


def reach_fractions(deployed, traces) -> np.ndarray:
  """``[n]`` fraction of the requests of ``traces`` that consult each stage under ``deployed``."""
  from ttamer_jax.evaluation.metrics import replay_traces
  stop = np.asarray(replay_traces(deployed, traces).stop_stage)
  return (stop[:, None] >= np.arange(traces.num_stages)[None, :]).mean(axis=0)


def refit_on_batch_costs(calibration, cost_model, tolerance, iterations=6):
  """The recall policy fitted on the per-request costs ``cost_model`` implies at the
  policy's own reach: start from every request reaching every stage, refit until the
  reach (rounded to 1%) repeats. Returns ``(deployed, lam, reach, iterations run)``."""
  from ttamer_jax.networks import serving_costs
  reach, seen = np.ones(calibration.num_stages), set()
  for it in range(1, iterations + 1):
    costs = serving_costs.cost_shares(cost_model.per_request_costs(reach))
    deployed, lam = recall_at_demo_lam(calibration.replace(costs=costs), tolerance)
    reach = reach_fractions(deployed, calibration)
    key = tuple(np.round(reach, 2))
    if key in seen:
      break
    seen.add(key)
  return deployed, lam, reach, it


def every_stage(deployed, num_stages):
  """A policy with the same discretiser that runs every stage (the overhead probe)."""
  import ttamer_jax as tj
  return deployed.replace(policy=tj.core.FixedExitPolicy(exit_stage=num_stages - 1, num_stages=num_stages),
                          answers=None)


def cost_share(served, costs) -> float:
  """Mean share of the full cost run, by the per-stage costs the policy was fitted on."""
  costs = np.asarray(costs, np.float64)
  return float((served.consulted @ costs).mean() / costs.sum())


def padded_share(served, costs, server) -> float:
  """Share of the full cost in rows actually computed, padding included.

  The batch program (the package's ``Server``): per group, stage ``i`` computes its
  continuing requests in full chunks of the largest bucket plus the remainder padded
  to its bucket;
  otherwise per chunk of the largest bucket, stage ``i`` computes its continuing
  requests padded to their bucket. The full network (``Server.full_network``)
  computes each chunk padded to its bucket at every stage. What serving can
  deliver at best with these buckets (the gap to ``share`` is the padding)."""
  from ttamer_jax.networks import serving
  costs = np.asarray(costs, np.float64)
  buckets = server.buckets
  cap, num = buckets[-1], served.consulted.shape[0]

  def rows(count):
    full, rest = divmod(int(count), cap)
    return full * cap + (serving.bucket_of(buckets, rest) if rest else 0)

  run = full = 0.0
  for start in range(0, num, cap):
    full += serving.bucket_of(buckets, min(cap, num - start)) * costs.sum()
  group = cap * (server.group_chunks if server.program == "batch" else 1)
  for start in range(0, num, group):
    counts = served.consulted[start:start + group].sum(axis=0)
    run += np.array([rows(c) for c in counts]) @ costs
  return float(run / full)


def time_policies(model, policies, x, y, *, buckets, repeats):
  """Interleaved medians (ms) of the full network and of serving with each policy.

  ``policies`` maps a label to ``(deployed, program)``. The full network is timed
  two ways: ``full_one_call`` (one jitted call on the whole batch) and
  ``full_chunked`` (``Server.full_network``: the server's chunks and buckets,
  dispatched asynchronously); ``full`` is the faster of the two (the stricter
  reference)."""
  import jax.numpy as jnp
  from flax import nnx
  from serving_programs import make_server

  from ttamer_jax.networks import serving_costs
  from ttamer_jax.networks.nn import StaticGraph

  kw = {} if buckets is None else dict(buckets=buckets)
  servers = {k: make_server(model, d, program=prog, **kw) for k, (d, prog) in policies.items()}
  ref = next(iter(servers.values()))
  graph, state = StaticGraph(nnx.graphdef(model)), nnx.state(model)
  x_dev = jnp.asarray(x)
  full_pred = np.asarray(serving_costs._last_exit(graph, state, x_dev))
  ref.full_network(x)
  t0 = time.perf_counter()
  results = {k: s(x) for k, s in servers.items()}  # compiles what this batch needs
  compile_s = time.perf_counter() - t0
  for s in servers.values():
    s(x)
  calls = {"full_one_call": lambda: jax.block_until_ready(serving_costs._last_exit(graph, state, x_dev)),
           "full_chunked": lambda: ref.full_network(x)}
  calls.update({k: (lambda s=s: s(x)) for k, s in servers.items()})
  times = {k: [] for k in calls}
  for _ in range(repeats):  # Interleaved, so that machine load affects all alike.
    for k, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[k].append(time.perf_counter() - t0)
  ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  iqr = {k: 1e3 * float(np.subtract(*np.percentile(v, [75, 25]))) for k, v in times.items()}
  full_key = min(("full_one_call", "full_chunked"), key=ms.get)
  ms["full"], iqr["full"] = ms[full_key], iqr[full_key]
  acc = {k: float((r.predictions == y).mean()) for k, r in results.items()}
  acc["full"] = float((full_pred == y).mean())
  return ms, iqr, results, acc, compile_s, servers


def run_workload(name, args):
  import ttamer_jax as tj
  from ttamer_jax.app import demo

  t0 = time.perf_counter()
  prep = demo.prepare(name, seed=args.seed, cache_dir=args.cache_dir, quick=args.quick,
                      progress=sys.stderr.isatty())
  model, n = prep.model, prep.model.num_stages
  x, y = prep.test_inputs
  if args.batch:
    idx = np.resize(np.arange(len(x)), args.batch)  # tiles when the split is smaller
    x, y = x[idx], y[idx]
  costs = np.asarray(prep.calibration.costs, np.float64)
  sel = tj.fit_policy(prep.calibration, tolerance=args.tolerance,
                      key=jax.random.PRNGKey(args.seed))
  recall, lam = recall_at_demo_lam(prep.calibration, args.tolerance)
  base = {"recall": recall, "all_stages": every_stage(recall, n)}
  selected_note = None
  from ttamer_jax.networks import serving, serving_costs
  try:
    serving.check_deployed(model, sel.deployed)
    base["selected"] = sel.deployed
  except ValueError as e:
    selected_note = f"not servable: {e}"
  served_costs = None
  kw = {} if args.buckets is None else dict(buckets=args.buckets)
  if args.served_costs:  # per-stage costs as serving runs them, overhead included
    served_costs = serving_costs.served_stage_costs(model, recall, x, repeats=args.repeats, **kw)
    refit, _ = recall_at_demo_lam(
        prep.calibration.replace(costs=serving_costs.cost_shares(served_costs)), args.tolerance)
    base["recall_on_served_costs"] = refit
  cost_model = batch_refit = None
  if args.batch_costs:
    cost_model = serving_costs.served_cost_model(model, recall, x, repeats=args.repeats, **kw)
    refit, refit_lam, refit_reach, refit_iters = refit_on_batch_costs(
        prep.calibration, cost_model, args.tolerance)
    base["recall_on_batch_costs"] = refit
    batch_refit = dict(lam=refit_lam, calibration_reach=refit_reach.tolist(),
                       iterations=refit_iters)
  policies = {}
  for prog in args.programs:
    for k, d in base.items():
      if prog == args.programs[0] or k != "selected":
        policies[k if prog == args.programs[0] else f"{k} [{prog}]"] = (d, prog)
  ms, iqr, results, acc, compile_s, servers = time_policies(
      model, policies, x, y, buckets=args.buckets, repeats=args.repeats)
  full = ms["full"]
  rows = {}
  for k in policies:
    share = cost_share(results[k], costs)
    predicted = share * full
    saving_pred = full - predicted
    rows[k] = dict(served_ms=ms[k], served_iqr_ms=iqr[k], share=share, predicted_ms=predicted,
                   padded_share=padded_share(results[k], costs, servers[k]),
                   mean_stages=float(results[k].num_consulted.mean()), accuracy=acc[k],
                   saving_ratio=(full - ms[k]) / saving_pred if saving_pred > 1e-9 else None)
    if served_costs is not None:
      sshare = cost_share(results[k], served_costs)
      spred = full - sshare * full
      # Modelled serving time in ms: each request's consulted stages at their
      # served cost (absolute; includes the exit heads and decisions the full network
      # does not run, so every-stage serving is modelled slower than the full network).
      modelled = 1e3 * float((results[k].consulted @ served_costs).sum())
      rows[k].update(served_cost_share=sshare, saving_ratio_served_costs=(
          (full - ms[k]) / spred if spred > 1e-9 else None), modelled_served_ms=modelled,
          served_over_modelled=ms[k] / modelled)
    if cost_model is not None:
      # The serving time the per-batch + per-request model prices at this policy's reach
      # on the served batch (modelled), next to the measured one.
      reach = results[k].consulted.mean(axis=0)
      modelled_b = 1e3 * cost_model.seconds(reach)
      rows[k].update(batch_modelled_ms=modelled_b, served_over_batch_modelled=ms[k] / modelled_b,
                     saving_ratio_batch_model=(full - ms[k]) / (full - modelled_b)
                     if full - modelled_b > 1e-9 else None)
  overhead = {prog: (ms["all_stages" if prog == args.programs[0] else f"all_stages [{prog}]"] - full) / n
              for prog in args.programs}
  out = dict(workload=prep.name, batch=int(len(x)), num_stages=n, full_ms=full,
             full_iqr_ms=iqr["full"], full_one_call_ms=ms["full_one_call"],
             full_chunked_ms=ms["full_chunked"], full_accuracy=acc["full"],
             stage_cost_share=costs.tolist(), per_stage_overhead_ms=overhead,
             served_stage_ms_per_1000=None if served_costs is None else (
                 1e6 * served_costs).tolist(),
             per_batch_ms=None if cost_model is None else (1e3 * cost_model.per_batch).tolist(),
             per_request_us=None if cost_model is None else (
                 1e6 * cost_model.per_request).tolist(),
             batch_cost_refit=batch_refit,
             first_calls_seconds=compile_s, recall_lam=lam, selected=sel.chosen.name,
             selected_note=selected_note, policies=rows, seconds=time.perf_counter() - t0)
  return out


def format_table(results) -> str:
  head = ("| workload | batch | policy | full ms | served ms | share of cost | predicted ms | "
          "actual / predicted saving | share with padding | accuracy (full) |")
  lines = [head, "|" + "---|" * 10]
  for r in results:
    for k, p in r["policies"].items():
      ratio = "n/a" if p["saving_ratio"] is None else f"{p['saving_ratio']:.2f}"
      if p.get("saving_ratio_served_costs") is not None:
        ratio += f" (served costs: {p['served_cost_share']:.3f}, {p['saving_ratio_served_costs']:.2f})"
      if p.get("modelled_served_ms") is not None:
        ratio += f" [modelled {p['modelled_served_ms']:.1f} ms, measured/modelled {p['served_over_modelled']:.2f}]"
      if p.get("batch_modelled_ms") is not None:
        sr = p["saving_ratio_batch_model"]
        ratio += (f" {{batch model {p['batch_modelled_ms']:.1f} ms, measured/modelled "
                  f"{p['served_over_batch_modelled']:.2f}, saving ratio "
                  f"{'n/a' if sr is None else f'{sr:.2f}'}}}")
      lines.append(f"| {r['workload']} | {r['batch']} | {k} | {r['full_ms']:.1f} | "
                   f"{p['served_ms']:.1f} | {p['share']:.3f} | {p['predicted_ms']:.1f} | {ratio} | "
                   f"{p['padded_share']:.3f} | {100 * p['accuracy']:.1f}% "
                   f"({100 * r['full_accuracy']:.1f}%) |")
  return "\n".join(lines)


def main(argv=None):
  args = _parse(argv)
  if args.quick and args.repeats == 9:
    args.repeats = 3
  results = []
  for name in args.workloads:
    print(f"[{name}] ...", flush=True)
    r = run_workload(name, args)
    results.append(r)
    print(format_table([r]), flush=True)
    ovh = ", ".join(f"{k} {v:.2f}" for k, v in r["per_stage_overhead_ms"].items())
    note = f" ({r['selected_note']})" if r["selected_note"] else ""
    print(f"  full: one call {r['full_one_call_ms']:.1f} ms, chunked {r['full_chunked_ms']:.1f} ms; "
          f"per-stage overhead ms ((all stages - full) / n): {ovh}; first calls "
          f"{r['first_calls_seconds']:.1f} s; selected: {r['selected']}{note}; "
          f"recall lam {r['recall_lam']:.4f}", flush=True)
    if r["per_batch_ms"] is not None:
      print(f"  per stage: per-batch ms {np.round(r['per_batch_ms'], 2).tolist()}, per-request us "
            f"{np.round(r['per_request_us'], 1).tolist()}; batch-cost refit {r['batch_cost_refit']}",
            flush=True)
  load = os.getloadavg()
  meta = dict(command="python benchmarks/serving_overhead.py " + " ".join(
      argv if argv is not None else sys.argv[1:]), machine=platform.platform(),
      cpus=os.cpu_count(), backend=jax.default_backend(), loadavg=list(load), jax=jax.__version__)
  print("\n" + format_table(results))
  print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; "
        f"backend {jax.default_backend()}")
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
