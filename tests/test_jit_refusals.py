"""Host-side functions called inside ``jit`` say so, and name the jit-able alternative.

They run at the boundary on concrete arrays (quantile bins, bootstrap, float64 sums on
the host, file I/O). Given a traced value -- or called inside ``jit`` at all -- each
raises a ``ValueError`` naming itself, the field and what to use inside ``jit``
instead (DESIGN.md section 12, docs/jit.md), not JAX's ``TracerArrayConversionError``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttamer_jax as tj
from ttamer_jax.core import validation

N, NUM_STAGES, K = 120, 3, 4


def _arrays():
  rng = np.random.default_rng(0)
  return dict(scores=rng.random((N, NUM_STAGES)).astype(np.float32),
              preds=rng.integers(0, 3, (N, NUM_STAGES)).astype(np.int32),
              losses=rng.random((N, NUM_STAGES)).astype(np.float32),
              costs=np.array([1.0, 2.0, 3.0], np.float32))


ARRAYS = _arrays()
TRACES = tj.ExitTraces(**ARRAYS)
STATES = np.asarray(tj.fit_discretiser(ARRAYS["scores"], K)(ARRAYS["scores"]))
FITTED = tj.fit_cascade(TRACES, K)
DEPLOYED = FITTED.recall_policy(0.5)
KEY = jax.random.PRNGKey(0)


def _traced_traces(scores):
  return tj.ExitTraces(**dict(ARRAYS, scores=scores))


# (name, function of one traced argument x, the field named, the alternative named)
CASES = [
    ("fit_cascade", lambda x: tj.fit_cascade(_traced_traces(x), K), "traces",
     "fit_cascade_arrays"),
    ("fit_cascade_from_states",
     lambda x: tj.data.fit_cascade_from_states(STATES, x, ARRAYS["costs"], K), "losses",
     "fit_cascade_arrays"),
    ("fit_discretiser", lambda x: tj.fit_discretiser(x, K), "scores", "Discretiser"),
    ("fit_skip_line", lambda x: tj.data.fit_skip_line(_traced_traces(x), K), "traces",
     "fit_cascade_arrays"),
    ("traces_with_states",
     lambda x: tj.data.traces_with_states(STATES, x, ARRAYS["costs"], K), "losses", "replay"),
    ("evaluate", lambda x: tj.evaluate(DEPLOYED, _traced_traces(x), 0.5), "traces", "replay"),
    ("fit_policy", lambda x: tj.fit_policy(_traced_traces(x), 0.5), "traces",
     "fit_cascade_arrays"),
    ("fit_policy", lambda x: tj.fit_policy(TRACES, x.mean()), "lam", "fit_cascade_arrays"),
    ("evaluate", lambda x: tj.evaluate(DEPLOYED, TRACES, x.mean()), "lam", "replay"),
    ("replay_traces", lambda x: tj.replay_traces(DEPLOYED, _traced_traces(x)), "traces",
     "replay"),
    ("compare", lambda x: tj.compare(DEPLOYED, DEPLOYED, _traced_traces(x), 0.5), "traces",
     "replay"),
    ("bootstrap_means", lambda x: tj.evaluation.bootstrap_means(KEY, x), "columns", "jnp"),
    ("replay_totals",
     lambda x: tj.core.replay_totals(tj.core.ThresholdPolicy(thresholds=x[:2]), STATES, ARRAYS["losses"],
                                ARRAYS["costs"], scores=ARRAYS["scores"]), "policies",
     "vmap ttamer_jax.replay"),
    ("sweep_recall", lambda x: tj.sweep_recall(FITTED, _traced_traces(x), [0.5]), "traces",
     "recall_policy"),
    ("sweep_no_recall", lambda x: tj.evaluation.sweep_no_recall(FITTED, TRACES, x[:2, 0]), "lams",
     "recall_policy"),
    ("sweep_policies",
     lambda x: tj.evaluation.sweep_policies(tj.core.ThresholdPolicy(thresholds=x[:2]), [0.0, 1.0], TRACES),
     "policies", "ttamer_jax.replay"),
    ("hindsight_sweep", lambda x: tj.evaluation.hindsight_sweep(_traced_traces(x), [0.5]), "traces",
     "prophet_value"),
    ("heuristic_sweeps", lambda x: tj.evaluation.heuristic_sweeps(_traced_traces(x), TRACES), "calibration",
     "ttamer_jax.replay"),
    ("confidence_grid", lambda x: tj.evaluation.confidence_grid(_traced_traces(x)), "traces",
     "confidence_threshold"),
    ("per_stage_grid", lambda x: tj.evaluation.per_stage_grid(_traced_traces(x)), "traces",
     "per_stage_thresholds"),
    ("hindsight_policy", lambda x: tj.hindsight_policy(x, ARRAYS["costs"], 0.5), "losses",
     "prophet_value"),
    ("aggregate_cascade",
     lambda x: tj.core.aggregate_cascade(FITTED.cascade.replace(values=x[:NUM_STAGES, :K]), 2),
     "cascade", "AggregatedCascade"),
    ("save_policy", lambda x: tj.save_policy("never.npz", FITTED.recall_policy(x.mean())),
     "deployed", "jax.debug.callback"),
    ("save_cascade",
     lambda x: tj.save_cascade("never.npz", FITTED.cascade.replace(values=x[:NUM_STAGES, :K])),
     "cascade", "jax.debug.callback"),
    ("save_traces", lambda x: tj.save_traces("never.npz", _traced_traces(x)), "traces",
     "jax.debug.callback"),
]


@pytest.mark.parametrize("name, call, field, alternative", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_traced_input_is_refused_by_name(name, call, field, alternative, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as info:
    jax.jit(call)(ARRAYS["scores"])
  text = str(info.value)
  assert text.startswith(f"{field}: {name} runs at the boundary"), text
  assert "inside jit" in text and alternative in text, text
  assert not list(tmp_path.iterdir())  # nothing written


def test_concrete_input_inside_jit_is_refused_too():
  """Closed-over, concrete arguments: inside ``jit`` even constants are traced."""
  with pytest.raises(ValueError, match=r"^fit_cascade: runs at the boundary .* called inside jit"
                                       r".*ensure_compile_time_eval.*fit_cascade_arrays"):
    jax.jit(lambda lam: tj.fit_cascade(TRACES, K).cascade.values * lam)(0.5)
  # ... and works where every input is concrete and constants stay concrete.
  def fit_at_trace_time(lam):
    with jax.ensure_compile_time_eval():
      fitted = tj.fit_cascade(TRACES, K)
    return tj.solve_recall(fitted.cascade, lam).value
  np.testing.assert_allclose(float(jax.jit(fit_at_trace_time)(0.5)),
                             float(tj.solve_recall(FITTED.cascade, 0.5).value), rtol=1e-6)


def test_vmap_and_grad_of_concrete_inputs_still_run():
  """Outside a staged trace host functions run as usual (nothing is refused)."""
  out = jax.vmap(lambda lam: lam * tj.fit_cascade(TRACES, K).cascade.values.sum())(
      jnp.array([0.2, 0.4]))
  np.testing.assert_allclose(np.asarray(out), np.array([0.2, 0.4]) *
                             float(FITTED.cascade.values.sum()), rtol=1e-6)


def test_refuse_traced_and_is_staging():
  assert not validation.is_staging()
  assert jax.jit(lambda x: x + validation.is_staging())(0) == 1
  validation.refuse_traced("f", "use g", a=np.zeros(2), b=None, c={"d": 1})  # concrete: fine

  def refused(x):
    validation.refuse_traced("f", "use g", a=np.zeros(2), tree={"deep": [x]})
  with pytest.raises(ValueError, match=r"^tree: f runs at the boundary .*; use g\b"):
    jax.vmap(refused)(jnp.ones(2))


def test_threshold_heuristics_take_traced_thresholds():
  """They used to say 'threshold: cannot be converted to an array' inside jit."""
  def mean_loss(t):
    policy = tj.confidence_threshold(t, NUM_STAGES)
    return tj.replay(policy, STATES, ARRAYS["losses"], ARRAYS["costs"], scores=ARRAYS["scores"],
                     preds=ARRAYS["preds"]).loss.mean()
  for t in (0.3, 0.7):
    np.testing.assert_allclose(float(jax.jit(mean_loss)(t)), float(mean_loss(t)), rtol=1e-6)
  assert jax.jit(lambda t: tj.core.entropy_threshold(t, NUM_STAGES).thresholds)(0.5).shape == (3,)
  assert jax.jit(lambda t: tj.per_stage_thresholds(t).thresholds)(jnp.ones(3)).shape == (3,)
  with pytest.raises(ValueError, match=r"^threshold: expected a number"):
    jax.jit(lambda t: tj.confidence_threshold(t, NUM_STAGES).thresholds)(jnp.ones(2))
  with pytest.raises(ValueError, match=r"^thresholds: expected shape \[n\]"):
    jax.jit(lambda t: tj.per_stage_thresholds(t).thresholds)(jnp.ones((2, 3)))
