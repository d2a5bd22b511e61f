"""From raw exit scores to the discrete states the solvers work on.

A :class:`Discretiser` is fitted on calibration traces (see ``fitting``) and reused
unchanged at serving time, so a request gets the same state online as it would
have got in the traces. A :class:`DeployedPolicy` bundles it with a line policy and
the name of the exit signal it reads -- everything serving needs.

Score names: ``"scores"`` means the primary ``ExitTraces.scores`` field; any other
name is looked up in ``ExitTraces.signals`` (see :func:`trace_scores`).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.protocol import LinePolicy, StageObservation
from ttamer_jax.core.struct import pytree_dataclass

FEATURES = (None, "agree_prev", "agree_best")
PRIMARY_SCORE = "scores"


def _validated_edges(edges) -> chex.Array:
  arr = validation.as_numpy("edges", edges, ndim=2)
  if arr.shape[0] < 1:
    raise ValueError(f"edges: expected at least one stage, got shape {arr.shape}")
  validation.check_finite("edges", arr)
  if arr.shape[1] > 1:
    bad = np.diff(arr, axis=1) < 0
    if bad.any():
      i, j = np.argwhere(bad)[0]
      raise ValueError(f"edges[{i}, {j + 1}] = {float(arr[i, j + 1])!r} < edges[{i}, {j}] = {float(arr[i, j])!r} "
                       "(bin edges must be non-decreasing along each stage)")
  return validation.device_array(validation.to_float("edges", arr, np.float32))


@pytree_dataclass(static=("feature",))
class Discretiser:
  """Per-stage score bins, optionally crossed with a small categorical feature.

  Attributes:
    edges: ``[n, B-1]`` float32 sorted inner bin edges of each stage; a score's
      bin is ``searchsorted(edges[i], score, side="right")`` in ``0..B-1``.
    feature: static; ``None`` (state = bin), ``"agree_prev"`` or ``"agree_best"``:
      state = ``2 * bin + agree`` where ``agree`` is 1 when the exit's prediction
      equals the *reference* prediction -- the previous exit's (``agree_prev``), or
      the most confident earlier exit's, the one of highest score so far, i.e. the
      incumbent a confidence-ordered recall answers with (``agree_best``); always 0
      at the first stage, so ``K = 2 B``.
  """

  edges: chex.Array
  feature: Any = None

  def __post_init__(self):
    if self.feature not in FEATURES:
      raise ValueError(f"feature: must be one of {FEATURES}, got {self.feature!r}")
    if validation.is_concrete(self.edges):
      object.__setattr__(self, "edges", _validated_edges(self.edges))

  @classmethod
  def single_bin(cls, num_stages: int, feature: Any = None) -> "Discretiser":
    """Every score in one bin (``K = 1``): the discretiser of score-reading heuristics."""
    n = validation.check_positive_int("num_stages", num_stages)
    return cls(edges=np.zeros((n, 0), np.float32), feature=feature)

  @classmethod
  def identity(cls, num_stages: int, num_states: int) -> "Discretiser":
    """States you already know: integer scores ``0..K-1`` are their own states (edges at
    ``0.5, 1.5, ..., K - 1.5`` on every stage)."""
    n = validation.check_positive_int("num_stages", num_stages)
    k = validation.check_positive_int("num_states", num_states)
    return cls(edges=np.broadcast_to(np.arange(k - 1) + 0.5, (n, k - 1)).astype(np.float32))

  @property
  def num_stages(self) -> int:
    return self.edges.shape[-2]

  @property
  def num_bins(self) -> int:
    return self.edges.shape[-1] + 1

  @property
  def num_states(self) -> int:
    return self.num_bins * (1 if self.feature is None else 2)

  def stage_states(self, stage, score, pred=None, ref_pred=None) -> chex.Array:
    """``[B]`` int32 states at ``stage`` from ``[B]`` scores and, with a feature, the
    predictions and the reference predictions (:func:`reference_preds`)."""
    # Compared in the edges' float32, so a float64 session bins as a float32 one does.
    score = jnp.asarray(score).astype(self.edges.dtype)
    bins = jnp.searchsorted(self.edges[stage], score, side="right").astype(jnp.int32)
    if self.feature is None:
      return bins
    if pred is None or ref_pred is None:
      agree = jnp.zeros_like(bins)
    else:
      agree = jnp.where(stage > 0, (pred == ref_pred).astype(jnp.int32), 0)
    return 2 * bins + agree

  def reference_preds(self, scores: chex.Array, preds: chex.Array) -> chex.Array:
    """``[N, n]`` the prediction each stage is compared with (column 0: unused)."""
    if self.feature == "agree_best":
      # The most confident of the earlier exits (the first on ties).
      best = jax.lax.cummax(scores, axis=1)
      prior = jnp.concatenate([jnp.full_like(scores[:, :1], -jnp.inf), best[:, :-1]], axis=1)
      pos = jnp.arange(scores.shape[1])
      earlier = pos[None, None, :] < pos[None, :, None]                   # [1, i, j]: j < i
      hit = earlier & (scores[:, None, :] >= prior[:, :, None])
      j = jnp.argmax(hit, axis=-1)                                         # first j reaching it
      return jnp.take_along_axis(preds, j, axis=1)
    return jnp.concatenate([preds[:, :1], preds[:, :-1]], axis=1)      # the previous exit

  def host_states(self, scores: Any, preds: Any = None) -> np.ndarray:
    """``[N, n]`` int32 states computed in NumPy on the host: the same states as
    :meth:`__call__` (float32 comparisons, first-on-ties references) without a
    compiled program per input shape -- what fitting and selection use on concrete
    traces."""
    edges = np.asarray(self.edges, np.float32)
    raw = np.asarray(scores)
    scores = raw.astype(np.float32)
    num, n = scores.shape
    if n != self.num_stages:
      raise ValueError(f"scores: has {n} stages but the discretiser has {self.num_stages}")
    bins = np.stack([np.searchsorted(edges[i], scores[:, i], side="right") for i in range(n)],
                    axis=1).astype(np.int32)
    if self.feature is None:
      return bins
    if preds is None:
      return 2 * bins
    preds = np.asarray(preds)
    if self.feature == "agree_best":
      # Reference of stage i: the first earlier exit whose score reaches the running maximum.
      # Compared in JAX's default float, as reference_preds compares.
      ref = raw.astype(jax.dtypes.canonicalize_dtype(np.float64))
      best = np.maximum.accumulate(ref, axis=1)
      prior = np.concatenate([np.full((num, 1), -np.inf, ref.dtype), best[:, :-1]], axis=1)
      pos = np.arange(n)
      hit = (pos[None, None, :] < pos[None, :, None]) & (ref[:, None, :] >= prior[:, :, None])
      refs = np.take_along_axis(preds, np.argmax(hit, axis=-1), axis=1)
    else:
      refs = np.concatenate([preds[:, :1], preds[:, :-1]], axis=1)
    agree = (preds == refs).astype(np.int32)
    agree[:, 0] = 0
    return 2 * bins + agree

  def __call__(self, scores: chex.Array, preds: chex.Array | None = None) -> chex.Array:
    """``[N, n]`` int32 states of every sample at every stage (a NumPy array for NumPy
    input: binned on the host, :meth:`host_states`, without a program per shape)."""
    if isinstance(scores, np.ndarray) and (preds is None or isinstance(preds, np.ndarray)) \
        and validation.is_concrete(self.edges) and scores.ndim == 2:
      return self.host_states(scores, preds)
    scores = jnp.asarray(scores)
    n = scores.shape[1]
    if validation.is_concrete(scores) and n != self.num_stages:
      raise ValueError(f"scores: has {n} stages but the discretiser has {self.num_stages}")
    refs = None if preds is None or self.feature is None else self.reference_preds(
        scores, jnp.asarray(preds))
    cols = []
    for i in range(n):
      pred = None if preds is None else preds[:, i]
      ref = None if refs is None or i == 0 else refs[:, i]
      cols.append(self.stage_states(i, scores[:, i], pred, ref))
    return jnp.stack(cols, axis=1)


def trace_scores(traces, name: str | None) -> chex.Array:
  """``[N, n]`` the score signal ``name`` of ``traces`` (``None``/``"scores"``: primary)."""
  if name is None or name == PRIMARY_SCORE:
    return traces.scores
  signals = dict(traces.signals or {})
  if not isinstance(name, str) or name not in signals:
    raise ValueError(f"signals: the traces have no signal named {name!r} "
                     f"(have {sorted(signals)}; 'scores' is the primary score)")
  return signals[name]


@pytree_dataclass(static=("score_name",))
class DeployedPolicy:
  """A line policy ready to serve: read ``score_name``, discretise, decide.

  Attributes:
    policy: any :class:`~ttamer_jax.core.LinePolicy` over the discretiser's states.
    discretiser: maps exit scores (and predictions) to the policy's states.
    score_name: static name of the exit signal the discretiser reads
      (``"max_softmax"``, ``"entropy"``, ``"error_prob"``, ...; ``"scores"`` is the
      traces' primary score field). With ``answers``, a signal of the virtual traces.
    answers: ``None`` (the stages are the exits), or an
      :class:`~ttamer_jax.data.AnswerModel`: the policy's stages are its virtual
      posterior-answer stages (:meth:`stage_traces`).
  """

  policy: LinePolicy
  discretiser: Discretiser
  score_name: str = "max_softmax"
  answers: Any = None

  @property
  def num_stages(self) -> int:
    return self.policy.num_stages

  @property
  def num_states(self) -> int:
    return self.discretiser.num_states

  def stage_traces(self, traces):
    """The traces the policy's stages see: ``traces`` itself, or their virtual
    posterior-answer stages when the policy has an answer model."""
    return traces if self.answers is None else self.answers.transform(traces)

  def observe(self, stage, score, pred, prev_pred=None, top_pred=None) -> StageObservation:
    """The :class:`StageObservation` of a batch at ``stage``; ``prev_pred``: the previous
    exit's predictions, ``top_pred``: those of the most confident earlier exit (the
    discretiser's feature says which it reads)."""
    ref = top_pred if self.discretiser.feature == "agree_best" else prev_pred
    state = self.discretiser.stage_states(stage, score, pred, ref)
    return StageObservation(state=state, score=score, pred=pred.astype(jnp.int32))

  def observations(self, traces) -> tuple[chex.Array, chex.Array, chex.Array]:
    """``(states, scores, preds)``, each ``[N, n]``, of recorded traces (already
    the :meth:`stage_traces` when the policy has an answer model)."""
    scores = trace_scores(traces, self.score_name)
    return self.discretiser(scores, traces.preds), scores, traces.preds


def check_consistent(deployed: DeployedPolicy, where: str = "deployed") -> tuple[int, int]:
  """``(n, K)`` of a :class:`DeployedPolicy` whose policy and discretiser agree.

  Raises ``ValueError`` when they were built for different numbers of stages or
  states: the policy would read thresholds of states the discretiser never
  produces, or JAX would clamp states the policy has no row for.
  """
  if not isinstance(deployed, DeployedPolicy):
    raise ValueError(f"{where}: expected a DeployedPolicy, got {type(deployed).__name__}")
  n = deployed.policy.num_stages
  if deployed.discretiser.num_stages != n:
    raise ValueError(f"{where}: the policy has {n} stages but the discretiser "
                     f"{deployed.discretiser.num_stages}")
  k = deployed.policy.num_states
  if k is not None and k != deployed.discretiser.num_states:
    raise ValueError(f"{where}: the policy has {k} states but the discretiser "
                     f"{deployed.discretiser.num_states}")
  return n, deployed.discretiser.num_states
