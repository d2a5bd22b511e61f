"""Policies as pytrees with an online step usable inside ``jit``.

Every line policy implements one small protocol, so replay, Monte-Carlo and
serving treat solver policies and heuristics alike:

  * ``recall``: ``True`` if the policy answers with the consulted stage of least
    ``estimate``; ``False`` if it answers with the last consulted stage.
  * ``num_stages``: number of stages the policy was built for.
  * ``estimate(stage, obs)``: ``[B]`` loss estimate of each request's answer at
    ``stage`` (used only when ``recall``).
  * ``initial_carry(batch_size)``: per-request memory of the policy (may be ``()``).
  * ``step(carry, stage, obs, best)``: ``(carry, stop [B] bool)`` after consulting
    ``stage``; ``best`` is the least estimate so far (including this stage).

``obs`` is a :class:`StageObservation` for one stage and a batch of requests.
The last stage always stops, whatever ``step`` says.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from ttamer_jax import solvers, validation
from ttamer_jax._struct import pytree_dataclass
from ttamer_jax.model import Cascade
from ttamer_jax.routing import GraphSolution, RoutingGraph, solve_graph_recall


@pytree_dataclass
class StageObservation:
  """What a policy sees after consulting one stage, for ``B`` requests.

  Attributes:
    state: ``[B]`` int32 discretised state.
    score: ``[B]`` float raw signal of the exit (e.g. max-softmax), zeros if absent.
    pred: ``[B]`` int32 prediction of the exit, zeros if absent.
  """

  state: chex.Array
  score: chex.Array
  pred: chex.Array


@pytree_dataclass
class RecallPolicy:
  """Optimal policy with recall: stop iff ``lam * best <= index[stage, state]``.

  Attributes:
    index: ``[n, K]`` dynamic index from :func:`~ttamer_jax.solve_recall`.
    values: ``[n, K]`` modelled loss per (stage, state): the recalled answer is the
      consulted stage of least value.
    lam: ``[]`` trade-off weight the index was solved for.
  """

  index: chex.Array
  values: chex.Array
  lam: chex.Array

  recall = True

  @property
  def num_stages(self) -> int:
    return self.index.shape[-2]

  def should_stop(self, stage, state, best_loss):
    """Online rule for one request: ``best_loss`` is the least modelled loss so far."""
    return self.lam * best_loss <= self.index[stage, state]

  def estimate(self, stage, obs: StageObservation):
    return self.values[stage, obs.state]

  def initial_carry(self, batch_size: int):
    return ()

  def step(self, carry, stage, obs: StageObservation, best):
    return carry, self.should_stop(stage, obs.state, best)


@pytree_dataclass
class NoRecallPolicy:
  """Optimal stopping without recall: stop iff ``stop[stage, state]``; answer = last stage.

  Attributes:
    stop: ``[n, K]`` bool stop table from :func:`~ttamer_jax.solve_no_recall`.
  """

  stop: chex.Array

  recall = False

  @property
  def num_stages(self) -> int:
    return self.stop.shape[-2]

  def should_stop(self, stage, state):
    return self.stop[stage, state]

  def estimate(self, stage, obs: StageObservation):
    return jnp.zeros(obs.state.shape)

  def initial_carry(self, batch_size: int):
    return ()

  def step(self, carry, stage, obs: StageObservation, best):
    return carry, self.should_stop(stage, obs.state)


def recall_policy(cascade: Cascade, lam) -> RecallPolicy:
  """Solves :func:`~ttamer_jax.solve_recall` and wraps the index as a policy."""
  solution = solvers.solve_recall(cascade, lam)
  return RecallPolicy(index=solution.index, values=cascade.values,
                      lam=jnp.asarray(lam, cascade.values.dtype))


def no_recall_policy(cascade: Cascade, lam) -> NoRecallPolicy:
  return NoRecallPolicy(stop=solvers.solve_no_recall(cascade, lam).stop)


@pytree_dataclass
class GraphPolicy:
  """Recall-optimal routing policy on a :class:`~ttamer_jax.routing.RoutingGraph`.

  Attributes:
    index: ``[N, K]`` stop iff ``lam * best <= index[node, state]``.
    successor: ``[N, M, K]`` next node when continuing, indexed by the grid row of
      the best-so-far loss and the state.
    grid: ``[M]`` sorted unscaled loss grid.
    values: ``[N, K]`` modelled loss per (node, state).
    lam: ``[]`` trade-off weight.
    entry: ``[]`` int32 entry edge of the virtual root.
  """

  index: chex.Array
  successor: chex.Array
  grid: chex.Array
  values: chex.Array
  lam: chex.Array
  entry: chex.Array

  recall = True

  @property
  def num_nodes(self) -> int:
    return self.index.shape[-2]

  def decide(self, node, state, best_loss):
    """Online rule: ``(stop, next_node)`` for one request at ``node`` in ``state``."""
    stop = self.lam * best_loss <= self.index[node, state]
    row = jnp.searchsorted(self.grid, best_loss)
    return stop, self.successor[node, row, state]


def graph_policy(graph: RoutingGraph, lam, solution: GraphSolution | None = None) -> GraphPolicy:
  if solution is None:
    solution = solve_graph_recall(graph, lam)
  validation.check_lam(lam)
  return GraphPolicy(index=solution.index, successor=solution.successor, grid=solution.grid,
                     values=graph.values, lam=jnp.asarray(lam, graph.values.dtype),
                     entry=solution.entry)
