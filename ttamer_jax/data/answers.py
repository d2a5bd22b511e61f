"""Posterior-answer stages: which consulted exit to answer with, from the joint evidence.

A recall policy over score bins answers with the consulted exit of least
*modelled* loss, where each exit's loss is a function of its own score bin only.
When exits make correlated mistakes, or when a later exit's agreement tells us
something about an earlier one, that choice is biased. Here (DESIGN.md section 5)
the answer is chosen on the joint evidence instead:

* after consulting exits ``0..i``, a small logistic calibrator estimates
  ``q[i, j] = P(exit j wrong | evidence of exits 0..i)`` for every consulted ``j``
  (one calibrator per pair ``(i, j)``; features below);
* *virtual stage* ``i`` answers with the ``j`` of least ``q[i, j]`` (the earliest on
  ties); its score is ``1 - q[i, j*]``, its prediction exit ``j*``'s, its loss
  exit ``j*``'s true loss;
* the virtual stages are ordinary exit traces (:meth:`AnswerModel.transform`), so
  binning, fitting, the exact solvers, replay and selection run on them
  unchanged: optimal stopping over virtual stages is an exact policy of a model
  stated in full, and it still "recalls" earlier exits.

Features of pair ``(i, j)`` (standardised with the training mean and spread):
``1``, ``s_j``, ``logit(s_j)`` (scores clipped to ``[1e-4, 1 - 1e-4]`` when they
lie in ``[0, 1]``, else ``s_j`` again), ``s_i``, ``[p_j = p_i]``, the share of
consulted exits predicting ``p_j``, and the highest score among them.

Calibrators must not see the requests they score during fitting (the states
would be optimistic): :func:`cross_fitted_transform` gives out-of-fold virtual
traces for fitting, :func:`fit_answer_model` the model applied to new traffic.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.discretise import trace_scores
from ttamer_jax.data.traces import ExitTraces

NUM_FEATURES = 7
# Ridge penalty of the calibrators, per training request (keeps Newton steps
# finite on separable folds; small against the data term).
RIDGE = 1e-3
# Newton stops once no coefficient moved by more than NEWTON_TOL (relative to 1 +
# its size): quadratic convergence leaves the next step at rounding level. At most
# NEWTON_STEPS steps (5-6 suffice on real traces; 12 bounds hard, near-separable folds).
NEWTON_STEPS = 12
NEWTON_TOL = 1e-4
_CLIP = 1e-4


def pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
  """``(i [P], j [P])`` of every pair ``j <= i`` (``P = n (n + 1) / 2``), row-major in ``i``."""
  i, j = np.tril_indices(n)
  return i.astype(np.int32), j.astype(np.int32)


def pair_features(scores: chex.Array, preds: chex.Array, unit: bool) -> chex.Array:
  """``[N, P, D]`` unstandardised features of every pair (jnp, traceable)."""
  n = scores.shape[1]
  pi, pj = pair_indices(n)
  s_j, s_i = scores[:, pj], scores[:, pi]
  logit = (jnp.log(jnp.clip(s_j, _CLIP, 1 - _CLIP)) - jnp.log1p(-jnp.clip(s_j, _CLIP, 1 - _CLIP))
           if unit else s_j)
  same = (preds[:, :, None] == preds[:, None, :])                        # [N, k, j]
  consulted = jnp.arange(n)[None, :] <= jnp.asarray(pi)[:, None]         # [P, k]
  agree_k = same[:, :, pj].transpose(0, 2, 1) & consulted[None]          # [N, P, k]
  share = agree_k.sum(-1) / (jnp.asarray(pi) + 1)[None, :]
  support = jnp.max(jnp.where(agree_k, scores[:, None, :], -jnp.inf), axis=-1)
  agree_now = (preds[:, pj] == preds[:, pi]).astype(scores.dtype)
  ones = jnp.ones_like(s_j)
  return jnp.stack([ones, s_j, logit, s_i, agree_now, share.astype(scores.dtype), support], -1)


@pytree_dataclass(static=("score_name", "unit_scores"))
class AnswerModel:
  """Calibrated posterior error of every consulted exit, per virtual stage.

  Attributes:
    weights: ``[P, D]`` logistic weights of pair ``p = (i, j)`` (``j <= i``, row-major
      in ``i``; ``P = n (n+1) / 2``, ``D`` = :data:`NUM_FEATURES`).
    mean: ``[P, D]`` feature means of the training requests (column 0: 0).
    scale: ``[P, D]`` feature spreads (column 0: 1).
    loss_scale: ``[]`` losses are divided by it before calibration (1 for 0/1 losses).
    score_name: static name of the exit signal the evidence reads.
    unit_scores: static; the scores lie in ``[0, 1]`` (a logit feature is used).
  """

  weights: chex.Array
  mean: chex.Array
  scale: chex.Array
  loss_scale: chex.Array
  score_name: str = "scores"
  unit_scores: bool = True

  @property
  def num_stages(self) -> int:
    p = self.weights.shape[-2]
    return int(round((np.sqrt(8 * p + 1) - 1) / 2))

  def posteriors(self, scores: chex.Array, preds: chex.Array) -> chex.Array:
    """``[N, n, n]`` ``q[r, i, j]``: estimated expected loss (scaled back) of answering
    with exit ``j`` after consulting ``0..i``; ``+inf`` for ``j > i``."""
    return _posteriors(self, jnp.asarray(scores), jnp.asarray(preds, jnp.int32))

  def transform(self, traces: ExitTraces) -> ExitTraces:
    """The virtual-stage traces of ``traces`` (see the module docstring).

    ``scores`` (and the signal ``"posterior_confidence"``) is ``1 - q[i, j*]`` scaled
    to the loss scale; signal ``"answer_stage"`` is ``j*``; costs are unchanged.
    """
    if not isinstance(traces, ExitTraces):
      raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
    if traces.num_stages != self.num_stages:
      raise ValueError(f"traces: have {traces.num_stages} stages but the answer model was "
                       f"fitted on {self.num_stages}")
    scores = np.asarray(trace_scores(traces, self.score_name))
    conf, answer = (np.asarray(x) for x in posterior_answers(self, jnp.asarray(scores),
                                                     jnp.asarray(traces.preds)))
    rows = np.arange(traces.num_samples)[:, None]
    preds = np.asarray(traces.preds)[rows, answer]
    losses = np.asarray(traces.losses)[rows, answer]
    return ExitTraces(scores=conf, preds=preds, losses=losses, costs=traces.costs,
                      signals={"posterior_confidence": conf, "answer_stage": answer.astype(float)},
                      labels=traces.labels)


def pair_logits(raw, weights, mean, scale):
  """``[N, P]`` calibrator logits of raw pair features ``[N, P, D]`` under standardised
  ``weights``, ``mean``, ``scale`` (``[P, D]``, or ``[N, P, D]`` per request)."""
  return jnp.sum((raw - mean) / scale * weights, axis=-1)


def _pair_table(q, n):
  """``[N, n, n]`` table of the pair values ``q [N, P]`` (``+inf`` for ``j > i``)."""
  pi, pj = pair_indices(n)
  out = jnp.full((q.shape[0], n, n), jnp.inf, q.dtype)
  return out.at[:, pi, pj].set(q)


@jax.jit
def _posteriors(model: AnswerModel, scores, preds):
  raw = pair_features(scores, preds, model.unit_scores)
  q = jax.nn.sigmoid(pair_logits(raw, model.weights, model.mean, model.scale))
  return _pair_table(q * model.loss_scale, scores.shape[1])


def answers_from_logits(logits, n: int):
  """``(confidence [N, n], answer [N, n])`` of every virtual stage from the pair
  logits ``[N, P]`` (losses on the calibration scale)."""
  return _least_posterior(_pair_table(jax.nn.sigmoid(logits), n))     # q: [N, n, n]


def _least_posterior(q):
  """``(1 - q[..., j*], j*)``: the answering exit ``j*`` of least posterior error along
  the last axis of ``q`` (the earliest on ties) and its confidence."""
  answer = jnp.argmin(q, axis=-1).astype(jnp.int32)
  best = jnp.take_along_axis(q, answer[..., None], axis=-1)[..., 0]
  return 1.0 - best, answer


def stage_answers(model: AnswerModel, stage: int, scores, preds):
  """``(confidence [N], answer [N] int32)`` of virtual stage ``stage`` alone (traceable).

  ``scores``/``preds`` ``[N, m]`` (``m > stage``) hold the evidence of exits
  ``0..stage`` in their first columns (later columns are ignored: a server fills
  them as it goes). Column ``stage`` of :func:`posterior_answers`, computed from
  the calibrators of the pairs ``(stage, 0..stage)`` only -- what a server needs
  after running exit ``stage``. ``stage`` is static.
  """
  m = stage + 1
  # The last m pairs of the (m-exit) prefix are (stage, 0..stage); their features
  # read exits 0..stage only, so they equal those of the full pair table.
  raw = pair_features(scores[:, :m], preds[:, :m], model.unit_scores)[:, -m:]
  rows = slice(stage * m // 2, stage * m // 2 + m)   # pair (stage, 0) is row stage (stage+1)/2
  q = jax.nn.sigmoid(pair_logits(raw, model.weights[rows], model.mean[rows], model.scale[rows]))
  return _least_posterior(q)                                          # q: [N, m]


@jax.jit
def posterior_answers(model: AnswerModel, scores, preds):
  """``(confidence [N, n], answer [N, n])`` of every virtual stage (compiled; traced
  inputs welcome, e.g. every calibrator of a cross-fitting batch)."""
  raw = pair_features(scores, preds, model.unit_scores)
  return answers_from_logits(pair_logits(raw, model.weights, model.mean, model.scale),
                             scores.shape[1])


# ------------------------------------------------------------------ fitting
@functools.partial(jax.jit, static_argnums=(3,))
def _newton(feats, targets, weights, steps: int):
  """Ridge logistic regression by Newton's method for every pair at once.

  ``feats [P, N, D]`` (standardised), ``targets [P, N]`` in ``[0, 1]`` (soft labels),
  ``weights [N]`` request weights (0 for padding). Returns ``[P, D]``.
  """
  d = feats.shape[-1]
  ridge = RIDGE * jnp.sum(weights) * jnp.eye(d).at[0, 0].set(0.0)

  def one(x, y):
    def step(w):
      p = jax.nn.sigmoid(x @ w)
      grad = x.T @ (weights * (p - y)) + ridge @ w
      hess = (x * (weights * p * (1 - p))[:, None]).T @ x + ridge + 1e-6 * jnp.eye(d)
      return w - jnp.linalg.solve(hess, grad)

    return newton(step, jnp.zeros((d,), x.dtype), steps)

  return jax.vmap(one)(feats, targets)


def newton(step, w0, max_steps: int):
  """Iterates ``w <- step(w)`` from ``w0`` until no entry moves by more than
  :data:`NEWTON_TOL` relative to ``1 + |w|``, at most ``max_steps`` times."""
  def cond(state):
    k, _, moved = state
    return (k < max_steps) & (moved > NEWTON_TOL)

  def body(state):
    k, w, _ = state
    new = step(w)
    moved = jnp.max(jnp.abs(new - w) / (1.0 + jnp.abs(new)))
    return k + 1, new, jnp.where(jnp.isfinite(moved), moved, 0.0).astype(moved.dtype)

  return jax.lax.while_loop(cond, body, (0, w0, jnp.asarray(jnp.inf, w0.dtype)))[1]


def _bucket(num: int) -> int:
  """Padded request count (a few compiled shapes for any data size)."""
  return max(256, 1 << int(np.ceil(np.log2(num))))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fit_pairs(scores, preds, losses, weights, unit: bool, steps: int):
  """Standardisation and logistic weights of every pair, on padded requests
  (``weights`` 0 on padding). Returns ``(weights [P, D], mean [P, D], scale [P, D])``."""
  n = scores.shape[1]
  raw = pair_features(scores, preds, unit)                               # [N, P, D]
  total = jnp.sum(weights)
  mean = jnp.einsum("n,npd->pd", weights, raw) / total
  var = jnp.einsum("n,npd->pd", weights, (raw - mean) ** 2) / total
  scale = jnp.sqrt(var)
  mean = mean.at[:, 0].set(0.0)
  scale = jnp.where(scale > 1e-12, scale, 1.0).at[:, 0].set(1.0)
  feats = ((raw - mean) / scale).transpose(1, 0, 2)                       # [P, N, D]
  _, pj = pair_indices(n)
  targets = jnp.clip(losses[:, pj], 0.0, 1.0).T                           # [P, N]
  return _newton(feats, targets, weights, steps), mean, scale


def calibration_scales(scores: np.ndarray, losses: np.ndarray) -> tuple[bool, float]:
  """``(unit, loss_scale)``: whether the scores lie in ``[0, 1]`` (a logit feature is
  used), and what losses are divided by before calibration (1 for 0/1 losses)."""
  unit = bool(scores.min() >= 0 and scores.max() <= 1)
  return unit, float(max(losses.max(), 1e-12)) if losses.max() > 1 else 1.0


def fit_answer_model(traces: ExitTraces, *, score: str | None = None) -> AnswerModel:
  """Fits the posterior calibrators of every pair ``(i, j)`` on ``traces``.

  Args:
    traces: calibration traces (losses >= 0; 0/1 errors or expected losses).
    score: the exit signal the evidence reads (default: the primary ``scores``).

  Returns:
    An :class:`~ttamer_jax.data.AnswerModel` (``weights``, ``mean``, ``scale``
    ``[P, D]`` for the ``P`` stage pairs).
  """
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  name = "scores" if score is None else score
  scores = np.asarray(trace_scores(traces, name), np.float64)
  preds = np.asarray(traces.preds)
  losses = np.asarray(traces.losses, np.float64)
  num, n = scores.shape
  if num < 2:
    raise ValueError(f"traces: need at least 2 requests to fit an answer model, got {num}")
  unit, loss_scale = calibration_scales(scores, losses)
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  pad = _bucket(num) - num
  padded = lambda x: np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
  weights = np.concatenate([np.ones(num), np.zeros(pad)])
  w, mean, scale = _fit_pairs(jnp.asarray(padded(scores), dtype), jnp.asarray(padded(preds), jnp.int32),
                              jnp.asarray(padded(losses) / loss_scale, dtype),
                              jnp.asarray(weights, dtype), unit, NEWTON_STEPS)
  return AnswerModel(weights=np.asarray(w), mean=np.asarray(mean), scale=np.asarray(scale),
                     loss_scale=np.asarray(loss_scale), score_name=name, unit_scores=unit)


def fold_ids(key: chex.PRNGKey, num: int, folds: int) -> np.ndarray:
  """``[num]`` fold of each request: a random permutation cut into ``folds`` near-equal parts.

  Drawn with NumPy from a seed of ``key`` (deterministic given ``key``): a JAX
  permutation would compile a program for every new ``num``."""
  folds = validation.check_positive_int("folds", folds)
  if folds < 2 or folds > num:
    raise ValueError(f"folds = {folds} must lie in [2, N = {num}]")
  perm = np.random.default_rng(validation.key_seed(key)).permutation(num)
  out = np.empty(num, np.int32)
  out[perm] = np.arange(num) % folds
  return out


def cross_fitted_transform(traces: ExitTraces, folds: Any, *, score: str | None = None
                           ) -> ExitTraces:
  """Virtual traces of ``traces`` in which each request's posteriors come from
  calibrators fitted on the *other* folds (``folds [N]`` fold ids)."""
  folds = np.asarray(folds)
  parts, order = [], []
  for f in np.unique(folds):
    held = np.flatnonzero(folds == f)
    model = fit_answer_model(traces.subset(np.flatnonzero(folds != f)), score=score)
    parts.append(model.transform(traces.subset(held)))
    order.append(held)
  order = np.concatenate(order)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(order.size)
  return concat_traces(parts).subset(inverse)


def concat_traces(parts: list[ExitTraces]) -> ExitTraces:
  """The requests of several traces of the same stages, in order."""
  first = parts[0]
  cat = lambda xs: np.concatenate([np.asarray(x) for x in xs])
  costs = (first.costs if all(np.ndim(p.costs) == 1 and np.array_equal(p.costs, first.costs)
                              for p in parts)
           else cat([p.cost_matrix() for p in parts]))
  names = set(first.signals)
  signals = {k: cat([p.signals[k] for p in parts]) for k in names
             if all(k in p.signals for p in parts)}
  labels = None if any(p.labels is None for p in parts) else cat([p.labels for p in parts])
  return ExitTraces(scores=cat([p.scores for p in parts]), preds=cat([p.preds for p in parts]),
                    losses=cat([p.losses for p in parts]), costs=costs, signals=signals,
                    labels=labels)
