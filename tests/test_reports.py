"""Text the application prints: tables, JSON values and each command's report, from
plain result dicts (no command is run)."""

import json

import numpy as np
import pytest

from ttamer_jax.app import reports

POINTS = [dict(policy="recall", chosen_param=0.5, chosen_cost=0.25, chosen_error=0.1,
               frontier_cost=0.2, frontier_error=0.11),
          dict(policy="confidence", chosen_param=None, chosen_cost=None, chosen_error=None,
               frontier_cost=None, frontier_error=None),
          dict(policy="hindsight", chosen_param=0.2, chosen_cost=0.1, chosen_error=0.05,
               frontier_cost=0.1, frontier_error=0.05)]
OBJECTIVES = [dict(lam=0.5, recall=0.2, confidence=0.3, hindsight=0.1),
              dict(lam=0.9, recall=0.4, confidence=0.3, hindsight=0.1)]
FULL_ERROR = {"calibration": 0.1, "test": 0.12}
BUDGETS = [0.1, 0.5]
AT_BUDGETS = [dict(policy="recall", error=[None, 0.1], cost=[None, 0.45]),
              dict(policy="confidence", error=[0.3, 0.15], cost=[0.1, 0.5]),
              dict(policy="hindsight", error=[0.05, 0.05], cost=[0.1, 0.1])]
GAPS = {"confidence": 0.012, "hindsight": -0.04}


def test_jsonable_and_dumps():
  value = {"a": np.array([1.0, np.inf, -np.inf]), "b": np.float32(0.5), 3: (np.int64(3), float("nan")),
           "c": np.bool_(True), "d": np.asarray(2.5), "e": None, "f": "text"}
  assert reports.jsonable(value) == {"a": [1.0, "inf", "-inf"], "b": 0.5, "3": [3, "nan"],
                                     "c": True, "d": 2.5, "e": None, "f": "text"}
  text = reports.dumps({"x": float("inf"), "y": [np.float64(0.25)]})
  assert json.loads(text) == {"x": "inf", "y": [0.25]} and text.startswith("{\n  ")


def test_small_labels():
  assert reports.pct(None) == "-" and reports.pct(0.1234) == "12.3%"
  assert reports.tolerance_text(0.01) == "1 point" and reports.tolerance_text(0.02) == "2 points"
  assert reports.tolerance_text(0) == "0 points" and reports.tolerance_text(0.005) == "0.5 points"
  cases = [("recall", 0.75512, "lam=0.7551"), ("hindsight", 1.0, "lam=1"), ("per_stage", 0.2861, "q=0.286"),
           ("patience", 2.0, "k=2"), ("fixed_exit", 1.0, "exit 1"), ("confidence", 0.5, "t=0.5"),
           ("entropy", 1.4567, "t=1.46"), ("recall", None, "-")]
  for name, param, label in cases:
    assert reports.setting_label(name, param) == label


def test_format_table_marks_the_best_deployable_policy():
  assert reports.format_table(POINTS, OBJECTIVES).splitlines() == [
      "policy                setting  latency  error  J(0.50)  J(0.90)",
      "--------------------  -------  -------  -----  -------  -------",
      "recall optimum        lam=0.5    25.0%  10.0%  0.2000<  0.4000",
      "confidence threshold  -              -      -  0.3000   0.3000<",
      "hindsight oracle*     lam=0.2    10.0%   5.0%  0.1000   0.1000"]
  # "(ttamer)" marks the family of the deployed policy, whatever family it is.
  marked = reports.format_table(POINTS, OBJECTIVES, deployed="confidence").splitlines()
  assert marked[2].startswith("recall optimum   ") and "(ttamer)" not in marked[2]
  assert marked[3].startswith("confidence threshold (ttamer)  -")


def test_table_legend():
  text = reports.table_legend(0.02, FULL_ERROR, "latency")
  assert "within 2 points of the full model's (10.00%); latency (share" in text
  assert "(full model: 12.00% error)" in text and "(1 - lam) * latency" in text
  assert len(text.splitlines()) == 2 and "-:" not in text
  # A "-" cell (no setting within the tolerance) is explained in one more line.
  text = reports.table_legend(0.02, FULL_ERROR, "latency", POINTS)
  assert text.splitlines()[2] == ("-: no setting of that family is within 2 points of the full "
                                  "model's error on calibration (see the budget table for what "
                                  "it reaches).")
  marked = reports.table_legend(0.02, FULL_ERROR, "latency", POINTS, deployed="no_recall")
  assert marked.splitlines()[3].startswith("(ttamer): the family of the policy ttamer deploys")


def test_budget_table_legend_and_gaps():
  assert reports.format_budgets(AT_BUDGETS, BUDGETS, "latency", "recall").splitlines() == [
      "policy                   latency <= 10%  latency <= 50%",
      "-----------------------  --------------  --------------",
      "recall optimum (ttamer)              -           10.0%<",
      "confidence threshold             30.0%<          15.0%",
      "hindsight oracle*                 5.0%            5.0%"]
  legend = reports.budget_legend(AT_BUDGETS, "latency").splitlines()
  assert legend[0].startswith("least held-out error with latency share at or below each budget")
  assert legend[1] == ("-: the family has no setting whose held-out latency share is at or below "
                       "that budget.")
  assert reports.gaps_line(GAPS).endswith(
      "recall more accurate at equal cost): confidence threshold +0.0120, hindsight oracle* -0.0400.")


def test_format_index():
  text = reports.format_index(np.array([[0.25, -np.inf], [np.inf, np.inf]]))
  assert text.splitlines() == ["stage   s=0   s=1", "    0  0.25    go", "    1  stop  stop"]


def test_markdown_tables():
  text = reports.format_operating_points(POINTS, FULL_ERROR, 0.01)
  lines = text.splitlines()
  assert lines[0] == ("Full network: test error 12.00% (calibration 10.00%); target: within 1 point.")
  assert lines[4] == "| recall | 0.5000 | 25.0% | 10.0% | 20.0% | 11.0% |"
  assert lines[5] == "| confidence | - | - | - | - | - |"
  assert lines[-1].startswith("-: no setting of that family is within 1 point")  # "-" explained
  assert "-:" not in reports.format_operating_points(POINTS[:1], FULL_ERROR, 0.01)
  obj = reports.format_objectives(OBJECTIVES).splitlines()
  assert obj[:2] == ["| lam | recall | confidence | hindsight |", "|---|---|---|---|"]
  assert obj[2] == "| 0.50 | **0.2000** | 0.3000 | 0.1000 |"
  assert obj[3] == "| 0.90 | 0.4000 | **0.3000** | 0.1000 |"


def _check(pred_obj=0.20, inside=True):
  q = lambda p, m, lo, hi, ok=True: dict(predicted=p, measured=m, ci=[lo, hi], inside=ok)
  part = dict(error=q(0.1, 0.1, 0.09, 0.11), cost_norm=q(0.5, 0.5, 0.45, 0.55),
              objective=q(pred_obj, 0.2, 0.19, 0.21, inside))
  return dict(policy="recall[x]", lam=0.9, in_sample=part, cross_fitted=part)


def _selection(check=None):
  cand = lambda name, obj, ttamer: dict(name=name, ttamer=ttamer, objective=obj,
                                        objective_ci=[obj - 0.01, obj + 0.01], error=0.1,
                                        cost_norm=0.4)
  chosen, runner, rule = cand("recall[x]", 0.2, True), cand("no_recall[x]", 0.21, True), cand(
      "patience", 0.3, False)
  return dict(lam=0.9, tolerance=None, chosen=chosen, runner_up=runner,
              versus_runner_up=dict(diff=-0.01, diff_se=0.002, diff_ci=[-0.014, -0.006]),
              candidates=[chosen, runner, rule], model_check=check)


def test_fit_text():
  result = dict(policy="p.npz", lam=0.79, lam_choice="given", cascade=None,
                in_sample=dict(error=0.115, cost_norm=0.379, full_error=0.11, num_samples=1500),
                selection=_selection(_check()))
  notes = dict(num_samples=1500, num_stages=4, folds=5, sidecar="p.json", cascade_requested=None,
               warnings=[])
  lines = reports.fit_text(result, notes).splitlines()
  assert lines[0].startswith("1500 requests x 4 stages; chose by 5-fold cross-fitting among 3 "
                             "candidates (lam = 0.9)")
  assert lines[1] == "  chosen     recall[x]"
  assert lines[2] == ("             cross-fitted J 0.2000 [0.1900, 0.2100], error 10.0%, cost 40.0% "
                      "of running every stage")
  assert lines[3] == "  runner-up  no_recall[x]"
  assert lines[4].endswith("chosen - runner-up -0.0100 [-0.0140, -0.0060]")
  assert lines[5].startswith("  best simple rule: patience, cross-fitted J 0.3000")
  assert "  policy at lam = 0.79 (given)" in lines
  assert any(line.startswith("model check of recall[x]") for line in lines)
  assert not any("<- outside" in line or line.startswith("warning") for line in lines)
  assert lines[-2:] == ["wrote p.npz (+ p.json)", "next: ttamer evaluate p.npz HELD_OUT_TRACES.npz"]
  # A prediction outside its interval is marked; the warning lines come from the notes.
  bad = dict(result, selection=_selection(_check(pred_obj=0.3, inside=False)), cascade=None)
  text = reports.fit_text(bad, dict(notes, warnings=["model check: ..."], cascade_requested="c.npz"))
  assert text.count("<- outside") == 2 and "\nwarning: model check: ...\n" in text
  assert "not c.npz: the chosen policy is a simple rule" in text


def test_evaluate_text():
  ev = dict(error=0.1, error_ci=[0.09, 0.11], cost_norm=0.5, cost_norm_ci=[0.45, 0.55],
            objective=0.123456, objective_ci=[0.12, 0.13], stop_histogram=[0.25, 0.75],
            answer_histogram=[0.5, 0.5])
  result = dict(policy="p.npz", traces="t.npz", lam=0.9, full_error=0.08, evaluation=ev,
                metadata=dict(policy=dict(type="recall"), num_stages=2, num_states=4,
                              score_name="max_softmax"))
  lines = reports.evaluate_text(result, dict(num_samples=200, level=0.95, resamples=1000)).splitlines()
  assert lines[0] == "policy p.npz: recall, 2 stages x 4 states, score max_softmax"
  assert lines[1] == "traces t.npz: 200 requests; lam = 0.9"
  assert lines[2] == "  error      10.0%  [9.0%, 11.0%]         last exit alone: 8.0%"
  assert lines[4].startswith("  objective  0.1235  [0.1200, 0.1300]")
  assert lines[5] == "  (95% bootstrap CI, 1000 resamples)"
  assert lines[6] == "  stopped after exit   0: 25.0%  1: 75.0%"


def test_sweep_text():
  result = dict(how="fitted on a, measured on b", fitted=dict(num_states=8), lams=np.zeros(3),
                operating_points=POINTS, objectives=OBJECTIVES, full_error=FULL_ERROR,
                budgets=BUDGETS, errors_at_budgets=AT_BUDGETS, frontier_gaps=GAPS)
  notes = dict(score="max_softmax", confidence_score="max_softmax", entropy_score="entropy",
               tolerance=0.01)
  lines = reports.sweep_text(result, notes).splitlines()
  assert lines[:3] == ["fitted on a, measured on b",
                       "8 states of max_softmax per stage; 3 lam values; thresholds on max_softmax "
                       "and entropy", ""]
  assert lines[3] == reports.format_table(POINTS, OBJECTIVES, "cost").splitlines()[0]
  assert lines[3].split()[:4] == ["policy", "setting", "cost", "error"]
  text = "\n".join(lines)
  # Where the fitted policies win: the least error at each cost budget, and the frontier gaps.
  assert reports.format_budgets(AT_BUDGETS, BUDGETS) in text
  assert reports.gaps_line(GAPS) in text
  # Every "-" in the output is explained by a legend line.
  assert "\n-: no setting of that family is within 1 point" in text
  assert "\n-: the family has no setting whose held-out cost share" in text
  assert "wrote" not in lines[-1]
  text = reports.sweep_text(dict(result, plot="f.png"), dict(notes, entropy_score=None))
  assert text.endswith("\n\nwrote f.png") and "thresholds on max_softmax\n" in text


def test_solve_text():
  row = dict(lam=0.3, hindsight=0.1, recall=0.2, no_recall=0.25,
             index=np.array([[0.1, -np.inf], [np.inf, np.inf]]))
  result = dict(cascade="c.npz", num_stages=2, num_states=2, solutions=[row], plot="i.png")
  assert reports.solve_text(result).splitlines() == [
      "c.npz: 2 stages x 2 states. Optimal J = lam * E[loss] + (1 - lam) * E[cost] of the cascade "
      "model (modelled: exact values of the model, not measured on traces; lower is better):",
      "   lam   hindsight      recall   no-recall  no-recall/recall",
      " 0.300     0.10000     0.20000     0.25000             1.250",
      "",
      "recall policy (lam = 0.3): after stage i in state s, stop iff lam * best loss so far <= "
      "index[i, s]",
      "stage   s=0   s=1",
      "    0   0.1    go",
      "    1  stop  stop",
      "",
      "wrote i.png"]
  two = dict(result, solutions=[row, dict(row, recall=0.0)])
  del two["plot"]
  lines = reports.solve_text(two).splitlines()
  assert len(lines) == 4 and lines[-1].endswith("nan")  # no-recall / recall with recall = 0
  wide = dict(result, num_states=25)
  assert "index table 2 x 25: too wide to print" in reports.solve_text(wide)


@pytest.fixture
def demo_result():
  files = dict(policy="d/policy.npz", policy_metadata="d/policy.json",
               calibration_traces="d/calibration_traces.npz", test_traces="d/test traces.npz",
               cascade="d/cascade.npz", report="d/report.md", results="d/results.json")
  result = dict(workload="digits-cnn", quick=True, seconds=12.3, calibration_requests=300,
                test_requests=400, chosen_lam=0.755, files=files, full_error=FULL_ERROR,
                operating_points=POINTS, objectives=OBJECTIVES,
                frontier_gaps={"no_recall": 0.01, "confidence": -0.002},
                budgets=BUDGETS, errors_at_budgets=AT_BUDGETS,
                fitted=dict(score="max_softmax"),
                info=dict(loaded=False, train_seconds=20.4, test_accuracy=[0.9, 0.95],
                          stage_cost_share=[0.3, 0.7]),
                answer=None,
                selected=dict(name="recall[x]", kind="recall", ttamer=True, solve_lam=0.8,
                              tolerance_met=True,
                              cross_fitted=dict(error=0.12, cost_norm=0.38),
                              test=dict(error=0.1, error_ci=[0.09, 0.11], cost_norm=0.4,
                                        cost_norm_ci=[0.38, 0.42]),
                              runner_up="patience", model_check=_check(), notes=[]))
  notes = dict(num_stages=2, trained=True, states=8, tolerance=0.01)
  return result, notes


def test_demo_text_and_report(demo_result):
  result, notes = demo_result
  header = reports.demo_header(result, notes).splitlines()
  assert header == ["ttamer demo: digits-cnn, 2 exits",
                    "network trained in 20 s (--quick: a tenth of the steps); test accuracy per "
                    "exit: 90.0% 95.0%; measured latency share per exit: 0.30 0.70",
                    "300 calibration / 400 test requests; fitted 8 bins of max_softmax per exit"]
  text = reports.demo_text(result, notes)
  assert "(1 - lam) * latency" in text and "\nwrote (12 s):\n  policy              d/policy.npz" in text
  assert text.endswith('  ttamer solve d/cascade.npz --lam 0.755')
  assert '--calibration d/calibration_traces.npz' in text and '"d/test traces.npz"' in text
  report = reports.demo_report(result, notes)
  assert report.startswith("# ttamer demo: digits-cnn, 2 exits\n\nnetwork trained")
  assert "no_recall +0.0100, confidence -0.0020." in report
  assert reports.format_budgets(AT_BUDGETS, BUDGETS, "latency", "recall") in report
  assert reports.format_budgets(AT_BUDGETS, BUDGETS, "latency", "recall") in text
  assert "| recall (ttamer) | 0.5000 |" in report
  assert reports.gaps_line(result["frontier_gaps"], "latency") in text
  assert "## The deployed policy\n\npolicy.npz: recall[x], chosen by cross-fitting" in report
  assert "Measured on the test split: error 10.0% [9.0%, 11.0%], cost 40.0%" in report
  assert "model check of recall[x]" in text and "model check of recall[x]" in report
  assert "![" not in report and report.endswith("(12 s; `ttamer demo --quick`)\n")
  result["files"] = dict(result["files"], pareto_plot="d/pareto.png")
  assert "![frontiers](pareto.png)" in reports.demo_report(result, notes)
  synthetic = dict(result, info={}, quick=False)
  assert len(reports.demo_header(synthetic, dict(notes, trained=False)).splitlines()) == 2
  assert "(1 - lam) * cost" in reports.demo_text(synthetic, dict(notes, trained=False))


def test_demo_report_says_which_costs_the_policies_were_fitted_on(demo_result):
  result, notes = demo_result
  served = dict(result, info=dict(result["info"], costs="served", stage_cost_share=[0.4, 0.6],
                                  measured_stage_cost_share=[0.3, 0.7],
                                  served_stage_cost_share=[0.4, 0.6],
                                  served_us_per_request=[10.04, 15.0]))
  header = reports.demo_header(served, notes).splitlines()
  assert header[1].endswith("measured latency share per exit: 0.30 0.70")  # both are shown
  line = ("costs: served (the policies are fitted and the latencies reported on them): each "
          "stage's latency as the serving path runs it, per-stage overhead included; share per "
          "exit 0.40 0.60 (10.0 15.0 us per request)")
  assert header[2] == line
  assert line in reports.demo_text(served, notes) and line in reports.demo_report(served, notes)
  measured = dict(result, info=dict(result["info"], costs="measured"))
  text = reports.demo_report(measured, notes)
  assert ("costs: measured (the policies are fitted and the latencies reported on them): each "
          "stage timed alone (--costs served") in text


def test_demo_reports_the_deployed_policys_served_wall_time(demo_result):
  """A network demo serves the deployed policy on the test split and reports its wall
  time next to the full network's (every exit)."""
  result, notes = demo_result
  # the keys of networks.serving_costs.served_wall_time's result
  served = dict(serve_seconds=0.0125, full_seconds=0.05, speedup=4.0, serve_accuracy=0.97,
                full_accuracy=0.975, mean_stages=1.5, batch_size=400, repeats=5)
  result = dict(result, selected=dict(result["selected"], served=served))
  line = ("Served on the test split (400 requests, median of 5 calls): 12.5 ms against 50.0 ms "
          "for the full network, every exit (4.00x); 1.50 exits run per request; accuracy "
          "97.0% served, 97.5% at the last exit.")
  assert line in reports.demo_report(result, notes) and line in reports.demo_text(result, notes)
  assert "Served on the test split" not in reports.demo_report(*demo_result)  # no network


def _answer(diff_error, diff_cost, diff_j, mode="tolerance", same=False, best=None):
  t = lambda v: [v, v - 0.01, v + 0.01]
  side = dict(error=t(0.2), cost_norm=t(0.5), objective=t(0.3))
  return dict(lam=0.9, mode=mode, tolerance=0.01 if mode == "tolerance" else None, level=0.95,
              deployed=dict(name="no_recall[x]", ttamer=True, kind="no_recall", param=0.9,
                            test=side),
              rule=dict(name="confidence(max_softmax)", ttamer=False, kind="confidence",
                        param=0.75, test=side),
              diff=dict(error=diff_error, cost_norm=diff_cost, objective=diff_j),
              verdict=None, same=same, best_ttamer=best)


def test_verdict_of_paired_differences():
  from ttamer_jax.app.compare import verdict
  zero = [0.0, -0.01, 0.01]
  # tolerance mode: the cost decides, the error must stay within the tolerance
  assert verdict(dict(error=zero, cost_norm=[-0.3, -0.31, -0.29], objective=zero), 0.01) == "better"
  assert verdict(dict(error=[0.02, 0.015, 0.03], cost_norm=[-0.3, -0.31, -0.29], objective=zero),
                 0.01) == "worse"       # cheaper, but beyond the tolerance for certain
  assert verdict(dict(error=[0.005, -0.002, 0.012], cost_norm=[-0.3, -0.31, -0.29],
                      objective=zero), 0.01) == "no better"   # the error may exceed it
  assert verdict(dict(error=zero, cost_norm=[-0.01, -0.03, 0.01], objective=zero), 0.01) == "no better"
  assert verdict(dict(error=zero, cost_norm=[0.1, 0.05, 0.15], objective=zero), 0.01) == "worse"
  # lam mode: J's interval
  for j, word in (([-0.02, -0.03, -0.01], "better"), ([0.0, -0.01, 0.01], "no better"),
                  ([0.02, 0.01, 0.03], "worse")):
    assert verdict(dict(error=zero, cost_norm=zero, objective=j), None) == word


def test_answer_lines_say_the_result_in_a_sentence():
  a = _answer([-0.006, -0.012, 0.0], [-0.301, -0.309, -0.295], [-0.04, -0.05, -0.03])
  a["verdict"] = "better"
  lines = reports.answer_lines(a)
  assert lines[0].startswith("The answer (held out; 95% intervals, paired bootstrap;")
  assert lines[1] == "  deployed (ttamer): no_recall[x] (T-Tamer: the exact optimum of a fitted model)"
  assert lines[2] == ("    error 20.0% [19.0%, 21.0%], cost 50.0% [49.0%, 51.0%] of every exit, "
                      "J(0.9) 0.3000 [0.2900, 0.3100]")
  assert lines[3] == ("  best simple rule tuned on the same calibration split: confidence(max_softmax)"
                      " at the 75% quantile of the calibration scores")
  assert lines[5] == ("  deployed - rule: error -0.6 points [-1.2, +0.0], cost -30.1 points "
                      "[-30.9, -29.5], J -0.0400 [-0.0500, -0.0300]")
  assert lines[6] == ("  => Better than confidence(max_softmax): 30.1 points less cost [29.5, 30.9], "
                      "error -0.6 points [-1.2, +0.0] (the tolerance allows 1 point more).")
  a["verdict"] = "no better"
  a["diff"]["cost_norm"] = [-0.01, -0.03, 0.01]
  assert reports.answer_lines(a)[-1] == (
      "  => No better than confidence(max_softmax): the cost difference -1.0 points [-3.0, +1.0] "
      "includes 0 (error -0.6 points [-1.2, +0.0]).")
  a["diff"]["cost_norm"] = [-0.107, -0.131, -0.085]   # cheaper for certain, error maybe not
  a["diff"]["error"] = [0.003, -0.011, 0.014]
  assert reports.answer_lines(a)[-1] == (
      "  => No better than confidence(max_softmax) for certain: 10.7 points less cost [8.5, 13.1], "
      "but its error +0.3 points [-1.1, +1.4] may exceed the rule's by more than the 1 point of "
      "tolerance (too few held-out requests to tell).")
  a["verdict"] = "worse"
  a["diff"]["error"] = [0.03, 0.015, 0.045]
  assert reports.answer_lines(a)[-1] == (
      "  => Worse than confidence(max_softmax): its error +3.0 points [+1.5, +4.5] exceeds the "
      "rule's by more than 1 point.")
  a["diff"]["cost_norm"] = [0.05, 0.02, 0.08]
  assert reports.answer_lines(a)[-1] == (
      "  => Worse than confidence(max_softmax): 5.0 points more cost [+2.0, +8.0].")
  lam = _answer([0.0] * 3, [0.0] * 3, [0.01, -0.002, 0.02], mode="lam")
  lam["verdict"] = "no better"
  assert reports.answer_lines(lam)[-1] == (
      "  => No better than confidence(max_softmax): the difference in J(0.9) [-0.0020, +0.0200] "
      "includes 0.")
  # The rule deployed itself: said so, and the best T-Tamer design measured against it.
  best = dict(name="recall[y]", ttamer=True, kind="recall", param=0.8, test=lam["deployed"]["test"],
              diff=dict(error=[0.0] * 3, cost_norm=[0.0] * 3, objective=[-0.02, -0.03, -0.01]),
              verdict="better")
  same = _answer([0.0] * 3, [0.0] * 3, [0.0] * 3, mode="lam", same=True, best=best)
  text = "\n".join(reports.answer_lines(same))
  assert "=> ttamer deploys that rule itself: on cross-fitting no T-Tamer design was better by 3" in text
  assert "the best T-Tamer design, recall[y], held out:" in text
  assert text.endswith("Better than confidence(max_softmax) by 0.0200 in J(0.9) [-0.0300, -0.0100].")
  assert reports.answer_lines(None)[0].startswith("(no simple rule among the candidates")
