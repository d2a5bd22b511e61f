"""Fuzzing traces, fitting, trace tables and the file loaders (RELIABILITY.md, areas
"traces & fitting" and "loaders").

Random valid traces must fit into a valid cascade (stochastic rows, calibrated
losses within the observed range, counts summing to N) whose policy replays with
every state in range. Random invalid traces, fit arguments, CSV tables and
corrupted / hand-edited files (traces, cascades, policies, checkpoints) must raise
``ValueError`` naming the field; a loader either refuses a damaged file or returns
exactly the object that was saved. Every case is counted (tests/fuzzing.py).
"""

import io
import json
import warnings
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx
from fuzzing import expect_error, record
from hypothesis import given, settings
from hypothesis import strategies as st

import ttamer_jax as tj

# Internal: the checksummed .npz reader / atomic writer, to hand-edit archives.
from ttamer_jax.data import archive

TOL32 = 1e-5


# ------------------------------------------------------------------ helpers
def _cascade(rng, n=3, k=4):
  """A small random cascade built in NumPy (no JAX sampling to compile)."""
  return tj.Cascade(values=rng.uniform(size=(n, k)), init=rng.dirichlet(np.ones(k)),
                    trans=rng.dirichlet(np.ones(k), size=(n - 1, k)), costs=rng.uniform(size=n))


def _arrays(tr):
  out = {k: np.asarray(getattr(tr, k)) for k in ("scores", "preds", "losses", "costs")}
  out.update({f"signal:{k}": np.asarray(v) for k, v in tr.signals.items()})
  out["labels"] = None if tr.labels is None else np.asarray(tr.labels)
  return out


def _same_traces(a, b):
  x, y = _arrays(a), _arrays(b)
  assert sorted(x) == sorted(y)
  for k in x:
    if x[k] is None:
      assert y[k] is None
    else:
      assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
      np.testing.assert_array_equal(x[k], y[k])


def _same_leaves(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _same_policy(a, b):
  assert type(a.policy) is type(b.policy) and a.score_name == b.score_name
  assert a.discretiser.feature == b.discretiser.feature
  _same_leaves(a, b)


def _params(model):
  return jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))


def _same_model(a, b):
  assert type(a) is type(b) and a.config() == b.config()
  _same_leaves(_params(a), _params(b))


# ------------------------------------------------------------------ traces.valid_fit
@st.composite
def valid_traces(draw):
  """Small random traces with ties, constant scores, 0/1 or real losses."""
  # A few sample counts only: every new shape compiles the discretiser and replay.
  num = draw(st.sampled_from([1, 7, 200]), label="N")
  n = draw(st.integers(1, 4), label="n")
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  kind = draw(st.sampled_from(["uniform", "ties", "constant", "constant_stage"]), label="scores")
  scores = rng.uniform(-3, 3, (num, n))
  if kind == "ties":
    scores = np.round(scores)
  elif kind == "constant":
    scores = np.full((num, n), 0.5)
  elif kind == "constant_stage":
    scores = np.broadcast_to(rng.uniform(size=n), (num, n)).copy()
  if draw(st.booleans(), label="binary_losses"):
    losses = rng.integers(0, 2, (num, n)).astype(float)
  else:
    losses = rng.uniform(0, 1, (num, n)) * 10.0 ** rng.integers(-3, 4)
  costs = rng.uniform(0, 1, (num, n)) if draw(st.booleans(), label="per_sample_costs") \
      else rng.uniform(0, 1, n)
  preds = rng.integers(0, 3, (num, n))
  return tj.ExitTraces(scores=scores, preds=preds, losses=losses, costs=costs,
                      signals={"other": rng.uniform(size=(num, n))}, labels=rng.integers(0, 3, num))


def _check_stochastic(name, arr):
  arr = np.asarray(arr, np.float64)
  assert np.all(arr >= 0), name
  np.testing.assert_allclose(arr.sum(-1), 1.0, atol=TOL32, err_msg=name)


@settings(max_examples=20)
@given(valid_traces(), st.integers(1, 6), st.sampled_from(["quantile", "uniform"]),
       st.sampled_from(["uniform", "marginal"]),
       st.sampled_from([None, "agree_prev"]), st.sampled_from([0.0, 0.5, 1.0]),
       st.sampled_from([0.0, 1.0, 5.0]), st.floats(0, 1))
def test_random_valid_traces_fit_and_replay(tr, k, binning, prior, feature, smoothing,
                                            loss_smoothing, lam):
  if feature == "agree_prev":
    k = 2 * ((k + 1) // 2)
  num, n = tr.num_samples, tr.num_stages
  fit = tj.fit_cascade(tr, k, binning=binning, prior=prior, feature=feature, smoothing=smoothing,
                      loss_smoothing=loss_smoothing)
  c = fit.cascade
  assert (c.num_stages, c.num_states) == (n, k)
  _check_stochastic("init", c.init)
  _check_stochastic("trans", c.trans)
  losses = np.asarray(tr.losses, np.float64)
  values = np.asarray(c.values, np.float64)
  lo, hi = losses.min(axis=0)[:, None], losses.max(axis=0)[:, None]
  slack = TOL32 * (1 + np.abs(hi))
  assert np.all(values >= lo - slack) and np.all(values <= hi + slack)
  counts = np.asarray(fit.counts)
  assert counts.shape == (n, k)
  np.testing.assert_array_equal(counts.sum(axis=1), num)
  # The fitted policy replays on its own traces with every state in range.
  deployed = fit.recall_policy(lam)
  states, _, _ = deployed.observations(tr)
  states = np.asarray(states)
  assert states.shape == (num, n) and states.min() >= 0 and states.max() < k
  res = tj.replay_traces(deployed, tr)
  stop, answer = np.asarray(res.stop_stage), np.asarray(res.answer_stage)
  assert np.all((0 <= answer) & (answer <= stop) & (stop < n))
  np.testing.assert_allclose(np.asarray(res.loss), losses[np.arange(num), answer], rtol=1e-6)
  cum = np.cumsum(np.asarray(tr.cost_matrix(), np.float64), axis=1)
  np.testing.assert_allclose(np.asarray(res.cost), cum[np.arange(num), stop], rtol=1e-5, atol=1e-6)
  if feature is None:  # the skip-line fit of the same traces
    g = tj.data.fit_skip_line(tr, k, binning=binning, prior=prior, smoothing=smoothing,
                        loss_smoothing=loss_smoothing).graph
    _check_stochastic("edge_trans", g.edge_trans)
    _check_stochastic("entry_init", g.entry_init)
  record("traces.valid_fit")


# ------------------------------------------------------------------ traces.invalid
_BASE_N, _BASE_n = 5, 3


def _base_fields(rng):
  return dict(scores=rng.uniform(size=(_BASE_N, _BASE_n)), preds=rng.integers(0, 4, (_BASE_N, _BASE_n)),
              losses=rng.uniform(size=(_BASE_N, _BASE_n)), costs=rng.uniform(size=_BASE_n),
              signals={"entropy": rng.uniform(size=(_BASE_N, _BASE_n))},
              labels=rng.integers(0, 4, _BASE_N))


_FLOAT_FIELDS = ("scores", "losses", "costs", "signals")
_INT_FIELDS = ("preds", "labels")
_BAD_DTYPES = [lambda a: a.astype(str), lambda a: a.astype(complex), lambda a: np.full(a.shape, None),
               lambda a: None, lambda a: "abc", lambda a: [[1.0, 2.0], [3.0]]]


@settings(max_examples=120)
@given(st.data())
def test_invalid_traces_raise_naming_the_field(data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  f = _base_fields(rng)
  kind = data.draw(st.sampled_from(["nan_inf", "negative", "shape", "empty", "non_integer", "int32",
                                    "overflow", "dtype", "signals"]), label="kind")
  if kind in ("nan_inf", "overflow"):
    field = data.draw(st.sampled_from(_FLOAT_FIELDS), label="field")
  elif kind == "negative":
    field = data.draw(st.sampled_from(["losses", "costs"]), label="field")
  elif kind in ("non_integer", "int32"):
    field = data.draw(st.sampled_from(_INT_FIELDS), label="field")
  elif kind == "empty":
    field = "scores"
  elif kind == "signals":
    field = "signals"
  else:
    field = data.draw(st.sampled_from(_FLOAT_FIELDS + _INT_FIELDS), label="field")
  arr = np.array(f[field]["entropy"] if field == "signals" else f[field], dtype=np.float64)
  pos = tuple(int(rng.integers(d)) for d in arr.shape)
  if kind == "nan_inf":
    arr[pos] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  elif kind == "negative":
    arr[pos] = -data.draw(st.floats(1e-30, 1e30))
  elif kind == "overflow":
    arr[pos] = data.draw(st.sampled_from([1, -1])) * 10.0 ** data.draw(st.integers(39, 308))
  elif kind == "non_integer":
    arr[pos] += data.draw(st.floats(0.01, 0.99))
  elif kind == "int32":
    arr = arr.astype(np.int64)
    arr[pos] = data.draw(st.sampled_from([1, -1])) * data.draw(st.integers(2**31 + 1, 2**62))
  elif kind == "shape":
    options = [arr[..., None], arr.reshape(-1)[:1].reshape(())]
    if field != "scores":  # more rows in scores: the other fields no longer fit
      options.append(np.concatenate([arr, arr[:1]]))
    arr = data.draw(st.sampled_from(options))
  elif kind == "empty":
    arr = data.draw(st.sampled_from([np.zeros((0, _BASE_n)), np.zeros((_BASE_N, 0))]))
  elif kind == "dtype":
    arr = data.draw(st.sampled_from(_BAD_DTYPES[:3] if field == "labels" else _BAD_DTYPES))(arr)  # labels=None: fine
  if kind == "signals":
    f["signals"] = data.draw(st.sampled_from([[arr], "entropy", {"": arr}, {3: arr}, {"e": "abc"},
                                              {"e": arr[:, :2]}, 7]))
  elif field == "signals":
    f["signals"] = {"entropy": arr}
  else:
    f[field] = arr
  expect_error("traces.invalid", lambda: tj.ExitTraces(**f), field)


# ------------------------------------------------------------------ fit.invalid
@pytest.fixture(scope="module")
def fit_cases():
  rng = np.random.default_rng(5)
  tr = tj.ExitTraces(scores=rng.uniform(size=(40, 3)), preds=rng.integers(0, 3, (40, 3)),
                    losses=rng.integers(0, 2, (40, 3)).astype(float), costs=np.array([0.1, 0.2, 0.4]),
                    signals={"entropy": rng.uniform(size=(40, 3))})
  return _fit_cases(tr, _cascade(rng))


_NOT_NUMBERS = [float("nan"), float("inf"), -float("inf"), -1.0, -1e-9, "1", None, [1.0, 2.0],
                np.ones(3), 1 + 1j, {}]
_NOT_NAMES = ["quantiles", "", None, 3, ["quantile"], {"a": 1}, 1.5]


def _fit_cases(tr, c):
  key = jax.random.PRNGKey(0)
  other = tj.data.Discretiser(edges=np.zeros((2, 3), np.float32))
  agree = tj.data.Discretiser(edges=np.zeros((3, 1), np.float32), feature="agree_prev")
  fit, skip, disc = tj.fit_cascade, tj.data.fit_skip_line, tj.fit_discretiser
  scores = np.asarray(tr.scores)
  return {
      "num_states": [
          (lambda v: lambda: fit(tr, v), [0, -1, 2.5, True, "3", None, 2**20, np.float64(2.0)],
           ("num_states",)),
          (lambda v: lambda: fit(tr, v, feature="agree_prev"), [1, 3, 5], ("num_states",)),
          (lambda v: lambda: skip(tr, v), [0, 2**20, "2"], ("num_states",)),
          (lambda v: lambda: fit(tr, v, discretiser=tj.data.Discretiser(edges=np.zeros((3, 2), np.float32))),
           [2, 4], ("num_states",))],
      "smoothing": [(lambda v: lambda: fit(tr, 2, smoothing=v), _NOT_NUMBERS, ("smoothing",)),
                    (lambda v: lambda: fit(tr, 2, loss_smoothing=v), _NOT_NUMBERS, ("loss_smoothing",)),
                    (lambda v: lambda: skip(tr, 2, smoothing=v), _NOT_NUMBERS, ("smoothing",))],
      "binning": [(lambda v: lambda: fit(tr, 2, binning=v), _NOT_NAMES, ("binning",)),
                  (lambda v: lambda: disc(scores, 2, binning=v), _NOT_NAMES, ("binning",))],
      "prior": [(lambda v: lambda: fit(tr, 2, prior=v), _NOT_NAMES, ("prior",)),
                (lambda v: lambda: skip(tr, 2, prior=v), _NOT_NAMES, ("prior",))],
      "feature": [(lambda v: lambda: fit(tr, 2, feature=v), ["agree", 1, [], "agree_next"], ("feature",))],
      "score": [(lambda v: lambda: fit(tr, 2, score=v), ["nope", "", 5, ["x"], {"a": 1}], ("signal",)),
                (lambda v: lambda: skip(tr, 2, score=v), ["nope", ["x"]], ("signal",)),
                (lambda v: lambda: tr.with_score(v), ["nope", ["x"], None], ("signal",))],
      "score_range": [(lambda v: lambda: fit(tr, 2, binning="uniform", score_range=v),
                       [(1.0, 0.0), (0.5, 0.5), (0.0, np.nan), (-np.inf, 1.0), "ab", [0, 1, 2], [[0, 1]],
                        (0, 1e39)], ("score_range",))],
      "discretiser": [(lambda v: lambda: fit(tr, discretiser=v), ["abc", 3, np.zeros((3, 2)), other],
                       ("discretiser",)),
                      (lambda v: lambda: skip(tr, discretiser=v), ["abc", other, agree], ("discretiser",))],
      "skip_costs": [(lambda v: lambda: skip(tr, 2, block_costs=v), [[-1.0, 0, 0], [np.nan, 0, 0], [1, 2],
                                                                     "abc", [[1, 2, 3]]], ("block_costs",)),
                     (lambda v: lambda: skip(tr, 2, head_costs=v), [[0, 0, -1e-3], [0, np.inf, 0], [1.0]],
                      ("head_costs",))],
      "fit_discretiser": [(lambda v: lambda: disc(scores, v), [0, -2, 2.5, "4", None, 10**12], ("num_states",)),
                          (lambda v: lambda: disc(v, 2), [scores[:, 0], np.zeros((0, 3)), np.zeros((4, 0)),
                                                          np.full((4, 2), np.nan), "abc", None], ("scores",))],
      "traces": [(lambda v: lambda: fit(v, 2), ["abc", None, scores], ("traces",)),
                 (lambda v: lambda: skip(v, 2), ["abc", {"scores": scores}], ("traces",)),
                 (lambda v: lambda: tj.data.split_traces(key, v, 0.5), ["abc", None], ("traces",))],
      "fraction": [(lambda v: lambda: tj.data.split_traces(key, tr, v),
                    [0.0, 1.0, -0.5, 1.5, 1e-9, float("nan"), float("inf"), "half", None, [0.5], 1j],
                    ("fraction",))],
      "sample_traces": [
          (lambda v: lambda: tj.sample_traces(key, v, 10), ["abc", None, tr, np.zeros((3, 4))], ("cascade",)),
          (lambda v: lambda: tj.sample_traces(key, c, v), [0, -1, 1.5, "10", None], ("num_samples",)),
          (lambda v: lambda: tj.sample_traces(key, c, 10, loss=v), ["mse", None, ["bernoulli"]], ("loss",)),
          (lambda v: lambda: tj.sample_traces(key, c, 10, num_classes=v), [0, 2.0, "3"], ("num_classes",)),
          (lambda v: lambda: tj.sample_traces(key, c.replace(values=c.values + v), 10), [1.5, 1e6],
           ("values",))],
  }


@settings(max_examples=150)
@given(st.data())
def test_invalid_fit_arguments_raise_naming_the_argument(fit_cases, data):
  groups = fit_cases
  group = data.draw(st.sampled_from(sorted(groups)), label="group")
  make, values, names = data.draw(st.sampled_from(groups[group]), label="case")
  value = data.draw(st.sampled_from(values), label="value")
  expect_error("fit.invalid", make(value), *names)


# ------------------------------------------------------------------ table.invalid
def _table_traces(rng, num, n):
  return tj.ExitTraces(scores=rng.uniform(size=(num, n)), preds=rng.integers(0, 5, (num, n)),
                      losses=rng.integers(0, 2, (num, n)).astype(float), costs=rng.uniform(size=n),
                      signals={"entropy": rng.uniform(size=(num, n))}, labels=rng.integers(0, 5, num))


@settings(max_examples=60)
@given(st.data())
def test_invalid_tables_raise_naming_the_column_or_row(tmp_path_factory, data):
  path = tmp_path_factory.getbasetemp() / "fuzz_table.csv"
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  num, n = data.draw(st.integers(2, 6), label="N"), data.draw(st.integers(1, 3), label="n")
  form = data.draw(st.sampled_from(["long", "wide"]), label="form")
  df = tj.traces_to_table(_table_traces(rng, num, n), form=form)
  kind = data.draw(st.sampled_from(["missing", "duplicate", "huge_stage", "negative_stage", "nan_cell",
                                    "non_numeric", "garbage"]), label="kind")
  row = int(rng.integers(len(df)))
  if form == "long":
    required = ["stage", "score", "pred", "loss", "cost", "label"]
  else:
    required = [f"{p}_{i}" for p in ("score", "pred", "loss", "cost") for i in range(n)] + ["label"]
  names = ("column",)
  if kind == "missing":
    if form == "long" and n >= 2 and data.draw(st.booleans()):  # n = 1: a row is a whole sample
      df = df.drop(index=row)
      names = ("sample", "stage")
    else:
      df = df.drop(columns=data.draw(st.sampled_from([c for c in required if c != "label"])))
  elif kind == "duplicate":
    if form == "long":
      df = df.iloc[list(range(len(df))) + [row]]
      names = ("more than once",)
    else:  # two columns for one stage: score_0 and score_00
      col = data.draw(st.sampled_from([c for c in required if c != "label"]))
      base, _, i = col.rpartition("_")
      df[f"{base}_{'0' * data.draw(st.integers(1, 3))}{i}"] = df[col]
  elif kind in ("huge_stage", "negative_stage"):
    big = data.draw(st.sampled_from([10**3, 10**9, 2**31, 2**62, 10**30]))
    value = big if kind == "huge_stage" else -data.draw(st.sampled_from([1, 2**31, big]))
    if form == "long":
      df["stage"] = df["stage"].astype(object)
      df.loc[df.index[row], "stage"] = value
    else:
      df[f"score_{n + abs(value)}"] = 0.5   # a score column far beyond the last stage
  elif kind == "nan_cell":
    col = data.draw(st.sampled_from(required + ["entropy" if form == "long" else "entropy_0"] +
                                    (["sample"] if form == "long" else [])))
    df[col] = df[col].astype(float) if col != "sample" else df[col].astype(object)
    df.loc[df.index[row], col] = np.nan
    names = (f"column '{col}'",)
  elif kind == "non_numeric":
    col = data.draw(st.sampled_from(required))
    df[col] = df[col].astype(object)
    df.loc[df.index[row], col] = data.draw(st.sampled_from(["abc", "1,5", "0x10", "--", "nan?"]))
    names = (f"column '{col}'",)
  if kind == "garbage":
    blob = data.draw(st.one_of(st.binary(min_size=0, max_size=300),
                               st.text(alphabet=",\n\"' abc019.;-e", max_size=300).map(str.encode)))
    path.write_bytes(blob)
    names = ("column", "table")
  else:
    df.to_csv(path, index=False)
  msg = expect_error("table.invalid", lambda: tj.load_traces_table(path), *names)
  assert str(path) in msg


# ------------------------------------------------------------------ file fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """One saved file of each kind, the object saved and its loader."""
  d = tmp_path_factory.mktemp("fuzz_files")
  rng = np.random.default_rng(0)
  cascade = _cascade(rng)
  tr = tj.ExitTraces(scores=rng.uniform(size=(60, 3)), preds=rng.integers(0, 5, (60, 3)),
                    losses=rng.integers(0, 2, (60, 3)).astype(float), costs=np.asarray(cascade.costs),
                    signals={"entropy": rng.uniform(size=(60, 3)), "max_softmax": rng.uniform(size=(60, 3))},
                    labels=rng.integers(0, 5, 60))
  fit = tj.fit_cascade(tr, 4)
  a, b = fit.recall_policy(0.3), fit.recall_policy(0.7)
  mixture = a.replace(policy=tj.core.MixturePolicy(first=a.policy, second=b.policy,
                                              prob_second=np.float32(0.25), key=jax.random.PRNGKey(3)))
  model = tj.networks.EarlyExitMLP((8,), 3, hidden=4, num_blocks=2, rngs=nnx.Rngs(0))
  out = {}
  tj.save_traces(d / "traces.npz", tr)
  out["traces"] = (d / "traces.npz", tr, tj.load_traces, _same_traces)
  tj.save_cascade(d / "cascade.npz", cascade)
  out["cascade"] = (d / "cascade.npz", cascade, tj.load_cascade, _same_leaves)
  tj.save_policy(d / "policy.npz", mixture, sidecar=False, fit_date="2024-01-01T00:00:00+00:00")
  out["policy"] = (d / "policy.npz", mixture, tj.load_policy, _same_policy)
  tj.save_checkpoint(d / "model.npz", model, metadata={"note": "fuzz"})
  out["checkpoint"] = (d / "model.npz", model, tj.load_checkpoint, _same_model)
  return out


KINDS = ["traces", "cascade", "policy", "checkpoint"]


def _scratch(tmp_path_factory, kind):
  return tmp_path_factory.getbasetemp() / f"fuzz_damaged_{kind}.npz"


# ------------------------------------------------------------------ file.truncated
@settings(max_examples=60)
@given(st.sampled_from(KINDS), st.floats(0, 1, exclude_max=True))
def test_truncated_files_raise(files, tmp_path_factory, kind, frac):
  path, _, load, _ = files[kind]
  raw = path.read_bytes()
  bad = _scratch(tmp_path_factory, kind)
  bad.write_bytes(raw[:int(frac * len(raw))])
  msg = expect_error("file.truncated", lambda: load(bad), "not a readable")
  assert str(bad) in msg


# ------------------------------------------------------------------ file.bitflip
@settings(max_examples=100)
@given(st.sampled_from(KINDS), st.floats(0, 1, exclude_max=True), st.integers(0, 7))
def test_bit_flips_raise_or_load_the_identical_object(files, tmp_path_factory, kind, where, bit):
  path, original, load, same = files[kind]
  raw = bytearray(path.read_bytes())
  raw[int(where * len(raw))] ^= 1 << bit
  bad = _scratch(tmp_path_factory, kind)
  bad.write_bytes(bytes(raw))
  try:
    loaded = load(bad)
  except ValueError as e:
    assert str(bad) in str(e)
    record("file.bitflip", "ValueError")
    return
  same(original, loaded)
  record("file.bitflip", "identical")


# ------------------------------------------------------------------ file.fields
def _read_fields(kind, path):
  if kind == "checkpoint":
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  return archive.read_npz(path, kind)


def _write_fields(kind, path, fields, duplicate=None):
  if kind == "checkpoint":
    with open(path, "wb") as f:
      np.savez(f, **fields)
  else:
    archive.write_npz_atomic(path, fields)
  if duplicate is not None:  # append a second member of the same name
    buf = io.BytesIO()
    np.save(buf, fields[duplicate])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
      with zipfile.ZipFile(path, "a") as z:
        z.writestr(duplicate + ".npy", buf.getvalue())


def _meta_key(kind):
  return "__meta__" if kind == "checkpoint" else "metadata_json"


def _nested_mixture(spec, depth):
  """JSON text of ``depth`` mixtures nested in their ``first`` entries (built as text: too
  deep for json.dumps)."""
  return ('{"type": "mixture", "first": ' * depth + json.dumps(spec) +
          ', "second": {"type": "fixed_exit", "stages": 3}}' * depth)


_JSON_JUNK = [None, [], {}, "x", 1.5, -1, True, 2**70, [1, [2, [3]]], {"type": "recall"}]


@settings(max_examples=120)
@given(st.data())
def test_hand_edited_fields_raise_naming_the_field(files, tmp_path_factory, data):
  kind = data.draw(st.sampled_from(KINDS), label="kind")
  path, _, load, _ = files[kind]
  fields = _read_fields(kind, path)
  bad = _scratch(tmp_path_factory, kind)
  edits = ["dtype", "shape", "missing", "extra", "duplicate", "other_kind", "version"]
  if kind in ("policy", "checkpoint"):
    edits += ["json_deep", "json_type", "json_missing", "json_invalid"]
  edit = data.draw(st.sampled_from(edits), label="edit")
  meta_key = _meta_key(kind)
  duplicate = None
  if edit == "dtype":
    field = data.draw(st.sampled_from(sorted(fields)), label="field")
    convert = data.draw(st.sampled_from([
        lambda a: a.astype(str), lambda a: a.astype(np.complex64),
        lambda a: a.astype(bool) if a.dtype != bool else a.astype(np.float32)]), label="to")
    if fields[field].dtype.kind == "U":   # string fields: numbers instead
      convert = data.draw(st.sampled_from([lambda a: np.zeros(a.shape), lambda a: np.ones(a.shape, bool)]))
    fields[field] = convert(fields[field])
    names = ("metadata",) if field == "__meta__" else (field.removeprefix("param:"),)
  elif edit == "shape":
    field = data.draw(st.sampled_from(sorted(fields)), label="field")
    a = fields[field]
    fields[field] = data.draw(st.sampled_from([a[None], a.reshape(-1)[:1], a.reshape(-1)[:-1]]
                                              if a.size > 1 else [a[None], a.reshape(1, 1)]))
    names = ("metadata",) if field == "__meta__" else (field.removeprefix("param:"),)
    if kind == "traces" and field == "scores":   # the other [N, n] fields no longer fit
      names = ("scores", "preds", "losses", "costs", "signal", "labels")
  elif edit == "missing":
    field = data.draw(st.sampled_from(sorted(set(fields) - {"labels"})), label="field")  # labels: optional
    del fields[field]
    names = ("metadata", "__meta__") if field == "__meta__" else (field.removeprefix("param:"),)
  elif edit == "extra":
    field = data.draw(st.sampled_from(["extra", "param:extra/kernel", "signal_9", "policy.first.x"]))
    fields[field] = np.zeros(3, np.float32)
    names = (field.removeprefix("param:"),)
  elif edit == "duplicate":
    field = duplicate = data.draw(st.sampled_from(sorted(fields)), label="field")
    names = (field,)
  elif edit == "other_kind":
    other = data.draw(st.sampled_from([k for k in KINDS if k != kind]), label="other")
    load_other = files[other][2]
    _write_fields(kind, bad, fields)
    msg = expect_error("file.fields", lambda: load_other(bad), "kind", "checksums", "__meta__")
    assert str(bad) in msg
    return
  elif edit == "version":
    version = data.draw(st.sampled_from([0, 2, -1, 99, 2**40, 1.0, "1", True, None]), label="version")
    if kind == "checkpoint":
      meta = json.loads(str(fields["__meta__"]))
      meta["format_version"] = version
      fields["__meta__"] = np.asarray(json.dumps(meta))
    else:
      if version is None:
        del fields["format_version"]
      else:
        fields["format_version"] = np.asarray(version)
    names = ("format_version",)
  else:  # hand-edited metadata JSON
    meta = json.loads(str(fields[meta_key]))
    required = (["format_version", "model", "config"] if kind == "checkpoint" else
                ["format_version", "policy", "num_stages", "num_states", "score_name", "feature"])
    names = ("metadata", "format_version")
    if edit == "json_deep":
      depth = data.draw(st.integers(1, 200_000), label="depth")
      how = data.draw(st.sampled_from(["arrays", "objects", "mixture"] if kind == "policy"
                                      else ["arrays", "objects"]))
      if how == "arrays":
        text = "[" * depth + "]" * depth
      elif how == "objects":
        text = '{"a":' * depth + "1" + "}" * depth
      else:
        spec, meta["policy"] = meta["policy"], "@"
        text = json.dumps(meta).replace('"@"', _nested_mixture(spec, min(depth, 3000)))
        names = ("metadata", "policy")
      fields[meta_key] = np.asarray(text)
    elif edit == "json_type":
      key = data.draw(st.sampled_from(required), label="key")
      junk = [v for v in _JSON_JUNK if v != meta[key] and not (key == "score_name" and isinstance(v, str))]
      meta[key] = data.draw(st.sampled_from(junk), label="value")
      fields[meta_key] = np.asarray(json.dumps(meta))
      names = ("metadata", key, "format_version", "parameter")
    elif edit == "json_missing":
      key = data.draw(st.sampled_from(required), label="key")
      del meta[key]
      fields[meta_key] = np.asarray(json.dumps(meta))
      names = ("metadata", key)
    else:
      fields[meta_key] = np.asarray(data.draw(st.sampled_from(["", "{", "nul", "[1, 2]", '"str"', "1e999",
                                                               "{\"a\": NaN"])))
  if kind == "traces" and edit in ("dtype", "shape", "missing") and field.startswith("signal"):
    names = ("signal",)   # the message names the signal (signals['entropy']) or its field
  _write_fields(kind, bad, fields, duplicate)
  msg = expect_error("file.fields", lambda: load(bad), *names)
  assert str(bad) in msg, msg
