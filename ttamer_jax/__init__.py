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

from ttamer_jax.core.counting import fit_cascade_arrays
from ttamer_jax.core.factored import AggregatedCascade, aggregate_cascade, solve_recall_aggregated
from ttamer_jax.core.graph import RoutingGraph, line_graph, skip_line, solve_graph_recall, tree_graph
from ttamer_jax.core.heuristics import (FixedExitPolicy, HindsightPolicy, PatiencePolicy,
                                        ThresholdPolicy, confidence_threshold, entropy_threshold,
                                        fixed_exit, hindsight_policy, patience_policy,
                                        per_stage_thresholds)
from ttamer_jax.core.model import Cascade, demo_cascade, gap_instance, iid_cascade, random_cascade
from ttamer_jax.core.policies import (GraphPolicy, MixturePolicy, NoRecallPolicy, RecallPolicy,
                                      aggregated_policy, graph_policy, no_recall_policy,
                                      recall_policy)
from ttamer_jax.core.protocol import LinePolicy, StageObservation
from ttamer_jax.core.relaxation import (TuningResult, batch_serving_cost, cascade_from_logits,
                                        consult_probabilities, exhaustive_thresholds_on_cascade,
                                        grid_search_threshold,
                                        recall_threshold_objective_on_cascade,
                                        soft_fitted_cascade, soft_min_error_bound,
                                        soft_solve_no_recall, soft_solve_recall,
                                        threshold_objective, threshold_objective_on_cascade,
                                        tune_thresholds, tune_thresholds_on_cascade)
from ttamer_jax.core.replay import (MonteCarloEstimate, ReplayResult, ReplayTotals, monte_carlo,
                                    replay, replay_cascade, replay_graph, replay_totals,
                                    sample_states, simulate_graph)
from ttamer_jax.core.sharded import SweepSolutions, sweep
from ttamer_jax.core.solutions import GraphSolution, NoRecallSolution, RecallSolution
from ttamer_jax.core.solvers import prophet_value, solve_no_recall, solve_recall
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.answers import AnswerModel, fit_answer_model
from ttamer_jax.data.cascade_io import CASCADE_FORMAT_VERSION, load_cascade, save_cascade
from ttamer_jax.data.discretise import DeployedPolicy, Discretiser, trace_scores
from ttamer_jax.data.fitting import (FittedCascade, FittedGraph, fit_cascade,
                                     fit_cascade_from_states, fit_discretiser, fit_skip_line,
                                     traces_with_states)
from ttamer_jax.data.policy_io import POLICY_FORMAT_VERSION, load_policy, save_policy
from ttamer_jax.data.synthetic import (TraceWorkload, overthinking_cascade, sample_traces,
                                       synthetic_cascade, synthetic_workload, workload_traces)
from ttamer_jax.data.tables import (load_traces_table, read_traces, traces_from_table,
                                    traces_to_table)
from ttamer_jax.data.traces import (TRACES_FORMAT_VERSION, ExitTraces, load_traces, save_traces,
                                    split_traces)
from ttamer_jax.evaluation.drift import (DriftMonitor, DriftReport, drift_test, holm,
                                         reference_counts, reference_states, state_counts,
                                         two_sample_test)
from ttamer_jax.evaluation.exact import (AggregationResult, PolicyMetrics, Robustness,
                                         aggregation_report, model_robustness, perturb_cascade,
                                         policy_metrics, split_robustness)
from ttamer_jax.evaluation.frontier import (FrontierGap, ReplaySweep, confidence_grid,
                                            cheapest_within, entropy_grid, fixed_exit_grid,
                                            frontier_gap,
                                            heuristic_sweeps, hindsight_sweep, pareto_front,
                                            patience_grid, per_stage_grid, staircase,
                                            sweep_no_recall, sweep_policies, sweep_recall,
                                            tuned_objective)
from ttamer_jax.evaluation.metrics import (Comparison, Evaluation, bootstrap_means, compare,
                                           compare_results, evaluate, replay_traces)
from ttamer_jax.evaluation.model_check import ModelCheck
from ttamer_jax.evaluation.selection import (Candidate, CandidateScore, PolicySelection,
                                             default_candidates, fit_policy)
from ttamer_jax.evaluation.slo import (SLOPolicy, SLOReport, evaluate_slo, least_cost_policy,
                                       least_error_policy)

from ttamer_jax._version import __version__

# Names of the networks layer, loaded (with flax and optax) on first access.
_LAZY = {
    "EarlyExitCNN": "ttamer_jax.networks", "EarlyExitMLP": "ttamer_jax.networks",
    "EarlyExitTransformer": "ttamer_jax.networks", "TrainConfig": "ttamer_jax.networks",
    "train": "ttamer_jax.networks", "save_checkpoint": "ttamer_jax.networks",
    "load_checkpoint": "ttamer_jax.networks", "collect_traces": "ttamer_jax.networks",
    "Server": "ttamer_jax.networks", "ServeResult": "ttamer_jax.networks",
    "serve": "ttamer_jax.networks",
}
_SUBPACKAGES = ("core", "data", "evaluation", "networks", "app")

__all__ = [
    # model and solvers
    "Cascade", "demo_cascade", "gap_instance", "iid_cascade", "random_cascade",
    "RoutingGraph", "line_graph", "skip_line", "tree_graph",
    "AggregatedCascade", "aggregate_cascade",
    "RecallSolution", "NoRecallSolution", "GraphSolution",
    "solve_recall", "solve_no_recall", "prophet_value", "solve_graph_recall",
    "solve_recall_aggregated", "sweep", "SweepSolutions",
    # policies
    "LinePolicy", "StageObservation", "pytree_dataclass", "RecallPolicy", "NoRecallPolicy", "GraphPolicy",
    "MixturePolicy", "recall_policy", "no_recall_policy", "graph_policy", "aggregated_policy",
    "ThresholdPolicy", "PatiencePolicy", "FixedExitPolicy", "HindsightPolicy",
    "confidence_threshold", "entropy_threshold", "per_stage_thresholds", "patience_policy",
    "fixed_exit", "hindsight_policy",
    # replay and Monte-Carlo
    "ReplayResult", "ReplayTotals", "MonteCarloEstimate", "replay", "replay_totals",
    "replay_cascade", "monte_carlo",
    "sample_states", "simulate_graph", "replay_graph",
    # relaxation
    "soft_solve_recall", "soft_solve_no_recall", "soft_min_error_bound", "consult_probabilities",
    "cascade_from_logits", "threshold_objective", "threshold_objective_on_cascade",
    "recall_threshold_objective_on_cascade", "tune_thresholds", "tune_thresholds_on_cascade",
    "exhaustive_thresholds_on_cascade", "grid_search_threshold", "TuningResult",
    "soft_fitted_cascade", "batch_serving_cost", "fit_cascade_arrays",
    # data
    "ExitTraces", "split_traces", "save_traces", "load_traces", "TRACES_FORMAT_VERSION",
    "traces_from_table", "traces_to_table", "load_traces_table", "read_traces",
    "sample_traces", "overthinking_cascade", "workload_traces", "synthetic_cascade",
    "synthetic_workload", "TraceWorkload",
    "Discretiser", "DeployedPolicy", "trace_scores",
    "FittedCascade", "FittedGraph", "fit_cascade", "fit_discretiser", "fit_skip_line",
    "fit_cascade_from_states", "traces_with_states",
    "save_cascade", "load_cascade", "CASCADE_FORMAT_VERSION",
    "save_policy", "load_policy", "POLICY_FORMAT_VERSION", "AnswerModel", "fit_answer_model",
    # evaluation
    "Evaluation", "Comparison", "evaluate", "compare", "compare_results", "replay_traces",
    "bootstrap_means", "cheapest_within",
    "PolicyMetrics", "policy_metrics", "Robustness", "perturb_cascade", "model_robustness",
    "split_robustness", "AggregationResult", "aggregation_report",
    "ReplaySweep", "FrontierGap", "sweep_recall", "sweep_no_recall", "sweep_policies",
    "hindsight_sweep", "heuristic_sweeps", "confidence_grid", "entropy_grid", "per_stage_grid",
    "patience_grid", "fixed_exit_grid", "pareto_front", "staircase", "frontier_gap",
    "tuned_objective",
    "fit_policy", "PolicySelection", "Candidate", "CandidateScore", "default_candidates",
    "ModelCheck",
    "SLOPolicy", "SLOReport", "least_cost_policy", "least_error_policy", "evaluate_slo",
    "DriftMonitor", "DriftReport", "drift_test", "two_sample_test", "holm", "state_counts",
    "reference_states", "reference_counts",
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
  return sorted(set(__all__) | set(_SUBPACKAGES))
