"""The ``ttamer`` command line: the whole job, and each of its steps, from a terminal.

    ttamer demo                                   # a model cascade -> the answer, frontiers, plots, policy
    ttamer fit TRACES --lam 0.9 --out policy.npz  # TRACES: .npz, .csv or .parquet
    ttamer evaluate policy.npz TRACES
    ttamer sweep TRACES --lam 0:1:101 --plot frontier.png
    ttamer solve CASCADE.npz --lam 0.3
    ttamer bench

Every command takes ``--json`` (machine-readable result on stdout; progress and
messages go to stderr). Exit codes: 0 success; 2 bad arguments or a bad file (one
line on stderr, no traceback, no output file written); 1 ``ttamer bench`` checks
failed; 130 interrupted. The file formats are in ``docs/trace_format.md``,
``docs/policy_format.md`` and :mod:`ttamer_jax.data.cascade_io`; the commands in
``docs/cli.md``.

This module parses, and sets up the process (JAX's compilation cache, the Ctrl-C
handler): each command is one call into :mod:`.commands` (or :mod:`.demo`), which
does the work and checks the files, and one :func:`emit` of the result, as text
(:mod:`.reports`) or JSON. ``ttamer bench`` hands its arguments to the benchmark
harness of a source checkout (``benchmarks/bench.py``), which parses them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import signal
import sys
import textwrap
import threading
from typing import Callable

import jax
import numpy as np

from ttamer_jax.app import commands, demo, reports

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# Upper bounds on counts given on the command line: beyond them a typo (an extra
# zero or three) would run for hours or exhaust memory instead of failing fast.
MAX_LAM_VALUES = 100_000
MAX_RESAMPLES = 1_000_000
# Seeds become jax.random.PRNGKey(seed): larger ones overflow (or, above 2**32, alias
# smaller seeds' keys without x64).
MAX_SEED = 2**32 - 1
# Where `ttamer bench` finds the benchmark harness, relative to the folder holding the
# package: a source checkout has it, an installed package does not.
BENCH_HARNESS = os.path.join("benchmarks", "bench.py")


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr and exit code 2, no traceback."""

  def error(self, message):
    message = " ".join(message.split())  # an argument may hold a newline: still one line
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------ argument types
def lam_values(text: str) -> np.ndarray:
  """Parses a ``lam`` spec: ``0.3``, ``0.1,0.5,0.9`` or ``START:STOP:NUM`` (inclusive linspace)."""
  text = text.strip()
  try:
    if ":" in text:
      parts = text.split(":")
      if len(parts) != 3:
        raise ValueError
      start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
      if num < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: NUM must be >= 1")
      if num > MAX_LAM_VALUES:
        raise argparse.ArgumentTypeError(f"{text!r}: NUM must be <= {MAX_LAM_VALUES}")
      lams = np.linspace(start, stop, num)
    else:
      lams = np.asarray([float(x) for x in text.split(",")], np.float64)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a lam value, a comma-separated list or START:STOP:NUM") from None
  if lams.size > MAX_LAM_VALUES:
    raise argparse.ArgumentTypeError(f"{text[:40]!r}...: more than {MAX_LAM_VALUES} lam values")
  if lams.size == 0 or not np.all(np.isfinite(lams)) or lams.min() < 0 or lams.max() > 1:
    raise argparse.ArgumentTypeError(f"{text!r}: every lam must lie in [0, 1]")
  return lams


def single_lam(text: str) -> float:
  lams = lam_values(text)
  if lams.size != 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected one lam value")
  return float(lams[0])


def lam_or_auto(text: str) -> float | None:
  """``--lam`` of ``ttamer fit``: one lam value, or ``auto`` (``None``: least cost within
  ``--tolerance``)."""
  return None if text.strip() == "auto" else single_lam(text)


def _number(text: str, kind=float):
  try:
    return kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
  value = _number(text, int)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
  return value


def resample_count(text: str) -> int:
  value = positive_int(text)
  if value > MAX_RESAMPLES:
    raise argparse.ArgumentTypeError(f"{text!r} must be <= {MAX_RESAMPLES}")
  return value


def seed_value(text: str) -> int:
  value = _number(text, int)
  if not 0 <= value <= MAX_SEED:
    raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, {MAX_SEED}]")
  return value


def seconds_value(text: str) -> float:
  value = _number(text)
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
  return value


def fraction(text: str) -> float:
  value = _number(text)
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 1)")
  return value


# ------------------------------------------------------------------ commands
def emit(args, run: reports.Run, text: Callable | None = None) -> int:
  """The one way a command prints its result: the JSON document with ``--json``,
  else ``text(result, notes)``."""
  print(reports.dumps(run.result) if args.json else text(run.result, run.notes))
  return 0


def _progress(args) -> bool:
  """Progress on stderr: a tqdm bar on a terminal, else a plain line every few seconds."""
  return not args.no_progress


def _say(text: str) -> None:
  """Status lines: stderr, so that stdout stays clean for ``--json``."""
  print(text, file=sys.stderr, flush=True)


def compilation_cache(args) -> str | None:
  """Turns on JAX's persistent compilation cache in ``<--cache-dir>/xla`` (default
  :func:`~ttamer_jax.app.demo.default_cache_dir`; ``''``: off), so that a second run of
  a command loads its compiled programs instead of compiling them again. A cache the
  user set up (``$JAX_COMPILATION_CACHE_DIR``) wins. Returns the folder in use, or
  ``None``."""
  cache = demo.default_cache_dir() if args.cache_dir is None else args.cache_dir
  return enable_compilation_cache(cache)


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Keeps XLA's compiled programs in ``<cache_dir>/xla`` (JAX's persistent compilation
  cache), so that a second ``ttamer demo`` loads what the first one compiled instead of
  compiling it again (most of a cached demo's time without it). A cache the user set up
  (``$JAX_COMPILATION_CACHE_DIR``) is left as it is. Returns the folder in use, or
  ``None`` when ``cache_dir`` is empty (caching off) and none is set.

  JAX reads this setting when it compiles its first program; call it before.
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not cache_dir:
    return current or None
  path = os.path.join(cache_dir, "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the many small ones too
  return path


def _demo(args) -> int:
  run = demo.run_demo(args.out, workload=args.workload, quick=args.quick, states=args.states,
                      tolerance=args.tolerance, seed=args.seed, cache_dir=args.cache_dir,
                      plots=not args.no_plots, progress=_progress(args), costs=args.costs,
                      log=None if args.json else _say)
  return emit(args, run, reports.demo_text)


def _fit(args) -> int:
  run = commands.fit(args.traces, args.out, states=args.states, lam=args.lam,
                     tolerance=args.tolerance, score=args.score, feature=args.feature,
                     binning=args.binning, cascade_out=args.cascade_out,
                     candidates=args.candidates, folds=args.folds, seed=args.seed,
                     progress=_progress(args))
  return emit(args, run, reports.fit_text)


def _evaluate(args) -> int:
  run = commands.evaluate(args.policy, args.traces, lam=args.lam, resamples=args.resamples,
                          level=args.level, seed=args.seed, log=_say)
  return emit(args, run, reports.evaluate_text)


def _sweep(args) -> int:
  run = commands.sweep(args.traces, calibration_path=args.calibration, split=args.split,
                       seed=args.seed, lams=args.lam, states=args.states, score=args.score,
                       confidence_score=args.confidence_score, feature=args.feature,
                       tolerance=args.tolerance, plot=args.plot, progress=_progress(args))
  return emit(args, run, reports.sweep_text)


def _solve(args) -> int:
  return emit(args, commands.solve(args.cascade, lams=args.lam, plot=args.plot),
                                   reports.solve_text)


def bench_harness() -> str | None:
  """The path of ``benchmarks/bench.py`` beside this package's folder (a source
  checkout), or ``None`` (an installed package: the harness is not installed)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(root, BENCH_HARNESS)
  return path if os.path.isfile(path) else None


def bench(argv: list[str]) -> int:
  """``ttamer bench ARGS``: the benchmark harness of a source checkout, run with ``ARGS``.

  The harness parses its own flags (``python benchmarks/bench.py --help``); from this
  command it defaults to the ``--quick`` sizes and ``ttamer_bench.json``.

  Args:
    argv: the arguments after ``bench``.

  Returns:
    The harness's exit code; 2 (after one line on stderr) when this package was
    installed without the repository's ``benchmarks/`` folder.
  """
  path = bench_harness()
  if path is None:
    print(f"ttamer bench: the benchmark harness is {BENCH_HARNESS} in the source repository "
          "(it is not installed); run it from a checkout: python benchmarks/bench.py --quick",
          file=sys.stderr)
    return EXIT_USAGE
  spec = importlib.util.spec_from_file_location("ttamer_benchmarks_bench", path)
  harness = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(harness)
  return harness.main(argv, entry="ttamer", prog="ttamer bench", parser_class=_Parser)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _demo, "fit": _fit, "evaluate": _evaluate, "sweep": _sweep, "solve": _solve}


# ------------------------------------------------------------------ parser
_EPILOG = """\
Exit codes: 0 success, 2 bad arguments or a bad file (one line on stderr, nothing
written), 1 `ttamer bench` checks failed. --json prints a machine-readable result
on stdout. File formats: docs/trace_format.md, docs/policy_format.md, docs/cli.md."""

TRACES_HELP = "exit traces: .npz, .csv or .parquet (docs/trace_format.md)"
# Options several commands take: one definition each (type, default, choices), shared
# through parent parsers; each command words its own help.
SHARED = {
    "--json": dict(action="store_true", help="print a machine-readable JSON result"),
    "--no-progress": dict(action="store_true"),
    "--seed": dict(type=seed_value, default=0),
    "--states": dict(type=positive_int, default=8),  # fit: None (see --candidates auto)
    "--tolerance": dict(type=fraction, default=0.01),
    "--score": dict(default=None, metavar="NAME"),
    "--feature": dict(default=None, choices=("agree_prev", "agree_best")),
    "--cache-dir": dict(default=None, metavar="DIR"),
}
CACHE_HELP = ("JAX's persistent compilation cache goes to DIR/xla (default $TTAMER_CACHE, "
              "$XDG_CACHE_HOME/ttamer_jax or ~/.cache/ttamer_jax; '' disables; "
              "$JAX_COMPILATION_CACHE_DIR, if set, wins)")


def _shared(**options) -> argparse.ArgumentParser:
  """A parent parser with ``--json`` and the shared options ``name=help`` (or
  ``name=dict(help=..., metavar=...)``); ``no_progress`` names ``--no-progress``."""
  parent = argparse.ArgumentParser(add_help=False)
  parent.add_argument("--json", **SHARED["--json"])
  options.setdefault("cache_dir", CACHE_HELP)
  for name, extra in options.items():
    flag = "--" + name.replace("_", "-")
    parent.add_argument(flag, **{**SHARED[flag], **(extra if isinstance(extra, dict)
                                                     else {"help": extra})})
  return parent


def build_parser() -> argparse.ArgumentParser:
  from ttamer_jax._version import __version__

  fmt = argparse.RawDescriptionHelpFormatter
  parser = _Parser(prog="ttamer", formatter_class=fmt, epilog=_EPILOG, description=(
      "Optimal exit and routing policies for cascaded and early-exit ML serving.\n\n"
      "Start with `ttamer demo`: it trains a small early-exit network, fits the optimal\n"
      "policy and compares it with the usual heuristics. Each command has --help."))
  parser.add_argument("--version", action="version", version=f"ttamer_jax {__version__}")
  sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True,
                              metavar="COMMAND")

  def add(name, help, description, **shared):
    return sub.add_parser(name, help=help, description=description, formatter_class=fmt,
                          epilog=_EPILOG, parents=[_shared(**shared)])

  demo_cmd = add("demo", "the whole job on a built-in workload: train, fit, compare, plot, save",
             "Trains the workload's models (default: a cascade of five scikit-learn models on\n"
             "24,000 generated requests; --workload digits|sequences|mnist1d: an early-exit\n"
             "network, cached), records exit traces with measured per-stage latency, chooses\n"
             "the policy to deploy by cross-fitting on the calibration split and prints first\n"
             "the answer: the deployed policy against the best simple rule tuned on the same\n"
             "split, held out, paired, with intervals. Then every family's held-out table\n"
             "(recall and no-recall optima, confidence / per-stage / entropy thresholds,\n"
             "patience, fixed exit, the hindsight oracle). Writes to --out: pareto.png,\n"
             "index_heatmap.png, exit_histograms.png, policy.npz (the deployed policy) +\n"
             "policy.json, the traces, cascade.npz, report.md, results.json.\n\n"
             "  ttamer demo\n"
             "  ttamer demo --quick --out /tmp/demo\n\n"
             + textwrap.fill(f"Takes {demo.demo_timing_text()}. Progress goes to stderr: a "
                             "bar on a terminal, else one line every 5 s (step, ETA, loss); "
                             "--no-progress: none.", 80),
             states="score bins per exit of the fitted cascade (default 8)",
             tolerance="accuracy tolerance of the operating points (default 0.01 = 1 point)",
             seed="seed of the split and training (default 0)", no_progress="no progress output",
             cache_dir="cache of the trained network, and of compiled programs in DIR/xla "
                       "(default $TTAMER_CACHE or ~/.cache/ttamer_jax; '' disables)")
  demo_cmd.add_argument("--out", default="ttamer_demo_out", help="output folder (default ./ttamer_demo_out)")
  demo_cmd.add_argument("--quick", action="store_true",
                    help="a smoke run: a third of the requests (sklearn; synthetic: a tenth), or "
                         "a tenth of the training steps and two serving bucket sizes (networks: "
                         "a worse network)")
  demo_cmd.add_argument("--workload", default=demo.DEFAULT_WORKLOAD, choices=tuple(demo.WORKLOADS),
                    help=f"built-in workload (default {demo.DEFAULT_WORKLOAD}: a cascade of five "
                         "scikit-learn models; digits, sequences, mnist1d: early-exit networks; "
                         "synthetic: sampled traces)")
  demo_cmd.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
  demo_cmd.add_argument("--costs", default="measured", choices=demo.COST_OPTIONS,
                    help="per-stage costs the policies are fitted on: measured (default; each "
                         "stage timed alone) or served (each stage as the serving path runs it, "
                         "its per-stage overhead included; network workloads only)")

  fit = add("fit", "choose a policy for exit traces by cross-fitting, and save it",
            "Fits every candidate (T-Tamer optima over several state designs, the simple\n"
            "rules) on K-1 folds of the traces, replays it on the last, saves the best by\n"
            "replay refitted on all the traces, and prints the runner-up and the model check\n"
            "(docs/cli.md).\n\n"
            "  ttamer fit calibration_traces.npz --out policy.npz\n"
            "  ttamer fit traces.npz --states 16 --feature agree_prev --lam 0.95 --out p.npz",
            states=dict(metavar="K", default=None, help="states per stage of the recall "
                        "candidate (default 8; with agree_prev, K/2 bins x agree); implies "
                        "--candidates recall"),
            tolerance="accuracy tolerance of --lam auto (default 0.01)",
            score="signal the candidates read (default max_softmax if recorded, else the "
                  "primary scores; 'scores' names the primary scores)",
            feature="cross the recall candidate's bins with agreement with the previous exit "
                    "(agree_prev) or the most confident earlier one (agree_best); implies "
                    "--candidates recall",
            seed="seed of the folds and the bootstrap (default 0)",
            no_progress="no progress output")
  fit.add_argument("traces", metavar="TRACES", help=TRACES_HELP)
  fit.add_argument("--out", required=True, metavar="POLICY.npz", help="policy file to write")
  fit.add_argument("--lam", type=lam_or_auto, default="auto",
                   help="trade-off weight in [0, 1] of error vs cost share, or 'auto' (default): "
                        "the least cross-fitted cost whose cross-fitted error is within "
                        "--tolerance of the last exit's")
  fit.add_argument("--candidates", default="auto", choices=commands.CANDIDATE_SETS,
                   help="all: T-Tamer designs and simple rules; ttamer: T-Tamer only; recall: "
                        "only the recall optimum of --states/--score/--feature/--binning; auto "
                        "(default): recall when --states, --feature or --binning is given, else all")
  fit.add_argument("--folds", type=positive_int, default=5, help="cross-fitting folds (default 5)")
  fit.add_argument("--binning", default=None, choices=("quantile", "uniform"),
                   help="score bins of the recall candidate (default quantile); implies "
                        "--candidates recall")
  fit.add_argument("--cascade-out", default=None, metavar="CASCADE.npz",
                   help="also save the chosen model's fitted cascade (for `ttamer solve`)")

  ev = add("evaluate", "replay a policy file on held-out traces, with bootstrap CIs",
           "Replays the policy on every request of the traces with the true losses and\n"
           "costs: error, cost (share of running every stage), objective, exit histograms,\n"
           "each with a percentile-bootstrap confidence interval.\n\n"
           "  ttamer evaluate policy.npz test_traces.npz", seed="bootstrap seed (0)")
  ev.add_argument("policy", metavar="POLICY.npz", help="policy file (ttamer fit / save_policy)")
  ev.add_argument("traces", metavar="TRACES", help="held-out " + TRACES_HELP)
  ev.add_argument("--lam", type=single_lam, default=None,
                  help="lam of the reported objective (default: the policy's)")
  ev.add_argument("--resamples", type=resample_count, default=1000, help="bootstrap resamples (1000)")
  ev.add_argument("--level", type=fraction, default=0.95, help="confidence level (0.95)")

  sw = add("sweep", "frontiers of the recall optimum vs every heuristic on traces",
           "Fits a cascade on calibration traces (--calibration, or a random split of\n"
           "TRACES), sweeps lam for the recall and no-recall optima, each heuristic over its\n"
           "own grid, and the hindsight oracle, and reports them on the held-out traces.\n\n"
           "  ttamer sweep traces.npz --lam 0:1:101 --plot frontier.png\n"
           "  ttamer sweep test.npz --calibration cal.npz --states 16",
           states=dict(metavar="K", help="states per stage (8)"),
           score="signal the fitted policies discretise", feature="see `ttamer fit`",
           tolerance="accuracy tolerance of the operating points (0.01)",
           seed="seed of the split (0)", no_progress="no progress output")
  sw.add_argument("traces", metavar="TRACES", help=TRACES_HELP + "; held out with --calibration")
  sw.add_argument("--lam", type=lam_values, default=None,
                  help="lam grid: START:STOP:NUM, a list a,b,c or one value (default: 41 even "
                       "values plus 16 in [0.98, 0.9999], the grid ttamer fit chooses on)")
  sw.add_argument("--calibration", default=None, metavar="CAL",
                  help="fit on these traces instead of a split of TRACES")
  sw.add_argument("--split", type=fraction, default=0.5,
                  help="share of TRACES used for fitting without --calibration (default 0.5)")
  sw.add_argument("--confidence-score", default=None, metavar="NAME",
                  help="signal of the confidence heuristics (higher = more confident)")
  sw.add_argument("--plot", default=None, metavar="OUT.png",
                  help="write the Pareto plot here (.png, .pdf, .svg, ...)")

  so = add("solve", "exact recall / no-recall / hindsight values and the index table of a cascade",
           "Solves a cascade file (values/init/trans/costs; written by `ttamer demo`,\n"
           "`ttamer fit --cascade-out` or ttamer_jax.save_cascade) exactly.\n\n"
           "  ttamer solve cascade.npz --lam 0.3\n"
           "  ttamer solve cascade.npz --lam 0:1:21 --json")
  so.add_argument("cascade", metavar="CASCADE.npz", help="cascade file")
  so.add_argument("--lam", type=lam_values, default=None,
                  help="one value, a list a,b,c or START:STOP:NUM (default 0:1:11)")
  so.add_argument("--plot", default=None, metavar="OUT.png",
                  help="heatmap of the index table (one --lam value)")

  sub.add_parser("bench", add_help=False, help="speed and memory benchmarks of the solvers "
                 "(a source checkout's benchmarks/bench.py; its flags: ttamer bench --help)")
  return parser


# Seconds after which the ttamer program's SIGINT handler sends the signal again, in case
# its KeyboardInterrupt was swallowed (see _interrupt).
INTERRUPT_RETRY_S = 0.5
# Set by the first Ctrl-C: whatever exception then reaches main() (a clean-up that failed
# while the KeyboardInterrupt unwound replaces it) ends the run as interrupted.
_INTERRUPTED = threading.Event()


def _interrupt(signum, frame) -> None:
  """The ``ttamer`` program's SIGINT handler: ``KeyboardInterrupt``, as Python's own.

  Python prints and *ignores* an exception raised in a garbage-collector callback, a
  ``__del__`` or a weakref finaliser -- and JAX runs one on every collection -- so a
  Ctrl-C landing there was lost and the command ran on to exit 0. The handler therefore
  also sends the signal again a moment later; the first ``KeyboardInterrupt`` that
  reaches :func:`main` ends the process (``os._exit``) before it could arrive.
  """
  _INTERRUPTED.set()
  retry = threading.Timer(INTERRUPT_RETRY_S, os.kill, (os.getpid(), signum))
  retry.daemon = True
  retry.start()
  raise KeyboardInterrupt


def _unraisable(info) -> None:
  """Python's report of an exception it had to ignore, less the swallowed
  ``KeyboardInterrupt`` s that :func:`_interrupt` sends again (no traceback for them)."""
  if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
    return
  sys.__unraisablehook__(info)


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}"
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.split())


def main(argv=None) -> int:
  """Runs ``ttamer`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
  words = sys.argv[1:] if argv is None else list(argv)
  if words[:1] == ["bench"]:  # the harness parses its own flags
    return _run_bench(words[1:], own_process=argv is None)
  args = build_parser().parse_args(argv)
  args.own_process = argv is None  # run as the `ttamer` program, not called from Python
  try:
    if args.own_process:
      # JAX's compilation cache is process-wide: only a process of our own turns it on
      # (before its first compilation), never a caller of ttamer_jax.app.cli.main(argv).
      compilation_cache(args)
      if callable(signal.getsignal(signal.SIGINT)):  # Python's, or the import guard's
        signal.signal(signal.SIGINT, _interrupt)
        sys.unraisablehook = _unraisable
    code = COMMANDS[args.command](args)
    if args.own_process:
      # Done, result printed: a Ctrl-C now would only turn a finished run into a
      # traceback during the interpreter's teardown (or a process killed by SIGINT).
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code
  except BaseException as e:  # noqa: BLE001 -- sorted out below, the rest re-raised
    return _failed(args, e)


def _run_bench(argv: list[str], *, own_process: bool) -> int:
  """``ttamer bench``, with the program's Ctrl-C and error handling; the harness turns
  JAX's compilation cache on only when given ``--cache-dir`` (it times compilation)."""
  args = argparse.Namespace(command="bench", own_process=own_process)
  try:
    if own_process and callable(signal.getsignal(signal.SIGINT)):
      signal.signal(signal.SIGINT, _interrupt)
      sys.unraisablehook = _unraisable
    return bench(argv)
  except BaseException as e:  # noqa: BLE001 -- sorted out by _failed, the rest re-raised
    return _failed(args, e)


def _failed(args: argparse.Namespace, e: BaseException) -> int:
  """The exit code for the exception ``e`` that ended a command, after its one-line report.

  In the ``ttamer`` program an interrupted run never reaches the interpreter's normal
  teardown, whose race with XLA's threads can crash it (SIGABRT, SIGSEGV): once a
  Ctrl-C came, whatever exception arrives here -- the ``KeyboardInterrupt``, or an error
  a clean-up raised while it unwound -- ends the process with exit code 130.
  """
  if args.own_process:  # a second Ctrl-C (or _interrupt's retry) must not cut this short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  if isinstance(e, KeyboardInterrupt) or (args.own_process and _INTERRUPTED.is_set()):
    print(f"ttamer {args.command}: interrupted", file=sys.stderr)
    if args.own_process:
      _leave_now(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED
  if isinstance(e, BrokenPipeError):  # `ttamer ... | head`: stop quietly (Python docs' recipe)
    with contextlib.suppress(OSError):
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  if isinstance(e, (ValueError, OSError)):
    print(f"ttamer {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  raise e


def _leave_now(code: int) -> None:
  """Ends the process at once with ``code``, after flushing stdout and stderr. After an
  interrupt XLA's threads may still be compiling or running: the interpreter's normal
  teardown then races them and sometimes crashes (SIGSEGV, exit 139). The writers'
  clean-up (temporary files) has already run as the exception unwound."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)


if __name__ == "__main__":
  sys.exit(main())
