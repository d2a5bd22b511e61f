"""Choosing the deployed policy by cross-fitting (issue 13): folds never leak, the
planted winner is found, lam is unit-free, the model check flags exactly the
predictions outside the replay interval, posterior-answer stages and their files."""

import jax
import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax.data import answers as answer_models  # fold and calibrator internals
from ttamer_jax.evaluation import selection as S  # instrumented below

C = tj.evaluation.Candidate


def _markov_traces(num, seed):
  """Traces of a cascade whose states the uniform bins recover: the Markov model is exact."""
  c = tj.demo_cascade(4, 6)
  return c, tj.sample_traces(jax.random.PRNGKey(seed), c, num, loss="expected")


def _patience_world(num, seed):
  """Scores are noise; easy requests make every exit right (they agree), hard ones make
  the early exits wrong at random (they disagree) and only the last exit right. A state
  over score bins cannot tell them apart; patience (agreement) can, and the last exit is
  expensive enough that knowing when to stop early matters."""
  rng = np.random.default_rng(seed)
  n, classes = 4, 10
  labels = rng.integers(0, classes, num)
  easy = rng.random(num) < 0.6
  preds = np.where(easy[:, None], labels[:, None], rng.integers(0, classes, (num, n)))
  preds[:, -1] = labels
  losses = (preds != labels[:, None]).astype(float)
  scores = rng.random((num, n))
  return tj.ExitTraces(scores=scores, preds=preds, losses=losses, costs=[1.0, 1.0, 1.0, 10.0],
                       signals={"max_softmax": scores}, labels=labels)


# ------------------------------------------------------------------ folds
def test_folds_are_a_partition():
  ids = answer_models.fold_ids(jax.random.PRNGKey(0), 103, 5)
  assert sorted(np.bincount(ids).tolist()) == [20, 20, 21, 21, 21]
  with pytest.raises(ValueError, match="folds = 1 must lie in"):
    answer_models.fold_ids(jax.random.PRNGKey(0), 10, 1)


def test_host_cross_fitting_never_leaks(monkeypatch):
  """The host reference of cross-fitting (``_cross_fitted``, which the batched programs
  are checked against request by request in test_crossfit.py, where their own folds are
  checked too): every fit of a fold's replay (the candidate's model and thresholds, and
  the posterior calibrators of the nested cross-fitting) sees only the other folds."""
  _, tr = _markov_traces(600, 0)
  tr = tr.replace(labels=np.arange(tr.num_samples))      # each request names itself
  seen = []
  real_fit_at, real_fit_answers = S.fit_at, answer_models.fit_answer_model

  def fit_at(candidate, traces, point, **kw):
    seen.append(("fit", frozenset(np.asarray(traces.labels).tolist())))
    return real_fit_at(candidate, traces, point, **kw)

  def fit_answers(traces, **kw):
    seen.append(("answers", frozenset(np.asarray(traces.labels).tolist())))
    return real_fit_answers(traces, **kw)

  replayed = []
  real_replay = S.replay_traces

  def replay(policy, traces, **kw):
    replayed.append(frozenset(np.asarray(traces.labels).tolist()))
    return real_replay(policy, traces, **kw)

  monkeypatch.setattr(S, "fit_at", fit_at)
  monkeypatch.setattr(answer_models, "fit_answer_model", fit_answers)
  monkeypatch.setattr(S, "replay_traces", replay)
  cands = [C("recall", "state_score", 6, binning="uniform"),
           C("no_recall", "state_score", 4, answers="posterior"), C("confidence", "state_score")]
  ids = answer_models.fold_ids(np.zeros(2, np.uint32), tr.num_samples, 3)
  splits = [(np.flatnonzero(ids != f), np.flatnonzero(ids == f)) for f in range(3)]
  for cand in cands:
    S._cross_fitted(cand, tr, splits, S.OperatingPoint(None, 0.05), np.zeros(2, np.uint32), {})
  held_sets = replayed[:9]                     # 3 candidates x 3 folds, in order
  everyone = frozenset(range(tr.num_samples))
  for c in range(3):
    folds = held_sets[3 * c:3 * c + 3]
    assert frozenset().union(*folds) == everyone and sum(len(f) for f in folds) == len(everyone)
  fits = [s for kind, s in seen if kind == "fit"][:9]
  for held, fit in zip(held_sets, fits):
    assert not held & fit and held | fit == everyone   # trained on exactly the other folds
  # The posterior calibrators used for a fold (3 nested fits for the fold's states + 1 for
  # its replay, per fold) never saw that fold.
  answer_fits = [s for kind, s in seen if kind == "answers"][:12]
  for f, held in enumerate(held_sets[3:6]):
    group = answer_fits[4 * f:4 * f + 4]
    assert len(group) == 4 and all(not held & fit for fit in group)
    assert group[-1] == everyone - held                 # the replay's calibrators: all the rest


def test_posterior_virtual_traces_are_out_of_fold():
  _, tr = _markov_traces(400, 1)
  ids = answer_models.fold_ids(jax.random.PRNGKey(1), tr.num_samples, 4)
  oof = answer_models.cross_fitted_transform(tr, ids, score="state_score")
  for f in range(4):
    held = np.flatnonzero(ids == f)
    model = tj.fit_answer_model(tr.subset(np.flatnonzero(ids != f)), score="state_score")
    direct = model.transform(tr.subset(held))
    np.testing.assert_allclose(np.asarray(oof.scores)[held], np.asarray(direct.scores), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(oof.preds)[held], np.asarray(direct.preds))


# ------------------------------------------------------------------ planted winners
def test_markov_exact_cascade_selects_the_recall_optimum():
  _, tr = _markov_traces(6000, 2)
  cands = [C("recall", "state_score", 6, binning="uniform"), C("confidence", "state_score"),
           C("per_stage", "state_score"), C("patience"), C("fixed_exit")]
  sel = tj.fit_policy(tr, 0.7, candidates=cands, num_resamples=200)
  assert sel.chosen.candidate == cands[0]
  assert sel.model_check is not None and sel.model_check.consistent
  assert sel.model_check.warning() is None and not sel.notes


def test_a_badly_wrong_model_loses_to_the_simple_rule():
  tr = _patience_world(6000, 3)
  cands = [C("recall", "max_softmax", 8), C("no_recall", "max_softmax", 8), C("patience"),
           C("confidence", "max_softmax")]
  sel = tj.fit_policy(tr, 0.9, candidates=cands, num_resamples=200)
  assert sel.chosen.candidate == C("patience")
  # Significantly better than the best T-Tamer candidate, by the paired comparison.
  assert sel.runner_up.candidate.ttamer or sel.runner_up.candidate.kind == "confidence"
  best_ttamer = min((s for s in sel.scores if s.candidate.ttamer), key=lambda s: s.objective)
  d = best_ttamer.per_request - sel.chosen.per_request
  assert d.mean() > 4 * d.std(ddof=1) / np.sqrt(d.size)
  # The model check is reported for the best T-Tamer candidate even so.
  assert sel.model_check.policy == best_ttamer.name


def test_choice_rule_defaults_to_the_best_rule_and_makes_designs_earn_their_place():
  rng = np.random.default_rng(0)

  def score(cand, mean, spread=0.0, num=400):
    noise = rng.normal(0, spread, num) if spread else np.zeros(num)
    per = np.full(num, mean) + noise - noise.mean()
    return S.CandidateScore(candidate=cand, objective=float(per.mean()), objective_ci=np.zeros(2),
                            objective_se=0.01, error=0.1, cost_norm=0.1, param=np.zeros(1),
                            per_request=per)

  def lead(a, b):   # a's lead over b in paired standard errors
    mean, se = S.paired_se(b, a)
    return mean / se

  rule = score(C("patience"), 0.101, 0.05)      # best rule
  simpler = score(C("fixed_exit"), 0.1012, 0.05)  # within one SE of it, but not the best rule
  far = score(C("confidence"), 0.2)              # clearly worse
  weak = score(C("recall", num_states=16), 0.100, 0.05)     # better by a hair: does not compete
  strong = score(C("recall", num_states=16), 0.086, 0.05)   # better by ~4 SE: competes
  assert lead(weak, rule) < S.EARN_SE < lead(strong, rule)
  assert S.one_se_choice([weak, rule, far]).candidate == C("patience")
  # The default is the best rule itself, not a simpler rule within one SE of it.
  assert lead(rule, simpler) < 1
  assert S.one_se_choice([rule, simpler, far]).candidate == C("patience")
  assert S.one_se_choice([strong, rule, far]).candidate == C("recall", num_states=16)
  # Among designs that compete: the simplest within one paired SE of the best.
  fewer = score(C("recall", num_states=4), 0.0865, 0.05)
  assert lead(fewer, rule) > S.EARN_SE and abs(lead(strong, fewer)) < 1
  assert S.one_se_choice([strong, fewer, rule, far]).candidate == C("recall", num_states=4)
  # Without simple rules every design competes.
  assert S.one_se_choice([weak, fewer]).candidate == C("recall", num_states=4)
  assert S.one_se_choice([weak]).candidate == C("recall", num_states=16)
  # Simplicity: rules, then fewer states, then plain bins before features and posterior answers.
  order = sorted([C("recall", num_states=8, answers="posterior"), C("per_stage"),
                  C("recall", num_states=8, feature="agree_prev"), C("no_recall", num_states=8),
                  C("recall", num_states=4), C("fixed_exit")], key=S.simplicity)
  assert order == [C("fixed_exit"), C("per_stage"), C("recall", num_states=4),
                   C("no_recall", num_states=8), C("recall", num_states=8, feature="agree_prev"),
                   C("recall", num_states=8, answers="posterior")]


# ------------------------------------------------------------------ unit-free lam
def test_costs_in_seconds_or_milliseconds_give_the_same_policy():
  c, tr = _markov_traces(3000, 4)
  ms = tr.replace(costs=np.asarray(tr.costs) * 1000.0)
  a = tj.fit_cascade(tr, 6, score="state_score", binning="uniform")
  b = tj.fit_cascade(ms, 6, score="state_score", binning="uniform")
  np.testing.assert_allclose(a.cascade.costs, b.cascade.costs, rtol=1e-6)
  assert float(b.cost_scale) == pytest.approx(1000 * float(a.cost_scale), rel=1e-6)
  for lam in (0.3, 0.9):
    np.testing.assert_array_equal(a.recall_policy(lam).policy.index, b.recall_policy(lam).policy.index)
    ea, eb = tj.evaluate(a.recall_policy(lam), tr, lam), tj.evaluate(b.recall_policy(lam), ms, lam)
    assert float(ea.objective) == pytest.approx(float(eb.objective), rel=1e-6)
    np.testing.assert_allclose(ea.stop_histogram, eb.stop_histogram)
  cands = [C("recall", "state_score", 6, binning="uniform"), C("confidence", "state_score")]
  sa = tj.fit_policy(tr, 0.8, candidates=cands, num_resamples=50)
  sb = tj.fit_policy(ms, 0.8, candidates=cands, num_resamples=50)
  assert sa.chosen.name == sb.chosen.name
  assert sa.chosen.objective == pytest.approx(sb.chosen.objective, rel=1e-6)


# ------------------------------------------------------------------ model check
def _q(predicted, lo, hi):
  from ttamer_jax.evaluation.model_check import Quantity
  return Quantity(predicted, 0.5 * (lo + hi), np.asarray([lo, hi]))


@pytest.mark.parametrize("pred_in, pred_cv, warns", [
    (0.10, 0.10, False), (0.10, 0.20, True), (0.20, 0.10, True), (0.149, 0.051, False),
    (0.151, 0.10, True)])
def test_warning_exactly_when_a_prediction_is_outside_the_interval(pred_in, pred_cv, warns):
  quantities = lambda p: {"error": _q(0.1, 0.05, 0.15), "cost_norm": _q(0.5, 0.4, 0.6),
                          "objective": _q(p, 0.05, 0.15)}
  check = tj.evaluation.ModelCheck(policy="recall[x]", lam=0.5, in_sample=quantities(pred_in),
                        cross_fitted=quantities(pred_cv))
  assert (check.warning() is not None) == warns == (not check.consistent)
  if warns:
    assert "do not trust the model's own value" in check.warning()


def test_misspecified_model_is_flagged_in_the_result():
  """Posterior answers on the patience world: the calibrators cannot see that disagreeing
  exits are all wrong, so the model promises fewer errors than replay measures."""
  tr = _patience_world(4000, 5)
  sel = tj.fit_policy(tr, 0.9, candidates=[C("recall", "max_softmax", 8, answers="posterior")],
                      num_resamples=200)
  check = sel.model_check
  assert not check.cross_fitted["objective"].inside
  assert check.warning() is not None and sel.notes == (check.warning(),)
  # Always the last exit: the model is exact there and the (zero-width) interval holds it.
  last = tj.fit_policy(tr, 0.9, candidates=[C("recall", "max_softmax", 8)], num_resamples=200)
  assert last.chosen.cost_norm == 1.0 and last.model_check.consistent and not last.notes


# ------------------------------------------------------------------ tolerance mode
def test_tolerance_mode_says_when_nothing_reaches_it():
  tr = _patience_world(2000, 6)
  cands = [C("recall", "max_softmax", 4), C("fixed_exit")]
  sel = tj.fit_policy(tr, tolerance=0.0, candidates=cands, num_resamples=50)
  # Only consulting every exit matches the last exit's error; the fixed exit at the last
  # stage does, so the tolerance is met there.
  assert sel.tolerance_met and sel.chosen.error <= sel.reference_error + 1e-12
  worse = tr.replace(losses=np.concatenate([np.asarray(tr.losses)[:, :-1],
                                            np.zeros((tr.num_samples, 1))], axis=1))
  sel = tj.fit_policy(worse, tolerance=0.0, candidates=[C("fixed_exit")], num_resamples=50)
  assert sel.tolerance_met  # the last exit itself is always within tolerance 0
  impossible = tj.fit_policy(tr, tolerance=0.0, candidates=[C("patience")], num_resamples=50)
  if not impossible.tolerance_met:
    assert impossible.notes and "no candidate reaches the tolerance" in impossible.notes[0]


def test_bad_arguments():
  _, tr = _markov_traces(100, 7)
  with pytest.raises(ValueError, match="exactly one of lam"):
    tj.fit_policy(tr)
  with pytest.raises(ValueError, match="exactly one of lam"):
    tj.fit_policy(tr, 0.5, tolerance=0.01)
  with pytest.raises(ValueError, match="folds = 1 must lie in"):
    tj.fit_policy(tr, 0.5, folds=1)
  with pytest.raises(ValueError, match="no signal named 'nope'"):
    tj.fit_policy(tr, 0.5, candidates=[C("recall", "nope")])
  with pytest.raises(ValueError, match="appears twice"):
    tj.fit_policy(tr, 0.5, candidates=[C("patience"), C("patience")])
  with pytest.raises(ValueError, match="kind: must be one of"):
    C("magic")


# ------------------------------------------------------------------ posterior answers
def test_posterior_answers_beat_exit_bins_when_mistakes_are_correlated(tmp_path):
  c = tj.overthinking_cascade(4, 12)
  cal = tj.workload_traces(jax.random.PRNGKey(8), c, 4000)
  test = tj.workload_traces(jax.random.PRNGKey(9), c, 4000)
  cands = [C("no_recall", "max_softmax", 8, answers="posterior"), C("recall", "max_softmax", 8)]
  sel = tj.fit_policy(cal, 0.9, candidates=cands, num_resamples=200)
  assert sel.chosen.candidate == cands[0]
  post = tj.evaluate(sel.deployed, test, 0.9)
  plain = tj.evaluate(tj.fit_cascade(cal, 8, score="max_softmax").recall_policy(0.9), test, 0.9)
  d = float(plain.objective) - float(post.objective)
  assert d > 4 * float(np.hypot(plain.objective_se, post.objective_se))
  # The answer model is part of the policy file, and the loaded policy replays identically.
  path = tmp_path / "p.npz"
  meta = tj.save_policy(path, sel.deployed, full_cost=sel.full_cost)
  assert meta["format_version"] == 2 and meta["answers"]["score_name"] == "max_softmax"
  back = tj.load_policy(path)
  again = tj.evaluate(back, test, 0.9)
  assert float(again.objective) == float(post.objective)


def test_refit_of_any_scored_candidate_is_its_refit_on_all_traces():
  tr = tj.synthetic_workload(seed=1, num_stages=3, sizes=(1, 300, 1)).calibration
  cands = [C("recall", num_states=4), C("no_recall", num_states=4), C("confidence")]
  sel = tj.fit_policy(tr, 0.8, candidates=cands, num_resamples=50)
  chosen = sel.refit_of(sel.chosen.candidate)
  same = lambda a, b: np.testing.assert_array_equal(tj.replay_traces(a, tr).loss,
                                                    tj.replay_traces(b, tr).loss)
  same(chosen.deployed, sel.deployed)
  point = S.OperatingPoint(0.8, None)
  for c in cands:  # the batch's refit equals the host reference's
    host = S.refit(c, tr, point, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(tj.replay_traces(sel.refit_of(c).deployed, tr).cost,
                               tj.replay_traces(host.deployed, tr).cost, rtol=1e-6)
  with pytest.raises(ValueError, match="candidate: .* was not scored"):
    sel.refit_of(C("recall", num_states=16))


def test_calibrator_newton_stops_at_convergence_with_the_optimum():
  # Ridge logistic regressions of weighted soft labels, against NumPy's Newton run to 40 steps.
  rng = np.random.default_rng(0)
  p, num, d = 3, 600, 4
  feats = np.concatenate([np.ones((p, num, 1)), rng.normal(size=(p, num, d - 1))], -1)
  targets = (rng.random((p, num)) < 1 / (1 + np.exp(-feats[..., 1] * 1.5))).astype(float)
  weights = (rng.random(num) < 0.8).astype(float)
  with jax.enable_x64(True):
    got = np.asarray(answer_models._newton(feats, targets, weights, answer_models.NEWTON_STEPS))
  ridge = answer_models.RIDGE * weights.sum() * np.diag([0.0] + [1.0] * (d - 1))
  for k in range(p):
    x, y, w = feats[k], targets[k], np.zeros(d)
    for _ in range(40):
      q = 1 / (1 + np.exp(-x @ w))
      grad = x.T @ (weights * (q - y)) + ridge @ w
      hess = (x * (weights * q * (1 - q))[:, None]).T @ x + ridge + 1e-6 * np.eye(d)
      w = w - np.linalg.solve(hess, grad)
    np.testing.assert_allclose(got[k], w, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the demo's answer
@pytest.mark.parametrize("lam", [0.8, None])
def test_best_simple_rule_is_the_choice_among_the_rules_alone(lam):
  """The baseline the demo compares with: what the selection deploys when only the rules
  are candidates (same folds, same criterion), in lam and in tolerance mode."""
  tr = _patience_world(1500, 11)
  rules = [C("confidence", "max_softmax"), C("per_stage", "max_softmax"), C("patience"),
           C("fixed_exit")]
  kw = dict(tolerance=0.02) if lam is None else dict(lam=lam)
  full = tj.fit_policy(tr, candidates=[C("recall", "max_softmax", 4)] + rules, num_resamples=50,
                       **kw)
  alone = tj.fit_policy(tr, candidates=rules, num_resamples=50, **kw)
  assert S.best_simple_rule(full).candidate == alone.chosen.candidate
  assert S.best_simple_rule(alone).candidate == alone.chosen.candidate
  assert S.best_simple_rule(tj.fit_policy(tr, candidates=[C("recall", "max_softmax", 4)],
                                          num_resamples=50, **kw)) is None


def test_versus_best_rule_is_the_paired_held_out_difference():
  """compare.versus_best_rule against an independent computation: both policies replayed on
  the test traces, per-request differences, their means; intervals contain the means."""
  from ttamer_jax.app import compare
  c = tj.overthinking_cascade(4, 12)
  cal = tj.workload_traces(jax.random.PRNGKey(8), c, 3000)
  test = tj.workload_traces(jax.random.PRNGKey(9), c, 3000)
  cands = [C("no_recall", "max_softmax", 8, answers="posterior"), C("confidence", "max_softmax"),
           C("patience")]
  sel = tj.fit_policy(cal, 0.9, candidates=cands, num_resamples=100)
  assert sel.chosen.candidate == cands[0]
  ans = compare.versus_best_rule(sel, test, lam=0.9, num_resamples=400)
  rule = S.best_simple_rule(sel)
  assert ans["rule"]["name"] == rule.name and not ans["same"] and ans["best_ttamer"] is None
  full = float(test.full_cost())
  a, b = tj.replay_traces(sel.deployed, test), tj.replay_traces(sel.refit_of(rule.candidate).deployed, test)
  de = np.asarray(a.loss, np.float64) - np.asarray(b.loss, np.float64)
  dc = (np.asarray(a.cost, np.float64) - np.asarray(b.cost, np.float64)) / full
  np.testing.assert_allclose(ans["diff"]["error"][0], de.mean(), atol=1e-12)
  np.testing.assert_allclose(ans["diff"]["cost_norm"][0], dc.mean(), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(ans["diff"]["objective"][0], 0.9 * de.mean() + 0.1 * dc.mean(),
                             rtol=1e-9, atol=1e-12)
  ev = tj.evaluate(sel.deployed, test, 0.9)
  np.testing.assert_allclose(ans["deployed"]["test"]["error"][0], float(ev.error), atol=1e-9)
  np.testing.assert_allclose(ans["deployed"]["test"]["cost_norm"][0], float(ev.cost_norm), rtol=1e-6)
  for side in (ans["deployed"]["test"], ans["rule"]["test"], ans["diff"]):
    for v, lo, hi in side.values():
      assert lo <= v <= hi
  # The bootstrap interval of J's difference is about +-1.96 standard errors wide.
  se = np.std(0.9 * de + 0.1 * dc, ddof=1) / np.sqrt(de.size)
  _, lo, hi = ans["diff"]["objective"]
  assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
  assert ans["verdict"] == compare.verdict(ans["diff"], None)
  # The rule deployed itself (patience wins where scores are noise): the best T-Tamer
  # design is measured against it instead.
  cal, test = _patience_world(3000, 3), _patience_world(3000, 4)
  sel = tj.fit_policy(cal, 0.9, candidates=[C("recall", "max_softmax", 4), C("patience"),
                                            C("confidence", "max_softmax")], num_resamples=100)
  assert sel.chosen.candidate == C("patience")
  same = compare.versus_best_rule(sel, test, lam=0.9, num_resamples=100)
  assert same["same"] and same["diff"]["objective"] == [0.0, 0.0, 0.0]
  assert same["verdict"] == "no better" and same["rule"]["param"] == sel.refit_of(C("patience")).param
  best = same["best_ttamer"]
  assert best["name"] == "recall[max_softmax, 4 quantile states]"
  assert best["verdict"] == "worse"   # on held-out traffic too, by its paired interval
