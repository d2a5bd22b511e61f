"""Policy-guided batched serving against an unbatched reference and against replay."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from serving_reference import serve_reference
from test_bench import import_benchmark

import ttamer_jax as tj

# Internal: the frozen-dataclass pytree decorator, to write policies as a user would.
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data import answers  # AnswerModel's feature count
from ttamer_jax.networks import serving, serving_costs, workloads

# The serving programs the package does not ship (benchmarks/), each checked against its one.
programs = import_benchmark("serving_programs")


@pytree_dataclass
class ThresholdPolicy:
  """Stop at the first stage whose score reaches ``thresholds[stage]`` (no recall)."""

  thresholds: chex.Array
  recall = False          # the ttamer_jax.core.LinePolicy protocol, written out by a user
  observes = "signals"
  num_states = None
  batch_shape = ()

  @property
  def num_stages(self):
    return self.thresholds.shape[0]

  def estimate(self, stage, obs):
    return jnp.zeros(obs.score.shape)

  def initial_carry(self, batch_size):
    return ()

  def step(self, carry, stage, obs, best):
    return carry, obs.score >= self.thresholds[stage]


@pytree_dataclass
class PatiencePolicy:
  """Stop once ``patience`` consecutive exits agree; its carry is per request."""

  patience: chex.Array
  stages: chex.Array  # [n] placeholder that fixes num_stages.
  recall = False
  observes = "signals"
  num_states = None
  batch_shape = ()

  @property
  def num_stages(self):
    return self.stages.shape[0]

  def estimate(self, stage, obs):
    return jnp.zeros(obs.score.shape)

  def initial_carry(self, batch_size):
    return (jnp.zeros(batch_size, jnp.int32), jnp.full(batch_size, -1, jnp.int32))

  def step(self, carry, stage, obs, best):
    count, prev = carry
    count = jnp.where(obs.pred == prev, count + 1, 0)
    return (count, obs.pred), count >= self.patience


def test_user_policies_implement_the_protocol():
  assert isinstance(ThresholdPolicy(jnp.zeros(3)), tj.core.LinePolicy)
  assert isinstance(PatiencePolicy(jnp.asarray(1), jnp.zeros(3)), tj.core.LinePolicy)


# The tiny CNN of test_nn.py (same shapes: compilations are shared), 3 stages.
MODEL = tj.EarlyExitCNN((8, 8, 1), 10, channels=(4, 8, 8), rngs=nnx.Rngs(1))
N_STAGES = MODEL.num_stages
# A few training steps on the digits, so that exits agree and disagree as real ones do.
_DIGITS = workloads.digits(seed=0)
tj.train(MODEL, _DIGITS.train.x, _DIGITS.train.y,
         tj.networks.TrainConfig(num_steps=40, batch_size=64, learning_rate=1e-2,
                        warmup_steps=5), progress=False)
X, Y = _DIGITS.test.x[:120], _DIGITS.test.y[:120]
TRACES = tj.collect_traces(MODEL, X, Y, cost="flops")


def _edges(score_name, bins):
  """Quantile edges placed midway between neighbouring scores (no score sits on an edge)."""
  s = np.sort(np.asarray(TRACES.signals[score_name]), axis=0)
  pos = (np.arange(1, bins) * len(s)) // bins
  return jnp.asarray((s[pos - 1] + s[pos]).T / 2, jnp.float32)


def _deployed(kind):
  if kind in ("recall", "no_recall", "recall_agree", "recall_agree_best", "recall_error"):
    feature = {"recall_agree": "agree_prev", "recall_agree_best": "agree_best"}.get(kind)
    score = "error_prob" if kind == "recall_error" else "max_softmax"
    disc = tj.data.Discretiser(edges=_edges(score, 4), feature=feature)
    cascade = tj.synthetic_cascade(7, N_STAGES, disc.num_states, regime="random")
    policy = (tj.core.no_recall_policy(cascade, 0.9) if kind == "no_recall" else
              tj.recall_policy(cascade, 0.9))
    return tj.DeployedPolicy(policy=policy, discretiser=disc, score_name=score)
  disc = tj.data.Discretiser(edges=_edges("max_softmax", 2))
  if kind == "threshold":
    mid = np.median(np.asarray(TRACES.signals["max_softmax"]), axis=0)
    return tj.DeployedPolicy(policy=ThresholdPolicy(jnp.asarray(mid, jnp.float32)),
                             discretiser=disc, score_name="max_softmax")
  assert kind == "patience"
  return tj.DeployedPolicy(policy=PatiencePolicy(jnp.asarray(1), jnp.zeros(N_STAGES)),
                           discretiser=disc, score_name="entropy")


KINDS = ("recall", "recall_agree", "recall_agree_best", "recall_error", "no_recall", "threshold",
         "patience")
BUCKETS = (8, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_serve_matches_the_unbatched_reference(kind):
  deployed = _deployed(kind)
  x = X[:40]
  got = tj.networks.serve(MODEL, deployed, x, buckets=BUCKETS)
  ref = serve_reference(MODEL, deployed, x)
  np.testing.assert_array_equal(got.predictions, ref.predictions)
  np.testing.assert_array_equal(got.answered_exit, ref.answered_exit)
  np.testing.assert_array_equal(got.stop_stage, ref.stop_stage)
  np.testing.assert_array_equal(got.consulted, ref.consulted)
  # The policy must actually vary per request for the comparison to mean something.
  assert len(np.unique(got.stop_stage)) >= 2, np.bincount(got.stop_stage)
  # consulted is the prefix 0..stop_stage; no-recall answers from the last stage.
  np.testing.assert_array_equal(got.consulted,
                                np.arange(N_STAGES)[None, :] <= got.stop_stage[:, None])
  assert (got.answered_exit <= got.stop_stage).all()
  if not deployed.policy.recall:
    np.testing.assert_array_equal(got.answered_exit, got.stop_stage)


# The package's program for every kind; the benchmark harness's other two programs (not
# shipped) for the kind with the most state (agreement with the best earlier exit).
PROGRAM_CASES = [(kind, "batch") for kind in ("recall", "recall_agree", "recall_agree_best",
                                              "no_recall")]
PROGRAM_CASES += [("recall_agree_best", p) for p in programs.PROGRAMS if p != "batch"]


@pytest.mark.parametrize("kind, program", PROGRAM_CASES)
def test_serve_matches_replay_of_the_traces(kind, program):
  """Serving a batch = replaying the same policy on the batch's full exit traces:
  the served decisions (stop stage, answered exit, states seen) are the policy's."""
  deployed = _deployed(kind)
  score = TRACES.signals[deployed.score_name]
  states = deployed.discretiser(score, TRACES.preds)
  rep = tj.replay(deployed.policy, states, TRACES.losses, TRACES.costs, scores=score,
                  preds=TRACES.preds)
  got = programs.make_server(MODEL, deployed, buckets=BUCKETS, program=program)(X)
  np.testing.assert_array_equal(got.consulted,
                                np.arange(N_STAGES)[None, :] <= got.stop_stage[:, None])
  np.testing.assert_array_equal(got.states[got.consulted], np.asarray(states)[got.consulted])
  np.testing.assert_array_equal(got.stop_stage, rep.stop_stage)
  np.testing.assert_array_equal(got.answered_exit, rep.answer_stage)
  np.testing.assert_array_equal(got.predictions,
                                np.asarray(TRACES.preds)[np.arange(len(X)), got.answered_exit])
  if deployed.policy.recall:
    assert (got.answered_exit < got.stop_stage).any()  # recall is exercised


# One candidate of each family fit_policy chooses among (default_candidates): T-Tamer
# over exit bins with and without recall, with an agreement feature (on the learned
# error signal, against the most confident earlier exit), over posterior-answer
# stages with and without recall, and each simple rule.
FAMILIES = {
    "recall": tj.evaluation.Candidate("recall", "max_softmax", 4),
    "no_recall": tj.evaluation.Candidate("no_recall", "max_softmax", 4),
    "recall_agree_prev": tj.evaluation.Candidate("recall", "max_softmax", 8, feature="agree_prev"),
    "recall_error_agree_best": tj.evaluation.Candidate("recall", "error_prob", 8, feature="agree_best"),
    "posterior_recall": tj.evaluation.Candidate("recall", "max_softmax", 4, answers="posterior"),
    "posterior_no_recall": tj.evaluation.Candidate("no_recall", "max_softmax", 4, answers="posterior"),
    "confidence": tj.evaluation.Candidate("confidence", "max_softmax"),
    "per_stage": tj.evaluation.Candidate("per_stage", "max_softmax"),
    "patience": tj.evaluation.Candidate("patience"),
    "fixed_exit": tj.evaluation.Candidate("fixed_exit"),
}


@functools.cache
def _selection():
  """fit_policy over FAMILIES on the calibration split (the served batch X is held out)."""
  cal = tj.collect_traces(MODEL, _DIGITS.calibration.x, _DIGITS.calibration.y, cost="flops")
  return tj.fit_policy(cal, 0.9, candidates=list(FAMILIES.values()), folds=3, num_resamples=50)


def _fitted(family):
  """The deployed policy of ``family`` as fit_policy fits it (refit on every request)."""
  return _selection().refit_of(FAMILIES[family]).deployed


def _replayed(deployed, traces):
  """``(stop stage, answered exit, answer, states)`` of ``deployed`` replayed on ``traces``,
  each ``[N]`` (states ``[N, n]``); with an answer model, on its virtual stages, the
  answered exit being the exit the answered virtual stage answers with."""
  stages = deployed.stage_traces(traces)
  rep = tj.replay_traces(deployed, traces)
  rows, at = np.arange(traces.num_samples), np.asarray(rep.answer_stage)
  exits = (np.asarray(stages.signals["answer_stage"]).astype(np.int32)[rows, at]
           if deployed.answers is not None else at)
  return (np.asarray(rep.stop_stage), exits, np.asarray(stages.preds)[rows, at],
          np.asarray(deployed.observations(stages)[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_fit_policy_chooses_serves_as_it_replays(family):
  """Served stop stage, answered exit, answer and states of every request = replay of the
  batch's exit traces, for the policy fit_policy deploys from each family."""
  deployed = _fitted(family)
  assert (deployed.answers is not None) == (FAMILIES[family].answers == "posterior")
  got = tj.networks.serve(MODEL, deployed, X, buckets=BUCKETS)
  stop, exits, answer, states = _replayed(deployed, TRACES)
  np.testing.assert_array_equal(got.stop_stage, stop)
  np.testing.assert_array_equal(got.answered_exit, exits)
  np.testing.assert_array_equal(got.predictions, answer)
  np.testing.assert_array_equal(got.consulted, np.arange(N_STAGES)[None, :] <= stop[:, None])
  np.testing.assert_array_equal(got.states[got.consulted], states[got.consulted])
  if family != "fixed_exit":   # the policy decides per request
    assert len(np.unique(got.stop_stage)) >= 2, np.bincount(got.stop_stage)
  if deployed.answers is not None:  # even without recall, an earlier exit answers
    assert (got.answered_exit < got.stop_stage).any()


def test_posterior_answer_policies_serve_alike_on_every_program():
  """The three programs and the unbatched reference serve a posterior-answer policy
  identically (several chunks and a remainder); so does a policy reading the virtual
  stages' other signal, the answering exit (``answer_stage``), as replay does."""
  deployed = _fitted("posterior_recall")
  x = X[:37]
  ref = serve_reference(MODEL, deployed, x)
  for program in programs.PROGRAMS:
    got = programs.make_server(MODEL, deployed, buckets=BUCKETS, program=program)(x)
    for field in ("predictions", "answered_exit", "stop_stage", "consulted", "states"):
      np.testing.assert_array_equal(getattr(got, field), getattr(ref, field),
                                    err_msg=f"{program}: {field}")
  edges = jnp.broadcast_to(jnp.asarray([0.5, 1.5, 2.5]), (N_STAGES, 3))  # state = exit j*
  by_exit = deployed.replace(discretiser=tj.data.Discretiser(edges=edges), score_name="answer_stage")
  got = tj.networks.serve(MODEL, by_exit, X, buckets=BUCKETS)
  stop, exits, answer, states = _replayed(by_exit, TRACES)
  np.testing.assert_array_equal(got.stop_stage, stop)
  np.testing.assert_array_equal(got.answered_exit, exits)
  np.testing.assert_array_equal(got.predictions, answer)
  np.testing.assert_array_equal(got.states[got.consulted], states[got.consulted])
  assert len(np.unique(got.states[got.consulted])) >= 2


def test_posterior_answer_policies_are_validated():
  deployed = _fitted("posterior_no_recall")
  model = deployed.answers
  with pytest.raises(ValueError, match="answers: expected None or an AnswerModel, got ndarray"):
    tj.Server(MODEL, deployed.replace(answers=np.zeros(3)))
  four = model.replace(weights=np.zeros((10, answers.NUM_FEATURES)))
  with pytest.raises(ValueError, match="answers: fitted on 4 stages but the network has 3 exits"):
    tj.Server(MODEL, deployed.replace(answers=four))
  with pytest.raises(ValueError, match="answers: its calibrators read the signal 'scores'"):
    tj.Server(MODEL, deployed.replace(answers=model.replace(score_name="scores")))
  with pytest.raises(ValueError, match="score_name: a posterior-answer policy reads a signal of "
                                       "the virtual stages"):
    tj.Server(MODEL, deployed.replace(score_name="max_softmax"))
  no_err = tj.EarlyExitCNN((8, 8, 1), 10, channels=(4, 8, 8), error_head=False, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="without error heads"):
    tj.Server(no_err, deployed.replace(answers=model.replace(score_name="error_prob")))
  # The primary "scores" serves only rules that cannot read it (patience, fixed exit).
  assert _fitted("patience").score_name == "scores"
  with pytest.raises(ValueError, match="score: must be one of"):
    tj.Server(MODEL, _deployed("threshold").replace(score_name="scores"))


def test_no_recompilation_after_warmup():
  deployed = _deployed("patience")  # a policy with a per-request carry
  server = tj.Server(MODEL, deployed, buckets=BUCKETS)
  first = server.warmup()
  assert server.warmup() == 0
  assert first <= N_STAGES * 2 + (N_STAGES - 1) * 3  # stage kernels + compactions
  whole = server(X)
  before = serving.compile_count()
  rng = np.random.default_rng(1)
  for _ in range(20):
    idx = rng.choice(len(X), size=int(rng.integers(1, 80)), replace=False)  # >32: chunks
    got = server(X[idx])
    # Each request's outcome is independent of what else is in the batch.
    np.testing.assert_array_equal(got.predictions, whole.predictions[idx])
    np.testing.assert_array_equal(got.stop_stage, whole.stop_stage[idx])
  assert serving.compile_count() == before


@pytest.mark.parametrize("kind", ("patience", "recall_agree_best"))
def test_programs_agree_and_full_network_is_the_last_exit(kind, monkeypatch):
  """The three serving programs serve identical results, with several chunks and a
  remainder (odd batch size), a stage nobody reaches, and a batch smaller than the
  smallest bucket; the batch program with groups of one chunk (several groups)
  and of up to eight (a loop over full chunks, then the remainder)."""
  deployed = _deployed(kind)
  for x in (X[:77], X[:3], X[:64]):
    by_stage = programs.StageServer(MODEL, deployed, buckets=BUCKETS)(x)
    servers = [programs.ChunkServer(MODEL, deployed, buckets=BUCKETS),
               programs.BatchServer(MODEL, deployed, buckets=BUCKETS)]
    monkeypatch.setattr(serving, "GROUP_BYTES", 1 << 40)
    servers.append(programs.BatchServer(MODEL, deployed, buckets=BUCKETS))
    monkeypatch.setattr(serving, "GROUP_BYTES", 1)
    servers.append(programs.BatchServer(MODEL, deployed, buckets=BUCKETS))
    monkeypatch.undo()
    assert [s.group_chunks for s in servers[2:]] == [8, 1]
    for server in servers:
      got = server(x)
      for field in ("predictions", "answered_exit", "stop_stage", "consulted", "states"):
        np.testing.assert_array_equal(getattr(got, field), getattr(by_stage, field),
                                      err_msg=f"{server.program} x {server.group_chunks}: {field}")
  server = tj.Server(MODEL, deployed, buckets=BUCKETS)
  np.testing.assert_array_equal(server.full_network(X[:77]),
                                np.asarray(TRACES.preds)[:77, -1])
  stop_first = deployed.replace(policy=tj.core.FixedExitPolicy(exit_stage=0, num_stages=N_STAGES))
  got = tj.networks.serve(MODEL, stop_first, X[:40], buckets=BUCKETS)
  assert (got.stop_stage == 0).all() and (got.states[:, 1:] == -1).all()
  with pytest.raises(ValueError, match="program: must be one of"):
    programs.make_server(MODEL, deployed, program="fused")


def test_compile_counter_sees_new_buckets():
  deployed = _deployed("threshold")
  tj.networks.serve(MODEL, deployed, X[:5], buckets=BUCKETS)
  before = serving.compile_count()
  tj.networks.serve(MODEL, deployed, X[:5], buckets=(5, 32))  # a new bucket size compiles
  assert serving.compile_count() > before


def test_served_wall_time_reports_accuracy_and_time():
  deployed = _deployed("recall")
  timed = serving_costs.served_wall_time(MODEL, deployed, X, Y, buckets=BUCKETS, repeats=2)
  served = tj.networks.serve(MODEL, deployed, X, buckets=BUCKETS)
  assert timed["serve_accuracy"] == pytest.approx((served.predictions == Y).mean())
  last = np.asarray(TRACES.preds)[:, -1]
  assert timed["full_accuracy"] == pytest.approx((last == Y).mean())
  assert timed["mean_stages"] == pytest.approx(served.num_consulted.mean())
  assert timed["serve_seconds"] > 0 and timed["full_seconds"] > 0 and timed["speedup"] > 0
  assert timed["batch_size"] == len(X)
  assert timed["speedup"] == pytest.approx(timed["full_seconds"] / timed["serve_seconds"])
  assert json.loads(json.dumps(timed)) == timed  # JSON-ready, as results.json stores it


def test_bad_input_raises_value_error():
  deployed = _deployed("recall")
  with pytest.raises(ValueError, match=r"expected shape \[batch, 8, 8, 1\]"):
    tj.networks.serve(MODEL, deployed, X[:, :, :, 0])
  with pytest.raises(ValueError, match="empty batch"):
    tj.networks.serve(MODEL, deployed, X[:0])
  four = tj.recall_policy(tj.synthetic_cascade(0, 4, 4, regime="random"), 0.5)
  with pytest.raises(ValueError, match="built for 4 stages but the network has 3 exits"):
    tj.networks.serve(MODEL, deployed.replace(policy=four), X)
  with pytest.raises(ValueError, match="discretiser: has edges for 2 stages"):
    tj.networks.serve(MODEL, deployed.replace(discretiser=tj.data.Discretiser(edges=jnp.zeros((2, 3)))), X)
  with pytest.raises(ValueError,
                     match="policy: has 4 states per stage but the discretiser produces 8"):
    tj.networks.serve(MODEL, deployed.replace(
        discretiser=tj.data.Discretiser(edges=_edges("max_softmax", 4), feature="agree_prev")), X)
  with pytest.raises(ValueError, match="label-dependent"):
    tj.networks.serve(MODEL, deployed.replace(score_name="zero_one"), X)
  no_err = tj.EarlyExitCNN((8, 8, 1), 10, channels=(4, 8, 8), error_head=False, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="without error heads"):
    tj.networks.serve(no_err, deployed.replace(score_name="error_prob"), X)
  with pytest.raises(ValueError, match="expected a DeployedPolicy"):
    tj.networks.serve(MODEL, deployed.policy, X)
  with pytest.raises(ValueError, match="strictly increasing"):
    tj.networks.serve(MODEL, deployed, X, buckets=(32, 8))
  with pytest.raises(ValueError, match="empty"):
    tj.networks.serve(MODEL, deployed, X, buckets=())
  with pytest.raises(ValueError, match="must be >= 1"):
    tj.networks.serve(MODEL, deployed, X, buckets=(0, 8))
  with pytest.raises(ValueError, match="y: expected shape"):
    serving_costs.served_wall_time(MODEL, deployed, X, Y[:3])


def test_served_stage_costs_are_per_request_seconds_of_each_stage():
  deployed = _deployed("recall")
  costs = serving_costs.served_stage_costs(MODEL, deployed, X[:40], buckets=BUCKETS, repeats=1)
  assert costs.shape == (N_STAGES,) and (costs >= 0).all() and costs.sum() > 0
  shares = serving_costs.cost_shares(costs)
  assert (shares > 0).all() and shares.sum() == pytest.approx(1.0)


def test_served_cost_model_recovers_per_batch_and_per_request_parts(monkeypatch):
  """The fit against a serving time known in closed form: stage ``k`` of a batch of ``b``
  takes ``a[k] + c[k] * b`` seconds (served_stage_costs returns it per request)."""
  a, c = np.array([2e-3, 1e-3, 0.0]), np.array([1e-5, 3e-5, 2e-5])
  monkeypatch.setattr(serving_costs, "served_stage_costs",
                      lambda model, deployed, x, **kw: (a + c * len(x)) / len(x))
  model = serving_costs.served_cost_model(MODEL, _deployed("recall"), X[:40], fraction=4)
  np.testing.assert_allclose(model.per_batch, a, atol=1e-12)
  np.testing.assert_allclose(model.per_request, c, rtol=1e-9)
  assert model.batch_size == 40
  # Every request at every stage: the whole batch's time; none past stage 0: stage 0 only.
  assert model.seconds([1, 1, 1]) == pytest.approx(float(np.sum(a + 40 * c)))
  assert model.seconds([1, 0, 0]) == pytest.approx(a[0] + 40 * c[0])
  # A quarter of the batch (10 requests) shares stage 1's per-batch part.
  np.testing.assert_allclose(model.per_request_costs([1, 0.25, 0.25]),
                             c + a / np.array([40, 10, 10]))
  # Unreached stage: priced as if one request paid its per-batch part.
  assert model.per_request_costs([1, 0, 0])[1] == pytest.approx(c[1] + a[1])


def test_served_cost_model_validates_its_inputs():
  model = serving_costs.ServedCostModel(per_batch=np.zeros(3), per_request=np.ones(3), batch_size=8)
  with pytest.raises(ValueError, match="reach"):
    model.seconds([1.0, 0.5])
  with pytest.raises(ValueError, match=r"reach: fractions"):
    model.per_request_costs([1.0, 1.5, 0.0])
  with pytest.raises(ValueError, match="fraction"):
    serving_costs.served_cost_model(MODEL, _deployed("recall"), X[:6], fraction=4)
  with pytest.raises(ValueError, match="fraction"):
    serving_costs.served_cost_model(MODEL, _deployed("recall"), X[:40], fraction=1)


def test_served_cost_model_on_a_real_server():
  model = serving_costs.served_cost_model(MODEL, _deployed("recall"), X[:40], buckets=BUCKETS,
                                    repeats=1)
  assert model.per_batch.shape == model.per_request.shape == (N_STAGES,)
  assert (model.per_batch >= 0).all() and (model.per_request >= 0).all()
  assert model.seconds(np.ones(N_STAGES)) > 0


def test_served_cost_shares_are_floored_positive_shares():
  """A stage that timing noise makes free (clamped to 0) keeps a small positive share."""
  np.testing.assert_allclose(serving_costs.cost_shares([1.0, 3.0]), [0.25, 0.75])
  shares = serving_costs.cost_shares([0.0, 2e-6, 3e-6], floor=0.01)
  assert shares.sum() == pytest.approx(1.0) and (shares > 0).all()
  assert shares[0] == pytest.approx(0.01 / 1.01) and shares[2] / shares[1] == pytest.approx(1.5)
  assert serving_costs.cost_shares([0.0, 1.0])[0] == pytest.approx(serving_costs.MIN_STAGE_SHARE, rel=1e-2)
  with pytest.raises(ValueError, match="costs: every stage measured as free"):
    serving_costs.cost_shares([0.0, 0.0])
  with pytest.raises(ValueError, match=r"costs\[1\] = -1.0 is negative"):
    serving_costs.cost_shares([1.0, -1.0])
  with pytest.raises(ValueError, match="costs"):
    serving_costs.cost_shares([1.0, np.nan])
  with pytest.raises(ValueError, match=r"floor: must be in \[0, 1/2\)"):
    serving_costs.cost_shares([1.0, 1.0], floor=0.5)


def test_served_stage_costs_compile_only_the_buckets_fixed_exits_reach():
  """Fixed-exit serving never compacts: every stage runs on the bucket of its chunk."""
  assert serving_costs.reached_buckets((8, 16, 24, 32), 40) == (8, 32)
  assert serving_costs.reached_buckets((8, 16, 24, 32), 64) == (32,)
  assert serving_costs.reached_buckets((8, 16, 24, 32), 5) == (8, 32)
  assert serving_costs.reached_buckets(serving.DEFAULT_BUCKETS, 359) == (384, 512)
  # The per-stage kernels a server with every bucket runs are the reduced server's.
  deployed = _deployed("recall")
  fixed = deployed.replace(policy=tj.core.FixedExitPolicy(exit_stage=N_STAGES - 1, num_stages=N_STAGES),
                           answers=None)
  buckets = (8, 16, 24, 32)
  few = programs.StageServer(MODEL, fixed, buckets=serving_costs.reached_buckets(buckets, 40))
  few(X[:40])
  before = serving.compile_count()
  programs.StageServer(MODEL, fixed, buckets=buckets)(X[:40])
  assert serving.compile_count() == before


def test_batch_groups_hold_as_many_chunks_as_fit_the_state_budget():
  budget = serving.GROUP_BYTES
  assert serving._group_chunks(budget // 512, 512) == 1  # one chunk of 512 fits exactly
  assert serving._group_chunks(budget // 1024, 512) == 2
  assert serving._group_chunks(budget // 4096, 512) == 8
  assert serving._group_chunks(1, 512) == 8  # never more than _IN_FLIGHT chunks
  assert serving._group_chunks(budget, 512) == 1  # at least one, even over budget
  # The request state of the test MLP: its widest block output plus the recall
  # bookkeeping (estimate, best stage and answer, last answer, top score and
  # answer, row: 7 x 4 bytes) and the policy's carry.
  deployed = _deployed("recall")
  h = jnp.zeros((1,) + tuple(MODEL.input_shape), jnp.float32)
  biggest = 0
  for i in range(N_STAGES):
    h = MODEL.stage(i, h)[0]
    biggest = max(biggest, h.size * h.dtype.itemsize)
  carry = deployed.policy.initial_carry(1)
  carry_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(carry))
  assert serving._state_bytes_per_request(MODEL, deployed) == biggest + 7 * 4 + carry_bytes
  # A policy read from a file holds NumPy arrays: sizing its groups must not index
  # them with traced states (it did: a TracerArrayConversionError).
  as_numpy = jax.tree_util.tree_map(np.asarray, deployed)
  assert serving._state_bytes_per_request(MODEL, as_numpy) == biggest + 7 * 4 + carry_bytes
