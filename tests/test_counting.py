"""``fit_cascade_arrays``: the fit as one pure function of arrays (DESIGN.md section 11).

Checked against the host fit (``fit_cascade_from_states``), against an independent
NumPy reference built from ``np.bincount``, and under ``jit``, ``vmap`` (fold
weights) and ``grad`` (soft assignments, against central finite differences in
float64).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj

FIELDS = ("values", "init", "trans", "costs")
N, NUM_STAGES, K = 300, 3, 5


def _data(seed=0, num=N, n=NUM_STAGES, k=K, per_request_costs=False):
  """Random int states (state ``k - 1`` of stage 1 never occurs: an empty row),
  losses and costs."""
  rng = np.random.default_rng(seed)
  states = rng.integers(0, k, (num, n)).astype(np.int32)
  states[:, 1] = np.minimum(states[:, 1], k - 2)
  losses = rng.random((num, n)) * (1 + np.arange(n))
  costs = rng.random((num, n)) + 0.5 if per_request_costs else np.array([1.0, 3.0, 6.0][:n])
  return states, losses.astype(np.float32), np.asarray(costs, np.float32)


def _close(a, b, tol=1e-5):
  for f in FIELDS:
    np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), rtol=tol,
                               atol=tol, err_msg=f)


# ------------------------------------------------------------------ NumPy reference
def _smooth(counts, a, prior):
  num = counts + a * prior
  total = num.sum(-1, keepdims=True)
  fallback = np.broadcast_to(prior / prior.sum(-1, keepdims=True), num.shape)
  return np.where(total > 0, num / np.where(total > 0, total, 1), fallback)


def _marginal(counts):
  """``K`` times the empirical distribution (all ones when nothing was seen)."""
  return counts.size * counts / counts.sum() if counts.sum() > 0 else np.ones_like(counts)


def reference_fit(states, losses, costs, k, weights=None, smoothing=1.0, loss_smoothing=1.0,
                  prior="uniform"):
  """``(values, init, trans, costs)`` by weighted ``bincount``s, in float64."""
  states = np.asarray(states)
  losses = np.asarray(losses, np.float64)
  num, n = states.shape
  w = np.ones(num) if weights is None else np.asarray(weights, np.float64)
  counts = np.stack([np.bincount(states[:, i], weights=w, minlength=k) for i in range(n)])
  sums = np.stack([np.bincount(states[:, i], weights=w * losses[:, i], minlength=k)
                   for i in range(n)])
  mean = (w @ losses / w.sum())[:, None]
  denom = counts + loss_smoothing
  values = np.where(denom > 0, (sums + loss_smoothing * mean) / np.where(denom > 0, denom, 1), mean)
  prior_of = _marginal if prior == "marginal" else np.ones_like
  init = _smooth(counts[0], smoothing, prior_of(counts[0]))
  trans = []
  for i in range(n - 1):
    pairs = np.bincount(states[:, i] * k + states[:, i + 1], weights=w,
                        minlength=k * k).reshape(k, k)
    trans.append(_smooth(pairs, smoothing, np.broadcast_to(prior_of(counts[i + 1]), (k, k))))
  costs = np.asarray(costs, np.float64)
  stage = costs if costs.ndim == 1 else w @ costs / w.sum()
  return dict(values=values, init=init, trans=np.asarray(trans).reshape(n - 1, k, k),
              costs=stage / stage.sum())


# ------------------------------------------------------------------ (a) host fit
@pytest.mark.parametrize("prior", ["uniform", "marginal"])
@pytest.mark.parametrize("smoothing, loss_smoothing", [(1.0, 1.0), (0.0, 0.0), (0.3, 4.0)])
@pytest.mark.parametrize("per_request_costs", [False, True])
def test_equals_fit_cascade_from_states(prior, smoothing, loss_smoothing, per_request_costs):
  states, losses, costs = _data(1, per_request_costs=per_request_costs)
  got = tj.fit_cascade_arrays(states, losses, costs, K, smoothing=smoothing,
                              loss_smoothing=loss_smoothing, prior=prior)
  want = tj.data.fit_cascade_from_states(states, losses, costs, K, smoothing=smoothing,
                                    loss_smoothing=loss_smoothing, prior=prior).cascade
  _close(got, want)
  assert isinstance(got, tj.Cascade)
  np.testing.assert_allclose(np.asarray(got.costs).sum(), 1.0, rtol=1e-6)  # unit-free


# ------------------------------------------------------------------ (b) NumPy reference
@pytest.mark.parametrize("prior", ["uniform", "marginal"])
@pytest.mark.parametrize("per_request_costs", [False, True])
def test_matches_bincount_reference_with_weights(prior, per_request_costs):
  states, losses, costs = _data(2, per_request_costs=per_request_costs)
  rng = np.random.default_rng(3)
  weights = rng.random(N) * (rng.random(N) < 0.8)  # some requests left out (weight 0)
  for smoothing, loss_smoothing in [(1.0, 1.0), (0.0, 0.0), (2.5, 0.5)]:
    got = tj.fit_cascade_arrays(states, losses, costs, K, weights=weights, smoothing=smoothing,
                                loss_smoothing=loss_smoothing, prior=prior)
    want = reference_fit(states, losses, costs, K, weights, smoothing, loss_smoothing, prior)
    for f in FIELDS:
      np.testing.assert_allclose(np.asarray(getattr(got, f)), want[f], rtol=2e-5, atol=2e-6,
                                 err_msg=f"{f}, smoothing={smoothing}")


def test_empty_rows_fall_back_to_the_prior_without_smoothing():
  states, losses, costs = _data(4)
  c = tj.fit_cascade_arrays(states, losses, costs, K, smoothing=0.0, loss_smoothing=0.0)
  # State K-1 of stage 1 never occurs: its row is the uniform prior, its loss the stage mean.
  np.testing.assert_allclose(np.asarray(c.trans[1, K - 1]), np.full(K, 1 / K), rtol=1e-6)
  np.testing.assert_allclose(float(c.values[1, K - 1]), losses[:, 1].mean(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(c.trans).sum(-1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------ (c) jit
def test_runs_under_jit_with_the_same_numbers():
  states, losses, costs = _data(5, per_request_costs=True)
  weights = np.random.default_rng(6).random(N)
  fit = jax.jit(tj.fit_cascade_arrays, static_argnums=3, static_argnames=("prior",))
  for prior in ("uniform", "marginal"):
    got = fit(states, losses, costs, K, weights=weights, smoothing=0.5, loss_smoothing=2.0,
              prior=prior)
    want = tj.fit_cascade_arrays(states, losses, costs, K, weights=weights, smoothing=0.5,
                                 loss_smoothing=2.0, prior=prior)
    _close(got, want, tol=1e-6)
  # Smoothing is a traced argument: a new value compiles nothing new.
  partial = jax.jit(functools.partial(tj.fit_cascade_arrays, num_states=K))
  partial(states, losses, costs, smoothing=1.0)
  compiles = []
  listener = lambda name, *args, **kwargs: compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    again = partial(states, losses, costs, smoothing=0.25)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  _close(again, tj.fit_cascade_arrays(states, losses, costs, K, smoothing=0.25), tol=1e-6)


# ------------------------------------------------------------------ (d) vmap over folds
def test_vmap_over_fold_weights_equals_fitting_each_fold():
  states, losses, costs = _data(7, per_request_costs=True)
  folds = 5
  fold = np.random.default_rng(8).permutation(N) % folds
  masks = (fold[None, :] == np.arange(folds)[:, None]).astype(np.float32)   # [F, N]
  fit = jax.jit(jax.vmap(lambda w: tj.fit_cascade_arrays(states, losses, costs, K, weights=w,
                                                         prior="marginal")))
  batch = fit(1.0 - masks)
  assert batch.values.shape == (folds, NUM_STAGES, K)
  for f in range(folds):
    keep = fold != f
    one = tj.fit_cascade_arrays(states[keep], losses[keep], costs[keep], K, prior="marginal")
    _close(jax.tree_util.tree_map(lambda x: x[f], batch), one)


# ------------------------------------------------------------------ (e) grad, soft states
def test_one_hot_soft_states_equal_int_states():
  states, losses, costs = _data(9)
  soft = jax.nn.one_hot(states, K, dtype=jnp.float32)
  for prior in ("uniform", "marginal"):
    _close(tj.fit_cascade_arrays(soft, losses, costs, K, prior=prior),
           tj.fit_cascade_arrays(states, losses, costs, K, prior=prior), tol=1e-6)


def test_grad_through_soft_states_matches_finite_differences():
  num, n, k = 60, 3, 4
  with jax.enable_x64(True):
    rng = np.random.default_rng(10)
    logits = jnp.asarray(rng.normal(size=(num, n, k)) * 2)
    losses = jnp.asarray(rng.random((num, n)))
    costs = jnp.asarray([1.0, 2.0, 4.0])

    def objective(lg, prior):
      c = tj.fit_cascade_arrays(jax.nn.softmax(lg), losses, costs, k, prior=prior,
                                smoothing=0.5)
      return tj.soft_solve_recall(c, 0.8, 0.05) + 0.1 * c.values.sum()

    for prior in ("uniform", "marginal"):
      f = jax.jit(functools.partial(objective, prior=prior))
      grad = jax.grad(f)(logits)
      assert grad.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(grad)))
      assert float(jnp.abs(grad).max()) > 0
      eps = 1e-6
      for seed in range(3):
        d = jnp.asarray(np.random.default_rng(100 + seed).normal(size=logits.shape))
        fd = (f(logits + eps * d) - f(logits - eps * d)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(grad, d)), float(fd), rtol=1e-5, atol=1e-8)


def test_grad_of_a_fitted_value_is_finite_in_float32():
  states, losses, costs = _data(11, num=100)
  logits = jax.nn.one_hot(states, K) * 3.0
  g = jax.grad(lambda lg: tj.fit_cascade_arrays(jax.nn.softmax(lg), losses, costs, K)
               .values.sum())(logits)
  assert bool(jnp.all(jnp.isfinite(g)))


# ------------------------------------------------------------------ (f) bad input
def _bad_cases():
  states, losses, costs = _data(12, num=20)
  soft = np.asarray(jax.nn.one_hot(states, K))
  nan = losses.copy()
  nan[3, 1] = np.nan
  out = states.copy()
  out[2, 0] = K
  half = soft.copy()
  half[0, 0] *= 0.5
  ok = dict(states=states, losses=losses, costs=costs, num_states=K)
  return [
      ("states", dict(ok, states=states[:, 0])),
      ("states", dict(ok, states=out)),
      ("states", dict(ok, states=-states - 1)),
      ("states", dict(ok, states=states + 0.5)),
      ("states", dict(ok, states=soft[..., :K - 1])),
      ("states", dict(ok, states=half)),
      ("losses", dict(ok, losses=losses[:-1])),
      ("losses", dict(ok, losses=-losses)),
      ("losses", dict(ok, losses=nan)),
      ("costs", dict(ok, costs=costs[:-1])),
      ("costs", dict(ok, costs=-costs)),
      ("costs", dict(ok, costs=np.full(costs.shape, np.inf))),
      ("weights", dict(ok, weights=np.zeros(20))),
      ("weights", dict(ok, weights=np.ones(19))),
      ("weights", dict(ok, weights=-np.ones(20))),
      ("weights", dict(ok, weights=np.full(20, np.nan))),
      ("smoothing", dict(ok, smoothing=-1.0)),
      ("loss_smoothing", dict(ok, loss_smoothing=np.nan)),
      ("num_states", dict(ok, num_states=0)),
      ("num_states", dict(ok, num_states=2.0)),
      ("prior", dict(ok, prior="jeffreys")),
  ]


@pytest.mark.parametrize("field, kwargs", _bad_cases())
def test_bad_input_names_the_field(field, kwargs):
  with pytest.raises(ValueError, match=rf"^{field}\b"):
    tj.fit_cascade_arrays(**kwargs)
