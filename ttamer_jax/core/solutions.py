"""What the exact solvers return (shapes documented field by field)."""

from __future__ import annotations

import chex

from ttamer_jax.core.struct import pytree_dataclass


@pytree_dataclass
class RecallSolution:
  """Optimal policy with recall on a line.

  Attributes:
    value: ``[]`` optimal objective ``J*_recall``.
    index: ``[n, K]`` dynamic index ``sigma``: after stage ``i`` in state ``s`` stop
      iff ``x <= index[i, s]`` (``-inf``: never stop there; ``+inf``, e.g. the last
      row: always stop).
  """

  value: chex.Array
  index: chex.Array


@pytree_dataclass
class NoRecallSolution:
  """Optimal stopping rule without recall (the best any threshold heuristic can do).

  Attributes:
    value: ``[]`` optimal objective ``J*_no_recall``.
    stop: ``[n, K]`` bool, stop after stage ``i`` in state ``s`` (answer with it);
      the last row is all true.
  """

  value: chex.Array
  stop: chex.Array


@pytree_dataclass
class GraphSolution:
  """Optimal routing policy with recall on a :class:`~ttamer_jax.RoutingGraph`.

  Attributes:
    value: ``[]`` optimal objective.
    index: ``[N, K]`` stop iff ``x <= index[u, s]`` (``+inf`` at sinks).
    successor: ``[N, M, K]`` int32 node to move to from ``u`` when the best-so-far
      is ``lam * grid[m]`` and the state is ``s`` and the policy continues (-1 at sinks).
    entry: ``[]`` int32 index of the entry edge the optimum takes.
    grid: ``[M]`` sorted unscaled loss grid indexing ``successor``.
  """

  value: chex.Array
  index: chex.Array
  successor: chex.Array
  entry: chex.Array
  grid: chex.Array
