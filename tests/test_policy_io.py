"""Policy files: round trips of every deployable policy, metadata, and bad files."""

import json
import os

import jax
import numpy as np
import pytest

import ttamer_jax as tj

# Internal: the checksummed .npz reader / atomic writer, to hand-edit policy files,
# and the sidecar-path rule (policy.npz -> policy.json), tested directly.
from ttamer_jax.data import archive
from ttamer_jax.data.policy_io import sidecar_path

N = 3


def _traces():
  c = tj.random_cascade(jax.random.PRNGKey(0), N, 4)
  return tj.sample_traces(jax.random.PRNGKey(1), c, 3000)


def _fit(feature=None):
  return tj.fit_cascade(_traces(), 6 if feature else 4, feature=feature)


def _deployed(kind):
  single = tj.data.Discretiser.single_bin(N)
  if kind == "recall":
    return _fit().recall_policy(0.4)
  if kind == "recall_agree":
    return _fit("agree_prev").recall_policy(0.8)
  if kind == "no_recall":
    return _fit().no_recall_policy(0.6)
  if kind == "mixture":
    fit = _fit()
    target = float(tj.policy_metrics(fit.cascade, tj.recall_policy(fit.cascade, 0.6)).loss) + 0.005
    return tj.evaluation.least_cost_policy(fit, target, key=jax.random.PRNGKey(3)).deployed
  policy = {"threshold": tj.per_stage_thresholds([0.2, 0.5, 0.9], direction="below"),
            "patience": tj.core.PatiencePolicy(2, N), "fixed_exit": tj.core.FixedExitPolicy(1, N)}[kind]
  return tj.DeployedPolicy(policy=policy, discretiser=single, score_name="state_score")


KINDS = ["recall", "recall_agree", "no_recall", "mixture", "threshold", "patience", "fixed_exit"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_replays_identically(tmp_path, kind):
  deployed = _deployed(kind)
  path = tmp_path / "policy.npz"
  meta = tj.save_policy(path, deployed, metadata={"model": "resnet-ee", "split": 1})
  assert sorted(os.listdir(tmp_path)) == ["policy.json", "policy.npz"]
  loaded, meta2 = tj.load_policy(path, num_stages=N, with_metadata=True)
  assert meta2 == meta == json.loads((tmp_path / "policy.json").read_text())
  assert type(loaded.policy) is type(deployed.policy)
  assert loaded.score_name == deployed.score_name
  assert loaded.discretiser.feature == deployed.discretiser.feature
  for a, b in zip(jax.tree_util.tree_leaves(deployed), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tr = _traces()
  r1, r2 = tj.replay_traces(deployed, tr), tj.replay_traces(loaded, tr)
  np.testing.assert_array_equal(r1.stop_stage, r2.stop_stage)
  np.testing.assert_array_equal(r1.answer_stage, r2.answer_stage)
  assert meta["format_version"] == tj.POLICY_FORMAT_VERSION and meta["num_stages"] == N
  assert meta["num_states"] == deployed.discretiser.num_states
  assert meta["user"] == {"model": "resnet-ee", "split": 1}
  assert "T" in meta["fit_date"]


def test_metadata_lam_and_dates(tmp_path):
  meta = tj.save_policy(tmp_path / "a.npz", _deployed("recall"), fit_date="2024-05-01T00:00:00Z")
  assert meta["lam"] == pytest.approx(0.4) and meta["fit_date"] == "2024-05-01T00:00:00Z"
  mix = tj.save_policy(tmp_path / "b.npz", _deployed("mixture"))
  assert isinstance(mix["lam"], list) and len(mix["lam"]) == 2
  heur = tj.save_policy(tmp_path / "c.npz", _deployed("patience"), lam=0.3)
  assert heur["lam"] == 0.3 and heur["policy"] == {"type": "patience", "stages": N}
  assert sidecar_path(tmp_path / "c.npz") == str(tmp_path / "c.json")


# ------------------------------------------------------------------ bad files
def test_stage_and_version_mismatch(tmp_path):
  path = tmp_path / "p.npz"
  tj.save_policy(path, _deployed("recall"))
  with pytest.raises(ValueError, match="policy built for 3 stages, but 5 were requested"):
    tj.load_policy(path, num_stages=5)
  fields = archive.read_npz(path, "policy")
  fields["format_version"] = np.asarray(3, np.int64)
  archive.write_npz_atomic(tmp_path / "v3.npz", fields)
  with pytest.raises(ValueError, match="format_version = 3 is not supported.*reads versions 1, 2.*newer"):
    tj.load_policy(tmp_path / "v3.npz")
  meta = json.loads(str(fields["metadata_json"]))
  meta["format_version"] = 7
  fields = archive.read_npz(path, "policy")
  fields["metadata_json"] = np.asarray(json.dumps(meta))
  archive.write_npz_atomic(tmp_path / "m.npz", fields)
  with pytest.raises(ValueError, match="metadata format_version 7 disagrees"):
    tj.load_policy(tmp_path / "m.npz")
  tj.save_traces(tmp_path / "traces.npz", _traces())
  with pytest.raises(ValueError, match="not a policy file"):
    tj.load_policy(tmp_path / "traces.npz")


def _rewrite(path, out, change=None, meta_change=None, drop=None):
  fields = archive.read_npz(path, "policy")
  meta = json.loads(str(fields["metadata_json"]))
  if meta_change:
    meta_change(meta)
  fields["metadata_json"] = np.asarray(json.dumps(meta))
  fields.update(change or {})
  for k in drop or ():
    del fields[k]
  archive.write_npz_atomic(out, fields)
  return out


def test_inconsistent_files_raise(tmp_path):
  path = tmp_path / "p.npz"
  tj.save_policy(path, _deployed("recall"))
  bad = tmp_path / "bad.npz"
  index = np.asarray(archive.read_npz(path, "policy")["policy.index"])
  cases = [
      (dict(change={"policy.index": index[:, :3]}), r"'policy.index' \(3, 3\) and 'policy.values' \(3, 4\)"),
      (dict(change={"policy.index": np.full_like(index, np.nan)}), "'policy.index' holds NaN"),
      (dict(change={"policy.lam": np.asarray(1.5)}), r"'policy.lam' = 1.5 is outside"),
      (dict(change={"edges": np.zeros((2, 3), np.float32)}), "the policy has 3 stages but the discretiser 2"),
      (dict(change={"edges": np.zeros((3, 2), np.float32)}), "the policy has 4 states but the discretiser 3"),
      (dict(change={"edges": np.array([[3, 2, 1]] * 3, np.float32)}), r"field 'edges\[0, 1\]' = 2.0 < edges\[0, 0\]"),
      (dict(change={"extra": np.zeros(2)}), "unexpected field 'extra'"),
      (dict(drop=["policy.values"]), "field 'policy.values' is missing"),
      (dict(drop=["metadata_json"]), "field 'metadata_json' is missing"),
      (dict(meta_change=lambda m: m.update(num_states=9)), "metadata says 3 stages x 9 states"),
      (dict(meta_change=lambda m: m.update(feature="rank")), "metadata feature 'rank' is not one of"),
      (dict(meta_change=lambda m: m.pop("policy")), "metadata field 'policy' is missing"),
      (dict(meta_change=lambda m: m.update(policy={"type": "magic"})), "unknown policy type 'magic'"),
  ]
  for kwargs, match in cases:
    _rewrite(path, bad, **kwargs)
    with pytest.raises(ValueError, match=match):
      tj.load_policy(bad)
  fields = archive.read_npz(path, "policy")
  fields["metadata_json"] = np.asarray("{not json")
  archive.write_npz_atomic(bad, fields)
  with pytest.raises(ValueError, match="'metadata_json' is not valid JSON"):
    tj.load_policy(bad)


def test_corrupt_files_raise(tmp_path):
  deployed = _deployed("mixture")
  path = tmp_path / "p.npz"
  tj.save_policy(path, deployed, sidecar=False)
  raw = path.read_bytes()
  bad = tmp_path / "bad.npz"
  for cut in (0, 100, len(raw) // 2, len(raw) - 1):
    bad.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match="not a readable policy .npz file"):
      tj.load_policy(bad)
  rng = np.random.default_rng(1)
  raised = 0
  for pos in rng.choice(len(raw), 200, replace=False):
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << int(rng.integers(8))
    bad.write_bytes(bytes(flipped))
    try:
      loaded = tj.load_policy(bad)
    except ValueError:
      raised += 1
      continue
    for a, b in zip(jax.tree_util.tree_leaves(deployed), jax.tree_util.tree_leaves(loaded)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert raised > 120


def test_unsupported_and_atomic(tmp_path, monkeypatch):
  tr = _traces()
  oracle = tj.DeployedPolicy(policy=tj.hindsight_policy(tr.losses, tr.costs, 0.5),
                             discretiser=tj.data.Discretiser.single_bin(N), score_name="state_score")
  with pytest.raises(ValueError, match="cannot save a HindsightPolicy"):
    tj.save_policy(tmp_path / "o.npz", oracle)
  with pytest.raises(ValueError, match="metadata: not JSON-serialisable"):
    tj.save_policy(tmp_path / "m.npz", _deployed("recall"), metadata={"x": object()})
  mismatch = tj.DeployedPolicy(policy=tj.recall_policy(tj.random_cascade(jax.random.PRNGKey(0), N, 5), 0.5),
                               discretiser=tj.data.Discretiser.single_bin(N))
  with pytest.raises(ValueError, match="the policy has 5 states but the discretiser 1"):
    tj.save_policy(tmp_path / "k.npz", mismatch)
  assert os.listdir(tmp_path) == []
  path = tmp_path / "p.npz"
  tj.save_policy(path, _deployed("recall"))
  before = path.read_bytes()

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np.lib.format, "write_array", boom)
  with pytest.raises(OSError, match="disk full"):
    tj.save_policy(path, _deployed("no_recall"))
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["p.json", "p.npz"]
