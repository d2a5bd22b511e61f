"""docs/jit.md's example runs, means what it says, and does not recompile for a new ``lam``.

The page's ```python blocks run in order in one namespace (as tests/test_docs.py runs
every page); then the compiled monitor's ``J`` is checked against the same pipeline on
the host (``fit_cascade_from_states`` + ``recall_policy`` + ``replay``, and
``evaluate``), the vmapped cross-fitting against fitting each fold's requests
separately, and a call with a new ``lam`` must compile nothing.
"""

import os

import jax
import numpy as np
import pytest
from test_docs import blocks

import ttamer_jax as tj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "jit.md")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  code = [b for b in blocks(PAGE) if b.lang in ("python", "py")]
  assert code and all(b.skip is None for b in code)
  namespace = {"__name__": "__docs__"}
  cwd = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("jit_docs"))
  try:
    for block in code:
      exec(compile(block.source, block.where, "exec"), namespace)  # noqa: S102
  finally:
    os.chdir(cwd)
  return namespace


def _host_states(ns, traces):
  return np.asarray(ns["bins"](traces.signals["max_softmax"], traces.preds))


def _host_J(lam, model, states, traces):
  out = tj.replay(tj.recall_policy(model, lam), states, traces.losses, traces.costs)
  full = np.asarray(traces.cost_matrix(), np.float64).sum(1).mean()
  return lam * np.asarray(out.loss, np.float64) + (1 - lam) * np.asarray(out.cost) / full


def test_held_out_J_equals_the_host_pipeline(example):
  ns = example
  cal, test, k = ns["cal"], ns["test"], ns["bins"].num_states
  model = tj.data.fit_cascade_from_states(_host_states(ns, cal), cal.losses, cal.costs, k).cascade
  for lam, got in ((0.9, ns["J"]), (0.95, ns["J_later"])):
    want = _host_J(lam, model, _host_states(ns, test), test).mean()
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  # ... which is what evaluate reports for the deployed policy fitted on the same bins.
  fitted = tj.fit_cascade(cal, discretiser=ns["bins"], score="max_softmax")
  ev = tj.evaluate(fitted.recall_policy(0.9), test, 0.9, num_resamples=10)
  np.testing.assert_allclose(float(ns["J"]), float(ev.objective), rtol=1e-5, atol=1e-6)


def test_cross_fitted_J_equals_fitting_each_fold(example):
  ns = example
  cal, k = ns["cal"], ns["bins"].num_states
  states = _host_states(ns, cal)
  folds = np.asarray(ns["folds"]) > 0
  per_request = np.zeros(cal.num_samples)
  for held in folds:
    train = cal.subset(~held)
    model = tj.data.fit_cascade_from_states(states[~held], train.losses, train.costs, k).cascade
    per_request[held] = _host_J(0.9, model, states, cal)[held]
  got = ns["cross_fitted_J"](ns["bins"], ns["batch"](cal), ns["folds"], 0.9)
  np.testing.assert_allclose(float(got), per_request.mean(), rtol=1e-5, atol=1e-6)


def test_a_new_lam_compiles_nothing(example):
  ns = example
  cal, test = ns["batch"](ns["cal"]), ns["batch"](ns["test"])
  compiles = []
  listener = lambda event, *args, **kwargs: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for lam in (0.3, 0.5, 0.999):
      jax.block_until_ready(ns["held_out_J"](ns["bins"], cal, test, lam))
      jax.block_until_ready(ns["cross_fitted_J"](ns["bins"], cal, ns["folds"], lam))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles.count(COMPILE_EVENT) == 0, compiles
