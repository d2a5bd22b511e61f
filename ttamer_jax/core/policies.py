"""Solver policies as pytrees with an online step usable inside ``jit``.

:class:`RecallPolicy`, :class:`NoRecallPolicy` and the randomised
:class:`MixturePolicy` implement :class:`~ttamer_jax.core.LinePolicy`; the routing
policy :class:`GraphPolicy` decides a stop and a successor. Constructors validate
their tables once; inside transformations (rebuilt by JAX) they do not.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.factored import AggregatedCascade, solve_recall_aggregated
from ttamer_jax.core.graph import RoutingGraph, solve_graph_recall
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.protocol import LastStagePolicy, LinePolicy, StageObservation, check_line_policy
from ttamer_jax.core.solutions import GraphSolution
from ttamer_jax.core.solvers import solve_no_recall, solve_recall
from ttamer_jax.core.struct import pytree_dataclass, trusted


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
    raise ValueError(f"index{validation.fmt_index(i, index.shape)} is nan (the index must be "
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
  observes = "states"

  def __post_init__(self):
    if all(validation.is_concrete(x) for x in (self.index, self.values, self.lam)):
      _check_recall_arrays(self.index, self.values, self.lam)

  @property
  def num_stages(self) -> int:
    return self.index.shape[-2]

  @property
  def num_states(self) -> int:
    return self.index.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.index.shape[:-2])

  @classmethod
  def lam_grid_axes(cls) -> RecallPolicy:
    """``jax.vmap`` ``in_axes`` of a ``lam`` grid of one model (``index [P, n, K]``,
    ``lam [P]``, one shared ``values [n, K]``), e.g. for :func:`~ttamer_jax.core.replay_totals`."""
    return trusted(cls, index=0, values=None, lam=0)

  def should_stop(self, stage, state, best_loss):
    """Online rule: stop iff ``lam * best_loss <= index[stage, state]``.

    ``best_loss`` is the least *unscaled* modelled loss so far (a ``values`` entry);
    the rule scales it by ``lam`` itself -- the same convention as
    :meth:`GraphPolicy.decide`. The index lies strictly between reachable products
    (docs/policy_format.md), so the decision does not depend on the precision of
    this product.
    """
    return self.lam * best_loss <= self.index[stage, state]

  def estimate(self, stage, obs: StageObservation):
    return self.values[stage, obs.state]

  def initial_carry(self, batch_size: int):
    return ()

  def step(self, carry, stage, obs: StageObservation, best):
    return carry, self.should_stop(stage, obs.state, best)


@pytree_dataclass
class NoRecallPolicy(LastStagePolicy):
  """Optimal stopping without recall: stop iff ``stop[stage, state]``; answer = last stage.

  Attributes:
    stop: ``[n, K]`` bool stop table from :func:`~ttamer_jax.solve_no_recall`.
  """

  stop: chex.Array

  observes = "states"
  grid_field = "stop"
  grid_field_ndim = 2

  def __post_init__(self):
    if validation.is_concrete(self.stop):
      stop = _check_table("stop", self.stop)
      if stop.dtype != bool:
        if not np.isin(stop, (0, 1)).all():
          raise ValueError(f"stop: must be a bool table, got dtype {stop.dtype} with values "
                           "other than 0 and 1")
        object.__setattr__(self, "stop", validation.device_array(stop, bool))

  @property
  def num_stages(self) -> int:
    return self.stop.shape[-2]

  @property
  def num_states(self) -> int:
    return self.stop.shape[-1]

  def should_stop(self, stage, state):
    return self.stop[stage, state]

  def step(self, carry, stage, obs: StageObservation, best):
    return carry, self.should_stop(stage, obs.state)


def recall_policy(cascade: Cascade, lam) -> RecallPolicy:
  """Solves :func:`~ttamer_jax.solve_recall` and wraps the index as a policy.

  On an :class:`~ttamer_jax.core.AggregatedCascade` the index is solved through the
  factors (over the original states).

  Args:
    cascade: a :class:`Cascade` (or :class:`~ttamer_jax.core.AggregatedCascade`),
      ``n`` stages of ``K`` states.
    lam: ``[]`` trade-off weight in [0, 1]; a ``[L]`` grid under ``jax.vmap``.

  Returns:
    A :class:`~ttamer_jax.core.RecallPolicy`: ``index [n, K]``, ``values [n, K]``,
    ``lam []``.
  """
  solution = solve_recall(cascade, lam)  # validates cascade and lam
  return trusted(RecallPolicy, index=solution.index, values=cascade.values,
                 lam=jnp.asarray(lam, cascade.values.dtype))


def aggregated_policy(agg: AggregatedCascade, lam) -> RecallPolicy:
  """The recall policy solved on the factorised model (index over the original states)."""
  sol = solve_recall_aggregated(agg, lam)  # validates agg and lam
  return trusted(RecallPolicy, index=sol.index, values=agg.values,
                 lam=jnp.asarray(lam, agg.values.dtype))


def no_recall_policy(cascade: Cascade, lam) -> NoRecallPolicy:
  """Solves :func:`~ttamer_jax.solve_no_recall` and wraps the stop table as a policy."""
  return trusted(NoRecallPolicy, stop=solve_no_recall(cascade, lam).stop)


@pytree_dataclass
class GraphPolicy:
  """Recall-optimal routing policy on a :class:`~ttamer_jax.RoutingGraph`.

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
    """Online rule: ``(stop, next_node)`` for one request at ``node`` in ``state``.

    ``best_loss`` is the least *unscaled* modelled loss on the path so far, as for
    :meth:`RecallPolicy.should_stop`: stop iff ``lam * best_loss <= index[node,
    state]``; otherwise move to ``successor[node, row of best_loss in grid, state]``.
    """
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


def key_data(key: Any) -> chex.Array:
  """Raw ``[2]`` uint32 data of a legacy or typed PRNG key (``ValueError`` otherwise)."""
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  key = validation.as_numpy("key", key, kind="int")
  if key.shape != (2,):
    raise ValueError(f"key: expected a PRNG key (shape (2,) uint32), got shape {key.shape}")
  return jnp.asarray(key, jnp.uint32)


@pytree_dataclass
class MixturePolicy:
  """Per request, follow ``second`` with probability ``prob_second``, else ``first``.

  The coin of request ``b`` in a batch is ``bernoulli(key, prob_second, (B,))[b]``,
  drawn in :meth:`initial_carry`; serving gives each batch its own key with
  ``policy.replace(key=jax.random.fold_in(key, batch_number))``.

  Attributes:
    first: a line policy.
    second: a line policy with the same ``recall`` flag (and, with recall, the same
      loss estimates, so the recalled answer does not depend on the coin).
    prob_second: ``[]`` probability of following ``second``.
    key: ``[2]`` uint32 PRNG key of the coins.
  """

  first: Any
  second: Any
  prob_second: chex.Array
  key: chex.Array

  def __post_init__(self):
    for name in ("first", "second"):
      check_line_policy(getattr(self, name), name)
    if self.first.recall != self.second.recall:
      raise ValueError("second: both policies of a mixture must share the recall flag")
    if self.first.num_stages != self.second.num_stages:
      raise ValueError(f"second: has {self.second.num_stages} stages, first {self.first.num_stages}")
    ks = {self.first.num_states, self.second.num_states} - {None}
    if len(ks) > 1:
      raise ValueError(f"second: mixture components have different numbers of states {sorted(ks)}")
    p = self.prob_second
    if validation.is_concrete(p):
      arr = validation.as_numpy("prob_second", p)
      if arr.shape != () or not 0 <= float(arr) <= 1:
        raise ValueError(f"prob_second = {arr} must be a scalar in [0, 1]")
    if validation.is_concrete(self.key):
      object.__setattr__(self, "key", key_data(self.key))

  @property
  def recall(self) -> bool:
    return self.first.recall

  @property
  def observes(self) -> str:
    kinds = {self.first.observes, self.second.observes}
    for kind in ("true_losses", "states", "signals"):
      if kind in kinds:
        return kind
    return "nothing"

  @property
  def num_stages(self) -> int:
    return self.first.num_stages

  @property
  def num_states(self) -> int | None:
    return self.first.num_states if self.first.num_states is not None else self.second.num_states

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.prob_second)) or self.first.batch_shape

  def mixture_components(self) -> list[tuple[Any, LinePolicy]]:
    """``[(weight, policy), ...]`` for exact evaluation by linearity."""
    return [(1 - self.prob_second, self.first), (self.prob_second, self.second)]

  def estimate(self, stage, obs: StageObservation):
    return self.first.estimate(stage, obs)

  def initial_carry(self, batch_size: int):
    coin = jax.random.bernoulli(self.key, self.prob_second, (batch_size,))
    return coin, self.first.initial_carry(batch_size), self.second.initial_carry(batch_size)

  def step(self, carry, stage, obs: StageObservation, best):
    coin, c1, c2 = carry
    c1, s1 = self.first.step(c1, stage, obs, best)
    c2, s2 = self.second.step(c2, stage, obs, best)
    return (coin, c1, c2), jnp.where(coin, s2, s1)
