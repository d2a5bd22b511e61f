"""Held-out evaluation of policies: on recorded traces and exactly on a model.

* :func:`replay_traces` / :func:`evaluate`: run any line policy (a
  :class:`~ttamer_jax.discretise.DeployedPolicy`, a heuristic, the hindsight
  oracle) on recorded traces and report the error rate (mean true loss of the
  answered stage), the mean cost normalised by the full model's, the objective
  and the exit histograms, with percentile-bootstrap confidence intervals.
* :func:`policy_metrics`: exact ``E[loss]`` and ``E[cost]`` of a state-reading
  policy on a :class:`~ttamer_jax.Cascade` by a forward pass over the mass of
  (best-so-far identity, state) -- separately, as SLO constraints need them.
* :func:`compare` (paired bootstrap of two policies on the same requests),
  :func:`perturb_cascade`, :func:`model_robustness` and :func:`split_robustness`.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax import validation
from ttamer_jax._struct import pytree_dataclass
from ttamer_jax.discretise import DeployedPolicy, check_consistent, trace_scores
from ttamer_jax.model import Cascade
from ttamer_jax.policies import StageObservation, num_states
from ttamer_jax.simulation import ReplayResult, check_key, check_line_policy, replay
from ttamer_jax.traces import ExitTraces


# ------------------------------------------------------------------ replay
def trace_inputs(policy, traces: ExitTraces, *, score_name: str | None = None):
  """``(line_policy, states, scores, preds)`` to replay ``policy`` on ``traces``.

  A :class:`DeployedPolicy` discretises its own score signal; a heuristic reads
  ``score_name`` (default: the primary scores) and gets all-zero states; the
  hindsight oracle reads the true losses. A bare state-reading policy (solver
  policies) is rejected: it needs the discretiser it was fitted with.
  """
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  if isinstance(policy, DeployedPolicy):
    if getattr(policy.policy, "reads_true_loss", False):
      policy = policy.policy   # the oracle reads the truth, whatever the wrapper's signal
    else:
      check_consistent(policy, "policy")
      states, scores, preds = policy.observations(traces)
      return policy.policy, states, scores, preds
  zeros = jnp.zeros(traces.scores.shape, jnp.int32)
  if getattr(policy, "reads_true_loss", False):
    return policy, zeros, traces.losses, traces.preds
  if getattr(policy, "reads_state", True):
    raise ValueError(f"policy: {type(policy).__name__} reads discretised states; wrap it in a "
                     "DeployedPolicy with the discretiser it was fitted with")
  return policy, zeros, trace_scores(traces, score_name), traces.preds


def replay_traces(policy, traces: ExitTraces, *, score_name: str | None = None) -> ReplayResult:
  """Replays ``policy`` on every request of ``traces`` with the true losses and costs."""
  line, states, scores, preds = trace_inputs(policy, traces, score_name=score_name)
  return replay(line, states, traces.losses, traces.costs, scores=scores, preds=preds)


# ------------------------------------------------------------------ bootstrap
MAX_BOOTSTRAP_BYTES = 1 << 30  # largest [num_resamples, C] result bootstrap_means allocates


def _percentile_ci(samples: np.ndarray, level: float) -> np.ndarray:
  alpha = (1 - level) / 2
  return np.quantile(samples, [alpha, 1 - alpha], axis=0).T


@functools.partial(jax.jit, static_argnums=(2, 3))
def _bootstrap_means(key, columns, num_resamples: int, chunk: int):
  """``[R, C]`` means of ``columns [N, C]`` over ``R`` resamples with replacement."""
  num = columns.shape[0]
  num_chunks = -(-num_resamples // chunk)

  def one(k):
    idx = jax.random.randint(k, (chunk, num), 0, num)
    return jnp.mean(columns[idx], axis=1)

  means = jax.lax.map(one, jax.random.split(key, num_chunks))
  return means.reshape(-1, columns.shape[1])[:num_resamples]


def bootstrap_means(key: chex.PRNGKey, columns: Any, num_resamples: int = 1000) -> np.ndarray:
  """``[R, C]`` bootstrap resample means of the per-request ``columns [N, C]``."""
  num_resamples = validation.check_positive_int("num_resamples", num_resamples)
  columns = jnp.asarray(columns, jnp.float32)
  need = num_resamples * max(columns.shape[-1], 1) * 8   # the [R, C] float64 result
  if need > MAX_BOOTSTRAP_BYTES:
    raise ValueError(f"num_resamples = {num_resamples}: the resample means would take "
                     f"{need / 2**30:.1f} GiB, over the {MAX_BOOTSTRAP_BYTES / 2**30:.0f} GiB limit "
                     "of ttamer_jax.evaluation.MAX_BOOTSTRAP_BYTES")
  chunk = max(1, min(num_resamples, (1 << 22) // max(columns.size, 1)))
  return np.asarray(_bootstrap_means(key, columns, num_resamples, chunk), np.float64)


def _check_level(level):
  if not 0 < level < 1:
    raise ValueError(f"level = {level} must lie in (0, 1)")


# ------------------------------------------------------------------ evaluate
@pytree_dataclass
class Evaluation:
  """Held-out statistics of a policy on ``N`` recorded requests.

  Attributes:
    lam: ``[]`` trade-off weight of ``objective``.
    error: ``[]`` mean true loss of the answered stage (error rate for 0/1 loss).
    error_ci: ``[2]`` bootstrap confidence interval of ``error``.
    error_se: ``[]`` standard error of ``error``.
    cost: ``[]`` mean cost of the consulted stages (raw units).
    cost_ci: ``[2]`` bootstrap interval of ``cost``.
    cost_norm: ``[]`` mean cost / mean cost of running every stage.
    cost_norm_ci: ``[2]`` bootstrap interval of ``cost_norm``.
    objective: ``[]`` mean ``lam * loss + (1 - lam) * cost`` (raw cost units).
    objective_ci: ``[2]`` bootstrap interval of ``objective``.
    objective_se: ``[]`` standard error of ``objective``.
    stop_histogram: ``[n]`` fraction of requests whose last consulted stage is i.
    answer_histogram: ``[n]`` fraction answered by stage i.
    num_samples: ``[]`` ``N``.
  """

  lam: chex.Array
  error: chex.Array
  error_ci: chex.Array
  error_se: chex.Array
  cost: chex.Array
  cost_ci: chex.Array
  cost_norm: chex.Array
  cost_norm_ci: chex.Array
  objective: chex.Array
  objective_ci: chex.Array
  objective_se: chex.Array
  stop_histogram: chex.Array
  answer_histogram: chex.Array
  num_samples: chex.Array

  def as_dict(self) -> dict:
    """Plain Python numbers and lists (for JSON and tables)."""
    return {k: np.asarray(getattr(self, k)).tolist() for k in self.__dataclass_fields__}


def _se(x: np.ndarray) -> float:
  return float(np.std(x, ddof=1) / np.sqrt(x.shape[0])) if x.shape[0] > 1 else 0.0


def summarise(result: ReplayResult, full_cost: Any, lam, *, num_stages: int,
              key: chex.PRNGKey | None = None, num_resamples: int = 1000,
              level: float = 0.95) -> Evaluation:
  """Statistics of a :class:`ReplayResult`; ``full_cost [N]`` is each request's cost
  of running every stage."""
  validation.check_scalar_lam(lam)
  _check_level(level)
  key = jax.random.PRNGKey(0) if key is None else check_key(key)
  loss = np.asarray(result.loss, np.float64)
  cost = np.asarray(result.cost, np.float64)
  full = np.broadcast_to(np.asarray(full_cost, np.float64), loss.shape)
  lam = float(lam)
  obj = lam * loss + (1 - lam) * cost
  means = bootstrap_means(key, np.stack([loss, cost, full, obj], axis=1), num_resamples)
  full_mean = full.mean()
  norm = cost.mean() / full_mean if full_mean > 0 else 0.0
  norm_samples = np.where(means[:, 2] > 0, means[:, 1] / np.where(means[:, 2] > 0, means[:, 2], 1), 0.0)
  cis = _percentile_ci(np.stack([means[:, 0], norm_samples, means[:, 3], means[:, 1]], axis=1), level)
  hist = lambda s: np.bincount(np.asarray(s), minlength=num_stages) / loss.shape[0]
  return Evaluation(
      lam=np.asarray(lam), error=np.asarray(loss.mean()), error_ci=cis[0], error_se=np.asarray(_se(loss)),
      cost=np.asarray(cost.mean()), cost_ci=cis[3], cost_norm=np.asarray(norm), cost_norm_ci=cis[1],
      objective=np.asarray(obj.mean()), objective_ci=cis[2], objective_se=np.asarray(_se(obj)),
      stop_histogram=hist(result.stop_stage), answer_histogram=hist(result.answer_stage),
      num_samples=np.asarray(loss.shape[0]))


def evaluate(policy, traces: ExitTraces, lam, *, key: chex.PRNGKey | None = None,
             num_resamples: int = 1000, level: float = 0.95,
             score_name: str | None = None) -> Evaluation:
  """Held-out evaluation of ``policy`` on ``traces`` (see :class:`Evaluation`).

  Args:
    policy: a :class:`DeployedPolicy`, a heuristic from :mod:`ttamer_jax.baselines`
      (reading ``score_name``) or a :class:`~ttamer_jax.baselines.HindsightPolicy`.
    traces: held-out :class:`ExitTraces` (not the ones the policy was fitted on).
    lam: weight of the loss in the reported objective.
    key: PRNG key of the bootstrap (default ``PRNGKey(0)``: reproducible).
    num_resamples: bootstrap resamples.
    level: confidence level of the intervals.
  """
  result = replay_traces(policy, traces, score_name=score_name)
  full = np.asarray(traces.cost_matrix(), np.float64).sum(axis=1)
  return summarise(result, full, lam, num_stages=traces.num_stages, key=key,
                   num_resamples=num_resamples, level=level)


@pytree_dataclass
class Comparison:
  """Paired difference ``a - b`` of per-request objectives on the same requests.

  Attributes:
    diff: ``[]`` mean difference of objectives (negative: ``a`` is better).
    diff_se: ``[]`` its standard error.
    diff_ci: ``[2]`` bootstrap confidence interval.
    objective_a: ``[]``; objective_b: ``[]`` mean objectives.
  """

  diff: chex.Array
  diff_se: chex.Array
  diff_ci: chex.Array
  objective_a: chex.Array
  objective_b: chex.Array


def compare_results(a: ReplayResult, b: ReplayResult, lam, *, key=None, num_resamples: int = 1000,
                    level: float = 0.95) -> Comparison:
  """Paired comparison of two replays of the same requests."""
  validation.check_scalar_lam(lam)
  _check_level(level)
  key = jax.random.PRNGKey(0) if key is None else check_key(key)
  oa = np.asarray(a.objective(lam), np.float64)
  ob = np.asarray(b.objective(lam), np.float64)
  if oa.shape != ob.shape:
    raise ValueError(f"results: replayed on different numbers of requests ({oa.shape} vs {ob.shape})")
  d = oa - ob
  ci = _percentile_ci(bootstrap_means(key, d[:, None], num_resamples), level)[0]
  return Comparison(diff=np.asarray(d.mean()), diff_se=np.asarray(_se(d)), diff_ci=ci,
                    objective_a=np.asarray(oa.mean()), objective_b=np.asarray(ob.mean()))


def compare(policy_a, policy_b, traces: ExitTraces, lam, *, key=None, num_resamples: int = 1000,
            level: float = 0.95, score_name: str | None = None) -> Comparison:
  """Replays both policies on ``traces`` and compares them request by request."""
  return compare_results(replay_traces(policy_a, traces, score_name=score_name),
                         replay_traces(policy_b, traces, score_name=score_name), lam, key=key,
                         num_resamples=num_resamples, level=level)


# ------------------------------------------------------------------ exact
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
  """
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a Cascade, got {type(cascade).__name__}")
  if isinstance(policy, DeployedPolicy):
    raise ValueError("policy: pass the DeployedPolicy's .policy (a cascade models states, not scores)")
  components = getattr(policy, "mixture_components", None)
  if components is not None:
    parts = [(w, policy_metrics(cascade, p)) for w, p in components()]
    return _combine(parts)
  check_line_policy(policy)
  if getattr(policy, "reads_signals", False):
    raise ValueError(f"policy: {type(policy).__name__} reads raw scores or predictions, which a "
                     "Cascade does not model; evaluate it on traces instead")
  if policy.num_stages != cascade.num_stages:
    raise ValueError(f"policy: built for {policy.num_stages} stages, the cascade has {cascade.num_stages}")
  k = num_states(policy)
  if k is not None and k != cascade.num_states:
    raise ValueError(f"policy: its tables have {k} states, the cascade has {cascade.num_states}")
  if jax.tree_util.tree_leaves(policy.initial_carry(1)):
    raise ValueError(f"policy: {type(policy).__name__} keeps per-request memory; exact evaluation "
                     "supports memoryless policies")
  fn = _recall_metrics if policy.recall else _no_recall_metrics
  return fn(cascade, policy)


def _observation(states):
  return StageObservation(state=states, score=jnp.zeros(states.shape), pred=jnp.zeros(states.shape, jnp.int32))


@jax.jit
def _no_recall_metrics(cascade: Cascade, policy) -> PolicyMetrics:
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
def _recall_metrics(cascade: Cascade, policy) -> PolicyMetrics:
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
  from ttamer_jax.solvers import solve_recall
  j = float(policy_metrics(cascade, policy).objective(lam))
  opt = float(solve_recall(cascade, lam).value)
  d = j - opt
  return Robustness(objective=np.asarray(j), refit_objective=np.asarray(opt), degradation=np.asarray(d),
                    relative=np.asarray(d / opt if opt > 0 else np.inf if d > 0 else 0.0),
                    degradation_ci=np.asarray([d, d]))


def split_robustness(policy, refit_policy, traces: ExitTraces, lam, *, key=None,
                     num_resamples: int = 1000, level: float = 0.95) -> Robustness:
  """``policy`` (fitted on another split) vs ``refit_policy`` (fitted on ``traces``'
  own split) replayed on ``traces``, with a paired bootstrap interval."""
  c = compare(policy, refit_policy, traces, lam, key=key, num_resamples=num_resamples, level=level)
  refit = float(c.objective_b)
  return Robustness(objective=c.objective_a, refit_objective=c.objective_b, degradation=c.diff,
                    relative=np.asarray(float(c.diff) / refit if refit > 0 else 0.0),
                    degradation_ci=c.diff_ci)
