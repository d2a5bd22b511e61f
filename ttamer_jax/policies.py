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

from typing import Any

import chex
import jax.numpy as jnp
import numpy as np

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

  def __post_init__(self):
    leaves = (self.state, self.score, self.pred)
    if not all(validation.is_concrete(x) for x in leaves):
      return
    state = validation.as_numpy("state", self.state, kind="int")
    validation.check_shape("score", validation.as_numpy("score", self.score), state.shape)
    validation.check_shape("pred", validation.as_numpy("pred", self.pred, kind="int"), state.shape)


def _check_table(name: str, arr: Any, dtype_kinds: str = "biuf") -> np.ndarray:
  arr = validation.as_numpy(name, arr)
  if arr.ndim < 2 or arr.shape[-1] < 1 or arr.shape[-2] < 1:
    raise ValueError(f"{name}: expected an [n, K] table (n, K >= 1), got shape {arr.shape}")
  if arr.dtype.kind not in dtype_kinds:
    raise ValueError(f"{name}: expected dtype kind in {dtype_kinds!r}, got {arr.dtype}")
  return arr


def _check_recall_arrays(index, values, lam) -> None:
  """``index`` no NaN (``+-inf`` allowed), ``values`` finite >= 0 of the same shape,
  ``lam`` in [0, 1]; leading batch axes are allowed (grids of policies)."""
  index = _check_table("index", index, "iuf")
  if np.isnan(index).any():
    i = int(np.flatnonzero(np.isnan(index))[0])
    raise ValueError(f"index{validation._fmt_index(i, index.shape)} is nan (the index must be "
                     "a number or +-inf)")
  values = _check_table("values", values, "iuf")
  if values.shape[-2:] != index.shape[-2:]:
    raise ValueError(f"values: shape {values.shape} does not match index {index.shape} ([n, K] each)")
  validation.check_nonnegative("values", values)
  validation.check_lam(lam)


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

  def __post_init__(self):
    if all(validation.is_concrete(x) for x in (self.index, self.values, self.lam)):
      _check_recall_arrays(self.index, self.values, self.lam)

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

  def __post_init__(self):
    if validation.is_concrete(self.stop):
      stop = _check_table("stop", self.stop)
      if stop.dtype != bool:
        if not np.isin(stop, (0, 1)).all():
          raise ValueError(f"stop: must be a bool table, got dtype {stop.dtype} with values "
                           "other than 0 and 1")
        object.__setattr__(self, "stop", jnp.asarray(stop, bool))

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

  def __post_init__(self):
    leaves = (self.index, self.successor, self.grid, self.values, self.lam, self.entry)
    if not all(validation.is_concrete(x) for x in leaves):
      return
    _check_recall_arrays(self.index, self.values, self.lam)
    index = np.asarray(self.index)
    num_nodes, k = index.shape[-2:]
    grid = validation.as_numpy("grid", self.grid, ndim=1)
    validation.check_finite("grid", grid)
    if grid.size < 1 or np.any(np.diff(grid) < 0):
      raise ValueError(f"grid: must be a non-empty sorted loss grid, got shape {grid.shape}")
    succ = validation.as_numpy("successor", self.successor, ndim=3, kind="int")
    validation.check_shape("successor", succ, (num_nodes, grid.size, k))
    validation.check_int_range("successor", succ, -1, num_nodes)
    validation.check_int_range("entry", validation.as_numpy("entry", self.entry, ndim=0, kind="int"),
                               0, num_nodes)

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


def num_states(policy) -> int | None:
  """``K`` of a state-reading policy's tables; ``None`` for one that ignores states.

  Follows wrappers: a :class:`~ttamer_jax.discretise.DeployedPolicy`'s ``policy``
  and a mixture's components (which must agree).
  """
  inner = getattr(policy, "policy", None)
  if inner is not None and hasattr(policy, "discretiser"):
    return num_states(inner)
  if hasattr(policy, "mixture_components"):
    ks = {num_states(p) for _, p in policy.mixture_components()} - {None}
    if len(ks) > 1:
      raise ValueError(f"policy: mixture components have different numbers of states {sorted(ks)}")
    return ks.pop() if ks else None
  for name in ("index", "stop"):
    arr = getattr(policy, name, None)
    if arr is not None and len(np.shape(arr)) >= 2:
      return int(np.shape(arr)[-1])
  return None
