"""Training (joint exit loss, determinism) and checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttamer_jax as tj
from ttamer_jax.networks import training


def _data(num=96, seed=0):
  """A small separable 10-class problem shaped like the 8x8 digits."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, num).astype(np.int32)
  centers = rng.normal(size=(10, 8, 8, 1))
  x = (centers[y] + 0.3 * rng.normal(size=(num, 8, 8, 1))).astype(np.float32)
  return x, y


# The tiny networks of test_nn.py (same shapes: their compilations are shared).
def _model(seed=0, num_blocks=3):
  return tj.networks.EarlyExitMLP((8, 8, 1), 10, hidden=16, num_blocks=num_blocks, rngs=nnx.Rngs(seed))


CONFIG = tj.networks.TrainConfig(num_steps=25, batch_size=32, learning_rate=1e-2, warmup_steps=5,
                        seed=3)


def _params(model):
  return [np.asarray(p) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_exit_loss_matches_numpy():
  x, y = _data(10)
  model = _model()
  weights = np.array([0.2, 0.3, 0.5], np.float32)
  y[:3] = model(jnp.asarray(x[:3])).logits[:, 0].argmax(-1)  # some right, some wrong
  rng = np.random.default_rng(1)
  for head in model.heads:  # error heads start at zero; make their logits informative.
    head.error.kernel[...] = jnp.asarray(rng.normal(size=head.error.kernel.shape), jnp.float32)
  loss, aux = training.exit_loss(model, jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights), 0.7)
  out = model(jnp.asarray(x))
  logits = np.asarray(out.logits, np.float64)
  err = np.asarray(out.error_logits, np.float64)
  ce = -_log_softmax(logits)[np.arange(10), :, y].mean(axis=0)
  wrong = (logits.argmax(-1) != y[:, None]).astype(np.float64)
  bce = (np.maximum(err, 0) - err * wrong + np.log1p(np.exp(-np.abs(err)))).mean(axis=0)
  np.testing.assert_allclose(aux["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(aux["error_bce"], bce, rtol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], 1 - wrong.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(loss, weights @ ce + 0.7 * weights @ bce, rtol=1e-5)


def test_training_lowers_the_loss_of_every_exit():
  x, y = _data()
  model = _model()
  history = tj.train(model, x, y, CONFIG, progress=False)
  assert history.loss.shape == (25,)
  assert history.exit_loss.shape == history.error_loss.shape == (25, 3)
  assert (history.exit_loss[-5:].mean(0) < history.exit_loss[:5].mean(0)).all()
  assert history.seconds > 0
  acc = training.exit_accuracy(model, x, y)
  assert acc.shape == (3,) and (acc > 0.8).all()  # separable data, chance = 1/10.


def test_training_is_deterministic_given_the_seeds():
  x, y = _data()
  runs = []
  for _ in range(2):
    model = _model(seed=0)
    tj.train(model, x, y, CONFIG, progress=False)
    runs.append(_params(model))
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)  # bit-identical
  other = _model(seed=0)
  tj.train(other, x, y, tj.networks.TrainConfig(**{**CONFIG.__dict__, "seed": 4}),
           progress=False)
  assert any(not np.array_equal(a, b) for a, b in zip(runs[0], _params(other)))


def test_batch_order_is_a_permutation_per_epoch():
  order = training._batch_order(seed=0, num=10, batch_size=3, num_steps=7)  # private: tested directly
  assert order.shape == (7, 3)
  for epoch in np.split(order[:6].ravel(), 2):  # 3 batches of 3 per epoch, 1 sample dropped.
    assert len(set(epoch.tolist())) == 9


def test_zero_exit_weight_leaves_that_head_untouched():
  x, y = _data()
  model = _model()
  before = np.asarray(model.heads[0].classifier.kernel[...])
  config = tj.networks.TrainConfig(**{**CONFIG.__dict__, "exit_weights": (0.0, 0.5, 0.5),
                             "weight_decay": 0.0, "num_steps": 3})
  tj.train(model, x, y, config, progress=False)
  np.testing.assert_array_equal(before, model.heads[0].classifier.kernel[...])


def test_bad_training_input():
  x, y = _data(20)
  model = _model()
  with pytest.raises(ValueError, match=r"y\[3\] = 17 is not a class in \[0, 10\)"):
    tj.train(model, x, np.where(np.arange(20) == 3, 17, y), CONFIG, progress=False)
  with pytest.raises(ValueError, match="y: expected shape"):
    tj.train(model, x, y[:5], CONFIG, progress=False)
  with pytest.raises(ValueError, match="expected shape"):
    tj.train(model, x[:, :4], y, CONFIG, progress=False)
  with pytest.raises(ValueError, match="expected shape"):
    tj.train(model, x.reshape(20, 64), y, CONFIG, progress=False)
  bad = tj.networks.TrainConfig(**{**CONFIG.__dict__, "exit_weights": (1.0, 1.0)})
  with pytest.raises(ValueError, match="exit_weights"):
    tj.train(model, x, y, bad, progress=False)
  bad = tj.networks.TrainConfig(**{**CONFIG.__dict__, "learning_rate": float("nan")})
  with pytest.raises(ValueError, match="learning_rate"):
    tj.train(model, x, y, bad, progress=False)


# ------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path):
  x, _ = _data(4)
  model = _model(seed=0)
  path = tmp_path / "model.npz"
  tj.save_checkpoint(path, model, metadata={"accuracy": [0.5, 0.9, 0.95]})
  assert sorted(os.listdir(tmp_path)) == ["model.npz"]  # no temp file left behind
  other = _model(seed=1)
  assert any(not np.array_equal(a, b) for a, b in zip(_params(model), _params(other)))
  tj.load_checkpoint(path, other)
  for a, b in zip(_params(model), _params(other)):
    np.testing.assert_array_equal(a, b)
  rebuilt = tj.load_checkpoint(path)  # class and config from the file
  np.testing.assert_array_equal(rebuilt(jnp.asarray(x)).logits, model(jnp.asarray(x)).logits)
  meta = training.checkpoint_metadata(path)
  assert meta["model"] == "EarlyExitMLP" and meta["metadata"] == {"accuracy": [0.5, 0.9, 0.95]}
  assert meta["format_version"] == training.CHECKPOINT_FORMAT_VERSION


def test_checkpoint_round_trip_for_every_network(tmp_path):
  nets = [tj.EarlyExitCNN((8, 8, 1), 10, channels=(4, 8, 8), rngs=nnx.Rngs(0)),
          tj.networks.EarlyExitTransformer(12, 6, 3, dim=16, num_heads=2, num_blocks=3, mlp_dim=16,
                                  window=2, rngs=nnx.Rngs(0))]
  for i, net in enumerate(nets):
    tj.save_checkpoint(tmp_path / f"{i}.npz", net)
    loaded = tj.load_checkpoint(tmp_path / f"{i}.npz")
    assert loaded.config() == net.config()
    for a, b in zip(_params(net), _params(loaded)):
      np.testing.assert_array_equal(a, b)


def _rewrite(path, **changes):
  with np.load(path, allow_pickle=False) as data:
    files = {k: data[k] for k in data.files}
  meta = json.loads(str(files["__meta__"]))
  for k, v in changes.items():
    if k == "meta":
      meta.update(v)
    elif v is None:
      files.pop(k)
    else:
      files[k] = v
  files["__meta__"] = np.asarray(json.dumps(meta))
  with open(path, "wb") as f:
    np.savez(f, **files)


def test_checkpoint_errors(tmp_path):
  model = _model()
  path = tmp_path / "m.npz"
  with pytest.raises(ValueError, match="no such file"):
    tj.load_checkpoint(path, model)
  path.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="not a readable .npz"):
    tj.load_checkpoint(path, model)

  tj.save_checkpoint(path, model)
  with pytest.raises(ValueError, match="holds a EarlyExitMLP, cannot load into a EarlyExitCNN"):
    tj.load_checkpoint(path, tj.EarlyExitCNN((8, 8, 1), 10, channels=(4, 8, 8),
                                             rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="config"):
    tj.load_checkpoint(path, _model(num_blocks=2))

  _rewrite(path, meta={"format_version": 99})
  with pytest.raises(ValueError, match="format_version 99 is not supported"):
    tj.load_checkpoint(path, model)

  tj.save_checkpoint(path, model)
  _rewrite(path, **{"param:linears/0/kernel": np.zeros((8, 5), np.float32)})
  with pytest.raises(ValueError,
                     match=r"'linears/0/kernel' has shape \(8, 5\), model expects \(64, 16\)"):
    tj.load_checkpoint(path, model)

  tj.save_checkpoint(path, model)
  _rewrite(path, **{"param:linears/0/kernel": None})
  with pytest.raises(ValueError, match="missing \\['linears/0/kernel'\\]"):
    tj.load_checkpoint(path, model)

  tj.save_checkpoint(path, model)
  bad = np.asarray(model.linears[0].kernel[...]).copy()
  bad[0, 0] = np.inf
  _rewrite(path, **{"param:linears/0/kernel": bad})
  with pytest.raises(ValueError, match="finite"):
    tj.load_checkpoint(path, model)

  tj.save_checkpoint(path, model)
  with np.load(path, allow_pickle=False) as data:
    original = {k: data[k] for k in data.files}
  with pytest.raises(ValueError, match="JSON"):
    tj.save_checkpoint(path, model, metadata={"bad": object()})
  with np.load(path, allow_pickle=False) as data:  # the failed save left the old file intact
    assert set(data.files) == set(original)
  assert sorted(os.listdir(tmp_path)) == ["m.npz"]
