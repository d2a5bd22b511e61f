"""Soft state aggregation for large ``K`` (DESIGN.md sections 5 and 9).

Each transition matrix is factorised through ``q`` meta-states,
``trans[i] ~ A_i @ B_i`` with ``A_i [K, q]`` (``P(meta-state m | state s)``) and
``B_i [q, K]`` (``P(next state t | meta-state m)``), both row-stochastic so the
product is a transition matrix again. The recall solver's per-stage product
``G @ trans^T`` (``O(M K^2)``) becomes ``(G @ B^T) @ A^T`` (``O(M K q)``).

Fitting (:func:`aggregate_cascade`) minimises the visit-weighted KL divergence
``sum_s w_s KL(trans[s] || (A B)[s])`` (``w``: the stage's state distribution), the
objective of probabilistic latent semantic analysis, by EM (multiplicative
updates). Two starts are tried and the better kept: hard aggregation (k-means on
the rows of ``trans``, ``A`` one-hot -- exact whenever ``trans`` has at most ``q``
distinct rows) refined in ``B``, and soft EM from a smoothed copy of it.
:func:`aggregation_report` scores the resulting policy exactly on the true model
against the exact optimum.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import kernel, validation
from ttamer_jax.core.kernel import DEFAULT_PRECISION
from ttamer_jax.core.model import Cascade, default_float
from ttamer_jax.core.solutions import RecallSolution
from ttamer_jax.core.struct import pytree_dataclass

_TINY = 1e-30


@pytree_dataclass
class AggregatedCascade:
  """A line cascade whose transitions are factorised through ``q`` meta-states.

  Attributes:
    values: ``[n, K]`` loss per (stage, state).
    init: ``[K]`` first stage's state distribution.
    membership: ``[n-1, K, q]`` row-stochastic ``A_i[s, m] = P(meta m | state s)``.
    emission: ``[n-1, q, K]`` row-stochastic ``B_i[m, t] = P(next state t | meta m)``.
    costs: ``[n]`` stage costs.
  """

  values: chex.Array
  init: chex.Array
  membership: chex.Array
  emission: chex.Array
  costs: chex.Array

  def __post_init__(self):
    leaves = (self.values, self.init, self.membership, self.emission, self.costs)
    if not all(validation.is_concrete(x) for x in leaves):
      return
    values = validation.as_numpy("values", self.values, ndim=2)
    n, k = values.shape
    a = validation.as_numpy("membership", self.membership, ndim=3)
    if a.shape[:2] != (n - 1, k):
      raise ValueError(f"membership: expected shape ({n - 1}, {k}, q), got {a.shape}")
    b = validation.as_numpy("emission", self.emission, ndim=3)
    validation.check_shape("emission", b, (n - 1, a.shape[2], k))
    # Reuse the Cascade checks for values / init / costs.
    Cascade(values=values, init=self.init, trans=np.broadcast_to(np.eye(k), (n - 1, k, k)),
            costs=self.costs)
    validation.check_stochastic("membership", a)
    validation.check_stochastic("emission", b)
    dtype = default_float()
    for name, arr in (("values", values), ("init", self.init), ("membership", a),
                      ("emission", b), ("costs", self.costs)):
      object.__setattr__(self, name, jnp.asarray(validation.to_float(name, arr, dtype)))

  @property
  def num_stages(self) -> int:
    return self.values.shape[-2]

  @property
  def num_states(self) -> int:
    return self.values.shape[-1]

  @property
  def num_meta(self) -> int:
    return self.membership.shape[-1]

  def dense(self) -> Cascade:
    """The :class:`Cascade` with ``trans[i] = membership[i] @ emission[i]``."""
    trans = np.einsum("ism,imt->ist", np.asarray(self.membership, np.float64),
                      np.asarray(self.emission, np.float64))
    return Cascade(values=self.values, init=self.init, trans=trans / trans.sum(-1, keepdims=True),
                   costs=self.costs)


# ------------------------------------------------------------------ solver
def solve_recall_aggregated(agg: AggregatedCascade, lam, *, precision=DEFAULT_PRECISION
                            ) -> RecallSolution:
  """Exact recall optimum of the factorised model in ``O(n M K q)``.

  Same recursion as :func:`~ttamer_jax.solve_recall` on ``agg.dense()``; only the
  continuation is computed through the factors.
  """
  if not isinstance(agg, AggregatedCascade):
    raise ValueError(f"agg: expected an AggregatedCascade, got {type(agg).__name__}")
  validation.check_scalar_lam(lam)
  grid, pos = kernel.grid_for(agg.values)
  return _solve_recall_factored(agg, lam, grid, pos, precision)


@functools.partial(jax.jit, static_argnums=(4,))
def _solve_recall_factored(agg: AggregatedCascade, lam, grid, pos, precision) -> RecallSolution:
  dtype = agg.values.dtype
  lam = jnp.asarray(lam, dtype)
  grid = grid.astype(dtype)

  def continuation(g, factors):  # E[G | s] through the meta-states: (G @ B^T) @ A^T
    a_mat, b_mat = factors
    meta = jnp.einsum("xt,mt->xm", g, b_mat, precision=precision)               # [M, q]
    return jnp.einsum("xm,sm->xs", meta, a_mat, precision=precision)

  v_first, index = kernel.backward_scan(
      lam * grid, grid, pos, agg.values, (1 - lam) * agg.costs[1:],
      (agg.membership, agg.emission), continuation)
  value = kernel.line_value(v_first, pos[0], agg.init, (1 - lam) * agg.costs[0], precision)
  return RecallSolution(value=value, index=index)


# ------------------------------------------------------------------ fitting
def _weighted_kl(t, a, b, w):
  ab = a @ b
  terms = jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, _TINY)) - jnp.log(jnp.maximum(ab, _TINY))), 0.0)
  return jnp.sum(w * terms.sum(axis=1))


def _em_step(t, a, b, w, update_a: bool):
  ratio = t / jnp.maximum(a @ b, _TINY)                                # [K, K]
  if update_a:
    new_a = a * (ratio @ b.T)                                         # rows sum to 1 exactly in theory
    new_a = new_a / jnp.maximum(new_a.sum(axis=1, keepdims=True), _TINY)
  else:
    new_a = a
  new_b = b * ((a * w[:, None]).T @ ratio)
  new_b = new_b / jnp.maximum(new_b.sum(axis=1, keepdims=True), _TINY)
  return new_a, new_b


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _factorise(t, w, q: int, num_iters: int, kmeans_iters: int):
  """``(A [K, q], B [q, K], kl)`` for one transition matrix ``t [K, K]`` and visit weights ``w``."""
  k = t.shape[0]
  pw = w + 1.0 / k                       # every row counts a little, visited rows more
  sq = jnp.sum(t * t, axis=1)

  def dist2(centres):                     # [K, q] squared distances of rows to centres
    return jnp.maximum(sq[:, None] - 2 * t @ centres.T + jnp.sum(centres * centres, axis=1)[None, :], 0.0)

  # Greedy weighted farthest-point seeding: deterministic, picks every distinct row
  # when there are at most q of them.
  first = jnp.argmax(pw)
  centres0 = jnp.zeros((q, k), t.dtype).at[0].set(t[first])
  d0 = jnp.sum((t - t[first]) ** 2, axis=1)

  def seed(j, carry):
    centres, d = carry
    nxt = jnp.argmax(pw * d)
    centres = centres.at[j].set(t[nxt])
    return centres, jnp.minimum(d, jnp.sum((t - t[nxt]) ** 2, axis=1))

  centres, _ = jax.lax.fori_loop(1, q, seed, (centres0, d0))

  def lloyd(_, centres):
    assign = jnp.argmin(dist2(centres), axis=1)
    onehot = jax.nn.one_hot(assign, q, dtype=t.dtype) * pw[:, None]      # [K, q]
    mass = onehot.sum(axis=0)
    new = (onehot.T @ t) / jnp.maximum(mass, _TINY)[:, None]
    return jnp.where(mass[:, None] > 0, new, centres)

  centres = jax.lax.fori_loop(0, kmeans_iters, lloyd, centres)
  hard_a = jax.nn.one_hot(jnp.argmin(dist2(centres), axis=1), q, dtype=t.dtype)
  hard_b = centres / jnp.maximum(centres.sum(axis=1, keepdims=True), _TINY)

  def run(a, b, update_a):
    return jax.lax.fori_loop(0, num_iters, lambda _, ab: _em_step(t, ab[0], ab[1], w, update_a), (a, b))

  hard_a, hard_b = run(hard_a, hard_b, False)
  eps = 0.05
  soft_a, soft_b = run((1 - eps) * hard_a + eps / q, (1 - eps) * hard_b + eps / k, True)
  kl_hard, kl_soft = _weighted_kl(t, hard_a, hard_b, w), _weighted_kl(t, soft_a, soft_b, w)
  use_soft = kl_soft < kl_hard
  a = jnp.where(use_soft, soft_a, hard_a)
  b = jnp.where(use_soft, soft_b, hard_b)
  return a, b, jnp.minimum(kl_soft, kl_hard)


def stage_marginals(cascade: Cascade) -> np.ndarray:
  """``[n, K]`` distribution of each stage's state (forward pass of the chain)."""
  dist = [np.asarray(cascade.init, np.float64)]
  for t in np.asarray(cascade.trans, np.float64):
    dist.append(dist[-1] @ t)
  return np.stack(dist)


def aggregate_cascade(cascade: Cascade, num_meta: int, *, num_iters: int = 50,
                      kmeans_iters: int = 10) -> tuple[AggregatedCascade, np.ndarray]:
  """Factorises every transition of ``cascade`` through ``num_meta`` meta-states.

  Args:
    cascade: the :class:`Cascade` to compress (``K`` states).
    num_meta: ``q`` in ``1..K``; ``q = K`` returns the exact factorisation
      ``A = I, B = trans``.
    num_iters: EM iterations per start.
    kmeans_iters: Lloyd iterations of the hard start.

  Returns:
    ``(AggregatedCascade, kl [n-1])``: the factorised model and the visit-weighted
    KL divergence of each fitted transition.

  Runs on the host (EM with restarts); the aggregated cascade it returns is solved
  inside ``jit`` like any other.
  """
  validation.refuse_traced("aggregate_cascade", "aggregate outside jit and pass the "
                           "AggregatedCascade in (docs/jit.md)", cascade=cascade)
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a Cascade, got {type(cascade).__name__}")
  n, k = cascade.num_stages, cascade.num_states
  q = validation.check_positive_int("num_meta", num_meta)
  if q > k:
    raise ValueError(f"num_meta = {q} must be <= the number of states K = {k}")
  validation.check_positive_int("num_iters", num_iters)
  if q == k or n == 1:
    membership = np.broadcast_to(np.eye(k, q), (n - 1, k, q))
    emission = np.asarray(cascade.trans) if q == k else np.zeros((0, q, k))
    return (AggregatedCascade(values=cascade.values, init=cascade.init, membership=membership,
                              emission=emission, costs=cascade.costs), np.zeros(n - 1))
  weights = jnp.asarray(stage_marginals(cascade)[:-1], cascade.trans.dtype)
  a, b, kl = jax.vmap(lambda t, w: _factorise(t, w, q, int(num_iters), int(kmeans_iters)))(
      cascade.trans, weights)
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  agg = AggregatedCascade(values=cascade.values, init=cascade.init,
                          membership=a / a.sum(-1, keepdims=True),
                          emission=b / b.sum(-1, keepdims=True), costs=cascade.costs)
  return agg, np.asarray(kl)
