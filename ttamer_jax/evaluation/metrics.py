"""Held-out evaluation of policies: on recorded traces and exactly on a model.

* :func:`replay_traces` / :func:`evaluate`: run any line policy (a
  :class:`~ttamer_jax.DeployedPolicy`, a heuristic, the hindsight
  oracle) on recorded traces and report the error rate (mean true loss of the
  answered stage), the mean cost normalised by the full model's, the objective
  and the exit histograms, with percentile-bootstrap confidence intervals.
* :func:`compare` (paired bootstrap of two policies on the same requests).

Exact evaluation on a model is :mod:`ttamer_jax.evaluation.exact`.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.protocol import check_line_policy, check_single_policy
from ttamer_jax.core.replay import ReplayResult, check_key, replay_arrays
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.discretise import DeployedPolicy, check_consistent, trace_scores
from ttamer_jax.data.traces import ExitTraces


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
    if policy.policy.observes == "true_losses":
      policy = policy.policy   # the oracle reads the truth, whatever the wrapper's signal
    else:
      check_consistent(policy, "policy")
      states, scores, preds = policy.observations(traces)
      return policy.policy, states, scores, preds
  check_line_policy(policy)
  zeros = np.zeros(np.shape(traces.scores), np.int32)
  if policy.observes == "true_losses":
    return policy, zeros, traces.losses, traces.preds
  if policy.observes == "states":
    raise ValueError(f"policy: {type(policy).__name__} reads discretised states; wrap it in a "
                     "DeployedPolicy with the discretiser it was fitted with")
  return policy, zeros, trace_scores(traces, score_name), traces.preds


def replay_traces(policy, traces: ExitTraces, *, score_name: str | None = None) -> ReplayResult:
  """Replays ``policy`` on every request of ``traces`` with the true losses and costs."""
  line, states, scores, preds = trace_inputs(policy, traces, score_name=score_name)
  check_single_policy(line)
  if line.num_stages != traces.num_stages:
    raise ValueError(f"traces: have {traces.num_stages} stages but the policy was built for "
                     f"{line.num_stages} stages")
  return replay_arrays(line, states, traces.losses, traces.costs, scores, preds)


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
                     "of ttamer_jax.evaluation.metrics.MAX_BOOTSTRAP_BYTES")
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
  of running every stage. Trusted inputs (``lam``, ``level`` and ``key`` checked by
  the caller, e.g. :func:`evaluate`)."""
  key = jax.random.PRNGKey(0) if key is None else key
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
    policy: a :class:`DeployedPolicy`, a heuristic from :mod:`ttamer_jax.core.heuristics`
      (reading ``score_name``) or a :class:`~ttamer_jax.HindsightPolicy`.
    traces: held-out :class:`ExitTraces` (not the ones the policy was fitted on).
    lam: weight of the loss in the reported objective.
    key: PRNG key of the bootstrap (default ``PRNGKey(0)``: reproducible).
    num_resamples: bootstrap resamples.
    level: confidence level of the intervals.
  """
  validation.check_scalar_lam(lam)
  _check_level(level)
  key = None if key is None else check_key(key)
  num_resamples = validation.check_positive_int("num_resamples", num_resamples)
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
