"""Distributional stage descriptions of a line cascade (DESIGN.md section 2)."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.struct import pytree_dataclass


def default_float() -> np.dtype:
  """float32, or float64 when ``jax_enable_x64`` is on."""
  return jax.dtypes.canonicalize_dtype(np.float64)


def _validated_cascade_arrays(values, init, trans, costs):
  values = validation.as_numpy("values", values, ndim=2)
  n, k = values.shape
  if n < 1:
    raise ValueError(f"values: number of stages n = {n} must be >= 1 (values has shape {values.shape})")
  if k < 1:
    raise ValueError(f"values: number of states K = {k} must be >= 1 (values has shape {values.shape})")
  init = validation.as_numpy("init", init, ndim=1)
  validation.check_shape("init", init, (k,))
  if trans is None and n == 1:
    trans = np.zeros((0, k, k))
  trans = validation.as_numpy("trans", trans, ndim=3)
  validation.check_shape("trans", trans, (n - 1, k, k))
  costs = validation.as_numpy("costs", costs, ndim=1)
  validation.check_shape("costs", costs, (n,))
  validation.check_nonnegative("values", values)
  validation.check_nonnegative("costs", costs)
  validation.check_stochastic("init", init)
  validation.check_stochastic("trans", trans)
  dtype = default_float()
  arrays = [(name, validation.to_float(name, a, dtype)) for name, a in
            (("values", values), ("init", init), ("trans", trans), ("costs", costs))]
  # A path's value is at most its best loss plus every cost: the solvers' sums.
  validation.check_sum_fits("values", float(np.max(values)) + float(np.sum(costs, dtype=np.float64)),
                            "the largest value plus the sum of costs", dtype,
                            "rescale the values and costs")
  return tuple(validation.device_array(a) for _, a in arrays)


@pytree_dataclass
class Cascade:
  """A line of ``n`` stages whose discretised states follow a Markov chain.

  Attributes:
    values: ``[n, K]`` loss ``l_i(s)`` of answering with stage ``i`` in state ``s``
      (finite, >= 0).
    init: ``[K]`` distribution of stage 1's state.
    trans: ``[n-1, K, K]`` row-stochastic transitions,
      ``trans[i][s, t] = P(state of stage i+2 = t | state of stage i+1 = s)``.
    costs: ``[n]`` cost of consulting each stage (>= 0); stage 1's is always paid.

  Constructing a ``Cascade`` from concrete arrays validates them (``ValueError``
  naming the field and index) and converts them to the default float dtype.
  Instances rebuilt by JAX inside ``jit``/``vmap`` skip validation.
  """

  values: chex.Array
  init: chex.Array
  trans: chex.Array
  costs: chex.Array

  def __post_init__(self):
    leaves = (self.values, self.init, self.trans, self.costs)
    if not all(validation.is_concrete(x) for x in leaves):
      return  # built inside a transformation: validated at the boundary already.
    arrays = _validated_cascade_arrays(*leaves)
    for name, arr in zip(("values", "init", "trans", "costs"), arrays):
      object.__setattr__(self, name, arr)

  @property
  def num_stages(self) -> int:
    return self.values.shape[-2]

  @property
  def num_states(self) -> int:
    return self.values.shape[-1]

  @classmethod
  def from_arrays(cls, values: Any, init: Any, trans: Any, costs: Any) -> "Cascade":
    """Builds a validated cascade from NumPy arrays or nested lists.

    ``trans`` may be ``None`` for a single stage.
    """
    if trans is None:
      k = np.shape(values)[-1] if np.ndim(values) == 2 else 0
      trans = np.zeros((0, k, k))
    return cls(values=values, init=init, trans=trans, costs=costs)


def iid_cascade(values: Any, probs: Any, costs: Any, num_stages: int) -> Cascade:
  """Every stage draws its state independently from ``probs``.

  Args:
    values: ``[K]`` loss of each state (shared by all stages).
    probs: ``[K]`` state distribution.
    costs: scalar (same cost per stage) or ``[n]``.
    num_stages: ``n``.
  """
  n = validation.check_positive_int("num_stages", num_stages)
  values = validation.as_numpy("values", values, ndim=1)
  probs = validation.as_numpy("probs", probs, ndim=1)
  validation.check_shape("probs", probs, values.shape)
  validation.check_stochastic("probs", probs)
  costs = validation.as_numpy("costs", costs)
  if costs.ndim == 0:
    costs = np.full((n,), costs)
  k = values.shape[0]
  return Cascade(
      values=np.tile(values, (n, 1)),
      init=probs,
      trans=np.broadcast_to(probs, (max(n - 1, 0), k, k)),
      costs=costs)


def random_cascade(key: chex.PRNGKey, num_stages: int, num_states: int, *,
                   concentration: float = 1.0, cost_scale: float = 0.05,
                   shared_grid: bool = False) -> Cascade:
  """A random cascade for tests and sweeps; pure in ``key`` (vmap it for batches).

  Args:
    key: PRNG key.
    num_stages: ``n``.
    num_states: ``K``.
    concentration: Dirichlet concentration of ``init`` and every row of ``trans``
      (small values give near-deterministic transitions).
    cost_scale: costs are uniform on ``[0, cost_scale]``.
    shared_grid: if true, every stage has the loss grid ``linspace(0, 1, K)`` (the
      state *is* the loss bin), so the solver's x-grid has ``M = K`` points;
      otherwise losses are i.i.d. uniform on ``[0, 1]`` and ``M = n K``.

  Returns:
    A :class:`Cascade`: ``values [n, K]``, ``init [K]``, ``trans [n-1, K, K]``,
    ``costs [n]``.
  """
  n = validation.check_positive_int("num_stages", num_stages)
  k = validation.check_positive_int("num_states", num_states)
  for name, v, low in (("concentration", concentration, 0.0), ("cost_scale", cost_scale, None)):
    if validation.is_concrete(v):
      v = validation.as_float_scalar(name, v)
      if not np.isfinite(v) or (v <= 0 if low is not None else v < 0):
        raise ValueError(f"{name} = {v!r} must be a finite number "
                         f"{'> 0' if low is not None else '>= 0'}")
  k_val, k_init, k_trans, k_cost = jax.random.split(key, 4)
  dtype = default_float()
  if shared_grid:
    values = jnp.broadcast_to(jnp.linspace(0.0, 1.0, k, dtype=dtype), (n, k))
  else:
    values = jax.random.uniform(k_val, (n, k), dtype=dtype)
  alpha = jnp.full((k,), concentration, dtype)
  init = jax.random.dirichlet(k_init, alpha, dtype=dtype)
  trans = jax.random.dirichlet(k_trans, alpha, shape=(n - 1, k), dtype=dtype)
  costs = cost_scale * jax.random.uniform(k_cost, (n,), dtype=dtype)
  return Cascade(values=values, init=init, trans=trans, costs=costs)


def gap_instance(alpha: float) -> Cascade:
  """The two-stage instance on which no recall-free policy is within ``alpha`` (DESIGN.md 1).

  Zero costs; at ``lam = 1`` every no-recall policy pays ``1/alpha^2`` while recall
  (and the hindsight optimum) pay ``1/alpha^3``. States: stage 1 is always in
  state 0 (loss ``1/alpha^2``); stage 2 is in state 0 (loss 0) w.p. ``1 - 1/alpha``
  and in state 1 (loss ``1/alpha``) otherwise.

  Args:
    alpha: the gap, > 1.

  Returns:
    A two-stage, two-state :class:`Cascade` (``values [2, 2]``, ``costs [2]`` zero).
  """
  alpha = validation.as_float_scalar("alpha", alpha)
  if not np.isfinite(alpha) or alpha <= 1:
    raise ValueError(f"alpha = {alpha} must be a finite number > 1")
  p_bad = 1.0 / alpha
  return Cascade(
      values=np.array([[alpha**-2, alpha**-2], [0.0, 1.0 / alpha]]),
      init=np.array([1.0, 0.0]),
      trans=np.array([[[1 - p_bad, p_bad], [1 - p_bad, p_bad]]]),
      costs=np.zeros(2))


def demo_cascade(num_stages: int = 5, num_states: int = 8) -> Cascade:
  """A built-in synthetic cascade: ``n`` models of growing cost and accuracy.

  State ``s`` is a bin of the calibrated error probability: stage ``i`` in bin ``s``
  has loss ``(s + 0.5) / K * 0.75**i``. Requests tend to stay in their bin (hard
  inputs stay hard) and drift one bin easier per stage; with probability 0.15 a
  deeper model "over-thinks" and lands in a harder bin. Costs grow 1.6x per stage
  and are normalised to sum to 1.

  Args:
    num_stages: ``n`` models.
    num_states: ``K`` error bins.

  Returns:
    A :class:`Cascade`: ``values [n, K]``, ``init [K]``, ``trans [n-1, K, K]``,
    ``costs [n]`` (summing to 1).
  """
  n = validation.check_positive_int("num_stages", num_stages)
  k = validation.check_positive_int("num_states", num_states)
  bins = (np.arange(k) + 0.5) / k
  values = np.stack([bins * 0.75**i for i in range(n)])
  s, t = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  easier = np.exp(-np.abs(t - (s - 1)) / 0.8)
  easier /= easier.sum(1, keepdims=True)
  harder = np.exp(-np.abs(t - (s + 2)) / 1.5)
  harder /= harder.sum(1, keepdims=True)
  row = 0.85 * easier + 0.15 * harder
  init = np.exp(-np.arange(k) / (k / 3))
  costs = 1.6 ** np.arange(n)
  return Cascade(values=values, init=init / init.sum(),
                 trans=np.broadcast_to(row, (n - 1, k, k)), costs=costs / costs.sum())
