"""Layer 3, evaluation: what a policy is worth.

Held-out replay metrics with bootstrap intervals (:mod:`.metrics`), exact metrics
on a model and robustness (:mod:`.exact`), frontiers and policy-family sweeps
(:mod:`.frontier`), SLO-constrained policies (:mod:`.slo`) and drift
(:mod:`.drift`). Imports only from ``core`` and ``data``.

The layer's supported names are in ``__all__`` (the most used are also in
``ttamer_jax.__all__``); other module-level names are internal.
"""

from ttamer_jax.evaluation.drift import (
                                         DriftMonitor,
                                         DriftReport,
                                         drift_test,
                                         holm,
                                         reference_counts,
                                         reference_states,
                                         state_counts,
                                         two_sample_test,
)
from ttamer_jax.evaluation.exact import (
                                         AggregationResult,
                                         PolicyMetrics,
                                         Robustness,
                                         aggregation_report,
                                         model_robustness,
                                         perturb_cascade,
                                         policy_metrics,
                                         split_robustness,
)
from ttamer_jax.evaluation.frontier import (
                                         FrontierGap,
                                         ReplaySweep,
                                         cheapest_within,
                                         confidence_grid,
                                         entropy_grid,
                                         fixed_exit_grid,
                                         frontier_gap,
                                         heuristic_sweeps,
                                         hindsight_sweep,
                                         pareto_front,
                                         patience_grid,
                                         per_stage_grid,
                                         staircase,
                                         sweep_no_recall,
                                         sweep_policies,
                                         sweep_recall,
                                         tuned_objective,
)
from ttamer_jax.evaluation.metrics import (
                                         Comparison,
                                         Evaluation,
                                         bootstrap_means,
                                         compare,
                                         compare_results,
                                         evaluate,
                                         replay_traces,
)
from ttamer_jax.evaluation.model_check import ModelCheck
from ttamer_jax.evaluation.selection import Candidate, CandidateScore, PolicySelection, default_candidates, fit_policy
from ttamer_jax.evaluation.slo import SLOPolicy, SLOReport, evaluate_slo, least_cost_policy, least_error_policy

__all__ = [
    "DriftMonitor", "DriftReport", "drift_test", "holm", "reference_counts", "reference_states",
    "state_counts", "two_sample_test", "AggregationResult", "PolicyMetrics", "Robustness",
    "aggregation_report", "model_robustness", "perturb_cascade", "policy_metrics",
    "split_robustness", "FrontierGap", "ReplaySweep", "confidence_grid", "cheapest_within",
    "entropy_grid", "fixed_exit_grid", "frontier_gap", "heuristic_sweeps", "hindsight_sweep",
    "pareto_front", "patience_grid", "per_stage_grid", "staircase", "sweep_no_recall",
    "sweep_policies", "sweep_recall", "tuned_objective", "Comparison", "Evaluation",
    "bootstrap_means", "compare", "compare_results", "evaluate", "replay_traces", "ModelCheck",
    "Candidate", "CandidateScore", "PolicySelection", "default_candidates", "fit_policy",
    "SLOPolicy", "SLOReport", "evaluate_slo", "least_cost_policy", "least_error_policy",
]
