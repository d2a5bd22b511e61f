"""Differentiable relaxations (DESIGN.md section 7).

Two families:

* **Soft-min dynamic programming.** The recall and no-recall recursions with each
  stop-or-continue ``min`` replaced by ``softmin_beta(a, b) = -beta log(e^{-a/beta}
  + e^{-b/beta})``. ``softmin_beta <= min <= softmin_beta + beta log 2`` and the
  recursion is 1-Lipschitz, so for a line of ``n`` stages

      0 <= J_exact - J_soft(beta) <= (n - 1) * beta * log 2      (``soft_min_error_bound``)

  and ``J_soft`` is smooth in costs, losses and transition logits: the optimal
  serving cost becomes a training signal. The bookkeeping ``min(x, lam l)`` of the
  best-so-far is kept exact: it is not a decision.

* **Soft heuristic policies.** A threshold rule "stop at stage i iff score_i >= t_i"
  relaxed to ``P(stop at i | reached i) = sigmoid((score_i - t_i) / tau)``; the
  expected objective over stages is exact given those probabilities, so it is
  differentiable in the thresholds. A recall variant answers with a soft-argmax
  (temperature ``answer_tau``) of the consulted exits' scores. ``tune_thresholds``
  optimises thresholds with optax while annealing ``tau``, and the *hard* policy
  with the tuned thresholds is what gets reported.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import counting, kernel, validation
from ttamer_jax.core.kernel import DEFAULT_PRECISION
from ttamer_jax.core.model import Cascade


def softmin(a: chex.Array, b: chex.Array, beta) -> chex.Array:
  """``-beta * log(exp(-a/beta) + exp(-b/beta))``: a smooth lower bound on ``min(a, b)``.

  Args:
    a, b: arrays of one broadcast shape ``[...]``.
    beta: ``[]`` temperature > 0 (``min <= softmin + beta log 2``).

  Returns:
    ``[...]`` the soft minimum, elementwise.
  """
  return -beta * jnp.logaddexp(-a / beta, -b / beta)


def soft_min_error_bound(num_stages: int, beta: float) -> float:
  """Bound on ``J_exact - J_soft``: one softmin per stage boundary, each off by <= beta log 2.

  Args:
    num_stages: ``n`` stages of the line.
    beta: the soft-min temperature of :func:`soft_solve_recall`.

  Returns:
    ``(n - 1) * beta * log 2`` as a Python float.
  """
  return max(num_stages - 1, 0) * beta * math.log(2.0)


def _check(cascade, lam, beta):
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  validation.check_scalar_lam(lam)
  if validation.is_concrete(beta):
    b = np.asarray(beta)
    if b.ndim != 0 or not np.isfinite(b) or b < 0:
      raise ValueError(f"beta = {beta!r} must be a finite scalar >= 0")


# beta == 0 is the exact DP (jnp.minimum); keeping both under one jitted body means
# the exact value and its envelope-theorem gradient come from the same code.
_choose = kernel.soft_choose


def soft_solve_recall(cascade: Cascade, lam, beta, *, extra_costs: Any = None,
                      precision=DEFAULT_PRECISION) -> chex.Array:
  """Soft-min value of the recall recursion; ``beta = 0`` gives the exact value.

  The x-grid is every ``values`` entry unsorted (``M = n K``), so each grid row
  belongs to exactly one (stage, state) and gradients w.r.t. ``values`` land on
  the entry they came from.

  Args:
    cascade: the line (its fields may be traced: use inside ``jax.grad``).
    lam: trade-off weight in [0, 1].
    beta: soft-min temperature >= 0.
    extra_costs: optional ``[n]`` unweighted costs added when stage ``i`` is
      consulted; ``d J / d extra_costs`` at 0 is the probability that the optimal
      policy consults each stage (envelope theorem), see
      :func:`consult_probabilities`.
    precision: ``jax.lax.Precision`` of the matrix products.

  Returns:
    ``[]`` soft value, within ``soft_min_error_bound(n, beta)`` below the exact
    recall optimum ``J*``; smooth in ``values``, ``trans``, ``costs`` and ``lam``.
  """
  _check(cascade, lam, beta)
  n = cascade.values.shape[-2]
  extra = jnp.zeros((n,), cascade.values.dtype) if extra_costs is None else jnp.asarray(extra_costs)
  return _soft_recall(cascade, lam, jnp.asarray(beta, cascade.values.dtype), extra, precision)


@functools.partial(jax.jit, static_argnums=(4,))
def _soft_recall(cascade, lam, beta, extra, precision):
  values = cascade.values
  n, k = values.shape
  grid = values.reshape(-1)                                  # [M = nK], unsorted
  pos = jnp.arange(n * k, dtype=jnp.int32).reshape(n, k)     # grid row of values[i, s]
  continuation = lambda g, t_mat: jnp.einsum("xt,st->xs", g, t_mat, precision=precision)
  v_first, _ = kernel.backward_scan(
      lam * grid, grid, pos, values, (1 - lam) * cascade.costs[1:] + extra[1:], cascade.trans,
      continuation, beta=beta)
  return kernel.line_value(v_first, pos[0], cascade.init,
                           (1 - lam) * cascade.costs[0] + extra[0], precision)


def soft_solve_no_recall(cascade: Cascade, lam, beta, *, precision=DEFAULT_PRECISION) -> chex.Array:
  """Soft-min value of the no-recall recursion; ``beta = 0`` gives the exact value.

  Args:
    cascade: the line (its fields may be traced: use inside ``jax.grad``).
    lam: ``[]`` trade-off weight in [0, 1].
    beta: ``[]`` soft-min temperature >= 0.
    precision: ``jax.lax.Precision`` of the matrix products.

  Returns:
    ``[]`` soft value, within ``soft_min_error_bound(n, beta)`` below the exact
    no-recall optimum; smooth in ``values``, ``trans``, ``costs`` and ``lam``.
  """
  _check(cascade, lam, beta)
  return _soft_no_recall(cascade, lam, jnp.asarray(beta, cascade.values.dtype), precision)


@functools.partial(jax.jit, static_argnums=(3,))
def _soft_no_recall(cascade, lam, beta, precision):
  values, costs = cascade.values, cascade.costs

  def backward(w_next, stage):
    t_mat, l_here, c_next = stage
    cont = (1 - lam) * c_next + jnp.dot(t_mat, w_next, precision=precision)
    return _choose(lam * l_here, cont, beta), None

  w_first, _ = jax.lax.scan(backward, lam * values[-1], (cascade.trans, values[:-1], costs[1:]),
                            reverse=True)
  return (1 - lam) * costs[0] + jnp.dot(cascade.init, w_first, precision=precision)


def consult_probabilities(cascade: Cascade, lam) -> chex.Array:
  """``[n]`` probability that the exact recall-optimal policy consults each stage.

  By the envelope theorem this is the gradient of ``J*`` w.r.t. an unweighted
  per-stage cost at 0 -- the exact derivative the soft DP's cost gradients approach
  (``d J* / d c_i = (1 - lam) * consult_probabilities[i]``).

  Args:
    cascade: the line, ``n`` stages.
    lam: ``[]`` trade-off weight in [0, 1].

  Returns:
    ``[n]`` probabilities (stage 0: 1) in the cascade's dtype.
  """
  validation.check_scalar_lam(lam)
  n = cascade.num_stages
  return jax.grad(lambda e: soft_solve_recall(cascade, lam, 0.0, extra_costs=e))(
      jnp.zeros((n,), cascade.values.dtype))


def cascade_from_logits(values, init_logits, trans_logits, costs) -> Cascade:
  """A cascade whose distributions are softmaxes of logits (differentiable parameters).

  Args:
    values: ``[n, K]`` loss of each (stage, state), >= 0.
    init_logits: ``[K]`` logits of stage 1's state distribution.
    trans_logits: ``[n-1, K, K]`` logits of each transition row.
    costs: ``[n]`` stage costs, >= 0.

  Returns:
    A :class:`~ttamer_jax.Cascade` with ``init = softmax(init_logits)`` and
    ``trans = softmax(trans_logits, axis=-1)``.
  """
  return Cascade(values=values, init=jax.nn.softmax(init_logits, axis=-1),
                 trans=jax.nn.softmax(trans_logits, axis=-1), costs=costs)


# ------------------------------------------------------------ soft heuristics
def stop_distribution(stop_probs: chex.Array) -> chex.Array:
  """P(stop exactly at stage i) from per-stage P(stop | reached); the last stage stops.

  Args:
    stop_probs: ``[..., n]`` probability of stopping at each stage once reached.

  Returns:
    ``[..., n]`` probability of stopping exactly at each stage (sums to 1).
  """
  p = stop_probs.at[..., -1].set(1.0)
  reach = jnp.cumprod(1.0 - p, axis=-1)
  reach = jnp.concatenate([jnp.ones_like(reach[..., :1]), reach[..., :-1]], axis=-1)
  return reach * p


def threshold_objective(thresholds: chex.Array, scores: chex.Array, losses: chex.Array,
                        costs: chex.Array, lam, tau, *, recall: bool = False,
                        answer_tau=None) -> chex.Array:
  """Expected objective of "stop at the first stage with score_i >= t_i" on traces.

  Args:
    thresholds: ``[n]`` (or scalar: one threshold for every stage).
    scores: ``[N, n]`` confidence per exit (higher = more confident; negate
      entropies or error estimates).
    losses: ``[N, n]`` true losses. costs: ``[n]`` or ``[N, n]``.
    lam: trade-off weight.
    tau: relaxation temperature; ``0`` gives the hard rule (ties stop).
    recall: answer with the most confident consulted exit (soft-argmax with
      temperature ``answer_tau``; hard argmax, earliest on ties, when ``tau == 0``
      or ``answer_tau`` is None) instead of the last one.

  Returns:
    ``[]`` mean over samples of ``lam * loss_answered + (1 - lam) * cost``.
  """
  thresholds = jnp.broadcast_to(thresholds, scores.shape[-1:])
  if isinstance(tau, (int, float)) and tau == 0:
    p = (scores >= thresholds).astype(scores.dtype)
  else:
    p = jax.nn.sigmoid((scores - thresholds) / tau)
  stop = stop_distribution(p)                                   # [N, n]
  cum_cost = jnp.cumsum(jnp.broadcast_to(costs, scores.shape), axis=-1)
  if recall:
    answer = _recalled_loss(scores, losses, None if (isinstance(tau, (int, float)) and tau == 0)
                            else answer_tau)
  else:
    answer = losses
  return jnp.mean(jnp.sum(stop * (lam * answer + (1 - lam) * cum_cost), axis=-1))


def _recalled_loss(scores, losses, answer_tau):
  """``[N, n]`` loss answered when stopping at i: the most confident of exits 0..i."""
  n = scores.shape[-1]
  mask = jnp.tril(jnp.ones((n, n), bool))                         # [stop i, exit j<=i]
  s = jnp.where(mask, scores[..., None, :], -jnp.inf)             # [N, n, n]
  if answer_tau is None:
    best = jnp.argmax(s, axis=-1)                                 # earliest on ties
    return jnp.take_along_axis(losses, best, axis=-1)
  w = jax.nn.softmax(s / answer_tau, axis=-1)
  return jnp.sum(w * losses[..., None, :], axis=-1)


def threshold_objective_on_cascade(thresholds: chex.Array, state_scores: chex.Array,
                                   cascade: Cascade, lam, tau) -> chex.Array:
  """Exact expected objective of a (soft) no-recall threshold rule on a cascade.

  One forward pass of the chain with the continuing mass:
  ``m_{i+1} = (m_i * (1 - p_i)) @ trans_i``.

  Args:
    thresholds: ``[n]`` (or ``[]``: one for every stage) thresholds.
    state_scores: ``[n, K]`` confidence the rule reads in each (stage, state).
    cascade: the line, ``n`` stages of ``K`` states.
    lam: ``[]`` trade-off weight in [0, 1].
    tau: relaxation temperature; ``0`` gives the hard rule (ties stop).

  Returns:
    ``[]`` expected ``lam * loss + (1 - lam) * cost`` of the rule on the cascade,
    smooth in ``thresholds`` for ``tau > 0``.
  """
  n, _ = cascade.values.shape
  thresholds = jnp.broadcast_to(thresholds, (n,))
  if isinstance(tau, (int, float)) and tau == 0:
    p = (state_scores >= thresholds[:, None]).astype(state_scores.dtype)
  else:
    p = jax.nn.sigmoid((state_scores - thresholds[:, None]) / tau)
  p = p.at[-1].set(1.0)
  cum_cost = jnp.cumsum(cascade.costs)
  total = jnp.zeros((), cascade.values.dtype)
  mass = cascade.init
  for i in range(n):
    stage_obj = lam * cascade.values[i] + (1 - lam) * cum_cost[i]
    total = total + jnp.dot(mass * p[i], stage_obj)
    if i < n - 1:
      mass = jnp.dot(mass * (1 - p[i]), cascade.trans[i], precision=DEFAULT_PRECISION)
  return total


def recall_threshold_objective_on_cascade(thresholds: chex.Array, state_scores: chex.Array,
                                          cascade: Cascade, lam, tau) -> chex.Array:
  """Exact expected objective of the (soft) recall-threshold hybrid on a cascade.

  The hybrid stops at stage ``i`` in state ``s`` with probability
  ``sigmoid((state_scores[i, s] - t_i) / tau)`` (hard ``>=`` when ``tau == 0``) and
  answers with the consulted stage of least modelled loss (``values``; ties keep
  the earlier stage) -- a threshold rule that *recalls*. The forward pass carries
  the mass of (which (stage, state) is the best so far, current state): an
  ``[n K, K]`` table, one ``[nK, K] @ [K, K]`` product per stage.

  Args:
    thresholds: ``[n]`` (or ``[]``: one for every stage) thresholds.
    state_scores: ``[n, K]`` confidence the rule reads in each (stage, state).
    cascade: the line, ``n`` stages of ``K`` states.
    lam: ``[]`` trade-off weight in [0, 1].
    tau: relaxation temperature; ``0`` gives the hard rule.

  Returns:
    ``[]`` expected ``lam * recalled loss + (1 - lam) * cost`` on the cascade.
  """
  values = cascade.values
  n, k = values.shape
  thresholds = jnp.broadcast_to(thresholds, (n,))
  if isinstance(tau, (int, float)) and tau == 0:
    p = (state_scores >= thresholds[:, None]).astype(values.dtype)
  else:
    p = jax.nn.sigmoid((state_scores - thresholds[:, None]) / tau)
  p = p.at[-1].set(1.0)
  grid = values.reshape(-1)                                       # row i*K+s <-> (i, s)
  rows = jnp.arange(n * k).reshape(n, k)
  cum_cost = jnp.cumsum(cascade.costs)
  mass = jnp.zeros((n * k, k), values.dtype).at[rows[0], jnp.arange(k)].set(cascade.init)
  total = jnp.zeros((), values.dtype)
  for i in range(n):
    total = total + jnp.sum(mass * p[i][None, :] * (lam * grid[:, None] + (1 - lam) * cum_cost[i]))
    if i < n - 1:
      flow = jnp.dot(mass * (1 - p[i])[None, :], cascade.trans[i], precision=DEFAULT_PRECISION)
      keep = grid[:, None] <= values[i + 1][None, :]              # old best stays best
      moved = jnp.sum(jnp.where(keep, 0.0, flow), axis=0)         # [K] new stage is the best
      mass = jnp.where(keep, flow, 0.0).at[rows[i + 1], jnp.arange(k)].add(moved)
  return total


def tune_thresholds_on_cascade(key: chex.PRNGKey, cascade: Cascade, state_scores: Any, lam, *,
                               recall: bool = False, restarts: int = 8, steps: int = 300,
                               learning_rate: float = 0.05, tau_start: float = 0.1,
                               tau_end: float = 1e-3) -> TuningResult:
  """:func:`tune_thresholds` with the exact expectation on a cascade instead of traces.

  ``state_scores [n, K]`` is the confidence a threshold rule reads in each (stage,
  state); the objective is :func:`threshold_objective_on_cascade` (no recall) or
  :func:`recall_threshold_objective_on_cascade` (recall hybrid), so the reported
  hard objective has no sampling error.

  Args:
    key: PRNG key of the restarts' initial thresholds.
    cascade: the line, ``n`` stages of ``K`` states.
    state_scores: ``[n, K]`` confidence the rule reads in each (stage, state).
    lam: ``[]`` trade-off weight in [0, 1].
    recall, restarts, steps, learning_rate, tau_start, tau_end: as for
      :func:`tune_thresholds` (``tau`` in units of each stage's score spread).

  Returns:
    A :class:`TuningResult` (``thresholds [n]`` in ``state_scores`` units).
  """
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  validation.check_scalar_lam(lam)
  restarts = validation.check_positive_int("restarts", restarts)
  steps = validation.check_positive_int("steps", steps)
  scores = jnp.asarray(state_scores, cascade.values.dtype)
  if scores.shape != cascade.values.shape:
    raise ValueError(f"state_scores: expected shape {cascade.values.shape}, got {scores.shape}")
  objective = recall_threshold_objective_on_cascade if recall else threshold_objective_on_cascade
  mu, sd = scores.mean(1), scores.std(1) + 1e-6
  z = (scores - mu[:, None]) / sd[:, None]
  n = z.shape[0]
  init = jax.random.uniform(key, (restarts, n), minval=-1.5, maxval=1.5)
  taus = jnp.geomspace(tau_start, tau_end, steps)
  import optax  # the tuners need it; the rest of the library does not.

  tx = optax.adam(learning_rate)

  def run(t0):
    def step(carry, tau):
      t, opt_state = carry
      value, grad = jax.value_and_grad(lambda t: objective(t, z, cascade, lam, tau))(t)
      updates, opt_state = tx.update(grad, opt_state, t)
      return (optax.apply_updates(t, updates), opt_state), value

    (t, _), curve = jax.lax.scan(step, (t0, tx.init(t0)), taus)
    return t, curve

  final_z, curves = jax.jit(jax.vmap(run))(init)
  hard = jax.vmap(lambda t: objective(t, z, cascade, lam, 0))(final_z)
  final = final_z * sd + mu
  best = jnp.argmin(hard)
  return TuningResult(thresholds=final[best], hard_objective=hard[best], restart_thresholds=final,
                      restart_hard_objectives=hard, soft_curve=curves)


def exhaustive_thresholds_on_cascade(cascade: Cascade, state_scores: Any, lam, *,
                                     recall: bool = False, max_candidates: int = 200_000):
  """Best hard per-stage thresholds by enumerating every distinct rule.

  A hard rule only depends on which states of each stage pass, i.e. on the rank of
  ``t_i`` among stage ``i``'s ``K`` scores: ``(K + 1)^(n-1)`` rules (the last stage
  always stops).

  Args:
    cascade: the line, ``n`` stages of ``K`` states.
    state_scores: ``[n, K]`` confidence the rule reads in each (stage, state).
    lam: ``[]`` trade-off weight in [0, 1].
    recall: score the recall hybrid (:func:`recall_threshold_objective_on_cascade`).
    max_candidates: refuse (``ValueError``) above this many rules.

  Returns:
    ``(thresholds [n], objective [])``, JAX arrays in the cascade's dtype (like
    :func:`grid_search_threshold`); the last threshold is ``-inf``.
  """
  scores = np.asarray(state_scores, np.float64)
  n, k = scores.shape
  count = (k + 1) ** (n - 1)
  if count > max_candidates:
    raise ValueError(f"state_scores: {count} threshold rules exceed max_candidates = {max_candidates}")
  levels = [np.concatenate([np.unique(scores[i]), [np.inf]]) for i in range(n - 1)]
  grids = np.stack(np.meshgrid(*levels, indexing="ij"), -1).reshape(-1, n - 1) if n > 1 else np.zeros((1, 0))
  cands = np.concatenate([grids, np.full((grids.shape[0], 1), -np.inf)], axis=1)
  objective = recall_threshold_objective_on_cascade if recall else threshold_objective_on_cascade
  z = jnp.asarray(scores, cascade.values.dtype)
  objs = jax.jit(jax.vmap(lambda t: objective(t, z, cascade, lam, 0)))(
      jnp.asarray(cands, cascade.values.dtype))
  best = int(jnp.argmin(objs))
  return jnp.asarray(cands[best], cascade.values.dtype), objs[best]


# ----------------------------------------------------------------- tuning
@chex.dataclass(frozen=True)
class TuningResult:
  """Outcome of :func:`tune_thresholds`.

  Attributes:
    thresholds: ``[n]`` best thresholds (by the *hard* objective on the tuning data).
    hard_objective: ``[]`` hard objective of ``thresholds`` on the tuning data.
    restart_thresholds: ``[R, n]`` final thresholds of every restart.
    restart_hard_objectives: ``[R]`` their hard objectives.
    soft_curve: ``[R, steps]`` soft objective along the optimisation.
  """

  thresholds: chex.Array
  hard_objective: chex.Array
  restart_thresholds: chex.Array
  restart_hard_objectives: chex.Array
  soft_curve: chex.Array


def tune_thresholds(key: chex.PRNGKey, scores, losses, costs, lam, *, recall: bool = False,
                    shared: bool = False, restarts: int = 8, steps: int = 300,
                    learning_rate: float = 0.05, tau_start: float = 0.1, tau_end: float = 1e-3,
                    answer_tau: float = 0.02) -> TuningResult:
  """Gradient-tunes per-stage (or one shared) thresholds on traces with optax.

  Scores are standardised per stage internally so one learning rate fits any
  scale. Each restart starts from thresholds at random per-stage quantiles of the
  scores; Adam runs ``steps`` steps while ``tau`` anneals geometrically from
  ``tau_start`` to ``tau_end`` (in standardised units). The hard policy of every
  restart is then evaluated and the best kept.

  Args:
    key: PRNG key of the restarts' initial quantiles.
    scores: ``[N, n]`` confidence per exit (higher = more confident).
    losses: ``[N, n]`` true losses.
    costs: ``[n]`` or ``[N, n]`` stage costs.
    lam: ``[]`` trade-off weight in [0, 1].
    recall: tune the recall variant of :func:`threshold_objective`.
    shared: one threshold for every stage instead of one per stage.
    restarts: ``R`` random starts; steps: Adam steps per start.
    learning_rate: Adam's step size (standardised units).
    tau_start, tau_end: the annealed relaxation temperature.
    answer_tau: soft-argmax temperature of the recalled answer.

  Returns:
    A :class:`TuningResult`: ``thresholds [n]`` in raw score units, the hard
    objective ``[]``, and per restart ``[R, n]`` thresholds, ``[R]`` hard objectives,
    ``[R, steps]`` soft curves.
  """
  scores = jnp.asarray(scores, jnp.float32)
  losses = jnp.asarray(losses, jnp.float32)
  costs = jnp.asarray(costs, jnp.float32)
  restarts = validation.check_positive_int("restarts", restarts)
  steps = validation.check_positive_int("steps", steps)
  validation.check_scalar_lam(lam)
  n = scores.shape[-1]
  mu, sd = scores.mean(0), scores.std(0) + 1e-6
  z = (scores - mu) / sd
  quantiles = jax.random.uniform(key, (restarts, 1 if shared else n), minval=0.05, maxval=0.95)
  sorted_z = jnp.sort(z, axis=0)                                   # [N, n]
  rows = (quantiles * (z.shape[0] - 1)).astype(jnp.int32)
  init = jnp.take_along_axis(sorted_z.T[None] if not shared else sorted_z.T[None, :1],
                             rows[..., None], axis=-1)[..., 0]      # [R, n or 1]
  taus = jnp.geomspace(tau_start, tau_end, steps)
  import optax  # the tuners need it; the rest of the library does not.

  tx = optax.adam(learning_rate)

  def soft(t, tau):
    return threshold_objective(t, z, losses, costs, lam, tau, recall=recall, answer_tau=answer_tau)

  def run(t0):
    def step(carry, tau):
      t, opt_state = carry
      value, grad = jax.value_and_grad(soft)(t, tau)
      updates, opt_state = tx.update(grad, opt_state, t)
      return (optax.apply_updates(t, updates), opt_state), value

    (t, _), curve = jax.lax.scan(step, (t0, tx.init(t0)), taus)
    return t, curve

  final_z, curves = jax.jit(jax.vmap(run))(init)
  hard = jax.vmap(lambda t: threshold_objective(t, z, losses, costs, lam, 0, recall=recall))(final_z)
  final = jnp.broadcast_to(final_z, (restarts, n)) * sd + mu        # back to raw score units
  best = jnp.argmin(hard)
  return TuningResult(thresholds=final[best], hard_objective=hard[best], restart_thresholds=final,
                      restart_hard_objectives=hard, soft_curve=curves)


def grid_search_threshold(scores, losses, costs, lam, *, recall: bool = False,
                          num_candidates: int = 256) -> tuple[chex.Array, chex.Array]:
  """Best single threshold over ``num_candidates`` score quantiles (plus +inf: never
  stop early).

  Args:
    scores: ``[N, n]`` confidence per exit (higher = more confident).
    losses: ``[N, n]`` true losses.
    costs: ``[n]`` or ``[N, n]`` stage costs.
    lam: ``[]`` trade-off weight in [0, 1].
    recall: score the recall variant of :func:`threshold_objective`.
    num_candidates: quantiles of all scores tried.

  Returns:
    ``(threshold [], hard objective [])`` as float32 JAX arrays.
  """
  scores = jnp.asarray(scores, jnp.float32)
  candidates = jnp.quantile(scores.reshape(-1), jnp.linspace(0.0, 1.0, num_candidates))
  candidates = jnp.concatenate([candidates, jnp.array([jnp.inf])])
  objs = jax.vmap(lambda t: threshold_objective(t, scores, jnp.asarray(losses, jnp.float32),
                                                jnp.asarray(costs, jnp.float32), lam, 0,
                                                recall=recall))(candidates)
  best = jnp.argmin(objs)
  return candidates[best], objs[best]


# ------------------------------------------------------- training-loop surrogate
def soft_fitted_cascade(confidence: chex.Array, error: chex.Array, costs: chex.Array, *,
                        num_states: int = 8, width: float | None = None,
                        smoothing: float = 1.0) -> Cascade:
  """A cascade fitted to one batch with *soft* bin memberships (differentiable).

  Each request's confidence at each exit is spread over ``num_states`` bins on
  ``[0, 1]`` with Gaussian memberships of ``width`` (default: one bin width); the
  fit then mirrors :func:`ttamer_jax.fit_cascade`: calibrated loss per (exit, bin)
  = membership-weighted mean ``error`` (shrunk to the exit's mean by ``smoothing``
  pseudo-requests), and ``init``/``trans`` = Laplace-smoothed soft counts. Every
  field is a smooth function of ``confidence`` and ``error``.

  Args:
    confidence: ``[B, n]`` per-exit confidence in ``[0, 1]`` (e.g. max-softmax).
    error: ``[B, n]`` per-exit loss to calibrate (e.g. ``1 - p(true label)``).
    costs: ``[n]`` per-stage costs.
    num_states: ``K`` states (uniform bins on ``[0, 1]``), static.
    width: the memberships' Gaussian width (default ``1 / K``).
    smoothing: pseudo-requests of the Laplace / shrinkage smoothing.

  Returns:
    A :class:`~ttamer_jax.Cascade` with ``values [n, K]``, ``init [K]``,
    ``trans [n-1, K, K]`` and ``costs [n]``, differentiable in ``confidence``,
    ``error`` and ``costs``.
  """
  centers = (jnp.arange(num_states) + 0.5) / num_states
  width = 1.0 / num_states if width is None else width
  q = jax.nn.softmax(-0.5 * ((confidence[..., None] - centers) / width) ** 2, axis=-1)  # [B, n, K]
  ones = jnp.ones(num_states, q.dtype)
  values, init, trans, _ = counting.fitted_tables(q, error, jnp.ones(q.shape[0], q.dtype), ones, ones,
                                                  smoothing, smoothing)
  return Cascade(values=values, init=init, trans=trans, costs=costs)


def batch_serving_cost(logits: chex.Array, labels: chex.Array, costs: chex.Array, lam, *,
                       beta: float = 0.01, num_states: int = 8, width: float | None = None,
                       smoothing: float = 1.0) -> chex.Array:
  """Differentiable optimal serving cost of an early-exit network on one batch.

  Fits :func:`soft_fitted_cascade` to the batch's exits (confidence = max-softmax,
  loss = ``1 - p(label)``) and returns its soft-min recall value
  :func:`soft_solve_recall` at temperature ``beta``: the objective the optimal
  recall policy would reach if the batch were the calibration set. Fixed uniform
  bins on ``[0, 1]`` and a smooth loss: :func:`ttamer_jax.serving_loss` is the same
  value with the ingredients that get deployed (the deployed bins, the 0/1 loss, any
  exit signal); docs/training.md measures whether either pays.

  Args:
    logits: ``[B, n, C]`` class logits of every exit.
    labels: ``[B]`` int true classes.
    costs: ``[n]`` stage costs >= 0, any unit: divided by their sum, so ``lam`` has none.
    lam: ``[]`` trade-off weight in [0, 1] (validated when concrete; may be traced).
    beta: soft-min temperature of the recursion.
    num_states, width, smoothing: as for :func:`soft_fitted_cascade`.

  Returns:
    ``[]`` the soft optimal recall value, differentiable in ``logits`` and ``costs``.
  """
  validation.check_scalar_lam(lam)
  probs = jax.nn.softmax(logits, axis=-1)
  confidence = probs.max(-1)
  p_true = jnp.take_along_axis(probs, labels[:, None, None].astype(jnp.int32), axis=-1)[..., 0]
  shares = counting.unit_free(jnp.asarray(costs, probs.dtype))
  cascade = soft_fitted_cascade(confidence, 1.0 - p_true, shares, num_states=num_states,
                                width=width, smoothing=smoothing)
  return _soft_recall(cascade, lam, jnp.asarray(beta, cascade.values.dtype),
                      jnp.zeros_like(cascade.costs), DEFAULT_PRECISION)
