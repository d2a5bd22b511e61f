"""Fuzzing the ``ttamer`` command line (RELIABILITY.md, area "CLI").

Random valid argument combinations of ``fit`` / ``evaluate`` / ``solve`` / ``sweep``
on small random traces and cascades must exit 0, print parseable ``--json`` and
write files that load back. Random bad arguments and broken input files
(truncated, bit-flipped, wrong kind, empty, text, directories, missing) must exit
2 with exactly one line on stderr, no traceback, nothing on stdout and no output
file (the output folder's listing is unchanged: not even a temporary file). A bit
flip the loaders cannot see (a zip timestamp) must give the unbroken file's result.

The commands run in-process through :func:`ttamer_jax.app.cli.main`, which is what
the ``ttamer`` console script and ``python -m ttamer_jax`` call (argparse errors
leave ``main`` as ``SystemExit(2)``, exactly as they leave the process); a few
cases run through the real ``python -m ttamer_jax``. ``demo`` and ``bench`` are
left out (too slow). Traces keep ``N = 200`` (sweeps: 100 + 100) and few shapes
(n, K), so JAX compiles little; the contents and options are random. Every case
is counted (tests/fuzzing.py).
"""

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from fuzzing import record
from hypothesis import given, settings
from hypothesis import strategies as st

import ttamer_jax as tj
from ttamer_jax import fit_cascade, load_cascade, load_traces, save_cascade, save_traces
from ttamer_jax.app import cli, commands, compare
from ttamer_jax.data import policy_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 200  # samples of every random trace file (one shape: JAX compiles once)


# ------------------------------------------------------------------ running the CLI
def run_cli(argv):
  """``cli.main(argv)`` as the process runs it: ``(exit code, stdout, stderr)``.

  ``main`` returns the code of a command; argparse errors raise ``SystemExit``
  (``_Parser.error`` -> ``exit(2)``), which ``sys.exit(main())`` turns into the
  same process exit code. Any other exception escapes: a crash, the test fails.
  """
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(argv)
    except SystemExit as e:
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
  return code, out.getvalue(), err.getvalue()


def listing(folder):
  """Every entry under ``folder`` (hidden temporary files included)."""
  found = []
  for root, dirs, files in os.walk(folder):
    found += [os.path.relpath(os.path.join(root, x), folder) for x in dirs + files]
  return sorted(found)


def assert_usage_error(code, out, err, command):
  """Exit 2, nothing on stdout, exactly one line on stderr, no traceback."""
  assert code == 2, (code, out[-2000:], err[-2000:])
  assert "Traceback" not in err, err
  lines = err.splitlines()
  assert len(lines) == 1 and err.endswith("\n"), err
  # argparse reports unrecognised arguments from the top-level parser ("ttamer: error:")
  prefixes = ("ttamer: error: ",) + ((f"ttamer {command}: error: ",) if command else ())
  assert lines[0].startswith(prefixes), lines[0]
  assert out == "", out


def assert_ok(code, out, err):
  assert code == 0, (code, err[-3000:])
  assert "Traceback" not in err, err


# ------------------------------------------------------------------ random inputs
SIGNALS = ["max_softmax", "entropy", "error_prob"]


@st.composite
def traces_strategy(draw, n=None, signals=None, num=N):
  """Random valid traces: ``num`` samples (default 200), ``n`` 1..3, ties, constant
  scores, 0/1, real or zero losses, per-stage (some zero) or per-sample costs,
  optional signals (random names unless ``signals`` names them)."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  n = draw(st.sampled_from([1, 2, 3])) if n is None else n
  kind = draw(st.sampled_from(["uniform", "ties", "constant"]))
  scores = rng.uniform(0, 1, (num, n))
  if kind == "ties":
    scores = np.round(scores * 2) / 2
  elif kind == "constant":
    scores = np.full((num, n), 0.5)
  loss = draw(st.sampled_from(["01", "real", "zero"]))
  if loss == "01":
    losses = (rng.uniform(0, 1, (num, n)) < rng.uniform(0.05, 0.6, n)).astype(np.float32)
  elif loss == "real":
    losses = rng.exponential(1.0, (num, n))
  else:
    losses = np.zeros((num, n))
  cost_kind = draw(st.sampled_from(["stage", "some_zero", "sample"]))
  if cost_kind == "stage":
    costs = np.cumsum(rng.uniform(0.1, 1.0, n))
  elif cost_kind == "some_zero":
    costs = np.where(rng.uniform(0, 1, n) < 0.5, 0.0, rng.uniform(0, 1, n))
  else:
    costs = rng.uniform(0, 1, (num, n))
  if signals is None:
    signals = draw(st.sets(st.sampled_from(SIGNALS)))
  signals = {name: rng.uniform(0, 1, (num, n)) for name in sorted(signals)}
  labels = rng.integers(0, 5, num) if draw(st.booleans()) else None
  return tj.ExitTraces(scores=scores, preds=rng.integers(0, 5, (num, n)), losses=losses,
                       costs=costs, signals=signals, labels=labels)


@st.composite
def cascade_strategy(draw):
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  n, k = draw(st.integers(1, 3)), draw(st.integers(1, 4))
  values = rng.uniform(0, 1, (n, k))
  if draw(st.booleans()):
    values = np.round(values * 2) / 2  # ties
  conc = draw(st.sampled_from([1.0, 0.05]))
  init = rng.dirichlet(np.full(k, conc))
  trans = rng.dirichlet(np.full(k, conc), size=(n - 1, k)).reshape(n - 1, k, k)
  costs = rng.uniform(0, 1, n) * draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0]))
  return tj.Cascade(values=values, init=init, trans=trans, costs=costs)


def lam_text(lam: float) -> str:
  return repr(float(lam))


LAM = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.99]), st.floats(0, 1))


@st.composite
def lam_spec(draw, max_num=5):
  """``(text, lams)``: one value, a list or ``START:STOP:NUM``."""
  form = draw(st.sampled_from(["one", "list", "range"]))
  if form == "one":
    lam = draw(LAM)
    return lam_text(lam), np.asarray([lam])
  if form == "list":
    lams = draw(st.lists(LAM, min_size=1, max_size=3))
    sep = draw(st.sampled_from([",", ", "]))
    return sep.join(lam_text(x) for x in lams), np.asarray(lams)
  start, stop, num = draw(LAM), draw(LAM), draw(st.integers(1, max_num))
  return f"{lam_text(start)}:{lam_text(stop)}:{num}", np.linspace(start, stop, num)


@contextlib.contextmanager
def workdir():
  """A fresh folder for one hypothesis example (function-scoped fixtures do not reset
  between examples)."""
  path = tempfile.mkdtemp(prefix="fuzzcli-")
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _signal_names(traces):
  return ["scores", *sorted(traces.signals)]


# ------------------------------------------------------------------ cli.valid
# Few shapes (n, K, N), random contents and options: each new shape costs JAX a compile.
@settings(max_examples=10)
@given(st.sampled_from([1, 3]), st.data())
def test_valid_fit(n, data):
  traces = data.draw(traces_strategy(n), "traces")
  k = data.draw(st.sampled_from([1, 4]), "K")
  with workdir() as d:
    tpath, out = os.path.join(d, "t.npz"), os.path.join(d, "out", "p.npz")
    os.mkdir(os.path.dirname(out))
    save_traces(tpath, traces)
    # A state design given: the one recall candidate (cross-fitted, model-checked).
    argv = ["fit", tpath, "--out", out, "--states", str(k)]
    lam = data.draw(st.one_of(st.none(), st.just("auto"), LAM), "lam")
    if lam is not None:
      argv += ["--lam", lam if lam == "auto" else lam_text(lam)]
    if data.draw(st.booleans(), "tolerance"):
      argv += ["--tolerance", repr(data.draw(st.floats(0, 0.999)))]
    score = data.draw(st.sampled_from([None, *_signal_names(traces)]), "score")
    if score is not None:
      argv += ["--score", score]
    feature = k % 2 == 0 and data.draw(st.booleans(), "agree_prev")
    if feature:
      argv += ["--feature", "agree_prev"]
    argv += ["--binning", data.draw(st.sampled_from(["quantile", "uniform"]), "binning")]
    cascade_out = os.path.join(d, "out", "c.npz") if data.draw(st.booleans(), "cascade") else None
    if cascade_out:
      argv += ["--cascade-out", cascade_out]
    as_json = data.draw(st.booleans(), "json")
    argv += ["--json"] if as_json else []

    code, stdout, err = run_cli(argv)
    assert_ok(code, stdout, err)
    expected = {"p.npz", "p.json"} | ({"c.npz"} if cascade_out else set())
    assert listing(os.path.dirname(out)) == sorted(expected)
    deployed, meta = tj.load_policy(out, with_metadata=True)
    assert json.load(open(policy_io.sidecar_path(out))) == meta
    assert meta["num_stages"] == traces.num_stages and meta["num_states"] == k
    default_score = "max_softmax" if "max_softmax" in traces.signals else "scores"
    assert meta["score_name"] == (score or default_score)
    assert meta["feature"] == ("agree_prev" if feature else None)
    assert 0 <= meta["lam"] <= 1
    if lam not in (None, "auto"):
      assert meta["lam"] == pytest.approx(lam)
    if as_json:
      result = json.loads(stdout)
      assert result["metadata"] == meta and result["policy"] == out
      assert result["cascade"] == cascade_out and result["lam"] == meta["lam"]
      ins = result["in_sample"]
      assert ins["num_samples"] == N
      assert 0 <= ins["error"] <= float(np.max(traces.losses)) + 1e-6
      assert -1e-9 <= ins["cost_norm"] <= 1 + 1e-6
      ev = tj.evaluate(deployed, traces, meta["lam"], num_resamples=200)
      assert float(ev.error) == pytest.approx(ins["error"], abs=1e-6)
    else:
      assert f"wrote {out}" in stdout
    if cascade_out:  # the saved policy is the recall optimum of the saved cascade
      cascade = load_cascade(cascade_out)
      assert (cascade.num_stages, cascade.num_states) == (traces.num_stages, k)
      np.testing.assert_allclose(deployed.policy.index,
                                 tj.solve_recall(cascade, meta["lam"]).index, rtol=1e-6)
  record("cli.valid", "fit exit 0")


@settings(max_examples=10)
@given(st.sampled_from([1, 3]), st.data())
def test_valid_evaluate(n, data):
  fit_on, traces = data.draw(traces_strategy(n), "fit on"), data.draw(traces_strategy(n), "traces")
  k = data.draw(st.sampled_from([2, 4]), "K")
  fitted = fit_cascade(fit_on, k)
  recall = data.draw(st.booleans(), "recall")
  lam = data.draw(LAM, "policy lam")
  deployed = fitted.recall_policy(lam) if recall else fitted.no_recall_policy(lam)
  with workdir() as d:
    ppath, tpath = os.path.join(d, "p.npz"), os.path.join(d, "t.npz")
    tj.save_policy(ppath, deployed, lam=lam)
    save_traces(tpath, traces)
    before = listing(d)
    resamples = data.draw(st.sampled_from([1, 20]), "resamples")
    level = data.draw(st.sampled_from([0.5, 0.9, 0.95]), "level")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    argv = ["evaluate", ppath, tpath, "--resamples", str(resamples), "--level", str(level),
            "--seed", str(seed)]
    given_lam = data.draw(st.one_of(st.none(), LAM), "--lam")
    if given_lam is not None:
      argv += ["--lam", lam_text(given_lam)]
    as_json = data.draw(st.booleans(), "json")
    argv += ["--json"] if as_json else []
    code, stdout, err = run_cli(argv)
    assert_ok(code, stdout, err)
    assert listing(d) == before  # evaluate writes nothing
  use_lam = lam if given_lam is None else given_lam
  if as_json:
    result = json.loads(stdout)
    assert result["lam"] == pytest.approx(use_lam)
    expected = tj.evaluate(deployed, traces, use_lam, key=jax.random.PRNGKey(seed),
                           num_resamples=resamples, level=level).as_dict()
    got = result["evaluation"]
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    lo, hi = got["error_ci"]
    assert lo <= hi
    assert sum(got["stop_histogram"]) == pytest.approx(1)
    assert -1e-9 <= got["cost_norm"] <= 1 + 1e-6
  else:
    assert f"policy {ppath}:" in stdout and "bootstrap CI" in stdout
  record("cli.valid", "evaluate exit 0")


@settings(max_examples=10)
@given(cascade_strategy(), lam_spec(), st.data())
def test_valid_solve(cascade, spec, data):
  text, lams = spec
  with workdir() as d:
    cpath, plot = os.path.join(d, "c.npz"), os.path.join(d, "out", "i.png")
    os.mkdir(os.path.dirname(plot))
    save_cascade(cpath, cascade)
    argv = ["solve", cpath, "--lam", text]
    with_plot = lams.size == 1 and data.draw(st.booleans(), "plot")
    argv += ["--plot", plot] if with_plot else []
    as_json = data.draw(st.booleans(), "json")
    argv += ["--json"] if as_json else []
    code, stdout, err = run_cli(argv)
    assert_ok(code, stdout, err)
    assert listing(os.path.dirname(plot)) == (["i.png"] if with_plot else [])
    if with_plot:
      assert open(plot, "rb").read(8) == PNG_MAGIC
  if not as_json:
    assert f"{cascade.num_stages} stages x {cascade.num_states} states" in stdout
    record("cli.valid", "solve exit 0")
    return
  result = json.loads(stdout)
  assert (result["num_stages"], result["num_states"]) == (cascade.num_stages, cascade.num_states)
  rows = result["solutions"]
  np.testing.assert_allclose([r["lam"] for r in rows], lams, rtol=1e-12, atol=1e-15)
  scale = float(np.max(cascade.values)) + float(np.sum(cascade.costs)) + 1e-12
  for r in rows:
    tol = 1e-5 * scale
    assert r["hindsight"] <= r["recall"] + tol and r["recall"] <= r["no_recall"] + tol, r
    assert r["recall"] == pytest.approx(float(tj.solve_recall(cascade, r["lam"]).value), abs=tol)
    index = r["index"]
    assert len(index) == cascade.num_stages and all(len(x) == cascade.num_states for x in index)
    assert index[-1] == ["inf"] * cascade.num_states
  record("cli.valid", "solve exit 0")


@settings(max_examples=4)
@given(st.sampled_from([1, 3]), st.data())
def test_valid_sweep(n, data):
  # Both modes fit on 100 and measure on 100 requests: one shape per n.
  cal = data.draw(st.booleans(), "calibration")
  names = data.draw(st.sets(st.sampled_from(SIGNALS)), "signals")
  traces = data.draw(traces_strategy(n, names, N // 2 if cal else N), "traces")
  k, num = 4, 3
  start, stop = data.draw(LAM, "lam start"), data.draw(LAM, "lam stop")
  with workdir() as d:
    tpath, plot = os.path.join(d, "t.npz"), os.path.join(d, "out", "f.png")
    os.mkdir(os.path.dirname(plot))
    save_traces(tpath, traces)
    argv = ["sweep", tpath, "--states", str(k), "--lam", f"{lam_text(start)}:{lam_text(stop)}:{num}",
            "--no-progress"]
    if cal:
      cal_traces = data.draw(traces_strategy(n, names, N // 2), "calibration traces")
      cpath = os.path.join(d, "cal.npz")
      save_traces(cpath, cal_traces)
      argv += ["--calibration", cpath]
    else:
      argv += ["--split", "0.5", "--seed", str(data.draw(st.integers(0, 2**32 - 1), "seed"))]
    for flag in ("--score", "--confidence-score"):
      name = data.draw(st.sampled_from([None, *_signal_names(traces)]), flag)
      argv += [flag, name] if name else []
    if data.draw(st.booleans(), "agree_prev"):
      argv += ["--feature", "agree_prev"]
    if data.draw(st.booleans(), "tolerance"):
      argv += ["--tolerance", repr(data.draw(st.floats(0, 0.5)))]
    with_plot = data.draw(st.sampled_from([False, False, True]), "plot")
    argv += ["--plot", plot] if with_plot else []
    as_json = data.draw(st.booleans(), "json")
    argv += ["--json"] if as_json else []
    code, stdout, err = run_cli(argv)
    assert_ok(code, stdout, err)
    assert listing(os.path.dirname(plot)) == (["f.png"] if with_plot else [])
    if with_plot:
      assert open(plot, "rb").read(8) == PNG_MAGIC
  if as_json:
    result = json.loads(stdout)
    np.testing.assert_allclose(result["lams"], np.linspace(start, stop, num), rtol=1e-12)
    families = set(compare.POLICIES) - ({"entropy"} if "entropy" not in names else set())
    assert {r["policy"] for r in result["operating_points"]} == families
    assert len(result["frontiers"]["recall"]) == num
    assert [o["lam"] for o in result["objectives"]] == pytest.approx(list(compare.OBJECTIVE_LAMS))
    assert result["fitted"]["num_states"] == k and result["fitted"]["num_stages"] == n
    for row in result["frontiers"]["recall"]:
      assert -1e-9 <= row["cost_norm"] <= 1 + 1e-6
  else:
    assert "policy" in stdout and "setting" in stdout
  record("cli.valid", "sweep exit 0")


# ------------------------------------------------------------------ fixed inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Valid input files (``N = 200``, 3 stages, 4 states) and a few wrong-kind ones."""
  root = str(tmp_path_factory.mktemp("fuzz_cli_inputs"))
  rng = np.random.default_rng(0)
  scores = rng.uniform(0, 1, (N, 3))
  traces = tj.ExitTraces(scores=scores, preds=rng.integers(0, 5, (N, 3)),
                         losses=(rng.uniform(0, 1, (N, 3)) < [0.4, 0.3, 0.2]).astype(np.float32),
                         costs=np.array([1.0, 2.0, 4.0]), signals={"max_softmax": scores})
  f = {k: os.path.join(root, k + ".npz") for k in ("traces", "policy", "cascade", "two_stages")}
  save_traces(f["traces"], traces)
  deployed = fit_cascade(traces, 4, score="max_softmax").recall_policy(0.8)
  tj.save_policy(f["policy"], deployed, lam=0.8)
  save_cascade(f["cascade"], tj.demo_cascade(3, 4))
  save_traces(f["two_stages"], traces.replace(
      scores=traces.scores[:, :2], preds=traces.preds[:, :2], losses=traces.losses[:, :2],
      costs=traces.costs[:2], signals={"max_softmax": traces.scores[:, :2]}))
  f["sidecar"] = policy_io.sidecar_path(f["policy"])
  f["root"] = root
  return f


# ------------------------------------------------------------------ cli.bad_args
def _base_argv(command, f, out):
  """A valid command line of ``command`` whose outputs go to ``out``."""
  return {
      "fit": ["fit", f["traces"], "--out", os.path.join(out, "p.npz"), "--cascade-out",
              os.path.join(out, "c.npz"), "--states", "4", "--lam", "0.8"],
      "evaluate": ["evaluate", f["policy"], f["traces"], "--resamples", "20"],
      "sweep": ["sweep", f["traces"], "--lam", "0:1:3", "--states", "4", "--plot",
                os.path.join(out, "f.png")],
      "solve": ["solve", f["cascade"], "--lam", "0.3", "--plot", os.path.join(out, "i.png")],
  }[command]


# option -> the parser's type (a value it accepts is not a bad value) or its choices
OPTION_TYPES = {
    "fit": {"--states": cli.positive_int, "--lam": cli.lam_or_auto, "--tolerance": cli.fraction,
            "--binning": ("quantile", "uniform"), "--feature": ("agree_prev",),
            "--candidates": commands.CANDIDATE_SETS, "--folds": cli.positive_int,
            "--seed": cli.seed_value},
    "evaluate": {"--lam": cli.single_lam, "--resamples": cli.resample_count, "--level": cli.fraction,
                 "--seed": cli.seed_value},
    "sweep": {"--lam": cli.lam_values, "--split": cli.fraction, "--states": cli.positive_int,
              "--tolerance": cli.fraction, "--seed": cli.seed_value, "--feature": ("agree_prev",)},
    "solve": {"--lam": cli.lam_values},
}

# Bad values whatever the types accept: most pass the type and are refused later
# (exit 2 all the same); seeds out of range crashed JAX before --seed had a type.
# {out}: the output folder, {dir}: an existing folder.
LATE_BAD = {
    "fit": [["--score", "nope"], ["--feature", "agree_prev", "--states", "3"],
            ["--states", "1000000000"], ["--states", str(10**30)], ["--out", "{dir}"],
            ["--out", "{out}/missing/p.npz"], ["--cascade-out", "{out}/missing/c.npz"],
            ["--cascade-out", "{dir}"], ["--folds", "1"], ["--folds", "100000"],
            ["--seed", str(2**70)]],
    "evaluate": [["--level", "0"], ["--level", "0.0"], ["--level", "-0"], ["--seed", str(2**64)],
                 ["--seed", str(-2**70)]],
    "sweep": [["--split", "0"], ["--split", "0.001"], ["--split", "0.999"], ["--score", "nope"],
              ["--confidence-score", "nope"], ["--states", "1000000000"],
              ["--feature", "agree_prev", "--states", "3"], ["--plot", "{out}/missing/f.png"],
              ["--plot", "{dir}"], ["--seed", str(2**70)]],
    "solve": [["--lam", "0,0.5"], ["--lam", "0:1:3"], ["--plot", "{out}/missing/i.png"],
              ["--plot", "{dir}"]],
}

CURATED = ["1:0", "a", "0:1:0", "nan", "NaN", "2", "-0.5", "1.5", "inf", "-inf", "", " ", ",",
           "0.1,,0.2", "0:1:2.5", "1e999", "0:1:1:1", "0x1", "0:nan:3", "0.2:1.5:3", "0:1:-3",
           f"0:1:{cli.MAX_LAM_VALUES + 1}", "0:1:99999999999999999999", "1,2", "0.5,nan", ":",
           "::", "0:1:", "auto", "0.1,0.2", "0:1:3", "0", "-1", "1", "1.0", "1e3", "0x10", "++1",
           str(cli.MAX_RESAMPLES + 1), str(2**32), str(2**64), str(-2**70), "1_0", "one",
           "a\nb", "0.5\n0.6", "\t", "--", "-", "quantiles", "AGREE_PREV", "agree prev"]
RANDOM_TEXT = st.text(max_size=12)
VALUES = st.one_of(st.sampled_from(CURATED), st.floats().map(repr),
                   st.integers(-10**30, 10**30).map(str),
                   st.integers(1, 10**30).map(lambda k: f"0:1:{k}"), RANDOM_TEXT)


def _rejects(kind, text):
  if isinstance(kind, tuple):
    return text not in kind
  try:
    kind(text)
  except (argparse.ArgumentTypeError, TypeError, ValueError):  # what argparse refuses
    return True
  return False


@st.composite
def bad_command_line(draw, f, out):
  """``(argv, command or None)``: one bad change to a valid command line."""
  command = draw(st.sampled_from(sorted(OPTION_TYPES)))
  argv = _base_argv(command, f, out)
  how = draw(st.sampled_from(["value", "value", "value", "late", "unknown", "missing_value",
                              "positional", "extra", "json_value", "top"]))
  if how == "value":
    option, kind = draw(st.sampled_from(sorted(OPTION_TYPES[command].items())))
    value = draw(VALUES.filter(lambda v: _rejects(kind, v)))
    if draw(st.booleans()):
      return argv + [f"{option}={value}"], command
    return argv + [option, value], command
  if how == "late":
    extra = draw(st.sampled_from(LATE_BAD[command]))
    return argv + [x.format(out=out, dir=f["root"]) for x in extra], command
  if how == "unknown":  # none is a prefix (an abbreviation) of a real option
    return argv + [draw(st.sampled_from(["--x", "--frobnicate", "--lamb", "--states2", "-x",
                                         "--out-dir", "--x\ny"]))], command
  if how == "missing_value":
    option = draw(st.sampled_from(sorted(OPTION_TYPES[command])))
    return argv + [option], command
  if how == "positional":  # drop the positional argument(s) or, for fit, --out
    if command == "fit" and draw(st.booleans()):
      i = argv.index("--out")
      return argv[:i] + argv[i + 2:], command
    first_option = next(i for i, a in enumerate(argv) if a.startswith("--"))
    keep = draw(st.integers(1, first_option - 1))  # keep the command and some positionals
    return argv[:keep] + argv[first_option:], command
  if how == "extra":
    return argv + [draw(st.sampled_from(["extra.npz", f["traces"], "0.5", "a\nb"]))], command
  if how == "json_value":
    return argv + [draw(st.sampled_from(["--json=1", "--json=yes", "--json="]))], command
  return draw(st.sampled_from([[], ["frobnicate"], ["fitt", f["traces"]], ["FIT"],
                               ["--json"], ["--xyz"]])), None


@settings(max_examples=150)
@given(st.data())
def test_bad_arguments_exit_2_one_line_nothing_written(inputs, data):
  with workdir() as out:
    argv, command = data.draw(bad_command_line(inputs, out), "argv")
    before = listing(inputs["root"])
    code, stdout, err = run_cli(argv)
    assert_usage_error(code, stdout, err, command)
    assert listing(out) == [], listing(out)
    assert listing(inputs["root"]) == before
  record("cli.bad_args", "exit 2")


# ------------------------------------------------------------------ cli.bad_files
# slot -> (kind of file the slot expects, command line with the file at {bad}, its outputs)
SLOTS = {
    "fit": ("traces", ["fit", "{bad}", "--out", "{out}/p.npz", "--cascade-out", "{out}/c.npz",
                       "--states", "4", "--lam", "0.8", "--json"], ["c.npz", "p.json", "p.npz"]),
    "evaluate.policy": ("policy", ["evaluate", "{bad}", "{traces}", "--resamples", "20", "--json"], []),
    "evaluate.traces": ("traces", ["evaluate", "{policy}", "{bad}", "--resamples", "20", "--json"], []),
    "sweep.traces": ("traces", ["sweep", "{bad}", "--lam", "0:1:3", "--states", "4", "--plot",
                                "{out}/f.png", "--json"], ["f.png"]),
    "sweep.calibration": ("traces", ["sweep", "{traces}", "--calibration", "{bad}", "--lam",
                                     "0:1:3", "--states", "4", "--plot", "{out}/f.png", "--json"],
                          ["f.png"]),
    "solve": ("cascade", ["solve", "{bad}", "--lam", "0.3", "--plot", "{out}/i.png", "--json"],
              ["i.png"]),
}
# Result fields that hold paths (or the fit date): the rest must match the unbroken file's.
PATH_FIELDS = {"fit": ("policy", "cascade", "metadata"), "evaluate": ("policy", "traces"),
               "sweep": ("traces", "calibration", "how", "plot"), "solve": ("cascade", "plot")}
WRONG_KIND = {"traces": ["policy", "cascade", "sidecar"], "policy": ["traces", "cascade", "sidecar"],
              "cascade": ["traces", "policy", "sidecar"]}
LOADERS = {"traces": load_traces, "policy": tj.load_policy, "cascade": load_cascade}
MUTATIONS = ["truncated", "bitflip", "bitflip", "bitflip", "empty", "text", "bytes", "zip_junk",
             "directory", "missing", "dangling_link", "foreign_npz", "npy", "wrong_kind"]


def _same(a, b):
  """Equal pytrees of arrays (traces, cascades, deployed policies)."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _loads_intact(kind, path, original):
  """True if the loader gives back ``original``, False if it refuses the file; a
  different object (silent corruption) fails the test."""
  try:
    loaded = LOADERS[kind](path)
  except ValueError:
    return False
  assert _same(loaded, original), f"{path}: loaded silently altered {kind}"
  return True


def _comparable(command, result):
  return {k: v for k, v in result.items() if k not in PATH_FIELDS[command]}


def _write_bad(data, mutation, kind, f, bad, mismatch):
  """Writes the broken input at ``bad``; returns whether the loader might accept it.
  ``mismatch``: traces of another number of stages are wrong here too."""
  raw = open(f[kind], "rb").read()
  if mutation == "truncated":
    open(bad, "wb").write(raw[:data.draw(st.integers(0, len(raw) - 1), "cut at")])
  elif mutation == "bitflip":
    bit = data.draw(st.integers(0, 8 * len(raw) - 1), "bit")
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    open(bad, "wb").write(bytes(flipped))
    return True
  elif mutation == "empty":
    open(bad, "wb").close()
  elif mutation == "text":
    open(bad, "w").write(data.draw(st.text(min_size=1, max_size=200), "text"))
  elif mutation == "bytes":
    open(bad, "wb").write(data.draw(st.binary(min_size=1, max_size=300), "bytes"))
  elif mutation == "zip_junk":  # a zip signature, then garbage
    open(bad, "wb").write(b"PK\x03\x04" + data.draw(st.binary(max_size=300), "bytes"))
  elif mutation == "directory":
    os.mkdir(bad)
  elif mutation == "dangling_link":
    os.symlink(bad + ".nowhere", bad)
  elif mutation == "foreign_npz":  # a valid archive written by NumPy, not by ttamer_jax
    with open(bad, "wb") as fh:
      np.savez(fh, scores=np.zeros((3, 2)), values=np.zeros((2, 2)))
  elif mutation == "npy":
    with open(bad, "wb") as fh:
      np.save(fh, np.zeros((3, 2)))
  elif mutation == "wrong_kind":
    other = data.draw(st.sampled_from(WRONG_KIND[kind] + (["two_stages"] if mismatch else [])),
                      "other kind")
    shutil.copyfile(f[other], bad)
  # "missing": nothing written
  return False


@pytest.fixture(scope="module")
def baselines(inputs):
  """Results of every slot's command line on the unbroken file (computed when needed)."""
  cache = {}

  def get(slot):
    if slot not in cache:
      kind, line, _ = SLOTS[slot]
      out = os.path.join(inputs["root"], "baseline_" + slot)
      os.mkdir(out)
      argv = [a.format(bad=inputs[kind], out=out, **inputs) for a in line]
      code, stdout, err = run_cli(argv)
      assert_ok(code, stdout, err)
      cache[slot] = (json.loads(stdout), out)
    return cache[slot]

  return get


@settings(max_examples=100)
@given(st.data())
def test_bad_files_exit_2_one_line_nothing_written(inputs, baselines, data):
  slot = data.draw(st.sampled_from(sorted(SLOTS)), "slot")
  kind, line, outputs = SLOTS[slot]
  mutation = data.draw(st.sampled_from(MUTATIONS), "mutation")
  command = line[0]
  with workdir() as d:
    folder, out = os.path.join(d, "in"), os.path.join(d, "out")
    os.mkdir(folder)
    os.mkdir(out)
    bad = os.path.join(folder, "bad.npz")
    maybe_ok = _write_bad(data, mutation, kind, inputs, bad,
                          slot in ("evaluate.traces", "sweep.calibration"))
    intact = maybe_ok and _loads_intact(kind, bad, LOADERS[kind](inputs[kind]))
    argv = [a.format(bad=bad, out=out, **inputs) for a in line]
    before = listing(folder)
    code, stdout, err = run_cli(argv)
    assert listing(folder) == before  # nothing left beside the input either
    if not intact:
      assert_usage_error(code, stdout, err, command)
      assert listing(out) == [], listing(out)
      record("cli.bad_files", "exit 2")
      return
    # The flip left the content intact (a zip timestamp, say): the unbroken file's result.
    assert_ok(code, stdout, err)
    assert listing(out) == outputs
    expected, expected_out = baselines(slot)
    assert _comparable(command, json.loads(stdout)) == _comparable(command, expected)
    for name in outputs:
      if name.endswith(".npz"):
        load = tj.load_policy if name == "p.npz" else load_cascade
        assert _same(load(os.path.join(out, name)), load(os.path.join(expected_out, name)))
  record("cli.bad_files", "exit 0 (flip left the content intact)")


# ------------------------------------------------------------------ cli.subprocess
# The real `python -m ttamer_jax` (what the `ttamer` script runs): each pays for
# starting Python and importing JAX, so a few, side by side.
SUBPROCESS_CASES = {
    "bad lam spec": ["fit", "{traces}", "--out", "{out}/p.npz", "--lam", "0:1:0"],
    "truncated traces": ["evaluate", "{policy}", "{truncated}", "--json"],
    "directory as cascade": ["solve", "{root}", "--plot", "{out}/i.png"],
}


@pytest.fixture(scope="module")
def subprocess_runs(inputs, tmp_path_factory):
  raw = open(inputs["traces"], "rb").read()
  files = dict(inputs, truncated=os.path.join(inputs["root"], "truncated.npz"))
  open(files["truncated"], "wb").write(raw[: len(raw) // 3])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

  def run(name):
    out = str(tmp_path_factory.mktemp("fuzz_cli_subprocess"))
    argv = [a.format(out=out, **files) for a in SUBPROCESS_CASES[name]]
    proc = subprocess.run([sys.executable, "-m", "ttamer_jax", *argv], capture_output=True,
                          text=True, env=env, cwd=out, timeout=300)
    return proc, out

  with concurrent.futures.ThreadPoolExecutor(max_workers=len(SUBPROCESS_CASES)) as pool:
    futures = {name: pool.submit(run, name) for name in SUBPROCESS_CASES}
    return {name: fut.result() for name, fut in futures.items()}


@pytest.mark.parametrize("name", sorted(SUBPROCESS_CASES))
def test_subprocess_bad_input_exit_2_one_line(subprocess_runs, name):
  proc, out = subprocess_runs[name]
  assert_usage_error(proc.returncode, proc.stdout, proc.stderr, SUBPROCESS_CASES[name][0])
  assert listing(out) == []
  record("cli.subprocess", "exit 2")
