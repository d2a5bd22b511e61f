"""Stage descriptions: constructors, pytree behaviour and boundary validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj


def _valid(n=3, k=2):
  rng = np.random.default_rng(0)
  return dict(values=rng.uniform(0, 1, (n, k)), init=np.full(k, 1 / k),
              trans=np.full((n - 1, k, k), 1 / k), costs=np.full(n, 0.1))


def test_from_arrays_converts_to_default_float():
  c = tj.Cascade.from_arrays(**_valid())
  assert c.values.dtype == jnp.float32 and c.trans.shape == (2, 2, 2)
  assert (c.num_stages, c.num_states) == (3, 2)


def test_single_stage_accepts_no_trans():
  c = tj.Cascade.from_arrays(values=[[0.2, 0.4]], init=[0.5, 0.5], trans=None, costs=[1.0])
  assert c.trans.shape == (0, 2, 2)


def test_iid_cascade_repeats_distribution():
  c = tj.core.iid_cascade(values=[0.0, 0.5, 1.0], probs=[0.2, 0.3, 0.5], costs=0.1, num_stages=4)
  np.testing.assert_allclose(c.trans, np.broadcast_to([0.2, 0.3, 0.5], (3, 3, 3)), rtol=1e-6)
  np.testing.assert_allclose(c.values, np.tile([0.0, 0.5, 1.0], (4, 1)))
  np.testing.assert_allclose(c.costs, np.full(4, 0.1), rtol=1e-6)


def test_random_cascade_is_valid_and_vmappable():
  c = tj.random_cascade(jax.random.PRNGKey(0), 4, 5)
  np.testing.assert_allclose(c.trans.sum(-1), 1.0, atol=1e-5)
  batch = jax.vmap(lambda key: tj.random_cascade(key, 4, 5))(jax.random.split(jax.random.PRNGKey(1), 7))
  assert batch.trans.shape == (7, 3, 5, 5)
  shared = tj.random_cascade(jax.random.PRNGKey(0), 4, 5, shared_grid=True)
  np.testing.assert_allclose(shared.values, np.tile(np.linspace(0, 1, 5), (4, 1)), atol=1e-7)


def test_gap_instance_matches_design():
  c = tj.gap_instance(4.0)
  np.testing.assert_allclose(c.values, [[1 / 16, 1 / 16], [0, 1 / 4]])
  np.testing.assert_allclose(c.trans[0], [[0.75, 0.25], [0.75, 0.25]])
  with pytest.raises(ValueError, match="alpha"):
    tj.gap_instance(1.0)


def test_pytree_roundtrip_skips_validation_inside_jit():
  c = tj.Cascade.from_arrays(**_valid())
  out = jax.jit(lambda c: c.replace(costs=c.costs * 2))(c)
  np.testing.assert_allclose(out.costs, 2 * np.asarray(c.costs))
  leaves = jax.tree_util.tree_leaves(c)
  assert len(leaves) == 4


@pytest.mark.parametrize("field,mutate,pattern", [
    ("init", lambda d: d.update(values=d["values"][:, :1]), r"init: expected shape \(1,\)"),
    ("init", lambda d: d.update(init=np.ones(3) / 3), r"init: expected shape \(2,\)"),
    ("trans", lambda d: d.update(trans=d["trans"][:1]), r"trans: expected shape \(2, 2, 2\)"),
    ("costs", lambda d: d.update(costs=np.ones(2)), r"costs: expected shape \(3,\)"),
    ("values", lambda d: d["values"].__setitem__((1, 0), np.nan), r"values\[1, 0\] is nan"),
    ("values", lambda d: d["values"].__setitem__((2, 1), np.inf), r"values\[2, 1\] is inf"),
    ("values", lambda d: d["values"].__setitem__((0, 1), -0.5), r"values\[0, 1\] = -0.5 is negative"),
    ("costs", lambda d: d["costs"].__setitem__(2, -1.0), r"costs\[2\] = -1.0 is negative"),
    ("costs", lambda d: d["costs"].__setitem__(0, np.nan), r"costs\[0\] is nan"),
    ("init", lambda d: d.update(init=np.array([1.2, -0.2])), r"init\[1\] = -0.2 is negative"),
    ("init", lambda d: d.update(init=np.array([0.5, 0.6])), r"init sums to 1\.1"),
    ("trans", lambda d: d["trans"].__setitem__((1, 1), [0.3, 0.3]), r"trans\[1, 1\] sums to 0\.6"),
    ("trans", lambda d: d["trans"].__setitem__((0, 0, 1), -0.1), r"trans\[0, 0, 1\] = -0.1 is negative"),
    ("trans", lambda d: d["trans"].__setitem__((0, 1, 0), np.nan), r"trans\[0, 1, 0\] is nan"),
    ("values", lambda d: d.update(values=np.zeros((0, 2))), r"n = 0 must be >= 1"),
    ("values", lambda d: d.update(values=np.zeros((3, 0)), init=np.zeros(0),
                                  trans=np.zeros((2, 0, 0))), r"K = 0 must be >= 1"),
    ("values", lambda d: d.update(values=np.zeros(3)), r"values: expected 2 dimensions"),
    ("values", lambda d: d.update(values=np.array([["a", "b"]] * 3)), r"values: must be a numeric array"),
])
def test_bad_input_raises_naming_field(field, mutate, pattern):
  d = _valid()
  mutate(d)
  with pytest.raises(ValueError, match=pattern) as info:
    tj.Cascade(**d)
  assert field in str(info.value)


def test_row_sum_tolerance_is_stated_and_applied():
  d = _valid()
  d["trans"][0, 0] = [0.5 + 5e-6, 0.5]
  tj.Cascade(**d)  # inside the 1e-5 tolerance
  d["trans"][0, 0] = [0.5 + 5e-5, 0.5]
  with pytest.raises(ValueError, match=r"within 1e-05"):
    tj.Cascade(**d)


@pytest.mark.parametrize("solver", [tj.solve_recall, tj.solve_no_recall, tj.prophet_value])
@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan"), float("inf")])
def test_lam_outside_unit_interval_raises(solver, lam):
  c = tj.Cascade.from_arrays(**_valid())
  with pytest.raises(ValueError, match="lam"):
    solver(c, lam)


def test_solver_rejects_non_cascade():
  with pytest.raises(ValueError, match="cascade"):
    tj.solve_no_recall({"values": 1}, 0.5)
