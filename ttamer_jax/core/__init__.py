"""Layer 1, core: pure numerics (jax, numpy, chex).

The model (:mod:`.model`, :mod:`.graph`, :mod:`.factored`), the one recall kernel
(:mod:`.kernel`) and the solvers that supply its continuation (:mod:`.solvers`,
:mod:`.factored`, :mod:`.graph`, :mod:`.relaxation`, :mod:`.sharded`), policies and
their protocol (:mod:`.protocol`, :mod:`.policies`, :mod:`.heuristics`), replay and
Monte-Carlo (:mod:`.replay`). Imports nothing from the layers above.

The layer's supported names are in ``__all__`` (the most used are also in
``ttamer_jax.__all__``); other module-level names are internal. ``replay`` here is
the module :mod:`.replay`; the function is ``ttamer_jax.replay`` (``core.replay.replay``).
"""

from ttamer_jax.core.counting import fit_cascade_arrays
from ttamer_jax.core.factored import AggregatedCascade, aggregate_cascade, solve_recall_aggregated
from ttamer_jax.core.graph import RoutingGraph, line_graph, skip_line, solve_graph_recall, tree_graph
from ttamer_jax.core.heuristics import (
                                   FixedExitPolicy,
                                   HindsightPolicy,
                                   PatiencePolicy,
                                   ThresholdPolicy,
                                   confidence_threshold,
                                   entropy_threshold,
                                   hindsight_policy,
                                   per_stage_thresholds,
)
from ttamer_jax.core.model import Cascade, demo_cascade, gap_instance, iid_cascade, random_cascade
from ttamer_jax.core.policies import (
                                   GraphPolicy,
                                   MixturePolicy,
                                   NoRecallPolicy,
                                   RecallPolicy,
                                   aggregated_policy,
                                   graph_policy,
                                   no_recall_policy,
                                   recall_policy,
)
from ttamer_jax.core.protocol import LastStagePolicy, LinePolicy, StageObservation
from ttamer_jax.core.relaxation import (
                                   TuningResult,
                                   batch_serving_cost,
                                   cascade_from_logits,
                                   consult_probabilities,
                                   exhaustive_thresholds_on_cascade,
                                   grid_search_threshold,
                                   recall_threshold_objective_on_cascade,
                                   soft_fitted_cascade,
                                   soft_min_error_bound,
                                   soft_solve_no_recall,
                                   soft_solve_recall,
                                   threshold_objective,
                                   threshold_objective_on_cascade,
                                   tune_thresholds,
                                   tune_thresholds_on_cascade,
)
from ttamer_jax.core.replay import (
                                   MonteCarloEstimate,
                                   ReplayResult,
                                   ReplayTotals,
                                   monte_carlo,
                                   replay_cascade,
                                   replay_graph,
                                   replay_totals,
                                   sample_states,
                                   simulate_graph,
)
from ttamer_jax.core.sharded import SweepSolutions, sweep
from ttamer_jax.core.solutions import GraphSolution, NoRecallSolution, RecallSolution
from ttamer_jax.core.solvers import prophet_value, solve_no_recall, solve_recall
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.core.training_loss import exit_outcomes, quantile_edges, serving_loss

__all__ = [
    "fit_cascade_arrays", "AggregatedCascade", "aggregate_cascade", "solve_recall_aggregated",
    "RoutingGraph", "line_graph", "skip_line", "solve_graph_recall", "tree_graph",
    "FixedExitPolicy", "HindsightPolicy", "PatiencePolicy", "ThresholdPolicy",
    "confidence_threshold", "entropy_threshold", "hindsight_policy", "per_stage_thresholds",
    "Cascade", "demo_cascade", "gap_instance", "iid_cascade", "random_cascade", "GraphPolicy",
    "MixturePolicy", "NoRecallPolicy", "RecallPolicy", "aggregated_policy", "graph_policy",
    "no_recall_policy", "recall_policy", "LastStagePolicy", "LinePolicy", "StageObservation", "TuningResult",
    "batch_serving_cost", "cascade_from_logits", "consult_probabilities",
    "serving_loss", "exit_outcomes", "quantile_edges",
    "exhaustive_thresholds_on_cascade", "grid_search_threshold",
    "recall_threshold_objective_on_cascade", "soft_fitted_cascade", "soft_min_error_bound",
    "soft_solve_no_recall", "soft_solve_recall", "threshold_objective",
    "threshold_objective_on_cascade", "tune_thresholds", "tune_thresholds_on_cascade",
    "MonteCarloEstimate", "ReplayResult", "ReplayTotals", "monte_carlo", "replay_cascade",
    "replay_graph", "replay_totals", "sample_states", "simulate_graph", "SweepSolutions", "sweep",
    "GraphSolution", "NoRecallSolution", "RecallSolution", "prophet_value", "solve_no_recall",
    "solve_recall", "pytree_dataclass",
]
