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
import re
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
    "mc.replay_equals_dp": ("solvers", "random cascades: Monte-Carlo replay of the recall and no-recall optima", "estimates", "|MC mean - DP value| <= 4 standard errors"),
    # ----------------------------------------------------------- traces / fitting
    "traces.valid_fit": ("traces & fitting", "random valid traces (N 1..200, n 1..4, ties, constant scores, 0/1 and real losses) fitted with K 1..6, both binnings, both priors, agree_prev", "fits", "rows sum to 1; values within [min, max] loss; counts sum to N; policy replays with states in range"),
    "traces.invalid": ("traces & fitting", "ExitTraces fields with NaN/inf, negative losses/costs, wrong shapes, empty N or n, non-integer or > int32 predictions/labels, float32 overflow", "ValueError", "message names the field"),
    "fit.invalid": ("traces & fitting", "fit_cascade / fit_skip_line / fit_discretiser / split / sample_traces with bad K, smoothing, binning, prior, feature, score, discretiser, fractions", "ValueError", "message names the argument"),
    "table.invalid": ("traces & fitting", "CSV tables with missing/duplicate rows, huge stage numbers, NaN cells, non-numeric columns, garbage bytes", "ValueError", "message names the column / row"),
    "file.truncated": ("loaders", "traces / cascade / policy / checkpoint files cut at random lengths", "ValueError", "never a partially loaded object"),
    "file.bitflip": ("loaders", "one random bit flipped anywhere in a traces / cascade / policy file", "ValueError, or the identical object (flip in a zip timestamp)", "loaded object equals the original whenever no error is raised"),
    "file.fields": ("loaders", "archives with fields of the wrong dtype (str, complex, bool), shape, missing / extra / duplicated fields, other kinds, versions, hand-edited metadata JSON (deep nesting, wrong types)", "ValueError naming the field", "message names the path and the field"),
    # ----------------------------------------------------------- policies / replay / serving
    "replay.invalid": ("policies & replay", "replay / replay_cascade / monte_carlo / evaluate / policy_metrics / replay_graph with out-of-range or > int32 states, NaN losses, negative costs, mismatched stages or states, N = 0", "ValueError (was: JAX clamped the state silently)", "message names the field"),
    "policy_file.roundtrip": ("policies & replay", "random policies of every deployable kind saved and loaded", "round trip", "loaded policy replays identically; saving twice gives bit-identical files"),
    "drift.invalid": ("policies & replay", "drift tests / monitor with bad counts, states, alpha, window", "ValueError", "message names the argument"),
    "drift.window": ("policies & replay", "random update sequences of DriftMonitor", "counts", "window counts equal a recount of the last `window` observations"),
    "serve.invalid": ("policies & replay", "Server inputs with NaN, wrong shapes, empty batches; mismatched policies", "ValueError", "message names the field"),
    # ----------------------------------------------------------- CLI
    "cli.valid": ("CLI", "random valid argument combinations of fit / evaluate / solve / sweep", "exit 0", "JSON parses; written files load"),
    "cli.bad_args": ("CLI", "random bad arguments (lam specs, counts, fractions, missing or unknown options)", "exit 2", "one line on stderr; no output file"),
    "cli.bad_files": ("CLI", "truncated, bit-flipped, wrong-kind, empty, text, directory and missing input files", "exit 2 (or 0 if the flip left the content intact)", "one line on stderr; no output file on exit 2"),
    "cli.subprocess": ("CLI", "the real `python -m ttamer_jax` on bad input", "exit 2", "one line on stderr, no traceback"),
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
