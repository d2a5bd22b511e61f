"""Batched cross-fitting (issue 23): the same out-of-fold outcomes as fitting candidate by
candidate on the host, folds that never leak, and a handful of compiled programs."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax.data import answers as answer_models
from ttamer_jax.evaluation import crossfit
from ttamer_jax.evaluation import selection as S

C = tj.evaluation.Candidate
CANDIDATES = (C("recall", "max_softmax", 6, binning="uniform"),
              C("no_recall", "max_softmax", 4),
              C("recall", "max_softmax", 8, feature="agree_best"),
              C("recall", "max_softmax", 4, answers="posterior"),
              C("no_recall", "max_softmax", 4, answers="posterior", smoothing=10.0),
              C("confidence", "max_softmax"), C("per_stage", "max_softmax"), C("patience"),
              C("fixed_exit"))


def _traces(num, seed):
  """Correlated exits: a per-request difficulty drives every exit's confidence and
  mistakes, predictions disagree on hard requests, costs rise along the line."""
  rng = np.random.default_rng(seed)
  n, classes = 4, 5
  hard = rng.random(num)
  labels = rng.integers(0, classes, num)
  skill = np.linspace(0.2, 0.9, n)
  wrong = rng.random((num, n)) < hard[:, None] * (1 - skill)[None, :]
  preds = np.where(wrong, (labels[:, None] + rng.integers(1, classes, (num, n))) % classes,
                   labels[:, None])
  conf = np.clip(1 - hard[:, None] * (1 - skill) + rng.normal(0, 0.1, (num, n)), 0.0, 1.0)
  return tj.ExitTraces(scores=conf, preds=preds, losses=wrong.astype(float),
                       costs=[1.0, 2.0, 3.0, 8.0], signals={"max_softmax": conf}, labels=labels)


def _setup(traces, folds=4):
  k_folds, k_inner, _, _ = crossfit.subkeys(np.zeros(2, np.uint32), 4)
  ids = answer_models.fold_ids(k_folds, traces.num_samples, folds)
  return ids, k_inner


def _training_grid(cand, train, point, k_inner, f, folds):
  """The host path's grid on a fold's training requests: ``(params [P], error [P],
  cost share [P], last exit's error)`` (a rule's parameters, or the lams of a T-Tamer
  candidate in tolerance mode)."""
  if not cand.ttamer:
    policies, grid = S._rule_grid(cand, train)
    sweep = tj.evaluation.sweep_policies(policies, grid, train, score_name=cand.score)
    on = train
  else:
    key = crossfit.subkeys(k_inner, folds + 1)[f]
    on = S.posterior_traces(train, cand.score, key=key) if cand.answers == "posterior" else None
    fitted = S.fit_model(cand, train, key=key, virtual=on)
    on = train if on is None else on
    import dataclasses
    sweep = (tj.sweep_recall if cand.kind == "recall" else tj.evaluation.sweep_no_recall)(
        dataclasses.replace(fitted, answers=None), on, S.LAMS)
    grid = S.LAMS
  return grid, np.asarray(sweep.error), np.asarray(sweep.cost_norm), S._last_exit_error(on)


@pytest.mark.parametrize("point", [S.OperatingPoint(0.8, None), S.OperatingPoint(None, 0.02)],
                         ids=["lam", "tolerance"])
def test_batched_outcomes_are_the_host_loops_request_by_request(point):
  tr = _traces(500, 0)
  folds = 4
  ids, k_inner = _setup(tr, folds)
  batch = S._cross_fit_batched(CANDIDATES, tr, ids, folds, point, k_inner)
  splits = [(np.flatnonzero(ids != f), np.flatnonzero(ids == f)) for f in range(folds)]
  for cand, (loss, cost, params, modelled) in zip(CANDIDATES, batch.outcomes):
    h_loss, h_cost, h_params, h_modelled = S._cross_fitted(cand, tr, splits, point, k_inner, {})
    same = np.ones(tr.num_samples, bool)
    for f in np.flatnonzero(~np.isclose(params, h_params, rtol=0, atol=1e-6)):
      # An operating point may differ only where two grid points tie on the training
      # folds (float32 sums here, float64 there, break exact ties differently).
      grid, err, share, ref = _training_grid(cand, tr.subset(splits[f][0]), point, k_inner, f,
                                             folds)
      at = lambda p: int(np.argmin(np.abs(grid - p)))
      a, b = at(params[f]), at(h_params[f])
      if point.lam is not None:
        j = point.lam * err + (1 - point.lam) * share
        assert j[a] == pytest.approx(j[b], abs=1e-6), cand.name
      else:
        ok = err <= ref + point.tolerance + 1e-6
        assert ok[a] == ok[b] and share[a] == pytest.approx(share[b], abs=1e-6), cand.name
      same[splits[f][1]] = False
    np.testing.assert_allclose(loss[same], h_loss[same], atol=1e-6, err_msg=cand.name)
    np.testing.assert_allclose(cost[same], h_cost[same], rtol=1e-6, err_msg=cand.name)
    if not cand.ttamer:
      assert modelled is None and h_modelled is None
    elif same.all():
      # float32 counting vs float64: the model's own numbers to rounding
      np.testing.assert_allclose(modelled, h_modelled, rtol=2e-3, atol=1e-4, err_msg=cand.name)


def test_the_refit_is_the_host_fit_on_every_request():
  tr = _traces(400, 1)
  ids, k_inner = _setup(tr)
  batch = S._cross_fit_batched(CANDIDATES[:3], tr, ids, 4, S.OperatingPoint(0.8, None), k_inner)
  for i, cand in enumerate(CANDIDATES[:3]):
    final = batch.final(i)
    host = S.refit(cand, tr, S.OperatingPoint(0.8, None), key=k_inner)
    np.testing.assert_allclose(final.fitted.cascade.values, host.fitted.cascade.values, atol=1e-5)
    np.testing.assert_allclose(final.fitted.cascade.trans, host.fitted.cascade.trans, atol=1e-5)
    np.testing.assert_allclose(final.fitted.discretiser.edges, host.fitted.discretiser.edges)
    a, b = tj.replay_traces(final.deployed, tr), tj.replay_traces(host.deployed, tr)
    np.testing.assert_array_equal(a.stop_stage, b.stop_stage)
    np.testing.assert_array_equal(a.answer_stage, b.answer_stage)
    # The in-sample replay the model check reads is the refit's replay.
    np.testing.assert_allclose(batch.in_sample[i][1], np.asarray(a.cost), rtol=1e-6)


def test_a_folds_policy_never_sees_that_folds_losses():
  """Flip every loss of fold 0: the policies replayed on fold 0 (and so when those
  requests stop) must not move, for every candidate; flipping fold 1's losses instead
  moves some of them (the check can fail)."""
  tr = _traces(600, 2)
  ids, k_inner = _setup(tr)

  def fold0_costs(flip_fold):
    losses = np.asarray(tr.losses).copy()
    losses[ids == flip_fold] = 1 - losses[ids == flip_fold]
    batch = S._cross_fit_batched(CANDIDATES, tr.replace(losses=losses), ids, 4,
                                 S.OperatingPoint(0.8, None), k_inner)
    return [out[1][ids == 0] for out in batch.outcomes]

  base = fold0_costs(None)
  for cand, a, b in zip(CANDIDATES, base, fold0_costs(0)):
    np.testing.assert_array_equal(a, b, err_msg=cand.name)
  moved = [not np.array_equal(a, b) for a, b in zip(base, fold0_costs(1))]
  assert sum(moved) >= len(CANDIDATES) // 2


COUNT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    counts = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: counts.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    sys.path.insert(0, sys.argv[1])
    import ttamer_jax as tj
    from test_crossfit import _traces
    out = []
    for num in (420, 421, 3001):
      before = len(counts)
      tj.fit_policy(_traces(num, 3), 0.9, num_resamples=100)
      out.append(len(counts) - before)
    # Replay-based evaluation and sweeps on new request counts.
    fitted = tj.fit_cascade(_traces(400, 4), 8, score="max_softmax")
    lams = np.linspace(0, 1, 11)
    for num in (500, 501, 2999):
      tr = _traces(num, 5)
      for call in (lambda: tj.evaluate(fitted.recall_policy(0.9), tr, 0.9, num_resamples=100),
                   lambda: tj.sweep_recall(fitted, tr, lams),
                   lambda: tj.evaluation.sweep_no_recall(fitted, tr, lams)):
        before = len(counts)
        call()
        out.append(len(counts) - before)
    print(json.dumps(out))
""")


def test_a_selection_compiles_a_handful_of_programs():
  """Cold: at most 12 programs for the default candidates; a new number of requests
  (same request bucket) compiles at most 2 more. A fresh process, no persistent cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  res = subprocess.run([sys.executable, "-c", COUNT, os.path.dirname(__file__)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  counts = json.loads(res.stdout.strip().splitlines()[-1])
  (cold, again, larger), replays = counts[:3], np.reshape(counts[3:], (3, 3))
  print(f"\ncompilations: fit_policy cold {cold}, 421 requests {again}, 3001 requests {larger}; "
        f"evaluate / sweep_recall / sweep_no_recall at 500, 501, 2999 requests: {replays.tolist()}")
  assert cold <= 12
  assert again <= 2 and larger <= 2
  assert replays[1:].max() <= 2      # each function, each new request count
