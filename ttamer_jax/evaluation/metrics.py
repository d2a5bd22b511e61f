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

from typing import Any

import chex
import jax
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.protocol import check_line_policy, check_single_policy
from ttamer_jax.core.replay import ReplayResult, check_key, replay_trusted
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.discretise import DeployedPolicy, check_consistent, trace_scores
from ttamer_jax.data.traces import ExitTraces

# What the ValueError of a host-side evaluation inside jit names instead (docs/jit.md).
JIT_REPLAY = ("inside jit, discretise with the policy's Discretiser and replay the states with "
              "ttamer_jax.replay (docs/jit.md)")
JIT_MEANS = "inside jit, average the replay's loss and cost with jnp (docs/jit.md)"


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
  """Replays ``policy`` on every request of ``traces`` with the true losses and costs.

  A :class:`DeployedPolicy` with an answer model replays on its virtual
  posterior-answer stages (:meth:`DeployedPolicy.stage_traces`). Runs on the host;
  inside ``jit`` use :func:`ttamer_jax.replay` on states (docs/jit.md).

  Args:
    policy: as for :func:`evaluate`.
    traces: :class:`ExitTraces`, ``N`` requests.
    score_name: the signal heuristics read (default: the primary scores).

  Returns:
    A :class:`~ttamer_jax.core.ReplayResult`: ``stop_stage``, ``answer_stage``,
    ``loss``, ``cost``, each ``[N]``.
  """
  validation.refuse_traced("replay_traces", JIT_REPLAY, policy=policy, traces=traces)
  if isinstance(policy, DeployedPolicy) and isinstance(traces, ExitTraces):
    traces = policy.stage_traces(traces)
  line, states, scores, preds = trace_inputs(policy, traces, score_name=score_name)
  check_single_policy(line)
  if line.num_stages != traces.num_stages:
    raise ValueError(f"traces: have {traces.num_stages} stages but the policy was built for "
                     f"{line.num_stages} stages")
  return replay_trusted(line, states, traces.losses, traces.costs, scores, preds)


# ------------------------------------------------------------------ bootstrap
MAX_BOOTSTRAP_BYTES = 1 << 30  # largest [num_resamples, C] result bootstrap_means allocates


def percentile_ci(samples: np.ndarray, level: float) -> np.ndarray:
  alpha = (1 - level) / 2
  return np.quantile(samples, [alpha, 1 - alpha], axis=0).T


def bootstrap_means(key: chex.PRNGKey, columns: Any, num_resamples: int = 1000) -> np.ndarray:
  """``[R, C]`` bootstrap resample means of the per-request ``columns [N, C]``.

  Every resample is drawn once, as a vector of draw counts, and shared by all
  columns (a matrix product), so the resamples are paired across columns: the
  bootstrap of a difference of two columns is the difference of their resample
  means, and bootstrapping many statistics of the same requests costs about as
  much as one. Deterministic given ``key``.
  """
  validation.refuse_traced("bootstrap_means", JIT_MEANS, key=key, columns=columns,
                           num_resamples=num_resamples)
  num_resamples = validation.check_positive_int("num_resamples", num_resamples)
  columns = np.asarray(columns, np.float64)
  if columns.ndim != 2 or columns.shape[0] < 1:
    raise ValueError(f"columns: expected [N, C] with N >= 1, got shape {columns.shape}")
  need = num_resamples * max(columns.shape[-1], 1) * 8   # the [R, C] float64 result
  if need > MAX_BOOTSTRAP_BYTES:
    raise ValueError(f"num_resamples = {num_resamples}: the resample means would take "
                     f"{need / 2**30:.1f} GiB, over the {MAX_BOOTSTRAP_BYTES / 2**30:.0f} GiB limit "
                     "of ttamer_jax.evaluation.metrics.MAX_BOOTSTRAP_BYTES")
  num = columns.shape[0]
  rng = np.random.default_rng(validation.key_seed(key))
  distinct, group = _distinct_rows(columns)
  if distinct.shape[0] * 4 <= num:
    # Few distinct rows (0/1 losses, a few exits): the draw counts of a group of equal
    # rows are multinomial with its share -- the same resample means, in O(R U), not O(R N).
    table, share = distinct, np.bincount(group, minlength=distinct.shape[0]) / num
    counts_of = lambda rows: rng.multinomial(num, share, size=rows)
  else:
    table = columns

    def counts_of(rows):
      draws = rng.integers(0, num, (rows, num)) + (np.arange(rows) * num)[:, None]
      return np.bincount(draws.reshape(-1), minlength=rows * num).reshape(rows, num)

  chunk = int(max(1, min(num_resamples, (1 << 22) // table.shape[0])))  # ~4M counts per block
  out = np.empty((num_resamples, columns.shape[1]))
  for start in range(0, num_resamples, chunk):
    rows = min(chunk, num_resamples - start)
    out[start:start + rows] = counts_of(rows) @ table / num
  return out


def _distinct_rows(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(distinct rows [U, C], group of each row [N])`` of a float64 ``[N, C]`` array
  (rows compared bytewise, one sort of one key per row)."""
  rows = np.ascontiguousarray(columns + 0.0)         # -0.0 -> 0.0: equal values, equal bytes
  keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))[:, 0]
  _, first, group = np.unique(keys, return_index=True, return_inverse=True)
  return rows[first], group.reshape(-1)


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
    objective: ``[]`` mean ``lam * loss + (1 - lam) * cost / full_cost``: the cost as a
      share of the mean cost of running every stage, so ``J`` has no unit and equals
      ``lam * error + (1 - lam) * cost_norm``.
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


def normalised_objective(loss: Any, cost: Any, lam: float, full_cost: float) -> np.ndarray:
  """Per-request ``lam * loss + (1 - lam) * cost / full_cost`` (unit-free ``J``;
  ``full_cost`` is the mean cost of running every stage, 0 when nothing costs)."""
  cost = np.asarray(cost, np.float64)
  share = cost / full_cost if full_cost > 0 else np.zeros_like(cost)
  return lam * np.asarray(loss, np.float64) + (1 - lam) * share


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
  full_mean = full.mean()
  obj = normalised_objective(loss, cost, lam, full_mean)
  means = bootstrap_means(key, np.stack([loss, cost, full, obj], axis=1), num_resamples)
  norm = cost.mean() / full_mean if full_mean > 0 else 0.0
  norm_samples = np.where(means[:, 2] > 0, means[:, 1] / np.where(means[:, 2] > 0, means[:, 2], 1), 0.0)
  cis = percentile_ci(np.stack([means[:, 0], norm_samples, means[:, 3], means[:, 1]], axis=1), level)
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
      (reading ``score_name``) or a :class:`~ttamer_jax.core.HindsightPolicy`.
    traces: held-out :class:`ExitTraces` (not the ones the policy was fitted on).
    lam: weight of the loss in the reported objective.
    key: PRNG key of the bootstrap (default ``PRNGKey(0)``: reproducible).
    num_resamples: bootstrap resamples.
    level: confidence level of the intervals.
    score_name: the signal a heuristic reads (default: the primary scores).

  Returns:
    An :class:`Evaluation`: mean ``error``, ``cost``, ``cost_norm`` and ``objective``
    ``[]`` with ``[2]`` bootstrap intervals, and the stop and answer histograms ``[n]``.

  Runs on the host (bootstrap, histograms); inside ``jit`` use
  :func:`ttamer_jax.replay` on states and average its ``loss`` and ``cost`` (docs/jit.md).
  """
  validation.refuse_traced("evaluate", JIT_REPLAY, policy=policy, traces=traces, lam=lam, key=key,
                           num_resamples=num_resamples, level=level)
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


def compare_results(a: ReplayResult, b: ReplayResult, lam, *, full_cost: float = 1.0, key=None,
                    num_resamples: int = 1000, level: float = 0.95) -> Comparison:
  """Paired comparison of two replays of the same requests.

  Objectives are ``lam * loss + (1 - lam) * cost / full_cost`` (``full_cost``: the
  mean cost of running every stage; :func:`compare` passes the traces').
  """
  validation.refuse_traced("compare_results", JIT_MEANS, a=a, b=b, lam=lam, full_cost=full_cost,
                           key=key, level=level)
  validation.check_scalar_lam(lam)
  _check_level(level)
  key = jax.random.PRNGKey(0) if key is None else check_key(key)
  oa = normalised_objective(a.loss, a.cost, float(lam), float(full_cost))
  ob = normalised_objective(b.loss, b.cost, float(lam), float(full_cost))
  if oa.shape != ob.shape:
    raise ValueError(f"results: replayed on different numbers of requests ({oa.shape} vs {ob.shape})")
  return compare_objectives(oa, ob, key=key, num_resamples=num_resamples, level=level)


def compare_objectives(oa: np.ndarray, ob: np.ndarray, *, key, num_resamples: int = 1000,
                       level: float = 0.95) -> Comparison:
  """Paired comparison of per-request objectives ``oa [N]`` and ``ob [N]`` (trusted)."""
  d = oa - ob
  ci = percentile_ci(bootstrap_means(key, d[:, None], num_resamples), level)[0]
  return Comparison(diff=np.asarray(d.mean()), diff_se=np.asarray(_se(d)), diff_ci=ci,
                    objective_a=np.asarray(oa.mean()), objective_b=np.asarray(ob.mean()))


def compare(policy_a, policy_b, traces: ExitTraces, lam, *, key=None, num_resamples: int = 1000,
            level: float = 0.95, score_name: str | None = None) -> Comparison:
  """Replays both policies on ``traces`` and compares them request by request.

  Args:
    policy_a, policy_b: policies as for :func:`evaluate`.
    traces: held-out :class:`ExitTraces`.
    lam: weight of the loss in the compared objective.
    key, num_resamples, level: the paired bootstrap of the differences.
    score_name: the signal heuristics read (default: the primary scores).

  Returns:
    A :class:`~ttamer_jax.evaluation.Comparison`: per-policy :class:`Evaluation`
    and ``b - a`` differences of objective, loss and cost ``[]`` with intervals.
  """
  validation.refuse_traced("compare", JIT_REPLAY, policy_a=policy_a, policy_b=policy_b,
                           traces=traces, lam=lam, key=key)
  return compare_results(replay_traces(policy_a, traces, score_name=score_name),
                         replay_traces(policy_b, traces, score_name=score_name), lam,
                         full_cost=traces.full_cost(), key=key, num_resamples=num_resamples,
                         level=level)
