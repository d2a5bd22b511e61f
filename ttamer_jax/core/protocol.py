"""The line-policy protocol: what replay, Monte-Carlo, serving and evaluation need.

Solver policies (:class:`~ttamer_jax.core.RecallPolicy`, :class:`~ttamer_jax.core.NoRecallPolicy`),
the heuristics people deploy (:mod:`ttamer_jax.core.heuristics`), randomised
mixtures and the hindsight oracle all implement :class:`LinePolicy`, so one
replay loop runs them all, inside ``jit`` and over batches of requests.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import chex
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import default_float
from ttamer_jax.core.struct import pytree_dataclass

# What a policy reads after each stage (``LinePolicy.observes``):
#   "states"      discretised states (solver policies: need the discretiser they were fitted with);
#   "signals"     raw exit scores / predictions (heuristics; a Cascade does not model them);
#   "nothing"     neither (a fixed exit);
#   "true_losses" the true per-request losses (the hindsight oracle: replay only, never served).
OBSERVES = ("states", "signals", "nothing", "true_losses")


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



@runtime_checkable
class LinePolicy(Protocol):
  """A stopping rule over a line of stages, for a batch of ``B`` requests.

  Attributes:
    recall: ``True``: answer with the consulted stage of least :meth:`estimate`;
      ``False``: answer with the last consulted stage.
    observes: one of :data:`OBSERVES` (what :meth:`step` reads).
    num_stages: ``n`` the policy was built for.
    num_states: ``K`` of its state tables, ``None`` when it ignores states.
    batch_shape: leading grid axes of its parameters (``()`` for one policy; a
      grid of heuristics replays with ``jax.vmap`` over them).

  The last stage always stops, whatever :meth:`step` says.
  """

  recall: bool
  observes: str

  @property
  def num_stages(self) -> int: ...

  @property
  def num_states(self) -> int | None: ...

  @property
  def batch_shape(self) -> tuple[int, ...]: ...

  def estimate(self, stage: Any, obs: StageObservation) -> chex.Array:
    """``[B]`` loss estimate of answering with ``stage`` (read only when ``recall``)."""

  def initial_carry(self, batch_size: int) -> Any:
    """Per-request memory before the first stage (may be ``()``)."""

  def step(self, carry: Any, stage: Any, obs: StageObservation, best: chex.Array
           ) -> tuple[Any, chex.Array]:
    """``(carry, stop [B] bool)`` after consulting ``stage``; ``best`` is the least
    estimate so far, this stage included."""


class LastStagePolicy:
  """The :class:`LinePolicy` members every no-recall policy shares, in one place.

  A policy that answers with the last consulted stage reads no loss estimate and,
  unless it overrides them, keeps no per-request memory and no state table. A
  subclass names the array field that holds its parameters (``grid_field``) and
  that field's rank for one policy (``grid_field_ndim``); leading axes beyond it
  are the grid (``batch_shape``). It still defines ``observes``, ``num_stages``
  and ``step``.
  """

  recall = False
  num_states = None
  grid_field = ""
  grid_field_ndim = 0

  @property
  def batch_shape(self) -> tuple[int, ...]:
    shape = np.shape(getattr(self, self.grid_field))
    return tuple(shape[:len(shape) - self.grid_field_ndim])

  def estimate(self, stage: Any, obs: StageObservation) -> chex.Array:
    """``[B]`` zeros: without recall the answer is the last stage, whatever its estimate."""
    return jnp.zeros(obs.state.shape, default_float())

  def initial_carry(self, batch_size: int) -> Any:
    """``()``: no per-request memory."""
    return ()


def check_line_policy(policy: Any, name: str = "policy") -> LinePolicy:
  """``policy`` implements :class:`LinePolicy` (``ValueError`` naming ``name`` otherwise)."""
  if not isinstance(policy, LinePolicy):
    raise ValueError(f"{name}: expected a line policy (ttamer_jax.core.LinePolicy), got "
                     f"{type(policy).__name__}")
  if policy.observes not in OBSERVES:
    raise ValueError(f"{name}: observes = {policy.observes!r} is not one of {OBSERVES}")
  return policy


def check_single_policy(policy: LinePolicy, name: str = "policy") -> None:
  """A grid of policies (leading parameter axes) must not reach a replay of requests."""
  if policy.batch_shape != ():
    raise ValueError(f"{name}: this {type(policy).__name__} is a grid of policies (batch shape "
                     f"{policy.batch_shape}); replay one at a time, jax.vmap over the grid, or "
                     "use ttamer_jax.evaluation.sweep_policies")
