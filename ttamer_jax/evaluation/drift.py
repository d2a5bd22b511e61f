"""Drift between calibration traces and serving traffic, and when to re-fit (docs/drift.md).

A fitted policy is optimal for the state process it was fitted on. When serving
traffic drifts (harder inputs, a new client, a retrained backbone) the index
table keeps answering for the old process and the objective degrades silently.
This module compares, stage by stage, the distribution of the discretised state
the policy sees on serving traffic with its distribution on the calibration
traces:

  * per stage, a two-sample test of homogeneity on the ``2 x K`` table of state
    counts (calibration vs traffic): the G-test (likelihood ratio, default) or
    Pearson's chi-square, ``K - 1`` degrees of freedom after pooling sparse
    columns (expected count below ``min_expected`` in either row) into one;
  * Holm's step-down correction across the ``n`` stages (valid under any
    dependence between stages, which share requests), so that without drift
    ``P(refit) <= alpha``;
  * the re-fit decision: some stage rejects at ``alpha`` after the correction and
    its states moved by at least ``min_distance`` in total variation (``0`` by
    default; raise it to ignore shifts too small to matter on huge windows).

Which requests count at stage ``i``: serving observes stage ``i`` only for the
requests that reached it under the deployed policy. The reference counts are
taken the same way -- the policy replayed on the calibration traces
(``consulted_only=True``) -- so that without drift both samples have the same
distribution. (With shadow traffic that runs every stage, pass
``consulted_only=False`` on both sides.)

Online use on the serving side: :class:`DriftMonitor` keeps the states of the
last ``window`` observations of every stage (``ServeResult.states`` of
:class:`ttamer_jax.Server`, ``-1`` where a stage was not run) and tests them on
demand in ``O(n K)``.

What this does not see: drift in the loss *given* the state (the calibrated
``values``), which needs labels; with delayed labels, re-fit on fresh traces
and compare with :func:`ttamer_jax.split_robustness`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.data.discretise import DeployedPolicy, check_consistent
from ttamer_jax.data.traces import ExitTraces
from ttamer_jax.evaluation.metrics import replay_traces

TESTS = ("g", "chi2")
TEST_KWARGS = ("alpha", "test", "min_expected", "min_count", "min_distance")
# Counts must lie below this: float64 holds every integer up to 2**53 exactly.
MAX_COUNT = 2**53
# Largest array this module allocates: a [n, K] count table or a monitor's ring buffers.
MAX_BUFFER_BYTES = 1 << 30


# ------------------------------------------------------------------ counts
def state_counts(states: Any, num_states: int) -> np.ndarray:
  """``[n, K]`` int64 number of requests in each state at each stage.

  Args:
    states: ``[N, n]`` int states; ``-1`` marks a stage that was not observed.
    num_states: ``K``.
  """
  k = validation.check_positive_int("num_states", num_states)
  states = validation.as_numpy("states", states, ndim=2, kind="int").astype(np.int64)
  validation.check_int_range("states", states, -1, k)
  n = states.shape[1]
  if n * k * 8 > MAX_BUFFER_BYTES:
    raise ValueError(f"num_states = {k}: a [{n}, {k}] count table would take "
                     f"{n * k * 8 / 2**30:.1f} GiB, over the {MAX_BUFFER_BYTES / 2**30:.0f} GiB "
                     "limit of MAX_BUFFER_BYTES")
  counts = np.zeros((n, k), np.int64)
  for i in range(n):
    col = states[:, i]
    counts[i] = np.bincount(col[col >= 0], minlength=k)
  return counts


def reference_states(deployed: DeployedPolicy, traces: ExitTraces, *,
                     consulted_only: bool = True) -> np.ndarray:
  """``[N, n]`` int32 states the deployed policy sees on ``traces`` (``-1``: not consulted).

  With ``consulted_only`` the policy is replayed and stages after each request's
  stop are masked, as serving never runs them.

  Args:
    deployed: the :class:`DeployedPolicy`.
    traces: :class:`ExitTraces`, ``N`` requests, ``n`` stages.
    consulted_only: mask the stages the policy does not run.

  Returns:
    ``[N, n]`` int32 states (``-1``: not consulted).
  """
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  if not isinstance(consulted_only, (bool, np.bool_)):
    raise ValueError(f"consulted_only: must be True or False, got {consulted_only!r}")
  check_consistent(deployed, "deployed")
  if deployed.num_stages != traces.num_stages:
    raise ValueError(f"traces: have {traces.num_stages} stages, the policy {deployed.num_stages}")
  states = np.asarray(deployed.observations(traces)[0], np.int32)
  if consulted_only:
    stop = np.asarray(replay_traces(deployed, traces).stop_stage)
    states = np.where(np.arange(states.shape[1])[None, :] <= stop[:, None], states, -1)
  return states.astype(np.int32)


def reference_counts(deployed: DeployedPolicy, traces: ExitTraces, *,
                     consulted_only: bool = True) -> np.ndarray:
  """``[n, K]`` state counts of :func:`reference_states`."""
  return state_counts(reference_states(deployed, traces, consulted_only=consulted_only),
                      deployed.discretiser.num_states)


# ------------------------------------------------------------------ the test
@dataclasses.dataclass(frozen=True)
class DriftReport:
  """Per-stage two-sample tests of the state distribution, and the re-fit decision.

  Attributes:
    statistic: ``[n]`` G (or chi-square) statistic per stage (0 if not tested).
    dof: ``[n]`` int degrees of freedom after pooling sparse states (0: not tested).
    p_value: ``[n]`` p-value of each stage (1 if not tested).
    adjusted_p: ``[n]`` Holm-adjusted p-values (family-wise over the tested stages).
    distance: ``[n]`` total-variation distance between the two state distributions.
    drifted: ``[n]`` bool, ``adjusted_p <= alpha`` and ``distance >= min_distance``.
    refit: any stage drifted.
    num_reference: ``[n]`` calibration observations per stage.
    num_observed: ``[n]`` serving observations per stage.
    alpha: family-wise level of the decision.
    test: ``"g"`` or ``"chi2"``.
  """

  statistic: np.ndarray
  dof: np.ndarray
  p_value: np.ndarray
  adjusted_p: np.ndarray
  distance: np.ndarray
  drifted: np.ndarray
  refit: bool
  num_reference: np.ndarray
  num_observed: np.ndarray
  alpha: float
  test: str

  def as_dict(self) -> dict:
    """Plain Python values (for JSON and logs)."""
    return {f.name: (np.asarray(getattr(self, f.name)).tolist()
                     if isinstance(getattr(self, f.name), np.ndarray) else getattr(self, f.name))
            for f in dataclasses.fields(self)}

  def summary(self) -> str:
    """One line per stage and the decision, for logs."""
    lines = [f"drift ({self.test}-test, Holm, alpha = {self.alpha:g}): "
             + ("RE-FIT" if self.refit else "no re-fit")]
    for i in range(self.statistic.shape[0]):
      lines.append(f"  stage {i}: n_ref {int(self.num_reference[i])}, n_obs "
                   f"{int(self.num_observed[i])}, stat {self.statistic[i]:.3g} (dof "
                   f"{int(self.dof[i])}), p {self.p_value[i]:.3g}, Holm p "
                   f"{self.adjusted_p[i]:.3g}, TV {self.distance[i]:.3f}"
                   + ("  DRIFT" if self.drifted[i] else ""))
    return "\n".join(lines)


def _check_counts(name: str, counts: Any) -> np.ndarray:
  arr = validation.as_numpy(name, counts, ndim=2, kind="int")  # counts: whole numbers
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f"{name}: expected [n, K] counts with n, K >= 1, got shape {arr.shape}")
  validation.check_nonnegative(name, arr)
  validation.check_int_range(name, arr, 0, MAX_COUNT)
  return arr.astype(np.float64)


def _stage_test(ref: np.ndarray, obs: np.ndarray, test: str, min_expected: float):
  """``(statistic, dof)`` of one ``2 x K`` homogeneity test, sparse columns pooled."""
  n_ref, n_obs = ref.sum(), obs.sum()
  total = n_ref + n_obs
  keep = (ref + obs) > 0
  ref, obs = ref[keep], obs[keep]
  col = ref + obs
  sparse = np.minimum(col * n_ref, col * n_obs) / total < min_expected
  if sparse.any():
    ref = np.append(ref[~sparse], ref[sparse].sum())
    obs = np.append(obs[~sparse], obs[sparse].sum())
  dof = ref.size - 1
  if dof < 1:
    return 0.0, 0
  table = np.stack([ref, obs])
  expected = np.outer([n_ref, n_obs], table.sum(axis=0)) / total
  if test == "g":
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(table > 0, table * np.log(table / expected), 0.0)
    stat = 2.0 * float(terms.sum())
  else:
    stat = float(((table - expected) ** 2 / expected).sum())
  return max(stat, 0.0), int(dof)


def holm(p_values: Any) -> np.ndarray:
  """Holm's step-down adjusted p-values (``adjusted <= alpha`` rejects at family-wise level
  ``alpha`` under any dependence)."""
  p = validation.as_numpy("p_values", p_values, ndim=1).astype(np.float64)
  validation.check_finite("p_values", p)
  if p.size and (p.min() < 0 or p.max() > 1):
    bad = float(p.min() if p.min() < 0 else p.max())
    raise ValueError(f"p_values: must lie in [0, 1], got {bad!r}")
  m = p.size
  order = np.argsort(p, kind="stable")
  adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
  out = np.empty(m)
  out[order] = adj
  return out


def two_sample_test(reference: Any, observed: Any, *, alpha: float = 0.01, test: str = "g",
                    min_expected: float = 5.0, min_count: int = 50,
                    min_distance: float = 0.0) -> DriftReport:
  """Per-stage test that ``observed`` states come from the ``reference`` distribution.

  Args:
    reference: ``[n, K]`` calibration state counts (:func:`reference_counts`).
    observed: ``[n, K]`` serving state counts (:func:`state_counts`, or a
      :class:`DriftMonitor`'s window).
    alpha: family-wise level of the re-fit decision (Holm over the stages).
    test: ``"g"`` (likelihood-ratio G-test) or ``"chi2"`` (Pearson).
    min_expected: states whose expected count is below this in either sample are
      pooled into one column (the chi-square approximation needs ~5).
    min_count: stages with fewer observations in either sample are not tested
      (p = 1): too little evidence either way.
    min_distance: a stage counts as drifted only if its total-variation distance
      is at least this (0: significance alone decides).
  """
  from scipy import stats  # a dependency of jax

  ref = _check_counts("reference", reference)
  obs = _check_counts("observed", observed)
  validation.check_shape("observed", obs, ref.shape)
  alpha = validation.as_float_scalar("alpha", alpha)
  if not 0 < alpha < 1:
    raise ValueError(f"alpha = {alpha!r} must lie in (0, 1)")
  if test not in TESTS:
    raise ValueError(f"test: must be one of {TESTS}, got {test!r}")
  min_expected = validation.as_nonnegative_scalar("min_expected", min_expected)
  min_count = validation.check_positive_int("min_count", min_count)
  min_distance = validation.as_float_scalar("min_distance", min_distance)
  if not 0 <= min_distance <= 1:
    raise ValueError(f"min_distance = {min_distance!r} must lie in [0, 1]")
  n = ref.shape[0]
  stat, dof, p = np.zeros(n), np.zeros(n, np.int64), np.ones(n)
  n_ref, n_obs = ref.sum(axis=1), obs.sum(axis=1)
  dist = np.zeros(n)
  tested = []
  for i in range(n):
    if n_ref[i] < min_count or n_obs[i] < min_count:
      continue
    dist[i] = 0.5 * float(np.abs(ref[i] / n_ref[i] - obs[i] / n_obs[i]).sum())
    stat[i], dof[i] = _stage_test(ref[i], obs[i], test, min_expected)
    if dof[i] > 0:
      p[i] = float(stats.chi2.sf(stat[i], dof[i]))
      tested.append(i)
  adjusted = np.ones(n)
  if tested:
    adjusted[tested] = holm(p[tested])
  drifted = (adjusted <= alpha) & (dist >= min_distance) & (dof > 0)
  return DriftReport(statistic=stat, dof=dof, p_value=p, adjusted_p=adjusted, distance=dist,
                     drifted=drifted, refit=bool(drifted.any()), num_reference=n_ref.astype(np.int64),
                     num_observed=n_obs.astype(np.int64), alpha=alpha, test=test)


def drift_test(deployed: DeployedPolicy, calibration: ExitTraces, traffic: ExitTraces, *,
               consulted_only: bool = True, **kwargs) -> DriftReport:
  """Offline check: has ``traffic`` (recorded traces) drifted from ``calibration``?

  Both are discretised by ``deployed`` (and, with ``consulted_only``, masked to
  the stages the policy runs); ``kwargs`` go to :func:`two_sample_test`.

  Args:
    deployed: the :class:`DeployedPolicy` being served.
    calibration: the traces it was fitted on (``N`` requests, ``n`` stages).
    traffic: recorded serving traces (``M`` requests, ``n`` stages).
    consulted_only: count only the stages the policy runs.
    **kwargs: :func:`~ttamer_jax.evaluation.two_sample_test`'s options.

  Returns:
    A :class:`~ttamer_jax.evaluation.DriftReport` (per stage ``[n]`` statistics and
    p-values, the Holm decision).
  """
  ref = reference_counts(deployed, calibration, consulted_only=consulted_only)
  obs = reference_counts(deployed, traffic, consulted_only=consulted_only)
  return two_sample_test(ref, obs, **kwargs)


# ------------------------------------------------------------------ online
class DriftMonitor:
  """Sliding-window drift check for the serving side.

  Keeps, per stage, the states of the last ``window`` requests observed at that
  stage (a ring buffer and running counts: ``update`` is ``O(B n)``, ``check`` is
  ``O(n K)``) and tests them against the calibration counts.

      monitor = DriftMonitor.from_traces(deployed, calibration, window=2000)
      result = server(batch)                # ttamer_jax.Server
      monitor.update(result.states)         # [B, n], -1 where a stage was not run
      if monitor.check().refit: ...         # collect fresh traces and re-fit

  Args:
    reference: ``[n, K]`` calibration state counts (:func:`reference_counts`).
    window: observations kept per stage.
    **test_kwargs: ``alpha``, ``test``, ``min_expected``, ``min_count``,
      ``min_distance`` of :func:`two_sample_test`.
  """

  def __init__(self, reference: Any, *, window: int = 2000, **test_kwargs):
    self.reference = _check_counts("reference", reference)
    self.window = validation.check_positive_int("window", window)
    unknown = sorted(set(test_kwargs) - set(TEST_KWARGS))
    if unknown:
      raise ValueError(f"{unknown[0]}: not an option of the drift test (options: window, "
                       f"{', '.join(TEST_KWARGS)})")
    self.test_kwargs = dict(test_kwargs)
    two_sample_test(self.reference, np.zeros_like(self.reference), **self.test_kwargs)  # validate
    n, k = self.reference.shape
    if n * self.window * 4 > MAX_BUFFER_BYTES:
      raise ValueError(f"window = {self.window}: {n} ring buffers of that many int32 states would "
                       f"take {n * self.window * 4 / 2**30:.1f} GiB, over the "
                       f"{MAX_BUFFER_BYTES / 2**30:.0f} GiB limit of MAX_BUFFER_BYTES")
    self._buffer = np.full((n, self.window), -1, np.int32)
    self._pos = np.zeros(n, np.int64)
    self._counts = np.zeros((n, k), np.int64)

  @classmethod
  def from_traces(cls, deployed: DeployedPolicy, calibration: ExitTraces, *,
                  consulted_only: bool = True, **kwargs) -> "DriftMonitor":
    """A monitor whose reference is ``deployed`` replayed on its calibration traces."""
    return cls(reference_counts(deployed, calibration, consulted_only=consulted_only), **kwargs)

  @property
  def num_stages(self) -> int:
    return self.reference.shape[0]

  @property
  def num_states(self) -> int:
    return self.reference.shape[1]

  @property
  def counts(self) -> np.ndarray:
    """``[n, K]`` state counts in the current window."""
    return self._counts.copy()

  def observe(self, stage: int, states: Any) -> "DriftMonitor":
    """Adds ``[B]`` states observed at ``stage`` (``-1`` entries are skipped)."""
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not (
        0 <= stage < self.num_stages):
      raise ValueError(f"stage = {stage!r} must be an integer in 0..{self.num_stages - 1}")
    col = validation.as_numpy("states", states, ndim=1, kind="int").astype(np.int64)
    validation.check_int_range("states", col, -1, self.num_states)
    self._push(int(stage), col[col >= 0])
    return self

  def update(self, states: Any) -> "DriftMonitor":
    """Adds a batch ``[B, n]`` of per-stage states (``ServeResult.states``; ``-1``: not run)."""
    arr = validation.as_numpy("states", states, ndim=2, kind="int").astype(np.int64)
    if arr.shape[1] != self.num_stages:
      raise ValueError(f"states: have {arr.shape[1]} stages, the monitor {self.num_stages}")
    validation.check_int_range("states", arr, -1, self.num_states)
    for i in range(self.num_stages):
      col = arr[:, i]
      self._push(i, col[col >= 0])
    return self

  def _push(self, i: int, new: np.ndarray) -> None:
    w = self.window
    if new.size >= w:
      new = new[-w:]
    m = new.size
    if m == 0:
      return
    slots = (self._pos[i] + np.arange(m)) % w
    old = self._buffer[i, slots]
    np.subtract.at(self._counts[i], old[old >= 0], 1)
    np.add.at(self._counts[i], new, 1)
    self._buffer[i, slots] = new
    self._pos[i] = (self._pos[i] + m) % w

  def check(self) -> DriftReport:
    """Tests the current window against the reference (see :func:`two_sample_test`)."""
    return two_sample_test(self.reference, self._counts, **self.test_kwargs)

  def reset(self) -> None:
    """Forgets every observation (e.g. after re-fitting)."""
    self._buffer[:] = -1
    self._pos[:] = 0
    self._counts[:] = 0
