"""Fuzzing the constructors and solvers (RELIABILITY.md, area "constructors" and "solvers").

Valid random cascades (costs spanning 1e-8..1e8, ties, near-deterministic rows,
lam at 0 and 1) must solve without NaN and keep hindsight <= recall <= no-recall
and the threshold structure of the index; Monte-Carlo replay of the optima must
match the DP values. Random invalid inputs must raise ``ValueError`` naming the
field. Every case is counted (tests/fuzzing.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from fuzzing import expect_error, record
from hypothesis import given, settings
from hypothesis import strategies as st

import ttamer_jax as tj

EPS32 = float(np.finfo(np.float32).eps)
# |J_float32 - J_float64| <= C32 * n * eps32 * (max values + sum costs): docs/formulation.md
C32 = 4.0


# ------------------------------------------------------------------ strategies
@st.composite
def cascade_arrays(draw, max_n=4, max_k=4):
  """float64 ``(values, init, trans, costs)`` with the corner cases mixed in."""
  n = draw(st.integers(1, max_n))
  k = draw(st.integers(1, max_k))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  kind = draw(st.sampled_from(["uniform", "ties", "equal", "scaled"]))
  values = rng.uniform(0, 1, (n, k))
  if kind == "ties":
    values = np.round(values * 2) / 2
  elif kind == "equal":
    values = np.full((n, k), 0.25)
  elif kind == "scaled":
    values = values * 10.0 ** draw(st.integers(-8, 8))
  costs = rng.uniform(0, 1, n) * 10.0 ** draw(st.integers(-8, 8))
  if draw(st.booleans()):
    costs = 10.0 ** rng.uniform(-8, 8, n)  # spanning 1e-8 .. 1e8 within one cascade
  if draw(st.booleans()):
    costs[:] = 0.0
  conc = draw(st.sampled_from([1.0, 0.05]))
  init = rng.dirichlet(np.full(k, conc))
  trans = rng.dirichlet(np.full(k, conc), size=(n - 1, k)).reshape(n - 1, k, k)
  if draw(st.booleans()):  # near-deterministic: entries of 1e-12 next to ~1
    init = np.where(np.arange(k) == 0, 1.0, 1e-12)
    init /= init.sum()
    trans = np.where(np.eye(k)[None] > 0, 1.0, 1e-12) * np.ones((n - 1, 1, 1))
    trans = trans[..., rng.permutation(k)]
    trans /= trans.sum(-1, keepdims=True)
  return values, init, trans, costs


LAMS = st.one_of(st.sampled_from([0.0, 1.0, 1e-6, 1 - 1e-6]), st.floats(0, 1))


def _bound(values, costs):
  return C32 * values.shape[0] * EPS32 * (float(values.max()) + float(costs.sum()))


# ------------------------------------------------------------------ valid
def _check_index_structure(index, values32, lam32):
  index = np.asarray(index)
  assert index.shape == values32.shape
  assert np.all(np.isposinf(index[-1]))
  # A threshold is -inf (never stop), +inf (stop whatever the best-so-far) or the
  # midpoint between two consecutive reachable values lam * v (docs/policy_format.md).
  xs = np.unique(np.float32(lam32) * np.unique(values32))
  allowed = np.float32(0.5) * (xs[:-1] + xs[1:])
  inner = index[:-1]
  ok = np.isinf(inner) | np.isin(inner, allowed)
  assert ok.all(), (inner[~ok], allowed)


def _continuations(values, init, trans, costs, lam):
  """float64 NumPy DP: ``grid`` and ``cont[i][m, s]`` of stages 0..n-2."""
  n, k = values.shape
  grid = np.unique(values)
  row = {g: m for m, g in enumerate(grid)}
  v = np.repeat(lam * grid[:, None], k, axis=1)
  conts = [None] * (n - 1)
  for i in range(n - 2, -1, -1):
    nxt = np.minimum(grid[:, None], values[i + 1][None, :])
    g = np.stack([v[[row[x] for x in nxt[:, t]], t] for t in range(k)], axis=1)   # [M, K]
    cont = (1 - lam) * costs[i + 1] + g @ trans[i].T
    conts[i] = cont
    v = np.minimum(lam * grid[:, None], cont)
  return grid, conts


@settings(max_examples=40)
@given(cascade_arrays(), LAMS)
def test_random_valid_cascades_solve_and_keep_orderings(arrays, lam):
  values, init, trans, costs = arrays
  c = tj.Cascade(values, init, trans, costs)
  rec = tj.solve_recall(c, lam)
  r, nr, hs = float(rec.value), float(tj.solve_no_recall(c, lam).value), float(tj.prophet_value(c, lam))
  assert np.isfinite([r, nr, hs]).all()
  tol = 2 * _bound(values, costs)
  assert hs <= r + tol and r <= nr + tol, (hs, r, nr, tol)
  _check_index_structure(rec.index, np.asarray(c.values), np.float32(lam))
  # Threshold structure in float64: stop iff x <= index wherever stop/continue is not a tie.
  with jax.enable_x64(True):
    c64 = tj.Cascade(values, init, trans, costs)
    index = np.asarray(tj.solve_recall(c64, lam).index)
  grid, conts = _continuations(values, init, trans, costs, lam)
  scale = 1.0 + float(values.max()) + float(costs.sum())
  for i, cont in enumerate(conts):
    x = lam * grid[:, None]
    clear = np.abs(x - cont) > 1e-9 * scale
    np.testing.assert_array_equal((x <= index[i][None, :])[clear], (x <= cont)[clear])
  record("cascade.valid")


@settings(max_examples=8)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.95), st.sampled_from([0.2, 1.0, 5.0]))
def test_monte_carlo_replay_matches_dp_values(seed, lam, conc):
  key = jax.random.PRNGKey(seed)
  c = tj.random_cascade(key, 4, 5, concentration=conc, cost_scale=0.3)
  for policy, value in ((tj.recall_policy(c, lam), tj.solve_recall(c, lam).value),
                        (tj.core.no_recall_policy(c, lam), tj.solve_no_recall(c, lam).value)):
    mc = tj.monte_carlo(jax.random.fold_in(key, 1), c, policy, lam, 20000)
    exact = float(tj.policy_metrics(c, policy).objective(lam))
    assert abs(exact - float(value)) <= 1e-5
    assert abs(float(mc.objective) - float(value)) <= 4 * float(mc.objective_se) + 1e-6
    record("mc.replay_equals_dp")


# ------------------------------------------------------------------ invalid cascades
BASE = (np.array([[0.1, 0.5, 0.9], [0.2, 0.4, 0.3], [0.0, 0.7, 0.6]]),
        np.array([0.2, 0.3, 0.5]),
        np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]] * 2),
        np.array([0.1, 0.2, 0.4]))
FIELDS = ("values", "init", "trans", "costs")


@settings(max_examples=150)
@given(st.data())
def test_invalid_cascade_arrays_raise_naming_the_field(data):
  arrays = [a.copy() for a in BASE]
  f = data.draw(st.integers(0, 3), label="field")
  name = FIELDS[f]
  kind = data.draw(st.sampled_from(["nan_inf", "negative", "prob_gt_1", "row_sum", "shape",
                                    "dtype", "overflow"]), label="kind")
  a = arrays[f]
  pos = tuple(data.draw(st.integers(0, d - 1)) for d in a.shape)
  if kind == "nan_inf":
    a[pos] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  elif kind == "negative":
    a[pos] = -data.draw(st.floats(1e-9, 1e9))
  elif kind == "prob_gt_1":
    if name in ("values", "costs"):
      name = "init"
      arrays[1] = np.array([1.5, -0.25, -0.25])
    else:
      a[pos] = data.draw(st.floats(1.0001, 1e6))
  elif kind == "row_sum":
    name = data.draw(st.sampled_from(["init", "trans"]))
    g = FIELDS.index(name)
    b = arrays[g]
    p2 = tuple(data.draw(st.integers(0, d - 1)) for d in b.shape)
    delta = data.draw(st.floats(2e-5, 0.5))
    b[p2] = b[p2] - delta if b[p2] >= delta else b[p2] + delta  # the row sum moves by delta
  elif kind == "shape":
    choice = data.draw(st.sampled_from(["ndim", "size", "n0", "k0"]))
    if choice == "ndim":
      arrays[f] = a[None]
    elif choice == "size":
      arrays[f] = np.concatenate([a, a[..., :1]], axis=-1)
    elif choice == "n0":
      arrays = [np.zeros((0, 3)), BASE[1], np.zeros((0, 3, 3)), np.zeros(0)]
      name = "values"
    else:
      arrays = [np.zeros((3, 0)), np.zeros(0), np.zeros((2, 0, 0)), BASE[3]]
      name = "values"
  elif kind == "dtype":
    arrays[f] = data.draw(st.sampled_from([
        np.full(a.shape, "x"), a.astype(np.complex64), None, "0.5",
        [[0.1, 0.2], [0.3]], np.array([object()] * a.size, dtype=object)]))
  elif kind == "overflow":
    if name in ("init", "trans"):
      name = data.draw(st.sampled_from(["values", "costs"]))
    arrays[FIELDS.index(name)][(0,) * arrays[FIELDS.index(name)].ndim] = data.draw(
        st.floats(1e39, 1e308))
  cls = "cascade.overflow" if kind == "overflow" else f"cascade.{kind}"
  expect_error(cls, lambda: tj.Cascade(*arrays), name)


@settings(max_examples=60)
@given(st.data())
def test_invalid_builder_arguments_raise(data):
  key = jax.random.PRNGKey(0)
  bad_int = st.sampled_from([0, -1, 1.5, "3", None, True])
  case = data.draw(st.sampled_from(["random_n", "random_k", "random_conc", "random_scale", "gap",
                                    "demo", "iid", "skip", "tree", "overthink"]))
  if case == "random_n":
    expect_error("builders.bad_args", lambda: tj.random_cascade(key, data.draw(bad_int), 3), "num_stages")
  elif case == "random_k":
    expect_error("builders.bad_args", lambda: tj.random_cascade(key, 3, data.draw(bad_int)), "num_states")
  elif case == "random_conc":
    bad = data.draw(st.sampled_from([0.0, -1.0, np.nan, np.inf, "a"]))
    expect_error("builders.bad_args", lambda: tj.random_cascade(key, 2, 2, concentration=bad), "concentration")
  elif case == "random_scale":
    bad = data.draw(st.sampled_from([-1.0, np.nan, np.inf, None]))
    expect_error("builders.bad_args", lambda: tj.random_cascade(key, 2, 2, cost_scale=bad), "cost_scale")
  elif case == "gap":
    bad = data.draw(st.sampled_from([1.0, 0.5, -2.0, np.nan, np.inf, None, "x", [2.0]]))
    expect_error("builders.bad_args", lambda: tj.gap_instance(bad), "alpha")
  elif case == "demo":
    which = data.draw(st.booleans())
    bad = data.draw(bad_int)
    expect_error("builders.bad_args", lambda: tj.demo_cascade(bad, 4) if which else tj.demo_cascade(3, bad),
                 "num_stages" if which else "num_states")
  elif case == "iid":
    sub = data.draw(st.sampled_from(["probs", "n", "costs"]))
    if sub == "probs":
      expect_error("builders.bad_args", lambda: tj.core.iid_cascade([0.1, 0.2], [0.7, 0.7], 0.1, 3), "probs")
    elif sub == "n":
      num = data.draw(bad_int)
      expect_error("builders.bad_args", lambda: tj.core.iid_cascade([0.1, 0.2], [0.5, 0.5], 0.1, num),
                   "num_stages")
    else:
      expect_error("builders.bad_args",
                   lambda: tj.core.iid_cascade([0.1, 0.2], [0.5, 0.5], [0.1, -1.0, 0.1], 3), "costs")
  elif case == "skip":
    bad = data.draw(st.sampled_from([None, "c", BASE[0]]))
    expect_error("builders.bad_args", lambda: tj.skip_line(bad), "cascade")
  elif case == "tree":
    sub = data.draw(st.sampled_from(["root_init", "root_cost", "parents"]))
    args = dict(values=np.zeros((2, 2)), parents=[0], edge_trans=np.full((1, 2, 2), 0.5),
                edge_costs=[0.1], root_init=[0.5, 0.5], root_cost=0.1)
    args[sub] = {"root_init": 0.5, "root_cost": "x", "parents": [1.5]}[sub]
    expect_error("builders.bad_args", lambda: tj.tree_graph(**args), sub)
  else:
    expect_error("builders.bad_args", lambda: tj.overthinking_cascade(data.draw(bad_int), 4),
                 "num_stages")


@settings(max_examples=60)
@given(st.data())
def test_invalid_routing_graphs_raise(data):
  k = 2
  good = dict(values=np.zeros((3, k)), edge_trans=np.full((2, k, k), 0.5), edge_costs=[0.1, 0.1],
              entry_init=[[0.5, 0.5]], entry_costs=[0.1], edge_src=(0, 1), edge_dst=(1, 2),
              entry_nodes=(0,))
  case = data.draw(st.sampled_from(["cycle", "dup", "range", "nonint", "entry", "arrays", "rows"]))
  g = dict(good)
  if case == "cycle":
    g.update(edge_src=(1, 1), edge_dst=(0, 2))
    names = ("topological",)
  elif case == "dup":
    g.update(edge_src=(0, 0), edge_dst=(1, 1))
    names = ("duplicate",)
  elif case == "range":
    g.update(edge_src=(0, data.draw(st.sampled_from([-1, 3, 99]))), edge_dst=(1, 2))
    names = ("outside",)
  elif case == "nonint":
    g.update(edge_src=data.draw(st.sampled_from([(0, 1.5), ("a", 1), (0, None), 5])))
    names = ("edge_src",)
  elif case == "entry":
    g.update(entry_nodes=data.draw(st.sampled_from([(), (0, 0), (7,)])))
    names = ("entry",)
  elif case == "arrays":
    field = data.draw(st.sampled_from(["values", "edge_costs", "entry_costs"]))
    arr = np.asarray(good[field], np.float64).copy()
    arr.flat[0] = data.draw(st.sampled_from([np.nan, -1.0, np.inf]))
    g[field] = arr
    names = (field,)
  else:
    field = data.draw(st.sampled_from(["edge_trans", "entry_init"]))
    arr = np.asarray(good[field], np.float64).copy()
    arr.flat[0] = data.draw(st.floats(0.6, 2.0))
    g[field] = arr
    names = (field,)
  expect_error("graph.invalid", lambda: tj.RoutingGraph(**g), *names)


@settings(max_examples=30)
@given(st.data())
def test_invalid_aggregated_cascades_raise(data):
  n, k, q = 3, 3, 2
  good = dict(values=BASE[0], init=BASE[1], membership=np.full((n - 1, k, q), 0.5),
              emission=np.full((n - 1, q, k), 1 / 3), costs=BASE[3])
  how = data.draw(st.sampled_from(["nan", "rows", "shape"]))
  fields = ["membership", "emission", "init"] + (["values"] if how != "rows" else [])
  field = data.draw(st.sampled_from(fields))
  arr = np.asarray(good[field], np.float64).copy()
  if how == "nan":
    arr.flat[data.draw(st.integers(0, arr.size - 1))] = np.nan
  elif how == "rows":
    arr.flat[data.draw(st.integers(0, arr.size - 1))] += data.draw(st.floats(0.01, 0.5))
  else:
    arr = arr[..., :-1] if arr.ndim > 1 else arr[:-1]
  good[field] = arr
  # A shape mismatch may be reported against the field it disagrees with.
  names = (field,) if how != "shape" else ("membership", "emission", "values", "init")
  expect_error("aggregated.invalid", lambda: tj.core.AggregatedCascade(**good), *names)


@settings(max_examples=80)
@given(st.data())
def test_invalid_policy_constructors_raise(data):
  case = data.draw(st.sampled_from(["recall_nan", "recall_values", "recall_lam", "recall_shape",
                                    "no_recall", "threshold", "patience", "fixed", "mixture",
                                    "discretiser", "graph_policy", "observation", "conf"]))
  idx, vals = np.zeros((3, 2)), np.ones((3, 2))
  if case == "recall_nan":
    bad = idx.copy()
    bad[data.draw(st.integers(0, 2)), data.draw(st.integers(0, 1))] = np.nan
    expect_error("policy_ctor.invalid", lambda: tj.core.RecallPolicy(index=bad, values=vals, lam=0.5), "index")
  elif case == "recall_values":
    bad = vals.copy()
    bad[0, 0] = data.draw(st.sampled_from([-1.0, np.nan, np.inf]))
    expect_error("policy_ctor.invalid", lambda: tj.core.RecallPolicy(index=idx, values=bad, lam=0.5), "values")
  elif case == "recall_lam":
    lam = data.draw(st.sampled_from([np.nan, -0.5, 1.5, "a", None]))
    expect_error("policy_ctor.invalid", lambda: tj.core.RecallPolicy(index=idx, values=vals, lam=lam), "lam")
  elif case == "recall_shape":
    bad = data.draw(st.sampled_from([np.zeros(3), np.zeros((3, 3)), np.zeros((0, 2))]))
    expect_error("policy_ctor.invalid", lambda: tj.core.RecallPolicy(index=bad, values=vals, lam=0.5),
                 "index", "values")
  elif case == "no_recall":
    bad = data.draw(st.sampled_from([np.full((3, 2), 0.5), np.zeros(3, bool), np.full((3, 2), "x")]))
    expect_error("policy_ctor.invalid", lambda: tj.core.NoRecallPolicy(stop=bad), "stop")
  elif case == "threshold":
    bad = data.draw(st.sampled_from([[np.nan, 0.5], [], "x", [[]]]))
    expect_error("policy_ctor.invalid", lambda: tj.core.ThresholdPolicy(thresholds=bad), "thresholds")
  elif case == "patience":
    bad = data.draw(st.sampled_from([0, -3, 1.5, "x"]))
    expect_error("policy_ctor.invalid", lambda: tj.core.PatiencePolicy(bad, 3), "patience")
  elif case == "fixed":
    bad = data.draw(st.sampled_from([-1, 3, 7, 0.5]))
    expect_error("policy_ctor.invalid", lambda: tj.core.FixedExitPolicy(bad, 3), "exit_stage")
  elif case == "mixture":
    first = data.draw(st.sampled_from([None, "policy", 3]))
    expect_error("policy_ctor.invalid", lambda: tj.core.MixturePolicy(
        first=first, second=tj.core.FixedExitPolicy(0, 3), prob_second=0.5,
        key=jax.random.PRNGKey(0)), "first")
  elif case == "discretiser":
    bad = data.draw(st.sampled_from([np.array([[0.5, 0.1]]), np.array([[np.nan]]),
                                     np.zeros((0, 2)), np.array([[1e39]]), np.zeros(3)]))
    expect_error("policy_ctor.invalid", lambda: tj.data.Discretiser(edges=bad), "edges")
  elif case == "graph_policy":
    g = tj.core.line_graph(tj.demo_cascade(3, 2))
    sol = tj.core.solve_graph_recall(g, 0.5)
    field = data.draw(st.sampled_from(["successor", "entry", "grid"]))
    kw = dict(index=sol.index, successor=sol.successor, grid=sol.grid, values=g.values,
              lam=jnp.asarray(0.5), entry=sol.entry)
    kw[field] = {"successor": np.full(np.shape(sol.successor), 9), "entry": np.asarray(5),
                 "grid": np.asarray(sol.grid)[::-1]}[field]
    expect_error("policy_ctor.invalid", lambda: tj.core.GraphPolicy(**kw), field)
  elif case == "observation":
    expect_error("policy_ctor.invalid", lambda: tj.core.StageObservation(
        state=np.zeros(3, np.int32), score=np.zeros(4), pred=np.zeros(3, np.int32)), "score")
  else:
    bad = data.draw(st.sampled_from(["x", None, [0.5, 0.6]]))
    expect_error("policy_ctor.invalid", lambda: tj.confidence_threshold(bad, 3), "threshold")


@settings(max_examples=40)
@given(st.data())
def test_invalid_network_sizes_raise(data):
  rngs = nnx.Rngs(0)
  bad = data.draw(st.sampled_from([0, -2, 1.5, "4", None]))
  case = data.draw(st.sampled_from(["mlp_hidden", "mlp_classes", "mlp_blocks", "mlp_shape",
                                    "cnn_channels", "cnn_classes", "tr_vocab", "tr_dim"]))
  MLP, Transformer = tj.networks.EarlyExitMLP, tj.networks.EarlyExitTransformer
  if case == "mlp_hidden":
    expect_error("nn_ctor.invalid", lambda: MLP((4,), 3, hidden=bad, num_blocks=2, rngs=rngs), "hidden")
  elif case == "mlp_classes":
    expect_error("nn_ctor.invalid", lambda: MLP((4,), bad, hidden=4, num_blocks=2, rngs=rngs), "num_classes")
  elif case == "mlp_blocks":
    expect_error("nn_ctor.invalid", lambda: MLP((4,), 3, hidden=4, num_blocks=bad, rngs=rngs), "num_blocks")
  elif case == "mlp_shape":
    shape = data.draw(st.sampled_from([(0,), (-1, 2), "ab", 5, (), (1.5,)]))
    expect_error("nn_ctor.invalid", lambda: MLP(shape, 3, hidden=4, num_blocks=2, rngs=rngs), "input_shape")
  elif case == "cnn_channels":
    ch = data.draw(st.sampled_from([(0,), (4, -1), (), "ab", (2.5,)]))
    expect_error("nn_ctor.invalid", lambda: tj.EarlyExitCNN((8, 8, 1), 3, channels=ch, rngs=rngs), "channels")
  elif case == "cnn_classes":
    expect_error("nn_ctor.invalid", lambda: tj.EarlyExitCNN((8, 8, 1), bad, channels=(2,), rngs=rngs), "num_classes")
  elif case == "tr_vocab":
    expect_error("nn_ctor.invalid",
                 lambda: Transformer(bad, 4, 2, dim=8, num_heads=2, num_blocks=1, mlp_dim=8, rngs=rngs),
                 "vocab_size")
  else:
    expect_error("nn_ctor.invalid",
                 lambda: Transformer(5, 4, 2, dim=bad, num_heads=2, num_blocks=1, mlp_dim=8, rngs=rngs), "dim")


# ------------------------------------------------------------------ solvers
BAD_LAMS = [np.nan, np.inf, -np.inf, -0.1, 1.0001, 2.0, "0.5", None, np.array([0.5]), 0.5 + 0j]


@settings(max_examples=80)
@given(st.sampled_from(BAD_LAMS), st.sampled_from([
    "solve_recall", "solve_no_recall", "prophet_value", "recall_policy", "no_recall_policy",
    "monte_carlo", "sweep", "soft", "graph", "consult", "hindsight", "aggregated"]))
def test_invalid_lam_raises_everywhere(lam, fn):
  c = tj.demo_cascade(3, 3)
  key = jax.random.PRNGKey(0)
  calls = {
      "solve_recall": lambda: tj.solve_recall(c, lam),
      "solve_no_recall": lambda: tj.solve_no_recall(c, lam),
      "prophet_value": lambda: tj.prophet_value(c, lam),
      "recall_policy": lambda: tj.recall_policy(c, lam),
      "no_recall_policy": lambda: tj.core.no_recall_policy(c, lam),
      "monte_carlo": lambda: tj.monte_carlo(key, c, tj.recall_policy(c, 0.5), lam, 10),
      "sweep": lambda: tj.sweep(c, [0.5, lam] if not isinstance(lam, np.ndarray) else lam[:, None, None]),
      "soft": lambda: tj.soft_solve_recall(c, lam, 0.1),
      "graph": lambda: tj.solve_recall(tj.core.line_graph(c), lam),
      "consult": lambda: tj.consult_probabilities(c, lam),
      "hindsight": lambda: tj.hindsight_policy(np.zeros((2, 3)), np.zeros(3), lam),
      "aggregated": lambda: tj.core.solve_recall_aggregated(tj.core.aggregate_cascade(c, 3)[0], lam),
  }
  expect_error("lam.invalid", calls[fn], "lam")


@settings(max_examples=40)
@given(st.sampled_from([None, "cascade", BASE[0], {"values": 1}, 3.0]), st.sampled_from([
    "solve_recall", "solve_no_recall", "prophet_value", "monte_carlo", "sample_states",
    "sweep", "soft", "aggregate", "policy_metrics", "replay_cascade"]))
def test_solvers_refuse_non_cascades(obj, fn):
  key = jax.random.PRNGKey(0)
  p = tj.recall_policy(tj.demo_cascade(3, 3), 0.5)
  calls = {
      "solve_recall": lambda: tj.solve_recall(obj, 0.5),
      "solve_no_recall": lambda: tj.solve_no_recall(obj, 0.5),
      "prophet_value": lambda: tj.prophet_value(obj, 0.5),
      "monte_carlo": lambda: tj.monte_carlo(key, obj, p, 0.5, 10),
      "sample_states": lambda: tj.core.sample_states(key, obj, 10),
      "sweep": lambda: tj.sweep(obj, [0.5]),
      "soft": lambda: tj.soft_solve_recall(obj, 0.5, 0.1),
      "aggregate": lambda: tj.core.aggregate_cascade(obj, 2),
      "policy_metrics": lambda: tj.policy_metrics(obj, p),
      "replay_cascade": lambda: tj.core.replay_cascade(p, obj, np.zeros((2, 3), np.int32)),
  }
  expect_error("solver.non_cascade", calls[fn], "cascade", "graph", "agg")


@pytest.mark.parametrize("kwargs, name", [
    (dict(x_chunk=0), "x_chunk"), (dict(x_chunk=1.5), "x_chunk"), (dict(aggregate_above=-1), "aggregate_above"),
    (dict(aggregate_above=2, num_meta=0), "num_meta")])
def test_invalid_solver_options_raise(kwargs, name):
  expect_error("solver.non_cascade", lambda: tj.solve_recall(tj.demo_cascade(3, 4), 0.5, **kwargs), name)


def test_invalid_prophet_and_soft_options_raise():
  c = tj.demo_cascade(3, 3)
  for bad in (0, -1, 2.5):
    expect_error("solver.non_cascade", lambda: tj.prophet_value(c, 0.5, chunk_size=bad), "chunk_size")
  for beta in (-1.0, np.nan, np.inf, [0.1]):
    expect_error("solver.non_cascade", lambda: tj.soft_solve_recall(c, 0.5, beta), "beta")
  for q in (0, 4, 1.5):
    expect_error("solver.non_cascade", lambda: tj.core.aggregate_cascade(c, q), "num_meta")
