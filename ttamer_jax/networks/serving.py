"""Policy-guided batched early-exit inference (DESIGN.md section 8).

:func:`serve` runs a network block by block on a batch. After each stage every
request's exit signal is discretised and the deployed policy decides, per
request, whether to stop; only the requests that continue are forwarded to the
next block. They are compacted into the smallest of a few **bucket** batch sizes
(padded with copies of a live row), so each stage's kernel is compiled once per
bucket, never per batch composition. A request is answered from its recalled
exit (the consulted stage of least policy estimate) under a recall policy, else
from the last consulted stage.

Design notes:
  * One jitted kernel per (stage, bucket) computes the block, the head, the
    signal, the observation and the policy step; one jitted gather per
    (stage, bucket in, bucket out) compacts the survivors on device. Only the
    ``[4, bucket]`` int32 decision (stop, answered stage, answer, state) crosses to the
    host, which must know how many requests continue to pick the next bucket.
  * :func:`compile_count` counts kernel traces (one per compilation), so tests
    can assert that nothing recompiles after :func:`warmup`.
  * :func:`serve_reference` is an unbatched, uncompacted, stage-by-stage
    implementation of the same protocol for testing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.data.discretise import DeployedPolicy, Discretiser
from ttamer_jax.networks.nn import EarlyExitNet, StaticGraph
from ttamer_jax.networks.profiling import check_signal_name, exit_signal
from ttamer_jax.core.protocol import check_line_policy, check_single_policy
from ttamer_jax.networks.training import check_labels

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)

# Kernel traces by kind. A jitted function is traced exactly when it is compiled
# (a cache miss), so these count compilations. Diagnostic state only.
_TRACES: collections.Counter = collections.Counter()


def compile_count() -> int:
  """Total number of serving kernels compiled so far in this process."""
  return sum(_TRACES.values())


@dataclasses.dataclass(frozen=True)
class ServeResult:
  """Outcome of serving ``B`` requests through ``n`` stages.

  Attributes:
    predictions: ``[B]`` int32 answer of each request.
    answered_exit: ``[B]`` int32 exit whose prediction was returned.
    stop_stage: ``[B]`` int32 last consulted stage.
    consulted: ``[B, n]`` bool, stage ``i`` was run for the request (a prefix).
    states: ``[B, n]`` int32 discretised state the policy saw at each consulted
      stage, ``-1`` where the stage was not run (what a drift monitor consumes:
      :class:`ttamer_jax.DriftMonitor`).
  """

  predictions: np.ndarray
  answered_exit: np.ndarray
  stop_stage: np.ndarray
  consulted: np.ndarray
  states: np.ndarray | None = None

  @property
  def num_consulted(self) -> np.ndarray:
    """``[B]`` number of stages run per request."""
    return self.consulted.sum(axis=1)


# ------------------------------------------------------------ validation
def check_deployed(model: EarlyExitNet, deployed: Any) -> None:
  """Raises ``ValueError`` unless ``deployed`` can serve ``model``."""
  if not isinstance(model, EarlyExitNet):
    raise ValueError(f"model: expected an EarlyExitNet (ttamer_jax.networks.nn), got {type(model).__name__}")
  if not isinstance(deployed, DeployedPolicy):
    raise ValueError(f"policy: expected a DeployedPolicy (policy + discretiser + score name), "
                     f"got {type(deployed).__name__}")
  check_line_policy(deployed.policy)
  check_single_policy(deployed.policy)
  if not isinstance(deployed.discretiser, Discretiser):
    raise ValueError(f"discretiser: expected a Discretiser, got {type(deployed.discretiser).__name__}")
  if deployed.answers is not None:
    raise ValueError("policy: its stages are posterior-answer stages (an answer model); "
                     "Server does not serve those yet: replay it with ttamer_jax.evaluate, or "
                     "choose among exit-state candidates (fit_policy(..., candidates=...))")
  if deployed.policy.observes == "true_losses":
    raise ValueError(f"policy: {type(deployed.policy).__name__} reads the true losses (an oracle "
                     "for offline evaluation); it cannot serve")
  n = model.num_stages
  if deployed.policy.num_stages != n:
    raise ValueError(f"policy: built for {deployed.policy.num_stages} stages but the network "
                     f"has {n} exits")
  if deployed.discretiser.num_stages != n:
    raise ValueError(f"discretiser: has edges for {deployed.discretiser.num_stages} stages but "
                     f"the network has {n} exits")
  k = deployed.policy.num_states
  if k is not None and k != deployed.discretiser.num_states:
    raise ValueError(f"policy: has {k} states per stage but the discretiser produces "
                     f"{deployed.discretiser.num_states}")
  check_signal_name(model, deployed.score_name, servable=True)
  for leaf in jax.tree_util.tree_leaves(deployed):
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool)):
      raise ValueError(f"policy: must be a pytree of arrays (e.g. a pytree_dataclass); found a "
                       f"leaf of type {type(leaf).__name__}")


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  try:
    out = tuple(validation.check_positive_int("buckets[]", b) for b in buckets)
  except TypeError:
    raise ValueError(f"buckets: expected a sequence of positive ints, got {buckets!r}") from None
  if not out:
    raise ValueError("buckets: empty (need at least one batch size)")
  if list(out) != sorted(set(out)):
    raise ValueError(f"buckets: must be strictly increasing, got {out}")
  return out


def _bucket(buckets: tuple[int, ...], size: int) -> int:
  return next(b for b in buckets if b >= size)


# ---------------------------------------------------------------- kernels
@functools.partial(jax.jit, static_argnames=("graph", "stage", "num_stages"))
def _stage_kernel(graph, state, deployed: DeployedPolicy, live, *, stage: int,
                  num_stages: int):
  """One stage on one bucket: ``live`` is the raw input at stage 0, else the request state.

  Request state: ``(h, policy_carry, best, best_stage, best_pred, prev_pred, top_score,
  top_pred)`` (``top_*``: the most confident exit so far, for the ``agree_best`` feature).
  Returns the new request state and the ``[4, b]`` int32 decision
  ``(stop, answered stage, answer, observed state)``.
  """
  _TRACES["stage"] += 1
  model = nnx.merge(graph.graphdef, state)
  policy = deployed.policy
  if stage == 0:
    h = live
    b = h.shape[0]
    carry = policy.initial_carry(b)
    best = jnp.full((b,), jnp.inf, jnp.float32)  # Replaced by the estimate under recall.
    best_stage = jnp.zeros((b,), jnp.int32)
    best_pred = jnp.zeros((b,), jnp.int32)
    prev_pred = jnp.zeros((b,), jnp.int32)
    top_score = jnp.full((b,), -jnp.inf, jnp.float32)
    top_pred = jnp.zeros((b,), jnp.int32)
  else:
    h, carry, best, best_stage, best_pred, prev_pred, top_score, top_pred = live
  h, logits, err = model.stage(stage, h)
  score = exit_signal(deployed.score_name, logits, err)
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  obs = deployed.observe(stage, score, pred, prev_pred, top_pred)
  higher = score > top_score  # ties keep the earlier exit, as Discretiser.reference_preds
  top_score, top_pred = jnp.where(higher, score, top_score), jnp.where(higher, pred, top_pred)
  if policy.recall:
    est = policy.estimate(stage, obs)
    if stage == 0:
      best, best_stage, best_pred = est, jnp.zeros_like(pred), pred
    else:  # Ties keep the earlier stage, as in simulation.replay.
      better = est < best
      best = jnp.where(better, est, best)
      best_stage = jnp.where(better, stage, best_stage)
      best_pred = jnp.where(better, pred, best_pred)
  carry, stop = policy.step(carry, stage, obs, best)
  stop = jnp.logical_or(stop, stage == num_stages - 1)
  answer_stage = best_stage if policy.recall else jnp.full_like(best_stage, stage)
  answer = best_pred if policy.recall else pred
  decision = jnp.stack([stop.astype(jnp.int32), answer_stage, answer, obs.state.astype(jnp.int32)])
  return (h, carry, best, best_stage, best_pred, pred, top_score, top_pred), decision


@jax.jit
def _gather(tree, idx):
  _TRACES["gather"] += 1
  return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _padded(idx: np.ndarray, size: int) -> np.ndarray:
  """``idx`` padded to ``size`` with copies of its first entry (real rows: no NaN risk)."""
  return np.concatenate([idx, np.full(size - idx.size, idx[0], idx.dtype)]).astype(np.int32)


# ---------------------------------------------------------------- serving
class Server:
  """Serves batches with one deployed policy on one network.

  Holds a snapshot of the network's parameters (taken at construction: rebuild
  the server after further training), the validated policy and the buckets.
  ``server(x)`` is :func:`serve`; ``server.warmup()`` is :func:`warmup`.
  """

  def __init__(self, model: EarlyExitNet, deployed: DeployedPolicy, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS):
    check_deployed(model, deployed)
    self.model = model
    self.deployed = deployed
    self.buckets = _check_buckets(buckets)
    self.num_stages = model.num_stages
    graphdef, self._state = nnx.split(model)
    self._graph = StaticGraph(graphdef)

  def _run(self, live, stage):
    return _stage_kernel(self._graph, self._state, self.deployed, live, stage=stage,
                         num_stages=self.num_stages)

  def __call__(self, x: Any) -> ServeResult:
    x = self.model.check_input(x)
    num, n = x.shape[0], self.num_stages
    result = ServeResult(predictions=np.zeros(num, np.int32),
                         answered_exit=np.zeros(num, np.int32),
                         stop_stage=np.zeros(num, np.int32), consulted=np.zeros((num, n), bool),
                         states=np.full((num, n), -1, np.int32))
    for start in range(0, num, self.buckets[-1]):
      self._serve_chunk(x, np.arange(start, min(start + self.buckets[-1], num)), result)
    return result

  def _serve_chunk(self, x, rows, result):
    buckets = self.buckets
    live_rows = rows
    live = jnp.asarray(x[rows][_padded(np.arange(rows.size), _bucket(buckets, rows.size))])
    for stage in range(self.num_stages):
      live, decision = self._run(live, stage)
      decision = np.asarray(decision)[:, :live_rows.size]
      stop = decision[0].astype(bool)
      result.consulted[live_rows, stage] = True
      result.states[live_rows, stage] = decision[3]
      done = live_rows[stop]
      result.stop_stage[done] = stage
      result.answered_exit[done] = decision[1][stop]
      result.predictions[done] = decision[2][stop]
      keep = np.flatnonzero(~stop)
      if keep.size == 0:
        return
      live_rows = live_rows[keep]
      live = _gather(live, jnp.asarray(_padded(keep, _bucket(buckets, keep.size))))

  def warmup(self) -> int:
    """Compiles every kernel a call can need; returns how many this call compiled.

    That is each stage at each bucket size and each compaction from a bucket to
    an equal or smaller one.
    """
    before = compile_count()
    model, buckets = self.model, self.buckets
    dtype = np.int32 if model.input_kind == "int" else np.float32
    trees = {}
    for b in buckets:
      trees[b], _ = self._run(jnp.zeros((b,) + tuple(model.input_shape), dtype), 0)
    for stage in range(1, self.num_stages):
      nxt = {}
      for b_in in buckets:
        for b_out in buckets:
          if b_out > b_in:
            break
          nxt[b_out], _ = self._run(_gather(trees[b_in], jnp.zeros((b_out,), jnp.int32)), stage)
      trees = nxt
    jax.block_until_ready(trees)
    return compile_count() - before


def serve(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, *,
          buckets: Sequence[int] = DEFAULT_BUCKETS) -> ServeResult:
  """Serves ``x`` ``[B, *input_shape]`` with ``deployed`` on ``model``, stage by stage.

  Batches larger than the largest bucket are served in chunks of that size. For
  repeated calls build a :class:`Server` once (this function builds one per call).

  Raises:
    ValueError: a wrong input shape or dtype, a policy or discretiser built for a
      different number of stages, a policy whose state count differs from the
      discretiser's, a score the network cannot serve, or bad buckets.
  """
  return Server(model, deployed, buckets=buckets)(x)


def warmup(model: EarlyExitNet, deployed: DeployedPolicy, *,
           buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """Compiles every kernel :func:`serve` can need; returns how many were compiled."""
  return Server(model, deployed, buckets=buckets).warmup()


def serve_reference(model: EarlyExitNet, deployed: DeployedPolicy, x: Any) -> ServeResult:
  """Unbatched reference of :func:`serve`: each request alone, stage by stage, eagerly.

  It follows the same protocol (signal -> ``deployed.observe`` -> recall bookkeeping
  -> ``policy.step``) with batch size 1, no compaction, padding or jit, and is
  meant for tests (it is slow).
  """
  x = model.check_input(x)
  check_deployed(model, deployed)
  policy, n = deployed.policy, model.num_stages
  num = x.shape[0]
  out = ServeResult(predictions=np.zeros(num, np.int32), answered_exit=np.zeros(num, np.int32),
                    stop_stage=np.zeros(num, np.int32), consulted=np.zeros((num, n), bool),
                    states=np.full((num, n), -1, np.int32))
  for r in range(num):
    h = jnp.asarray(x[r:r + 1])
    carry = policy.initial_carry(1)
    best = jnp.full((1,), jnp.inf, jnp.float32)
    best_stage, best_pred, prev_pred, top_score, top_pred = 0, 0, 0, -np.inf, 0
    for stage in range(n):
      h, logits, err = model.stage(stage, h)
      score = exit_signal(deployed.score_name, logits, err)
      pred = int(np.argmax(np.asarray(logits)[0]))
      obs = deployed.observe(stage, score, jnp.asarray([pred], jnp.int32),
                             jnp.asarray([prev_pred], jnp.int32), jnp.asarray([top_pred], jnp.int32))
      if float(np.asarray(score)[0]) > top_score:
        top_score, top_pred = float(np.asarray(score)[0]), pred
      if policy.recall:
        est = policy.estimate(stage, obs)
        if stage == 0 or bool(np.asarray(est)[0] < np.asarray(best)[0]):
          best, best_stage, best_pred = est, stage, pred
      carry, stop = policy.step(carry, stage, obs, best)
      out.consulted[r, stage] = True
      out.states[r, stage] = int(np.asarray(obs.state)[0])
      if bool(np.asarray(stop)[0]) or stage == n - 1:
        out.stop_stage[r] = stage
        out.answered_exit[r] = best_stage if policy.recall else stage
        out.predictions[r] = best_pred if policy.recall else pred
        break
      prev_pred = pred
  return out


# -------------------------------------------------------------- benchmark
@dataclasses.dataclass(frozen=True)
class ServeBenchmark:
  """Wall time and accuracy of :func:`serve` against the full network on one batch.

  Attributes:
    serve_seconds: median wall time of :func:`serve` on the batch.
    full_seconds: median wall time of the full network (one jitted call, all exits).
    serve_accuracy: accuracy of the served answers.
    full_accuracy: accuracy of the full network's last exit.
    mean_stages: mean number of stages run per request under the policy.
    batch_size: ``B``.
    repeats: timed calls of each.
  """

  serve_seconds: float
  full_seconds: float
  serve_accuracy: float
  full_accuracy: float
  mean_stages: float
  batch_size: int
  repeats: int

  @property
  def speedup(self) -> float:
    return self.full_seconds / self.serve_seconds


@functools.partial(jax.jit, static_argnames=("graph",))
def _last_exit(graph, state, x):
  return jnp.argmax(nnx.merge(graph.graphdef, state)(x).logits[:, -1], axis=-1)


def benchmark(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, y: Any, *,
              buckets: Sequence[int] = DEFAULT_BUCKETS, repeats: int = 5) -> ServeBenchmark:
  """Times serving and the full network on the same batch (both warmed up, medians).

  Serving is timed through a :class:`Server` (steady state: validation and the
  parameter snapshot are done once); the full network is one jitted call on the
  whole batch that returns the last exit's predictions.
  """
  x = model.check_input(x)
  y = check_labels(model, y, x.shape[0])
  repeats = validation.check_positive_int("repeats", repeats)
  server = Server(model, deployed, buckets=buckets)
  graph, state = StaticGraph(nnx.graphdef(model)), nnx.state(model)
  x_dev = jnp.asarray(x)
  full_pred = np.asarray(_last_exit(graph, state, x_dev))
  served = server(x)
  full_t, serve_t = [], []
  for _ in range(repeats):  # Interleaved, so that machine load affects both alike.
    t0 = time.perf_counter()
    jax.block_until_ready(_last_exit(graph, state, x_dev))
    full_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    server(x)
    serve_t.append(time.perf_counter() - t0)
  return ServeBenchmark(serve_seconds=float(np.median(serve_t)),
                        full_seconds=float(np.median(full_t)),
                        serve_accuracy=float((served.predictions == y).mean()),
                        full_accuracy=float((full_pred == y).mean()),
                        mean_stages=float(served.num_consulted.mean()), batch_size=int(x.shape[0]),
                        repeats=repeats)
