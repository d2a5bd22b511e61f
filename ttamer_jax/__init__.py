"""ttamer_jax: provably optimal exit-and-routing policies for cascaded and early-exit serving."""

from ttamer_jax import model, sweep  # modules; sweep.sweep is the sharded solver sweep
from ttamer_jax import nn, pipeline, plotting, profiling, relaxation, serving, training, workloads
from ttamer_jax.model import Cascade, demo_cascade, gap_instance, iid_cascade, random_cascade
from ttamer_jax.policies import (GraphPolicy, NoRecallPolicy, RecallPolicy, StageObservation,
                                 graph_policy, no_recall_policy, recall_policy)
from ttamer_jax.routing import (GraphSolution, RoutingGraph, line_graph, skip_line,
                                solve_graph_recall, tree_graph)
from ttamer_jax.simulation import (MonteCarloEstimate, ReplayResult, monte_carlo, replay,
                                   replay_cascade, replay_graph, sample_states, simulate_graph)
from ttamer_jax.solvers import (NoRecallSolution, RecallSolution, prophet_value, solve_no_recall,
                                solve_recall)

from ttamer_jax.traces import (TRACES_FORMAT_VERSION, ExitTraces, load_traces, load_traces_table,
                               sample_traces, save_traces, split_traces, traces_from_table,
                               traces_to_table)
from ttamer_jax.discretise import DeployedPolicy, Discretiser, trace_scores
from ttamer_jax.fitting import FittedCascade, FittedGraph, fit_cascade, fit_discretiser, fit_skip_line
from ttamer_jax.aggregation import (AggregatedCascade, AggregationResult, aggregate_cascade,
                                    aggregated_policy, aggregation_report, solve_recall_aggregated)
from ttamer_jax.baselines import (FixedExitPolicy, HindsightPolicy, PatiencePolicy, ThresholdPolicy,
                                  confidence_threshold, entropy_threshold, fixed_exit,
                                  hindsight_policy, patience_policy, per_stage_thresholds)
from ttamer_jax.evaluation import (Comparison, Evaluation, PolicyMetrics, Robustness, compare,
                                   evaluate, model_robustness, perturb_cascade, policy_metrics,
                                   replay_traces, split_robustness)
from ttamer_jax.frontier import (FrontierGap, SweepResult, confidence_grid, entropy_grid,
                                 fixed_exit_grid, frontier_gap, heuristic_sweeps,
                                 overthinking_cascade, pareto_front, patience_grid, per_stage_grid,
                                 staircase, sweep_no_recall, sweep_policies, sweep_recall,
                                 tuned_objective, workload_traces)
from ttamer_jax.slo import (MixturePolicy, SLOPolicy, SLOReport, evaluate_slo, least_cost_policy,
                            least_error_policy)
from ttamer_jax.policy_io import POLICY_FORMAT_VERSION, load_policy, save_policy

from ttamer_jax.nn import EarlyExitCNN, EarlyExitMLP, EarlyExitTransformer
from ttamer_jax.training import TrainConfig, load_checkpoint, save_checkpoint, train
from ttamer_jax.profiling import collect_traces
from ttamer_jax.serving import ServeResult, Server, serve
from ttamer_jax import drift
from ttamer_jax.drift import DriftMonitor, DriftReport, drift_test

__version__ = "0.1.0"
