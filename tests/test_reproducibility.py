"""Same seed -> bit-identical traces, fits, policies, files and reports (same machine).

docs/formulation.md section 8 says what may differ on other hardware. Every
artefact here is produced twice from scratch and compared byte for byte.
"""

import contextlib
import hashlib
import io
import json

import jax
import numpy as np
from flax import nnx
from fuzzing import record

import ttamer_jax as tj
from ttamer_jax.app import cli


def sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def assert_trees_identical(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()     # bit-identical, NaN-safe


def _traces(seed):
  cascade = tj.overthinking_cascade(num_stages=4, num_states=8)
  return tj.workload_traces(jax.random.PRNGKey(seed), cascade, 800)


def _deployed(traces, lam=0.9):
  fitted = tj.fit_cascade(traces, 6)
  return fitted, tj.DeployedPolicy(policy=tj.recall_policy(fitted.cascade, lam),
                                   discretiser=fitted.discretiser, score_name="scores")


def test_sampled_traces_fits_and_policies_are_bit_identical():
  a, b = _traces(3), _traces(3)
  assert_trees_identical(a, b)
  fa, da = _deployed(a)
  fb, db = _deployed(b)
  assert_trees_identical(fa.cascade, fb.cascade)
  assert_trees_identical(da, db)
  assert_trees_identical(tj.solve_recall(fa.cascade, 0.7), tj.solve_recall(fb.cascade, 0.7))
  assert_trees_identical(tj.replay_traces(da, a), tj.replay_traces(db, b))
  # A different seed really changes the data (the comparison above is not vacuous).
  assert not np.array_equal(np.asarray(_traces(4).scores), np.asarray(a.scores))
  record("repro.bit_identical", "identical")


def test_monte_carlo_and_sweeps_are_bit_identical():
  c = tj.random_cascade(jax.random.PRNGKey(1), 4, 6)
  p = tj.recall_policy(c, 0.6)
  runs = [tj.monte_carlo(jax.random.PRNGKey(9), c, p, 0.6, 5000) for _ in range(2)]
  assert_trees_identical(runs[0], runs[1])
  sweeps = [tj.sweep(c, np.linspace(0, 1, 17)) for _ in range(2)]
  assert_trees_identical(sweeps[0], sweeps[1])
  record("repro.bit_identical", "identical")


def test_files_are_bit_identical(tmp_path, monkeypatch):
  monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")   # 2026-01-01: fit_date of the policy
  traces = _traces(5)
  _, deployed = _deployed(traces)
  digests = []
  for run in ("a", "b"):
    d = tmp_path / run
    d.mkdir()
    tj.save_traces(d / "t.npz", _traces(5))
    tj.save_cascade(d / "c.npz", tj.fit_cascade(traces, 6).cascade)
    tj.save_policy(d / "p.npz", deployed)
    digests.append([sha(d / name) for name in ("t.npz", "c.npz", "p.npz")])
  assert digests[0] == digests[1]
  _, meta = tj.load_policy(tmp_path / "a" / "p.npz", with_metadata=True)
  assert meta["fit_date"].startswith("2026-01-01")
  record("repro.bit_identical", "identical")


def test_training_profiling_and_checkpoints_are_bit_identical(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 16)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  digests, traces = [], []
  for run in range(2):
    model = tj.networks.EarlyExitMLP((16,), 2, hidden=16, num_blocks=3, rngs=nnx.Rngs(7))
    tj.train(model, x, y, tj.networks.TrainConfig(num_steps=20, batch_size=32, seed=7), progress=False)
    path = tmp_path / f"m{run}.npz"
    tj.save_checkpoint(path, model)
    digests.append(sha(path))
    traces.append(tj.collect_traces(model, x, y, cost="flops"))
  assert digests[0] == digests[1]
  assert_trees_identical(traces[0], traces[1])
  record("repro.bit_identical", "identical")


def _cli_json(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(argv) == 0
  return out.getvalue()


def test_cli_reports_and_policy_files_are_bit_identical(tmp_path, monkeypatch):
  monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
  tj.save_traces(tmp_path / "cal.npz", _traces(6))
  tj.save_traces(tmp_path / "test.npz", _traces(7))
  reports = []
  for run in ("a", "b"):
    policy = str(tmp_path / f"{run}.npz")
    fit = _cli_json(["fit", str(tmp_path / "cal.npz"), "--states", "6", "--lam", "0.9",
                     "--out", policy, "--json"])
    ev = _cli_json(["evaluate", policy, str(tmp_path / "test.npz"), "--resamples", "200",
                    "--seed", "3", "--json"])
    reports.append((json.loads(fit), json.loads(ev), sha(policy)))
  fit_a, fit_b = reports[0][0], reports[1][0]
  ev_a, ev_b = reports[0][1], reports[1][1]
  for report in (fit_a, fit_b, ev_a, ev_b):    # the two runs write to different paths
    report.pop("policy", None)
  assert fit_a == fit_b
  assert ev_a == ev_b
  assert reports[0][2] == reports[1][2]
  record("repro.bit_identical", "identical")
