"""The two serving programs the package does not ship, kept to time against its one.

:class:`~ttamer_jax.Server` serves a group of chunks in one compiled program, each stage
on the requests still served queued across the group. The alternatives it was chosen
over serve the same answers (``tests/test_serving.py`` checks it) with more per-stage
overhead; ``benchmarks/serving_overhead.py --programs batch,chunk,stage`` times them:

* :class:`ChunkServer`: one compiled program per chunk of up to the largest bucket,
  compacted before each stage and padded back to the chunk size (its later stages run
  on the small remainders of each chunk separately);
* :class:`StageServer`: one jitted kernel per (stage, bucket) and one compaction per
  (bucket in, bucket out), the continue count fetched by the host after each stage to
  pick the next bucket (chunks served in lockstep so that other chunks' kernels are
  queued meanwhile).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttamer_jax.networks.serving import (  # noqa: E402
  _IN_FLIGHT,
  _TRACES,
  Server,
  ServeResult,
  _padded_output,
  _queued,
  _stage_math,
  _store,
  bucket_of,
  compile_count,
)


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


# ---------------------------------------------------------------- servers
class _ChunkedServer(Server):
  """A :class:`~ttamer_jax.Server` that serves chunk by chunk, ``_IN_FLIGHT`` chunks at a
  time (its subclasses say how a chunk is served)."""

  pad_to_cap = False

  def __call__(self, x: Any) -> ServeResult:
    x = self.model.check_input(x)
    num, n = x.shape[0], self.num_stages
    result = ServeResult.empty(num, n)
    chunks = list(self._chunks(x, to_cap=self.pad_to_cap))
    for g in range(0, len(chunks), _IN_FLIGHT):
      self._serve_group(chunks[g:g + _IN_FLIGHT], result)
    return result


class ChunkServer(_ChunkedServer):
  """Serves each chunk, padded to the largest bucket, in one compiled program (the
  stages, the compactions and the bucket choice all on device)."""

  program = "chunk"
  pad_to_cap = True

  def _program(self, xb, rows):
    return _chunk_program(self._graph, self._params, self._policy, xb, rows,
                          params_def=self._params_def, policy_def=self._policy_def,
                          buckets=self.buckets, num_stages=self.num_stages)

  def _serve_group(self, chunks, result):
    outs = [(start, self._program(*tree)) for start, _, tree in chunks]  # all dispatched
    for start, records in outs:
      for stage, record in enumerate(np.asarray(records)):
        _store(result, start, stage, record)

  def warmup(self) -> int:
    """Compiles the one program (every stage at every bucket); returns how many compiled."""
    before = compile_count()
    model, b = self.model, self.buckets[-1]
    dtype = np.int32 if model.input_kind == "int" else np.float32
    jax.block_until_ready(self._program(jnp.zeros((b,) + tuple(model.input_shape), dtype),
                                        jnp.arange(b, dtype=jnp.int32)))
    return compile_count() - before


class StageServer(_ChunkedServer):
  """Dispatches one kernel per stage and waits for each stage's continue count on the host."""

  program = "stage"

  def _run(self, live, stage):
    return _stage_kernel(self._graph, self._params, self._policy, live,
                         params_def=self._params_def, policy_def=self._policy_def, stage=stage,
                         num_stages=self.num_stages)

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
        tree = _compact(tree, size=bucket_of(self.buckets, count))
        tree, count, record = self._run(tree, stage)
        records.append((start, stage, record))
        nxt.append((start, tree, count))
      live = nxt
      if not live:
        break
    for start, stage, record in records:
      _store(result, start, stage, np.asarray(record))

  def warmup(self) -> int:
    """Compiles each stage at each bucket size and each compaction from a bucket to an
    equal or smaller one; returns how many compiled."""
    before = compile_count()
    model, buckets = self.model, self.buckets
    dtype = np.int32 if model.input_kind == "int" else np.float32
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


class BatchServer(Server):
  """The package's server, named like the others for the comparison."""

  program = "batch"


# Every serving program by name: the shipped one first.
PROGRAMS = {"batch": BatchServer, "chunk": ChunkServer, "stage": StageServer}


def make_server(model, deployed, *, program: str = "batch", **kw) -> Server:
  """A server of ``program`` (:data:`PROGRAMS`).

  Args:
    model, deployed: as :class:`~ttamer_jax.Server`.
    program: ``"batch"``, ``"chunk"`` or ``"stage"``.
    **kw: the server's other arguments (``buckets``).

  Returns:
    The server; ``server(x)`` serves ``x`` ``[B, *input_shape]``.
  """
  if program not in PROGRAMS:
    raise ValueError(f"program: must be one of {tuple(PROGRAMS)}, got {program!r}")
  return PROGRAMS[program](model, deployed, **kw)
