"""SLO-constrained policies: least cost under an error target, least error under a budget.

The recall optimum at weight ``lam`` minimises ``lam E[loss] + (1-lam) E[cost]``;
its ``E[loss]`` falls and ``E[cost]`` rises with ``lam``. Bisection on ``lam``
brackets the constraint between two neighbouring policies, one on each side, and
a per-request coin picks between them with the probability that meets the
constraint *exactly in expectation* (the Lagrangian solution of the constrained
problem, which in general needs this randomisation).

``E[loss]``/``E[cost]`` come from the fitted model (``source="model"``: exact
forward pass, :func:`~ttamer_jax.evaluation.policy_metrics`) or from replaying
on calibration traces (``source="traces"``: robust to a misspecified Markov
model). Coins come from an explicit PRNG key held by the policy, so replay is
reproducible.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax import validation
from ttamer_jax._struct import pytree_dataclass
from ttamer_jax.discretise import DeployedPolicy
from ttamer_jax.evaluation import Evaluation, evaluate, policy_metrics, replay_traces
from ttamer_jax.fitting import FittedCascade
from ttamer_jax.model import default_float
from ttamer_jax.policies import StageObservation, recall_policy
from ttamer_jax.traces import ExitTraces

KINDS = ("error", "cost")


def _key_data(key) -> chex.Array:
  """Raw ``uint32`` key data of a legacy or typed PRNG key."""
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  key = validation.as_numpy("key", key, kind="int")
  if key.shape != (2,):
    raise ValueError(f"key: expected a PRNG key (shape (2,) uint32), got shape {key.shape}")
  return jnp.asarray(key, jnp.uint32)


@pytree_dataclass
class MixturePolicy:
  """Per request, follow ``second`` with probability ``prob_second``, else ``first``.

  The coin of request ``b`` in a batch is ``bernoulli(key, prob_second, (B,))[b]``,
  drawn in :meth:`initial_carry`; serving gives each batch its own key with
  ``policy.replace(key=jax.random.fold_in(key, batch_number))``.

  Attributes:
    first: a line policy.
    second: a line policy with the same ``recall`` flag (and, with recall, the same
      loss estimates, so the recalled answer does not depend on the coin).
    prob_second: ``[]`` probability of following ``second``.
    key: ``[2]`` uint32 PRNG key of the coins.
  """

  first: Any
  second: Any
  prob_second: chex.Array
  key: chex.Array

  reads_state = True

  def __post_init__(self):
    for name in ("first", "second"):
      part = getattr(self, name)
      if not all(hasattr(part, a) for a in ("recall", "num_stages", "step", "initial_carry")):
        raise ValueError(f"{name}: expected a line policy, got {type(part).__name__}")
    if self.first.recall != self.second.recall:
      raise ValueError("second: both policies of a mixture must share the recall flag")
    if self.first.num_stages != self.second.num_stages:
      raise ValueError(f"second: has {self.second.num_stages} stages, first {self.first.num_stages}")
    p = self.prob_second
    if validation.is_concrete(p):
      arr = validation.as_numpy("prob_second", p)
      if arr.shape != () or not 0 <= float(arr) <= 1:
        raise ValueError(f"prob_second = {arr} must be a scalar in [0, 1]")
    if validation.is_concrete(self.key):
      object.__setattr__(self, "key", _key_data(self.key))

  @property
  def recall(self) -> bool:
    return self.first.recall

  @property
  def num_stages(self) -> int:
    return self.first.num_stages

  @property
  def reads_signals(self) -> bool:
    return getattr(self.first, "reads_signals", False) or getattr(self.second, "reads_signals", False)

  def mixture_components(self):
    """``[(weight, policy), ...]`` for exact evaluation by linearity."""
    return [(1 - self.prob_second, self.first), (self.prob_second, self.second)]

  def estimate(self, stage, obs: StageObservation):
    return self.first.estimate(stage, obs)

  def initial_carry(self, batch_size: int):
    coin = jax.random.bernoulli(self.key, self.prob_second, (batch_size,))
    return coin, self.first.initial_carry(batch_size), self.second.initial_carry(batch_size)

  def step(self, carry, stage, obs: StageObservation, best):
    coin, c1, c2 = carry
    c1, s1 = self.first.step(c1, stage, obs, best)
    c2, s2 = self.second.step(c2, stage, obs, best)
    return (coin, c1, c2), jnp.where(coin, s2, s1)


@pytree_dataclass(static=("kind", "source"))
class SLOPolicy:
  """A randomised recall policy meeting an SLO in expectation.

  Attributes:
    deployed: :class:`DeployedPolicy` over a :class:`MixturePolicy` of the recall
      optima at ``lam_low`` (``first``) and ``lam_high`` (``second``).
    lam_low: ``[]``; lam_high: ``[]`` the bracketing weights.
    prob_high: ``[]`` probability of following the ``lam_high`` policy.
    expected_loss: ``[]`` ``E[loss]`` of the mixture on the fitting source.
    expected_cost: ``[]`` ``E[cost]`` of the mixture on the fitting source.
    target: ``[]`` the error target or the cost budget.
    kind: static ``"error"`` (least cost with error <= target) or ``"cost"``
      (least error with mean cost <= budget).
    source: static ``"model"`` or ``"traces"`` (where the expectations come from).
  """

  deployed: DeployedPolicy
  lam_low: chex.Array
  lam_high: chex.Array
  prob_high: chex.Array
  expected_loss: chex.Array
  expected_cost: chex.Array
  target: chex.Array
  kind: str = "error"
  source: str = "model"


def _metrics_fn(fitted: FittedCascade, calibration: ExitTraces | None):
  if calibration is None:
    def metrics(lam):
      m = policy_metrics(fitted.cascade, recall_policy(fitted.cascade, lam))
      return float(m.loss), float(m.cost)
    return metrics, "model"

  def metrics(lam):
    res = replay_traces(fitted.recall_policy(lam), calibration)
    return float(np.mean(np.asarray(res.loss, np.float64))), float(np.mean(np.asarray(res.cost, np.float64)))
  return metrics, "traces"


def _solve_slo(fitted, target, kind, key, calibration, max_iter) -> SLOPolicy:
  if not isinstance(fitted, FittedCascade):
    raise ValueError(f"fitted: expected a FittedCascade, got {type(fitted).__name__}")
  if kind not in KINDS:  # pragma: no cover - internal
    raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
  target = validation.as_float_scalar("target", target)
  if not np.isfinite(target) or target < 0:
    raise ValueError(f"target = {target} must be a finite number >= 0")
  max_iter = validation.check_positive_int("max_iter", max_iter)
  metrics, source = _metrics_fn(fitted, calibration)
  # ok(lam): the pure policy at lam satisfies the constraint. Error: holds for large
  # lam; cost: for small lam. Invariant below: ok(good) and not ok(bad).
  idx = 0 if kind == "error" else 1
  ok = lambda m: m[idx] <= target
  end_ok, end_bad = (1.0, 0.0) if kind == "error" else (0.0, 1.0)
  m_good = metrics(end_ok)
  if not ok(m_good):
    what = "error" if kind == "error" else "mean cost"
    raise ValueError(f"target = {target:.6g}: infeasible, the least {what} any recall policy of the "
                     f"fitted model reaches on the {source} is {m_good[idx]:.6g}")
  m_bad = metrics(end_bad)
  good, bad = end_ok, end_bad
  if ok(m_bad):  # slack constraint: the unconstrained optimum of the other metric
    good, m_good = end_bad, m_bad
  else:
    for _ in range(max_iter):
      mid = 0.5 * (good + bad)
      if mid in (good, bad):
        break
      m_mid = metrics(mid)
      if ok(m_mid):
        good, m_good = mid, m_mid
      else:
        bad, m_bad = mid, m_mid
  # Weight on the good policy so the mixture's metric equals the target exactly.
  span = m_bad[idx] - m_good[idx]
  w_good = 1.0 if span <= 0 else float(np.clip((m_bad[idx] - target) / span, 0.0, 1.0))
  lam_low, lam_high = sorted((good, bad))
  p_high = w_good if lam_high == good else 1.0 - w_good
  if lam_low == lam_high:
    p_high = 1.0
  m_low, m_high = (m_good, m_bad) if lam_low == good else (m_bad, m_good)
  exp_loss = (1 - p_high) * m_low[0] + p_high * m_high[0]
  exp_cost = (1 - p_high) * m_low[1] + p_high * m_high[1]
  first = recall_policy(fitted.cascade, lam_low)
  second = recall_policy(fitted.cascade, lam_high)
  mixture = MixturePolicy(first=first, second=second, prob_second=jnp.asarray(p_high, default_float()),
                          key=key)
  return SLOPolicy(deployed=fitted.deploy(mixture), lam_low=np.asarray(lam_low),
                   lam_high=np.asarray(lam_high), prob_high=np.asarray(p_high),
                   expected_loss=np.asarray(exp_loss), expected_cost=np.asarray(exp_cost),
                   target=np.asarray(target), kind=kind, source=source)


def least_cost_policy(fitted: FittedCascade, target_error: float, *, key: chex.PRNGKey,
                      calibration: ExitTraces | None = None, max_iter: int = 40) -> SLOPolicy:
  """Least expected cost subject to ``E[loss] <= target_error`` (met with equality
  when the constraint binds).

  Args:
    fitted: the :class:`~ttamer_jax.fitting.FittedCascade`.
    target_error: the error target (same units as the traces' losses).
    key: PRNG key of the per-request coins.
    calibration: traces to measure ``E[loss]``/``E[cost]`` on (``source="traces"``);
      default: the fitted model (``source="model"``).
    max_iter: bisection steps on ``lam``.

  Raises ``ValueError`` when no policy of the fitted model reaches the target.
  """
  return _solve_slo(fitted, target_error, "error", key, calibration, max_iter)


def least_error_policy(fitted: FittedCascade, budget: float, *, key: chex.PRNGKey,
                       calibration: ExitTraces | None = None, max_iter: int = 40) -> SLOPolicy:
  """Least expected loss subject to ``E[cost] <= budget`` (raw cost units; the
  first stage's cost is always paid). See :func:`least_cost_policy`."""
  return _solve_slo(fitted, budget, "cost", key, calibration, max_iter)


@pytree_dataclass(static=("kind",))
class SLOReport:
  """An SLO policy evaluated on held-out traces.

  Attributes:
    target: ``[]`` the error target / cost budget.
    achieved: ``[]`` held-out mean error (``kind="error"``) or mean cost.
    achieved_ci: ``[2]`` its bootstrap confidence interval.
    met: ``[]`` bool, ``achieved_ci[0] <= target``: the held-out data do not
      reject that the constraint holds in expectation.
    evaluation: the full :class:`~ttamer_jax.evaluation.Evaluation`.
    kind: static ``"error"`` or ``"cost"``.
  """

  target: chex.Array
  achieved: chex.Array
  achieved_ci: chex.Array
  met: chex.Array
  evaluation: Evaluation
  kind: str = "error"


def evaluate_slo(slo: SLOPolicy, traces: ExitTraces, lam: float = 0.5, *, key=None,
                 num_resamples: int = 1000, level: float = 0.95) -> SLOReport:
  """Achieved constraint of ``slo`` on held-out ``traces`` with a bootstrap interval."""
  ev = evaluate(slo.deployed, traces, lam, key=key, num_resamples=num_resamples, level=level)
  achieved, ci = (ev.error, ev.error_ci) if slo.kind == "error" else (ev.cost, ev.cost_ci)
  return SLOReport(target=slo.target, achieved=np.asarray(achieved), achieved_ci=np.asarray(ci),
                   met=np.asarray(float(ci[0]) <= float(slo.target)), evaluation=ev, kind=slo.kind)
