"""The training-loop loss term with the deployed ingredients (issue 27, DESIGN.md section 12):
``serving_loss`` = the soft recall value of the cascade fitted, by the same counting as
``fit_cascade``, to soft memberships of the deployed discretiser's bins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttamer_jax as tj
from ttamer_jax.core import training_loss as sl
from ttamer_jax.data.fitting import column_quantiles
from ttamer_jax.networks import training

B, N, K = 400, 4, 5


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  conf = rng.uniform(0, 1, (B, N)).astype(np.float32)
  conf[:, 1:] = np.clip(conf[:, 1:] + 0.2 * conf[:, :-1], 0, 1)  # a chain: stages correlate
  err = (rng.uniform(0, 1, (B, N)) > conf).astype(np.float32)
  edges = column_quantiles(conf.astype(np.float64), np.arange(1, K) / K).T.astype(np.float32)
  return conf, err, np.array([1.0, 2.0, 3.0, 4.0], np.float32), edges


def test_hard_limit_is_the_recall_optimum_of_the_hard_fit(batch):
  conf, err, costs, edges = batch
  states = np.stack([np.searchsorted(edges[i], conf[:, i], side="right") for i in range(N)], 1)
  fitted = tj.data.fit_cascade_from_states(states, err, costs, K)
  for lam in (0.3, 0.8, 0.95):
    exact = float(tj.solve_recall(fitted.cascade, lam).value)
    soft = float(sl.serving_loss(conf, err, costs, edges, lam, beta=0.0, width=1e-6))
    assert soft == pytest.approx(exact, rel=1e-5, abs=1e-6), lam
    # beta > 0: below the exact value by at most the soft-min bound
    smooth = float(sl.serving_loss(conf, err, costs, edges, lam, beta=0.01, width=1e-6))
    assert exact - tj.soft_min_error_bound(N, 0.01) - 1e-6 <= smooth <= exact + 1e-6


def test_memberships_are_rows_of_one_and_tend_to_the_deployed_bin(batch):
  conf, _, _, edges = batch
  soft = np.asarray(sl.soft_bins(jnp.asarray(conf), jnp.asarray(edges), 1e-6))
  assert soft.shape == (B, N, K)
  np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
  hard = np.stack([np.searchsorted(edges[i], conf[:, i], side="right") for i in range(N)], 1)
  np.testing.assert_array_equal(soft.argmax(-1), hard)


def test_costs_in_any_unit_give_the_same_value_and_gradient(batch):
  conf, err, costs, edges = batch
  f = lambda s, c: sl.serving_loss(s, err, c, edges, 0.9)
  v_s, g_s = jax.value_and_grad(f)(conf, costs)
  v_ms, g_ms = jax.value_and_grad(f)(conf, costs * 1000.0)
  assert float(v_s) == pytest.approx(float(v_ms), rel=1e-6)
  # float32: the shares c / sum(c) of the two units differ by an ulp, so the gradients agree
  # to a few ulps of their largest entry, not entry by entry.
  np.testing.assert_allclose(g_ms, g_s, rtol=1e-4, atol=16 * 1.2e-7 * float(np.abs(g_s).max()))
  assert np.abs(g_s).max() > 0


def test_lam_is_traced_one_program_for_a_schedule(batch):
  conf, err, costs, edges = batch
  f = jax.jit(lambda lam: sl.serving_loss(conf, err, costs, edges, lam))
  values = [float(f(jnp.float32(lam))) for lam in (0.5, 0.8, 0.9)]
  assert f._cache_size() == 1
  for lam, value in zip((0.5, 0.8, 0.9), values):
    assert value == pytest.approx(float(sl.serving_loss(conf, err, costs, edges, lam)), rel=1e-6)


def test_quantile_edges_inside_jit_match_the_discretiser(batch):
  conf = batch[0]
  edges = jax.jit(sl.quantile_edges, static_argnums=1)(conf, K)
  fitted = tj.fit_discretiser(conf, K, binning="quantile")
  np.testing.assert_allclose(edges, fitted.edges, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, field", [
    (dict(lam=1.5), "lam"), (dict(lam=-0.1), "lam"),
    (dict(signals=np.full((B, N), np.nan, np.float32)), "signals"),
    (dict(losses=np.zeros((B, N - 1), np.float32)), "losses"),
    (dict(costs=np.array([1.0, -2.0, 3.0, 4.0], np.float32)), "costs"),
    (dict(costs=np.ones(3, np.float32)), "costs"),
    (dict(edges=np.ones((N - 1, K - 1), np.float32)), "edges"),
    (dict(edges=np.tile(np.linspace(1, 0, K - 1, dtype=np.float32), (N, 1))), "edges"),
    (dict(width=0.0), "width"), (dict(beta=-1.0), "beta"),
])
def test_bad_input_is_refused_naming_the_field(batch, change, field):
  conf, err, costs, edges = batch
  args = dict(signals=conf, losses=err, costs=costs, edges=edges, lam=0.9)
  args.update(change)
  with pytest.raises(ValueError, match=field):
    sl.serving_loss(**args)


def test_every_exit_head_gets_a_gradient_at_initialisation():
  """With the edges the network would be deployed with now (quantiles of its own signals)
  and stages cheap enough that the fitted policy consults every exit, each head's
  parameters get a gradient well above float32 noise (docs/training.md says when not)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 256), jnp.int32)
  model = tj.networks.EarlyExitMLP(input_shape=(16,), num_classes=4, hidden=32, num_blocks=3,
                          rngs=nnx.Rngs(0))
  costs = jnp.asarray([1.0, 1.0, 1.0])

  def loss(m):
    conf, err = sl.exit_outcomes(m(x).logits, y)
    edges = jax.lax.stop_gradient(sl.quantile_edges(conf, 4))
    return sl.serving_loss(conf, err, costs, edges, 0.99)

  grads = nnx.grad(loss)(model)
  for i in range(3):
    leaves = jax.tree.leaves(nnx.state(grads.heads[i], nnx.Param))
    norm = float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in leaves)))
    assert norm > 1e-4, (i, norm)


def test_train_schedules_lam_without_recompiling():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(128, 8)).astype(np.float32)
  y = rng.integers(0, 3, 128)
  model = tj.networks.EarlyExitMLP(input_shape=(8,), num_classes=3, hidden=16, num_blocks=2,
                          rngs=nnx.Rngs(0))
  costs = jnp.asarray([1.0, 2.0])

  def aux(logits, labels, lam):
    conf, err = sl.exit_outcomes(logits, labels)
    return sl.serving_loss(conf, err, costs, jax.lax.stop_gradient(sl.quantile_edges(conf, 3)), lam)

  before = training._train_step._cache_size()
  config = tj.networks.TrainConfig(num_steps=6, batch_size=32)
  hist = tj.train(model, x, y, config, progress=False, aux_loss=aux,
                  aux_lam=lambda t: 0.5 + 0.08 * t)
  assert training._train_step._cache_size() == before + 1
  assert hist.aux_loss.shape == (6,) and np.isfinite(hist.aux_loss).all()
  assert (hist.aux_loss > 0).all()
  with pytest.raises(ValueError, match="aux_lam at step 3 = 1.1"):
    tj.train(model, x, y, config, progress=False, aux_loss=aux, aux_lam=lambda t: 0.5 + 0.2 * t)
  with pytest.raises(ValueError, match="aux_lam: given without aux_loss"):
    tj.train(model, x, y, config, progress=False, aux_lam=0.5)


def test_degenerate_batches_stay_finite_inside_jit():
  """Valid but degenerate input -- every signal equal (all edges tie), no errors, one
  request, a stage that costs nothing -- gives a finite value and gradient inside jit."""
  f = jax.jit(jax.value_and_grad(lambda s, l, c, lam: sl.serving_loss(
      s, l, c, jax.lax.stop_gradient(sl.quantile_edges(s, K)), lam)))
  cases = [(np.full((B, N), 0.5, np.float32), np.zeros((B, N), np.float32)),
           (np.random.default_rng(3).uniform(size=(1, N)).astype(np.float32),
            np.ones((1, N), np.float32))]
  for signals, losses in cases:
    for costs in (np.array([0.0, 1.0, 2.0, 3.0], np.float32), np.zeros(N, np.float32)):
      value, grad = f(signals, losses, costs, jnp.float32(0.9))
      assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def test_batch_serving_cost_costs_have_no_unit_and_lam_is_checked():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(64, 3, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 64))
  costs = jnp.asarray([1.0, 2.0, 3.0])
  seconds = tj.batch_serving_cost(logits, labels, costs, 0.8)
  millis = tj.batch_serving_cost(logits, labels, 1000.0 * costs, 0.8)
  assert float(seconds) == pytest.approx(float(millis), rel=1e-6)
  with pytest.raises(ValueError, match="lam"):
    tj.batch_serving_cost(logits, labels, costs, 1.5)
