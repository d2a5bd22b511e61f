"""Routing over skip-lines, trees and DAGs (DESIGN.md section 4).

At node ``u`` in state ``s`` with best-so-far ``x`` the policy stops (answering
with the best node on its path) or moves along an edge ``u -> w`` paying
``c(u, w)``; ``w``'s state is drawn from ``T_{u->w}[s]``:

  V_u(x, s) = min(x, min_w [(1-lam) c(u,w) + sum_t T_{u->w}[s,t] V_w(min(x, lam l_w(t)), t)])

Nodes are numbered in topological order (every edge goes from a lower to a higher
node), so one reverse sweep over nodes solves the recursion. A virtual root chooses
among entry edges, each with its own cost and initial distribution.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import kernel, validation
from ttamer_jax.core.kernel import DEFAULT_PRECISION
from ttamer_jax.core.model import Cascade, default_float
from ttamer_jax.core.solutions import GraphSolution
from ttamer_jax.core.struct import pytree_dataclass


def _validated_graph(values, edge_trans, edge_costs, entry_init, entry_costs,
                     edge_src, edge_dst, entry_nodes):
  values = validation.as_numpy("values", values, ndim=2)
  num_nodes, k = values.shape
  if num_nodes < 1:
    raise ValueError(f"values: number of nodes N = {num_nodes} must be >= 1")
  if k < 1:
    raise ValueError(f"values: number of states K = {k} must be >= 1")
  num_edges = len(edge_src)
  if len(edge_dst) != num_edges:
    raise ValueError(f"edge_dst: has {len(edge_dst)} entries but edge_src has {num_edges}")
  seen = set()
  for e, (u, w) in enumerate(zip(edge_src, edge_dst)):
    if not (0 <= u < num_nodes and 0 <= w < num_nodes):
      raise ValueError(f"edge {e} ({u} -> {w}): node outside 0..{num_nodes - 1}")
    if u >= w:
      raise ValueError(
          f"edge {e} ({u} -> {w}): nodes must be numbered in topological order (src < dst)")
    if (u, w) in seen:
      raise ValueError(f"edge {e} ({u} -> {w}): duplicate edge")
    seen.add((u, w))
  if len(entry_nodes) < 1:
    raise ValueError("entry_nodes: at least one entry node is required")
  for r, w in enumerate(entry_nodes):
    if not 0 <= w < num_nodes:
      raise ValueError(f"entry_nodes[{r}] = {w}: node outside 0..{num_nodes - 1}")
  if len(set(entry_nodes)) != len(entry_nodes):
    raise ValueError(f"entry_nodes: duplicate entry node in {entry_nodes}")
  edge_trans = validation.as_numpy("edge_trans", edge_trans, ndim=3)
  validation.check_shape("edge_trans", edge_trans, (num_edges, k, k))
  edge_costs = validation.as_numpy("edge_costs", edge_costs, ndim=1)
  validation.check_shape("edge_costs", edge_costs, (num_edges,))
  entry_init = validation.as_numpy("entry_init", entry_init, ndim=2)
  validation.check_shape("entry_init", entry_init, (len(entry_nodes), k))
  entry_costs = validation.as_numpy("entry_costs", entry_costs, ndim=1)
  validation.check_shape("entry_costs", entry_costs, (len(entry_nodes),))
  validation.check_nonnegative("values", values)
  validation.check_nonnegative("edge_costs", edge_costs)
  validation.check_nonnegative("entry_costs", entry_costs)
  validation.check_stochastic("edge_trans", edge_trans)
  validation.check_stochastic("entry_init", entry_init)
  dtype = default_float()
  named = (("values", values), ("edge_trans", edge_trans), ("edge_costs", edge_costs),
           ("entry_init", entry_init), ("entry_costs", entry_costs))
  return tuple(jnp.asarray(validation.to_float(name, a, dtype)) for name, a in named)


@pytree_dataclass(static=("edge_src", "edge_dst", "entry_nodes"))
class RoutingGraph:
  """A DAG of stages with per-edge costs and state transitions.

  Attributes:
    values: ``[N, K]`` loss of answering with node ``u`` in state ``s`` (>= 0).
    edge_trans: ``[E, K, K]`` row-stochastic ``T_{src->dst}`` per edge.
    edge_costs: ``[E]`` cost of moving along each edge (>= 0).
    entry_init: ``[R, K]`` state distribution of the entry node of each entry edge.
    entry_costs: ``[R]`` cost of each entry edge (the first node's cost).
    edge_src: static ``E``-tuple of source nodes.
    edge_dst: static ``E``-tuple of destination nodes (``src < dst``).
    entry_nodes: static ``R``-tuple of nodes the virtual root can enter.
  """

  values: chex.Array
  edge_trans: chex.Array
  edge_costs: chex.Array
  entry_init: chex.Array
  entry_costs: chex.Array
  edge_src: tuple = ()
  edge_dst: tuple = ()
  entry_nodes: tuple = (0,)

  def __post_init__(self):
    for name in ("edge_src", "edge_dst", "entry_nodes"):
      try:
        nodes = tuple(getattr(self, name))
        ints = tuple(int(v) for v in nodes)
      except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: must be a sequence of node numbers") from None
      if any(isinstance(v, (bool, np.bool_)) or v != i for v, i in zip(nodes, ints)):
        raise ValueError(f"{name}: must be a sequence of node numbers (integers), got {nodes}")
      object.__setattr__(self, name, ints)
    leaves = (self.values, self.edge_trans, self.edge_costs, self.entry_init, self.entry_costs)
    if not all(validation.is_concrete(x) for x in leaves):
      return
    arrays = _validated_graph(*leaves, self.edge_src, self.edge_dst, self.entry_nodes)
    for name, arr in zip(("values", "edge_trans", "edge_costs", "entry_init", "entry_costs"), arrays):
      object.__setattr__(self, name, arr)

  @property
  def num_nodes(self) -> int:
    return self.values.shape[-2]

  @property
  def num_states(self) -> int:
    return self.values.shape[-1]

  def out_edges(self, node: int) -> list[int]:
    return [e for e, u in enumerate(self.edge_src) if u == node]

  def edge_lookup(self) -> np.ndarray:
    """``[N, N]`` int table: edge index of ``u -> w`` or -1."""
    table = np.full((self.num_nodes, self.num_nodes), -1, np.int32)
    for e, (u, w) in enumerate(zip(self.edge_src, self.edge_dst)):
      table[u, w] = e
    return table


def solve_graph_recall(graph: RoutingGraph, lam, *, precision=DEFAULT_PRECISION) -> GraphSolution:
  """Exact recall-optimal routing on a DAG; see the module docstring."""
  if not isinstance(graph, RoutingGraph):
    raise ValueError(f"graph: expected a RoutingGraph, got {type(graph).__name__}")
  validation.check_scalar_lam(lam)
  grid, pos = kernel.grid_for(graph.values)
  return _solve_graph(graph, lam, grid, pos, precision)


@functools.partial(jax.jit, static_argnums=(4,))
def _solve_graph(graph: RoutingGraph, lam, grid, pos, precision) -> GraphSolution:
  values = graph.values
  num_nodes, k = values.shape
  lam = jnp.asarray(lam, values.dtype)
  grid = grid.astype(values.dtype)
  xs = lam * grid
  thresholds = kernel.row_thresholds(xs)
  g_tables: list[Any] = [None] * num_nodes  # G_w[x, t] = V_w(min(x, l_w(t)), t)
  starts: list[Any] = [None] * num_nodes    # V_w(lam l_w(t), t): entering w from the root
  index = [None] * num_nodes
  successor = [None] * num_nodes
  for u in reversed(range(num_nodes)):
    out = graph.out_edges(u)
    if not out:
      v_u = jnp.broadcast_to(xs[:, None], (grid.shape[0], k))
      index[u] = jnp.full((k,), jnp.inf, values.dtype)
      successor[u] = jnp.full((grid.shape[0], k), -1, jnp.int32)
    else:
      # The graph's continuation: the best outgoing edge's expectation.
      conts = jnp.stack([
          (1 - lam) * graph.edge_costs[e]
          + jnp.einsum("xt,st->xs", g_tables[graph.edge_dst[e]], graph.edge_trans[e],
                       precision=precision)
          for e in out])                                                 # [D, M, K]
      dsts = jnp.asarray([graph.edge_dst[e] for e in out], jnp.int32)
      successor[u] = dsts[jnp.argmin(conts, axis=0)]
      v_u, index[u] = kernel.stop_or_continue(xs, jnp.min(conts, axis=0), thresholds)
    starts[u] = kernel.at_losses(v_u, pos[u])
    g_tables[u] = kernel.carried_table(v_u, grid, starts[u], values[u])
  entry_values = jnp.stack([
      (1 - lam) * graph.entry_costs[r] + jnp.dot(graph.entry_init[r], starts[w], precision=precision)
      for r, w in enumerate(graph.entry_nodes)])
  entry = jnp.argmin(entry_values).astype(jnp.int32)
  return GraphSolution(value=entry_values[entry], index=jnp.stack(index),
                       successor=jnp.stack(successor), entry=entry, grid=grid)


# ------------------------------------------------------------------ builders
def line_graph(cascade: Cascade) -> RoutingGraph:
  """The line cascade as a graph: edges ``i -> i+1``, entry at node 0."""
  n = cascade.num_stages
  return RoutingGraph(
      values=cascade.values, edge_trans=cascade.trans, edge_costs=cascade.costs[1:],
      entry_init=cascade.init[None, :], entry_costs=cascade.costs[:1],
      edge_src=tuple(range(n - 1)), edge_dst=tuple(range(1, n)), entry_nodes=(0,))


def skip_costs(block_costs: Any, head_costs: Any, default_block: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """``(block [n], head [n])`` float64 costs of a skip-line's backbone blocks and exit heads.

  Both ``None``: ``default_block`` (the stage costs) and free heads. Otherwise a
  missing one is zero; each must be ``[n]``, finite and non-negative.
  """
  n = default_block.shape[0]
  if block_costs is None and head_costs is None:
    return np.asarray(default_block, np.float64), np.zeros(n)
  out = []
  for name, arr in (("block_costs", block_costs), ("head_costs", head_costs)):
    arr = validation.as_numpy(name, np.zeros(n) if arr is None else arr, ndim=1)
    validation.check_shape(name, arr, (n,))
    validation.check_nonnegative(name, arr)
    out.append(arr.astype(np.float64))
  return out[0], out[1]


def skip_line(cascade: Cascade, block_costs: Any = None, head_costs: Any = None, *,
              skip_first: bool = False) -> RoutingGraph:
  """Transitive closure of a line: from stage ``i`` any later ``j`` may be next.

  For an early-exit network, skipping exit heads still runs the blocks between:
  ``c(i, j) = block_costs[i+1..j].sum() + head_costs[j]`` and
  ``T_{i->j} = trans_i @ ... @ trans_{j-1}`` (Markov chain over skipped stages).

  Args:
    cascade: the line (its ``costs`` are used as block costs when both cost
      arguments are omitted, heads then being free).
    block_costs: ``[n]`` cost of running backbone block ``i``.
    head_costs: ``[n]`` cost of running exit head ``i``.
    skip_first: also let the root enter any stage directly (stage 1 is otherwise
      always consulted, as on a line).

  Returns:
    A :class:`RoutingGraph` over the ``n`` stages (``values [n, K]``) with an edge
    ``i -> j`` for every ``i < j``, each with its ``[K, K]`` transition and its cost.
  """
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  n, k = cascade.num_stages, cascade.num_states
  trans = np.asarray(cascade.trans, np.float64)
  block, head = skip_costs(block_costs, head_costs, np.asarray(cascade.costs, np.float64))
  cum_block = np.concatenate([[0.0], np.cumsum(block)])
  src, dst, edge_trans, edge_costs = [], [], [], []
  for i in range(n):
    product = np.eye(k)
    for j in range(i + 1, n):
      product = product @ trans[j - 1]
      src.append(i)
      dst.append(j)
      edge_trans.append(product)
      edge_costs.append(cum_block[j + 1] - cum_block[i + 1] + head[j])
  entries = range(n) if skip_first else range(1)
  init = np.asarray(cascade.init, np.float64)
  entry_init, reach = [], init
  for j in range(n):
    if j > 0:
      reach = reach @ trans[j - 1]
    if j in entries:
      entry_init.append(reach)
  entry_costs = [cum_block[j + 1] + head[j] for j in entries]
  # Renormalise products so float drift over long chains cannot fail validation.
  edge_trans = np.asarray(edge_trans).reshape(-1, k, k)
  edge_trans = edge_trans / edge_trans.sum(-1, keepdims=True)
  entry_init = np.asarray(entry_init)
  entry_init = entry_init / entry_init.sum(-1, keepdims=True)
  return RoutingGraph(
      values=np.asarray(cascade.values), edge_trans=edge_trans, edge_costs=np.asarray(edge_costs),
      entry_init=entry_init, entry_costs=np.asarray(entry_costs),
      edge_src=tuple(src), edge_dst=tuple(dst), entry_nodes=tuple(entries))


def tree_graph(values: Any, parents: Sequence[int], edge_trans: Any, edge_costs: Any,
               root_init: Any, root_cost: float) -> RoutingGraph:
  """A directed tree: node 0 is the root (always consulted); node ``u > 0`` hangs
  below ``parents[u-1] < u`` with transition ``edge_trans[u-1]`` and cost
  ``edge_costs[u-1]``. E.g. a router (node 0) choosing among specialist models.

  Args:
    values: ``[V, K]`` loss of answering with node ``u`` in state ``s``.
    parents: ``V - 1`` ints, ``parents[u-1] < u``: the parent of node ``u``.
    edge_trans: ``[V-1, K, K]`` row-stochastic transition of each edge ``parent -> u``.
    edge_costs: ``[V-1]`` cost of consulting node ``u`` from its parent (>= 0).
    root_init: ``[K]`` distribution of the root's state.
    root_cost: ``[]`` cost of the root (always paid).

  Returns:
    A :class:`RoutingGraph` of ``V`` nodes with one entry (the root).
  """
  parents = validation.as_numpy("parents", parents, ndim=1, kind="int")
  root_init = validation.as_numpy("root_init", root_init, ndim=1)
  root_cost = validation.as_float_scalar("root_cost", root_cost)
  parents = tuple(int(p) for p in parents)
  return RoutingGraph(
      values=values, edge_trans=edge_trans, edge_costs=edge_costs,
      entry_init=root_init[None, :], entry_costs=np.asarray([root_cost]),
      edge_src=parents, edge_dst=tuple(range(1, len(parents) + 1)), entry_nodes=(0,))
