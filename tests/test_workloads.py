"""Built-in workloads: splits, the sequence generator's rule, synthetic cascades."""

import numpy as np
import pytest
from flax import nnx

import ttamer_jax as tj
from ttamer_jax.networks import workloads


def test_digits_splits():
  w = workloads.digits(seed=0)
  sizes = [len(w.train), len(w.calibration), len(w.test)]
  assert sum(sizes) == 1797
  assert abs(sizes[0] - 0.6 * 1797) <= 10 and abs(sizes[2] - 0.2 * 1797) <= 10
  for split in (w.train, w.calibration, w.test):
    assert split.x.shape[1:] == (8, 8, 1) and split.x.dtype == np.float32
    assert split.x.min() >= 0 and split.x.max() <= 1
    counts = np.bincount(split.y, minlength=10) / len(split)
    assert np.abs(counts - 0.1).max() < 0.03  # stratified: ~10% per class
  # Disjoint: no (image, label) pair appears in two splits.
  keys = [{(img.tobytes(), int(lab)) for img, lab in zip(s.x, s.y)}
          for s in (w.train, w.calibration, w.test)]
  assert sum(len(k) for k in keys) == len(set().union(*keys))
  assert w.num_classes == 10
  model = nnx.eval_shape(lambda: w.make_model(0))  # structure only, no compilation
  assert model.num_stages == 4 and model.input_shape == (8, 8, 1)
  assert nnx.eval_shape(lambda: workloads.digits(model="mlp").make_model(0)).num_stages == 4
  # Same seed, same split; another seed, another split.
  np.testing.assert_array_equal(workloads.digits(seed=0).test.y, w.test.y)
  assert not np.array_equal(workloads.digits(seed=1).test.x, w.test.x)


def test_digits_bad_arguments():
  with pytest.raises(ValueError, match="model"):
    workloads.digits(model="resnet")
  with pytest.raises(ValueError, match="fractions"):
    workloads.digits(fractions=(0.5, 0.5, 0.5))


def test_sequences_follow_their_rule():
  w = workloads.sequences(seed=3, num_samples=600)
  v = workloads.sequence_vocab()
  for split in (w.train, w.calibration, w.test):
    x, y, kind = split.x, split.y, split.info["kind"]
    # The generator's labels agree with the rule written out as a decoder.
    np.testing.assert_array_equal(workloads.sequence_label(x), y)
    np.testing.assert_array_equal(workloads.evidence_position(x), split.info["position"])
    assert x.min() >= 0 and x.max() < v["vocab_size"]
    is_marker = (x >= v["num_content"]) & (x < v["num_content"] + v["num_classes"])
    q = x == v["query"]
    assert (q.sum(1) == 1).all()
    after_q = x[np.arange(len(x)), np.argmax(q, axis=1) + 1]
    assert (after_q < v["num_content"]).all()  # Q is followed by a content token
    names = np.array(workloads.SEQ_KINDS)[kind]
    np.testing.assert_array_equal(is_marker.sum(1), np.select(
        [names == "marker", names == "pair", names == "decoy"], [1, 0, 2]))
    decoy = names == "decoy"
    classes = np.where(is_marker, x - v["num_content"], -1)
    for row in classes[decoy]:
      first, second = row[row >= 0]
      assert first != second  # the later marker is a distractor of another class
  # Every kind appears in every split, and deciding positions cover the sequence.
  assert set(np.unique(w.test.info["kind"])) == {0, 1, 2}
  assert set(np.unique(w.train.info["position"])) == set(range(12))
  model = nnx.eval_shape(lambda: w.make_model(0))
  assert model.num_stages == 4 and model.window == 3 and model.input_shape == (12,)
  assert model.check_input(w.test.x).shape == w.test.x.shape


def test_sequences_are_deterministic_and_validated():
  a = workloads.sequences(seed=1, num_samples=200)
  b = workloads.sequences(seed=1, num_samples=200)
  np.testing.assert_array_equal(a.train.x, b.train.x)
  with pytest.raises(ValueError, match="mix"):
    workloads.sequences(mix=(0.5, 0.6, 0.1))
  with pytest.raises(ValueError, match="seq_len"):
    workloads.sequences(seq_len=3)
  with pytest.raises(ValueError, match="num_content"):
    workloads.sequences(num_content=10, num_classes=4)


@pytest.mark.parametrize("regime", ["random", "improving", "overthink"])
def test_synthetic_traces(regime):
  w = tj.synthetic_workload(seed=2, regime=regime, num_stages=3, num_states=5, sizes=(100, 100, 4000))
  assert w.name == f"synthetic-{regime}"
  assert [t.num_samples for t in (w.train, w.calibration, w.test)] == [100, 100, 4000]
  c = w.cascade
  assert c.num_stages == 3 and c.num_states == 5
  np.testing.assert_allclose(float(np.sum(c.costs)), 1.0, rtol=1e-5)
  values = np.asarray(c.values)
  assert values.min() >= 0 and values.max() <= 1
  # Mean 0/1 loss per stage matches the cascade's expected loss (within 4 SE).
  marg = [np.asarray(c.init, np.float64)]
  for t in np.asarray(c.trans, np.float64):
    marg.append(marg[-1] @ t)
  expected = np.array([m @ v for m, v in zip(marg, values)])
  losses = np.asarray(w.test.losses)
  se = np.sqrt(expected * (1 - expected) / len(losses))
  assert (np.abs(losses.mean(0) - expected) <= 4 * se + 1e-9).all()
  if regime == "improving":
    assert (np.diff(values, axis=0) < 0).all()
  if regime == "overthink":
    # Later stages are sometimes worse: some state has a higher loss than at the stage
    # before, and reachable transitions lead to harder states.
    assert (np.diff(values, axis=0) > 0).any()
    trans = np.asarray(c.trans)
    worse = values[1:, None, :] > values[:-1, :, None]  # [n-1, s, t]: t worse than s
    assert (trans * worse).sum(-1).max() > 0.1
    assert (losses[:, 1:] > losses[:, :-1]).any()


def test_synthetic_bad_regime():
  with pytest.raises(ValueError, match="regime"):
    tj.synthetic_workload(regime="chaotic")
  with pytest.raises(ValueError, match="sizes"):
    tj.synthetic_workload(sizes=(10, 10))


def test_mnist1d_is_generated_offline_and_split_stratified():
  a = workloads.mnist1d(seed=0, num_samples=300)
  b = workloads.mnist1d(seed=0, num_samples=300)
  np.testing.assert_array_equal(a.calibration.x, b.calibration.x)
  assert a.train.x.shape[1:] == (40, 1) and a.num_classes == 10
  assert len(a.train) + len(a.calibration) + len(a.test) == 300
  assert set(np.unique(a.test.y)) <= set(range(10))
  state = np.random.get_state()[1].copy()
  workloads.mnist1d(seed=1, num_samples=100)
  np.testing.assert_array_equal(np.random.get_state()[1], state)  # NumPy's global RNG untouched
  with pytest.raises(ValueError, match="num_samples = 50 must be >= 100"):
    workloads.mnist1d(num_samples=50)


def test_model_cascade_traces_with_measured_latency():
  from ttamer_jax.data import model_cascade
  w = model_cascade.model_cascade(seed=0, num_samples=900, repeats=2)
  assert w.calibration.num_stages == len(model_cascade.STAGES) == 5
  assert w.calibration.num_samples == w.test.num_samples == 270
  np.testing.assert_array_equal(w.calibration.costs, w.test.costs)
  assert np.all(np.asarray(w.calibration.costs) > 0)
  assert {"max_softmax", "entropy", "margin"} <= set(w.calibration.signals)
  acc = np.asarray(w.info["test_accuracy"])
  assert np.all(acc > 1 / 6)  # every model beats chance on the 6-class task
