"""Policy-guided batched early-exit inference (DESIGN.md section 8).

:func:`serve` runs a network block by block on a batch. After each stage every
request's exit signal is discretised and the deployed policy decides, per
request, whether to stop; only the requests that continue are forwarded to the
next block. They are compacted into the smallest of a few **bucket** batch sizes
(padded with copies of a live row), so each stage's kernel is compiled once per
bucket, never per batch composition. A request is answered from its recalled
exit (the consulted stage of least policy estimate) under a recall policy, else
from the last consulted stage. A posterior-answer policy (``deployed.answers``,
an :class:`~ttamer_jax.AnswerModel`) decides on its virtual stages: after exit
``i`` runs, the calibrators of pairs ``(i, j <= i)`` read the request's scores and
predictions of exits ``0..i`` (kept in its state), and virtual stage ``i``
answers with the exit ``j*`` of least posterior error, exactly as
:meth:`AnswerModel.transform` builds the traces replay sees.

Design notes:
  * One compiled program serves a group of up to 8 chunks of the largest bucket
    stage by stage. Each stage queues the requests still served across the group and
    runs on full chunks of them (a loop) plus one remainder on the smallest bucket
    that holds it (a ``lax.switch``), so later stages run on few, full batches; each
    chunk gathers its requests from the previous stage's outputs (one copy per
    request served). Nothing crosses to the host between stages: one dispatch and
    one ``[n, 5, rows]`` int32 transfer (row, stop, answered stage, answer, state)
    per group. Groups hold as many chunks (a power of two) as keep a stage's request
    state within :data:`GROUP_BYTES` (in cache on a CPU), so a server compiles at
    most four group sizes. (Two other programs -- one per chunk, and one kernel per
    stage with a host round trip -- serve the same answers with more per-stage
    overhead; they are timed by ``benchmarks/serving_programs.py``.)
  * The network parameters and the policy are flattened once, so a call
    dispatches a flat list of arrays (flattening an ``nnx.State`` per call costs
    more than a small stage).
  * Buckets are evenly spaced, so padding wastes little (the saving a policy
    promises is paid for in rows actually computed).
  * :func:`compile_count` counts kernel traces (one per compilation), so tests
    can assert that nothing recompiles after :func:`warmup`.
  * What serving costs per stage, and the wall time of a served batch, are measured
    by :mod:`ttamer_jax.networks.serving_costs`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.core.heuristics import FixedExitPolicy, PatiencePolicy
from ttamer_jax.core.protocol import check_line_policy, check_single_policy
from ttamer_jax.data import answers as answer_models
from ttamer_jax.data.answers import AnswerModel
from ttamer_jax.data.discretise import PRIMARY_SCORE, DeployedPolicy, Discretiser
from ttamer_jax.networks.nn import EarlyExitNet, StaticGraph, StaticOnce
from ttamer_jax.networks.profiling import SERVABLE_SIGNALS, check_signal_name, exit_signal

# Evenly spaced: padding the requests a stage serves to their bucket computes at
# most 32 extra rows per chunk of 512 (6% of the full network's work on the chunk,
# 3% on average), where powers of two waste up to half of a stage's rows.
DEFAULT_BUCKETS = tuple(range(32, 513, 32))
# Chunks served in lockstep (bounds the device memory of one call).
_IN_FLIGHT = 8
# A server queues a stage's requests across a group of up to _IN_FLIGHT
# chunks, as many as keep one stage's request state (every group row) within
# GROUP_BYTES. Measured on a 2-core EPYC (2 MiB L2 per core, benchmarks/
# serving_overhead.py): mnist1d (5 KiB per request) served slower in groups of
# 1024 rows than of 512, and much slower in groups of 4096; sequences (1.7 KiB)
# gains from groups of 2048 (its later stages then run on full chunks).
GROUP_BYTES = 4 << 20
# Signals of the virtual posterior-answer stages (AnswerModel.transform) a policy may read.
VIRTUAL_SIGNALS = (PRIMARY_SCORE, "posterior_confidence", "answer_stage")

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

  @classmethod
  def empty(cls, num: int, num_stages: int) -> "ServeResult":
    """The result buffers a server fills in: zeros, nothing consulted, states ``-1``.

    Args:
      num: ``B`` requests.
      num_stages: ``n`` stages.

    Returns:
      A :class:`ServeResult` of ``[B]`` / ``[B, n]`` arrays.
    """
    return cls(predictions=np.zeros(num, np.int32), answered_exit=np.zeros(num, np.int32),
               stop_stage=np.zeros(num, np.int32), consulted=np.zeros((num, num_stages), bool),
               states=np.full((num, num_stages), -1, np.int32))


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
  if deployed.answers is not None:
    _check_answers(model, deployed)
  elif not _score_unused(deployed):
    check_signal_name(model, deployed.score_name, servable=True)
  for leaf in jax.tree_util.tree_leaves(deployed):
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool)):
      raise ValueError(f"policy: must be a pytree of arrays (e.g. a pytree_dataclass); found a "
                       f"leaf of type {type(leaf).__name__}")


def _check_answers(model: EarlyExitNet, deployed: DeployedPolicy) -> None:
  """A posterior-answer policy: its answer model reads a signal the network serves, was
  fitted on the network's exits, and the policy reads a signal of the virtual stages."""
  answers, n = deployed.answers, model.num_stages
  if not isinstance(answers, AnswerModel):
    raise ValueError(f"answers: expected None or an AnswerModel, got {type(answers).__name__}")
  if answers.num_stages != n:
    raise ValueError(f"answers: fitted on {answers.num_stages} stages but the network has "
                     f"{n} exits")
  if answers.score_name not in SERVABLE_SIGNALS:
    raise ValueError(f"answers: its calibrators read the signal {answers.score_name!r}, which "
                     f"the network cannot compute when serving (servable: {SERVABLE_SIGNALS}; "
                     "fit the answer model with score='max_softmax', say)")
  check_signal_name(model, answers.score_name, servable=True)
  if deployed.score_name not in VIRTUAL_SIGNALS:
    raise ValueError(f"score_name: a posterior-answer policy reads a signal of the virtual "
                     f"stages {VIRTUAL_SIGNALS}, got {deployed.score_name!r}")


def _score_unused(deployed: DeployedPolicy) -> bool:
  """The decisions cannot depend on the score: one state, and a library rule that reads
  predictions only (patience) or nothing (fixed exit). Selection deploys those with the
  traces' primary ``"scores"``, a name the network does not know; the server feeds
  them zeros (their replayed decisions read no score either)."""
  return (deployed.answers is None and deployed.discretiser.num_states == 1
          and isinstance(deployed.policy, (PatiencePolicy, FixedExitPolicy)))


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  """Validates bucket batch sizes.

  Args:
    buckets: batch sizes a server pads to.

  Returns:
    ``buckets`` as a tuple of positive, strictly increasing ints.

  Raises:
    ValueError: not ints, empty, not positive or not strictly increasing.
  """
  try:
    out = tuple(validation.check_positive_int("buckets[]", b) for b in buckets)
  except TypeError:
    raise ValueError(f"buckets: expected a sequence of positive ints, got {buckets!r}") from None
  if not out:
    raise ValueError("buckets: empty (need at least one batch size)")
  if list(out) != sorted(set(out)):
    raise ValueError(f"buckets: must be strictly increasing, got {out}")
  return out


def bucket_of(buckets: tuple[int, ...], size: int) -> int:
  """The smallest of ``buckets`` (increasing) that holds ``size`` rows (at most the last)."""
  return next(b for b in buckets if b >= size)


# ---------------------------------------------------------------- kernels
def _initial_evidence(deployed, b: int, n: int):
  """Per-request evidence an answer model reads: ``()`` without one, else ``(scores
  [b, n] float32, preds [b, n] int32)`` of the exits run so far (zeros past them)."""
  if deployed.answers is None:
    return ()
  return jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.int32)


def _exit_observation(deployed, stage: int, logits, err):
  """``(score [b], pred [b] int32)`` exit ``stage`` shows the policy (or, with an answer
  model, its calibrators)."""
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if deployed.answers is not None:
    return exit_signal(deployed.answers.score_name, logits, err), pred
  if _score_unused(deployed):
    return jnp.zeros(pred.shape, jnp.float32), pred
  return exit_signal(deployed.score_name, logits, err), pred


def _virtual_stage(deployed, stage: int, evidence, score, pred):
  """Virtual posterior-answer stage ``stage`` (:meth:`AnswerModel.transform`, one stage).

  ``evidence``: ``(scores [b, n], preds [b, n])`` of exits ``0..stage-1``; ``score``,
  ``pred`` ``[b]``: exit ``stage``'s. Returns the evidence with exit ``stage`` written
  in and the virtual stage's ``(score, pred, answered exit)``, each ``[b]``: the exit
  ``j*`` of least posterior error among ``0..stage``, its prediction, and the signal
  ``deployed.score_name`` of the virtual traces (``1 - q[stage, j*]``, or ``j*``)."""
  ev_scores = evidence[0].at[:, stage].set(score.astype(evidence[0].dtype))
  ev_preds = evidence[1].at[:, stage].set(pred)
  conf, answer = answer_models.stage_answers(deployed.answers, stage, ev_scores, ev_preds)
  v_pred = jnp.take_along_axis(ev_preds, answer[:, None], axis=1)[:, 0]
  v_score = answer.astype(conf.dtype) if deployed.score_name == "answer_stage" else conf
  return (ev_scores, ev_preds), v_score, v_pred, answer


def _stage_math(model, deployed, live, stage: int, num_stages: int):
  """One stage's block, head, signal, observation and policy step (traced, not jitted).

  Same contract as :func:`_stage_kernel` (whose body this is). With an answer model
  the policy's stage ``stage`` is the virtual posterior-answer stage: the exit's
  score and prediction join the request's evidence, and the observation (and the
  agreement references, the recall bookkeeping) are the virtual stage's."""
  policy = deployed.policy
  if stage == 0:
    h, rows = live
    b = h.shape[0]
    carry = policy.initial_carry(b)
    best = jnp.full((b,), jnp.inf, jnp.float32)  # Replaced by the estimate under recall.
    best_stage = jnp.zeros((b,), jnp.int32)
    best_pred = jnp.zeros((b,), jnp.int32)
    prev_pred = jnp.zeros((b,), jnp.int32)
    top_score = jnp.full((b,), -jnp.inf, jnp.float32)
    top_pred = jnp.zeros((b,), jnp.int32)
    evidence = _initial_evidence(deployed, b, num_stages)
  else:
    h, carry, best, best_stage, best_pred, prev_pred, top_score, top_pred, evidence, rows = live
  h, logits, err = model.stage(stage, h)
  score, pred = _exit_observation(deployed, stage, logits, err)
  if deployed.answers is None:
    answered = jnp.full(pred.shape, stage, jnp.int32)  # the exit this stage answers with
  else:
    evidence, score, pred, answered = _virtual_stage(deployed, stage, evidence, score, pred)
  obs = deployed.observe(stage, score, pred, prev_pred, top_pred)
  higher = score > top_score  # ties keep the earlier exit, as Discretiser.reference_preds
  top_score, top_pred = jnp.where(higher, score, top_score), jnp.where(higher, pred, top_pred)
  if policy.recall:
    est = policy.estimate(stage, obs)
    if stage == 0:
      best, best_stage, best_pred = est, answered, pred
    else:  # Ties keep the earlier stage, as in simulation.replay.
      better = est < best
      best = jnp.where(better, est, best)
      best_stage = jnp.where(better, answered, best_stage)
      best_pred = jnp.where(better, pred, best_pred)
  carry, stop = policy.step(carry, stage, obs, best)
  stop = jnp.logical_or(stop, stage == num_stages - 1)
  answer_stage = best_stage if policy.recall else answered
  answer = best_pred if policy.recall else pred
  record = jnp.stack([rows, stop.astype(jnp.int32), answer_stage, answer,
                      obs.state.astype(jnp.int32)])
  go_on = jnp.logical_and(rows >= 0, jnp.logical_not(stop))
  out_rows = jnp.where(go_on, rows, -1)
  count = jnp.sum(go_on.astype(jnp.int32))
  return ((h, carry, best, best_stage, best_pred, pred, top_score, top_pred, evidence, out_rows),
          count, record)


def _take_rows(tree, idx):
  # In-bounds row gathers ("clip": no out-of-bounds masking) are several times faster
  # on a CPU than default indexing.
  return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), tree)


def _queued(state, rows, idx, count, offset, size: int):
  """The request state ``live`` of queue positions ``offset .. offset + size``.

  ``idx[i]`` is the row of ``state`` (a tuple of ``[R, ...]`` arrays) and ``rows``
  holding the ``i``-th queued request; ``count`` requests are queued, so positions
  past it get row ``-1`` (padding: their data repeats a real row, no NaN risk).
  Returns ``state`` rows ``+ (rows,)``, as :func:`_stage_math` takes them."""
  pick = jax.lax.dynamic_slice_in_dim(idx, offset, size)
  sub_rows = jnp.where(offset + jnp.arange(size) < count, jnp.take(rows, pick, mode="clip"), -1)
  return _take_rows(state, pick) + (sub_rows,)


def _padded_output(out, record, size: int):
  """A stage's output request state (``out``: state ``+ (rows,)``) and ``[5, b]``
  record padded to ``size`` rows: state with 0, rows and the record's row with -1
  (padding, never a request), the rest of the record with 0."""
  def pad(a, fill, axis=0):
    widths = [(0, size - a.shape[axis]) if i == axis else (0, 0) for i in range(a.ndim)]
    return jnp.pad(a, widths, constant_values=fill)

  state = jax.tree_util.tree_map(lambda a: pad(a, 0), out[:-1])
  return (state + (pad(out[-1], -1),),
          jnp.concatenate([pad(record[:1], -1, 1), pad(record[1:], 0, 1)]))


@functools.partial(jax.jit, static_argnames=("graph", "params_def", "policy_def", "buckets",
                                             "num_stages"))
def _batch_program(graph, params, policy_leaves, x, num, *, params_def, policy_def,
                   buckets: tuple[int, ...], num_stages: int):
  """Serves a group of ``G`` chunks stage by stage in one program: ``[n, 5, R]`` records.

  ``x`` ``[R, ...]`` (``R = G * b``, ``b`` the largest bucket) holds ``num``
  requests in its first rows (the rest repeat a real row). Each stage queues the
  requests still served across the whole group and runs its block on full chunks
  of ``b`` of them (a loop with as many turns as full chunks) and once on the
  smallest bucket that holds the remainder (a ``lax.switch``), so a later stage's
  few continuing requests are not spread over many small, padded batches. Each
  chunk gathers its rows straight from the previous stage's outputs and writes
  its outputs in place, so per stage the requests served are copied once. Record
  ``s`` holds ``(row, stop, answered stage, answer, state)`` of the requests stage
  ``s`` saw (``row = -1`` elsewhere).
  """
  _TRACES["batch"] += 1
  model = nnx.merge(graph.graphdef, jax.tree_util.tree_unflatten(params_def.value, params))
  deployed = jax.tree_util.tree_unflatten(policy_def.value, policy_leaves)
  cap, total = buckets[-1], x.shape[0]
  positions = jnp.arange(total, dtype=jnp.int32)
  tree, rows = (x,), jnp.where(positions < num, positions, -1)
  idx, count = positions, jnp.asarray(num, jnp.int32)
  records = []
  # Request-state buffers of stages two back are dead: a new stage writes into one
  # of equal shape (in place) instead of zeroing a fresh one. Their stale rows are
  # never read as requests (row -1), only as finite padding.
  spare = []

  def reuse(shape, dtype):
    for i, a in enumerate(spare):
      if a.shape == shape and a.dtype == dtype:
        return spare.pop(i)
    return jnp.zeros(shape, dtype)

  for stage in range(num_stages):

    def run(offset, size, tree=tree, rows=rows, idx=idx, count=count, stage=stage):
      """The stage on ``size`` queued requests from ``offset``, padded to ``cap`` rows."""
      live = _queued(tree, rows, idx, count, offset, size)
      out, _, rec = _stage_math(model, deployed, live, stage, num_stages)
      out, rec = _padded_output(out, rec, cap)
      return out[:-1], out[-1], rec

    def put(bufs, chunk, offset):
      # Outside any lax.switch: with the update inside the branches (on the buffers
      # passed in as operands) XLA:CPU served the digits CNN's remainder 5x slower.
      upd = lambda axis: lambda buf, a: jax.lax.dynamic_update_slice_in_dim(buf, a, offset, axis)
      return (jax.tree_util.tree_map(upd(0), bufs[0], chunk[0]), upd(0)(bufs[1], chunk[1]),
              upd(1)(bufs[2], chunk[2]))

    shapes = jax.eval_shape(functools.partial(run, 0, cap))
    bufs = (jax.tree_util.tree_map(lambda a: reuse((total,) + a.shape[1:], a.dtype), shapes[0]),
            jnp.full((total,), -1, jnp.int32),
            jnp.zeros((shapes[2].shape[0], total), jnp.int32).at[0].set(-1))
    # Full chunks in a loop, then the remainder (1 to ``cap`` requests, so it is
    # written inside the group) on its bucket.
    full = (jnp.maximum(count, 1) - 1) // cap
    bufs = jax.lax.fori_loop(0, full, lambda j, b, run=run: put(b, run(j * cap, cap), j * cap),
                             bufs)
    rest = count - full * cap

    def skip(shapes=shapes):  # nobody continues: a chunk of padding
      state = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[0])
      return (state, jnp.full((cap,), -1, jnp.int32),
              jnp.zeros(shapes[2].shape, jnp.int32).at[0].set(-1))

    # (Not a jnp.where between the remainder and the buffer's rows, which also
    # served the digits CNN 5x slower on XLA:CPU.)
    branches = [skip] + [functools.partial(run, full * cap, s) for s in buckets]
    which = jnp.where(rest == 0, 0, 1 + jnp.searchsorted(jnp.asarray(buckets, jnp.int32), rest))
    bufs = put(bufs, jax.lax.switch(which, branches), full * cap)
    if stage > 0:
      spare.extend(jax.tree_util.tree_leaves(tree))
    tree, rows, record = bufs
    records.append(record)
    go_on = rows >= 0
    idx = jnp.nonzero(go_on, size=total, fill_value=0)[0].astype(jnp.int32)
    count = jnp.sum(go_on.astype(jnp.int32))
  return jnp.stack(records)


def _state_bytes_per_request(model: EarlyExitNet, deployed: DeployedPolicy) -> int:
  """The largest request state (block output, policy carry, bookkeeping) any stage
  hands to the next, in bytes per request (shapes only: nothing is computed)."""
  n = model.num_stages
  dtype = jnp.int32 if model.input_kind == "int" else jnp.float32

  def states(x, deployed):  # The policy as an argument: its leaves may be NumPy arrays.
    live, out = (x, jnp.zeros((1,), jnp.int32)), []
    for stage in range(n):
      live, _, _ = _stage_math(model, deployed, live, stage, n)
      out.append(live)
    return out

  shapes = jax.eval_shape(states, jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), dtype),
                          deployed)
  return max(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(live))
             for live in shapes)


def _group_chunks(bytes_per_request: int, cap: int) -> int:
  """Chunks per group: the most (a power of two, at most
  ``_IN_FLIGHT``) whose request state fits in :data:`GROUP_BYTES`; at least one."""
  chunks = 1
  while chunks * 2 <= _IN_FLIGHT and chunks * 2 * cap * bytes_per_request <= GROUP_BYTES:
    chunks *= 2
  return chunks


def _padded(idx: np.ndarray, size: int) -> np.ndarray:
  """``idx`` padded to ``size`` with copies of its first entry (real rows: no NaN risk)."""
  return np.concatenate([idx, np.full(size - idx.size, idx[0], idx.dtype)]).astype(np.int32)


def _store(result: "ServeResult", start: int, stage: int, record: np.ndarray) -> None:
  """Writes one stage's ``[5, b]`` record of the chunk at ``start`` into ``result``."""
  seen = record[0] >= 0
  rows = record[0][seen] + start
  stop = record[1][seen].astype(bool)
  result.consulted[rows, stage] = True
  result.states[rows, stage] = record[4][seen]
  done = rows[stop]
  result.stop_stage[done] = stage
  result.answered_exit[done] = record[2][seen][stop]
  result.predictions[done] = record[3][seen][stop]


# ---------------------------------------------------------------- serving
class Server:
  """Serves batches with one deployed policy on one network.

  Holds a snapshot of the network's parameters (taken at construction: rebuild
  the server after further training), the validated policy and the buckets.
  ``server(x)`` is :func:`serve`; ``server.warmup()`` is :func:`warmup`.

  Each group of chunks is served in one compiled program, stage by stage, each stage
  on the requests still served queued across the group.

  Attributes (besides the constructor's arguments):
    group_chunks: chunks of the largest bucket per group (a
      power of two, at most 8): as many as keep a stage's request state within
      :data:`GROUP_BYTES`.
  """

  def __init__(self, model: EarlyExitNet, deployed: DeployedPolicy, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS):
    check_deployed(model, deployed)
    self.model = model
    self.deployed = deployed
    self.buckets = check_buckets(buckets)
    self.num_stages = model.num_stages
    graphdef, state = nnx.split(model)
    self._graph = StaticGraph(graphdef)
    self._params, params_def = jax.tree_util.tree_flatten(state)
    self._params_def = StaticOnce(params_def)
    self._policy, policy_def = jax.tree_util.tree_flatten(deployed)
    self._policy_def = StaticOnce(policy_def)
    self.group_chunks = _group_chunks(_state_bytes_per_request(model, deployed), self.buckets[-1])

  def _chunks(self, x, to_cap: bool = False):
    """``(start, size, (x_padded, rows))`` of each chunk of at most the largest bucket
    (full chunks, then the remainder padded to its bucket, or to the largest)."""
    num, cap = x.shape[0], self.buckets[-1]
    for start in range(0, num, cap):
      m = min(cap, num - start)
      b = cap if to_cap else bucket_of(self.buckets, m)
      rows = np.full(b, -1, np.int32)
      rows[:m] = np.arange(m, dtype=np.int32)
      yield start, m, (jnp.asarray(x[start:start + m][_padded(np.arange(m), b)]),
                       jnp.asarray(rows))

  def _groups(self, x):
    """``(start, size, x_group)`` of each group of at most ``group_chunks`` chunks:
    the group's requests padded (with copies of its first) to a power-of-two number
    of chunks, so that few group sizes are ever compiled."""
    num, cap = x.shape[0], self.buckets[-1]
    most = self.group_chunks * cap
    for start in range(0, num, most):
      m = min(most, num - start)
      chunks = 1 << (-(-m // cap) - 1).bit_length()
      group = np.empty((chunks * cap,) + x.shape[1:], x.dtype)
      group[:m] = x[start:start + m]
      group[m:] = x[start]
      yield start, m, group

  def _batch(self, x_group, num):
    return _batch_program(self._graph, self._params, self._policy, x_group, np.int32(num),
                          params_def=self._params_def, policy_def=self._policy_def,
                          buckets=self.buckets, num_stages=self.num_stages)

  def __call__(self, x: Any) -> ServeResult:
    x = self.model.check_input(x)
    num, n = x.shape[0], self.num_stages
    result = ServeResult.empty(num, n)
    for start, records in [(start, self._batch(xg, m)) for start, m, xg in self._groups(x)]:
      for stage, record in enumerate(np.asarray(records)):
        _store(result, start, stage, record)
    return result

  def warmup(self) -> int:
    """Compiles every program a call can need: one per group size (1, 2, 4, ... up to
    ``group_chunks`` chunks). Returns how many this call compiled."""
    before = compile_count()
    model, buckets = self.model, self.buckets
    dtype = np.int32 if model.input_kind == "int" else np.float32
    chunks = 1
    while chunks <= self.group_chunks:
      rows = chunks * buckets[-1]
      jax.block_until_ready(self._batch(np.zeros((rows,) + tuple(model.input_shape), dtype), rows))
      chunks *= 2
    return compile_count() - before

  def full_network(self, x: Any) -> np.ndarray:
    """``[B]`` last-exit predictions of the full network, in this server's chunks and buckets.

    The reference serving is timed against: every stage, no policy, the same
    padded shapes and the same asynchronous dispatch."""
    x = self.model.check_input(x)
    outs = [(m, _last_exit_flat(self._graph, self._params, xb, params_def=self._params_def))
            for _, m, (xb, _) in self._chunks(x)]
    return np.concatenate([np.asarray(pred)[:m] for m, pred in outs])


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


@functools.partial(jax.jit, static_argnames=("graph", "params_def"))
def _last_exit_flat(graph, params, x, *, params_def):
  """``[b]`` last-exit predictions of the network whose flattened state is ``params``."""
  state = jax.tree_util.tree_unflatten(params_def.value, params)
  return jnp.argmax(nnx.merge(graph.graphdef, state)(x).logits[:, -1], axis=-1).astype(jnp.int32)
