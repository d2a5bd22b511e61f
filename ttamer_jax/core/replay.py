"""Batched replay of policies on state paths, and Monte-Carlo evaluation.

``replay`` runs any :class:`~ttamer_jax.core.LinePolicy` on recorded or sampled
per-stage observations and scores it with the *true* per-request losses
and costs. ``monte_carlo`` samples paths from a cascade in chunks (memory bounded
by ``chunk_size * n``) and accumulates the statistics.

Entry points: :func:`replay` (one policy on ``[N, n]`` requests),
:func:`replay_totals` (a grid of policies, summed), :func:`replay_cascade` (scored
with a cascade's own losses), :func:`replay_graph` (a routing policy), and
:func:`ttamer_jax.replay_traces` (on :class:`~ttamer_jax.ExitTraces`, in
``evaluation``). ``replay_trusted``, ``replay_totals_trusted`` and
``replay_compiled`` are internal: the same loops without the boundary checks.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.graph import RoutingGraph
from ttamer_jax.core.model import Cascade, default_float
from ttamer_jax.core.policies import GraphPolicy, MixturePolicy
from ttamer_jax.core.protocol import LinePolicy, StageObservation, check_line_policy, check_single_policy
from ttamer_jax.core.shapes import bucket_size
from ttamer_jax.core.struct import pytree_dataclass


@pytree_dataclass
class ReplayResult:
  """Per-request outcome of running a policy.

  Attributes:
    stop_stage: ``[N]`` int32 last consulted stage.
    answer_stage: ``[N]`` int32 stage whose output is returned.
    loss: ``[N]`` true loss of the answered stage.
    cost: ``[N]`` total cost of the consulted stages.
  """

  stop_stage: chex.Array
  answer_stage: chex.Array
  loss: chex.Array
  cost: chex.Array

  def objective(self, lam) -> chex.Array:
    """``[N]`` per-request ``lam * loss + (1 - lam) * cost``."""
    return lam * self.loss + (1 - lam) * self.cost


# -------------------------------------------------------------- sampling
def _cdf(probs: chex.Array) -> chex.Array:
  """Row-wise CDF with the last entry pinned to exactly 1 (no off-the-end draws)."""
  cdf = jnp.cumsum(probs, axis=-1)
  cdf = cdf / cdf[..., -1:]
  return cdf.at[..., -1].set(1.0)


def _inverse_cdf(cdf_rows_at, u: chex.Array, num_states: int) -> chex.Array:
  """First ``t`` with ``cdf[t] > u`` by binary search; ``cdf_rows_at(t)`` gathers
  ``cdf[row_b, t_b]`` for the batch. Zero-probability states are never drawn."""
  lo = jnp.zeros(u.shape, jnp.int32)
  hi = jnp.full(u.shape, num_states - 1, jnp.int32)
  for _ in range(max(1, math.ceil(math.log2(num_states))) if num_states > 1 else 0):
    mid = (lo + hi) // 2
    right = cdf_rows_at(mid) <= u
    lo = jnp.where(right, mid + 1, lo)
    hi = jnp.where(right, hi, mid)
  return lo


def sample_states(key: chex.PRNGKey, cascade: Cascade, num_paths: int) -> chex.Array:
  """``[num_paths, n]`` int32 state paths drawn from the cascade's Markov chain."""
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  return _sample_states(key, cascade, validation.check_positive_int("num_paths", num_paths))


@functools.partial(jax.jit, static_argnums=(2,))
def _sample_states(key, cascade: Cascade, num_paths: int):
  n, k = cascade.values.shape
  keys = jax.random.split(key, n)
  init_cdf = _cdf(cascade.init)
  first = _inverse_cdf(lambda t: init_cdf[t], jax.random.uniform(keys[0], (num_paths,)), k)
  trans_cdf = _cdf(cascade.trans)

  def forward(prev, stage):
    cdf, stage_key = stage
    nxt = _inverse_cdf(lambda t: cdf[prev, t], jax.random.uniform(stage_key, (num_paths,)), k)
    return nxt, nxt

  _, rest = jax.lax.scan(forward, first, (trans_cdf, keys[1:]))
  return jnp.concatenate([first[None], rest], axis=0).T.astype(jnp.int32)


# ---------------------------------------------------------------- replay
def check_key(key: Any, name: str = "key"):
  """A PRNG key (typed, or raw ``[2]`` uint32 data); ``ValueError`` naming ``name`` otherwise."""
  if not validation.is_concrete(key):
    return key
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"{name}: expected one PRNG key, got a key array of shape {key.shape}")
    return key
  arr = validation.as_numpy(name, key, kind="int")
  if arr.shape != (2,) or arr.dtype.kind == "b":
    raise ValueError(f"{name}: expected a PRNG key (jax.random.PRNGKey: shape (2,) uint32), got "
                     f"dtype {arr.dtype} shape {arr.shape}")
  validation.check_int_range(name, arr, 0, 2**32)
  return jnp.asarray(arr, jnp.uint32)


def _check_num_paths(num_paths: Any) -> int:
  num_paths = validation.check_positive_int("num_paths", num_paths)
  if num_paths > validation.INT32_MAX:  # path counters and offsets are int32 on device
    raise ValueError(f"num_paths = {num_paths} exceeds {validation.INT32_MAX}; average several "
                     "calls with different keys")
  return num_paths


def _check_policy_stages(policy, n: int, field: str) -> None:
  if policy.num_stages != n:
    raise ValueError(
        f"{field}: has {n} stages but the policy was built for {policy.num_stages} stages")


def _check_states(states: Any, policy) -> np.ndarray:
  """``[N, n]`` int states, each a valid row of the policy's tables.

  JAX clamps out-of-range gathers instead of failing, so a state outside
  ``0..K-1`` would silently read another state's threshold: refuse it here.
  """
  states = validation.as_numpy("states", states, ndim=2, kind="int")
  k = policy.num_states
  if k is None:
    validation.check_int32("states", states)
  else:
    validation.check_int_range("states", states, 0, k)
  return states


def _check_policy_states(policy, k: int, field: str) -> None:
  pk = policy.num_states
  if pk is not None and pk != k:
    raise ValueError(f"{field}: has {k} states but the policy's tables have {pk}")


def _check_replay_arrays(policy, states, losses, costs, scores, preds) -> None:
  """The request arrays of a replay (skipped when traced: the caller is inside ``jit``)."""
  arrays = dict(states=states, losses=losses, costs=costs, scores=scores, preds=preds)
  if all(validation.is_concrete(a) for a in arrays.values() if a is not None):
    states_np = _check_states(states, policy)
    num, n = states_np.shape
    if num < 1:
      raise ValueError("states: no requests (N = 0)")
    _check_policy_stages(policy, n, "states")
    losses_np = validation.as_numpy("losses", losses, ndim=2)
    validation.check_shape("losses", losses_np, (num, n))
    validation.check_finite("losses", losses_np)
    validation.to_float("losses", losses_np, default_float())  # float32 overflow -> inf
    costs_np = validation.as_numpy("costs", costs)
    if costs_np.shape not in ((n,), (num, n)):
      raise ValueError(f"costs: expected shape ({n},) or ({num}, {n}), got {costs_np.shape}")
    validation.check_nonnegative("costs", costs_np)
    validation.to_float("costs", costs_np, default_float())
    if scores is not None:  # a NaN score never crosses a threshold: refuse it
      scores_np = validation.as_numpy("scores", scores, ndim=2)
      validation.check_shape("scores", scores_np, (num, n))
      validation.check_finite("scores", scores_np)
      validation.to_float("scores", scores_np, default_float())
    if preds is not None:
      preds_np = validation.as_numpy("preds", preds, ndim=2, kind="int")
      validation.check_shape("preds", preds_np, (num, n))
      validation.check_int32("preds", preds_np)


def replay(policy: LinePolicy, states: Any, losses: Any, costs: Any, *, scores: Any = None,
           preds: Any = None) -> ReplayResult:
  """Runs ``policy`` on ``N`` requests whose every stage was observed.

  Args:
    policy: a :class:`~ttamer_jax.core.LinePolicy` (one policy, not a grid).
    states: ``[N, n]`` int discretised state of every request at every stage.
    losses: ``[N, n]`` true loss of answering request ``r`` with stage ``i``.
    costs: ``[n]`` or ``[N, n]`` cost of consulting each stage.
    scores: optional ``[N, n]`` float raw exit scores (for heuristics).
    preds: optional ``[N, n]`` int exit predictions (for heuristics).

  Returns:
    A :class:`ReplayResult`: ``stop_stage [N]``, ``answer_stage [N]``, ``loss [N]``,
    ``cost [N]``.
  """
  check_line_policy(policy)
  check_single_policy(policy)
  _check_replay_arrays(policy, states, losses, costs, scores, preds)
  return replay_trusted(policy, states, losses, costs, scores, preds)


def _pads_freely(policy) -> bool:
  """Extra (copied) requests change nothing for this policy: no per-request data
  (the hindsight oracle's stops) and no batch-shaped randomness (a mixture's coins)."""
  return policy.observes != "true_losses" and not isinstance(policy, MixturePolicy)


def _pad_rows(x, size: int):
  x = jnp.asarray(x)
  extra = size - x.shape[0]
  return x if extra == 0 else jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])])


def _pad_requests(arrays: tuple, size: int) -> tuple:
  """``[N, ...]`` arrays padded to ``size`` rows with copies of the first request: in
  NumPy when they are host arrays (no compilation), else in one compiled program
  (one compilation per ``(N, size)``, not one per array and operation)."""
  if all(isinstance(x, np.ndarray) for x in arrays):
    return tuple(np.concatenate([x, np.repeat(x[:1], size - x.shape[0], axis=0)])
                 for x in arrays)
  return _pad_requests_compiled(tuple(jnp.asarray(x) for x in arrays), size)


@functools.partial(jax.jit, static_argnums=(1,))
def _pad_requests_compiled(arrays, size):
  return tuple(_pad_rows(x, size) for x in arrays)


@functools.partial(jax.jit, static_argnums=(1,))
def _cut_requests(result, num):
  return jax.tree_util.tree_map(lambda a: a[:num], result)


def replay_trusted(policy: LinePolicy, states, losses, costs, scores=None, preds=None
                  ) -> ReplayResult:
  """Internal: :func:`replay` of trusted inputs (validated by the caller, e.g.
  :class:`~ttamer_jax.ExitTraces`); what evaluation calls after its own checks.

  Float inputs keep their dtype; the best-so-far carry takes the wider of the
  losses' and the policy's estimate dtype. The requests are padded to
  :func:`bucket_size` (copies of the first; cut off again), so a new batch size
  rarely compiles the replay anew.
  """
  num, n = np.shape(states)
  as_array = lambda x, dtype=None: (np.asarray(x, dtype) if isinstance(x, np.ndarray)
                                    else jnp.asarray(x, dtype))
  losses = as_array(losses)
  scores = np.zeros((num, n), losses.dtype) if scores is None else as_array(scores)
  preds = np.zeros((num, n), np.int32) if preds is None else as_array(preds, jnp.int32)
  states, costs = as_array(states, jnp.int32), as_array(costs)
  size = bucket_size(num) if _pads_freely(policy) else num
  if size != num:
    per_request = (states, losses, scores, preds) + ((costs,) if np.ndim(costs) == 2 else ())
    padded = _pad_requests(per_request, size)
    states, losses, scores, preds = padded[:4]
    costs = padded[4] if len(padded) == 5 else costs
  res = replay_compiled(policy, states, losses, costs, scores, preds)
  if size == num:
    return res
  if all(isinstance(x, np.ndarray) for x in (states, losses, scores, preds)):
    # Host input: cut on the host too (a compiled cut is one program per (N, bucket)).
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:num], res)
  return _cut_requests(res, num)


@jax.jit
def replay_compiled(policy, states, losses, costs, scores, preds) -> ReplayResult:
  """Internal: the compiled replay loop (trusted ``[N, n]`` inputs; vmappable over
  policies). :func:`replay` and :func:`replay_trusted` pad the requests to a bucket
  before calling it, so a new batch size rarely compiles it anew."""
  num, n = states.shape
  obs_by_stage = StageObservation(state=states.T, score=scores.T, pred=preds.T)

  def forward(carry, stage_and_obs):
    policy_carry, active, best, best_stage, stop_stage = carry
    stage, obs = stage_and_obs
    if policy.recall:
      est = policy.estimate(stage, obs).astype(dtype)
      better = active & ((stage == 0) | (est < best))  # ties keep the earlier stage
      best = jnp.where(better, est, best)
      best_stage = jnp.where(better, stage, best_stage)
    policy_carry, stop = policy.step(policy_carry, stage, obs, best)
    stop = active & (stop | (stage == n - 1))
    stop_stage = jnp.where(stop, stage, stop_stage)
    return (policy_carry, active & ~stop, best, best_stage, stop_stage), None

  # The best-so-far carry holds the policy's estimates: its dtype must not
  # change along the scan (float64 estimates vs float32 losses under x64).
  first_obs = jax.tree_util.tree_map(lambda x: x[0], obs_by_stage)
  dtype = jnp.result_type(losses.dtype, policy.estimate(0, first_obs).dtype)
  init = (policy.initial_carry(num), jnp.ones(num, bool), jnp.full(num, jnp.inf, dtype),
          jnp.zeros(num, jnp.int32), jnp.zeros(num, jnp.int32))
  (_, _, _, best_stage, stop_stage), _ = jax.lax.scan(
      forward, init, (jnp.arange(n, dtype=jnp.int32), obs_by_stage))
  answer = best_stage if policy.recall else stop_stage
  rows = jnp.arange(num)
  cum_costs = jnp.cumsum(jnp.broadcast_to(costs, (num, n)), axis=1)
  return ReplayResult(stop_stage=stop_stage, answer_stage=answer,
                      loss=losses[rows, answer], cost=cum_costs[rows, stop_stage])


@pytree_dataclass
class ReplayTotals:
  """Summed outcomes of a grid of ``P`` policies replayed on the same ``N`` requests.

  Attributes:
    loss: ``[P]`` sum of the true losses of the answered stages (float64, NumPy).
    cost: ``[P]`` sum of the costs of the consulted stages.
    stop_counts: ``[P, n]`` requests whose last consulted stage is ``i``.
    answer_counts: ``[P, n]`` requests answered by stage ``i``.
    recalled_counts: ``[P, n]`` requests answered by stage ``i`` although a later
      stage was consulted (what recall does; zero without recall).
    num: ``[]`` ``N``.
  """

  loss: chex.Array
  cost: chex.Array
  stop_counts: chex.Array
  answer_counts: chex.Array
  recalled_counts: chex.Array
  num: chex.Array


# Requests per replay block of a policy grid: blocks of 2^17 / P requests keep the
# [P, block] carries in a core's L2 cache. 2-core EPYC, P = 256, N = 10^6 x 8 stages:
# 2^17 -> 3.1-3.4e8 stage-steps/s (recall lam grid), 1.9e9 (thresholds); 2^15 ->
# 2.0-2.3e8, 1.2e9; 2^19 -> 2.4e8.
GRID_BLOCK_ELEMENTS = 1 << 17
# ... and at most this many: a block's sums are float32 (the host adds the blocks in
# float64), so short blocks keep them accurate for small grids.
GRID_BLOCK_MAX_REQUESTS = 1 << 13


def replay_totals(policies: LinePolicy, states: Any, losses: Any, costs: Any, *,
                  scores: Any = None, preds: Any = None, policy_axes: Any = 0) -> ReplayTotals:
  """Every policy of a grid replayed on the same ``N`` requests, summed.

  What sweeps, tuning and validated fitting need from a replay -- mean loss, mean
  cost and stop/answer histograms per policy -- without ``[P, N]`` outcome arrays:
  requests run in blocks of about ``GRID_BLOCK_ELEMENTS / P``, so memory is
  ``O(P x block)`` for any ``N`` and the carries stay in cache.

  Args:
    policies: a :class:`~ttamer_jax.core.LinePolicy` whose leaves named by ``policy_axes``
      carry a leading grid axis ``P`` (e.g. a heuristic grid from
      :func:`~ttamer_jax.evaluation.confidence_grid`, or recall policies of many ``lam``).
    states, losses, costs, scores, preds: as for :func:`replay`.
    policy_axes: a ``jax.vmap`` ``in_axes`` prefix of ``policies``: ``0`` (every leaf
      batched) or :meth:`RecallPolicy.lam_grid_axes` for a ``lam`` grid that shares one
      values table (its best-so-far is then computed once per block).

  Runs on the host (it adds the blocks in float64); inside ``jit``, ``jax.vmap``
  :func:`replay` over the policies.
  """
  validation.refuse_traced("replay_totals", "inside jit, jax.vmap ttamer_jax.replay over the "
                           "policies (docs/jit.md)", policies=policies, states=states,
                           losses=losses, costs=costs, scores=scores, preds=preds)
  check_line_policy(policies, "policies")
  if not _pads_freely(policies):
    raise ValueError(f"policies: a {type(policies).__name__} is replayed one at a time "
                     "(ttamer_jax.replay): its outcome depends on the batch of requests")
  sizes = _grid_sizes(policies, policy_axes)
  if len(set(sizes)) > 1:
    raise ValueError(f"policies: the batched leaves have different grid sizes {sorted(set(sizes))}")
  _check_replay_arrays(policies, states, losses, costs, scores, preds)
  return replay_totals_trusted(policies, states, losses, costs, scores, preds,
                              policy_axes=policy_axes)


def _grid_sizes(policies, policy_axes) -> list[int]:
  """Lengths of the grid axes named by ``policy_axes`` (a vmap ``in_axes`` prefix)."""
  sizes = []
  try:
    jax.tree_util.tree_map(
        lambda ax, sub: ax is None or sizes.extend(
            np.shape(x)[ax] for x in jax.tree_util.tree_leaves(sub)),
        policy_axes, policies, is_leaf=lambda x: x is None)
  except (ValueError, IndexError, TypeError) as e:
    raise ValueError(f"policy_axes: {policy_axes!r} is not an in_axes prefix of the policies "
                     f"({e})") from None
  return sizes


def replay_totals_trusted(policies, states, losses, costs, scores=None, preds=None, *,
                         policy_axes=0) -> ReplayTotals:
  """Internal: :func:`replay_totals` of trusted inputs (validated by the caller)."""
  num, n = np.shape(states)
  block, num_blocks = grid_block(num, max(_grid_sizes(policies, policy_axes) + [1]))
  size = block * num_blocks
  host = all(isinstance(x, np.ndarray) or x is None for x in (states, losses, costs, scores, preds))
  xp = np if host else jnp
  losses = xp.asarray(losses)
  scores = xp.zeros((num, n), losses.dtype) if scores is None else xp.asarray(scores)
  preds = xp.zeros((num, n), np.int32) if preds is None else xp.asarray(preds, np.int32)
  costs = xp.broadcast_to(xp.asarray(costs), (num, n))
  cols = (xp.asarray(states, np.int32), losses, costs, scores, preds)
  cols = _pad_requests(cols, size) if size != num else cols
  # Padded requests weigh nothing in the sums.
  weights = np.concatenate([np.ones(num, losses.dtype), np.zeros(size - num, losses.dtype)])
  sums = _replay_totals(policies, *cols, weights, static_axes(policy_axes), block)
  # Blocks summed on the host in float64: counts stay exact beyond 2**24 requests.
  loss, cost, stops, answers, recalled = (np.asarray(x, np.float64).sum(0) for x in sums)
  return ReplayTotals(loss=loss, cost=cost, stop_counts=stops, answer_counts=answers,
                      recalled_counts=recalled, num=np.float64(num))


def grid_block(num: int, grid_size: int) -> tuple[int, int]:
  """Requests per block and number of blocks for ``num`` requests x ``grid_size``
  policies: blocks of ``~GRID_BLOCK_ELEMENTS / grid_size`` requests, both numbers
  bucketed so that a new ``num`` rarely compiles anew."""
  block = int(max(64, min(bucket_size(num), GRID_BLOCK_ELEMENTS // grid_size,
                          GRID_BLOCK_MAX_REQUESTS)))
  return block, bucket_size(-(-num // block), minimum=1)


def static_axes(policy_axes: Any) -> tuple[Any, tuple]:
  """``policy_axes`` as a static jit argument that hashes by value: ``(treedef, leaves)``.

  An axes pytree such as :meth:`RecallPolicy.lam_grid_axes` hashes by identity, so as
  a static argument each new one would compile the grid replay anew; ``fit_policy``
  builds one per candidate and fold, and its compilations would dominate its time."""
  leaves, treedef = jax.tree_util.tree_flatten(policy_axes)
  return treedef, tuple(leaves)


@functools.partial(jax.jit, static_argnums=(7, 8))
def _replay_totals(policies, states, losses, costs, scores, preds, weights, axes, block):
  policy_axes = jax.tree_util.tree_unflatten(axes[0], axes[1])
  blocks = [x.reshape((-1, block) + x.shape[1:]) for x in (states, losses, costs, scores, preds,
                                                           weights)]

  def one_block(args):
    st, lo, co, sc, pr, w = args
    return jax.vmap(lambda pol: _block_totals(pol, st, lo, co, sc, pr, w),
                    in_axes=(policy_axes,))(policies)

  return jax.lax.map(one_block, blocks)   # each [blocks, P, ...]


def _block_totals(policy, states, losses, costs, scores, preds, weights):
  """One policy on one block of requests: sums accumulated stage by stage.

  The best-so-far is not frozen after a request stops (stopped requests no longer
  count), so for policies that share their estimates (a ``lam`` grid of one model)
  it does not depend on the policy and ``vmap`` computes it once per block.
  """
  num, n = states.shape
  obs_by_stage = StageObservation(state=states.T, score=scores.T, pred=preds.T)
  first_obs = jax.tree_util.tree_map(lambda x: x[0], obs_by_stage)
  dtype = jnp.result_type(losses.dtype, policy.estimate(0, first_obs).dtype)
  acc = weights.dtype

  def forward(carry, xs):
    policy_carry, active, best, best_stage, best_loss = carry
    stage, obs, loss_i, cum_i = xs
    if policy.recall:
      est = policy.estimate(stage, obs).astype(dtype)
      better = (stage == 0) | (est < best)  # ties keep the earlier stage
      best = jnp.where(better, est, best)
      best_stage = jnp.where(better, stage, best_stage)
      best_loss = jnp.where(better, loss_i, best_loss)
      answer_stage, answer_loss = best_stage, best_loss
    else:
      answer_stage, answer_loss = jnp.full(num, stage), loss_i
    policy_carry, stop = policy.step(policy_carry, stage, obs, best)
    stop = active & (stop | (stage == n - 1))
    w = jnp.where(stop, weights, 0)
    answered = jax.nn.one_hot(answer_stage, n, dtype=acc)
    sums = (jnp.dot(w, answer_loss.astype(acc)), jnp.dot(w, cum_i.astype(acc)), w.sum(),
            jnp.dot(w, answered), jnp.dot(jnp.where(answer_stage < stage, w, 0), answered))
    return (policy_carry, active & ~stop, best, best_stage, best_loss), sums

  init = (policy.initial_carry(num), jnp.ones(num, bool), jnp.full(num, jnp.inf, dtype),
          jnp.zeros(num, jnp.int32), jnp.zeros(num, losses.dtype))
  xs = (jnp.arange(n, dtype=jnp.int32), obs_by_stage, losses.T, jnp.cumsum(costs, axis=1).T)
  _, (loss, cost, stops, answers, recalled) = jax.lax.scan(forward, init, xs)
  return loss.sum(), cost.sum(), stops, answers.sum(0), recalled.sum(0)


def replay_cascade(policy, cascade: Cascade, states: Any) -> ReplayResult:
  """Replays ``policy`` on ``states`` scoring with the cascade's own losses and costs."""
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  if validation.is_concrete(states):
    states_np = validation.as_numpy("states", states, ndim=2, kind="int")
    if states_np.shape[1] != cascade.num_stages:
      raise ValueError(f"states: has {states_np.shape[1]} stages but the cascade has "
                       f"{cascade.num_stages}")
    validation.check_int_range("states", states_np, 0, cascade.num_states)
    check_line_policy(policy)
    _check_policy_states(policy, cascade.num_states, "cascade")
  states = jnp.asarray(states, jnp.int32)
  losses = cascade.values[jnp.arange(cascade.num_stages)[None, :], states]
  return replay(policy, states, losses, cascade.costs)


# ----------------------------------------------------------- Monte-Carlo
@pytree_dataclass
class MonteCarloEstimate:
  """Monte-Carlo statistics of a policy on a cascade.

  Attributes:
    objective: ``[]`` mean of ``lam * loss + (1 - lam) * cost``.
    objective_se: ``[]`` its standard error.
    loss: ``[]`` mean loss of the answered stage.
    cost: ``[]`` mean cost.
    stop_histogram: ``[n]`` fraction of paths stopping after each stage.
    answer_histogram: ``[n]`` fraction of paths answered by each stage.
    num_paths: ``[]`` number of sampled paths.
  """

  objective: chex.Array
  objective_se: chex.Array
  loss: chex.Array
  cost: chex.Array
  stop_histogram: chex.Array
  answer_histogram: chex.Array
  num_paths: chex.Array


def monte_carlo(key: chex.PRNGKey, cascade: Cascade, policy, lam, num_paths: int, *,
                chunk_size: int = 1 << 16) -> MonteCarloEstimate:
  """Samples ``num_paths`` state paths and evaluates ``policy`` on them.

  Paths are processed ``chunk_size`` at a time (``lax.map``), so memory stays
  ``O(chunk_size * n)`` for any ``num_paths``. Sums are accumulated in float32
  per chunk and combined in the result dtype.

  Args:
    key: PRNG key of the sampled paths.
    cascade: the line the paths are drawn from, ``n`` stages of ``K`` states.
    policy: a :class:`~ttamer_jax.core.LinePolicy` over the cascade's states.
    lam: ``[]`` trade-off weight of the reported objective.
    num_paths: sampled paths (static).
    chunk_size: paths per chunk (static).

  Returns:
    A :class:`~ttamer_jax.core.MonteCarloEstimate`: ``objective []`` and its
    standard error, mean ``loss []`` and ``cost []``, ``stop_histogram [n]``,
    ``answer_histogram [n]``, ``num_paths []``.
  """
  validation.check_scalar_lam(lam)
  num_paths = _check_num_paths(num_paths)
  chunk_size = validation.check_positive_int("chunk_size", chunk_size)
  key = check_key(key)
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  check_line_policy(policy)
  _check_policy_stages(policy, cascade.num_stages, "cascade")
  _check_policy_states(policy, cascade.num_states, "cascade")
  chunk = min(chunk_size, num_paths)
  return _monte_carlo(key, cascade, policy, lam, num_paths, chunk)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _monte_carlo(key, cascade, policy, lam, num_paths, chunk):
  n = cascade.num_stages
  num_chunks = -(-num_paths // chunk)
  stages = jnp.arange(n)

  def one_chunk(args):
    chunk_key, offset = args
    states = _sample_states(chunk_key, cascade, chunk)
    losses = cascade.values[stages[None, :], states]
    res = replay_compiled(policy, states, losses, cascade.costs,
                  jnp.zeros(states.shape, losses.dtype), jnp.zeros(states.shape, jnp.int32))
    mask = (offset + jnp.arange(chunk)) < num_paths
    obj = jnp.where(mask, res.objective(lam), 0.0)
    hist = lambda s: jnp.sum(jax.nn.one_hot(s, n) * mask[:, None], axis=0)
    return (jnp.sum(obj), jnp.sum(obj * obj), jnp.sum(jnp.where(mask, res.loss, 0.0)),
            jnp.sum(jnp.where(mask, res.cost, 0.0)), hist(res.stop_stage), hist(res.answer_stage))

  keys = jax.random.split(key, num_chunks)
  offsets = jnp.arange(num_chunks) * chunk
  sums = jax.lax.map(one_chunk, (keys, offsets))
  s1, s2, sl, sc, hs, ha = (jnp.sum(x, axis=0) for x in sums)
  mean = s1 / num_paths
  var = jnp.maximum(s2 / num_paths - mean * mean, 0.0) * num_paths / max(num_paths - 1, 1)
  return MonteCarloEstimate(
      objective=mean, objective_se=jnp.sqrt(var / num_paths), loss=sl / num_paths,
      cost=sc / num_paths, stop_histogram=hs / num_paths, answer_histogram=ha / num_paths,
      num_paths=jnp.asarray(num_paths))


# ----------------------------------------------------------------- graphs
def _walk_graph(policy: GraphPolicy, graph: RoutingGraph, first_state, next_state, true_loss):
  """Follows ``policy`` from the root for a batch; ``first_state(node)`` and
  ``next_state(step, edge, node, prev_state)`` supply states; ``true_loss(node,
  state)`` scores answers. Returns ReplayResult with node ids as stages."""
  num_nodes = graph.num_nodes
  entry_nodes = jnp.asarray(graph.entry_nodes, jnp.int32)
  entry_node = entry_nodes[policy.entry]
  state = first_state(entry_node)
  batch = state.shape[0]
  node = jnp.full((batch,), entry_node, jnp.int32)
  lookup = jnp.asarray(graph.edge_lookup())
  best = graph.values[node, state]
  carry = dict(node=node, state=state, best=best, best_node=node,
               best_loss=true_loss(node, state), cost=graph.entry_costs[policy.entry] + jnp.zeros(batch),
               active=jnp.ones(batch, bool), stop_node=node)
  for step in range(num_nodes):
    stop, nxt = policy.decide(carry["node"], carry["state"], carry["best"])
    stop = carry["active"] & stop
    carry["stop_node"] = jnp.where(stop, carry["node"], carry["stop_node"])
    moving = carry["active"] & ~stop
    edge = lookup[carry["node"], jnp.maximum(nxt, 0)]
    t = next_state(step, jnp.maximum(edge, 0), nxt, carry["state"])
    loss = graph.values[nxt, t]
    better = moving & (loss < carry["best"])
    carry.update(
        active=moving,
        cost=carry["cost"] + jnp.where(moving, graph.edge_costs[jnp.maximum(edge, 0)], 0.0),
        best_node=jnp.where(better, nxt, carry["best_node"]),
        best_loss=jnp.where(better, true_loss(nxt, t), carry["best_loss"]),
        best=jnp.where(better, loss, carry["best"]),
        node=jnp.where(moving, nxt, carry["node"]),
        state=jnp.where(moving, t, carry["state"]))
  return ReplayResult(stop_stage=carry["stop_node"], answer_stage=carry["best_node"],
                      loss=carry["best_loss"], cost=carry["cost"])


def simulate_graph(key: chex.PRNGKey, graph: RoutingGraph, policy: GraphPolicy,
                   num_paths: int) -> ReplayResult:
  """Samples ``num_paths`` requests routed by ``policy`` (states drawn along the way)."""
  num_paths = _check_num_paths(num_paths)
  key = check_key(key)
  _check_graph_policy(policy, graph)
  return _simulate_graph(key, graph, policy, num_paths)


def _check_graph_policy(policy: GraphPolicy, graph: RoutingGraph) -> None:
  if not isinstance(graph, RoutingGraph):
    raise ValueError(f"graph: expected a RoutingGraph, got {type(graph).__name__}")
  if not isinstance(policy, GraphPolicy):
    raise ValueError(f"policy: expected a GraphPolicy, got {type(policy).__name__}")
  if policy.num_nodes != graph.num_nodes:
    raise ValueError(f"graph: has {graph.num_nodes} nodes but the policy has {policy.num_nodes}")
  if policy.index.shape[-1] != graph.num_states:
    raise ValueError(f"graph: has {graph.num_states} states but the policy has "
                     f"{policy.index.shape[-1]}")


@functools.partial(jax.jit, static_argnums=(3,))
def _simulate_graph(key, graph, policy, num_paths):
  k = graph.num_states
  keys = jax.random.split(key, graph.num_nodes + 1)
  entry_cdf = _cdf(graph.entry_init[policy.entry])
  edge_cdf = _cdf(graph.edge_trans)

  def first_state(node):
    u = jax.random.uniform(keys[0], (num_paths,))
    return _inverse_cdf(lambda t: entry_cdf[t], u, k)

  def next_state(step, edge, node, prev):
    u = jax.random.uniform(keys[step + 1], (num_paths,))
    return _inverse_cdf(lambda t: edge_cdf[edge, prev, t], u, k)

  return _walk_graph(policy, graph, first_state, next_state, lambda node, s: graph.values[node, s])


def replay_graph(policy: GraphPolicy, graph: RoutingGraph, states: Any, losses: Any = None) -> ReplayResult:
  """Replays ``policy`` on traces that observed every node: ``states [N, num_nodes]``
  and optional true ``losses [N, num_nodes]`` (default: the graph's values)."""
  _check_graph_policy(policy, graph)
  states_np = validation.as_numpy("states", states, ndim=2, kind="int")
  validation.check_shape("states", states_np, (states_np.shape[0], graph.num_nodes))
  if states_np.shape[0] < 1:
    raise ValueError("states: no requests (N = 0)")
  validation.check_int_range("states", states_np, 0, graph.num_states)
  states = jnp.asarray(states_np, jnp.int32)
  if losses is None:
    losses = graph.values[jnp.arange(graph.num_nodes)[None, :], states]
  else:
    losses_np = validation.as_numpy("losses", losses, ndim=2)
    validation.check_shape("losses", losses_np, states_np.shape)
    validation.check_finite("losses", losses_np)
    validation.to_float("losses", losses_np, default_float())
  return _replay_graph(policy, graph, states, jnp.asarray(losses))


@jax.jit
def _replay_graph(policy, graph, states, losses):
  rows = jnp.arange(states.shape[0])
  return _walk_graph(policy, graph,
                     lambda node: states[:, node],
                     lambda step, edge, node, prev: states[rows, node],
                     lambda node, s: losses[rows, node])
