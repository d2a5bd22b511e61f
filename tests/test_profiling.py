"""Profiling networks into exit traces: signals, losses and costs against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttamer_jax as tj
from ttamer_jax.networks import profiling

N = 24


def _digits_like(num, seed=0):
  rng = np.random.default_rng(seed)
  return rng.random((num, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, num).astype(np.int32)


# The tiny networks of test_nn.py (same shapes: their compilations are shared).
MLP = tj.networks.EarlyExitMLP((8, 8, 1), 10, hidden=16, num_blocks=3, rngs=nnx.Rngs(0))
X, Y = _digits_like(N)


def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_signals_and_losses_match_numpy():
  traces = tj.collect_traces(MLP, X, Y, cost="flops")
  out = MLP(jnp.asarray(X))
  logits = np.asarray(out.logits, np.float64)
  p = _softmax(logits)
  preds = logits.argmax(-1)
  np.testing.assert_array_equal(traces.preds, preds)
  np.testing.assert_array_equal(traces.labels, Y)
  sig = traces.signals
  assert sorted(sig) == ["cross_entropy", "entropy", "error_prob", "max_softmax", "zero_one"]
  np.testing.assert_allclose(sig["max_softmax"], p.max(-1), rtol=1e-5)
  np.testing.assert_allclose(sig["entropy"], -(p * np.log(p)).sum(-1), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sig["error_prob"], 1 / (1 + np.exp(-np.asarray(out.error_logits))),
                             rtol=1e-5)
  np.testing.assert_allclose(sig["cross_entropy"], -np.log(p[np.arange(N), :, Y]), rtol=1e-4)
  np.testing.assert_array_equal(sig["zero_one"], preds != Y[:, None])
  # Defaults: scores = max-softmax, losses = 0/1 error.
  np.testing.assert_array_equal(traces.scores, sig["max_softmax"])
  np.testing.assert_array_equal(traces.losses, sig["zero_one"])
  assert traces.costs.shape == (MLP.num_stages,)


def test_score_and_loss_options():
  traces = tj.collect_traces(MLP, X, Y, cost="flops", score="entropy",
                             loss="cross_entropy")
  np.testing.assert_array_equal(traces.scores, traces.signals["entropy"])
  np.testing.assert_array_equal(traces.losses, traces.signals["cross_entropy"])
  np.testing.assert_array_equal(traces.with_score("error_prob").scores,
                                traces.signals["error_prob"])


def test_flops_follow_the_layer_sizes():
  """XLA's count is the matmul FLOPs plus a little elementwise work, per sample."""
  costs = profiling.measure_stage_costs(MLP, X, batch_size=8, timed=False)
  h, c = 16, 10
  head = 2 * h * c + 2 * (h + c)  # classifier + error head (features and sorted probs)
  matmul = np.array([2 * 64 * h, 2 * h * h, 2 * h * h]) + head
  assert (costs.flops >= matmul).all(), (costs.flops, matmul)
  assert (costs.flops <= 1.35 * matmul).all(), (costs.flops, matmul)
  assert np.isnan(costs.seconds).all()
  traces = tj.collect_traces(MLP, X, Y, cost="flops", normalise_costs=False,
                             timing_batch_size=8)
  np.testing.assert_allclose(traces.costs, costs.flops, rtol=1e-6)
  with pytest.warns(DeprecationWarning, match="normalise_costs"):  # the documented old spelling
    old = tj.collect_traces(MLP, X, Y, cost="flops", normalize_costs=False, timing_batch_size=8)
  np.testing.assert_allclose(old.costs, costs.flops, rtol=1e-6)


def test_measured_costs():
  costs = profiling.measure_stage_costs(MLP, X, repeats=3, batch_size=16, warmup=1)
  assert costs.seconds.shape == costs.seconds_iqr.shape == (3,)
  assert np.isfinite(costs.seconds).all() and (costs.seconds > 0).all()
  assert (costs.seconds_iqr >= 0).all()
  np.testing.assert_allclose(costs.per_sample_seconds, costs.seconds / 16)
  traces = tj.collect_traces(MLP, X, Y, repeats=3, timing_batch_size=16)
  np.testing.assert_allclose(float(np.sum(traces.costs)), 1.0, rtol=1e-5)
  assert (np.asarray(traces.costs) > 0).all()


def test_traces_of_a_network_without_error_heads():
  net = tj.networks.EarlyExitMLP((8, 8, 1), 10, hidden=16, num_blocks=3, error_head=False,
                        rngs=nnx.Rngs(0))
  traces = tj.collect_traces(net, X, Y, cost="flops")
  assert "error_prob" not in traces.signals
  with pytest.raises(ValueError, match="without error heads"):
    tj.collect_traces(net, X, Y, score="error_prob", cost="flops")


def test_bad_input_raises_value_error():
  with pytest.raises(ValueError, match=r"expected shape \[batch, 8, 8, 1\]"):
    tj.collect_traces(MLP, X[..., 0], Y)
  with pytest.raises(ValueError, match="y: expected shape"):
    tj.collect_traces(MLP, X, Y[:-1])
  with pytest.raises(ValueError, match=r"y\[0\] = 10 is not a class"):
    tj.collect_traces(MLP, X, np.full(N, 10))
  with pytest.raises(ValueError, match="score"):
    tj.collect_traces(MLP, X, Y, score="confidence")
  with pytest.raises(ValueError, match="loss"):
    tj.collect_traces(MLP, X, Y, loss="hinge")
  with pytest.raises(ValueError, match="cost"):
    tj.collect_traces(MLP, X, Y, cost="dollars")
  with pytest.raises(ValueError, match="repeats"):
    profiling.measure_stage_costs(MLP, X, repeats=0)
