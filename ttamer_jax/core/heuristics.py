"""The heuristics people deploy today, as line policies (DESIGN.md section 6).

Every baseline implements :class:`~ttamer_jax.core.LinePolicy`, so
:func:`~ttamer_jax.replay`, the evaluation and frontier code, and serving (through
:class:`~ttamer_jax.DeployedPolicy`) run them exactly like the solver policies.
Heuristics read ``obs.score`` / ``obs.pred`` and ignore ``obs.state``
(``observes = "signals"``); their parameters are array leaves, so a parameter
grid is one batched policy that ``vmap`` replays in one call. The hindsight
oracle (``observes = "true_losses"``) is fed the true losses as ``obs.score``.

The no-recall optimum is :class:`~ttamer_jax.core.NoRecallPolicy` (see
:meth:`~ttamer_jax.data.FittedCascade.no_recall_policy`).
"""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import default_float
from ttamer_jax.core.protocol import LastStagePolicy, StageObservation
from ttamer_jax.core.struct import pytree_dataclass

DIRECTIONS = ("above", "below")


@pytree_dataclass(static=("direction",))
class ThresholdPolicy(LastStagePolicy):
  """Exit at the first stage whose score crosses that stage's threshold; answer = last.

  Attributes:
    thresholds: ``[n]`` float threshold per stage.
    direction: static; ``"above"`` (confidence, e.g. max-softmax: stop iff
      ``score >= thresholds[stage]``) or ``"below"`` (uncertainty, e.g. entropy:
      stop iff ``score <= thresholds[stage]``).
  """

  thresholds: chex.Array
  direction: str = "above"

  observes = "signals"
  grid_field = "thresholds"
  grid_field_ndim = 1

  def __post_init__(self):
    if self.direction not in DIRECTIONS:
      raise ValueError(f"direction: must be one of {DIRECTIONS}, got {self.direction!r}")
    if validation.is_concrete(self.thresholds):
      t = validation.as_numpy("thresholds", self.thresholds)
      if t.ndim < 1 or t.shape[-1] < 1:
        raise ValueError(f"thresholds: expected shape [n] (or [P, n] for a grid), got {t.shape}")
      if np.isnan(t).any():
        raise ValueError(f"thresholds{np.argwhere(np.isnan(t))[0].tolist()} is nan")
      # The session's float (float64 under jax_enable_x64): a float64 score equal to its
      # threshold must compare equal, not against a float32-rounded copy.
      object.__setattr__(self, "thresholds", validation.device_array(t, default_float()))

  @property
  def num_stages(self) -> int:
    return self.thresholds.shape[-1]

  def step(self, carry, stage, obs: StageObservation, best):
    t = self.thresholds[stage]
    stop = obs.score >= t if self.direction == "above" else obs.score <= t
    return carry, stop


def _shared_threshold(threshold, num_stages: int) -> chex.Array:
  """``[n]`` copies of one threshold; a traced one (tuning inside ``jit``) is
  broadcast as it is, its rank checked."""
  n = validation.check_positive_int("num_stages", num_stages)
  if validation.is_concrete(threshold):
    return np.full((n,), validation.as_float_scalar("threshold", threshold))
  if np.ndim(threshold) != 0:
    raise ValueError(f"threshold: expected a number, got shape {np.shape(threshold)}")
  return jnp.full((n,), threshold, default_float())


def confidence_threshold(threshold, num_stages: int) -> ThresholdPolicy:
  """One confidence threshold for every stage: exit once ``score >= threshold``.

  Args:
    threshold: ``[]`` confidence to exit at (may be traced).
    num_stages: ``n``.

  Returns:
    A :class:`ThresholdPolicy` with ``thresholds [n]``, ``direction="above"``.
  """
  return ThresholdPolicy(thresholds=_shared_threshold(threshold, num_stages), direction="above")


def per_stage_thresholds(thresholds, direction: str = "above") -> ThresholdPolicy:
  """A threshold per stage (``[n]``).

  Args:
    thresholds: ``[n]`` threshold of each stage (may be traced).
    direction: ``"above"`` (stop iff ``score >= t``) or ``"below"``.

  Returns:
    A :class:`ThresholdPolicy` with ``thresholds [n]``.
  """
  if validation.is_concrete(thresholds):
    thresholds = validation.as_numpy("thresholds", thresholds, ndim=1)
  elif np.ndim(thresholds) != 1:
    raise ValueError(f"thresholds: expected shape [n], got {np.shape(thresholds)}")
  return ThresholdPolicy(thresholds=thresholds, direction=direction)


def entropy_threshold(threshold, num_stages: int) -> ThresholdPolicy:
  """One entropy threshold: exit once the exit's entropy ``<= threshold``."""
  return ThresholdPolicy(thresholds=_shared_threshold(threshold, num_stages), direction="below")


@pytree_dataclass(static=("num_stages",))
class PatiencePolicy(LastStagePolicy):
  """Exit once the last ``patience`` consulted exits gave the same prediction.

  ``patience = 1`` exits at the first stage; PABEE's patience ``t`` is ``t + 1``
  here. The carry holds each request's current run length and last prediction.

  Attributes:
    patience: ``[]`` int32 run length to exit at (>= 1); ``[P]`` for a grid of
      ``P`` policies.
    num_stages: static number of stages ``n``.
  """

  patience: chex.Array
  num_stages: int

  observes = "signals"
  grid_field = "patience"

  def __post_init__(self):
    object.__setattr__(self, "num_stages",
                       validation.check_positive_int("num_stages", self.num_stages))
    if validation.is_concrete(self.patience):
      p = validation.as_numpy("patience", self.patience, kind="int")
      if p.size and p.min() < 1:
        raise ValueError(f"patience = {p.min()} must be >= 1")
      object.__setattr__(self, "patience", validation.device_array(p, np.int32))

  def initial_carry(self, batch_size: int):
    return (jnp.zeros((batch_size,), jnp.int32), jnp.full((batch_size,), -1, jnp.int32))

  def step(self, carry, stage, obs: StageObservation, best):
    run, prev = carry
    same = (stage > 0) & (obs.pred == prev)
    run = jnp.where(same, run + 1, 1)
    return (run, obs.pred.astype(jnp.int32)), run >= self.patience


@pytree_dataclass(static=("num_stages",))
class FixedExitPolicy(LastStagePolicy):
  """Always answer with stage ``exit_stage`` (0-based), consulting stages ``0..exit_stage``.

  Attributes:
    exit_stage: ``[]`` int32; ``[P]`` for a grid of ``P`` policies.
    num_stages: static number of stages ``n``.
  """

  exit_stage: chex.Array
  num_stages: int

  observes = "nothing"
  grid_field = "exit_stage"

  def __post_init__(self):
    n = validation.check_positive_int("num_stages", self.num_stages)
    object.__setattr__(self, "num_stages", n)
    if validation.is_concrete(self.exit_stage):
      k = validation.as_numpy("exit_stage", self.exit_stage, kind="int")
      if k.size and (k.min() < 0 or k.max() >= n):
        raise ValueError(f"exit_stage = {int(k.min() if k.min() < 0 else k.max())} outside 0..{n - 1}")
      object.__setattr__(self, "exit_stage", validation.device_array(k, np.int32))

  def step(self, carry, stage, obs: StageObservation, best):
    return carry, jnp.broadcast_to(stage >= self.exit_stage, obs.state.shape)


@pytree_dataclass(static=("num_stages",))
class HindsightPolicy:
  """Per-sample oracle on recorded traces: the hindsight optimum as a policy.

  It consults stages ``0..stop_stage[r]`` of request ``r`` and answers with the
  consulted stage of least *true* loss (replay feeds the true losses as
  ``obs.score``; ``observes = "true_losses"``). Not deployable: ``stop_stage`` was
  chosen knowing every stage's loss. Replay it on the very traces (same order)
  it was built from.

  Attributes:
    stop_stage: ``[N]`` int32 last stage consulted for each recorded request.
    num_stages: static number of stages ``n``.
  """

  stop_stage: chex.Array
  num_stages: int

  recall = True
  observes = "true_losses"
  num_states = None
  batch_shape = ()

  def estimate(self, stage, obs: StageObservation):
    return obs.score

  def initial_carry(self, batch_size: int):
    if self.stop_stage.shape[-1] != batch_size:
      raise ValueError(f"HindsightPolicy: built for {self.stop_stage.shape[-1]} requests, replayed "
                       f"on {batch_size} (replay it on the traces it was built from)")
    return self.stop_stage

  def step(self, carry, stage, obs: StageObservation, best):
    return carry, stage >= carry


def hindsight_stops(losses: np.ndarray, costs: np.ndarray, lams: np.ndarray) -> np.ndarray:
  """``[L, N]`` per-request hindsight stop stage for each ``lam``.

  ``argmin_k lam * min_{j<=k} l_j + (1-lam) * (c_0 + .. + c_k)``; ties pick the
  earliest ``k``. Inputs are validated float64 arrays: ``losses [N, n]``,
  ``costs [n]`` or ``[N, n]``, ``lams [L]``.
  """
  best = np.minimum.accumulate(losses, axis=1)
  cum = np.cumsum(np.broadcast_to(costs, losses.shape), axis=1)
  return np.stack([np.argmin(lam * best + (1 - lam) * cum, axis=1) for lam in lams])


def check_losses_and_costs(losses: Any, costs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 ``(losses [N, n], costs [n] or [N, n])``."""
  losses = validation.as_numpy("losses", losses, ndim=2).astype(np.float64)
  if losses.shape[0] < 1 or losses.shape[1] < 1:
    raise ValueError(f"losses: expected [N, n] with N, n >= 1, got shape {losses.shape}")
  validation.check_finite("losses", losses)
  costs = validation.as_numpy("costs", costs).astype(np.float64)
  if costs.shape not in ((losses.shape[1],), losses.shape):
    raise ValueError(f"costs: expected shape ({losses.shape[1]},) or {losses.shape}, got {costs.shape}")
  validation.check_nonnegative("costs", costs)
  return losses, costs


def hindsight_policy(losses: Any, costs: Any, lam) -> HindsightPolicy:
  """The per-request optimum ``argmin_k lam * min_{j<=k} l_j + (1-lam) * (c_0+..+c_k)``.

  Ties pick the earliest ``k``, so the answer is the earliest stage of least loss.
  Runs on the host (float64 stops per request).

  Args:
    losses: ``[N, n]`` true losses.
    costs: ``[n]`` or ``[N, n]`` stage costs.
    lam: ``[]`` trade-off weight in [0, 1].

  Returns:
    A :class:`HindsightPolicy` with ``stop_stage [N]``: replay it on the same
    requests, in the same order.
  """
  validation.refuse_traced("hindsight_policy", "inside jit, ttamer_jax.prophet_value is the "
                           "hindsight optimum of a model (docs/jit.md)", losses=losses,
                           costs=costs, lam=lam)
  validation.check_scalar_lam(lam)
  losses, costs = check_losses_and_costs(losses, costs)
  stops = hindsight_stops(losses, costs, np.asarray([float(lam)]))[0]
  return HindsightPolicy(stop_stage=jnp.asarray(stops, jnp.int32), num_stages=losses.shape[1])
