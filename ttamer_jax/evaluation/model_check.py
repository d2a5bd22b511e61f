"""Model checks: what the fitted model predicts next to what replay measures.

A T-Tamer policy is the exact optimum of its fitted model, and the model also
*predicts* the policy's error, cost and ``J`` (exactly, by a forward pass:
:func:`~ttamer_jax.policy_metrics`). Replaying the policy on recorded traces
*measures* them. When the prediction falls outside the measurement's bootstrap
interval the model is wrong where it matters, and its own value must not be
trusted -- which is why :func:`~ttamer_jax.fit_policy` chooses by replay.

Two measurements: in sample (the policy replayed on the traces it was fitted
on: optimistic) and cross-fitted (each fold's model predicts, and is replayed
on, the fold it did not see).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ttamer_jax.data.discretise import DeployedPolicy
from ttamer_jax.data.fitting import FittedCascade
from ttamer_jax.evaluation.exact import policy_metrics

QUANTITIES = ("error", "cost_norm", "objective")
# Relative slack of "inside the interval": float32 rounding of the model's prediction.
ROUNDING = 1e-5


@dataclasses.dataclass(frozen=True)
class Quantity:
  """One predicted and measured number.

  Attributes:
    predicted: the model's value (modelled).
    measured: the replayed mean (measured).
    ci: ``[2]`` bootstrap interval of ``measured``.
  """

  predicted: float
  measured: float
  ci: np.ndarray

  @property
  def inside(self) -> bool:
    """The prediction lies within the measurement's interval, up to :data:`ROUNDING`
    (the model is solved in float32: a prediction of exactly the measured value can
    differ from it in the seventh digit, and an interval can have zero width)."""
    slack = ROUNDING * max(1.0, abs(self.predicted))
    return bool(self.ci[0] - slack <= self.predicted <= self.ci[1] + slack)

  def as_dict(self) -> dict:
    return dict(predicted=self.predicted, measured=self.measured,
                ci=[float(x) for x in self.ci], inside=self.inside)


@dataclasses.dataclass(frozen=True)
class ModelCheck:
  """Modelled vs measured error, cost share and ``J`` of one policy.

  Attributes:
    policy: name of the checked policy (a T-Tamer candidate).
    lam: the ``J`` weight.
    in_sample: ``{quantity: Quantity}`` on the fitting traces.
    cross_fitted: ``{quantity: Quantity}`` out of fold (predictions of each fold's
      model, weighted by fold size).
  """

  policy: str
  lam: float
  in_sample: dict
  cross_fitted: dict

  @property
  def consistent(self) -> bool:
    """Both predictions of ``J`` lie within their replay intervals."""
    return self.in_sample["objective"].inside and self.cross_fitted["objective"].inside

  def warning(self) -> str | None:
    """One line for the user when the model's ``J`` is outside the replay interval."""
    bad = [(name, q) for name, q in (("cross-fitted", self.cross_fitted["objective"]),
                                     ("in-sample", self.in_sample["objective"])) if not q.inside]
    if not bad:
      return None
    name, q = bad[0]
    return (f"model check: the fitted model of {self.policy} predicts J = {q.predicted:.4f} but "
            f"{name} replay measures {q.measured:.4f} [{q.ci[0]:.4f}, {q.ci[1]:.4f}]; do not "
            "trust the model's own value (the policy was chosen by replay)")

  def as_dict(self) -> dict:
    return dict(policy=self.policy, lam=self.lam, consistent=self.consistent,
                warning=self.warning(),
                in_sample={k: v.as_dict() for k, v in self.in_sample.items()},
                cross_fitted={k: v.as_dict() for k, v in self.cross_fitted.items()})


def predicted(fitted: FittedCascade, deployed: DeployedPolicy, lam: float) -> np.ndarray:
  """``[3]`` modelled ``(error, cost_norm, J)`` of ``deployed`` by the exact forward
  pass on ``fitted.cascade`` (whose costs are shares of the full cost)."""
  m = policy_metrics(fitted.cascade, deployed.policy)
  loss, cost = float(m.loss), float(m.cost)
  return np.asarray([loss, cost, lam * loss + (1 - lam) * cost])


def quantities(pred: np.ndarray, means: np.ndarray, cis: np.ndarray) -> dict:
  return {name: Quantity(float(pred[i]), float(means[i]), np.asarray(cis[i]))
          for i, name in enumerate(QUANTITIES)}
