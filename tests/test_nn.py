"""Early-exit networks: per-stage API, error heads, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttamer_jax as tj
from ttamer_jax.networks import nn

B = 5


def _models():
  return {
      "mlp": (tj.networks.EarlyExitMLP((8, 8, 1), 10, hidden=16, num_blocks=3, rngs=nnx.Rngs(0)),
              np.random.default_rng(0).random((B, 8, 8, 1)).astype(np.float32)),
      "cnn": (tj.EarlyExitCNN((8, 8, 1), 10, channels=(4, 8, 8), rngs=nnx.Rngs(1)),
              np.random.default_rng(1).random((B, 8, 8, 1)).astype(np.float32)),
      "transformer": (tj.networks.EarlyExitTransformer(12, 6, 3, dim=16, num_heads=2, num_blocks=3,
                                              mlp_dim=16, rngs=nnx.Rngs(2)),
                      np.random.default_rng(2).integers(0, 12, (B, 6)).astype(np.int32)),
  }


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stage_api_composes_to_the_full_forward(name):
  model, x = MODELS[name]
  out = model(jnp.asarray(x))
  n = model.num_stages
  assert out.logits.shape == (B, n, model.num_classes)
  assert out.error_logits.shape == (B, n)
  h = model.embed(jnp.asarray(x))
  for i in range(n):
    h = model.block(i, h)
    logits, err = model.head(i, h)
    np.testing.assert_allclose(logits, out.logits[:, i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(err, out.error_logits[:, i], rtol=1e-5, atol=1e-6)
  # stage() folds the embedding into stage 0.
  h = jnp.asarray(x)
  for i in range(n):
    h, logits, _ = model.stage(i, h)
    np.testing.assert_allclose(logits, out.logits[:, i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_predict_in_padded_batches_matches_forward(name):
  model, x = MODELS[name]
  full = model(jnp.asarray(x))
  batched = nn.predict(model, x, batch_size=2)  # 5 = 2 + 2 + 1 (padded).
  np.testing.assert_allclose(batched.logits, full.logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched.error_logits, full.error_logits, rtol=1e-5, atol=1e-6)


def test_without_error_head():
  model = tj.networks.EarlyExitMLP((4,), 3, hidden=8, num_blocks=2, error_head=False, rngs=nnx.Rngs(0))
  out = model(jnp.ones((2, 4)))
  assert out.error_logits is None
  assert model.head(0, jnp.ones((2, 8)))[1] is None
  assert not model.has_error_head


def test_error_head_is_an_observer():
  """Gradients of the error logits reach only the error heads' own parameters."""
  model, x = MODELS["cnn"]
  grads = nnx.jit(nnx.grad(lambda m: m(jnp.asarray(x)).error_logits.sum()))(model)
  touched = []
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if float(jnp.abs(g).max()) > 0:
      touched.append(jax.tree_util.keystr(path))
  assert touched and all("'error'" in p for p in touched), touched
  # ...and the class logits do not depend on the error heads.
  grads = nnx.jit(nnx.grad(lambda m: m(jnp.asarray(x)).logits.sum()))(model)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if "'error'" in jax.tree_util.keystr(path):
      assert float(jnp.abs(g).max()) == 0


def test_local_attention_limits_the_receptive_field():
  """With window w and a [CLS] read-out at position 0, exit i sees tokens 0..w(i+1)-1 only."""
  w, length = 1, 6
  model = tj.networks.EarlyExitTransformer(10, length, 3, dim=16, num_heads=2, num_blocks=3, mlp_dim=16,
                                  window=w, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 10, (4, length)).astype(np.int32)
  base = model(jnp.asarray(x)).logits
  for pos in range(length):
    y = x.copy()
    y[:, pos] = (y[:, pos] + 1) % 10
    changed = np.abs(np.asarray(model(jnp.asarray(y)).logits - base)).max(axis=(0, 2)) > 1e-6
    # Token pos sits at sequence position pos + 1; exit i has seen positions <= w(i+1).
    np.testing.assert_array_equal(changed, [pos + 1 <= w * (i + 1) for i in range(3)])


def test_mean_readout_and_full_attention_see_everything():
  model = tj.networks.EarlyExitTransformer(10, 5, 3, dim=16, num_heads=2, num_blocks=2, mlp_dim=16,
                                  readout="mean", rngs=nnx.Rngs(4))
  x = np.zeros((2, 5), np.int32)
  y = x.copy()
  y[:, -1] = 1
  diff = np.abs(np.asarray(model(jnp.asarray(y)).logits - model(jnp.asarray(x)).logits))
  assert (diff.max(axis=(0, 2)) > 0).all()


def test_check_input_rejects_bad_batches():
  mlp, x = MODELS["mlp"]
  assert mlp.check_input(x).dtype == np.float32
  with pytest.raises(ValueError, match=r"expected shape \[batch, 8, 8, 1\]"):
    mlp.check_input(x[..., 0])
  with pytest.raises(ValueError, match="expected shape"):
    mlp.check_input(x[0])
  with pytest.raises(ValueError, match="empty batch"):
    mlp.check_input(x[:0])
  bad = x.copy()
  bad[1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"x\[1, 2, 3, 0\].*finite"):
    mlp.check_input(bad)
  with pytest.raises(ValueError, match="numeric"):
    mlp.check_input(np.full((1, 8, 8, 1), "a"))
  tf, tokens = MODELS["transformer"]
  bad = tokens.copy()
  bad[2, 4] = 12
  with pytest.raises(ValueError, match=r"x\[2, 4\] = 12 is not a token id in \[0, 12\)"):
    tf.check_input(bad)
  with pytest.raises(ValueError, match="integers"):
    tf.check_input(tokens + 0.5)


def test_config_rebuilds_the_same_network():
  for model, x in MODELS.values():
    rebuilt = nn.build_model(type(model).__name__, model.config(), seed=0)
    assert rebuilt.config() == model.config()
    assert rebuilt(jnp.asarray(x)).logits.shape == model(jnp.asarray(x)).logits.shape
  with pytest.raises(ValueError, match="unknown network"):
    nn.build_model("ResNet", {})
  with pytest.raises(ValueError, match="does not fit"):
    nn.build_model("EarlyExitMLP", {"bogus": 1})
  with pytest.raises(ValueError, match="readout"):
    tj.networks.EarlyExitTransformer(5, 4, 2, readout="max", rngs=nnx.Rngs(0))
