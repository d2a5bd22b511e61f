"""The ``ttamer`` command line, driven as a user drives it.

Every subcommand runs once through a subprocess (``python -m ttamer_jax``, which
is what the ``ttamer`` console script calls), together with a few bad paths and
malformed files; the subprocesses are launched side by side in one fixture, since
each pays for starting Python and JAX. The wider matrix of bad inputs runs
in-process through ``cli.main(argv)``, which is the same code path minus the
interpreter start.
"""

import concurrent.futures
import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax import fit_cascade, load_cascade, load_traces, save_cascade, save_traces
from ttamer_jax.app import cli, commands, compare, reports
from ttamer_jax.data import CASCADE_FORMAT_VERSION, paths
from ttamer_jax.data.archive import write_npz_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ files
def _synthetic_traces():
  cascade = tj.overthinking_cascade(num_stages=4, num_states=8)
  k_cal, k_test = jax.random.split(jax.random.PRNGKey(0))
  return (tj.workload_traces(k_cal, cascade, 1500),
          tj.workload_traces(k_test, cascade, 1500))


def _flip_payload(src, dst, array):
  """Copies ``src`` to ``dst`` with one bit flipped inside ``array``'s stored bytes
  (always detected: zip CRC or SHA-256), so the file must be refused."""
  raw = bytearray(open(src, "rb").read())
  data = np.ascontiguousarray(array).tobytes()
  pos = bytes(raw).find(data)
  assert pos >= 0, "array bytes not found (compressed archive?)"
  raw[pos + len(data) // 2] ^= 0x10
  open(dst, "wb").write(bytes(raw))


def _make_files(root):
  cal, test = _synthetic_traces()
  f = {k: os.path.join(root, v) for k, v in dict(
      cal="cal.npz", test="test.npz", cascade="cascade.npz", policy="policy.npz",
      truncated="truncated.npz", flipped_traces="flipped_traces.npz",
      flipped_cascade="flipped_cascade.npz", flipped_policy="flipped_policy.npz",
      text="notes.npz", empty="empty.npz", missing="missing.npz",
      three_stages="three_stages.npz", future="future.npz", bad_rows="bad_rows.npz",
      cal_csv="cal.csv", cal_pq="cal.pq", test_csv="test.csv", test_parquet="test.parquet",
      cal_txt="cal.txt", no_loss_csv="no_loss.csv", no_loss2_parquet="no_loss2.parquet",
      nan_csv="nan.csv", nan_parquet="nan.parquet", savez="savez.npz").items()}
  save_traces(f["cal"], cal)
  save_traces(f["test"], test)
  cascade = tj.demo_cascade(4, 6)
  save_cascade(f["cascade"], cascade)
  fitted = fit_cascade(cal, 8, score="max_softmax")
  tj.save_policy(f["policy"], fitted.recall_policy(0.9))
  raw = open(f["test"], "rb").read()
  open(f["truncated"], "wb").write(raw[: len(raw) // 2])
  _flip_payload(f["test"], f["flipped_traces"], np.asarray(test.losses))
  _flip_payload(f["cascade"], f["flipped_cascade"], np.asarray(cascade.trans))
  _flip_payload(f["policy"], f["flipped_policy"], np.asarray(fitted.recall_policy(0.9).policy.index))
  open(f["text"], "w").write("not an archive\n")
  open(f["empty"], "wb").close()
  save_traces(f["three_stages"], tj.ExitTraces(
      scores=test.scores[:100, :3], preds=test.preds[:100, :3], losses=test.losses[:100, :3],
      costs=test.costs[:3], signals={k: v[:100, :3] for k, v in test.signals.items()}))
  arrays = {k: np.asarray(getattr(cascade, k)) for k in ("values", "init", "trans", "costs")}
  write_npz_atomic(f["future"], dict(arrays, kind=np.asarray("ttamer_jax.Cascade"),
                                     format_version=np.asarray(CASCADE_FORMAT_VERSION + 1)))
  bad = dict(arrays)
  bad["trans"] = bad["trans"].copy()
  bad["trans"][1, 2, 0] += 0.5  # row no longer sums to 1
  write_npz_atomic(f["bad_rows"], dict(bad, kind=np.asarray("ttamer_jax.Cascade"),
                                       format_version=np.asarray(CASCADE_FORMAT_VERSION)))
  # The same traces as tables (long and wide form), and broken tables.
  long_cal, wide_cal = tj.traces_to_table(cal), tj.traces_to_table(cal, form="wide")
  long_test, wide_test = tj.traces_to_table(test), tj.traces_to_table(test, form="wide")
  long_cal.to_csv(f["cal_csv"], index=False)
  wide_cal.to_parquet(f["cal_pq"])
  long_test.to_csv(f["test_csv"], index=False)
  wide_test.to_parquet(f["test_parquet"])
  long_cal.to_csv(f["cal_txt"], index=False)  # a table, but not a name the readers know
  long_cal.drop(columns="loss").to_csv(f["no_loss_csv"], index=False)
  wide_test.drop(columns="loss_2").to_parquet(f["no_loss2_parquet"])
  long_cal.assign(loss=np.where(np.arange(len(long_cal)) == 7, np.nan, long_cal["loss"])).to_csv(
      f["nan_csv"], index=False)
  wide_test.assign(score_1=np.where(np.arange(len(wide_test)) == 7, np.nan, wide_test["score_1"])
                   ).to_parquet(f["nan_parquet"])
  # The documented fields written with np.savez instead of save_traces: no checksums.
  np.savez(f["savez"], kind=np.asarray("ttamer_jax.ExitTraces"), format_version=np.asarray(1),
           scores=np.asarray(test.scores), preds=np.asarray(test.preds),
           losses=np.asarray(test.losses), costs=np.asarray(test.costs),
           signal_names=np.asarray([], dtype=str))
  return f


def _env(cache):
  env = dict(os.environ, TTAMER_CACHE=cache, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  return env


def _in_process(argv):
  """``cli.main(argv)`` in this process, as a finished subprocess (code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(argv)
    except SystemExit as e:  # argparse's refusals exit, as in the program
      code = e.code
  return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _ttamer(argv, env, cwd):
  return subprocess.run([sys.executable, "-m", "ttamer_jax", *argv], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ttamer_cache):
  """Input files, and every subprocess run of this module (three at a time)."""
  root = str(tmp_path_factory.mktemp("cli"))
  f = _make_files(root)
  out = lambda name: os.path.join(root, name)
  runs = {
      "demo": ["demo", "--quick", "--out", out("demo")],   # the default workload: the model cascade
      "demo_digits": ["demo", "--workload", "digits", "--quick", "--no-plots", "--json", "--out",
                      out("demo_digits")],
      "fit": ["fit", f["cal"], "--candidates", "recall", "--states", "6", "--out", out("fit.npz"),
              "--cascade-out", out("fit_cascade.npz"), "--json"],
      "fit_select": ["fit", f["cal"], "--lam", "0.9", "--out", out("fit_select.npz")],
      "evaluate": ["evaluate", f["policy"], f["test"], "--resamples", "200", "--json"],
      "sweep": ["sweep", f["test"], "--calibration", f["cal"], "--lam", "0:1:21", "--plot",
                out("sweep.png"), "--json"],
      "solve": ["solve", f["cascade"], "--lam", "0.3", "--plot", out("index.png")],
      "bench": ["bench", "--sections", "numpy", "--repeats", "1", "--out", out("bench.json"),
                "--json"],
      # a bad path, as the program: exit 2, one line, nothing written
      "fit_missing": ["fit", f["missing"], "--out", out("never1.npz")],
  }
  # More refusals, in this process (the same main(); they stop before any compilation):
  # the program's own exit code and streams are checked by fit_missing above.
  in_process = {
      "evaluate_truncated": ["evaluate", f["policy"], f["truncated"], "--json"],
      "solve_flipped": ["solve", f["flipped_cascade"], "--lam", "0.3", "--plot", out("never2.png")],
      "sweep_bad_lam": ["sweep", f["test"], "--lam", "0:2:5", "--plot", out("never3.png")],
  }
  cache = ttamer_cache  # the run's, shared with test_notebooks.py
  env = _env(cache)
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    # The demo first: it is the longest.
    futures = {name: pool.submit(_ttamer, argv, env, root) for name, argv in runs.items()}
    results = {name: fut.result() for name, fut in futures.items()}
  results.update({name: _in_process(argv) for name, argv in in_process.items()})
  return dict(files=f, root=root, out=out, runs=results, cache=cache)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return proc


def _bad(proc, *fragments):
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stdout == ""
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def _png(path):
  assert open(path, "rb").read(8) == PNG_MAGIC
  import matplotlib.image
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 200 and image.shape[1] > 300


# ------------------------------------------------------------------ subprocess runs
def test_demo_writes_every_artefact_and_prints_the_answer_first(world):
  proc = _ok(world["runs"]["demo"])
  d = world["out"]("demo")
  expected = {"pareto.png", "index_heatmap.png", "exit_histograms.png", "policy.npz", "policy.json",
              "calibration_traces.npz", "test_traces.npz", "cascade.npz", "report.md",
              "results.json"}
  assert set(os.listdir(d)) == expected
  for name in ("recall optimum", "no-recall optimum", "confidence threshold", "patience",
               "hindsight oracle"):
    assert name in proc.stdout
  for name in expected:  # says where it wrote everything
    assert os.path.join(d, name) in proc.stdout
  for png in ("pareto.png", "index_heatmap.png", "exit_histograms.png"):
    _png(os.path.join(d, png))
  results = json.load(open(os.path.join(d, "results.json")))
  # The default workload: the scikit-learn model cascade (--quick: 2,400 test requests).
  assert results["workload"] == "sklearn-cascade-6class" and results["quick"] is True
  assert results["test_requests"] == 2400 and results["info"]["costs"] == "measured"
  rows = {r["policy"]: r for r in results["operating_points"]}
  assert set(rows) == set(compare.POLICIES)
  # The saved policy is the one cross-fitting chose on calibration, and its held-out
  # numbers are what the demo reports as measured on the test split.
  deployed, meta = tj.load_policy(os.path.join(d, "policy.npz"), with_metadata=True)
  selected = results["selected"]
  assert meta["user"]["chosen"] == selected["name"] and meta["lam"] == selected["solve_lam"]
  assert results["info"]["costs"] == meta["user"]["costs"] == "measured"
  test = load_traces(os.path.join(d, "test_traces.npz"))
  ev = tj.evaluate(deployed, test, 0.5, num_resamples=10)
  assert float(ev.error) == pytest.approx(selected["test"]["error"], abs=1e-9)
  assert float(ev.cost_norm) == pytest.approx(selected["test"]["cost_norm"], abs=1e-9)
  # The answer comes first, right after the three header lines: the deployed policy
  # against the best simple rule tuned on the same split, held out, with a sentence.
  answer = results["answer"]
  assert answer["deployed"]["name"] == selected["name"] and answer["mode"] == "tolerance"
  assert answer["deployed"]["test"]["error"][0] == pytest.approx(selected["test"]["error"])
  assert not answer["rule"]["ttamer"] and answer["verdict"] in ("better", "no better", "worse")
  lines = proc.stdout.splitlines()
  first = lines.index(next(l for l in lines if l.startswith("ttamer demo: ")))
  assert lines[first + 4].startswith("The answer (held out; 95% intervals, paired bootstrap;")
  assert f"  deployed (ttamer): {selected['name']}" in lines[first + 5]
  verdict = next(l for l in lines if l.lstrip().startswith("=> "))
  assert lines.index(verdict) < lines.index(next(l for l in lines if l.startswith("policy ")))
  assert (answer["verdict"].capitalize() in verdict or "deploys that rule itself" in verdict)
  # "(ttamer)" marks the deployed policy's family in the table, whatever family it is.
  family = {"recall": "recall optimum", "no_recall": "no-recall optimum",
            "confidence": "confidence threshold", "per_stage": "per-stage thresholds",
            "patience": "patience", "fixed_exit": "fixed exit"}[selected["kind"]]
  marked = [l for l in lines if "(ttamer)  " in l]
  assert marked and all(l.startswith(family + " (ttamer)") for l in marked)
  # The heatmap shows the saved policy when it is a recall policy: its lam, and the optimum
  # of the saved cascade there; else the recall family's at its operating point (8 states).
  cascade = load_cascade(os.path.join(d, "cascade.npz"))
  assert 0 <= results["chosen_lam"] <= 1
  if isinstance(deployed.policy, tj.core.RecallPolicy):
    assert results["chosen_lam"] == selected["solve_lam"] == meta["lam"]
    np.testing.assert_allclose(tj.solve_recall(cascade, results["chosen_lam"]).index,
                               deployed.policy.index, rtol=1e-5)
  else:
    assert cascade.num_states == 8
  # The compiled programs were kept in the cache the environment named.
  assert os.listdir(os.path.join(world["cache"], "xla"))
  report = open(os.path.join(d, "report.md")).read()
  assert "## The answer\n\n```\nThe answer (held out" in report
  assert "## Least held-out error within a latency budget" in report
  assert "cost <= 25%" in proc.stdout and "mean error gap to the recall frontier" in proc.stdout


def test_demo_on_the_digits_network_trains_serves_and_reports(world):
  """The network path of the demo (--workload digits, --no-plots, --json): trained into the
  cache, plain progress lines on a pipe, the deployed policy served next to the full
  network, stdout the JSON document of results.json."""
  proc = _ok(world["runs"]["demo_digits"])
  d = world["out"]("demo_digits")
  results = json.loads(proc.stdout)
  assert results == json.load(open(os.path.join(d, "results.json")))
  assert results["workload"] == "digits-cnn" and results["quick"] is True
  assert "pareto_plot" not in results["files"] and os.path.exists(results["files"]["policy"])
  assert not any(name.endswith(".png") for name in os.listdir(d))
  selected = results["selected"]
  assert results["policy"]["lam"] == selected["solve_lam"]  # the deployed, selected policy
  assert results["info"]["costs"] == "measured"
  assert results["answer"]["deployed"]["name"] == selected["name"]
  served = selected["served"]
  assert served["serve_seconds"] > 0 and served["full_seconds"] > 0
  # The network was trained into the cache the environment named.
  assert "digits-cnn-seed0-steps150.npz" in os.listdir(world["cache"])
  # stderr is a pipe, not a terminal: training progress is plain lines (step, ETA, loss),
  # never a bar redrawn with carriage returns.
  assert "\r" not in proc.stderr
  train = [l for l in proc.stderr.splitlines() if l.startswith("train EarlyExitCNN: ")]
  assert train and train[-1].startswith("train EarlyExitCNN: 150/150 (100%)") and "loss " in train[-1]
  report = open(os.path.join(d, "report.md")).read()
  assert "costs: measured (the policies are fitted" in report
  assert "chosen by cross-fitting on the calibration split" in report
  assert "Served on the test split" in report and "## The answer" in report
  if selected["model_check"] is not None:
    assert "modelled" in report and "measured" in report


def test_fit_json_and_files(world):
  result = json.loads(_ok(world["runs"]["fit"]).stdout)
  out = world["out"]
  deployed, meta = tj.load_policy(out("fit.npz"), with_metadata=True)
  assert meta == result["metadata"] and meta["num_states"] == 6 and meta["score_name"] == "max_softmax"
  assert 0 <= result["lam"] <= 1 and result["lam_choice"].startswith("auto")
  sel = result["selection"]
  assert sel["chosen"]["name"] == "recall[max_softmax, 6 quantile states]" and sel["runner_up"] is None
  assert meta["full_cost"] == pytest.approx(sel["full_cost"]) and "unit-free" in meta["cost_unit"]
  check = sel["model_check"]  # modelled vs measured, in sample and cross-fitted
  for where in ("in_sample", "cross_fitted"):
    for q in check[where].values():
      assert q["ci"][0] <= q["measured"] <= q["ci"][1]
      assert q["inside"] == (q["ci"][0] - 1e-5 <= q["predicted"] <= q["ci"][1] + 1e-5)
  assert os.path.exists(out("fit.json"))
  # The policy is the recall optimum of the saved cascade at the recorded lam.
  cascade = load_cascade(out("fit_cascade.npz"))
  np.testing.assert_allclose(deployed.policy.index, tj.solve_recall(cascade, result["lam"]).index,
                             rtol=1e-6)


def test_fit_chooses_by_cross_fitting_and_says_what_and_why(world):
  proc = _ok(world["runs"]["fit_select"])
  out = world["out"]
  deployed, meta = tj.load_policy(out("fit_select.npz"), with_metadata=True)
  assert "chose by 5-fold cross-fitting among" in proc.stdout
  assert f"chosen     {meta['user']['chosen']}" in proc.stdout and "runner-up" in proc.stdout
  assert "model check of" in proc.stdout and "modelled" in proc.stdout
  # One warning line exactly when the model's J lies outside its replay interval.
  warned = [line for line in proc.stdout.splitlines() if line.startswith("warning: model check")]
  outside = "<- outside" in "\n".join(line for line in proc.stdout.splitlines() if " J " in line)
  assert len(warned) == int(outside)


def test_evaluate_json_matches_library(world):
  result = json.loads(_ok(world["runs"]["evaluate"]).stdout)
  f = world["files"]
  deployed = tj.load_policy(f["policy"])
  expected = tj.evaluate(deployed, load_traces(f["test"]), 0.9, num_resamples=200).as_dict()
  assert result["lam"] == pytest.approx(0.9)
  for key in ("error", "cost_norm", "objective", "stop_histogram", "answer_histogram"):
    np.testing.assert_allclose(result["evaluation"][key], expected[key], rtol=1e-6, atol=1e-9)
  lo, hi = result["evaluation"]["error_ci"]
  assert lo <= result["evaluation"]["error"] <= hi


def test_sweep_json_and_plot(world):
  result = json.loads(_ok(world["runs"]["sweep"]).stdout)
  _png(world["out"]("sweep.png"))
  assert len(result["lams"]) == 21
  assert {r["policy"] for r in result["operating_points"]} == set(compare.POLICIES)
  assert len(result["frontiers"]["recall"]) == 21
  assert result["plot"] == world["out"]("sweep.png")


def test_solve_text_and_heatmap(world):
  proc = _ok(world["runs"]["solve"])
  _png(world["out"]("index.png"))
  cascade = load_cascade(world["files"]["cascade"])
  recall = float(tj.solve_recall(cascade, 0.3).value)
  assert f"{recall:10.5f}" in proc.stdout
  assert "stop iff lam * best loss so far <= index" in proc.stdout
  assert len([l for l in proc.stdout.splitlines() if l.strip().startswith(("0 ", "1 ", "2 ", "3 "))]) >= 4


def test_bench_json(world):
  proc = world["runs"]["bench"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)  # tables went to stderr; stdout is JSON only
  assert result["mode"] == "quick" and "numpy" in result
  assert all(c["ok"] for c in result["checks"])
  assert json.load(open(world["out"]("bench.json")))["mode"] == "quick"


def test_bad_path_exit_2(world):
  _bad(world["runs"]["fit_missing"], "missing.npz", "no such traces file")
  assert not os.path.exists(world["out"]("never1.npz"))
  assert not os.path.exists(world["out"]("never1.json"))


def test_truncated_file_exit_2(world):
  _bad(world["runs"]["evaluate_truncated"], "truncated.npz", "not a readable traces")


def test_flipped_bit_exit_2(world):
  _bad(world["runs"]["solve_flipped"], "flipped_cascade.npz", "'trans'")
  assert not os.path.exists(world["out"]("never2.png"))


def test_bad_argument_exit_2(world):
  _bad(world["runs"]["sweep_bad_lam"], "--lam", "[0, 1]")
  assert not os.path.exists(world["out"]("never3.png"))


# ------------------------------------------------------------------ in-process matrix
def _main(capsys, argv):
  code = cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


BAD_CASES = [
    # (command line with {placeholders}, fragment of the message)
    ("fit {missing} --out {new}", "no such traces file"),
    ("fit {text} --out {new}", "not a readable traces"),
    ("fit {empty} --out {new}", "not a readable traces"),
    ("fit {flipped_traces} --out {new}", "'losses'"),
    ("fit {policy} --out {new}", "not a traces file"),
    ("fit {cal} --out {root}", "is a directory"),
    ("fit {cal} --out {missing}/p.npz", "does not exist"),
    ("fit {cal} --out {new} --score nope", "no signal named 'nope'"),
    ("fit {cal} --out {new} --feature agree_prev --states 5", "must be even"),
    ("evaluate {missing} {test}", "no such policy file"),
    ("evaluate {policy} {missing}", "no such traces file"),
    ("evaluate {flipped_policy} {test}", "'policy.index'"),
    ("evaluate {test} {test}", "not a policy file"),
    ("evaluate {policy} {cascade}", "not a traces file"),
    ("evaluate {policy} {three_stages}", "4 stages"),
    ("evaluate {policy} {truncated}", "not a readable traces"),
    ("sweep {missing}", "no such traces file"),
    ("sweep {test} --calibration {truncated}", "not a readable traces"),
    ("sweep {test} --calibration {three_stages}", "3 stages"),
    ("sweep {test} --plot {missing}/f.png", "does not exist"),
    ("sweep {test} --confidence-score nope", "no signal named 'nope'"),
    ("solve {missing}", "no such cascade file"),
    ("solve {test}", "not a cascade file"),
    ("solve {future}", "format_version = 2 is not supported"),
    ("solve {bad_rows}", "trans"),
    ("solve {text}", "not a readable cascade"),
    ("solve {cascade} --lam 0:1:3 --plot {root}/i.png", "single --lam"),
    ("demo --out {text}", "not a folder"),
    ("demo --quick --out {missing}/sub/dir", "does not exist"),
    ("bench --sections floor,nope --out {new}", "unknown ['nope']"),
    ("bench --quick --full --out {new}", "exclude each other"),
    ("bench --repeats 0 --out {new}", "--repeats 0"),
    # tables: every command that takes traces reads .csv / .parquet with the table loader's messages
    ("fit {cal_txt} --out {new}", "cal.txt: unknown traces file type (extension '.txt'); use one "
                                  "of .npz, .csv, .parquet, .pq"),
    ("fit {no_loss_csv} --out {new}", "no_loss.csv: column 'loss': missing from the long-form table"),
    ("fit {nan_csv} --out {new}", "nan.csv: column 'loss': missing value (NaN) in row 7"),
    ("evaluate {policy} {no_loss2_parquet}", "column 'loss_2': missing from the wide-form table"),
    ("evaluate {policy} {nan_parquet}", "nan.parquet: column 'score_1': missing value (NaN) in row 7"),
    ("evaluate {policy} {cal_txt}", "unknown traces file type"),
    ("sweep {nan_csv} --lam 0:1:5", "column 'loss': missing value (NaN) in row 7"),
    ("sweep {no_loss2_parquet}", "column 'loss_2': missing"),
    ("sweep {test_parquet} --calibration {no_loss_csv}", "no_loss.csv: column 'loss': missing"),
    ("sweep {test_csv} --calibration {nan_parquet}", "column 'score_1': missing value (NaN) in row 7"),
    ("sweep {test} --calibration {cal_txt}", "unknown traces file type"),
    # np.savez of the documented fields: say how to write the file
    ("fit {savez} --out {new}", "field 'checksums' is missing (not a ttamer_jax traces file; "
                                "write it with ttamer_jax.save_traces)"),
    ("evaluate {policy} {savez}", "write it with ttamer_jax.save_traces"),
    # output paths, checked before any work
    ("sweep {test} --plot {root}/f.txt", "--plot {root}/f.txt: not an image file name (extension "
                                         "'.txt'); use .png, .pdf or .svg"),
    ("sweep {test} --plot {root}/frontier", "not an image file name (no extension)"),
    ("solve {cascade} --lam 0.3 --plot {root}/i.txt", "not an image file name"),
    ("fit {cal} --out {cal}", "is an input file of this command"),
    ("fit {cal} --out {new} --cascade-out {cal}", "is an input file of this command"),
]


@pytest.fixture(scope="module")
def files(world):
  return world["files"]


@pytest.mark.parametrize("line,fragment", BAD_CASES)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(files, tmp_path, capsys, line, fragment):
  new = tmp_path / "new.npz"
  argv = line.format(new=new, root=tmp_path, **files).split()
  before = {k: os.path.getmtime(v) for k, v in files.items() if os.path.exists(v)}
  code, out, err = _main(capsys, argv)
  fragment = fragment.format(root=tmp_path)
  assert code == 2, (out, err)
  assert out == "" and len(err.strip().splitlines()) == 1 and fragment in err, err
  assert err.startswith(f"ttamer {argv[0]}: error: ")
  assert os.listdir(tmp_path) == []  # nothing written, not even a temporary file
  assert not os.path.exists(files["missing"])
  assert before == {k: os.path.getmtime(v) for k, v in files.items() if os.path.exists(v)}


# ------------------------------------------------------------------ tables, paths, progress
def _progress_lines(err, prefix):
  """The plain progress lines of a run whose stderr is not a terminal."""
  assert "\r" not in err and "\x1b" not in err  # no carriage-return redraws, no escapes
  lines = err.strip().splitlines()
  assert lines and all(line.startswith(prefix) for line in lines), err
  return lines


def test_fit_reads_csv_and_parquet_like_npz(world, tmp_path, capsys):
  """`ttamer fit` on the same traces as a CSV (long form) and Parquet (wide form) table
  chooses and saves the same policy as on the .npz (the `fit` run of `world`)."""
  npz = json.loads(_ok(world["runs"]["fit"]).stdout)
  expected = tj.load_policy(world["out"]("fit.npz"))
  for key in ("cal_csv", "cal_pq"):
    out = tmp_path / f"{key}.npz"
    code, stdout, err = _main(capsys, ["fit", world["files"][key], "--candidates", "recall",
                                       "--states", "6", "--out", str(out), "--json"])
    assert code == 0, err
    result = json.loads(stdout)
    assert result["selection"] == npz["selection"] and result["lam"] == npz["lam"]
    np.testing.assert_array_equal(tj.load_policy(out).policy.index, expected.policy.index)
    # stderr is not a terminal here: plain progress lines, never a redrawn bar
    _progress_lines(err, "fit: cross-fitting 1 candidate x 5 folds: ")


def test_evaluate_reads_csv_and_parquet_like_npz(world, capsys):
  npz = json.loads(_ok(world["runs"]["evaluate"]).stdout)
  assert npz["warnings"] == [] and "warning" not in world["runs"]["evaluate"].stderr
  for key in ("test_csv", "test_parquet"):
    code, stdout, err = _main(capsys, ["evaluate", world["files"]["policy"], world["files"][key],
                                       "--resamples", "200", "--json"])
    assert code == 0 and err == "", err
    result = json.loads(stdout)
    assert result["evaluation"] == npz["evaluation"] and result["lam"] == npz["lam"]


def test_sweep_reads_csv_and_parquet_like_npz(world, capsys):
  npz = json.loads(_ok(world["runs"]["sweep"]).stdout)
  f = world["files"]
  for traces, cal in ((f["test_csv"], f["cal_pq"]), (f["test_parquet"], f["cal_csv"])):
    code, stdout, err = _main(capsys, ["sweep", traces, "--calibration", cal, "--lam", "0:1:21",
                                       "--json"])
    assert code == 0, err
    result = json.loads(stdout)
    for key in ("operating_points", "objectives", "errors_at_budgets", "frontier_gaps", "frontiers"):
      assert result[key] == npz[key], key
    _progress_lines(err, "sweep: ")
  # Without --calibration: a random split of the one table, the same split as of the .npz.
  runs = []
  for traces in (f["test"], f["test_parquet"], f["test_csv"]):
    code, stdout, err = _main(capsys, ["sweep", traces, "--lam", "0:1:5", "--no-progress",
                                       "--json"])
    assert code == 0 and err == "", err  # --no-progress: nothing on stderr
    runs.append(json.loads(stdout))
  for run in runs[1:]:
    assert run["operating_points"] == runs[0]["operating_points"]
    assert run["errors_at_budgets"] == runs[0]["errors_at_budgets"]


def test_sweep_prints_errors_at_budgets_and_frontier_gaps(world):
  """The sweep result holds, per family, the least held-out error at each cost budget
  (read off its held-out frontier) and the mean gaps to recall; the text explains '-'."""
  result = json.loads(_ok(world["runs"]["sweep"]).stdout)
  assert result["budgets"] == list(compare.COST_BUDGETS)
  rows = {r["policy"]: r for r in result["errors_at_budgets"]}
  assert set(rows) == set(compare.POLICIES) == set(result["frontier_gaps"]) | {"recall"}
  for name, row in rows.items():
    front = result["frontiers"][name]
    cost = np.array([p["cost_norm"] for p in front])
    err = np.array([p["error"] for p in front])
    for budget, e, c in zip(result["budgets"], row["error"], row["cost"]):
      within = cost <= budget
      if not within.any():
        assert e is None and c is None
      else:
        assert e == pytest.approx(err[within].min()) and c <= budget
  text = reports.sweep_text(result, dict(score="max_softmax", confidence_score="max_softmax",
                                         entropy_score="entropy", tolerance=0.01))
  assert reports.format_budgets(result["errors_at_budgets"], result["budgets"]) in text
  assert "mean error gap to the recall frontier" in text
  # Every '-' cell is explained by a legend line (and the legend appears only then).
  dash_budget = any(e is None for r in result["errors_at_budgets"] for e in r["error"])
  assert ("\n-: the family has no setting whose held-out cost share" in text) == dash_budget
  dash_point = any(r["chosen_param"] is None for r in result["operating_points"])
  assert ("\n-: no setting of that family is within 1 point" in text) == dash_point


def test_output_paths_are_checked_before_any_work(files, tmp_path, capsys, monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("computed before the output paths were checked")

  monkeypatch.setattr(compare, "compare_policies", never)
  monkeypatch.setattr(commands.selection, "fit_policy", never)
  monkeypatch.setattr(commands, "load_cascade", never)
  monkeypatch.setattr(paths, "read_traces", never)
  missing = tmp_path / "missing"
  for argv in (["sweep", files["test"], "--plot", str(tmp_path / "f.txt")],
               ["sweep", files["test_csv"], "--calibration", files["cal_csv"], "--plot",
                str(missing / "f.png")],
               ["solve", files["cascade"], "--lam", "0.3", "--plot", str(tmp_path / "i.pdfx")],
               ["fit", files["cal_csv"], "--out", str(missing / "p.npz")],
               ["fit", files["cal"], "--out", str(tmp_path / "p.npz"), "--cascade-out",
                str(missing / "c.npz")],
               ["fit", files["cal"], "--out", files["cal"]]):
    code, out, err = _main(capsys, argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
  assert os.listdir(tmp_path) == []


def test_evaluate_warns_when_the_json_copy_was_edited(files, tmp_path, capsys):
  """policy.json is a copy for reading; the .npz rules. A hand edit of the copy is
  reported in one warning line on stderr, and the result is the .npz's."""
  from ttamer_jax.data import policy_io

  policy, side = tmp_path / "policy.npz", tmp_path / "policy.json"
  policy.write_bytes(open(files["policy"], "rb").read())
  side.write_text(open(policy_io.sidecar_path(files["policy"])).read())
  _, meta = tj.load_policy(policy, with_metadata=True)
  assert policy_io.sidecar_differences(policy, meta) == []  # as written: no warning
  edited = json.loads(side.read_text())
  edited["lam"] = 0.5
  side.write_text(json.dumps(edited))
  code, out, err = _main(capsys, ["evaluate", str(policy), files["test"], "--resamples", "50",
                                  "--json"])
  assert code == 0
  (line,) = err.strip().splitlines()
  assert line.startswith(f"warning: {side} differs from {policy} (lam: 0.5 in policy.json, "
                         f"{meta['lam']} in policy.npz); the .npz rules"), line
  result = json.loads(out)
  assert result["lam"] == meta["lam"] != 0.5 and result["warnings"] == [line[len("warning: "):]]
  side.write_text("{not json")
  assert policy_io.sidecar_differences(policy, meta) == [
      "policy.json is not a readable JSON document (JSONDecodeError)"]
  side.unlink()
  assert policy_io.sidecar_differences(policy, meta) == []


def test_a_missing_table_dependency_is_one_line(files, capsys, monkeypatch):
  """Without pandas (a core dependency, but an environment may lack it) a table gives
  exit 2 and install lines that work (PyPI packages, or the checkout)."""
  monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
  code, out, err = _main(capsys, ["evaluate", files["policy"], files["test_csv"]])
  assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
  assert "needs pandas" in err and "pip install pandas pyarrow" in err and "pip install -e . in a" in err


@pytest.mark.parametrize("argv", [["fit", "x.npz"], ["solve", "c.npz", "--lam", "1.5"],
                                  ["sweep", "t.npz", "--lam", "0:1:0"], ["evaluate", "p.npz"],
                                  ["demo", "--states", "0"], ["demo", "--costs", "bogus"],
                                  ["frobnicate"], []])
def test_argparse_errors_exit_2_one_line(capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  _, err = capsys.readouterr()
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_of_every_command(capsys, command):
  with pytest.raises(SystemExit) as e:
    cli.main(([command] if command else []) + ["--help"])
  out, _ = capsys.readouterr()
  assert e.value.code == 0 and "usage: ttamer" in out
  if command is None:
    assert all(name in out for name in cli.COMMANDS)
  else:
    assert "--json" in out and "ttamer " + command in out and "Exit codes" in out


def test_demo_costs_option_parses_and_reaches_the_demo(tmp_path, capsys):
  parser = cli.build_parser()
  assert parser.parse_args(["demo"]).costs == "measured"
  assert parser.parse_args(["demo", "--costs", "served"]).costs == "served"
  with pytest.raises(SystemExit):
    cli.main(["demo", "--costs", "bogus"])
  assert "argument --costs: invalid choice: 'bogus'" in capsys.readouterr().err
  # Passed on to the demo, which refuses it without a network before any work.
  code, out, err = _main(capsys, ["demo", "--workload", "sklearn", "--costs", "served", "--out",
                                  str(tmp_path / "d")])
  assert code == 2 and out == "" and err.strip() == (
      "ttamer demo: error: costs: 'served' needs a network workload (digits, sequences, "
      "mnist1d), got 'sklearn'")
  assert os.listdir(tmp_path) == []


def test_compare_with_progress_bar_matches_without():
  cal, test = _synthetic_traces()
  lams = np.linspace(0, 1, 9)
  a = compare.compare_policies(cal, test, num_states=6, lams=lams, progress=True)
  b = compare.compare_policies(cal, test, num_states=6, lams=lams)
  assert a.full_error == b.full_error
  for split in ("calibration", "test"):
    sa, sb = getattr(a, split), getattr(b, split)
    assert list(sa) == list(sb)
    for name in sa:
      for field in ("param", "error", "cost_norm", "stop_histogram", "answer_histogram"):
        np.testing.assert_array_equal(getattr(sa[name], field), getattr(sb[name], field))


def test_lam_values():
  np.testing.assert_allclose(cli.lam_values("0:1:101"), np.linspace(0, 1, 101))
  np.testing.assert_allclose(cli.lam_values("0.1, 0.5,0.9"), [0.1, 0.5, 0.9])
  np.testing.assert_allclose(cli.lam_values("0.3"), [0.3])
  for bad in ("", "a", "0:1", "0:1:0", "-0.1", "0:1.5:3", "nan", "0.5:0.2:x"):
    with pytest.raises(Exception) as e:
      cli.lam_values(bad)
    assert type(e.value).__name__ == "ArgumentTypeError"


def test_bench_defaults_match_the_suite():
  from test_bench import import_benchmark
  bench = import_benchmark("bench")
  args = bench.build_parser("ttamer").parse_args([])
  # Every section but the opt-in ones (the select section takes minutes), in the suite's order.
  assert bench.check_args(args) == [x for x in bench.SECTIONS if x not in bench.OPT_IN]
  assert bench.OPT_IN == ("select",)
  assert not args.full and args.out == "ttamer_bench.json"
  assert cli.bench_harness() == os.path.join(REPO, "benchmarks", "bench.py")


def test_bench_from_an_install_without_the_harness_says_where_it_lives(monkeypatch, capsys):
  monkeypatch.setattr(cli, "bench_harness", lambda: None)
  assert cli.main(["bench", "--sections", "numpy"]) == cli.EXIT_USAGE
  out, err = capsys.readouterr()
  assert out == "" and len(err.strip().splitlines()) == 1
  assert "benchmarks/bench.py in the source repository" in err


def test_jsonable_and_index_text():
  assert reports.jsonable({"a": np.array([1.0, np.inf, -np.inf]), "b": np.float32(0.5),
                           "c": (np.int64(3), float("nan"))}) == {"a": [1.0, "inf", "-inf"],
                                                                 "b": 0.5, "c": [3, "nan"]}
  text = reports.format_index(np.array([[0.25, -np.inf], [np.inf, np.inf]]))
  assert text.splitlines() == ["stage   s=0   s=1", "    0  0.25    go", "    1  stop  stop"]


def test_cascade_file_round_trip(tmp_path):
  c = tj.random_cascade(jax.random.PRNGKey(3), 5, 7)
  save_cascade(tmp_path / "c.npz", c)
  back = load_cascade(tmp_path / "c.npz")
  for field in ("values", "init", "trans", "costs"):
    np.testing.assert_array_equal(getattr(back, field), getattr(c, field))
  with pytest.raises(ValueError, match="expected a ttamer_jax.Cascade"):
    save_cascade(tmp_path / "x.npz", "not a cascade")
  assert sorted(os.listdir(tmp_path)) == ["c.npz"]


def test_console_script_is_declared():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["scripts"]["ttamer"] == "ttamer_jax.app.cli:main"


# ------------------------------------------------------------------ compilation cache
CACHE_ARGV = {"demo": ["demo"], "fit": ["fit", "t.npz", "--out", "p.npz"],
              "evaluate": ["evaluate", "p.npz", "t.npz"], "sweep": ["sweep", "t.npz"],
              "solve": ["solve", "c.npz"]}


def test_every_command_turns_on_the_compilation_cache(monkeypatch, tmp_path):
  """As the `ttamer` program (argv from sys.argv) every command keeps its compiled programs
  in --cache-dir (default $TTAMER_CACHE; '' off); called from Python (main(argv)), none
  touches JAX's process-wide settings. The work itself is stubbed. (`ttamer bench`:
  test_bench_caches_compiled_programs_only_when_asked.)"""
  assert set(CACHE_ARGV) == set(cli.COMMANDS)
  calls = []
  monkeypatch.setattr(cli, "enable_compilation_cache", lambda d: calls.append(d) or d or None)
  monkeypatch.setenv("TTAMER_CACHE", str(tmp_path / "home"))
  mine = str(tmp_path / "mine")
  for command, argv in CACHE_ARGV.items():
    monkeypatch.setitem(cli.COMMANDS, command, lambda args: 0)
    default = str(tmp_path / "home")
    for extra, want in (([], default), (["--cache-dir", mine], mine), (["--cache-dir", ""], "")):
      monkeypatch.setattr(sys, "argv", ["ttamer", *argv, *extra])
      calls.clear()
      assert cli.main() == 0
      assert calls == [want], (command, extra)
    calls.clear()
    assert cli.main([*argv, "--cache-dir", mine]) == 0 and calls == []


def test_bench_caches_compiled_programs_only_when_asked(monkeypatch, tmp_path):
  """The harness times compilation: a warm cache would replace it by loading, so
  `ttamer bench` keeps compiled programs only in a --cache-dir it is given."""
  from test_bench import import_benchmark
  bench = import_benchmark("bench")
  calls = []
  monkeypatch.setattr(cli, "enable_compilation_cache", lambda d: calls.append(d) or d or None)
  monkeypatch.setattr(bench, "run", lambda args, sections: 0)
  out = str(tmp_path / "b.json")
  for extra, want in (([], []), (["--cache-dir", str(tmp_path / "mine")], [str(tmp_path / "mine")]),
                      (["--cache-dir", ""], [])):
    calls.clear()
    assert bench.main(["--out", out, *extra], entry="ttamer") == 0
    assert calls == want, extra


def test_a_command_writes_its_compiled_programs_to_the_cache(tmp_path):
  """End to end, in fresh processes (JAX reads the setting at its first compilation)."""
  path = str(tmp_path / "c.npz")
  save_cascade(path, tj.demo_cascade(3, 4))
  env = {k: v for k, v in _env(str(tmp_path / "home")).items() if k != "JAX_COMPILATION_CACHE_DIR"}
  solve = ["solve", path, "--lam", "0.3", "--json", "--cache-dir"]
  runs = {"given": solve + [str(tmp_path / "given")], "off": solve + [""]}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    procs = dict(zip(runs, pool.map(lambda argv: _ttamer(argv, env, str(tmp_path)), runs.values())))
  for proc in procs.values():
    _ok(proc)
  assert os.listdir(tmp_path / "given" / "xla")  # compiled programs were written
  assert not (tmp_path / "home").exists()          # off: nothing in the default cache either
