"""Fuzzing policies, replay, policy files, serving inputs and drift (RELIABILITY.md,
area "policies & replay").

Random invalid inputs to every replay / evaluation entry point, to the server and
to the drift tests must raise ``ValueError`` naming the field, before any kernel
runs (JAX would otherwise clamp an out-of-range state or overflow a float32
silently). Random deployable policies of every kind must survive a save / load
round trip bit for bit and replay identically; random update sequences of a
:class:`~ttamer_jax.DriftMonitor` must keep exactly the counts of the last
``window`` observations. Every case is counted (tests/fuzzing.py).
"""

import contextlib
import os
import tempfile

import jax
import numpy as np
from flax import nnx
from fuzzing import expect_error, record
from hypothesis import given, settings
from hypothesis import strategies as st

import ttamer_jax as tj

# Internal: the inputs tj.replay_traces hands to tj.replay, to replay op by op.
from ttamer_jax.data.policy_io import recorded_lam_problem
from ttamer_jax.evaluation.metrics import trace_inputs

N, K, R = 3, 4, 32   # stages, states, requests
CASCADE = tj.synthetic_cascade(0, N, K, regime="random")
RECALL = tj.recall_policy(CASCADE, 0.5)
NO_RECALL = tj.core.no_recall_policy(CASCADE, 0.5)
LINE = (RECALL, NO_RECALL, tj.core.FixedExitPolicy(1, N), tj.core.PatiencePolicy(2, N))
STATES = np.asarray(tj.core.sample_states(jax.random.PRNGKey(0), CASCADE, R))
LOSSES = np.asarray(CASCADE.values)[np.arange(N)[None, :], STATES]
COSTS = np.asarray(CASCADE.costs)
SCORES = np.random.default_rng(0).uniform(size=(R, N))
PREDS = np.zeros((R, N), np.int32)
DISC = tj.data.Discretiser(edges=np.tile([0.25, 0.5, 0.75], (N, 1)))
DEPLOYED = tj.DeployedPolicy(RECALL, DISC, "state_score")
TRACES = tj.sample_traces(jax.random.PRNGKey(1), CASCADE, R)
OTHER = {(n, k): tj.synthetic_cascade(1, n, k, regime="random")
         for n, k in ((N + 1, K), (N, K + 1), (N - 1, K))}
GRAPH = tj.skip_line(CASCADE)
GPOLICY = tj.core.graph_policy(GRAPH, 0.5)
GSTATES = np.zeros((R, GRAPH.num_nodes), np.int64)
KEY = jax.random.PRNGKey(0)

NOT_POLICIES = st.sampled_from(["policy", None, 1.5, {"index": 1}, CASCADE, np.zeros((N, K))])
BAD_KEYS = st.sampled_from(["key", None, 1.5, np.zeros(3, np.uint32), np.array([1.5, 2.0]),
                            np.array([-1, 0]), np.array([2**32, 0]), np.zeros((2, 2), np.uint32),
                            np.array([True, False])])
BAD_COUNTS = st.one_of(st.sampled_from([0, -1, -10**6, 2.5, True, "10", None, [3]]),
                       st.integers(2**31, 2**62))


def _bad_state(draw, k):
  """An int outside 0..k-1: just past either end, far away, or beyond int32."""
  return draw(st.one_of(st.integers(k, k + 10**6), st.integers(-10**6, -1),
                        st.integers(2**31, 2**62), st.integers(-2**62, -2**31 - 1)))


def _bad_float(draw, negative=False):
  pool = [np.nan, np.inf, -np.inf, draw(st.floats(1e39, 1e308)), -draw(st.floats(1e39, 1e308))]
  if negative:
    pool.append(-draw(st.floats(1e-9, 1e6)))
  return draw(st.sampled_from(pool))


def _poke(arr, draw, value, dtype=None):
  out = np.array(arr, dtype=dtype if dtype is not None else np.asarray(arr).dtype)
  out[tuple(draw(st.integers(0, d - 1)) for d in out.shape)] = value
  return out


# ------------------------------------------------------------------ replay.invalid
def _replay_case(draw):
  policy = draw(st.sampled_from(LINE))
  state_reading = policy is RECALL or policy is NO_RECALL
  args = dict(states=STATES, losses=LOSSES, costs=COSTS, scores=None, preds=None)
  what = draw(st.sampled_from(["states", "losses", "costs", "scores", "preds", "stages", "shape",
                               "empty", "policy"]))
  if what == "states":
    bad = _bad_state(draw, K) if state_reading else draw(st.integers(2**31, 2**62))
    args["states"] = _poke(STATES, draw, bad, np.int64)
    if draw(st.booleans()):  # non-integer states
      args["states"] = _poke(STATES, draw, draw(st.sampled_from([0.5, np.nan, np.inf])), np.float64)
  elif what == "losses":
    args["losses"] = _poke(LOSSES, draw, _bad_float(draw), np.float64)
  elif what == "costs":
    base = COSTS if draw(st.booleans()) else np.broadcast_to(COSTS, (R, N))
    args["costs"] = _poke(base, draw, _bad_float(draw, negative=True), np.float64)
  elif what == "scores":
    args["scores"] = _poke(SCORES, draw, _bad_float(draw))
  elif what == "preds":
    args["preds"] = _poke(PREDS, draw, draw(st.sampled_from([0.5, np.nan, 2**31, -2**31 - 1, 2**40])),
                          np.float64)
  elif what == "stages":  # every array has the wrong number of stages
    n = draw(st.sampled_from([1, 2, 4, 5]))
    args = dict(states=np.zeros((R, n), np.int32), losses=np.zeros((R, n)), costs=np.zeros(n),
                scores=None, preds=None)
  elif what == "shape":  # one array disagrees with the states
    what = draw(st.sampled_from(["losses", "costs", "scores", "preds", "states"]))
    wrong = draw(st.sampled_from([(R - 1, N), (R, N + 1), (R,), (1, R, N)]))
    if what == "costs":
      wrong = draw(st.sampled_from([(N + 1,), (R - 1, N), (1, R, N), ()]))
    args[what] = np.zeros(wrong, np.int32 if what in ("states", "preds") else np.float64)
    if what == "states":
      what = ("states", "stages")
  elif what == "empty":
    args = dict(states=np.zeros((0, N), np.int32), losses=np.zeros((0, N)), costs=COSTS,
                scores=None, preds=None)
    what = "states"
  else:
    policy = draw(NOT_POLICIES)
  names = what if isinstance(what, tuple) else (what,)
  return lambda: tj.replay(policy, **args), names


def _replay_cascade_case(draw):
  what = draw(st.sampled_from(["range", "stages", "empty", "states_k", "cascade", "policy"]))
  policy, cascade, states = draw(st.sampled_from([RECALL, NO_RECALL])), CASCADE, STATES
  names = ("states",)
  if what == "range":
    states = _poke(STATES, draw, _bad_state(draw, K), np.int64)
  elif what == "stages":
    states = np.zeros((R, draw(st.sampled_from([1, 2, 4]))), np.int32)
  elif what == "empty":
    states = np.zeros((0, N), np.int32)
  elif what == "states_k":  # the policy's tables have K states, the cascade K + 1
    cascade, states, names = OTHER[(N, K + 1)], np.zeros((R, N), np.int32), ("cascade",)
  elif what == "cascade":
    cascade, names = draw(st.sampled_from(["cascade", None, GRAPH, CASCADE.values])), ("cascade",)
  else:
    policy, names = draw(NOT_POLICIES), ("policy",)
  return lambda: tj.core.replay_cascade(policy, cascade, states), names


def _monte_carlo_case(draw):
  kw = dict(key=KEY, cascade=CASCADE, policy=draw(st.sampled_from([RECALL, NO_RECALL])), lam=0.5,
            num_paths=100)
  what = draw(st.sampled_from(["num_paths", "chunk_size", "lam", "key", "cascade", "policy"]))
  names = (what,)
  if what == "num_paths":
    kw[what] = draw(BAD_COUNTS)
  elif what == "chunk_size":  # any positive chunk is fine (min(chunk_size, num_paths) is used)
    kw[what] = draw(st.sampled_from([0, -1, 2.5, True, "10", None, [3]]))
  elif what == "lam":
    kw["lam"] = draw(st.sampled_from([np.nan, np.inf, -0.1, 1.5, "a", None, [0.5, 0.5], 1j]))
  elif what == "key":
    kw["key"] = draw(BAD_KEYS)
  elif what == "cascade":
    kw["cascade"] = draw(st.sampled_from(list(OTHER.values()) + ["c", None, GRAPH]))
  else:
    kw["policy"] = draw(NOT_POLICIES)
  return lambda: tj.monte_carlo(**kw), names


def _policy_metrics_case(draw):
  what = draw(st.sampled_from(["mismatch", "policy", "deployed", "signals", "cascade"]))
  if what == "mismatch":
    return lambda: tj.policy_metrics(draw(st.sampled_from(list(OTHER.values()))),
                                    draw(st.sampled_from([RECALL, NO_RECALL]))), ("policy",)
  if what == "cascade":
    return lambda: tj.policy_metrics(draw(st.sampled_from(["c", None, GRAPH])), RECALL), ("cascade",)
  policy = {"policy": lambda: draw(NOT_POLICIES), "deployed": lambda: DEPLOYED,
            "signals": lambda: draw(st.sampled_from([tj.core.PatiencePolicy(2, N),
                                                     tj.confidence_threshold(0.5, N)]))}[what]()
  return lambda: tj.policy_metrics(CASCADE, policy), ("policy",)


def _evaluate_case(draw):
  kw = dict(policy=DEPLOYED, traces=TRACES, lam=0.5)
  what = draw(st.sampled_from(["lam", "level", "num_resamples", "key", "traces", "stages",
                               "inconsistent", "signal", "heuristic_stages"]))
  names = (what,)
  if what == "lam":
    kw["lam"] = draw(st.sampled_from([np.nan, -1.0, 2.0, "x", None, [0.1, 0.2]]))
  elif what == "level":
    kw["level"] = draw(st.sampled_from([0.0, 1.0, 1.5, -0.5, np.nan]))
  elif what == "num_resamples":
    kw["num_resamples"] = draw(BAD_COUNTS)
  elif what == "key":
    kw["key"] = draw(BAD_KEYS)
  elif what == "traces":
    kw["traces"] = draw(st.sampled_from(["traces", None, STATES]))
  elif what == "stages":  # traces with another number of stages than the policy
    kw["traces"] = tj.sample_traces(KEY, OTHER[(N + 1, K)], 8)
    names = ("stages",)
  elif what == "inconsistent":  # policy for K states, discretiser for 2
    kw["policy"] = DEPLOYED.replace(discretiser=tj.data.Discretiser(edges=np.full((N, 1), 0.5)))
    names = ("policy",)
  elif what == "signal":
    kw["policy"] = DEPLOYED.replace(score_name=draw(st.sampled_from(["nope", "max_softmax", ""])))
    names = ("signal",)
  else:
    kw["policy"] = draw(st.sampled_from([tj.core.FixedExitPolicy(0, N + 1), tj.core.PatiencePolicy(2, N - 1)]))
    names = ("policy",)
  fn = draw(st.sampled_from(["evaluate", "compare"]))
  if fn == "compare":
    kw["policy_b"] = tj.core.FixedExitPolicy(N - 1, N)
    kw["policy_a"] = kw.pop("policy")
    return lambda: tj.compare(**kw), names
  return lambda: tj.evaluate(**kw), names


def _graph_case(draw):
  what = draw(st.sampled_from(["states", "nodes", "empty", "losses", "loss_shape", "graph",
                               "policy", "num_paths", "key"]))
  states, losses, graph, policy, names = GSTATES, None, GRAPH, GPOLICY, (what,)
  if what in ("num_paths", "key"):
    kw = dict(key=KEY, graph=GRAPH, policy=GPOLICY, num_paths=16)
    kw[what] = draw(BAD_COUNTS if what == "num_paths" else BAD_KEYS)
    return lambda: tj.core.simulate_graph(**kw), names
  if what == "states":
    states = _poke(GSTATES, draw, _bad_state(draw, K))
  elif what == "nodes":
    states, names = np.zeros((R, GRAPH.num_nodes + draw(st.sampled_from([-1, 1]))), np.int32), ("states",)
  elif what == "empty":
    states, names = np.zeros((0, GRAPH.num_nodes), np.int32), ("states",)
  elif what == "losses":
    losses = _poke(np.zeros(GSTATES.shape), draw, _bad_float(draw))
  elif what == "loss_shape":
    losses, names = np.zeros((R + 1, GRAPH.num_nodes)), ("losses",)
  elif what == "graph":
    graph = draw(st.sampled_from([tj.skip_line(OTHER[(N + 1, K)]), CASCADE, None]))
  else:
    policy = draw(st.sampled_from([RECALL, None, "p"]))
  if draw(st.booleans()) and what in ("graph", "policy"):
    return lambda: tj.core.simulate_graph(KEY, graph, policy, 16), names
  return lambda: tj.core.replay_graph(policy, graph, states, losses), names


REPLAY_CASES = {"replay": _replay_case, "replay_cascade": _replay_cascade_case,
                "monte_carlo": _monte_carlo_case, "policy_metrics": _policy_metrics_case,
                "evaluate": _evaluate_case, "graph": _graph_case}


@settings(max_examples=150)
@given(st.data())
def test_invalid_replay_inputs_raise_naming_the_field(data):
  case = data.draw(st.sampled_from(sorted(REPLAY_CASES)), label="entry point")
  fn, names = REPLAY_CASES[case](data.draw)
  expect_error("replay.invalid", fn, *names)


# ------------------------------------------------------------------ policy_file.roundtrip
SIGNALS = ("scores", "state_score", "signal ü/x")
RT_TRACES = TRACES.replace(signals={**TRACES.signals, "signal ü/x": TRACES.scores[:, ::-1]})


@st.composite
def deployables(draw):
  """A random DeployedPolicy of any savable kind (leaves, mixtures of leaves, nested)."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  feature = draw(st.sampled_from([None, "agree_prev"]))
  bins = draw(st.sampled_from([1, 3]))
  edges = np.sort(rng.uniform(0, 1, (N, bins - 1)), axis=1)
  if bins > 1 and draw(st.booleans()):
    edges[:, 1] = edges[:, 0]  # duplicate edges: an empty bin
  disc = tj.data.Discretiser(edges=edges, feature=feature)
  k = disc.num_states
  values = rng.uniform(0, 1, (N, k)).astype(np.float32)
  if draw(st.booleans()):
    values = np.round(values * 2) / 2  # ties

  def leaf(recall):
    if recall:
      index = rng.uniform(-0.5, 1, (N, k)).astype(np.float32)
      index[rng.random((N, k)) < 0.3] = -np.inf
      index[-1] = np.inf
      lam = draw(st.sampled_from([0.0, 1.0, float(rng.uniform())]))
      return tj.core.RecallPolicy(index=index, values=values, lam=np.asarray(lam, np.float32))
    kind = draw(st.sampled_from(["no_recall", "threshold", "patience", "fixed_exit"]))
    if kind == "no_recall":
      return tj.core.NoRecallPolicy(stop=rng.random((N, k)) < 0.5)
    if kind == "threshold":
      t = rng.uniform(0, 1, N)
      t[rng.random(N) < 0.2] = draw(st.sampled_from([np.inf, -np.inf]))
      return tj.per_stage_thresholds(t, direction=draw(st.sampled_from(["above", "below"])))
    if kind == "patience":
      return tj.core.PatiencePolicy(draw(st.integers(1, N + 1)), N)
    return tj.core.FixedExitPolicy(draw(st.integers(0, N - 1)), N)

  def policy(depth):
    recall = draw(st.booleans())
    if depth < 2 and draw(st.booleans()):
      first = policy(depth + 1)
      second = leaf(first.recall) if draw(st.booleans()) else policy(depth + 1)
      if second.recall != first.recall:
        second = leaf(first.recall)
      return tj.core.MixturePolicy(first=first, second=second,
                              prob_second=np.asarray(draw(st.floats(0, 1)), np.float32),
                              key=jax.random.PRNGKey(draw(st.integers(0, 2**31 - 1))))
    return leaf(recall)

  return tj.DeployedPolicy(policy=policy(0), discretiser=disc, score_name=draw(st.sampled_from(SIGNALS)))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))


@contextlib.contextmanager
def _source_date_epoch(value):
  old = os.environ.get("SOURCE_DATE_EPOCH")
  if value is not None:
    os.environ["SOURCE_DATE_EPOCH"] = str(value)
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("SOURCE_DATE_EPOCH", None)
    else:
      os.environ["SOURCE_DATE_EPOCH"] = old


def _read(path):
  with open(path, "rb") as f:
    return f.read()


@settings(max_examples=20)
@given(deployables(), st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3),
       st.one_of(st.none(), st.floats(0, 1)),
       st.one_of(st.integers(0, 2**31 - 1), st.sampled_from(["2024-05-01T00:00:00Z", "ü"])))
def test_random_policies_round_trip_bit_identically_and_replay_identically(deployed, user, lam,
                                                                           date):
  epoch, fit_date = (date, None) if isinstance(date, int) else (None, date)
  if lam is not None and recorded_lam_problem(lam, deployed.policy):
    lam = None  # a recall policy records the lam it decides with (save_policy refuses another)
  with tempfile.TemporaryDirectory() as d, _source_date_epoch(epoch):
    paths = [os.path.join(d, f"p{j}.npz") for j in range(2)]
    metas = [tj.save_policy(p, deployed, lam=lam, fit_date=fit_date, metadata=user) for p in paths]
    assert metas[0] == metas[1]
    assert _read(paths[0]) == _read(paths[1])                          # bit-identical
    assert _read(os.path.join(d, "p0.json")) == _read(os.path.join(d, "p1.json"))  # sidecars
    loaded, meta = tj.load_policy(paths[1], num_stages=N, with_metadata=True)
  assert meta == metas[0] and meta["user"] == user
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(deployed)
  for a, b in zip(jax.tree_util.tree_leaves(deployed), jax.tree_util.tree_leaves(loaded)):
    b = np.asarray(b)
    np.testing.assert_array_equal(np.asarray(a).astype(b.dtype), b)
  # tj.replay_traces = trace_inputs + replay; the replay runs op by op (no compilation
  # per random policy structure).
  inputs = [trace_inputs(p, RT_TRACES) for p in (deployed, loaded)]
  for a, b in zip(inputs[0][1:], inputs[1][1:]):
    np.testing.assert_array_equal(a, b)                               # states, scores, preds
  with jax.disable_jit():
    r1, r2 = (tj.replay(line, states, RT_TRACES.losses, RT_TRACES.costs, scores=scores, preds=preds)
              for line, states, scores, preds in inputs)
  for field in ("stop_stage", "answer_stage", "loss", "cost"):
    np.testing.assert_array_equal(getattr(r1, field), getattr(r2, field))
  record("policy_file.roundtrip")


# ------------------------------------------------------------------ serve.invalid
MODEL = tj.networks.EarlyExitMLP((4,), 3, hidden=8, num_blocks=N, rngs=nnx.Rngs(0))
SERVE_POLICY = tj.DeployedPolicy(RECALL, DISC, "max_softmax")
SERVER = tj.Server(MODEL, SERVE_POLICY, buckets=(8,))
X = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)


def _serve_case(draw):
  what = draw(st.sampled_from(["nan", "shape", "ndim", "empty", "dtype", "policy_stages",
                               "policy_states", "discretiser", "score", "not_deployed", "inner",
                               "oracle", "model", "buckets"]))
  x, model, deployed, buckets = X, MODEL, SERVE_POLICY, (8,)
  names = ("x",)
  if what == "nan":
    x = _poke(X, draw, draw(st.sampled_from([np.nan, np.inf, -np.inf])))
  elif what == "shape":
    x = np.zeros((5, draw(st.sampled_from([1, 3, 5, 16]))), np.float32)
  elif what == "ndim":
    x = draw(st.sampled_from([np.zeros(4, np.float32), np.zeros((5, 2, 2), np.float32),
                              np.float32(1.0)]))
  elif what == "empty":
    x = np.zeros((0, 4), np.float32)
  elif what == "dtype":
    x = draw(st.sampled_from([np.full((2, 4), "a"), X.astype(np.complex64), None,
                              [[0.1, 0.2, 0.3, 0.4], [0.1]], np.array([object()] * 4)]))
  elif what == "policy_stages":
    n = draw(st.sampled_from([N - 1, N + 1]))
    deployed = SERVE_POLICY.replace(policy=draw(st.sampled_from([
        tj.recall_policy(OTHER[(N + 1, K)], 0.5) if n > N else tj.recall_policy(OTHER[(N - 1, K)], 0.5),
        tj.core.FixedExitPolicy(0, n), tj.confidence_threshold(0.5, n)])))
    names = ("policy",)
  elif what == "policy_states":
    if draw(st.booleans()):
      deployed = SERVE_POLICY.replace(policy=tj.core.no_recall_policy(OTHER[(N, K + 1)], 0.5))
      names = ("policy",)
    else:  # a mixture of policies over different state counts is refused when built
      other = tj.recall_policy(OTHER[(N, K + 1)], 0.5)
      return lambda: tj.networks.serve(model, SERVE_POLICY.replace(
          policy=tj.core.MixturePolicy(RECALL, other, 0.5, KEY)), x, buckets=buckets), ("second",)
  elif what == "discretiser":
    deployed = SERVE_POLICY.replace(discretiser=draw(st.sampled_from([
        tj.data.Discretiser(edges=np.zeros((N + 1, K - 1))), tj.data.Discretiser(edges=np.zeros((N, K))),
        tj.data.Discretiser(edges=np.zeros((N, 2)), feature="agree_prev")])))
    names = ("discretiser", "policy")
  elif what == "score":
    deployed = SERVE_POLICY.replace(score_name=draw(st.sampled_from(
        ["zero_one", "cross_entropy", "scores", "", "MAX_SOFTMAX"])))
    names = ("score",)
  elif what == "not_deployed":
    deployed, names = draw(st.sampled_from([RECALL, None, "policy", DISC])), ("policy",)
  elif what == "inner":
    deployed = SERVE_POLICY.replace(policy=draw(NOT_POLICIES))
    names = ("policy",)
  elif what == "oracle":
    deployed = SERVE_POLICY.replace(policy=tj.hindsight_policy(LOSSES, COSTS, 0.5))
    names = ("policy",)
  elif what == "model":
    model, names = draw(st.sampled_from([None, "mlp", CASCADE])), ("model",)
  else:
    buckets = draw(st.sampled_from([(), (0, 8), (8, 4), (8, 8), (8.0,), ("8",), None, 8, (-1,)]))
    names = ("buckets",)
  if what in ("nan", "shape", "ndim", "empty", "dtype") and draw(st.booleans()):
    return lambda: SERVER(x), names  # the long-lived server
  return lambda: tj.networks.serve(model, deployed, x, buckets=buckets), names


@settings(max_examples=80)
@given(st.data())
def test_invalid_serving_inputs_raise_naming_the_field(data):
  fn, names = _serve_case(data.draw)
  expect_error("serve.invalid", fn, *names)


# ------------------------------------------------------------------ drift.invalid
REF = np.array([[300, 200, 100, 50], [100, 100, 100, 100], [10, 0, 5, 60]])
MONITOR = tj.DriftMonitor(REF, window=16)
DRIFT_OPTIONS = dict(
    alpha=[0.0, 1.0, -0.1, 1.5, np.nan, np.inf, "0.1", None, [0.05]],
    test=["G", "pearson", "", None, ["g"], 1],
    min_expected=[-1.0, np.nan, np.inf, "5", None],
    min_count=[0, -1, 2.5, True, None, "50"],
    min_distance=[-0.1, 1.5, np.nan, np.inf, None, "0"])


def _drift_case(draw):
  what = draw(st.sampled_from(["counts", "option", "state_counts", "num_states", "holm", "window",
                               "monitor_kw", "update", "observe", "traces", "consulted"]))
  if what == "counts":
    which = draw(st.sampled_from(["reference", "observed"]))
    bad = draw(st.sampled_from([
        _poke(REF, draw, draw(st.sampled_from([-1, -10**6])), np.int64),
        _poke(REF, draw, draw(st.sampled_from([np.nan, np.inf, 2.5, 1e300, 2.0**53])), np.float64),
        REF[:, :2], REF[:1], REF[0], np.zeros((0, K)), np.zeros((N, 0)), np.full(REF.shape, "1"),
        None, [[1, 2], [3]]]))
    args = dict(reference=REF, observed=REF)
    args[which] = bad
    names = (which,) if which == "observed" else ("reference", "observed")  # a shape mismatch
    if which == "reference" and draw(st.booleans()):
      return lambda: tj.DriftMonitor(bad), ("reference",)
    return lambda: tj.evaluation.two_sample_test(**args), names
  if what == "option":
    opt = draw(st.sampled_from(sorted(DRIFT_OPTIONS)))
    bad = draw(st.sampled_from(DRIFT_OPTIONS[opt]))
    if draw(st.booleans()):
      return lambda: tj.DriftMonitor(REF, **{opt: bad}), (opt,)
    return lambda: tj.evaluation.two_sample_test(REF, REF, **{opt: bad}), (opt,)
  if what == "state_counts":
    states = _poke(np.zeros((6, N), np.int64), draw, draw(st.one_of(
        st.integers(K, 2**62), st.integers(-2**62, -2))))
    if draw(st.booleans()):
      states = draw(st.sampled_from([np.full((6, N), 0.5), np.full((6, N), np.nan), np.zeros(6),
                                     np.full((6, N), "0")]))
    return lambda: tj.evaluation.state_counts(states, K), ("states",)
  if what == "num_states":
    return lambda: tj.evaluation.state_counts(np.zeros((6, N), int), draw(BAD_COUNTS)), ("num_states",)
  if what == "holm":
    p = draw(st.sampled_from([[0.1, np.nan], [0.1, 1.5], [-0.01], [np.inf], [[0.1]], ["a"], None]))
    return lambda: tj.evaluation.holm(p), ("p_values",)
  if what == "window":
    return lambda: tj.DriftMonitor(REF, window=draw(st.one_of(BAD_COUNTS, st.integers(2**28, 2**40)))), \
        ("window",)
  if what == "monitor_kw":
    kw = draw(st.sampled_from(["alpah", "windw", "consulted_only", "foo"]))
    return lambda: tj.DriftMonitor(REF, **{kw: 0.05}), (kw,)
  if what == "update":
    bad = draw(st.sampled_from([
        _poke(np.zeros((4, N), np.int64), draw, draw(st.one_of(st.integers(K, 2**62),
                                                               st.integers(-2**62, -2)))),
        np.zeros((4, N + 1), int), np.zeros((4, N - 1), int), np.zeros(N, int),
        np.full((4, N), 0.5), np.full((4, N), "1"), None]))
    names = ("states", "stages") if np.ndim(bad) == 2 else ("states",)
    return lambda: MONITOR.update(bad), names
  if what == "observe":
    if draw(st.booleans()):
      stage = draw(st.sampled_from([-1, N, 2**40, 1.0, "0", None, True]))
      return lambda: MONITOR.observe(stage, np.zeros(3, int)), ("stage",)
    bad = draw(st.sampled_from([np.zeros((2, 2), int), np.array([0, K]), np.array([-2]),
                                np.array([0.5]), np.array([2**40])]))
    return lambda: MONITOR.observe(0, bad), ("states",)
  if what == "traces":
    args = draw(st.sampled_from([
        (DEPLOYED, TRACES, tj.sample_traces(KEY, OTHER[(N + 1, K)], 8), "stages"),
        (DEPLOYED, "traces", TRACES, "traces"), (DEPLOYED, TRACES, None, "traces"),
        (RECALL, TRACES, TRACES, "deployed"),
        (DEPLOYED.replace(discretiser=tj.data.Discretiser(edges=np.full((N, 1), 0.5))), TRACES, TRACES,
         "deployed")]))
    if draw(st.booleans()) and args[2] is TRACES:
      return lambda: tj.DriftMonitor.from_traces(args[0], args[1]), (args[3],)
    return lambda: tj.drift_test(*args[:3]), (args[3],)
  bad = draw(st.sampled_from(["yes", 1, None, 0.0, np.array([True])]))
  return lambda: tj.drift_test(DEPLOYED, TRACES, TRACES, consulted_only=bad), ("consulted_only",)


@settings(max_examples=120)
@given(st.data())
def test_invalid_drift_inputs_raise_naming_the_argument(data):
  fn, names = _drift_case(data.draw)
  expect_error("drift.invalid", fn, *names)


# ------------------------------------------------------------------ drift.window
@settings(max_examples=40)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**32 - 1),
       st.lists(st.sampled_from(["update", "observe", "reset", "check"]), min_size=1, max_size=25))
def test_monitor_window_keeps_the_last_window_observations(n, k, window, seed, ops):
  rng = np.random.default_rng(seed)
  mon = tj.DriftMonitor(rng.integers(0, 100, (n, k)), window=window, min_count=1)
  seen = [[] for _ in range(n)]
  for op in ops:
    if op == "update":
      batch = rng.integers(-1, k, size=(int(rng.integers(0, 3 * window)), n))
      mon.update(batch)
      for i in range(n):
        seen[i] += [int(s) for s in batch[:, i] if s >= 0]
    elif op == "observe":
      stage, col = int(rng.integers(n)), rng.integers(-1, k, size=int(rng.integers(0, 2 * window)))
      mon.observe(stage, col)
      seen[stage] += [int(s) for s in col if s >= 0]
    elif op == "reset":
      mon.reset()
      seen = [[] for _ in range(n)]
    else:
      rep = mon.check()
      np.testing.assert_array_equal(rep.num_observed, [min(len(s), window) for s in seen])
    want = np.array([[seen[i][-window:].count(s) for s in range(k)] for i in range(n)])
    np.testing.assert_array_equal(mon.counts, want)
  record("drift.window")
