"""Hostile and careless input, round two (issue 24; RELIABILITY.md, "Round two").

One test (or more) per case of the table in RELIABILITY.md: outputs that collide or are
special files, slow failures, overflowing and subnormal numbers, columns of the wrong
type, ambiguous headers, self-contradicting policy files, huge JSON copies, misleading
hints and messages. Every command-line refusal is one line, exit 2, before any work
(nothing is compiled: the inputs are refused while the command checks its arguments),
and leaves the folder as it was. Ctrl-C is tests/test_interrupt.py; the long-lived
process is tests/test_long_process.py.
"""

import ast
import json
import os
import re
import signal
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from test_fuzz_cli import assert_usage_error, listing, run_cli

import ttamer_jax as tj
from ttamer_jax.data import archive, files, policy_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20


def _traces(num=N, **fields):
  rng = np.random.default_rng(0)
  conf = rng.uniform(0, 1, (num, 3))
  base = dict(scores=conf, preds=rng.integers(0, 5, (num, 3)),
              losses=(rng.uniform(0, 1, (num, 3)) > conf).astype(float), costs=[1.0, 2.0, 3.0],
              signals={"max_softmax": conf})
  return tj.ExitTraces(**{**base, **fields})


def _policy(lam=0.825):
  """A recall policy built from its arrays (no fit, nothing compiled)."""
  values = np.array([[0.6, 0.2], [0.5, 0.1], [0.3, 0.0]])
  index = np.where(np.arange(3)[:, None] < 2, 0.4, np.inf) * np.ones((3, 2))
  policy = tj.core.RecallPolicy(index=index, values=values, lam=lam)
  return tj.DeployedPolicy(policy=policy, discretiser=tj.data.Discretiser(edges=np.full((3, 1), 0.5)),
                           score_name="max_softmax")


@pytest.fixture()
def folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tj.save_traces("cal.npz", _traces())
  return tmp_path


def _refused(argv, folder, match, command=None):
  """Exit 2, one line matching ``match``, the folder unchanged."""
  before = listing(folder)
  code, out, err = run_cli(argv)
  assert_usage_error(code, out, err, command or argv[0])
  assert re.search(match, err), err
  assert listing(folder) == before
  return err


# ------------------------------------------------------------------ 1, 2: outputs that collide
def test_two_outputs_on_one_new_path_are_refused(folder):
  _refused(["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "p.npz"], folder,
           r"--cascade-out p\.npz: is also --out \(p\.npz\)")
  # the same file through '..' and through a (dangling) link
  os.mkdir("sub")
  _refused(["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "sub/../p.npz"], folder,
           "is also --out")
  os.symlink("p.npz", "link.npz")
  _refused(["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "link.npz"], folder,
           "is also --out")


def test_the_cascade_over_the_policys_json_copy_is_refused(folder):
  _refused(["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "p.json"], folder,
           r"--cascade-out p\.json: is also the \.json copy of --out")
  # and the copy over the input
  tj.save_traces("t.npz", _traces())
  os.rename("t.npz", "q.json")
  _refused(["fit", "q.json", "--out", "q.npz"], folder, "is an input file")


# ------------------------------------------------------------------ 3: special files
@pytest.mark.parametrize("argv", [["fit", "cal.npz", "--out", "{x}"],
                                  ["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "{x}"],
                                  ["sweep", "cal.npz", "--plot", "{x}.png"]])
def test_special_files_are_never_outputs(folder, argv):
  os.mkfifo("fifo")
  os.mkfifo("fifo.png")
  for target, kind in (("fifo", "FIFO"), ("/dev/null", "character device")):
    args = [a.replace("{x}", target) for a in argv]
    if target == "/dev/null" and args[0] == "sweep":
      args[-1] = "/dev/null"
    _refused(args, folder, kind)
  assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_writers_refuse_special_files(folder):
  os.mkfifo("fifo.npz")
  for write in (lambda: tj.save_traces("fifo.npz", _traces()),
                lambda: tj.save_policy("fifo.npz", _policy()),
                lambda: files.write_text("/dev/null", "x")):
    with pytest.raises(ValueError, match="FIFO|character device"):
      write()
  assert not os.path.isfile("fifo.npz") and sorted(os.listdir()) == ["cal.npz", "fifo.npz"]
  os.mkfifo("policy.json")  # the demo's files in its --out folder
  _refused(["demo", "--out", ".", "--workload", "synthetic"], folder, "policy.json: is a FIFO")


# ------------------------------------------------------------------ 5: slow failures
@pytest.mark.parametrize("argv, match", [
    (["fit", "cal.npz", "--out", ""], "empty policy file name"),
    (["fit", "cal.npz", "--out", "missing_dir/"], "ends with '/'"),
    (["fit", "cal.npz", "--out", "p.npz", "--cascade-out", ""], "empty cascade file name"),
    (["fit", "cal.npz", "--out", "p.npz", "--cascade-out", "missing_dir/"], "ends with '/'"),
    (["sweep", "cal.npz", "--plot", ""], "empty plot file name"),
    (["demo", "--out", ""], "empty folder name"),
])
def test_empty_and_folder_names_fail_before_any_work(folder, argv, match):
  _refused(argv, folder, match)


# ------------------------------------------------------------------ 6, 8: overflow and subnormals
def _raw_traces(path, **fields):
  """A traces file holding ``fields`` as given (checksums right), bypassing ExitTraces."""
  tr = _traces()
  arrays = dict(format_version=np.asarray(1, np.int64), kind=np.asarray("ttamer_jax.ExitTraces"),
                scores=tr.scores, preds=tr.preds, losses=tr.losses, costs=tr.costs,
                signal_names=np.asarray(["max_softmax"]), signal_0=tr.scores)
  arrays.update({k: np.asarray(v, np.float32) for k, v in fields.items()})
  archive.write_npz_atomic(path, arrays)


@pytest.mark.parametrize("fields, match", [
    (dict(costs=[3e38, 3e38, 3e38]), "costs: too large: 20 requests x the largest per-request sum"),
    (dict(losses=np.full((N, 3), 3e38)), "losses: too large"),
    (dict(costs=[1e-45, 1e-45, 1e-45]), r"costs\[0\] = .* is below 1.18e-38.*rescale"),
])
def test_overflowing_and_subnormal_numbers_are_refused_by_every_command(folder, fields, match):
  _raw_traces("bad.npz", **fields)
  _refused(["fit", "bad.npz", "--out", "p.npz"], folder, match)
  _refused(["sweep", "bad.npz"], folder, match)
  tj.save_policy("pol.npz", _policy())
  _refused(["evaluate", "pol.npz", "bad.npz"], folder, match)
  tj.traces_to_table(_traces(), form="wide").assign(
      **{f"cost_{i}": np.asarray(fields.get("costs", [1.0, 2.0, 3.0]))[i] for i in range(3)}).to_csv(
          "bad.csv", index=False)
  if "costs" in fields:  # the same from a CSV table
    _refused(["fit", "bad.csv", "--out", "p.npz"], folder, match)


def test_a_cascade_whose_sums_overflow_is_refused():
  with pytest.raises(ValueError, match="values: too large: the largest value plus the sum of costs"):
    tj.Cascade(values=np.full((2, 2), 3e38), init=[0.5, 0.5], trans=np.full((1, 2, 2), 0.5),
               costs=[1.0, 1.0])


def test_large_and_tiny_accepted_values_give_finite_correct_numbers():
  """At the largest accepted scale (costs and losses near the bound) and at tiny normal
  costs, every reported number is finite and equals its float64 value; rescaling the
  costs changes nothing (only their ratios count)."""
  exit_last = tj.core.FixedExitPolicy(exit_stage=1, num_stages=3)
  base = _traces()
  results = {}
  for name, scale, loss_scale in (("unit", 1.0, 1.0), ("large", 1e35, 1e35), ("tiny", 1e-35, 1.0)):
    tr = _traces(costs=np.array([1.0, 2.0, 3.0]) * scale, losses=np.asarray(base.losses) * loss_scale)
    ev = tj.evaluate(exit_last, tr, 0.5, num_resamples=20)
    for k, v in ev.as_dict().items():
      assert np.all(np.isfinite(v)), (name, k, v)
    expected_error = np.asarray(tr.losses, np.float64)[:, 1].mean()
    assert float(ev.error) == pytest.approx(expected_error, rel=1e-6)
    results[name] = float(ev.cost_norm)
  assert results["unit"] == pytest.approx(0.5, rel=1e-6)  # stages 1 + 2 of 1 + 2 + 3
  assert results["large"] == pytest.approx(results["unit"], rel=1e-6)
  assert results["tiny"] == pytest.approx(results["unit"], rel=1e-6)


# ------------------------------------------------------------------ 7, 9, 13: tables
@pytest.mark.parametrize("convert, match", [
    (lambda c: pd.to_datetime(c * 1e9), "has type datetime64"),
    (lambda c: pd.to_timedelta(c, unit="s"), "has type timedelta64"),
    (lambda c: c > 0, "has type bool"),
    (lambda c: c.astype(str).where(c < 0.5, "high"), "holds .* values \\('high' in row"),
    (lambda c: c.astype(str), "holds string values"),
])
def test_columns_of_other_types_are_refused_by_name(folder, convert, match):
  table = tj.traces_to_table(_traces(), form="long")
  table["loss"] = convert(table["loss"])
  with pytest.raises(ValueError, match="column 'loss': must be numeric, " + match):
    tj.traces_from_table(table)
  table.to_parquet("t.parquet")
  _refused(["fit", "t.parquet", "--out", "p.npz"], folder, "t.parquet: column 'loss': must be numeric")
  _refused(["sweep", "t.parquet", "--plot", "f.png"], folder, "column 'loss': must be numeric")


def test_nullable_integer_columns_are_read_as_numbers():
  table = tj.traces_to_table(_traces(), form="long")
  table["pred"] = table["pred"].astype("Int64")
  table["loss"] = table["loss"].astype("Float64")
  tr = tj.traces_from_table(table)
  np.testing.assert_array_equal(tr.preds, _traces().preds)
  np.testing.assert_array_equal(tr.losses, _traces().losses)


def test_a_repeated_column_is_refused(folder):
  table = tj.traces_to_table(_traces(), form="long")
  text = table.assign(extra=table["loss"]).to_csv(index=False).replace("extra", "loss", 1)
  with open("dup.csv", "w") as f:
    f.write(text)
  _refused(["fit", "dup.csv", "--out", "p.npz"], folder,
           "dup.csv: column 'loss': appears more than once")
  with pytest.raises(ValueError, match="column 'loss': appears more than once"):
    tj.traces_from_table(pd.concat([table, table[["loss"]]], axis=1))


@pytest.mark.parametrize("sep, what", [(";", "semicolons"), ("\t", "tabs")])
def test_another_delimiter_is_named(folder, sep, what):
  tj.traces_to_table(_traces(), form="wide").to_csv("semi.csv", index=False, sep=sep)
  _refused(["fit", "semi.csv", "--out", "p.npz"], folder, f"separated by {what}, not commas")


# ------------------------------------------------------------------ 10: self-contradicting policy
def _edited_policy(path, **edits):
  tj.save_policy("good.npz", _policy())
  fields = archive.read_npz("good.npz", "policy")
  meta = json.loads(str(fields["metadata_json"]))
  meta.update(edits)
  archive.write_npz_atomic(path, dict(fields, metadata_json=np.asarray(json.dumps(meta))))


@pytest.mark.parametrize("edits, match", [
    (dict(lam=0.1), r"metadata lam = 0.1 disagrees with field 'policy.lam' = 0.82"),
    (dict(lam="0.825"), "metadata lam = \"0.825\" must be null or a number"),
    (dict(lam=[0.825, 0.825]), "is not the list of this mixture's lams"),
    (dict(full_cost="lots"), "metadata full_cost = \"lots\" must be null or a finite number >= 0"),
    (dict(full_cost=-1), "metadata full_cost = -1 must be null"),
    (dict(full_cost=True), "metadata full_cost = true must be null"),
    (dict(num_stages=2), "metadata says 2 stages x 2 states, the arrays hold 3 x 2"),
])
def test_metadata_contradicting_the_arrays_is_refused(folder, edits, match):
  _edited_policy("bad.npz", **edits)
  with pytest.raises(ValueError, match=match):
    tj.load_policy("bad.npz")
  tj.save_traces("test.npz", _traces(40))
  _refused(["evaluate", "bad.npz", "test.npz"], folder, match)


def test_save_policy_refuses_a_lam_its_recall_policy_does_not_decide_with(tmp_path):
  with pytest.raises(ValueError, match="lam: lam = 0.1 disagrees with field 'policy.lam'"):
    tj.save_policy(tmp_path / "p.npz", _policy(0.825), lam=0.1)
  assert not os.listdir(tmp_path)
  meta = tj.save_policy(tmp_path / "p.npz", _policy(0.825), lam=0.825)   # its own lam: fine
  assert tj.load_policy(tmp_path / "p.npz", with_metadata=True)[1] == meta
  rule = tj.DeployedPolicy(policy=tj.core.FixedExitPolicy(exit_stage=1, num_stages=3),
                           discretiser=tj.data.Discretiser(edges=np.zeros((3, 0))), score_name="scores")
  assert tj.save_policy(tmp_path / "r.npz", rule, lam=0.3)["lam"] == 0.3   # a rule has no lam


# ------------------------------------------------------------------ 11: unbounded JSON copy
def test_a_huge_json_copy_is_not_read(tmp_path):
  meta = tj.save_policy(tmp_path / "p.npz", _policy())
  size = 20 << 20
  with open(tmp_path / "p.json", "wb") as f:
    f.write(b" " * size)
  tracemalloc.start()
  differs = policy_io.sidecar_differences(tmp_path / "p.npz", meta)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert differs == [f"p.json is {size} bytes, far more than the metadata it copies (not read)"]
  assert peak < size // 20


# ------------------------------------------------------------------ 12, 13: hints and messages
def test_a_json_file_given_as_a_policy_gets_no_pickle_hint(folder):
  tj.save_policy("p.npz", _policy())
  tj.save_traces("test.npz", _traces(40))
  err = _refused(["evaluate", "p.json", "test.npz"], folder,
                 r"p\.json: not a readable policy \.npz file: it holds JSON text")
  assert "pickle" not in err
  with open("pickle.npz", "wb") as f:
    f.write(b"\x80\x04K\x01.")
  err = _refused(["evaluate", "pickle.npz", "test.npz"], folder, "a Python pickle, which "
                 "ttamer_jax never loads")
  assert "allow_pickle" not in err


def test_field_names_in_messages_are_quoted_whole(folder):
  tj.save_policy("good.npz", _policy())
  fields = archive.read_npz("good.npz", "policy")
  edges = np.asarray(fields["edges"]).copy()
  edges[0, 0] = np.nan
  archive.write_npz_atomic("bad.npz", dict(fields, edges=edges))
  with pytest.raises(ValueError, match=r"bad.npz: field 'edges\[0, 0\]' is nan"):
    tj.load_policy("bad.npz")


def test_too_few_requests_for_the_folds_names_the_file(folder):
  tj.save_traces("one.npz", _traces(1))
  _refused(["fit", "one.npz", "--out", "p.npz"], folder,
           r"one\.npz: 1 request, fewer than --folds 5")
  _refused(["fit", "cal.npz", "--out", "p.npz", "--folds", "1"], folder, "at least 2 folds")


def test_intervals_from_one_request_come_with_a_warning(folder):
  tj.save_policy("p.npz", _policy())
  tj.save_traces("one.npz", _traces(1))
  code, out, err = run_cli(["evaluate", "p.npz", "one.npz", "--resamples", "10", "--json"])
  assert code == 0, err
  doc = json.loads(out)
  assert any("1 request: the bootstrap intervals need many more" in w and "single point" in w
             for w in doc["warnings"]), doc["warnings"]
  assert "warning: one.npz holds 1 request" in err


# ------------------------------------------------------------------ Ctrl-C while writing
def test_an_interrupt_while_writing_waits_for_the_files():
  old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the ttamer program
  finished = False
  try:
    with pytest.raises(KeyboardInterrupt):
      with files.interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        finished = True   # reached: the interrupt waited for the block
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, old)


# ------------------------------------------------------------------ RELIABILITY.md's table
def _round_two_rows():
  text = open(os.path.join(REPO, "RELIABILITY.md"), encoding="utf-8").read()
  section = text.split("## Hostile and careless input, round two", 1)[1].split("\n## ", 1)[0]
  return [r for r in section.splitlines() if re.match(r"\| (R\d+|G\d+) \|", r)]


def _test_names(path):
  tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
  return {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}


def test_every_case_of_the_round_two_table_names_tests_that_exist():
  rows = _round_two_rows()
  ids = [r.split("|")[1].strip() for r in rows]
  assert ids[:13] == [f"R{i}" for i in range(1, 14)], ids   # the 13 cases, in order
  for row in rows:
    named = re.findall(r"(tests/test_\w+\.py)::(test_\w+)", row)
    assert named, row
    for path, name in named:
      assert name in _test_names(path), (path, name)
