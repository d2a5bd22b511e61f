"""SLO-constrained policies: least cost under an error target, least error under a budget.

The recall optimum at weight ``lam`` minimises ``lam E[loss] + (1-lam) E[cost]``;
its ``E[loss]`` falls and ``E[cost]`` rises with ``lam``. Bisection on ``lam``
brackets the constraint between two neighbouring policies, one on each side, and
a per-request coin picks between them with the probability that meets the
constraint *exactly in expectation* (the Lagrangian solution of the constrained
problem, which in general needs this randomisation).

``E[loss]``/``E[cost]`` come from the fitted model (``source="model"``: exact
forward pass, :func:`~ttamer_jax.policy_metrics`) or from replaying
on calibration traces (``source="traces"``: robust to a misspecified Markov
model). Coins come from an explicit PRNG key held by the policy, so replay is
reproducible.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import Cascade, default_float
from ttamer_jax.core.policies import MixturePolicy, recall_policy
from ttamer_jax.core.struct import pytree_dataclass, trusted
from ttamer_jax.data.discretise import DeployedPolicy, Discretiser
from ttamer_jax.data.fitting import STATE_SIGNAL, FittedCascade
from ttamer_jax.data.traces import ExitTraces
from ttamer_jax.evaluation.exact import policy_metrics
from ttamer_jax.evaluation.metrics import Evaluation, evaluate, replay_traces

KINDS = ("error", "cost")


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
      # The fitted costs are shares of the full cost; the budget is in raw units.
      return float(m.loss), float(m.cost) * float(fitted.cost_scale)
    return metrics, "model"

  def metrics(lam):
    res = replay_traces(fitted.recall_policy(lam), calibration)
    return float(np.mean(np.asarray(res.loss, np.float64))), float(np.mean(np.asarray(res.cost, np.float64)))
  return metrics, "traces"


def _as_fitted(fitted, calibration) -> FittedCascade:
  """A plain :class:`~ttamer_jax.Cascade` is a model over states you already know: its
  policies read the traces' ``"state"`` signal (:meth:`Discretiser.identity`), costs in
  its own units."""
  if isinstance(fitted, Cascade):
    if calibration is not None:
      raise ValueError("calibration: measuring on traces needs a FittedCascade (fit_cascade or "
                       "fit_cascade_from_states); a plain Cascade is solved on the model")
    disc = Discretiser.identity(fitted.num_stages, fitted.num_states)
    return trusted(FittedCascade, cascade=fitted, discretiser=disc,
                   counts=np.zeros(fitted.values.shape), cost_scale=np.asarray(1.0), answers=None,
                   score_name=STATE_SIGNAL)
  if not isinstance(fitted, FittedCascade):
    raise ValueError(f"fitted: expected a FittedCascade or a Cascade, got {type(fitted).__name__}")
  return fitted


def _solve_slo(fitted, target, kind, key, calibration, max_iter) -> SLOPolicy:
  fitted = _as_fitted(fitted, calibration)
  if kind not in KINDS:  # pragma: no cover - internal
    raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
  target = validation.as_nonnegative_scalar("target", target)
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


def least_cost_policy(fitted: FittedCascade | Cascade, target_error: float, *, key: chex.PRNGKey,
                      calibration: ExitTraces | None = None, max_iter: int = 40) -> SLOPolicy:
  """Least expected cost subject to ``E[loss] <= target_error`` (met with equality
  when the constraint binds).

  Args:
    fitted: a :class:`~ttamer_jax.data.FittedCascade`, or a plain :class:`~ttamer_jax.Cascade`
      (states you already know: the policy reads the ``"state"`` signal, see
      :func:`~ttamer_jax.data.fit_cascade_from_states`; costs in the cascade's units).
    target_error: the error target (same units as the traces' losses).
    key: PRNG key of the per-request coins.
    calibration: traces to measure ``E[loss]``/``E[cost]`` on (``source="traces"``);
      default: the fitted model (``source="model"``).
    max_iter: bisection steps on ``lam``.

  Raises ``ValueError`` when no policy of the fitted model reaches the target.
  """
  return _solve_slo(fitted, target_error, "error", key, calibration, max_iter)


def least_error_policy(fitted: FittedCascade | Cascade, budget: float, *, key: chex.PRNGKey,
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
    evaluation: the full :class:`~ttamer_jax.Evaluation`.
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
