"""Fitting a cascade model to recorded exit traces (DESIGN.md section 5).

1. :func:`fit_discretiser`: per-stage bin edges of the exit score (quantile or
   uniform), optionally crossed with "prediction agrees with the previous exit".
2. :func:`fit_cascade`: calibrated loss per (stage, state) = smoothed mean true
   loss of the calibration samples in that state; ``init`` and ``trans`` =
   Dirichlet-smoothed counts, so states and transitions unseen in calibration
   still get valid, small probabilities.
3. :func:`fit_skip_line`: a skip-line :class:`~ttamer_jax.RoutingGraph` whose
   ``T_{i->j}`` are estimated directly from (stage i, stage j) state pairs instead
   of multiplied out, so they stay right when the chain is not Markov.

Smoothing (``smoothing = a``): a row with counts ``C[t]`` becomes
``(C[t] + a * prior[t]) / (sum C + a * sum prior)``; ``prior`` is 1 on every
possible state (``"uniform"``: Laplace for ``a = 1``) or ``K`` times the next
stage's empirical state distribution (``"marginal"``). With ``a = 0`` an unseen
row falls back to the prior. Losses are shrunk to the stage's mean loss with
``loss_smoothing`` pseudo-samples.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import counting, shapes, validation
from ttamer_jax.core.graph import RoutingGraph, skip_costs
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.policies import no_recall_policy, recall_policy
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.discretise import FEATURES, PRIMARY_SCORE, DeployedPolicy, Discretiser, trace_scores
from ttamer_jax.data.traces import ExitTraces

BINNINGS = ("quantile", "uniform")
PRIORS = ("uniform", "marginal")

# Largest float64 transition tables a fit may build (``pairs x K x K x 8`` bytes):
# beyond it a fit is refused up front with a ValueError, not a MemoryError
# half-way (4 GiB: K = 4096 with up to 33 stages).
MAX_FIT_TABLE_BYTES = 1 << 32

# What the ValueError of a fit called inside jit names instead (docs/jit.md): bins need
# sorting (quantiles), so they are fitted once, outside; counting is jit-able.
JIT_FIT = ("inside jit, fit the bins outside it (ttamer_jax.fit_discretiser), then call the "
           "Discretiser and ttamer_jax.fit_cascade_arrays inside (docs/jit.md)")
JIT_BINS = ("fit the bins once outside jit and call the Discretiser inside it "
            "(ttamer_jax.data.Discretiser(edges) also takes traced edges; docs/jit.md)")


# ------------------------------------------------------------------ discretiser
def column_quantiles(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """``np.quantile(x, levels, axis=0)`` (its default "linear" method, the same numbers)
  from one sort: ``[Q, ...]`` for ``x [N, ...]``.

  ``np.quantile`` partitions ``x`` anew for every call; a selection asks for the
  quantiles of one column at many bin counts and folds, and a sort of the column
  makes each ask a look-up.
  """
  s = np.sort(np.asarray(x, np.float64), axis=0)
  n = s.shape[0]
  virtual = (n - 1) * np.asarray(levels, np.float64)
  prev = np.floor(virtual)
  after = prev + 1
  prev[virtual >= n - 1], after[virtual >= n - 1] = -1, -1   # as numpy: the top is the max
  prev[virtual < 0], after[virtual < 0] = 0, 0
  prev, after = prev.astype(np.intp), after.astype(np.intp)
  gamma = (virtual - prev).reshape((-1,) + (1,) * (s.ndim - 1))
  a, b = s[prev], s[after]
  diff = b - a
  out = a + diff * gamma
  np.subtract(b, diff * (1 - gamma), out=out, where=np.broadcast_to(gamma >= 0.5, out.shape))
  return out


def fit_discretiser(scores: Any, num_states: int, *, binning: str = "quantile",
                    score_range: Any = None, feature: Any = None) -> Discretiser:
  """Per-stage bin edges of ``scores [N, n]``.

  Args:
    scores: ``[N, n]`` calibration scores.
    num_states: ``K`` states per stage: ``K`` bins, or ``K / 2`` bins with a
      ``feature`` (``K`` must then be even), as in :func:`fit_cascade`.
    binning: ``"quantile"`` (each bin holds ~``N/B`` calibration samples; ties can
      leave bins empty) or ``"uniform"`` (equal width on ``score_range``).
    score_range: ``(low, high)`` for uniform bins; default: each stage's min/max.
    feature: ``None``, ``"agree_prev"`` or ``"agree_best"`` (see :class:`Discretiser`).

  Returns:
    A :class:`Discretiser` with ``edges [n, B - 1]`` (float32) and ``num_states = K``.

  Runs on the host (quantiles sort); inside ``jit`` it raises ``ValueError`` naming
  the alternative: bins fitted outside, the :class:`Discretiser` called inside.
  """
  validation.refuse_traced("fit_discretiser", JIT_BINS, scores=scores, num_states=num_states,
                           score_range=score_range)
  k = validation.check_positive_int("num_states", num_states)
  if feature not in FEATURES:
    raise ValueError(f"feature: must be one of {FEATURES}, got {feature!r}")
  if feature is not None and k % 2:
    raise ValueError(f"num_states = {k} must be even with feature={feature!r} (K = 2 x bins)")
  b = k // 2 if feature is not None else k
  if binning not in BINNINGS:
    raise ValueError(f"binning: must be one of {BINNINGS}, got {binning!r}")
  scores = validation.as_numpy("scores", scores, ndim=2).astype(np.float64)
  validation.check_finite("scores", scores)
  validation.to_float("scores", scores, np.float32)  # the edges are stored in float32
  if scores.shape[0] < 1:
    raise ValueError("scores: no samples (N = 0)")
  if scores.shape[1] < 1:
    raise ValueError("scores: no stages (n = 0)")
  if scores.shape[1] * (b - 1) * 4 > MAX_FIT_TABLE_BYTES:  # float32 edges [n, B-1]
    raise ValueError(f"num_states = {k}: the bin edges of {scores.shape[1]} stages would exceed the "
                     f"{MAX_FIT_TABLE_BYTES / 2**30:.0f} GiB limit of "
                     "ttamer_jax.data.fitting.MAX_FIT_TABLE_BYTES")
  levels = np.arange(1, b) / b
  if binning == "quantile":
    edges = column_quantiles(scores, levels).T if b > 1 else np.zeros((scores.shape[1], 0))
  else:
    if score_range is None:
      low, high = scores.min(axis=0), scores.max(axis=0)
    else:
      rng = validation.as_numpy("score_range", score_range, ndim=1).astype(np.float64)
      validation.check_shape("score_range", rng, (2,))
      validation.check_finite("score_range", rng)
      validation.to_float("score_range", rng, np.float32)
      if not rng[0] < rng[1]:
        raise ValueError(f"score_range: low {rng[0]} must be < high {rng[1]}")
      low, high = np.full(scores.shape[1], rng[0]), np.full(scores.shape[1], rng[1])
    edges = low[:, None] + (high - low)[:, None] * levels[None, :]
  return Discretiser(edges=np.asarray(edges, np.float32), feature=feature)


# ------------------------------------------------------------------ smoothing
def _check_fit_args(smoothing, loss_smoothing, prior):
  for name, v in (("smoothing", smoothing), ("loss_smoothing", loss_smoothing)):
    validation.as_nonnegative_scalar(name, v)
  if prior not in PRIORS:
    raise ValueError(f"prior: must be one of {PRIORS}, got {prior!r}")


def check_table_bytes(k: int, num_pairs: int) -> None:
  """``ValueError`` before any work when ``num_pairs`` transition tables of ``K = k``
  states would exceed :data:`MAX_FIT_TABLE_BYTES`."""
  need = max(num_pairs, 1) * k * k * 8
  if need > MAX_FIT_TABLE_BYTES:
    raise ValueError(f"num_states = {k}: the fitted transition tables ({max(num_pairs, 1)} x {k} x "
                     f"{k} float64) would take {need / 2**30:.1f} GiB, over the "
                     f"{MAX_FIT_TABLE_BYTES / 2**30:.0f} GiB limit of "
                     "ttamer_jax.data.fitting.MAX_FIT_TABLE_BYTES; use fewer states")


def _discretise(traces: ExitTraces, num_states, binning, score, score_range, feature, discretiser,
                pairs=lambda n: n - 1):
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  scores = np.asarray(trace_scores(traces, score))
  if discretiser is None:
    if feature not in FEATURES:
      raise ValueError(f"feature: must be one of {FEATURES}, got {feature!r}")
    k = validation.check_positive_int("num_states", num_states)
    check_table_bytes(k, pairs(traces.num_stages))  # before binning K quantiles
    discretiser = fit_discretiser(scores, k, binning=binning, score_range=score_range,
                                  feature=feature)
  else:
    if not isinstance(discretiser, Discretiser):
      raise ValueError(f"discretiser: expected a Discretiser, got {type(discretiser).__name__}")
    if num_states is not None and num_states != discretiser.num_states:
      raise ValueError(f"num_states = {num_states} but the given discretiser has "
                       f"{discretiser.num_states} states")
  if discretiser.num_stages != traces.num_stages:
    raise ValueError(f"discretiser: has {discretiser.num_stages} stages but the traces have "
                     f"{traces.num_stages}")
  check_table_bytes(discretiser.num_states, pairs(traces.num_stages))
  states = discretiser.host_states(scores, traces.preds)
  return discretiser, states


def mean_stage_costs(traces: ExitTraces) -> np.ndarray:
  """``[n]`` mean cost of each stage (the per-stage costs themselves when given so)."""
  costs = np.asarray(traces.costs, np.float64)
  return costs if costs.ndim == 1 else costs.mean(axis=0)


def unit_free_costs(stage_costs: np.ndarray, full_cost: float | None = None
                    ) -> tuple[np.ndarray, float]:
  """``(costs / full_cost, full_cost)``: costs as shares of running every stage.

  ``lam`` then has no unit: the same traces in seconds or milliseconds give the
  same model and the same policy. ``full_cost`` defaults to ``stage_costs.sum()``;
  all-zero costs stay zero (``full_cost`` 0).
  """
  full = float(np.sum(stage_costs)) if full_cost is None else float(full_cost)
  return (stage_costs / full if full > 0 else np.zeros_like(stage_costs)), full


def _first_stage_prior(discretiser: Discretiser) -> np.ndarray:
  """States the first stage can be in: with an agreement feature only ``agree = 0``."""
  k = discretiser.num_states
  if discretiser.feature is not None:
    return (np.arange(k) % 2 == 0).astype(np.float64)
  return np.ones(k)


# Fewest requests a compiled fit is padded to: every calibration set up to this size
# shares one program per shape of the rest (the demo's 359, a few thousand), at the
# price of counting padding of weight 0, which costs well under a millisecond here.
MIN_REQUEST_BUCKET = 4096


def request_bucket(num: int) -> int:
  """Padded request count of the compiled fits: :data:`MIN_REQUEST_BUCKET`, then four
  sizes per doubling, so a new number of requests rarely compiles anew (padding has
  weight 0) and at most a quarter of the padded work is padding."""
  return shapes.bucket_size(num, per_octave=4, minimum=MIN_REQUEST_BUCKET)


def pad_requests(x: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
  """``x`` with its request axis padded to ``size`` by zeros (given weight 0 by the fits)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad)


@functools.partial(jax.jit, static_argnums=(7, 8))
def _fit_tables(states, losses, weights, possible, first_possible, smoothing, loss_smoothing,
                num_states, marginal):
  return counting.fitted_tables(states, losses, weights, possible, first_possible, smoothing,
                                loss_smoothing, marginal, num_states)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _pair_tables_compiled(pairs, weights, smoothing, num_states, marginal):
  ones = jnp.ones(num_states, weights.dtype)
  zeros = jnp.zeros(pairs.shape[1:], weights.dtype)

  def one(two_stages):
    _, init, trans, _ = counting.fitted_tables(two_stages, zeros, weights, ones, ones, smoothing,
                                               0.0, marginal, num_states)
    return init, trans[0]

  return jax.vmap(one)(pairs)


def _pair_tables(states: np.ndarray, pairs: list, k: int, smoothing: float, prior: str):
  """``(init [P, K], trans [P, K, K])`` of each ``(i, j)`` of ``pairs`` fitted as a
  two-stage line on states ``i`` then ``j`` (one compiled program for all pairs)."""
  num = states.shape[0]
  size = request_bucket(num)
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  cols = np.stack([states[:, [i, j]] for i, j in pairs]).astype(np.int32)
  cols = pad_requests(cols, size, axis=1)
  weights = pad_requests(np.ones(num, dtype), size)
  init, trans = _pair_tables_compiled(cols, weights, np.asarray(smoothing, dtype), k,
                                      prior == "marginal")
  return np.asarray(init), np.asarray(trans)


def _fit_states(states: np.ndarray, losses: np.ndarray, stage_costs: np.ndarray, k: int,
                first_possible: np.ndarray, smoothing: float, loss_smoothing: float, prior: str
                ) -> tuple[Cascade, np.ndarray, float]:
  """``(cascade, counts [n, K], full cost)`` of validated host states: one compiled
  counting program (:func:`ttamer_jax.core.counting.fitted_tables`) per ``(n, K)`` and
  request bucket."""
  num = states.shape[0]
  size = request_bucket(num)
  pad = lambda x: pad_requests(x, size)
  dtype = jax.dtypes.canonicalize_dtype(np.float64)
  weights = pad(np.ones(num, dtype))
  values, init, trans, counts = _fit_tables(
      pad(states.astype(np.int32)), pad(np.asarray(losses, dtype)), weights, np.ones(k, dtype),
      np.asarray(first_possible, dtype), np.asarray(smoothing, dtype),
      np.asarray(loss_smoothing, dtype), k, prior == "marginal")
  costs, full = unit_free_costs(stage_costs)
  cascade = Cascade(values=values, init=init, trans=trans, costs=costs)
  return cascade, np.rint(np.asarray(counts, np.float64)), full


# ------------------------------------------------------------------ line cascade
@pytree_dataclass(static=("score_name",))
class FittedCascade:
  """A cascade fitted to traces, with the discretiser that serving reuses.

  Attributes:
    cascade: the fitted :class:`~ttamer_jax.Cascade` (``values`` = calibrated
      losses, smoothed ``init``/``trans``; ``costs`` = mean stage costs as shares of
      ``cost_scale``, so that ``lam`` is unit-free).
    discretiser: the :class:`Discretiser` that produced the states.
    counts: ``[n, K]`` number of calibration samples per (stage, state).
    cost_scale: ``[]`` mean cost of running every stage in the traces' units
      (``cascade.costs * cost_scale`` are the raw mean stage costs).
    answers: ``None``, or the :class:`~ttamer_jax.data.AnswerModel` whose virtual
      stages the cascade models (posterior-answer stages).
    score_name: static name of the score signal fitted on (``"scores"``: the
      traces' primary scores).
  """

  cascade: Cascade
  discretiser: Discretiser
  counts: chex.Array
  cost_scale: chex.Array = 1.0
  answers: Any = None
  score_name: str = PRIMARY_SCORE

  def deploy(self, policy) -> DeployedPolicy:
    """Wraps a line policy over this model's states for serving / replay."""
    return DeployedPolicy(policy=policy, discretiser=self.discretiser, score_name=self.score_name,
                          answers=self.answers)

  def recall_policy(self, lam) -> DeployedPolicy:
    """The recall-optimal policy of the fitted model at ``lam``, ready to deploy."""
    return self.deploy(recall_policy(self.cascade, lam))

  def no_recall_policy(self, lam) -> DeployedPolicy:
    """The no-recall optimum of the fitted model at ``lam`` (a baseline)."""
    return self.deploy(no_recall_policy(self.cascade, lam))


def fit_cascade(traces: ExitTraces, num_states: int | None = None, *, binning: str = "quantile",
                smoothing: float = 1.0, loss_smoothing: float = 1.0, prior: str = "uniform",
                feature: Any = None, score: str | None = None, score_range: Any = None,
                discretiser: Discretiser | None = None) -> FittedCascade:
  """Fits a line :class:`~ttamer_jax.Cascade` to exit traces.

  Args:
    traces: calibration :class:`~ttamer_jax.ExitTraces`.
    num_states: ``K`` states per stage (with ``feature="agree_prev"``, ``K/2`` score
      bins times agree / disagree). Omit when ``discretiser`` is given.
    binning: ``"quantile"`` or ``"uniform"`` score bins.
    smoothing: Dirichlet pseudo-count per possible cell of ``init``/``trans`` rows
      (1: Laplace).
    loss_smoothing: pseudo-samples at the stage's mean loss added to each state's
      calibrated loss.
    prior: ``"uniform"`` or ``"marginal"`` Dirichlet prior (module docstring).
    feature: ``None``, ``"agree_prev"`` or ``"agree_best"``.
    score: name of the score signal to discretise (default: primary ``scores``).
    score_range: ``(low, high)`` for uniform bins.
    discretiser: reuse these bins instead of fitting new ones (e.g. re-fitting the
      transitions on another split).

  Returns:
    :class:`FittedCascade`; its costs are shares of the full cost (unit-free ``lam``).

  Runs on the host; inside ``jit`` use :func:`ttamer_jax.fit_cascade_arrays` on the
  states of a :class:`Discretiser` fitted outside (docs/jit.md).
  """
  validation.refuse_traced("fit_cascade", JIT_FIT, traces=traces, num_states=num_states,
                           smoothing=smoothing, loss_smoothing=loss_smoothing,
                           score_range=score_range, discretiser=discretiser)
  _check_fit_args(smoothing, loss_smoothing, prior)
  disc, states = _discretise(traces, num_states, binning, score, score_range, feature, discretiser)
  cascade, counts, full = _fit_states(states, np.asarray(traces.losses), mean_stage_costs(traces),
                                      disc.num_states, _first_stage_prior(disc), smoothing,
                                      loss_smoothing, prior)
  return FittedCascade(cascade=cascade, discretiser=disc, counts=counts, cost_scale=np.asarray(full),
                       score_name=PRIMARY_SCORE if score is None else score)


STATE_SIGNAL = "state"


def fit_cascade_from_states(states: Any, losses: Any, costs: Any, num_states: int | None = None,
                            *, smoothing: float = 1.0, loss_smoothing: float = 1.0,
                            prior: str = "uniform") -> FittedCascade:
  """Fits a cascade to traces whose discrete states are already known.

  For stages that emit a bucket id (or a test that samples from a known chain):
  no scores to bin. The result deploys with :meth:`Discretiser.identity`, reading
  the signal ``"state"`` of the traces it is replayed on (``ExitTraces(...,
  signals={"state": states})``; :func:`traces_with_states` builds such traces).

  Args:
    states: ``[N, n]`` int states in ``0..K-1``.
    losses: ``[N, n]`` true losses (>= 0).
    costs: ``[n]`` or ``[N, n]`` costs (>= 0).
    num_states: ``K`` (default: the largest state + 1).
    smoothing, loss_smoothing, prior: as :func:`fit_cascade`.

  Runs on the host; :func:`ttamer_jax.fit_cascade_arrays` gives the same cascade
  inside ``jit`` / ``vmap`` / ``grad``.
  """
  validation.refuse_traced(
      "fit_cascade_from_states", "inside jit, ttamer_jax.fit_cascade_arrays fits the same "
      "cascade (docs/jit.md)", states=states, losses=losses, costs=costs, num_states=num_states,
      smoothing=smoothing, loss_smoothing=loss_smoothing)
  traces, k = _state_traces(states, losses, costs, num_states)
  return fit_cascade(traces, discretiser=Discretiser.identity(traces.num_stages, k),
                     score=STATE_SIGNAL, smoothing=smoothing, loss_smoothing=loss_smoothing,
                     prior=prior)


def traces_with_states(states: Any, losses: Any, costs: Any, num_states: int | None = None,
                       preds: Any = None) -> ExitTraces:
  """:class:`ExitTraces` whose signal ``"state"`` (and primary scores) are known states
  ``[N, n]`` -- what a policy from :func:`fit_cascade_from_states` replays on."""
  validation.refuse_traced("traces_with_states", "inside jit, replay a policy on the states "
                           "with ttamer_jax.replay (docs/jit.md)", states=states, losses=losses,
                           costs=costs, num_states=num_states, preds=preds)
  return _state_traces(states, losses, costs, num_states, preds)[0]


def _state_traces(states, losses, costs, num_states, preds=None) -> tuple[ExitTraces, int]:
  states = validation.as_numpy("states", states, ndim=2, kind="int")
  if states.shape[0] < 1 or states.shape[1] < 1:
    raise ValueError(f"states: expected [N, n] with N, n >= 1, got shape {states.shape}")
  if num_states is None:
    validation.check_int_range("states", states, 0, validation.INT32_MAX)
    k = int(states.max()) + 1
  else:
    k = validation.check_positive_int("num_states", num_states)
    validation.check_int_range("states", states, 0, k)
  ids = states.astype(np.float64)
  traces = ExitTraces(scores=ids, preds=np.zeros(states.shape, np.int32) if preds is None else preds,
                      losses=losses, costs=costs, signals={STATE_SIGNAL: ids})
  return traces, k


# ------------------------------------------------------------------ skip line
@pytree_dataclass(static=("score_name",))
class FittedGraph:
  """A skip-line routing graph fitted to traces.

  Attributes:
    graph: :class:`~ttamer_jax.RoutingGraph`; node ``i`` is stage ``i``.
    discretiser: the :class:`Discretiser` that produced the states.
    counts: ``[n, K]`` calibration samples per (stage, state).
    cost_scale: ``[]`` cost of consulting every stage in the traces' units; the
      graph's edge and entry costs are shares of it (unit-free ``lam``).
    score_name: static name of the score signal fitted on.
  """

  graph: RoutingGraph
  discretiser: Discretiser
  counts: chex.Array
  cost_scale: chex.Array = 1.0
  score_name: str = PRIMARY_SCORE


def fit_skip_line(traces: ExitTraces, num_states: int | None = None, *, binning: str = "quantile",
                  smoothing: float = 1.0, loss_smoothing: float = 1.0, prior: str = "uniform",
                  score: str | None = None, score_range: Any = None,
                  discretiser: Discretiser | None = None, block_costs: Any = None,
                  head_costs: Any = None, skip_first: bool = False) -> FittedGraph:
  """Fits a skip-line graph whose ``T_{i->j}`` come straight from (stage i, stage j) pairs.

  Costs follow :func:`~ttamer_jax.skip_line`: ``c(i, j) = block_costs[i+1..j].sum() +
  head_costs[j]``; by default the traces' (mean) stage costs are the block costs
  and heads are free. ``skip_first`` lets the root enter any stage, each entry with
  that stage's smoothed empirical state distribution. Agreement features are not
  defined when exits are skipped, so they are rejected here. Runs on the host (no
  ``jit``-able skip-line fit; docs/jit.md).
  """
  validation.refuse_traced(
      "fit_skip_line", "there is no jit-able skip-line fit; inside jit, fit a line with "
      "ttamer_jax.fit_cascade_arrays on the states of a Discretiser fitted outside (docs/jit.md)",
      traces=traces, num_states=num_states, smoothing=smoothing, loss_smoothing=loss_smoothing,
      score_range=score_range, discretiser=discretiser, block_costs=block_costs,
      head_costs=head_costs)
  _check_fit_args(smoothing, loss_smoothing, prior)
  if discretiser is not None and not isinstance(discretiser, Discretiser):
    raise ValueError(f"discretiser: expected a Discretiser, got {type(discretiser).__name__}")
  if discretiser is not None and discretiser.feature is not None:
    raise ValueError(f"discretiser: feature {discretiser.feature!r} is undefined on a skip-line "
                     "(the exit it compares with may not have run); use feature=None")
  disc, states = _discretise(traces, num_states, binning, score, score_range, None, discretiser,
                             pairs=lambda n: n * (n - 1) // 2)
  k, n = disc.num_states, traces.num_stages
  stage_costs = mean_stage_costs(traces)
  block, head = skip_costs(block_costs, head_costs, np.asarray(stage_costs, np.float64))
  _, full = unit_free_costs(block + head)   # consulting every stage in turn
  block, head = unit_free_costs(block, full)[0], unit_free_costs(head, full)[0]
  cum = np.concatenate([[0.0], np.cumsum(block)])
  # The line fit's values, then every (i, j) pair counted as a two-stage line: its
  # transition is T_{i->j}, and a (j, j) pair's initial distribution is entry j's.
  line, counts, _ = _fit_states(states, np.asarray(traces.losses), stage_costs, k, np.ones(k),
                                smoothing, loss_smoothing, prior)
  values = line.values
  src = [i for i in range(n) for j in range(i + 1, n)]
  dst = [j for i in range(n) for j in range(i + 1, n)]
  edge_costs = [cum[j + 1] - cum[i + 1] + head[j] for i, j in zip(src, dst)]
  entries = list(range(n)) if skip_first else [0]
  pair_init, pair_trans = _pair_tables(states, list(zip(src, dst)) + [(j, j) for j in entries], k,
                                       smoothing, prior)
  edge_trans, entry_init = pair_trans[:len(src)], pair_init[len(src):]
  graph = RoutingGraph(
      values=values, edge_trans=np.asarray(edge_trans).reshape(-1, k, k),
      edge_costs=np.asarray(edge_costs), entry_init=np.asarray(entry_init),
      entry_costs=np.asarray([cum[j + 1] + head[j] for j in entries]),
      edge_src=tuple(src), edge_dst=tuple(dst), entry_nodes=tuple(entries))
  return FittedGraph(graph=graph, discretiser=disc, counts=counts, cost_scale=np.asarray(full),
                     score_name=PRIMARY_SCORE if score is None else score)
