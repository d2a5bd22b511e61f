"""Skip-lines, trees and DAGs: graph solver against the line solver, brute force
over histories, exact enumeration of the policy, and Monte-Carlo."""

import itertools

import jax
import numpy as np
import pytest
import reference as ref

import ttamer_jax as tj


def _random_tree(rng, k=2):
  # Router 0 with two specialists 1, 2; node 3 refines specialist 1.
  parents = [0, 0, 1]
  values = rng.uniform(0, 1, (4, k))
  trans = rng.dirichlet(np.ones(k), size=(3, k))
  return tj.tree_graph(values, parents, trans, rng.uniform(0, 0.2, 3), rng.dirichlet(np.ones(k)), 0.05)


def _diamond(rng, k=3):
  values = rng.uniform(0, 1, (4, k))
  trans = rng.dirichlet(np.ones(k), size=(4, k))
  return tj.RoutingGraph(values=values, edge_trans=trans, edge_costs=rng.uniform(0, 0.2, 4),
                         entry_init=rng.dirichlet(np.ones(k), size=2), entry_costs=[0.05, 0.3],
                         edge_src=(0, 0, 1, 2), edge_dst=(1, 2, 3, 3), entry_nodes=(0, 1))


@pytest.mark.parametrize("seed", range(4))
def test_line_as_graph_equals_line_solver(seed):
  c = tj.random_cascade(jax.random.PRNGKey(seed), 5, 4)
  g = tj.core.line_graph(c)
  for lam in (0.0, 0.3, 0.8, 1.0):
    line = tj.solve_recall(c, lam)
    graph = tj.solve_recall(g, lam)
    np.testing.assert_allclose(graph.value, line.value, rtol=1e-6)
    np.testing.assert_allclose(graph.index, line.index, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_graphs_match_brute_force_float64(seed):
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    c = ref.tiny_cascade(rng, 4, 2)
    graphs = [tj.skip_line(c, block_costs=rng.uniform(0, 0.1, 4), head_costs=rng.uniform(0, 0.1, 4)),
              tj.skip_line(c, block_costs=rng.uniform(0, 0.1, 4), head_costs=rng.uniform(0, 0.3, 4),
                           skip_first=True),
              _random_tree(rng), _diamond(rng)]
    for g in graphs:
      for lam in (0.2, 0.6, 1.0):
        assert abs(float(tj.solve_recall(g, lam).value) - ref.brute_graph_recall(g, lam)) <= 1e-9


def test_skip_line_with_free_heads_equals_line_and_costly_heads_help_skipping():
  c = tj.random_cascade(jax.random.PRNGKey(7), 5, 3)
  lam = 0.5
  free = tj.skip_line(c)  # heads cost nothing: skipping saves nothing
  np.testing.assert_allclose(tj.solve_recall(free, lam).value, tj.solve_recall(c, lam).value, rtol=1e-6)
  block = np.full(5, 0.02)
  head = np.full(5, 0.2)
  line = tj.Cascade.from_arrays(c.values, c.init, c.trans, block + head)
  skip = tj.skip_line(c, block, head)
  assert float(tj.solve_recall(skip, lam).value) < float(tj.solve_recall(line, lam).value) - 1e-4


def _enumerated_objective(policy, graph, cascade_like_probs, lam):
  paths, probs = cascade_like_probs
  res = tj.core.replay_graph(policy, graph, paths)
  return float(np.sum(probs * np.asarray(res.objective(lam), np.float64)))


def test_graph_policy_exact_expectation_equals_value_on_skip_line():
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    c = ref.tiny_cascade(rng, 4, 3)
    g = tj.skip_line(c, block_costs=rng.uniform(0, 0.05, 4), head_costs=rng.uniform(0, 0.2, 4),
                     skip_first=True)
    enum = ref.path_probabilities(c)
    for lam in (0.3, 0.7, 1.0):
      policy = tj.core.graph_policy(g, lam)
      assert abs(_enumerated_objective(policy, g, enum, lam) - float(tj.solve_recall(g, lam).value)) <= 1e-9


def test_tree_policy_exact_expectation_equals_value():
  rng = np.random.default_rng(12)
  with jax.enable_x64(True):
    g = _random_tree(rng, k=3)
    # The tree's joint law: parent-to-child transitions along every edge.
    paths = np.array(list(itertools.product(range(3), repeat=4)))
    probs = np.asarray(g.entry_init[0])[paths[:, 0]]
    for e, (u, w) in enumerate(zip(g.edge_src, g.edge_dst)):
      probs = probs * np.asarray(g.edge_trans[e])[paths[:, u], paths[:, w]]
    for lam in (0.25, 0.75):
      policy = tj.core.graph_policy(g, lam)
      assert abs(_enumerated_objective(policy, g, (paths, probs), lam)
                 - float(tj.solve_recall(g, lam).value)) <= 1e-9


@pytest.mark.parametrize("seed", range(2))
def test_dag_monte_carlo_agrees_with_value(seed):
  g = _diamond(np.random.default_rng(seed))
  for lam in (0.4, 0.9):
    policy = tj.core.graph_policy(g, lam)
    res = tj.core.simulate_graph(jax.random.PRNGKey(seed), g, policy, 200_000)
    obj = np.asarray(res.objective(lam), np.float64)
    se = obj.std(ddof=1) / np.sqrt(obj.size)
    assert abs(obj.mean() - float(tj.solve_recall(g, lam).value)) <= 4 * se


def test_graph_policy_decide_inside_jit():
  g = _diamond(np.random.default_rng(0))
  policy = tj.core.graph_policy(g, 0.5)
  stop, nxt = jax.jit(policy.decide)(0, 1, 0.9)
  assert stop.dtype == bool and int(nxt) in (1, 2)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(edge_src=(1,), edge_dst=(0,)), r"edge 0 \(1 -> 0\).*topological"),
    (dict(edge_src=(0, 0), edge_dst=(1, 1)), r"edge 1 \(0 -> 1\): duplicate"),
    (dict(edge_src=(0,), edge_dst=(5,)), r"edge 0 \(0 -> 5\): node outside"),
    (dict(entry_nodes=()), r"entry_nodes"),
    (dict(edge_costs=[-1.0]), r"edge_costs\[0\] = -1.0 is negative"),
    (dict(edge_trans=[[[0.5, 0.6], [0.5, 0.5]]]), r"edge_trans\[0, 0\] sums to 1.1"),
    (dict(entry_init=[[0.5, 0.5], [0.5, 0.5]]), r"entry_init: expected shape \(1, 2\)"),
])
def test_graph_validation(kwargs, pattern):
  base = dict(values=[[0.1, 0.2], [0.3, 0.0]], edge_trans=[[[0.5, 0.5], [0.5, 0.5]]],
              edge_costs=[0.1], entry_init=[[1.0, 0.0]], entry_costs=[0.0],
              edge_src=(0,), edge_dst=(1,), entry_nodes=(0,))
  if "edge_src" in kwargs and len(kwargs["edge_src"]) == 2:
    base.update(edge_trans=[[[0.5, 0.5]] * 2] * 2, edge_costs=[0.1, 0.1])
  base.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    tj.RoutingGraph(**base)


def test_skip_line_rejects_bad_costs():
  c = tj.random_cascade(jax.random.PRNGKey(0), 3, 2)
  with pytest.raises(ValueError, match=r"head_costs\[1\] = -1.0 is negative"):
    tj.skip_line(c, block_costs=np.ones(3), head_costs=[0.0, -1.0, 0.0])
  with pytest.raises(ValueError, match=r"block_costs: expected shape \(3,\)"):
    tj.skip_line(c, block_costs=np.ones(2))
