"""Exit traces: validation, .npz save/load (corrupt files), CSV/Parquet tables, splits."""

import os

import jax
import numpy as np
import pytest

import ttamer_jax as tj

# Internal: the atomic .npz writer, to write inconsistent trace archives.
from ttamer_jax.data import archive


def _traces(per_sample_costs=False, labels=True, seed=0):
  rng = np.random.default_rng(seed)
  num, n = 50, 3
  costs = rng.uniform(0, 1, (num, n)) if per_sample_costs else np.array([0.1, 0.2, 0.7])
  return tj.ExitTraces(scores=rng.uniform(size=(num, n)), preds=rng.integers(0, 5, (num, n)),
                      losses=rng.integers(0, 2, (num, n)).astype(float), costs=costs,
                      signals={"entropy": rng.uniform(size=(num, n)), "max_softmax": rng.uniform(size=(num, n))},
                      labels=rng.integers(0, 5, num) if labels else None)


def _assert_same(a, b):
  for name in ("scores", "preds", "losses", "costs"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert getattr(a, name).dtype == getattr(b, name).dtype
  assert sorted(a.signals) == sorted(b.signals)
  for k in a.signals:
    np.testing.assert_array_equal(a.signals[k], b.signals[k])
  if a.labels is None:
    assert b.labels is None
  else:
    np.testing.assert_array_equal(a.labels, b.labels)


# ------------------------------------------------------------------ .npz
@pytest.mark.parametrize("per_sample_costs,labels", [(False, True), (True, False)])
def test_npz_round_trip(tmp_path, per_sample_costs, labels):
  tr = _traces(per_sample_costs, labels)
  path = tmp_path / "t.npz"
  tj.save_traces(path, tr)
  _assert_same(tr, tj.load_traces(path))
  assert os.listdir(tmp_path) == ["t.npz"]  # no temporary files left behind


def test_npz_round_trip_without_signals(tmp_path):
  tr = tj.ExitTraces(scores=np.zeros((2, 1)), preds=np.zeros((2, 1), int), losses=np.zeros((2, 1)),
                    costs=np.ones(1))
  tj.save_traces(tmp_path / "t.npz", tr)
  _assert_same(tr, tj.load_traces(tmp_path / "t.npz"))


def _fields(tr):
  return dict(format_version=np.asarray(1, np.int64), kind=np.asarray("ttamer_jax.ExitTraces"),
              scores=np.asarray(tr.scores), preds=np.asarray(tr.preds), losses=np.asarray(tr.losses),
              costs=np.asarray(tr.costs), signal_names=np.asarray([], dtype=str))


@pytest.mark.parametrize("change,match", [
    (dict(format_version=np.asarray(2, np.int64)), r"format_version = 2 is not supported.*newer"),
    (dict(format_version=np.asarray(1.0)), r"'format_version' must be an integer scalar"),
    (dict(kind=np.asarray("ttamer_jax.DeployedPolicy")), r"field 'kind'.*not a traces file"),
    (dict(preds=np.zeros((50, 2), np.int32)), r"preds: expected shape \(50, 3\)"),
    (dict(losses=np.full((50, 3), np.nan)), r"losses\[0, 0\] is nan"),
    (dict(costs=-np.ones(3)), r"costs\[0\] = -1.0 is negative"),
    (dict(scores=np.zeros((0, 3))), r"scores: no samples"),
    (dict(extra=np.zeros(3)), r"unexpected field 'extra'"),
    (dict(signal_names=np.asarray(["entropy"])), r"field 'signal_0' \(signal 'entropy'\) is missing"),
])
def test_npz_inconsistent_fields_raise(tmp_path, change, match):
  fields = _fields(_traces())
  fields.update(change)
  archive.write_npz_atomic(tmp_path / "bad.npz", fields)
  with pytest.raises(ValueError, match=match):
    tj.load_traces(tmp_path / "bad.npz")


@pytest.mark.parametrize("missing", ["format_version", "kind", "losses", "signal_names"])
def test_npz_missing_field_raises(tmp_path, missing):
  fields = _fields(_traces())
  del fields[missing]
  archive.write_npz_atomic(tmp_path / "bad.npz", fields)
  with pytest.raises(ValueError, match=f"'{missing}'"):
    tj.load_traces(tmp_path / "bad.npz")


def test_npz_corrupt_files_raise(tmp_path):
  tr = _traces()
  path = tmp_path / "t.npz"
  tj.save_traces(path, tr)
  raw = path.read_bytes()
  bad = tmp_path / "bad.npz"
  for cut in (0, 10, len(raw) // 2, len(raw) - 5):
    bad.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match="not a readable traces .npz file"):
      tj.load_traces(bad)
  bad.write_bytes(b"definitely not a zip archive")
  with pytest.raises(ValueError, match="not a readable"):
    tj.load_traces(bad)
  np.save(tmp_path / "plain.npy", np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    tj.load_traces(tmp_path / "plain.npy")
  with pytest.raises(FileNotFoundError):
    tj.load_traces(tmp_path / "missing.npz")


def test_npz_bit_flips_never_load_wrong_data(tmp_path):
  """Every flipped bit either raises ValueError or (in zip bookkeeping such as
  timestamps) changes nothing that is loaded."""
  tr = _traces()
  path = tmp_path / "t.npz"
  tj.save_traces(path, tr)
  raw = path.read_bytes()
  rng = np.random.default_rng(0)
  bad = tmp_path / "bad.npz"
  raised = 0
  for pos in rng.choice(len(raw), 250, replace=False):
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << int(rng.integers(8))
    bad.write_bytes(bytes(flipped))
    try:
      loaded = tj.load_traces(bad)
    except ValueError:
      raised += 1
      continue
    _assert_same(tr, loaded)
  assert raised > 150


def test_npz_data_flip_names_the_field(tmp_path):
  tr = _traces()
  path = tmp_path / "t.npz"
  tj.save_traces(path, tr)
  raw = bytearray(path.read_bytes())
  losses = np.asarray(tr.losses).tobytes()
  at = bytes(raw).find(losses)
  assert at > 0
  raw[at + 4] ^= 0x10
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="field 'losses"):
    tj.load_traces(path)


def test_pickled_objects_are_refused(tmp_path):
  np.savez(tmp_path / "obj.npz", scores=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="field 'scores' is corrupt.*allow_pickle"):
    tj.load_traces(tmp_path / "obj.npz")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
  tr = _traces()
  path = tmp_path / "t.npz"
  tj.save_traces(path, tr)
  before = path.read_bytes()

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np.lib.format, "write_array", boom)
  with pytest.raises(OSError, match="disk full"):
    tj.save_traces(path, _traces(seed=1))
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["t.npz"]
  monkeypatch.undo()
  with pytest.raises(ValueError, match="traces: expected ExitTraces"):
    tj.save_traces(tmp_path / "x.npz", {"scores": 1})
  with pytest.raises(FileNotFoundError):
    tj.save_traces(tmp_path / "no" / "dir" / "t.npz", tr)
  assert os.listdir(tmp_path) == ["t.npz"]


# ------------------------------------------------------------------ container
def test_subset_and_split():
  tr = _traces(per_sample_costs=True)
  sub = tr.subset([3, 1])
  np.testing.assert_array_equal(sub.scores, np.asarray(tr.scores)[[3, 1]])
  np.testing.assert_array_equal(sub.costs, np.asarray(tr.costs)[[3, 1]])
  np.testing.assert_array_equal(sub.signals["entropy"], np.asarray(tr.signals["entropy"])[[3, 1]])
  with pytest.raises(ValueError, match="index: sample 50 outside 0..49"):
    tr.subset([0, 50])
  with pytest.raises(ValueError, match="selects no samples"):
    tr.subset(np.zeros(50, bool))
  a, b = tj.data.split_traces(jax.random.PRNGKey(0), tr, 0.3)
  assert (a.num_samples, b.num_samples) == (15, 35)
  together = np.sort(np.concatenate([np.asarray(a.scores)[:, 0], np.asarray(b.scores)[:, 0]]))
  np.testing.assert_array_equal(together, np.sort(np.asarray(tr.scores)[:, 0]))
  with pytest.raises(ValueError, match="empty split"):
    tj.data.split_traces(jax.random.PRNGKey(0), tr, 1.0)


def test_sample_traces_follow_the_cascade():
  num = 80_000   # the shape test_fitting samples too (jit cache)
  c = tj.random_cascade(jax.random.PRNGKey(3), 3, 4)
  tr = tj.sample_traces(jax.random.PRNGKey(4), c, num, loss="expected")
  states = np.floor(np.asarray(tr.scores) * 4).astype(int)
  np.testing.assert_allclose(np.asarray(tr.losses), np.asarray(c.values)[np.arange(3), states], rtol=1e-6)
  freq = np.bincount(states[:, 0], minlength=4) / num
  p = np.asarray(c.init, np.float64)
  assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / num) + 1e-12)


# ------------------------------------------------------------------ tables
@pytest.mark.parametrize("form", ["long", "wide"])
@pytest.mark.parametrize("per_sample_costs", [False, True])
def test_table_round_trip_csv(tmp_path, form, per_sample_costs):
  pytest.importorskip("pandas")
  tr = _traces(per_sample_costs)
  df = tj.traces_to_table(tr, form=form)
  path = tmp_path / "t.csv"
  df.to_csv(path, index=False)
  back = tj.load_traces_table(path)  # form detected from the columns
  _assert_same(tr, back)
  _assert_same(tr, tj.traces_from_table(df, form=form))


def test_table_long_form_any_row_order_and_ids():
  pd = pytest.importorskip("pandas")
  df = pd.DataFrame(dict(sample=["b", "a", "b", "a"], stage=[1, 1, 0, 0], score=[0.4, 0.3, 0.2, 0.1],
                         pred=[1, 2, 3, 4], loss=[0.0, 1.0, 1.0, 0.0], cost=[2.0, 2.0, 1.0, 1.0],
                         entropy=[9.0, 8.0, 7.0, 6.0]))
  tr = tj.traces_from_table(df)
  # Samples in order of first appearance: "b" then "a".
  np.testing.assert_allclose(tr.scores, [[0.2, 0.4], [0.1, 0.3]])
  np.testing.assert_array_equal(tr.preds, [[3, 1], [4, 2]])
  np.testing.assert_allclose(tr.costs, [1.0, 2.0])
  np.testing.assert_allclose(tr.signals["entropy"], [[7.0, 9.0], [6.0, 8.0]])


def test_table_parquet_round_trip(tmp_path):
  pytest.importorskip("pandas")
  pytest.importorskip("pyarrow")
  tr = _traces()
  tj.traces_to_table(tr, form="wide").to_parquet(tmp_path / "t.parquet")
  _assert_same(tr, tj.load_traces_table(tmp_path / "t.parquet"))
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
  with pytest.raises(ValueError, match="cannot be read as a trace table"):
    tj.load_traces_table(tmp_path / "bad.parquet")


def test_bad_tables_raise():
  pd = pytest.importorskip("pandas")
  long = tj.traces_to_table(_traces(), form="long")
  with pytest.raises(ValueError, match="column 'loss': missing"):
    tj.traces_from_table(long.drop(columns="loss"), form="long")
  with pytest.raises(ValueError, match="sample 3 has stage 1 more than once"):
    tj.traces_from_table(pd.concat([long, long.iloc[[10]]]), form="long")
  with pytest.raises(ValueError, match="sample 3 has no row for stage 1"):
    tj.traces_from_table(long.drop(index=10), form="long")
  bad = long.copy()
  bad.loc[4, "label"] = 99
  with pytest.raises(ValueError, match="column 'label': differs across the stages of sample 1"):
    tj.traces_from_table(bad, form="long")
  bad = long.copy()
  bad["score"] = bad["score"].astype(object)
  bad.loc[2, "score"] = "high"
  with pytest.raises(ValueError, match="column 'score': must be numeric"):
    tj.traces_from_table(bad, form="long")
  bad = long.copy()
  bad.loc[5, "loss"] = np.nan
  with pytest.raises(ValueError, match="column 'loss': missing value"):
    tj.traces_from_table(bad, form="long")
  bad = long.copy()
  bad.loc[5, "loss"] = -1.0
  with pytest.raises(ValueError, match=r"losses\[1, 2\].*negative"):
    tj.traces_from_table(bad, form="long")
  wide = tj.traces_to_table(_traces(), form="wide")
  with pytest.raises(ValueError, match="column 'pred_2': missing"):
    tj.traces_from_table(wide.drop(columns="pred_2"))
  with pytest.raises(ValueError, match="column 'score_0': missing"):
    tj.traces_from_table(wide.drop(columns=["score_0", "score_1", "score_2"]))
  with pytest.raises(ValueError, match="form: must be 'long' or 'wide'"):
    tj.traces_from_table(wide, form="tall")
  with pytest.raises(ValueError, match="has no rows"):
    tj.traces_from_table(wide.iloc[:0])
  with pytest.raises(ValueError, match="expected a pandas DataFrame"):
    tj.traces_from_table({"score_0": [1.0]})


# ------------------------------------------------------------------ inside jit
def _trace_fields(num=12, n=3):
  rng = np.random.default_rng(0)
  return dict(scores=rng.random((num, n)).astype(np.float32),
              preds=rng.integers(0, 4, (num, n)).astype(np.int32),
              losses=rng.random((num, n)).astype(np.float32), costs=np.ones(n, np.float32),
              signals={"entropy": rng.random((num, n)).astype(np.float32)},
              labels=rng.integers(0, 4, num).astype(np.int32))


def test_traces_built_inside_jit_check_shapes_and_dtype_kinds():
  fields = _trace_fields()

  def build(scores, **changes):
    return tj.ExitTraces(**{**fields, "scores": scores, **changes})

  good = jax.jit(lambda s: build(s))(fields["scores"])
  host = tj.ExitTraces(**fields)
  for name in ("scores", "preds", "losses", "costs", "labels"):
    np.testing.assert_array_equal(np.asarray(getattr(good, name)), getattr(host, name))
    assert getattr(good, name).dtype == getattr(host, name).dtype, name  # cast the same way
  np.testing.assert_array_equal(np.asarray(good.signals["entropy"]), host.signals["entropy"])
  per_request = jax.jit(lambda s: build(s, costs=s + 1).costs)(fields["scores"])
  assert per_request.shape == (12, 3)
  batched = jax.vmap(lambda s: build(s).scores.sum())(np.stack([fields["scores"]] * 2))
  assert batched.shape == (2,)
  bad = [
      (dict(preds=fields["preds"][:5]), r"^preds: expected shape \(12, 3\), got \(5, 3\)"),
      (dict(preds=fields["scores"]), r"^preds: must be an integer array, got dtype float32"),
      (dict(losses=fields["losses"][:, :2]), r"^losses: expected shape \(12, 3\)"),
      (dict(losses=np.array(["a"] * 36).reshape(12, 3)), r"^losses: must be a numeric array"),
      (dict(costs=np.ones(4)), r"^costs: expected shape \(3,\) or \(12, 3\), got \(4,\)"),
      (dict(costs=np.ones((12, 2))), r"^costs: expected shape"),
      (dict(signals={"entropy": fields["scores"][:, :1]}),
       r"^signals\['entropy'\]: expected shape"),
      (dict(signals={"": fields["scores"]}), r"^signals: keys must be non-empty strings"),
      (dict(signals=[fields["scores"]]), r"^signals: expected a mapping"),
      (dict(labels=fields["labels"][:3]), r"^labels: expected shape \(12,\)"),
      (dict(labels=fields["scores"][:, 0]), r"^labels: must be an integer array"),
  ]
  for changes, match in bad:
    with pytest.raises(ValueError, match=match):
      jax.jit(lambda s: build(s, **changes).scores)(fields["scores"])
  with pytest.raises(ValueError, match=r"^scores: expected 2 dimensions, got shape \(12,\)"):
    jax.jit(lambda s: build(s).scores)(fields["scores"][:, 0])
  with pytest.raises(ValueError, match=r"^scores: expected N, n >= 1"):
    jax.jit(lambda s: build(s, preds=np.zeros((12, 0), np.int32), losses=np.zeros((12, 0)),
                            costs=np.zeros(0), signals=None).scores)(np.zeros((12, 0)))
  # Traced leaves other than the scores are checked the same way.
  with pytest.raises(ValueError, match=r"^preds: must be an integer array"):
    jax.jit(lambda p: tj.ExitTraces(**{**fields, "preds": p}).preds)(fields["scores"])
