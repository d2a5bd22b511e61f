"""Profiling an early-exit network into exit traces (DESIGN.md sections 5 and 8).

:func:`collect_traces` runs every exit of a network on a labelled set and records
what fitting and evaluation need: per-exit scores (max-softmax, entropy, learned
error probability), predictions, true losses (0/1 and cross-entropy), labels and
per-stage costs. Costs are either the **measured** wall-clock time of each stage
(block + head, jitted, warmed up, median over repeats) or FLOPs from XLA's cost
analysis; :func:`measure_stage_costs` returns both in absolute units.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.data.traces import ExitTraces
from ttamer_jax.networks.nn import EarlyExitNet, predict
from ttamer_jax.networks.training import check_labels

# Signals computable at serving time (no label needed), and the label-dependent
# true losses recorded for analysis (an "oracle" score).
SERVABLE_SIGNALS = ("max_softmax", "entropy", "error_prob")
SIGNALS = SERVABLE_SIGNALS + ("cross_entropy", "zero_one")
COST_KINDS = ("measured", "flops")
LOSS_KINDS = ("zero_one", "cross_entropy")


def exit_signal(name: str, logits: chex.Array, error_logit: chex.Array | None) -> chex.Array:
  """``[B]`` servable signal ``name`` of one exit from ``[B, C]`` logits (jit-able).

  ``"max_softmax"``: largest class probability; ``"entropy"``: entropy (nats) of the
  class distribution; ``"error_prob"``: ``sigmoid`` of the learned error logit.
  """
  if name == "max_softmax":
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  if name == "entropy":
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  if name == "error_prob":
    if error_logit is None:
      raise ValueError("score 'error_prob' needs a network built with error_head=True")
    return jax.nn.sigmoid(error_logit)
  raise ValueError(f"signal: must be one of {SERVABLE_SIGNALS}, got {name!r}")


def check_signal_name(model: EarlyExitNet, name: str, *, servable: bool = False) -> None:
  allowed = SERVABLE_SIGNALS if servable else SIGNALS
  if name not in allowed:
    extra = " (label-dependent signals cannot be served)" if name in SIGNALS else ""
    raise ValueError(f"score: must be one of {allowed}, got {name!r}{extra}")
  if name == "error_prob" and not model.has_error_head:
    raise ValueError(f"score 'error_prob': {type(model).__name__} was built without error heads")


@dataclasses.dataclass(frozen=True)
class StageCosts:
  """Absolute per-stage costs of a network (stage ``i`` = block ``i`` + head ``i``; stage 0
  includes the input embedding).

  Attributes:
    seconds: ``[n]`` median wall time of one stage on a batch of ``batch_size``.
    seconds_iqr: ``[n]`` inter-quartile range of those timings.
    flops: ``[n]`` FLOPs per sample (XLA cost analysis of the stage).
    batch_size: batch size of the timings.
    repeats: timed calls per stage.
  """

  seconds: np.ndarray
  seconds_iqr: np.ndarray
  flops: np.ndarray
  batch_size: int
  repeats: int

  @property
  def per_sample_seconds(self) -> np.ndarray:
    return self.seconds / self.batch_size


def _stage_fn(graphdef, stage: int):
  """A jitted ``(state, h) -> (h', logits, error_logit)`` for one stage."""

  def fn(state, h):
    return nnx.merge(graphdef, state).stage(stage, h)

  return jax.jit(fn)


def measure_stage_costs(model: EarlyExitNet, x: Any, *, repeats: int = 20,
                        batch_size: int = 256, warmup: int = 3, timed: bool = True) -> StageCosts:
  """Times each stage of ``model`` (jitted, warmed up) and counts its FLOPs.

  Args:
    model: the network.
    x: ``[N, *input_shape]`` representative inputs; the first ``batch_size`` rows
      are used (tiled when ``N < batch_size``).
    repeats: timed calls per stage; stages are timed round-robin so that slow
      drift of the machine affects them alike. The reported time is the median.
    batch_size: batch size of the timed calls.
    warmup: untimed calls per stage after compilation.
    timed: if false, only count FLOPs (``seconds`` are NaN).
  """
  x = model.check_input(x)
  repeats = validation.check_positive_int("repeats", repeats)
  batch_size = validation.check_positive_int("batch_size", batch_size)
  if warmup < 0:
    raise ValueError(f"warmup = {warmup} must be >= 0")
  x = np.resize(x, (batch_size,) + x.shape[1:])  # np.resize tiles the rows.
  graphdef, state = nnx.split(model)
  fns = [_stage_fn(graphdef, i) for i in range(model.num_stages)]
  inputs, flops, h = [], [], jnp.asarray(x)
  for fn in fns:
    inputs.append(h)
    analysis = fn.lower(state, h).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per device.
      analysis = analysis[0]
    flops.append(float((analysis or {}).get("flops", np.nan)) / batch_size)
    if timed:
      for _ in range(warmup + 1):  # the first call compiles
        out = jax.block_until_ready(fn(state, h))
      h = out[0]  # the next stage's input
    else:
      h = jax.eval_shape(fn, state, h)[0]  # its shape is all lowering needs
  if not timed:
    nan = np.full(model.num_stages, np.nan)
    return StageCosts(seconds=nan, seconds_iqr=nan, flops=np.asarray(flops),
                      batch_size=batch_size, repeats=0)
  times = np.zeros((repeats, model.num_stages))
  for r in range(repeats):
    for i, (fn, h) in enumerate(zip(fns, inputs)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, h))
      times[r, i] = time.perf_counter() - t0
  q25, q50, q75 = np.percentile(times, [25, 50, 75], axis=0)
  return StageCosts(seconds=q50, seconds_iqr=q75 - q25, flops=np.asarray(flops),
                    batch_size=batch_size, repeats=repeats)


def collect_traces(model: EarlyExitNet, x: Any, y: Any, *, score: str = "max_softmax",
                   loss: str = "zero_one", cost: str = "measured", normalise_costs: bool = True,
                   repeats: int = 20, timing_batch_size: int = 256,
                   batch_size: int = 512, normalize_costs: bool | None = None) -> ExitTraces:
  """Runs every exit of ``model`` on ``(x, y)`` and records exit traces.

  Args:
    model: an early-exit network.
    x: ``[N, *input_shape]`` inputs.
    y: ``[N]`` int labels.
    score: signal stored as ``scores`` (any of :data:`SIGNALS`; the others stay in
      ``signals``).
    loss: ``"zero_one"`` (error of the exit's argmax) or ``"cross_entropy"``.
    cost: ``"measured"`` (median wall time of each stage, see
      :func:`measure_stage_costs`) or ``"flops"`` (XLA cost analysis).
    normalise_costs: divide the costs by their sum, so that the full network costs
      1 and a policy's cost is its fraction of the full network's (the stage-wise
      sum); otherwise costs are seconds or FLOPs per sample.
    repeats: timed calls per stage (``cost="measured"``).
    timing_batch_size: batch size of the timed calls.
    batch_size: batch size of the forward passes over ``x``.
    normalize_costs: the American spelling of ``normalise_costs``, accepted with a
      ``DeprecationWarning`` (the library spells words the British way).

  Returns:
    :class:`~ttamer_jax.ExitTraces` with ``signals`` ``"max_softmax"``,
    ``"entropy"``, ``"error_prob"`` (if the network has error heads),
    ``"cross_entropy"`` and ``"zero_one"``, and ``labels``.

  Raises:
    ValueError: a wrong input shape or dtype, labels outside ``[0, C)``, an unknown
      score, loss or cost kind.
  """
  if normalize_costs is not None:
    warnings.warn("collect_traces: normalize_costs is spelt normalise_costs", DeprecationWarning,
                  stacklevel=2)
    normalise_costs = normalize_costs
  x = model.check_input(x)
  y = check_labels(model, y, x.shape[0])
  check_signal_name(model, score)
  if loss not in LOSS_KINDS:
    raise ValueError(f"loss: must be one of {LOSS_KINDS}, got {loss!r}")
  if cost not in COST_KINDS:
    raise ValueError(f"cost: must be one of {COST_KINDS}, got {cost!r}")
  out = predict(model, x, batch_size=batch_size)
  logits = jnp.asarray(out.logits)  # [N, n, C]
  err = None if out.error_logits is None else jnp.asarray(out.error_logits)
  preds = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  signals = {name: np.asarray(exit_signal(name, logits, err))
             for name in SERVABLE_SIGNALS if name != "error_prob" or err is not None}
  true_logp = np.take_along_axis(np.asarray(logp), y[:, None, None], axis=-1)[..., 0]
  signals["cross_entropy"] = np.maximum(-true_logp, 0.0)
  signals["zero_one"] = (preds != y[:, None]).astype(np.float32)
  stage_costs = measure_stage_costs(model, x, repeats=repeats, batch_size=timing_batch_size,
                                    timed=cost == "measured")
  costs = stage_costs.per_sample_seconds if cost == "measured" else stage_costs.flops
  if normalise_costs:
    costs = costs / costs.sum()
  return ExitTraces(scores=signals[score], preds=preds, losses=signals[loss], costs=costs,
                    signals=signals, labels=y)
