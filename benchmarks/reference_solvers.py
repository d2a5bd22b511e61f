"""Reference solvers the benchmark harness times the library against, and checks it with.

Each is the obvious implementation a user would otherwise write: the recall recursion of
docs/DESIGN.md section 3 vectorised in NumPy (one solve, and a batch of cascades x lams),
the same problem as an explicit finite-horizon MDP for a general solver (pymdptoolbox
when installed), and a NumPy Monte-Carlo sampler + replay of the recall policy.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from ttamer_jax.core import kernel


def numpy_solve_recall(values, init, trans, costs, lam):
  """The recursion of DESIGN.md section 3 written the obvious vectorised way in
  NumPy, in the arrays' dtype (float32 like the JAX solver)."""
  n, k = values.shape
  lam = values.dtype.type(lam)
  grid = np.unique(values)
  pos = np.searchsorted(grid, values)
  xs = lam * grid
  cols = np.arange(k)
  v = np.repeat(xs[:, None], k, axis=1)
  for i in range(n - 2, -1, -1):
    at_l = v[pos[i + 1], cols]
    g = np.where(grid[:, None] <= values[i + 1][None, :], v, at_l[None, :])
    cont = (1 - lam) * costs[i + 1] + g @ trans[i].T
    v = np.minimum(xs[:, None], cont)
  return (1 - lam) * costs[0] + init @ v[pos[0], cols]


def explicit_mdp(values, init, trans, costs, lam):
  """The recall problem as a plain finite-horizon MDP for a general solver.

  States ``(stage i, best-so-far row m, state s)`` plus one absorbing terminal
  state; actions 0 = stop (reward ``-lam grid[m]``, go to terminal) and
  1 = continue (reward ``-(1-lam) c_{i+1}``, go to ``(i+1, min(m, pos_{i+1}(t)),
  t)`` with probability ``trans_i[s, t]``; at the last stage it stops). Rewards
  are negated costs (MDP solvers maximise).

  Returns ``(P, R, start)``: two ``[S, S]`` CSR matrices, ``R [S, 2]``, and
  ``start(V)`` mapping the stage-0 value vector to the objective.
  """
  import scipy.sparse as sp
  values, init, trans, costs = (np.asarray(a, np.float64) for a in (values, init, trans, costs))
  # float32 rows sum to 1 within ~1e-7; pymdptoolbox demands 10 float64 epsilons.
  trans = trans / trans.sum(-1, keepdims=True)
  n, k = values.shape
  grid = np.unique(values)
  pos = np.searchsorted(grid, values)
  m = grid.size
  num = n * m * k + 1
  terminal = num - 1
  xs = lam * grid
  state = lambda i, mm, s: (i * m + mm) * k + s
  idx = np.arange(num - 1)
  stop_reward = np.append(-np.tile(np.repeat(xs, k), n), 0.0)
  p_stop = sp.csr_matrix((np.ones(num), (np.arange(num), np.full(num, terminal))), shape=(num, num))
  rows, cols, data = [], [], []
  mm, ss, tt = np.meshgrid(np.arange(m), np.arange(k), np.arange(k), indexing="ij")
  for i in range(n - 1):
    rows.append(state(i, mm, ss).ravel())
    cols.append(state(i + 1, np.minimum(mm, pos[i + 1][tt]), tt).ravel())
    data.append(trans[i][ss, tt].ravel())
  last = idx[idx >= state(n - 1, 0, 0)]
  rows += [last, [terminal]]
  cols += [np.full(last.size, terminal), [terminal]]
  data += [np.ones(last.size), [1.0]]
  p_cont = sp.csr_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(num, num))
  stage_of = idx // (m * k)
  cont_reward = np.append(
      np.where(stage_of < n - 1, -(1 - lam) * costs[np.minimum(stage_of + 1, n - 1)],
               stop_reward[:-1]), 0.0)
  reward = np.stack([stop_reward, cont_reward], axis=1)
  first = state(0, pos[0], np.arange(k))

  def start(v0):
    return (1 - lam) * costs[0] - float(init @ v0[first])

  return [p_stop, p_cont], reward, start, n


def mdp_solver():
  """``(label, solve(P, R, horizon) -> V0)``: pymdptoolbox if installed, else a
  generic sparse backward induction (what FiniteHorizon does internally)."""
  try:
    import mdptoolbox.mdp
  except ImportError:
    def solve(p, r, horizon):
      v = np.zeros(r.shape[0])
      for _ in range(horizon):
        v = np.max(np.stack([r[:, a] + p[a] @ v for a in range(len(p))]), axis=0)
      return v
    return "generic sparse backward induction (pymdptoolbox not installed)", solve

  import scipy.sparse as sp

  class StoredEntriesCSR(sp.csr_matrix):
    """pymdptoolbox's input checks do not scale with sparse transitions: its
    row-sum check subtracts a ``[S]`` vector from the ``[S, 1]`` np.matrix that
    ``P.sum(axis=1)`` returns (a dense ``[S, S]`` broadcast: 19 GB at K = 64),
    and its sign check ``(P >= 0).all()`` makes every implicit zero explicit.
    Both checks mean the same with a flat row sum and the stored entries; the
    solver itself (``FiniteHorizon.run``: one sparse matvec per action and
    step) is untouched."""

    def __ge__(self, other):
      if np.isscalar(other) and other == 0:
        return self.data >= 0  # implicit zeros are >= 0
      return super().__ge__(other)

    def sum(self, axis=None, *args, **kwargs):
      total = super().sum(axis, *args, **kwargs)
      return np.asarray(total).ravel() if axis in (1, -1) else total

  def solve(p, r, horizon):
    p = [m if isinstance(m, StoredEntriesCSR) else StoredEntriesCSR(m) for m in p]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "discount = 1" and scipy.sparse comparison warnings
      fh = mdptoolbox.mdp.FiniteHorizon(p, r, 1.0, horizon)
      fh.run()
    return fh.V[:, 0]
  return "pymdptoolbox FiniteHorizon", solve


def numpy_monte_carlo(seed, values, init, trans, costs, index, lam, num_paths, chunk=1 << 20):
  """Samples paths and replays the recall policy, vectorised over paths in
  NumPy (float32). Returns ``(mean objective, standard error)``."""
  rng = np.random.default_rng(seed)
  n, k = values.shape
  init_cdf = np.cumsum(init)
  trans_cdf = np.cumsum(trans, axis=-1)
  cum_costs = np.cumsum(costs)
  total = total_sq = 0.0
  done = 0
  while done < num_paths:
    b = min(chunk, num_paths - done)
    u = rng.random((n, b), dtype=np.float32)
    s = np.minimum((u[0][:, None] >= init_cdf[None, :]).sum(1), k - 1)
    best = values[0, s]
    stop_stage = np.full(b, n - 1)
    active = np.ones(b, bool)
    for i in range(n):
      if i > 0:
        s = np.minimum((u[i][:, None] >= trans_cdf[i - 1][s]).sum(1), k - 1)
        best = np.where(active, np.minimum(best, values[i, s]), best)
      stop = active & (lam * best <= index[i, s])
      stop_stage = np.where(stop, i, stop_stage)
      active &= ~stop
    obj = lam * best + (1 - lam) * cum_costs[stop_stage]
    total += float(obj.sum(dtype=np.float64))
    total_sq += float((obj.astype(np.float64) ** 2).sum())
    done += b
  mean = total / num_paths
  var = max(total_sq / num_paths - mean * mean, 0.0) * num_paths / max(num_paths - 1, 1)
  return mean, (var / num_paths) ** 0.5


def numpy_sweep(values, init, trans, costs, lams):
  """``[I, L]`` recall values: the recursion of :func:`numpy_solve_recall` vectorised
  over a batch of ``I`` cascades (``values [I, n, K]``, ...) and ``L`` lams at once,
  in the arrays' dtype -- how one would batch it by hand in NumPy."""
  num, n, k = values.shape
  dtype = values.dtype
  grid, pos = kernel.pad_grids(values)                                   # [I, M], [I, n, K]
  grid, lams = grid.astype(dtype), np.asarray(lams, dtype)
  xs = lams[None, :, None] * grid[:, None, :]                            # [I, L, M]
  v = np.repeat(xs[..., None], k, axis=-1)                               # [I, L, M, K]
  inst, lam_ix, cols = np.arange(num)[:, None, None], np.arange(lams.size)[None, :, None], \
      np.arange(k)[None, None, :]
  keep = (1 - lams)[None, :, None, None]
  for i in range(n - 2, -1, -1):
    at_l = v[inst, lam_ix, pos[:, i + 1][:, None, :], cols]              # [I, L, K]
    g = np.where(grid[:, None, :, None] <= values[:, i + 1][:, None, None, :], v,
                 at_l[:, :, None, :])
    cont = keep * costs[:, i + 1][:, None, None, None] + g @ np.swapaxes(trans[:, i], -1, -2)[:, None]
    v = np.minimum(xs[..., None], cont)
  start = v[inst, lam_ix, pos[:, 0][:, None, :], cols]                  # [I, L, K]
  return (1 - lams)[None, :] * costs[:, 0][:, None] + np.einsum("ik,ilk->il", init, start)
