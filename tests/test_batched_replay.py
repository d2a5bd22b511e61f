"""Replays of policy grids (``replay_totals``) and request-count buckets.

The reference is the one-policy replay (``tj.replay``), itself checked against brute
force over every path in test_simulation.py: a grid's sums must equal the sums of its
policies replayed one at a time, whatever the block and padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax.core import replay as replay_module
from ttamer_jax.core.shapes import bucket_size


def _requests(seed, num, n, k):
  rng = np.random.default_rng(seed)
  states = rng.integers(0, k, (num, n)).astype(np.int32)
  losses = rng.integers(0, 2, (num, n)).astype(np.float32)  # 0/1: ties in the answers
  scores = rng.random((num, n)).astype(np.float32)
  preds = rng.integers(0, 3, (num, n)).astype(np.int32)
  return states, losses, scores, preds


def _one_at_a_time(policies, size, axes, states, losses, costs, scores, preds):
  n = states.shape[1]
  rows = []
  for p in range(size):
    one = jax.tree_util.tree_map(lambda ax, sub: sub if ax is None else jax.tree_util.tree_map(
        lambda x: x[p], sub), axes, policies, is_leaf=lambda x: x is None)
    res = tj.replay(one, states, losses, costs, scores=scores, preds=preds)
    stop, answer = np.asarray(res.stop_stage), np.asarray(res.answer_stage)
    rows.append((np.asarray(res.loss, np.float64).sum(), np.asarray(res.cost, np.float64).sum(),
                 np.bincount(stop, minlength=n), np.bincount(answer, minlength=n),
                 np.bincount(answer[answer < stop], minlength=n)))
  return [np.stack(x) for x in zip(*rows)]


def _assert_totals_equal(tot, expected, num):
  loss, cost, stops, answers, recalled = expected
  assert float(tot.num) == num
  np.testing.assert_array_equal(tot.stop_counts, stops)
  np.testing.assert_array_equal(tot.answer_counts, answers)
  np.testing.assert_array_equal(tot.recalled_counts, recalled)
  np.testing.assert_allclose(tot.loss, loss, rtol=1e-6)   # 0/1 losses: sums are exact counts
  np.testing.assert_allclose(tot.cost, cost, rtol=1e-5)


@pytest.mark.parametrize("num,block_elements", [(1, 1 << 15), (1000, 1 << 12), (777, 1 << 20)])
def test_lam_grid_sharing_values_equals_one_policy_at_a_time(num, block_elements, monkeypatch):
  """Blocks that split the requests unevenly (padding rows weigh nothing) and one request."""
  monkeypatch.setattr(replay_module, "GRID_BLOCK_ELEMENTS", block_elements)
  n, k = 5, 4
  cascade = tj.random_cascade(jax.random.PRNGKey(3), n, k)
  lams = np.linspace(0.05, 0.95, 9)
  index = jnp.stack([tj.solve_recall(cascade, lam).index for lam in lams])
  grid = tj.core.RecallPolicy(index=index, values=cascade.values, lam=jnp.asarray(lams, jnp.float32))
  axes = tj.core.RecallPolicy.lam_grid_axes()
  states, losses, scores, preds = _requests(0, num, n, k)
  costs = np.random.default_rng(1).random((num, n)).astype(np.float32)  # per-request costs
  tot = tj.core.replay_totals(grid, states, losses, costs, policy_axes=axes)
  _assert_totals_equal(tot, _one_at_a_time(grid, len(lams), axes, states, losses, costs, None, None),
                       num)


def test_heuristic_grids_with_carries_equal_one_policy_at_a_time(monkeypatch):
  monkeypatch.setattr(replay_module, "GRID_BLOCK_ELEMENTS", 1 << 10)
  n, num = 4, 600
  states, losses, scores, preds = _requests(1, num, n, 2)
  costs = np.array([1.0, 2.0, 0.5, 4.0], np.float32)
  grids = [tj.core.PatiencePolicy(patience=np.arange(1, n + 1), num_stages=n),
           tj.core.ThresholdPolicy(thresholds=np.linspace(0, 1, 7)[:, None].repeat(n, 1)),
           tj.core.FixedExitPolicy(exit_stage=np.arange(n), num_stages=n)]
  for grid in grids:
    size = jax.tree_util.tree_leaves(grid)[0].shape[0]
    tot = tj.core.replay_totals(grid, states, losses, costs, scores=scores, preds=preds)
    _assert_totals_equal(tot, _one_at_a_time(grid, size, 0, states, losses, costs, scores, preds),
                         num)


def test_no_recall_grid_equals_one_policy_at_a_time():
  n, k, num = 4, 3, 300
  cascade = tj.random_cascade(jax.random.PRNGKey(5), n, k)
  stop = jnp.stack([tj.solve_no_recall(cascade, lam).stop for lam in (0.1, 0.5, 0.9)])
  grid = tj.core.NoRecallPolicy(stop=stop)
  states, losses, _, _ = _requests(2, num, n, k)
  costs = np.ones(n, np.float32)
  tot = tj.core.replay_totals(grid, states, losses, costs)
  _assert_totals_equal(tot, _one_at_a_time(grid, 3, 0, states, losses, costs, None, None), num)


def test_replay_totals_rejects_what_it_cannot_sum_naming_the_field():
  n = 3
  states, losses, scores, preds = _requests(0, 10, n, 2)
  costs = np.ones(n)
  cascade = tj.random_cascade(jax.random.PRNGKey(0), n, 2)
  with pytest.raises(ValueError, match="policies: a HindsightPolicy is replayed one at a time"):
    tj.core.replay_totals(tj.hindsight_policy(losses, costs, 0.5), states, losses, costs)
  mixture = tj.core.MixturePolicy(first=tj.recall_policy(cascade, 0.2),
                             second=tj.recall_policy(cascade, 0.8), prob_second=0.5,
                             key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="policies: a MixturePolicy"):
    tj.core.replay_totals(mixture, states, losses, costs)
  with pytest.raises(ValueError, match="different grid sizes"):
    tj.core.replay_totals(tj.core.RecallPolicy(index=jnp.zeros((2, n, 2)), values=jnp.zeros((3, n, 2)),
                                     lam=jnp.zeros(2)), states, losses, costs)
  with pytest.raises(ValueError, match="policy_axes: .*not an in_axes prefix"):
    tj.core.replay_totals(tj.recall_policy(cascade, 0.5), states, losses, costs,
                     policy_axes=(0, None))
  with pytest.raises(ValueError, match=r"losses\[1, 2\] is nan"):
    bad = losses.copy()
    bad[1, 2] = np.nan
    tj.core.replay_totals(tj.core.FixedExitPolicy(exit_stage=np.arange(n), num_stages=n), states, bad, costs)
  with pytest.raises(ValueError, match="states: has 4 stages"):
    tj.core.replay_totals(tj.core.FixedExitPolicy(exit_stage=np.arange(n), num_stages=n),
                     np.zeros((10, 4), np.int32), np.zeros((10, 4)), np.ones(4))


def test_bucket_sizes_cover_the_batch_with_at_most_an_eighth_extra():
  sizes = [bucket_size(num) for num in range(1, 5000)]
  assert all(s >= num for num, s in zip(range(1, 5000), sizes))
  assert all(s <= max(64, num * 9 / 8) for num, s in zip(range(1, 5000), sizes))
  assert sizes == sorted(sizes)
  assert len(set(sizes)) < 60  # a few dozen compiled shapes for every batch up to 5000


def test_replay_compiles_once_per_bucket_and_padding_changes_nothing():
  n, k = 4, 3
  cascade = tj.random_cascade(jax.random.PRNGKey(1), n, k)
  policy = tj.recall_policy(cascade, 0.4)
  states, losses, _, _ = _requests(4, 1100, n, k)
  costs = np.ones(n, np.float32)
  assert bucket_size(1030) == bucket_size(1100)
  tj.replay(policy, states[:1030], losses[:1030], costs)
  before = replay_module.replay_compiled._cache_size()
  res = tj.replay(policy, states, losses, costs)
  assert replay_module.replay_compiled._cache_size() == before  # same bucket: no new compile
  assert res.stop_stage.shape == (1100,)
  head = tj.replay(policy, states[:7], losses[:7], costs)       # padded 7 -> 64 rows
  np.testing.assert_array_equal(head.stop_stage, res.stop_stage[:7])
  np.testing.assert_array_equal(head.loss, res.loss[:7])


def test_a_new_but_equal_policy_axes_does_not_recompile():
  """``lam_grid_axes()`` builds a new pytree each call; equal axes must reuse the
  compiled grid replay (they once recompiled on every call: 82 compilations in one
  ``fit_policy``)."""
  n, k = 4, 3
  cascade = tj.random_cascade(jax.random.PRNGKey(5), n, k)
  lams = np.linspace(0.1, 0.9, 4)
  index = jnp.stack([tj.solve_recall(cascade, lam).index for lam in lams])
  grid = tj.core.RecallPolicy(index=index, values=cascade.values, lam=jnp.asarray(lams, jnp.float32))
  states, losses, scores, preds = _requests(9, 100, n, k)
  costs = np.asarray(cascade.costs)
  first = tj.core.replay_totals(grid, states, losses, costs, policy_axes=tj.core.RecallPolicy.lam_grid_axes())
  before = replay_module._replay_totals._cache_size()
  again = tj.core.replay_totals(grid, states, losses, costs, policy_axes=tj.core.RecallPolicy.lam_grid_axes())
  assert replay_module._replay_totals._cache_size() == before
  np.testing.assert_array_equal(first.stop_counts, again.stop_counts)
