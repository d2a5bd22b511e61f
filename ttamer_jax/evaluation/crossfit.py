"""Cross-fitting every candidate of a selection as a few batched programs (DESIGN.md section 11).

A fold is a weight vector: fold ``f`` fits on the requests outside it (weight 1)
and is replayed on the requests inside it; the refit on all requests is one more
"fold" of all-one weights. So every (candidate, fold) of one family is one
instance of one compiled program:

* **T-Tamer** (per solver kind): bin the instance's score table with its own edges
  (padded to a shared number of bins), count (:func:`~ttamer_jax.core.counting.fitted_tables`,
  states padded to a shared ``K``), solve at the traced ``lam``, replay every
  request, and evaluate the fitted model exactly (what the model predicts);
* **simple rules** (per rule type): replay the fold's grid of parameters on every
  request, pick the parameter of least ``J`` on the fold's training requests, keep
  the picked parameter's outcome;
* **posterior-answer calibrators**: every (fold, inner fold) calibrator fitted by
  weighted Newton steps and applied to every request.

Requests are padded to a bucket (:func:`~ttamer_jax.data.fitting.request_bucket`)
with weight 0, so a new number of requests rarely compiles anew; the host only fits
bin edges (quantiles) and gathers each request's out-of-fold outcome.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import counting, kernel, validation
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.policies import NoRecallPolicy, RecallPolicy
from ttamer_jax.core.replay import replay_compiled
from ttamer_jax.core.solvers import solve_no_recall_compiled, solve_recall_on_grid
from ttamer_jax.core.struct import pytree_dataclass, trusted
from ttamer_jax.data import answers as answer_models
from ttamer_jax.data.discretise import FEATURES, Discretiser
from ttamer_jax.evaluation.exact import no_recall_metrics_compiled, recall_metrics_compiled

FEATURE_CODES = {feature: code for code, feature in enumerate(FEATURES)}


def fold_weights(fold_ids: np.ndarray, folds: int, size: int) -> np.ndarray:
  """``[F + 1, size]`` training weights: outside fold ``f``, then every request."""
  num = fold_ids.size
  w = np.zeros((folds + 1, size), np.float32)
  w[:folds, :num] = fold_ids[None, :] != np.arange(folds)[:, None]
  w[folds, :num] = 1.0
  return w


# ------------------------------------------------------------------ T-Tamer instances
@pytree_dataclass
class Instances:
  """A batch of (candidate, fold) fits of one solver kind.

  Attributes:
    fit_table: ``[I]`` table the fit counts on (the fold's training view).
    replay_table: ``[I]`` table the policy is replayed on.
    fold: ``[I]`` row of the ``[G, N]`` fold weights the fit uses.
    edges: ``[I, n, B - 1]`` bin edges, padded with ``+inf`` (never reached).
    feature: ``[I]`` code of the agreement feature (:data:`FEATURE_CODES`).
    num_states: ``[I]`` the candidate's own ``K`` (states beyond it are padding).
    smoothing: ``[I]`` pseudo-counts of transitions and losses.
    costs: ``[I, n]`` unit-free stage costs of the fold's training requests.
    full: ``[I]`` mean raw cost of running every stage on those requests.
  """

  fit_table: chex.Array
  replay_table: chex.Array
  fold: chex.Array
  edges: chex.Array
  feature: chex.Array
  num_states: chex.Array
  smoothing: chex.Array
  costs: chex.Array
  full: chex.Array


@pytree_dataclass
class InstanceOutcomes:
  """What each instance's policy did and what its model says.

  Attributes:
    loss: ``[I, N]`` true loss of each request's answer (replay table).
    cost: ``[I, N]`` raw cost of each request.
    modelled: ``[I, 2]`` the fitted model's exact ``(error, cost share)`` of its policy.
    values, init, trans, counts: the fitted tables (``[I, n, K]``, ``[I, K]``,
      ``[I, n-1, K, K]``, ``[I, n, K]``).
    table: ``[I, n, K]`` the policy's index (recall) or stop table (no recall).
    lam: ``[I]`` the ``lam`` each model was solved at.
  """

  loss: chex.Array
  cost: chex.Array
  modelled: chex.Array
  values: chex.Array
  init: chex.Array
  trans: chex.Array
  counts: chex.Array
  table: chex.Array
  lam: chex.Array


def _instance_states(edges, feature, scores, preds):
  """``[N, n]`` states of one instance: the :class:`Discretiser` of its traced edges and
  its traced feature code (one branch runs: the agree_best reference costs [N, n, n])."""
  return jax.lax.switch(feature, [
      functools.partial(lambda f: Discretiser(edges=edges, feature=f)(scores, preds), f)
      for f in FEATURES])


def pick_point(error, share, reference, lam, tolerance, by_tolerance: bool):
  """Row of a grid's training ``(error [P], cost share [P])``: least ``J`` at ``lam``, or
  (``by_tolerance``) the cheapest within ``tolerance`` of ``reference`` (the last exit's
  error), else the most accurate -- :class:`~ttamer_jax.evaluation.selection.OperatingPoint`
  in the program. Ties: the first row."""
  if not by_tolerance:
    return jnp.argmin(lam * error + (1 - lam) * share)
  ok = error <= reference + tolerance
  return jnp.where(ok.any(), jnp.argmin(jnp.where(ok, share, jnp.inf)), jnp.argmin(error))


def _share(cost, full):
  """Cost as a share of running every stage (0 when that costs nothing)."""
  return jnp.where(full > 0, cost / jnp.where(full > 0, full, 1.0), 0.0)


def _weighted_mean(x, w):
  return x.astype(w.dtype) @ w / jnp.maximum(w.sum(), jnp.finfo(w.dtype).tiny)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def ttamer_outcomes(inst: Instances, scores, preds, losses, weights, num_states: int,
                    recall: bool, by_tolerance: bool, raw_costs, lam, lams, tolerance
                    ) -> InstanceOutcomes:
  """Fit, solve, replay and evaluate every instance (one program per kind, ``K`` bucket,
  request bucket and mode).

  With ``lam`` each model is solved at ``lam``; ``by_tolerance``, at the ``lam`` of the
  grid ``lams`` whose policy is the cheapest within ``tolerance`` of the last exit's
  error when replayed on the instance's own training requests."""
  k = num_states
  dtype = jnp.result_type(float)
  lam = jnp.asarray(lam, dtype)
  states_of = jnp.arange(k)

  def one(x):
    fit_t, rep_t, fold, edges, feature, kc, smoothing, costs, full = x
    possible = (states_of < kc).astype(dtype)
    first = possible * jnp.where(feature > 0, states_of % 2 == 0, True)
    w = weights[fold]
    fit_states = _instance_states(edges, feature, scores[fit_t], preds[fit_t])
    values, init, trans, counts = counting.fitted_tables(
        fit_states, losses[fit_t], w, possible, first, smoothing, smoothing, num_states=k)
    cascade = trusted(Cascade, values=values, init=init, trans=trans, costs=costs.astype(dtype))
    zeros = jnp.zeros(fit_states.shape, dtype)
    zero_preds = jnp.zeros(fit_states.shape, jnp.int32)

    def solved(lam_v):
      if recall:
        grid, pos = kernel.grid_for(values)
        index = solve_recall_on_grid(cascade, lam_v, grid, pos).index
        return trusted(RecallPolicy, index=index, values=values, lam=lam_v), index
      stop = solve_no_recall_compiled(cascade, lam_v).stop
      return trusted(NoRecallPolicy, stop=stop), stop

    if by_tolerance:
      def on_training(lam_v):
        res = replay_compiled(solved(lam_v)[0], fit_states, losses[fit_t], raw_costs, zeros,
                              zero_preds)
        return _weighted_mean(res.loss, w), _weighted_mean(res.cost, w)

      err, cost = jax.lax.map(on_training, lams.astype(dtype))
      reference = _weighted_mean(losses[fit_t][:, -1], w)
      lam_i = lams.astype(dtype)[pick_point(err, _share(cost, full), reference, lam, tolerance,
                                            True)]
    else:
      lam_i = lam
    policy, table = solved(lam_i)
    metrics = (recall_metrics_compiled if recall else no_recall_metrics_compiled)(cascade, policy)
    # Exit candidates fit and replay one table: bin it once.
    rep_states = jax.lax.cond(
        rep_t == fit_t, lambda: fit_states,
        lambda: _instance_states(edges, feature, scores[rep_t], preds[rep_t]))
    res = replay_compiled(policy, rep_states, losses[rep_t], raw_costs, zeros, zero_preds)
    return (res.loss, res.cost, jnp.stack([metrics.loss, metrics.cost]), values, init, trans,
            counts, table.astype(dtype), lam_i)

  fields = (inst.fit_table, inst.replay_table, inst.fold, inst.edges, inst.feature,
            inst.num_states, inst.smoothing, inst.costs, inst.full)
  return InstanceOutcomes(*jax.lax.map(one, fields))


# ------------------------------------------------------------------ simple rules
@functools.partial(jax.jit, static_argnums=(9,))
def rule_outcomes(policies, scores, preds, losses, raw_costs, weights, full_costs, lam, tolerance,
                  by_tolerance: bool):
  """Per fold: the grid of ``P`` policies (leading axes ``[G, P]``) replayed on every
  request, the operating point picked on the fold's training requests (:func:`pick_point`),
  and its outcome kept. Returns ``(picked [G], loss [G, N], cost [G, N])``."""
  dtype = jnp.result_type(float)
  lam = jnp.asarray(lam, dtype)
  zeros = jnp.zeros(scores.shape, jnp.int32)

  def one(x):
    grid, w, full = x
    res = jax.vmap(lambda p: replay_compiled(p, zeros, losses, raw_costs, scores, preds))(grid)
    err = _weighted_mean(res.loss, w)
    share = _share(_weighted_mean(res.cost, w), full)
    i = pick_point(err, share, _weighted_mean(losses[:, -1], w), lam, tolerance, by_tolerance)
    return i, res.loss[i], res.cost[i]

  return jax.lax.map(one, (policies, weights.astype(dtype), full_costs.astype(dtype)))


# ------------------------------------------------------------------ answer calibrators
@functools.partial(jax.jit, static_argnums=(4,))
def answer_fits(scores, preds, scaled_losses, weights, unit: bool, views):
  """Every calibrator of ``weights [M, N]`` fitted, and applied where ``views`` asks.

  The same ridge logistic regressions as :func:`ttamer_jax.fit_answer_model` (each
  calibrator standardises with its own requests' mean and spread, then takes
  Newton steps until converged), but all ``M`` at once: a standardised coefficient
  vector ``w`` acts on the raw features as ``T_m w`` (``T_m`` scales by ``1 / scale``
  and moves the mean into the intercept), so the gradient and Hessian of every
  calibrator are products with the *shared* raw features (``T_m^T X^T diag(.) X T_m``):
  one ``[N, M]`` pass per pair and step instead of ``M`` passes.

  ``views [V, N]`` (int) names the calibrator each request is answered by in each
  view (a request needs only the few calibrators that may score it, not all ``M``).
  Returns ``(weights [M, P, D], mean [M, P, D], scale [M, P, D], confidence [V, N, n],
  answer [V, N, n])``.
  """
  dtype = scores.dtype
  n = scores.shape[1]
  raw = answer_models.pair_features(scores, preds, unit)                  # [N, P, D]
  d = raw.shape[-1]
  total = weights.sum(1)                                                  # [M]
  mean = jnp.einsum("mn,npd->mpd", weights, raw) / total[:, None, None]
  var = jnp.einsum("mn,npd->mpd", weights, raw ** 2) / total[:, None, None] - mean ** 2
  # E[x^2] - mean^2 leaves rounding noise where a feature is constant: treat a
  # spread below float precision of the mean as none (fit_answer_model's scale 1).
  constant = var <= 1e-6 * (mean ** 2 + 1.0)
  scale = jnp.where(constant, 1.0, jnp.sqrt(jnp.maximum(var, 0.0))).at[..., 0].set(1.0)
  mean = mean.at[..., 0].set(0.0)
  _, pj = answer_models.pair_indices(n)
  targets = jnp.clip(scaled_losses[:, pj], 0.0, 1.0)                      # [N, P]
  ridge = answer_models.RIDGE * total[:, None, None] * jnp.eye(d, dtype=dtype).at[0, 0].set(0.0)
  jitter = 1e-6 * jnp.eye(d, dtype=dtype)
  # The Hessian is symmetric: its product needs only the upper triangle's d (d + 1) / 2
  # columns of the outer products (28 of 49 at d = 7).
  up_r, up_c = np.triu_indices(d)

  def pair(args):
    x, y, mu, sd = args                                  # [N, D], [N], [M, D], [M, D]
    xx = x[:, up_r] * x[:, up_c]                                             # [N, T]
    # T_m: raw coefficients = T_m @ standardised ones.
    t_mat = jnp.zeros((mu.shape[0], d, d), dtype)
    t_mat = t_mat.at[:, jnp.arange(d), jnp.arange(d)].set(1.0 / sd)
    t_mat = t_mat.at[:, 0, :].add(-mu / sd)

    def step(w):                                         # w: [M, D] standardised
      a = jnp.einsum("mde,me->md", t_mat, w)                                 # raw coefficients
      p = jax.nn.sigmoid(x @ a.T)                                            # [N, M]
      g_raw = (weights.T * (p - y[:, None])).T @ x                           # [M, D]
      s = weights.T * p * (1 - p)                                            # [N, M]
      tri = s.T @ xx                                                         # [M, T]
      h_raw = jnp.zeros((mu.shape[0], d, d), dtype).at[:, up_r, up_c].set(tri)
      h_raw = h_raw.at[:, up_c, up_r].set(tri)
      grad = jnp.einsum("mdk,md->mk", t_mat, g_raw) + jnp.einsum("mde,me->md", ridge, w)
      hess = jnp.einsum("mdk,mde,mel->mkl", t_mat, h_raw, t_mat) + ridge + jitter
      return w - jnp.linalg.solve(hess, grad[..., None])[..., 0]

    return answer_models.newton(step, jnp.zeros((mu.shape[0], d), dtype),
                                answer_models.NEWTON_STEPS)

  coef = jax.lax.map(pair, (raw.transpose(1, 0, 2), targets.T, mean.transpose(1, 0, 2),
                            scale.transpose(1, 0, 2)))                        # [P, M, D]
  coef = coef.transpose(1, 0, 2)

  def view(which):                                       # [N]: each request's calibrator
    logits = answer_models.pair_logits(raw, coef[which], mean[which], scale[which])
    return answer_models.answers_from_logits(logits, n)

  conf, answer = jax.lax.map(view, views)
  return coef, mean, scale, conf, answer


def subkeys(key, num: int) -> np.ndarray:
  """``[num, 2]`` uint32 keys drawn on the host from ``key`` (no compiled program,
  unlike ``jax.random.split``); any of them is a valid legacy PRNG key."""
  rng = np.random.default_rng(validation.key_seed(key))
  return rng.integers(0, 2**32, (num, 2), dtype=np.uint32)
