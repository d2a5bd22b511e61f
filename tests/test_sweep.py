"""Sweeps: agreement with single solves, validation, and sharding over 4 emulated
devices (in a subprocess, since the device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K, I = 4, 5, 3
LAMS = np.linspace(0.0, 1.0, 8)


def _batch(num=I, shared_grid=False):
  keys = jax.random.split(jax.random.PRNGKey(7), num)
  return jax.vmap(lambda k: tj.random_cascade(k, N, K, shared_grid=shared_grid))(keys)


def _with(batch, **fields):
  # A batched Cascade with replaced leaves, bypassing the (unbatched) constructor.
  leaves = [np.asarray(fields.get(f, getattr(batch, f))) for f in ("values", "init", "trans", "costs")]
  return jax.tree.unflatten(jax.tree.structure(batch), leaves)


def _instance(batch, i):
  return tj.Cascade.from_arrays(*(np.asarray(getattr(batch, f))[i]
                                  for f in ("values", "init", "trans", "costs")))


def _single_solves(batch, lam_grid, solver="recall"):
  solve = tj.solve_recall if solver == "recall" else tj.solve_no_recall
  sols = [[solve(_instance(batch, i), float(lam)) for lam in row] for i, row in enumerate(lam_grid)]
  value = np.array([[float(s.value) for s in row] for row in sols])
  table = np.array([[np.asarray(s.index if solver == "recall" else s.stop) for s in row]
                    for row in sols])
  return value, table


@pytest.mark.parametrize("shard", ["auto", "instances", "lams"])
def test_recall_sweep_matches_single_solves(shard):
  batch = _batch()
  result = tj.sweep(batch, LAMS, shard=shard)
  value, index = _single_solves(batch, np.broadcast_to(LAMS, (I, LAMS.size)))
  assert result.value.shape == (I, LAMS.size) and result.index.shape == (I, LAMS.size, N, K)
  assert result.stop is None
  np.testing.assert_allclose(result.value, value, rtol=1e-6, atol=1e-7)
  # Thresholds at lam = 1 are float ties (see solve_recall); compare the rest exactly.
  np.testing.assert_allclose(result.index[:, :-1], index[:, :-1], rtol=1e-6, atol=1e-7)


def test_no_recall_sweep_and_per_instance_lams():
  batch = _batch()
  lam_grid = np.stack([np.linspace(0.1, 0.9, 5) ** (i + 1) for i in range(I)]).astype(np.float32)
  kept = lam_grid.copy()
  result = tj.sweep(batch, lam_grid, solver="no_recall")
  np.testing.assert_array_equal(lam_grid, kept)  # the donated buffer is sweep's own copy
  value, stop = _single_solves(batch, lam_grid, "no_recall")
  assert result.index is None and result.stop.dtype == jnp.bool_
  np.testing.assert_allclose(result.value, value, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(result.stop, stop)


def test_single_cascade_list_of_cascades_and_batch_sizes_agree():
  batch = _batch(2, shared_grid=True)
  cascades = [_instance(batch, i) for i in range(2)]
  from_list = tj.sweep(cascades, LAMS)
  one = tj.sweep(cascades[1], LAMS)
  assert one.value.shape == (LAMS.size,) and one.index.shape == (LAMS.size, N, K)
  np.testing.assert_array_equal(one.value, from_list.value[1])
  for batch_size in (1, 3, 64):
    small = tj.sweep(batch, LAMS, batch_size=batch_size, return_tables=False)
    assert small.index is None
    np.testing.assert_allclose(small.value, from_list.value, rtol=1e-6, atol=1e-7)


def test_distinct_grid_sizes_are_padded_consistently():
  # Instance 0 has 2 distinct losses, instance 1 has N*K: grids padded to one M.
  c0 = tj.core.iid_cascade([0.2, 0.2, 0.2, 0.7, 0.7], np.full(K, 0.2), 0.01, N)
  c1 = _instance(_batch(2), 1)
  result = tj.sweep([c0, c1], LAMS)
  for i, c in enumerate((c0, c1)):
    for j, lam in enumerate(LAMS):
      assert abs(float(result.value[i, j]) - float(tj.solve_recall(c, float(lam)).value)) <= 1e-7


@pytest.mark.parametrize("kind", ["distinct", "ties", "shared", "one instance"])
def test_padded_grids_are_each_instances_own_grid(kind):
  """``kernel.pad_grids`` (one sort of every instance) against ``prepare_grid`` per instance:
  the same grid padded with its top value to the largest bucket, the same first rows."""
  from ttamer_jax.core import kernel
  rng = np.random.default_rng(3)
  values = {"distinct": rng.uniform(size=(6, 4, 5)),
            "ties": rng.integers(0, 4, size=(6, 4, 5)).astype(float) / 4,
            "shared": np.broadcast_to(rng.uniform(size=(4, 5)), (6, 4, 5)).copy(),
            "one instance": rng.uniform(size=(1, 4, 5))}[kind].astype(np.float32)
  if kind == "ties":
    values[2] = 0.5                                  # an instance with one distinct loss
    values[0, 0, 0] = -0.0                           # equal to 0.0: one grid value
  grid, pos = kernel.pad_grids(values)
  singles = [kernel.prepare_grid(v) for v in values]
  m = max(g.size for g, _ in singles)
  assert grid.shape == (len(values), m) and pos.dtype == np.int32
  for i, (g, p) in enumerate(singles):
    np.testing.assert_array_equal(grid[i, :g.size], g)
    assert np.all(grid[i, g.size:] == g[-1])
    np.testing.assert_array_equal(pos[i], p)
    np.testing.assert_array_equal(grid[i][pos[i]], values[i])


def test_no_recompilation_for_new_lams():
  batch = _batch()
  tj.sweep(batch, LAMS)
  compiles = []
  listener = lambda name, *args, **kwargs: compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    tj.sweep(batch, LAMS[::-1].copy())
    tj.sweep(batch, np.full(LAMS.size, 0.3))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "/jax/core/compile/backend_compile_duration" not in compiles


@pytest.mark.parametrize("lams, match", [
    ([0.2, 1.5], r"lam\[0, 1\] = 1.5 is outside \[0, 1\]"),
    ([0.2, np.nan], r"lam\[0, 1\] = nan"),
    (np.zeros((2, 2)), r"lams: expected shape \[L\] or \[3, L\]"),
    (np.zeros((3, 2, 1)), r"lams: expected shape \[L\] or \[3, L\]"),
    (np.zeros((0,)), r"lams: no lam values"),
    (["a", "b"], r"lams: must be a numeric array"),
])
def test_lam_validation(lams, match):
  with pytest.raises(ValueError, match=match):
    tj.sweep(_batch(), lams)


def test_cascade_validation_names_field_and_instance():
  batch = _batch()
  values = np.asarray(batch.values).copy()
  values[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match=r"values\[1, 2, 3\] is nan"):
    tj.sweep(_with(batch, values=values), LAMS)
  trans = np.asarray(batch.trans).copy()
  trans[2, 1, 0] *= 0.5
  with pytest.raises(ValueError, match=r"trans\[2, 1, 0\] sums to"):
    tj.sweep(_with(batch, trans=trans), LAMS)
  costs = np.asarray(batch.costs).copy()
  costs[0, 3] = -1.0
  with pytest.raises(ValueError, match=r"costs\[0, 3\] = -1.0 is negative"):
    tj.sweep(_with(batch, costs=costs), LAMS)
  with pytest.raises(ValueError, match=r"init: expected shape \(3, 5\)"):
    tj.sweep(_with(batch, init=np.asarray(batch.init)[:, :4]), LAMS)
  with pytest.raises(ValueError, match=r"cascades\[1\]: values has shape \(4, 6\)"):
    tj.sweep([_instance(batch, 0), tj.random_cascade(jax.random.PRNGKey(0), N, K + 1)], LAMS)
  with pytest.raises(ValueError, match=r"cascades: expected a Cascade"):
    tj.sweep(np.zeros((N, K)), LAMS)


def test_option_validation():
  batch = _batch()
  with pytest.raises(ValueError, match="solver: expected one of"):
    tj.sweep(batch, LAMS, solver="prophet")
  with pytest.raises(ValueError, match="shard: expected one of"):
    tj.sweep(batch, LAMS, shard="rows")
  with pytest.raises(ValueError, match="batch_size = 0 must be >= 1"):
    tj.sweep(batch, LAMS, batch_size=0)
  with pytest.raises(ValueError, match="mesh: expected a jax.sharding.Mesh"):
    tj.sweep(batch, LAMS, mesh=jax.devices())


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    import ttamer_jax as tj
    assert jax.device_count() == 4, jax.devices()
    keys = jax.random.split(jax.random.PRNGKey(7), 8)
    batch = jax.vmap(lambda k: tj.random_cascade(k, 4, 5))(keys)
    lams = np.linspace(0.0, 1.0, 16)
    out = {}
    for name, cascades, ls, kw in [
        ("instances", batch, lams, dict(shard="instances")),
        ("lams", batch, lams, dict(shard="lams")),
        ("padded", jax.tree.map(lambda a: a[:3], batch), lams[:7], {}),
        ("explicit_mesh", batch, lams, dict(mesh=jax.make_mesh((2, 2), ("a", "b")))),
    ]:
      r = tj.sweep(cascades, ls, **kw)
      out[name] = dict(value=np.asarray(r.value).tolist(), index=np.asarray(r.index).tolist(),
                       devices=len(r.value.sharding.device_set),
                       shards=[list(s.data.shape) for s in r.value.addressable_shards],
                       index_devices=len(r.index.sharding.device_set),
                       index_shards=len({str(s.index) for s in r.index.addressable_shards}))
    print("RESULT" + json.dumps(out))
""")


def test_sharded_sweep_over_4_devices_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])

  keys = jax.random.split(jax.random.PRNGKey(7), 8)
  batch = jax.vmap(lambda k: tj.random_cascade(k, 4, 5))(keys)
  lams = np.linspace(0.0, 1.0, 16)
  assert jax.device_count() == 1
  local = tj.sweep(batch, lams)
  for name in ("instances", "lams", "explicit_mesh"):
    got = out[name]
    np.testing.assert_allclose(got["value"], local.value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got["index"])[:, :-1], local.index[:, :-1],
                               rtol=1e-6, atol=1e-7)
    # Actually distributed: 4 devices, each holding a quarter of the pair grid.
    assert got["devices"] == 4 and got["index_devices"] == 4
    assert got["index_shards"] == 4
    assert all(np.prod(s) == 8 * 16 // 4 for s in got["shards"]), got["shards"]
  assert out["instances"]["shards"] == [[2, 16]] * 4
  assert out["lams"]["shards"] == [[8, 4]] * 4
  # Padded (3 instances x 7 lams over 4 devices): padding is cut off, values unchanged.
  np.testing.assert_allclose(out["padded"]["value"], local.value[:3, :7], rtol=1e-6, atol=1e-7)


def test_multihost_example_runs_two_processes_on_localhost():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "multihost_sweep.py"), "--local", "2",
       "--devices-per-process", "2", "--instances", "4", "--lams", "8", "--states", "6",
       "--stages", "4", "--timeout", "240"],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "processes: 2, devices: 4 (2 per process)" in proc.stdout
  assert "sharded over 4 devices" in proc.stdout and "-> OK" in proc.stdout


@pytest.mark.parametrize("k", [3, 32, 33])
def test_both_table_layouts_of_a_lam_batch_equal_single_solves(k):
  # K <= kernel.SMALL_K solves a lam batch with the batch in the tables' minor axis
  # (elementwise expectation), larger K with it leading (one matrix product): both
  # must give every lam's single solve, values and index.
  from ttamer_jax.core import kernel, solvers  # internal: the two layouts themselves
  assert (k <= kernel.SMALL_K) == (k != 33)
  cascade = tj.random_cascade(jax.random.PRNGKey(k), 4, k)
  grid, pos = kernel.prepare_grid(cascade.values)
  lams = np.linspace(0.05, 0.95, 6).astype(np.float32)
  got = solvers.solve_recall_lams(cascade, lams, grid, pos)
  for i, lam in enumerate(lams):
    one = tj.solve_recall(cascade, float(lam))
    np.testing.assert_allclose(got.value[i], one.value, rtol=1e-6)
    np.testing.assert_allclose(got.index[i, :-1], one.index[:-1], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="batch_last"):
    kernel.backward_scan(jnp.zeros((grid.size, 2)), grid, pos, cascade.values,
                         jnp.zeros((3, 2)), cascade.trans, lambda g, t: g,
                         beta=jnp.float32(0.1), batch_last=True)
