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
  * ``Server(program="batch")`` (default): one compiled program serves a group of
    up to 8 chunks of the largest bucket stage by stage. Each stage queues the
    requests still served across the group and runs on full chunks of them (a
    loop) plus one remainder on the smallest bucket that holds it (a
    ``lax.switch``), so later stages run on few, full batches; each chunk gathers
    its requests from the previous stage's outputs (one copy per request served).
    Nothing crosses to the host between stages: one dispatch and one
    ``[n, 5, rows]`` int32 transfer (row, stop, answered stage, answer, state) per
    group. Groups hold as many chunks (a power of two) as keep a stage's request
    state within :data:`GROUP_BYTES` (in cache on a CPU), so a server compiles at
    most four group sizes.
  * ``Server(program="chunk")``: one compiled program per chunk of up to the
    largest bucket, compacted before each stage and padded back to the chunk
    size (the previous default; its later stages run on the small remainders of
    each chunk separately).
  * ``Server(program="stage")``: one jitted kernel per (stage, bucket) and one
    compaction per (bucket in, bucket out), the continue count fetched by the host
    after each stage to pick the next bucket (chunks served in lockstep so that
    other chunks' kernels are queued meanwhile). Same answers, more per-stage
    overhead; kept for comparison (``scripts/serving_overhead.py``).
  * The network parameters and the policy are flattened once, so a call
    dispatches a flat list of arrays (flattening an ``nnx.State`` per call costs
    more than a small stage).
  * Buckets are evenly spaced, so padding wastes little (the saving a policy
    promises is paid for in rows actually computed).
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
from ttamer_jax.core.heuristics import FixedExitPolicy, PatiencePolicy
from ttamer_jax.core.protocol import check_line_policy, check_single_policy
from ttamer_jax.data import answers as answer_models
from ttamer_jax.data.answers import AnswerModel
from ttamer_jax.data.discretise import PRIMARY_SCORE, DeployedPolicy, Discretiser
from ttamer_jax.networks.nn import EarlyExitNet, StaticGraph, StaticOnce
from ttamer_jax.networks.profiling import SERVABLE_SIGNALS, check_signal_name, exit_signal
from ttamer_jax.networks.training import check_labels

# Evenly spaced: padding the requests a stage serves to their bucket computes at
# most 32 extra rows per chunk of 512 (6% of the full network's work on the chunk,
# 3% on average), where powers of two waste up to half of a stage's rows.
DEFAULT_BUCKETS = tuple(range(32, 513, 32))
PROGRAMS = ("batch", "chunk", "stage")
# Chunks served in lockstep (bounds the device memory of one call).
_IN_FLIGHT = 8
# program="batch" queues a stage's requests across a group of up to _IN_FLIGHT
# chunks, as many as keep one stage's request state (every group row) within
# GROUP_BYTES. Measured on a 2-core EPYC (2 MiB L2 per core, scripts/
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
@functools.partial(jax.jit, static_argnames=("graph", "params_def", "policy_def", "stage",
                                             "num_stages"))
def _stage_kernel(graph, params, policy_leaves, live, *, params_def, policy_def, stage: int,
                  num_stages: int):
  """One stage on one bucket: ``live`` is ``(x, rows)`` at stage 0, else the request state.

  ``params`` and ``policy_leaves`` are the flattened network state and deployed
  policy (flattening an ``nnx.State`` on every call costs more than a small
  stage). Request state: ``(h, policy_carry, best, best_stage, best_pred,
  prev_pred, top_score, top_pred, evidence, rows)`` (``best_stage``: the exit the
  recalled answer comes from; ``top_*``: the most confident stage so far, for the
  ``agree_best`` feature; ``evidence``: ``()``, or the exits' scores and
  predictions so far ``[b, n]`` for an answer model; ``rows``: the request's row
  in the chunk, ``-1`` for padding and, on output, for requests that stop here).
  Returns the new request state (not compacted), the number of requests that
  continue, and the ``[5, b]`` int32 record ``(row, stop, answered exit, answer,
  observed state)`` of the requests this stage saw.
  """
  _TRACES["stage"] += 1
  model = nnx.merge(graph.graphdef, jax.tree_util.tree_unflatten(params_def.value, params))
  deployed = jax.tree_util.tree_unflatten(policy_def.value, policy_leaves)
  return _stage_math(model, deployed, live, stage, num_stages)


@functools.partial(jax.jit, static_argnames=("size",))
def _compact(tree, *, size: int):
  """The continuing requests of ``tree`` (``rows >= 0``, in order) in ``size`` rows.

  Rows past the continuing ones repeat the first continuing row (real data: no
  NaN risk) with ``rows = -1``. The indices are computed on device, so nothing
  but the count (already on the host) is exchanged."""
  _TRACES["compact"] += 1
  go_on = tree[-1] >= 0
  idx = jnp.nonzero(go_on, size=size, fill_value=jnp.argmax(go_on))[0].astype(jnp.int32)
  return _queued(tree[:-1], tree[-1], idx, jnp.sum(go_on.astype(jnp.int32)), 0, size)


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
def _chunk_program(graph, params, policy_leaves, x, rows, *, params_def, policy_def,
                   buckets: tuple[int, ...], num_stages: int):
  """Serves one chunk through every stage in one program: ``[n, 5, b]`` records.

  ``x`` ``[b, ...]`` is the chunk padded to the largest bucket ``b`` and ``rows``
  ``[b]`` the request rows (``-1``: padding). Before each stage the requests still
  served are compacted on device and a ``lax.switch`` runs the stage on the
  smallest bucket that holds them (or skips it when none continues), so the
  program does the work of per-stage kernels without a host round trip per stage,
  and one program serves every batch size (one compilation per server). Each
  branch pads its output back to ``b`` rows (a copy of the request state, small
  next to a stage's work). Record ``s`` holds ``(row, stop, answered stage,
  answer, state)`` of the requests stage ``s`` saw (``row = -1`` elsewhere).
  """
  _TRACES["chunk"] += 1
  model = nnx.merge(graph.graphdef, jax.tree_util.tree_unflatten(params_def.value, params))
  deployed = jax.tree_util.tree_unflatten(policy_def.value, policy_leaves)
  b0 = x.shape[0]
  sizes = tuple(s for s in buckets if s < b0) + (b0,)
  tree, count = (x, rows), jnp.sum((rows >= 0).astype(jnp.int32))
  records = []
  for stage in range(num_stages):
    go_on = tree[-1] >= 0
    idx = jnp.nonzero(go_on, size=b0, fill_value=jnp.argmax(go_on))[0].astype(jnp.int32)

    def run(size, tree=tree, idx=idx, count=count, stage=stage):
      live = _queued(tree[:-1], tree[-1], idx, count, 0, size)
      out, new_count, rec = _stage_math(model, deployed, live, stage, num_stages)
      out, rec = _padded_output(out, rec, b0)
      return out, new_count, rec

    shapes = jax.eval_shape(functools.partial(run, sizes[0]))

    def skip(shapes=shapes):  # nobody continues: nothing to compute
      out = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0][:-1])
      rec = jnp.zeros(shapes[2].shape, jnp.int32).at[0].set(-1)
      return out + (jnp.full((b0,), -1, jnp.int32),), jnp.zeros((), jnp.int32), rec

    branches = [skip] + [functools.partial(run, s) for s in sizes]
    which = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count))
    tree, count, record = jax.lax.switch(which, branches)
    records.append(record)
  return jnp.stack(records)


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
  """Chunks per ``program="batch"`` group: the most (a power of two, at most
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

  ``program="batch"`` (default) serves each group of chunks in one compiled
  program, stage by stage, each stage on the requests still served queued across
  the group; ``program="chunk"`` serves each chunk in one program (the stages, the
  compactions and the bucket choice all on device); ``program="stage"``
  dispatches one kernel per stage and waits for each stage's continue count on
  the host. All three serve the same answers (kept for comparison:
  ``scripts/serving_overhead.py --programs batch,chunk,stage``).

  Attributes (besides the constructor's arguments):
    group_chunks: chunks of the largest bucket per ``program="batch"`` group (a
      power of two, at most 8): as many as keep a stage's request state within
      :data:`GROUP_BYTES`.
  """

  def __init__(self, model: EarlyExitNet, deployed: DeployedPolicy, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS, program: str = "batch"):
    check_deployed(model, deployed)
    if program not in PROGRAMS:
      raise ValueError(f"program: must be one of {PROGRAMS}, got {program!r}")
    self.program = program
    self.model = model
    self.deployed = deployed
    self.buckets = _check_buckets(buckets)
    self.num_stages = model.num_stages
    graphdef, state = nnx.split(model)
    self._graph = StaticGraph(graphdef)
    self._params, params_def = jax.tree_util.tree_flatten(state)
    self._params_def = StaticOnce(params_def)
    self._policy, policy_def = jax.tree_util.tree_flatten(deployed)
    self._policy_def = StaticOnce(policy_def)
    self.group_chunks = _group_chunks(_state_bytes_per_request(model, deployed), self.buckets[-1])

  def _run(self, live, stage):
    return _stage_kernel(self._graph, self._params, self._policy, live,
                         params_def=self._params_def, policy_def=self._policy_def, stage=stage,
                         num_stages=self.num_stages)

  def _chunks(self, x, to_cap: bool = False):
    """``(start, size, (x_padded, rows))`` of each chunk of at most the largest bucket
    (full chunks, then the remainder padded to its bucket, or to the largest)."""
    num, cap = x.shape[0], self.buckets[-1]
    for start in range(0, num, cap):
      m = min(cap, num - start)
      b = cap if to_cap else _bucket(self.buckets, m)
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

  def _program(self, xb, rows):
    return _chunk_program(self._graph, self._params, self._policy, xb, rows,
                          params_def=self._params_def, policy_def=self._policy_def,
                          buckets=self.buckets, num_stages=self.num_stages)

  def __call__(self, x: Any) -> ServeResult:
    x = self.model.check_input(x)
    num, n = x.shape[0], self.num_stages
    result = ServeResult(predictions=np.zeros(num, np.int32),
                         answered_exit=np.zeros(num, np.int32),
                         stop_stage=np.zeros(num, np.int32), consulted=np.zeros((num, n), bool),
                         states=np.full((num, n), -1, np.int32))
    if self.program == "batch":
      for start, records in [(start, self._batch(xg, m)) for start, m, xg in self._groups(x)]:
        for stage, record in enumerate(np.asarray(records)):
          _store(result, start, stage, record)
      return result
    chunks = list(self._chunks(x, to_cap=self.program == "chunk"))
    for g in range(0, len(chunks), _IN_FLIGHT):
      group = chunks[g:g + _IN_FLIGHT]
      if self.program == "stage":
        self._serve_group(group, result)
        continue
      outs = [(start, self._program(*tree)) for start, _, tree in group]  # all dispatched
      for start, records in outs:
        for stage, record in enumerate(np.asarray(records)):
          _store(result, start, stage, record)
    return result

  def _serve_group(self, chunks, result):
    """Serves a few chunks in lockstep, so that the device always has queued work.

    Per chunk and stage the host waits for one int (the number of requests that
    continue, to pick the next bucket) while the other chunks' kernels run; the
    per-request records stay on the device until the group is done."""
    records = []
    live = []
    for start, _, tree in chunks:  # Stage 0 of every chunk, dispatched asynchronously.
      tree, count, record = self._run(tree, 0)
      records.append((start, 0, record))
      live.append((start, tree, count))
    for stage in range(1, self.num_stages):
      nxt = []
      for start, tree, count in live:
        count = int(count)  # The one host sync per chunk and stage.
        if count == 0:
          continue
        tree = _compact(tree, size=_bucket(self.buckets, count))
        tree, count, record = self._run(tree, stage)
        records.append((start, stage, record))
        nxt.append((start, tree, count))
      live = nxt
      if not live:
        break
    for start, stage, record in records:
      _store(result, start, stage, np.asarray(record))

  def warmup(self) -> int:
    """Compiles every kernel a call can need; returns how many this call compiled.

    ``program="batch"``: one program per group size (1, 2, 4, ... up to
    ``group_chunks`` chunks). ``program="chunk"``: one program (every stage at
    every bucket; chunks are padded to the largest bucket). ``program="stage"``:
    each stage at each bucket size and each compaction from a bucket to an equal
    or smaller one.
    """
    before = compile_count()
    model, buckets = self.model, self.buckets
    dtype = np.int32 if model.input_kind == "int" else np.float32
    if self.program == "batch":
      chunks = 1
      while chunks <= self.group_chunks:
        rows = chunks * buckets[-1]
        jax.block_until_ready(self._batch(np.zeros((rows,) + tuple(model.input_shape), dtype),
                                          rows))
        chunks *= 2
      return compile_count() - before
    if self.program == "chunk":
      b = buckets[-1]
      jax.block_until_ready(self._program(jnp.zeros((b,) + tuple(model.input_shape), dtype),
                                          jnp.arange(b, dtype=jnp.int32)))
      return compile_count() - before
    trees = {}
    for b in buckets:
      trees[b] = self._run((jnp.zeros((b,) + tuple(model.input_shape), dtype),
                            jnp.zeros((b,), jnp.int32)), 0)[0]
    for stage in range(1, self.num_stages):
      nxt = {}
      for b_in in buckets:
        for b_out in buckets:
          if b_out > b_in:
            break
          compacted = _compact(trees[b_in], size=b_out)
          if b_out not in nxt:
            nxt[b_out] = self._run(compacted, stage)[0]
      trees = nxt
    jax.block_until_ready(trees)
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
          buckets: Sequence[int] = DEFAULT_BUCKETS, program: str = "batch") -> ServeResult:
  """Serves ``x`` ``[B, *input_shape]`` with ``deployed`` on ``model``, stage by stage.

  Batches larger than the largest bucket are served in chunks of that size. For
  repeated calls build a :class:`Server` once (this function builds one per call).

  Raises:
    ValueError: a wrong input shape or dtype, a policy or discretiser built for a
      different number of stages, a policy whose state count differs from the
      discretiser's, a score the network cannot serve, or bad buckets.
  """
  return Server(model, deployed, buckets=buckets, program=program)(x)


def warmup(model: EarlyExitNet, deployed: DeployedPolicy, *,
           buckets: Sequence[int] = DEFAULT_BUCKETS, program: str = "batch") -> int:
  """Compiles every kernel :func:`serve` can need; returns how many were compiled."""
  return Server(model, deployed, buckets=buckets, program=program).warmup()


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
    evidence = _initial_evidence(deployed, 1, n)
    for stage in range(n):
      h, logits, err = model.stage(stage, h)
      score, pred_arr = _exit_observation(deployed, stage, logits, err)
      answered = stage
      if deployed.answers is not None:
        evidence, score, pred_arr, answered_arr = _virtual_stage(deployed, stage, evidence, score,
                                                                 pred_arr)
        answered = int(np.asarray(answered_arr)[0])
      pred = int(np.asarray(pred_arr)[0])
      obs = deployed.observe(stage, score, jnp.asarray([pred], jnp.int32),
                             jnp.asarray([prev_pred], jnp.int32), jnp.asarray([top_pred], jnp.int32))
      if float(np.asarray(score)[0]) > top_score:
        top_score, top_pred = float(np.asarray(score)[0]), pred
      if policy.recall:
        est = policy.estimate(stage, obs)
        if stage == 0 or bool(np.asarray(est)[0] < np.asarray(best)[0]):
          best, best_stage, best_pred = est, answered, pred
      carry, stop = policy.step(carry, stage, obs, best)
      out.consulted[r, stage] = True
      out.states[r, stage] = int(np.asarray(obs.state)[0])
      if bool(np.asarray(stop)[0]) or stage == n - 1:
        out.stop_stage[r] = stage
        out.answered_exit[r] = best_stage if policy.recall else answered
        out.predictions[r] = best_pred if policy.recall else pred
        break
      prev_pred = pred
  return out


def _reached_buckets(buckets: tuple[int, ...], num: int) -> tuple[int, ...]:
  """The buckets serving ``num`` requests with a fixed-exit policy runs stages on.

  Every request of a chunk runs each stage up to the exit, so no stage compacts:
  each runs on the bucket of its chunk's size (full chunks: the largest, which
  also sets the chunk size and so stays)."""
  cap = buckets[-1]
  sizes = [cap] * (num // cap) + ([num % cap] if num % cap else [])
  return tuple(sorted({_bucket(buckets, m) for m in sizes} | {cap}))


def served_stage_costs(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, *,
                       buckets: Sequence[int] = DEFAULT_BUCKETS, program: str = "batch",
                       repeats: int = 9) -> np.ndarray:
  """``[n]`` seconds per request of each stage as the serving path runs it.

  Serves ``x`` with fixed-exit policies that stop after stage ``k`` (every request
  runs stages ``0..k``, through the same server, discretiser and score as
  ``deployed``) for ``k = 0..n-1``, timed in interleaved rounds (medians), and
  returns the differences of consecutive times divided by the batch size. The
  costs therefore include whatever serving adds per stage (dispatch, compaction,
  padding of a full chunk, host round trips under ``program="stage"``), so a
  policy fitted on them (``traces.replace(costs=cost_shares(c))``) predicts the
  saving serving delivers on batches like ``x``. A difference that noise makes
  negative is reported as 0: pass the costs through :func:`cost_shares` (which
  floors every stage above 0) before fitting on them.

  The servers are built with only the buckets these policies reach
  (:func:`_reached_buckets`): the same kernels run, and the chunk program compiles
  a few branches instead of one per bucket (digits: 2.5 s instead of 21 s).
  """
  x = model.check_input(x)
  repeats = validation.check_positive_int("repeats", repeats)
  n = model.num_stages
  reached = _reached_buckets(_check_buckets(buckets), x.shape[0])
  # Exit states (no answer model) read the signal the deployed policy's stages read.
  score = deployed.score_name if deployed.answers is None else deployed.answers.score_name
  servers = [Server(model, deployed.replace(
      policy=FixedExitPolicy(exit_stage=jnp.asarray(k, jnp.int32), num_stages=n), answers=None,
      score_name=score), buckets=reached, program=program) for k in range(n)]
  for server in servers:
    server(x)
  times = np.zeros((repeats, n))
  for r in range(repeats):
    for k, server in enumerate(servers):
      t0 = time.perf_counter()
      server(x)
      times[r, k] = time.perf_counter() - t0
  cumulative = np.median(times, axis=0)
  return np.maximum(np.diff(cumulative, prepend=0.0), 0.0) / x.shape[0]


@dataclasses.dataclass(frozen=True)
class ServedCostModel:
  """Seconds serving a batch spends on each stage: ``per_batch + per_request * count``.

  A stage served to fewer requests is not proportionally cheaper: fitted on two
  batch sizes, a stage's served time has a part that does not shrink with the batch
  (the digits CNN on 2 CPU cores: 1.6-2.5 ms at three of its four stages beside 7-28 us
  per request; whatever serving adds per call, such as a remainder padded to its
  bucket). Per-request costs
  measured on whole batches (:func:`served_stage_costs`) then under-price the later
  stages of a policy that stops most requests early; this model prices them at the
  number of requests that reach them (:meth:`seconds`, :meth:`per_request_costs`).

  Attributes:
    per_batch: ``[n]`` seconds stage ``k`` adds to a served batch that any request
      reaches it in, whatever their number.
    per_request: ``[n]`` seconds per request that reaches stage ``k``.
    batch_size: requests per served batch the two were measured at (the model
      describes batches of about this size).
  """

  per_batch: np.ndarray
  per_request: np.ndarray
  batch_size: int

  def _counts(self, reach: Any) -> np.ndarray:
    reach = validation.as_numpy("reach", reach, ndim=1).astype(np.float64)
    validation.check_shape("reach", reach, self.per_batch.shape)
    if not (np.all(reach >= 0) and np.all(reach <= 1)):
      raise ValueError(f"reach: fractions of requests must lie in [0, 1], got {reach.tolist()}")
    return reach * self.batch_size

  def seconds(self, reach: Any) -> float:
    """Modelled seconds to serve a batch of ``batch_size`` when a fraction ``reach[k]``
    (``[n]``) of its requests reaches stage ``k``."""
    counts = self._counts(reach)
    return float(np.sum(np.where(counts > 0, self.per_batch, 0.0) + self.per_request * counts))

  def per_request_costs(self, reach: Any) -> np.ndarray:
    """``[n]`` seconds per request of each stage when ``reach[k]`` of a batch reaches it:
    the per-batch part shared by those requests (by one request where none does)."""
    counts = self._counts(reach)
    return self.per_request + self.per_batch / np.maximum(counts, 1.0)


def served_cost_model(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, *,
                      fraction: int = 4, buckets: Sequence[int] = DEFAULT_BUCKETS,
                      program: str = "batch", repeats: int = 9) -> ServedCostModel:
  """Each stage's served time split into a per-batch and a per-request part.

  Times every stage as :func:`served_stage_costs` does, on ``x`` and on its first
  ``len(x) // fraction`` requests, and fits per stage the line through the two
  per-batch times (each part floored at 0: a difference noise makes negative).

  Raises:
    ValueError: fewer than ``2 * fraction`` requests in ``x``, or ``fraction < 2``.
  """
  x = model.check_input(x)
  fraction = validation.check_positive_int("fraction", fraction)
  num = x.shape[0]
  if fraction < 2 or num < 2 * fraction:
    raise ValueError(f"fraction: need fraction >= 2 and at least 2 * fraction requests in x, "
                     f"got fraction={fraction} and {num} requests")
  small = num // fraction
  kw = dict(buckets=buckets, program=program, repeats=repeats)
  big_s = served_stage_costs(model, deployed, x, **kw) * num
  small_s = served_stage_costs(model, deployed, x[:small], **kw) * small
  per_request = np.maximum((big_s - small_s) / (num - small), 0.0)
  per_batch = np.maximum(big_s - per_request * num, 0.0)
  return ServedCostModel(per_batch=per_batch, per_request=per_request, batch_size=num)


# A stage's served cost is the difference of two noisy medians: on a loaded machine a
# cheap stage can come out 0 (a negative difference, clamped) or nearly so. Traces
# accept a zero cost, but a policy fitted on it treats the stage as free and runs it
# whatever it observes. A floor of 0.1% of the full cost keeps such a stage cheap,
# never free.
MIN_STAGE_SHARE = 1e-3


def cost_shares(costs: Any, *, floor: float = MIN_STAGE_SHARE) -> np.ndarray:
  """``[n]`` per-stage costs as shares of their sum, each floored at ``floor`` and
  renormalised: strictly positive, summing to 1 (the unit of measured trace costs).

  Raises:
    ValueError: ``costs`` not finite and ``>= 0``, or summing to 0 (every stage
      timed as free: noise swamped the stages; time more repeats or a larger batch);
      ``floor`` not in ``[0, 1 / n)``.
  """
  costs = validation.as_numpy("costs", costs, ndim=1).astype(np.float64)
  validation.check_nonnegative("costs", costs)
  total = float(costs.sum())
  if not costs.size or not np.isfinite(total) or total <= 0:
    raise ValueError(f"costs: every stage measured as free ({costs.tolist()}); timing noise "
                     "swamped the stages: time more repeats or a larger batch")
  if not 0 <= floor < 1.0 / costs.size:
    raise ValueError(f"floor: must be in [0, 1/{costs.size}), got {floor!r}")
  shares = np.maximum(costs / total, floor)
  return shares / shares.sum()


# -------------------------------------------------------------- benchmark
@dataclasses.dataclass(frozen=True)
class ServeBenchmark:
  """Wall time and accuracy of :func:`serve` against the full network on one batch.

  Attributes:
    serve_seconds: median wall time of :func:`serve` on the batch.
    full_seconds: median wall time of the full network run the faster of two ways
      (``min(full_one_call_seconds, full_chunked_seconds)``).
    serve_accuracy: accuracy of the served answers.
    full_accuracy: accuracy of the full network's last exit.
    mean_stages: mean number of stages run per request under the policy.
    batch_size: ``B``.
    repeats: timed calls of each.
    full_one_call_seconds: the full network as one jitted call on the whole batch.
    full_chunked_seconds: the full network in the server's chunks and buckets
      (:meth:`Server.full_network`; on a CPU a batch of thousands can be slower in
      one call than in chunks of a few hundred).
  """

  serve_seconds: float
  full_seconds: float
  serve_accuracy: float
  full_accuracy: float
  mean_stages: float
  batch_size: int
  repeats: int
  full_one_call_seconds: float = float("nan")
  full_chunked_seconds: float = float("nan")

  @property
  def speedup(self) -> float:
    return self.full_seconds / self.serve_seconds

  def as_dict(self) -> dict:
    """Every field and the speedup, as plain floats and ints (JSON)."""
    out = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
           for k, v in dataclasses.asdict(self).items()}
    return dict(out, speedup=float(self.speedup))


@functools.partial(jax.jit, static_argnames=("graph",))
def _last_exit(graph, state, x):
  return jnp.argmax(nnx.merge(graph.graphdef, state)(x).logits[:, -1], axis=-1)


@functools.partial(jax.jit, static_argnames=("graph", "params_def"))
def _last_exit_flat(graph, params, x, *, params_def):
  state = jax.tree_util.tree_unflatten(params_def.value, params)
  return jnp.argmax(nnx.merge(graph.graphdef, state)(x).logits[:, -1], axis=-1).astype(jnp.int32)


def benchmark(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, y: Any, *,
              buckets: Sequence[int] = DEFAULT_BUCKETS, repeats: int = 5,
              program: str = "batch") -> ServeBenchmark:
  """Times serving and the full network on the same batch (all warmed up, medians).

  Serving is timed through a :class:`Server` (steady state: validation and the
  parameter snapshot are done once); the full network both as one jitted call on
  the whole batch and in the server's chunks (:meth:`Server.full_network`), and
  the faster of the two is the reference. Calls are interleaved, so that machine
  load affects all alike.
  """
  x = model.check_input(x)
  y = check_labels(model, y, x.shape[0])
  repeats = validation.check_positive_int("repeats", repeats)
  server = Server(model, deployed, buckets=buckets, program=program)
  graph, state = StaticGraph(nnx.graphdef(model)), nnx.state(model)
  x_dev = jnp.asarray(x)
  full_pred = np.asarray(_last_exit(graph, state, x_dev))
  server.full_network(x)
  served = server(x)
  one_t, chunk_t, serve_t = [], [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(_last_exit(graph, state, x_dev))
    one_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    server.full_network(x)
    chunk_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    server(x)
    serve_t.append(time.perf_counter() - t0)
  one, chunked = float(np.median(one_t)), float(np.median(chunk_t))
  return ServeBenchmark(serve_seconds=float(np.median(serve_t)), full_seconds=min(one, chunked),
                        serve_accuracy=float((served.predictions == y).mean()),
                        full_accuracy=float((full_pred == y).mean()),
                        mean_stages=float(served.num_consulted.mean()), batch_size=int(x.shape[0]),
                        repeats=repeats, full_one_call_seconds=one, full_chunked_seconds=chunked)
