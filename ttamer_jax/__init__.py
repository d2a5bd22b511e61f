"""ttamer_jax: provably optimal exit-and-routing policies for cascaded and early-exit serving."""

from ttamer_jax import model
from ttamer_jax.model import Cascade, demo_cascade, gap_instance, iid_cascade, random_cascade
from ttamer_jax.policies import (GraphPolicy, NoRecallPolicy, RecallPolicy, StageObservation,
                                 graph_policy, no_recall_policy, recall_policy)
from ttamer_jax.routing import (GraphSolution, RoutingGraph, line_graph, skip_line,
                                solve_graph_recall, tree_graph)
from ttamer_jax.simulation import (MonteCarloEstimate, ReplayResult, monte_carlo, replay,
                                   replay_cascade, replay_graph, sample_states, simulate_graph)
from ttamer_jax.solvers import (NoRecallSolution, RecallSolution, prophet_value, solve_no_recall,
                                solve_recall)

__version__ = "0.1.0"
