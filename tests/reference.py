"""Independent NumPy references for the solvers (float64, no JAX).

Two families:
  * ``brute_*``: enumerate every state path / history. Exponential; for n <= 4, K <= 3.
    They make no use of the Markov sufficiency of (best-so-far, state).
  * ``numpy_*``: plain dynamic programming written the obvious way, for mid sizes.
"""

from __future__ import annotations

import itertools

import numpy as np


def _arrays(cascade):
  return (np.asarray(cascade.values, np.float64), np.asarray(cascade.init, np.float64),
          np.asarray(cascade.trans, np.float64), np.asarray(cascade.costs, np.float64))


# ----------------------------------------------------------------- brute force
def brute_recall(cascade, lam):
  """Optimal adaptive policy over full histories; answer = best consulted stage."""
  values, init, trans, costs = _arrays(cascade)
  n = values.shape[0]

  def v(hist):
    i = len(hist) - 1
    x = min(lam * values[j, s] for j, s in enumerate(hist))
    if i == n - 1:
      return x
    cont = (1 - lam) * costs[i + 1] + sum(
        p * v(hist + (t,)) for t, p in enumerate(trans[i][hist[-1]]) if p > 0)
    return min(x, cont)

  return (1 - lam) * costs[0] + sum(p * v((s,)) for s, p in enumerate(init) if p > 0)


def brute_no_recall(cascade, lam):
  values, init, trans, costs = _arrays(cascade)
  n = values.shape[0]

  def v(hist):
    i = len(hist) - 1
    x = lam * values[i, hist[-1]]
    if i == n - 1:
      return x
    cont = (1 - lam) * costs[i + 1] + sum(
        p * v(hist + (t,)) for t, p in enumerate(trans[i][hist[-1]]) if p > 0)
    return min(x, cont)

  return (1 - lam) * costs[0] + sum(p * v((s,)) for s, p in enumerate(init) if p > 0)


def brute_prophet(cascade, lam):
  """E over every path of min_k (lam * min_{j<=k} l_j + (1-lam) * (c_1+..+c_k))."""
  values, init, trans, costs = _arrays(cascade)
  n, k = values.shape
  total = 0.0
  for path in itertools.product(range(k), repeat=n):
    p = init[path[0]]
    for i in range(n - 1):
      p *= trans[i][path[i], path[i + 1]]
    if p == 0:
      continue
    best = min(lam * min(values[j, path[j]] for j in range(kk + 1)) + (1 - lam) * costs[:kk + 1].sum()
               for kk in range(n))
    total += p * best
  return total


def path_probabilities(cascade):
  """All ``K**n`` paths and their probabilities: ``([P, n] int, [P] float)``."""
  values, init, trans, _ = _arrays(cascade)
  n, k = values.shape
  paths = np.array(list(itertools.product(range(k), repeat=n)), dtype=np.int64)
  probs = init[paths[:, 0]].copy()
  for i in range(n - 1):
    probs *= trans[i][paths[:, i], paths[:, i + 1]]
  return paths, probs


# ------------------------------------------------------------- NumPy DP
def stage_marginals(cascade):
  """``[n, K]`` distribution of each stage's state: the forward pass of the chain."""
  _, init, trans, _ = _arrays(cascade)
  dist = [init]
  for t in trans:
    dist.append(dist[-1] @ t)
  return np.stack(dist)


def numpy_recall(cascade, lam):
  """Returns (value, stop_table[n][x_value] -> bool[K]) by DP over (x, s)."""
  values, init, trans, costs = _arrays(cascade)
  n, k = values.shape
  grid = np.unique(values)
  row = {g: m for m, g in enumerate(grid)}
  v = np.repeat(lam * grid[:, None], k, axis=1)       # V_n(x, s) = x
  stops = [None] * n
  for i in range(n - 2, -1, -1):
    new = np.empty_like(v)
    stop = np.zeros_like(v, dtype=bool)
    for m, g in enumerate(grid):
      for s in range(k):
        cont = (1 - lam) * costs[i + 1]
        for t in range(k):
          nxt = min(g, values[i + 1, t])
          cont += trans[i][s, t] * v[row[nxt], t]
        new[m, s] = min(lam * g, cont)
        stop[m, s] = lam * g <= cont
    v, stops[i] = new, stop
  value = (1 - lam) * costs[0] + sum(init[s] * v[row[values[0, s]], s] for s in range(k))
  return value, grid, stops


def numpy_no_recall(cascade, lam):
  values, init, trans, costs = _arrays(cascade)
  n, k = values.shape
  w = lam * values[-1]
  stop = np.ones((n, k), bool)
  for i in range(n - 2, -1, -1):
    cont = (1 - lam) * costs[i + 1] + trans[i] @ w
    stop[i] = lam * values[i] <= cont
    w = np.minimum(lam * values[i], cont)
  return (1 - lam) * costs[0] + init @ w, stop


def numpy_prophet(cascade, lam):
  """Forward distribution of (running min of stage totals, state); a different
  algorithm from the library's survival-function integral."""
  values, init, trans, costs = _arrays(cascade)
  n, k = values.shape
  totals = lam * values + (1 - lam) * np.cumsum(costs)[:, None]
  dist = {}
  for s in range(k):
    if init[s] > 0:
      dist[(totals[0, s], s)] = dist.get((totals[0, s], s), 0.0) + init[s]
  for i in range(n - 1):
    new = {}
    for (m, s), p in dist.items():
      for t in range(k):
        q = p * trans[i][s, t]
        if q > 0:
          key = (min(m, totals[i + 1, t]), t)
          new[key] = new.get(key, 0.0) + q
    dist = new
  return sum(m * p for (m, _), p in dist.items())


# ---------------------------------------------------------------- graphs
def brute_graph_recall(graph, lam):
  """Optimal routing over full histories on a RoutingGraph (exponential)."""
  values = np.asarray(graph.values, np.float64)
  edge_trans = np.asarray(graph.edge_trans, np.float64)
  edge_costs = np.asarray(graph.edge_costs, np.float64)
  entry_init = np.asarray(graph.entry_init, np.float64)
  entry_costs = np.asarray(graph.entry_costs, np.float64)
  out = {}
  for e, (u, w) in enumerate(zip(graph.edge_src, graph.edge_dst)):
    out.setdefault(u, []).append((e, w))

  def v(node, state, best):
    x = min(best, lam * values[node, state])
    options = [x]
    for e, w in out.get(node, []):
      options.append((1 - lam) * edge_costs[e] + sum(
          p * v(w, t, x) for t, p in enumerate(edge_trans[e][state]) if p > 0))
    return min(options)

  return min((1 - lam) * entry_costs[r] + sum(
      p * v(w, t, np.inf) for t, p in enumerate(entry_init[r]) if p > 0)
             for r, w in enumerate(graph.entry_nodes))


def tiny_cascade(rng, n, k, *, zero_prob=False, ties=False, zero_costs=False):
  """A random float64 instance with the corner cases the brute force must cover."""
  import ttamer_jax as tj
  values = rng.uniform(0, 1, (n, k))
  if ties:
    values = np.round(values * 2) / 2  # few distinct values, many ties
  init = rng.dirichlet(np.ones(k))
  trans = rng.dirichlet(np.ones(k), size=(max(n - 1, 0), k)).reshape(max(n - 1, 0), k, k)
  if zero_prob and k > 1:
    init[0] = 0.0
    init /= init.sum()
    trans[:, :, 0] = 0.0  # state 0 is unreachable after stage 1
    trans /= trans.sum(-1, keepdims=True)
  costs = np.zeros(n) if zero_costs else rng.uniform(0, 0.2, n)
  return tj.Cascade.from_arrays(values, init, trans, costs)
