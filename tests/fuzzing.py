"""Case bookkeeping of the fuzz suite: RELIABILITY.md's table is printed from it.

Every fuzz test records each generated case under a *class* (a kind of input)
with its outcome: ``record("cascade.nan", "ValueError")``. With the environment
variable ``TTAMER_FUZZ_REPORT=PATH`` set, the counts are written to ``PATH`` as
JSON when the test process exits; ``python tests/fuzzing.py PATH`` prints them
as the Markdown table of RELIABILITY.md (classes, cases, what the library does,
the invariants checked). Nothing is written without the variable.

:func:`expect_error` is the one assertion of every bad-input case: the call
raises ``ValueError`` (never another exception, a NaN or a silent result) and
the message names the offending field.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys

# class -> Counter(outcome -> cases)
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

# class -> (area, input, what the library does, invariants checked). The keys are
# the classes the tests record; the table lists them in this order.
CLASSES = {
    # ----------------------------------------------------------- constructors
    "cascade.valid": ("constructors", "random valid cascades (n 1..4, K 1..4, costs 1e-8..1e8, ties, 1e-12 entries, lam in {0, 1, random})",
                      "solves", "no NaN; hindsight <= recall <= no-recall (float32 bound); index[-1] = +inf; index entries in {-inf} U lam*values; stop set = {x <= index} matches a float64 NumPy DP away from ties"),
    "cascade.nan_inf": ("constructors", "NaN / +-inf in values, init, trans or costs", "ValueError naming field and index", "message names the field"),
    "cascade.negative": ("constructors", "negative values, costs or probabilities", "ValueError", "message names the field"),
    "cascade.prob_gt_1": ("constructors", "probabilities > 1", "ValueError", "message names the field"),
    "cascade.row_sum": ("constructors", "rows of init/trans off by more than 1e-5 (up to 0.5)", "ValueError", "message names the field and the row"),
    "cascade.shape": ("constructors", "wrong ndim / shapes, n = 0, K = 0", "ValueError", "message names the field"),
    "cascade.dtype": ("constructors", "strings, objects, complex, None, ragged lists", "ValueError", "message names the field"),
    "cascade.overflow": ("constructors", "finite float64 entries that overflow float32 (1e39..1e308)", "ValueError (was: silently inf)", "message names the field"),
    "builders.bad_args": ("constructors", "iid/random/gap/demo cascades, skip_line, tree_graph with bad sizes, concentrations, alphas, types", "ValueError", "message names the argument"),
    "graph.invalid": ("constructors", "routing graphs: bad edges (cycles, duplicates, out of range, non-integer), bad arrays", "ValueError", "message names the field"),
    "aggregated.invalid": ("constructors", "AggregatedCascade with non-stochastic factors, NaN, wrong shapes", "ValueError", "message names the field"),
    "policy_ctor.invalid": ("constructors", "RecallPolicy / NoRecallPolicy / GraphPolicy / baselines / MixturePolicy / Discretiser with NaN, wrong shapes, dtypes, ranges", "ValueError", "message names the field"),
    "nn_ctor.invalid": ("constructors", "EarlyExitMLP / CNN / Transformer with zero, negative, fractional or non-sequence sizes", "ValueError", "message names the argument"),
    # ----------------------------------------------------------- solvers
    "lam.invalid": ("solvers", "lam = NaN, +-inf, < 0, > 1, strings, None, arrays, complex", "ValueError", "message names lam"),
    "solver.non_cascade": ("solvers", "solvers, sweeps, soft solvers on non-cascades or bad options", "ValueError", "message names the argument"),
    "numerics.extreme": ("solvers", "n = 1, K = 1, lam in {0, 1}, costs and losses over 1e-8..1e8, all losses equal, 1e-12 transitions, exact ties, K = 4096 (tests/test_extremes.py)", "solves", "closed forms / brute force in float64; float32 within 4 n eps32 (max loss + sum costs) of float64; ties stop; no NaN"),
    "mc.replay_equals_dp": ("solvers", "random cascades: Monte-Carlo replay of the recall and no-recall optima", "estimates", "|MC mean - DP value| <= 4 standard errors"),
    # ----------------------------------------------------------- traces / fitting
    "traces.valid_fit": ("traces & fitting", "random valid traces (N in {1, 7, 200}, n 1..4, ties, constant scores, 0/1 and real losses, per-stage or per-sample costs) fitted with K 1..6, both binnings, both priors, agree_prev, smoothing 0..1", "fits", "rows sum to 1 (line and skip-line fits); values within [min, max] loss; counts sum to N; policy replays with states in range, answered loss and cumulative cost matching the traces"),
    "traces.invalid": ("traces & fitting", "ExitTraces fields with NaN/inf, negative losses/costs, wrong shapes, empty N or n, non-integer or > int32 predictions/labels, float32 overflow, strings / complex / None / ragged lists, signals that are not a {name: array} mapping", "ValueError", "message names the field"),
    "fit.invalid": ("traces & fitting", "fit_cascade / fit_skip_line / fit_discretiser / split_traces / sample_traces / with_score with bad K, bins, smoothing, binning, prior, feature, score, score_range, skip-line costs, discretiser, traces, cascade, fractions", "ValueError", "message names the argument"),
    "table.invalid": ("traces & fitting", "CSV tables (long and wide) with missing/duplicate rows or columns, huge or negative stage numbers, NaN cells, non-numeric cells, garbage bytes", "ValueError", "message names the column / row"),
    "file.truncated": ("loaders", "traces / cascade / policy / checkpoint files cut at random lengths", "ValueError", "never a partially loaded object"),
    "file.bitflip": ("loaders", "one random bit flipped anywhere in a traces / cascade / policy / checkpoint file", "ValueError, or the identical object (flip in a zip timestamp)", "loaded object equals the original whenever no error is raised"),
    "file.fields": ("loaders", "traces / cascade / policy / checkpoint archives with fields of the wrong dtype (str, complex, bool), shape, missing / extra / duplicated fields, other kinds, versions, hand-edited metadata JSON (deep nesting, wrong types, missing keys, invalid JSON)", "ValueError naming the field", "message names the path and the field"),
    # ----------------------------------------------------------- policies / replay / serving
    "replay.invalid": ("policies & replay", "replay / replay_cascade / monte_carlo / evaluate / compare / policy_metrics / replay_graph / simulate_graph with out-of-range or > int32 states, NaN / inf / float32-overflowing losses, costs or scores, negative costs, non-integer or > int32 predictions, mismatched stages, states or shapes, N = 0, non-policies, bad PRNG keys, lam, level, num_paths (> int32) or num_resamples (> 1 GiB of means) (tests/test_fuzz_policies.py)", "ValueError (was: JAX clamped the state silently; NaN scores never stopped; huge num_resamples aborted the process)", "message names the field"),
    "policy_file.roundtrip": ("policies & replay", "random deployable policies (recall with +-inf index entries, no-recall, threshold with +-inf, patience, fixed exit, mixtures nested two deep), random discretisers (duplicate edges, agree_prev), unicode score names, random user metadata, fit date from the argument or $SOURCE_DATE_EPOCH", "round trip", "saving twice gives bit-identical .npz and .json files; metadata, tree structure and leaves equal; loaded policy replays identically (states, stops, answers, losses, costs)"),
    "drift.invalid": ("policies & replay", "two_sample_test / state_counts / holm / DriftMonitor / drift_test with negative, NaN, fractional or >= 2**53 counts, mismatched shapes, out-of-range states, bad alpha, test, min_expected, min_count, min_distance, p-values, stage, window (or one that would allocate > 1 GiB), unknown options, mismatched traces, non-bool consulted_only", "ValueError (was: fractional counts and invalid p-values accepted, huge windows / K raised MemoryError, unknown options TypeError)", "message names the argument"),
    "drift.window": ("policies & replay", "random update / observe / reset / check sequences of DriftMonitor (n 1..3, K 1..4, window 1..9, batches up to 3 windows, -1 entries)", "counts", "window counts equal a recount of the last `window` observations of each stage; check() reports those totals"),
    "serve.invalid": ("policies & replay", "Server / serve with NaN or inf inputs, wrong shapes or ranks, empty batches, non-numeric or ragged inputs; policies, discretisers or mixtures for other numbers of stages or states, non-servable scores, non-policies, the hindsight oracle, a non-network model, bad buckets", "ValueError (was: AttributeError for a non-network model or non-policy)", "message names the field"),
    # ----------------------------------------------------------- CLI
    "cli.valid": ("CLI", "random valid argument combinations of fit / evaluate / solve / sweep (lam values, lists and START:STOP:NUM ranges, K, --score, --feature, --binning, --calibration or --split, --seed, --plot, --json) on random traces (N 200, n 1..3, ties, constant scores, zero losses, zero or per-request costs, with or without signals) and cascades (tests/test_fuzz_cli.py)", "exit 0 (was: `sweep` on traces without signals exited 2)", "JSON parses; written policy / cascade / plot files load and nothing else is written; evaluate and solve results equal the library's; the policy is the recall optimum of the saved cascade"),
    "cli.bad_args": ("CLI", "random bad arguments: lam specs, counts, fractions, seeds, choices, random text (newlines included), unknown options, missing values or positionals, extra positionals, unwritable or missing output folders", "exit 2 (was: --seed beyond int64 raised OverflowError; a newline in an argument split the message)", "one line on stderr, no traceback, nothing on stdout; no output file, not even a temporary one"),
    "cli.bad_files": ("CLI", "truncated, bit-flipped, wrong-kind (other file kinds, policy JSON sidecar, other stage count), empty, text, random-byte, foreign .npz / .npy, directory, missing and dangling-link files in every input argument", "exit 2 (or 0 if the flip left the content intact)", "one line on stderr, nothing on stdout; no output file (no temporary file) on exit 2; on exit 0 the unbroken file's result and files"),
    "cli.subprocess": ("CLI", "the real `python -m ttamer_jax` on a bad lam spec, a truncated traces file and a directory given as a cascade", "exit 2", "one line on stderr, no traceback, nothing on stdout, no output file"),
    # ----------------------------------------------------------- reproducibility
    "repro.bit_identical": ("reproducibility", "seeded traces, fits, solves, sweeps, Monte-Carlo, trained networks, FLOPs-cost profiles, trace/cascade/policy/checkpoint files and CLI reports, each produced twice (tests/test_reproducibility.py)", "identical", "byte-for-byte equality of arrays, files (SHA-256) and JSON reports"),
}


def record(cls: str, outcome: str = "ok") -> None:
  """Counts one case of ``cls`` (a key of :data:`CLASSES`) with its ``outcome``."""
  if cls not in CLASSES:
    raise KeyError(f"unknown fuzz class {cls!r}")
  COUNTS[cls][outcome] += 1


def expect_error(cls: str, fn, *names: str, exc=ValueError):
  """Runs ``fn()``; it must raise ``exc`` whose message mentions one of ``names``."""
  try:
    fn()
  except exc as e:
    msg = str(e)
    if names and not any(n.lower() in msg.lower() for n in names):
      raise AssertionError(f"{cls}: message {msg!r} names none of {names}") from None
    record(cls, exc.__name__)
    return msg
  raise AssertionError(f"{cls}: no {exc.__name__} raised (expected one naming {names})")


def _dump():
  path = os.environ.get("TTAMER_FUZZ_REPORT")
  if not path or not COUNTS:
    return
  old = {}
  if os.path.exists(path):  # several pytest processes may add to one report
    with open(path) as f:
      old = json.load(f)
  for cls, outcomes in COUNTS.items():
    merged = collections.Counter(old.get(cls, {}))
    merged.update(outcomes)
    old[cls] = dict(merged)
  with open(path, "w") as f:
    json.dump(old, f, indent=1, sort_keys=True)


atexit.register(_dump)


def table(counts: dict) -> str:
  """The Markdown table of RELIABILITY.md from a counts JSON."""
  rows = ["| area | bad (or random valid) input class | cases | outcomes | what the library does | invariants checked |",
          "|---|---|---:|---|---|---|"]
  total = 0
  for cls, (area, what, does, checks) in CLASSES.items():
    outcomes = counts.get(cls, {})
    n = sum(outcomes.values())
    total += n
    out = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    rows.append(f"| {area} | {what} (`{cls}`) | {n} | {out or '-'} | {does} | {checks} |")
  rows.append(f"| | **total** | **{total}** | | | |")
  return "\n".join(rows)


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    print(table(json.load(f)))
