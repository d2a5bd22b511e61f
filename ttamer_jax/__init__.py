"""ttamer_jax: provably optimal exit-and-routing policies for cascaded and early-exit serving.

The package is layered (docs/DESIGN.md, "Layers"); imports point down only:

  core        pure numerics: the model, the one recall kernel, line / factored /
              graph solvers, policies and their protocol, replay, Monte-Carlo,
              sharded sweeps, the differentiable relaxation
  data        traces, file formats, tables, discretisers, fitting, synthetic data
  evaluation  held-out metrics, exact metrics on a model, frontiers, SLO, drift
  networks    Flax nnx early-exit networks: training, profiling, serving, workloads
  app         the demo and its workloads, comparisons, the commands, reports, plots, the CLI

``import ttamer_jax`` loads the first three (jax, numpy and chex only); the names
of ``networks`` (flax, optax) are loaded on first use, and plots and tables
import matplotlib / pandas when drawn or read.

The supported surface: ``ttamer_jax.__all__`` (the names the README, docs and
notebooks use) and each layer's ``__all__`` (``ttamer_jax.core.holm`` does not
exist; ``ttamer_jax.evaluation.holm``, ``ttamer_jax.core.LinePolicy``,
``ttamer_jax.networks.EarlyExitMLP`` do). ``ttamer_jax.core``, ``.data`` and
``.evaluation`` are loaded with the package; ``.networks`` and ``.app`` on first
access. Everything else -- names with a leading underscore and module-level
names in no ``__all__`` (e.g. ``core.replay.replay_compiled``) -- is internal and
may change without notice.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any


def _guard_program_import() -> None:
  """Launched as the ``ttamer`` program (its console script, or ``python -m
  ttamer_jax``), Ctrl-C while Python imports JAX -- before any ttamer code runs, and
  where JAX's garbage-collector callback would swallow the ``KeyboardInterrupt`` and
  let the command run on -- ends the process at once with exit code 130. Nothing has
  been read or written yet. ``ttamer_jax.app.cli.main`` replaces the handler when it
  starts; a library import (any other program) leaves signals alone."""
  argv = getattr(sys, "orig_argv", [])
  as_module = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "ttamer_jax"
  program = os.path.basename(sys.argv[0]) == "ttamer" if sys.argv else False
  if not (as_module or program) or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    return

  def leave(signum, frame):
    os.write(2, b"ttamer: interrupted\n")
    os._exit(130)

  signal.signal(signal.SIGINT, leave)


_guard_program_import()

from ttamer_jax import core, data, evaluation  # noqa: F401 (the layers, as attributes)
from ttamer_jax._version import __version__
from ttamer_jax.core import (
  Cascade,
  RoutingGraph,
  batch_serving_cost,
  cascade_from_logits,
  confidence_threshold,
  consult_probabilities,
  demo_cascade,
  exhaustive_thresholds_on_cascade,
  fit_cascade_arrays,
  gap_instance,
  grid_search_threshold,
  hindsight_policy,
  monte_carlo,
  per_stage_thresholds,
  prophet_value,
  random_cascade,
  recall_policy,
  serving_loss,
  skip_line,
  soft_min_error_bound,
  soft_solve_recall,
  solve_no_recall,
  solve_recall,
  sweep,
  tree_graph,
  tune_thresholds,
  tune_thresholds_on_cascade,
)
from ttamer_jax.core.replay import replay
from ttamer_jax.data import (
  POLICY_FORMAT_VERSION,
  TRACES_FORMAT_VERSION,
  DeployedPolicy,
  ExitTraces,
  fit_answer_model,
  fit_cascade,
  fit_discretiser,
  load_cascade,
  load_policy,
  load_traces,
  load_traces_table,
  overthinking_cascade,
  read_traces,
  sample_traces,
  save_cascade,
  save_policy,
  save_traces,
  synthetic_cascade,
  synthetic_workload,
  traces_from_table,
  traces_to_table,
  workload_traces,
)
from ttamer_jax.evaluation import (
  DriftMonitor,
  Evaluation,
  compare,
  default_candidates,
  drift_test,
  evaluate,
  fit_policy,
  policy_metrics,
  reference_states,
  replay_traces,
  split_robustness,
  sweep_recall,
)

# Names of the networks layer, loaded (with flax and optax) on first access; the
# rest of that layer is ``ttamer_jax.networks.<name>``.
_LAZY = {name: "ttamer_jax.networks" for name in (
    "EarlyExitCNN", "train", "save_checkpoint", "load_checkpoint", "collect_traces", "Server")}
# Subpackages loaded on first access (``core``, ``data`` and ``evaluation`` are
# imported above).
_SUBPACKAGES = ("networks", "app")

# The supported surface: the names README.md, docs/ and the notebooks use. Every
# other supported name is in its layer's ``__all__`` (``ttamer_jax.core.__all__``,
# ``.data``, ``.evaluation``, ``.networks``) and reached as ``ttamer_jax.core.holm``
# etc.; names in no ``__all__`` are internal.
__all__ = [
    # model, solvers, policies (core)
    "Cascade", "demo_cascade", "gap_instance", "random_cascade",
    "RoutingGraph", "skip_line", "tree_graph",
    "solve_recall", "solve_no_recall", "prophet_value", "sweep",
    "recall_policy", "confidence_threshold", "per_stage_thresholds", "hindsight_policy",
    "replay", "monte_carlo",
    # relaxation and fitting inside jit (core)
    "soft_solve_recall", "soft_min_error_bound", "consult_probabilities", "cascade_from_logits",
    "tune_thresholds", "tune_thresholds_on_cascade", "exhaustive_thresholds_on_cascade",
    "grid_search_threshold", "batch_serving_cost", "fit_cascade_arrays", "serving_loss",
    # traces, files, fitting (data)
    "ExitTraces", "save_traces", "load_traces", "TRACES_FORMAT_VERSION",
    "traces_from_table", "traces_to_table", "load_traces_table", "read_traces",
    "sample_traces", "overthinking_cascade", "workload_traces", "synthetic_cascade",
    "synthetic_workload",
    "DeployedPolicy", "fit_cascade", "fit_discretiser", "fit_answer_model",
    "save_cascade", "load_cascade", "save_policy", "load_policy", "POLICY_FORMAT_VERSION",
    # evaluation
    "Evaluation", "evaluate", "compare", "replay_traces", "policy_metrics", "split_robustness",
    "sweep_recall", "fit_policy", "default_candidates",
    "DriftMonitor", "drift_test", "reference_states",
    # networks (loaded on first use)
    *_LAZY,
    "__version__",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  if name in _SUBPACKAGES:
    return importlib.import_module(f"ttamer_jax.{name}")
  raise AttributeError(f"module 'ttamer_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(__all__) | {"core", "data", "evaluation", *_SUBPACKAGES})
