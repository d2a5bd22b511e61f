"""Exact evaluation of policies on a model, and robustness to a wrong model.

* :func:`policy_metrics`: exact ``E[loss]`` and ``E[cost]`` of a state-reading
  policy on a :class:`~ttamer_jax.Cascade` by a forward pass over the mass of
  (best-so-far identity, state) -- separately, as SLO constraints need them.
* :func:`perturb_cascade`, :func:`model_robustness`, :func:`split_robustness`.
* :func:`aggregation_report`: soft state aggregation scored exactly on the true model.
"""

from __future__ import annotations

import time
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core.factored import aggregate_cascade, solve_recall_aggregated
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.policies import MixturePolicy, RecallPolicy
from ttamer_jax.core.progress import progress_iter
from ttamer_jax.core.protocol import StageObservation, check_line_policy
from ttamer_jax.core.solvers import solve_recall
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.discretise import DeployedPolicy
from ttamer_jax.data.traces import ExitTraces
from ttamer_jax.evaluation.metrics import compare


@pytree_dataclass
class PolicyMetrics:
  """Exact expectations of a policy on a cascade.

  Attributes:
    loss: ``[]`` ``E[loss of the answered stage]`` (the cascade's ``values``).
    cost: ``[]`` ``E[cost of the consulted stages]``.
    stop_histogram: ``[n]`` ``P(last consulted stage = i)``.
    answer_histogram: ``[n]`` ``P(answered by stage i)``.
  """

  loss: chex.Array
  cost: chex.Array
  stop_histogram: chex.Array
  answer_histogram: chex.Array

  def objective(self, lam) -> chex.Array:
    return lam * self.loss + (1 - lam) * self.cost


def _combine(parts):
  return jax.tree_util.tree_map(lambda *xs: sum(w * x for (w, _), x in zip(parts, xs)),
                                *[m for _, m in parts])


def policy_metrics(cascade: Cascade, policy) -> PolicyMetrics:
  """Exact ``E[loss]``, ``E[cost]`` and histograms of ``policy`` on ``cascade``.

  ``policy`` is a line policy over the cascade's states whose decision depends on
  the stage, the state and the best-so-far estimate only (recall or no-recall
  solver policies, possibly built from a *different* model, fixed exits) or a
  randomised mixture of such policies (``mixture_components``). Its own
  ``estimate`` picks the recalled answer (ties: earliest stage); the loss counted
  is the cascade's ``values`` of that stage and state.

  With recall, the forward pass carries the mass of (identity of the best stage
  so far ``(j, s_j)``, current state): ``[n K, K]`` per stage, one ``[nK, K] x [K, K]``
  product per stage. Without recall, a ``[K]`` vector.

  Args:
    cascade: the model, ``n`` stages of ``K`` states.
    policy: as above.

  Returns:
    A :class:`~ttamer_jax.evaluation.PolicyMetrics`: ``loss []``, ``cost []``, the
    ``stop`` and ``answer`` histograms ``[n]``.
  """
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a Cascade, got {type(cascade).__name__}")
  if isinstance(policy, DeployedPolicy):
    raise ValueError("policy: pass the DeployedPolicy's .policy (a cascade models states, not scores)")
  if isinstance(policy, MixturePolicy):
    return _combine([(w, policy_metrics(cascade, p)) for w, p in policy.mixture_components()])
  check_line_policy(policy)
  if policy.observes in ("signals", "true_losses"):
    raise ValueError(f"policy: {type(policy).__name__} reads raw scores or predictions, which a "
                     "Cascade does not model; evaluate it on traces instead")
  if policy.num_stages != cascade.num_stages:
    raise ValueError(f"policy: built for {policy.num_stages} stages, the cascade has {cascade.num_stages}")
  k = policy.num_states
  if k is not None and k != cascade.num_states:
    raise ValueError(f"policy: its tables have {k} states, the cascade has {cascade.num_states}")
  if jax.tree_util.tree_leaves(policy.initial_carry(1)):
    raise ValueError(f"policy: {type(policy).__name__} keeps per-request memory; exact evaluation "
                     "supports memoryless policies")
  fn = recall_metrics_compiled if policy.recall else no_recall_metrics_compiled
  return fn(cascade, policy)


def _observation(states):
  return StageObservation(state=states, score=jnp.zeros(states.shape), pred=jnp.zeros(states.shape, jnp.int32))


@jax.jit
def no_recall_metrics_compiled(cascade: Cascade, policy) -> PolicyMetrics:
  """:func:`policy_metrics` of a no-recall line policy (trusted; traceable)."""
  values, trans, costs = cascade.values, cascade.trans, cascade.costs
  n, k = values.shape
  states = jnp.arange(k, dtype=jnp.int32)
  mass = cascade.init
  loss = jnp.zeros((), values.dtype)
  cost = costs[0]
  stop_hist = []
  for i in range(n):
    if i < n - 1:
      _, stop = policy.step((), i, _observation(states), jnp.zeros(k, values.dtype))
    else:
      stop = jnp.ones(k, bool)
    stopped = jnp.where(stop, mass, 0.0)
    loss = loss + jnp.dot(stopped, values[i])
    stop_hist.append(stopped.sum())
    if i < n - 1:
      cont = mass - stopped
      cost = cost + costs[i + 1] * cont.sum()
      mass = jnp.dot(cont, trans[i], precision=jax.lax.Precision.HIGHEST)
  hist = jnp.stack(stop_hist)
  return PolicyMetrics(loss=loss, cost=cost, stop_histogram=hist, answer_histogram=hist)


@jax.jit
def recall_metrics_compiled(cascade: Cascade, policy) -> PolicyMetrics:
  """:func:`policy_metrics` of a memoryless recall line policy (trusted; traceable)."""
  values, trans, costs = cascade.values, cascade.trans, cascade.costs
  n, k = values.shape
  m = n * k
  states = jnp.arange(k, dtype=jnp.int32)
  est = jnp.stack([policy.estimate(i, _observation(states)) for i in range(n)]).astype(values.dtype)
  est_flat, true_flat = est.reshape(m), values.reshape(m)
  grid_states = jnp.tile(states, m)                      # state of row-major (identity, state)
  grid_best = jnp.repeat(est_flat, k)                    # best-so-far estimate of the identity
  diag = jnp.arange(k)
  mass = jnp.zeros((m, k), values.dtype).at[diag, diag].set(cascade.init)
  loss = jnp.zeros((), values.dtype)
  cost = costs[0]
  stop_hist, answer = [], jnp.zeros((m,), values.dtype)
  for i in range(n):
    if i < n - 1:
      _, stop = policy.step((), i, _observation(grid_states), grid_best)
      stop = stop.reshape(m, k)
    else:
      stop = jnp.ones((m, k), bool)
    stopped = jnp.where(stop, mass, 0.0)
    by_identity = stopped.sum(axis=1)
    loss = loss + jnp.dot(by_identity, true_flat)
    answer = answer + by_identity
    stop_hist.append(by_identity.sum())
    if i < n - 1:
      cont = mass - stopped
      cost = cost + costs[i + 1] * cont.sum()
      moved = jnp.dot(cont, trans[i], precision=jax.lax.Precision.HIGHEST)   # [identity, next state]
      better = est[i + 1][None, :] < est_flat[:, None]                       # strict: ties keep earlier
      mass = jnp.where(better, 0.0, moved)
      mass = mass.at[(i + 1) * k + diag, diag].add(jnp.where(better, moved, 0.0).sum(axis=0))
  return PolicyMetrics(loss=loss, cost=cost, stop_histogram=jnp.stack(stop_hist),
                       answer_histogram=answer.reshape(n, k).sum(axis=1))


# ------------------------------------------------------------------ robustness
def perturb_cascade(key: chex.PRNGKey, cascade: Cascade, strength: float, *,
                    concentration: float = 1.0) -> Cascade:
  """Mixes every row of ``init``/``trans`` with a random Dirichlet row:
  ``(1 - strength) * row + strength * Dirichlet(concentration)``."""
  strength = float(strength)
  if not 0 <= strength <= 1:
    raise ValueError(f"strength = {strength} must lie in [0, 1]")
  k1, k2 = jax.random.split(key)
  k = cascade.num_states
  alpha = jnp.full((k,), concentration, jnp.float32)
  noise_init = np.asarray(jax.random.dirichlet(k1, alpha), np.float64)
  noise_trans = np.asarray(jax.random.dirichlet(k2, alpha, shape=cascade.trans.shape[:2]), np.float64)
  init = (1 - strength) * np.asarray(cascade.init, np.float64) + strength * noise_init
  trans = (1 - strength) * np.asarray(cascade.trans, np.float64) + strength * noise_trans
  return Cascade(values=cascade.values, init=init / init.sum(),
                 trans=trans / trans.sum(-1, keepdims=True), costs=cascade.costs)


@pytree_dataclass
class Robustness:
  """Objective of a policy where it was not fitted vs the policy re-fitted there.

  Attributes:
    objective: ``[]`` objective of the original policy in the new setting.
    refit_objective: ``[]`` objective of the policy re-fitted in the new setting.
    degradation: ``[]`` ``objective - refit_objective``.
    relative: ``[]`` ``degradation / refit_objective``.
    degradation_ci: ``[2]`` paired bootstrap interval (``[d, d]`` when exact).
  """

  objective: chex.Array
  refit_objective: chex.Array
  degradation: chex.Array
  relative: chex.Array
  degradation_ci: chex.Array


def model_robustness(policy, cascade: Cascade, lam) -> Robustness:
  """Exact objective of ``policy`` (fitted elsewhere) on ``cascade`` vs the recall
  optimum of ``cascade`` itself."""
  j = float(policy_metrics(cascade, policy).objective(lam))
  opt = float(solve_recall(cascade, lam).value)
  d = j - opt
  return Robustness(objective=np.asarray(j), refit_objective=np.asarray(opt), degradation=np.asarray(d),
                    relative=np.asarray(d / opt if opt > 0 else np.inf if d > 0 else 0.0),
                    degradation_ci=np.asarray([d, d]))


def split_robustness(policy, refit_policy, traces: ExitTraces, lam, *, key=None,
                     num_resamples: int = 1000, level: float = 0.95) -> Robustness:
  """``policy`` (fitted on another split) vs ``refit_policy`` (fitted on ``traces``'
  own split) replayed on ``traces``, with a paired bootstrap interval.

  Args:
    policy: the policy fitted elsewhere.
    refit_policy: the policy fitted on ``traces``' own split.
    traces: :class:`ExitTraces` both are replayed on.
    lam: weight of the loss in the objective.
    key, num_resamples, level: the paired bootstrap.

  Returns:
    A :class:`~ttamer_jax.evaluation.Robustness`: both objectives ``[]`` and their
    difference with an interval.
  """
  c = compare(policy, refit_policy, traces, lam, key=key, num_resamples=num_resamples, level=level)
  refit = float(c.objective_b)
  return Robustness(objective=c.objective_a, refit_objective=c.objective_b, degradation=c.diff,
                    relative=np.asarray(float(c.diff) / refit if refit > 0 else 0.0),
                    degradation_ci=c.diff_ci)


@pytree_dataclass
class AggregationResult:
  """Quality of the aggregated policy at one ``q``.

  Attributes:
    num_meta: ``[]`` ``q``.
    exact: ``[]`` exact recall optimum of the true cascade.
    model_value: ``[]`` optimum of the factorised model (its own belief).
    policy_value: ``[]`` objective of the aggregated policy evaluated exactly on the
      true cascade (``>= exact``).
    relative_gap: ``[]`` ``(policy_value - exact) / exact``.
    kl: ``[]`` mean visit-weighted KL of the factorised transitions.
    solve_seconds: ``[]`` wall time of one factored solve after compilation.
  """

  num_meta: chex.Array
  exact: chex.Array
  model_value: chex.Array
  policy_value: chex.Array
  relative_gap: chex.Array
  kl: chex.Array
  solve_seconds: chex.Array


def aggregation_report(cascade: Cascade, lam, num_meta: Sequence[int] = (25, 50, 100, 200), *,
                       num_iters: int = 50, progress: bool = False) -> list[AggregationResult]:
  """For each ``q``: fit, solve through the factors, evaluate exactly on ``cascade``."""
  exact = float(solve_recall(cascade, lam, aggregate_above=None).value)
  qs = list(num_meta)
  qs_iter = progress_iter(qs, desc="aggregation", enabled=progress)
  out = []
  for q in qs_iter:
    agg, kl = aggregate_cascade(cascade, int(q), num_iters=num_iters)
    jax.block_until_ready(solve_recall_aggregated(agg, lam))       # compile
    start = time.perf_counter()
    sol = jax.block_until_ready(solve_recall_aggregated(agg, lam))
    seconds = time.perf_counter() - start
    policy = RecallPolicy(index=sol.index, values=cascade.values,
                          lam=jnp.asarray(lam, cascade.values.dtype))
    value = float(policy_metrics(cascade, policy).objective(lam))
    out.append(AggregationResult(num_meta=np.asarray(q), exact=np.asarray(exact),
                                 model_value=np.asarray(float(sol.value)),
                                 policy_value=np.asarray(value),
                                 relative_gap=np.asarray((value - exact) / exact if exact > 0 else 0.0),
                                 kl=np.asarray(float(np.mean(kl)) if kl.size else 0.0),
                                 solve_seconds=np.asarray(seconds)))
  return out
