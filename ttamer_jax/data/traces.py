"""Exit traces: a calibration set run through every stage (DESIGN.md section 5).

Users record, per request and stage, a score (any float signal: max-softmax,
entropy, learned error estimate), the prediction and its true loss, plus the cost
of each stage. Everything downstream (fitting, baselines, replay, frontiers) reads
this one container.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import default_float
from ttamer_jax.core.struct import pytree_dataclass
from ttamer_jax.data.archive import check_format_version, read_npz, write_npz_atomic


def _validated_traces(scores, preds, losses, costs, signals, labels):
  scores = validation.as_numpy("scores", scores, ndim=2)
  num, n = scores.shape
  if num < 1:
    raise ValueError(f"scores: no samples (N = 0, shape {scores.shape})")
  if n < 1:
    raise ValueError(f"scores: no stages (n = 0, shape {scores.shape})")
  validation.check_finite("scores", scores)
  preds = validation.as_numpy("preds", preds, ndim=2, kind="int")
  validation.check_shape("preds", preds, (num, n))
  losses = validation.as_numpy("losses", losses, ndim=2)
  validation.check_shape("losses", losses, (num, n))
  validation.check_nonnegative("losses", losses)
  costs = validation.as_numpy("costs", costs)
  if costs.shape not in ((n,), (num, n)):
    raise ValueError(f"costs: expected shape ({n},) or ({num}, {n}), got {costs.shape}")
  validation.check_nonnegative("costs", costs)
  dtype = default_float()
  checked = {}
  if signals is not None and not isinstance(signals, Mapping):
    raise ValueError(f"signals: expected a mapping {{name: [N, n] array}}, got {type(signals).__name__}")
  for name, sig in dict(signals or {}).items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"signals: keys must be non-empty strings, got {name!r}")
    sig = validation.as_numpy(f"signals[{name!r}]", sig, ndim=2)
    validation.check_shape(f"signals[{name!r}]", sig, (num, n))
    validation.check_finite(f"signals[{name!r}]", sig)
    checked[name] = validation.to_float(f"signals[{name!r}]", sig, dtype)
  validation.check_int32("preds", preds)
  if labels is not None:
    labels = validation.as_numpy("labels", labels, ndim=1, kind="int")
    validation.check_shape("labels", labels, (num,))
    validation.check_int32("labels", labels)
    labels = labels.astype(np.int32)
  as_float = lambda name, a: validation.to_float(name, a, dtype)
  stored_losses, stored_costs = as_float("losses", losses), as_float("costs", costs)
  _check_magnitudes(losses, costs, num, dtype)  # after: an entry that overflows is named
  return (as_float("scores", scores), preds.astype(np.int32), stored_losses, stored_costs,
          checked, labels)


def _check_magnitudes(losses: np.ndarray, costs: np.ndarray, num: int, dtype) -> None:
  """Losses and costs whose sums stay finite and whose costs keep their ratios in ``dtype``.

  The fits and replays sum losses and costs over requests (weighted by fold and
  bootstrap weights that total at most ``N``) and costs over stages, in ``dtype``:
  ``N x`` the largest per-request sum bounds every such sum. Costs count only through
  their ratios, so a subnormal cost (all costs 1e-45) would be flushed to 0 and read
  as "free"; rescaled costs give the same policy.
  """
  rescale = "rescale them: only the ratios of costs matter"
  validation.check_normal("costs", costs, dtype, "subnormal; " + rescale)
  per_request = np.asarray(costs, np.float64).reshape(-1, costs.shape[-1]).sum(axis=1).max()
  validation.check_sum_fits("costs", num * float(per_request),
                            f"{num} requests x the largest per-request sum of costs", dtype, rescale)
  per_request = np.asarray(losses, np.float64).sum(axis=1).max()
  validation.check_sum_fits("losses", num * float(per_request),
                            f"{num} requests x the largest per-request sum of losses", dtype,
                            "losses this large are no error rates or cross-entropies")


def _traced_array(name: str, x: Any, ndim: int, kinds: str, what: str):
  """``x`` as a ``jnp`` array after the checks a tracer allows: rank and dtype kind."""
  if validation.is_concrete(x):  # a concrete field beside traced ones
    x = validation.as_numpy(name, x)
  if x.dtype.kind not in kinds:
    raise ValueError(f"{name}: must be {what}, got dtype {x.dtype}")
  if np.ndim(x) != ndim:
    raise ValueError(f"{name}: expected {ndim} dimensions, got shape {np.shape(x)}")
  return jnp.asarray(x)


def _traced_traces(scores, preds, losses, costs, signals, labels):
  """What can be checked when a field is traced (built inside ``jit``/``vmap``): shapes
  and dtype kinds, not values; fields cast as :func:`_validated_traces` casts them."""
  dtype = default_float()
  real = lambda name, x, ndim=2: _traced_array(name, x, ndim, "biuf", "a real number array")
  whole = lambda name, x, ndim: _traced_array(name, x, ndim, "biu", "an integer array")
  scores = real("scores", scores)
  num, n = scores.shape
  if num < 1 or n < 1:
    raise ValueError(f"scores: expected N, n >= 1, got shape {scores.shape}")
  preds = whole("preds", preds, 2)
  validation.check_shape("preds", preds, (num, n))
  losses = real("losses", losses)
  validation.check_shape("losses", losses, (num, n))
  costs = real("costs", costs, np.ndim(costs))
  if costs.shape not in ((n,), (num, n)):
    raise ValueError(f"costs: expected shape ({n},) or ({num}, {n}), got {costs.shape}")
  if signals is not None and not isinstance(signals, Mapping):
    raise ValueError(f"signals: expected a mapping {{name: [N, n] array}}, got {type(signals).__name__}")
  checked = {}
  for name, sig in dict(signals or {}).items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"signals: keys must be non-empty strings, got {name!r}")
    sig = real(f"signals[{name!r}]", sig)
    validation.check_shape(f"signals[{name!r}]", sig, (num, n))
    checked[name] = sig.astype(dtype)
  if labels is not None:
    labels = whole("labels", labels, 1)
    validation.check_shape("labels", labels, (num,))
    labels = labels.astype(jnp.int32)
  return (scores.astype(dtype), preds.astype(jnp.int32), losses.astype(dtype), costs.astype(dtype),
          checked, labels)


@pytree_dataclass
class ExitTraces:
  """Per-sample, per-stage records of ``N`` requests through ``n`` stages.

  Constructing validates every field once (``ValueError`` naming the field, the
  index and the rule) and stores host NumPy arrays: floats in the session's
  default dtype (float32, or float64 under ``jax_enable_x64``), ints as int32.
  Code that receives an ``ExitTraces`` trusts it. Built from traced arrays (inside
  ``jit``/``vmap``), only shapes and dtype kinds can be checked; the fields are then
  ``jnp`` arrays cast the same way.

  Attributes:
    scores: ``[N, n]`` float primary score of each exit (the signal that fitting
      discretises into states and that threshold heuristics compare).
    preds: ``[N, n]`` int32 prediction of each exit.
    losses: ``[N, n]`` float true loss of answering with each exit (0/1 error or
      cross-entropy; >= 0).
    costs: ``[n]`` or ``[N, n]`` float cost of consulting each stage (measured
      latency, FLOPs, dollars; >= 0).
    signals: ``{name: [N, n]}`` further named float signals (e.g. ``"max_softmax"``,
      ``"entropy"``, ``"error_prob"``); :meth:`with_score` promotes one to ``scores``.
    labels: ``[N]`` int32 true labels, or ``None``.
  """

  scores: chex.Array
  preds: chex.Array
  losses: chex.Array
  costs: chex.Array
  signals: Mapping[str, chex.Array] = None
  labels: Any = None

  def __post_init__(self):
    signals = self.signals if isinstance(self.signals, Mapping) else {}  # else refused below
    leaves = [self.scores, self.preds, self.losses, self.costs, *dict(signals).values()]
    if self.labels is not None:
      leaves.append(self.labels)
    check = (_validated_traces if all(validation.is_concrete(x) for x in leaves)
             else _traced_traces)
    arrays = check(self.scores, self.preds, self.losses, self.costs, self.signals, self.labels)
    for name, arr in zip(("scores", "preds", "losses", "costs", "signals", "labels"), arrays):
      object.__setattr__(self, name, arr)

  @property
  def num_samples(self) -> int:
    return self.scores.shape[0]

  @property
  def num_stages(self) -> int:
    return self.scores.shape[1]

  def cost_matrix(self) -> chex.Array:
    """``[N, n]`` per-sample costs (broadcast when costs are per stage)."""
    return np.broadcast_to(self.costs, np.shape(self.scores))

  def full_cost(self) -> float:
    """Mean cost of consulting every stage: the unit of normalised costs (``cost_norm``
    and ``J = lam * error + (1 - lam) * cost / full_cost``)."""
    return float(np.asarray(self.cost_matrix(), np.float64).sum(axis=1).mean())

  def with_score(self, name: str) -> "ExitTraces":
    """A copy whose ``scores`` are the named signal (the old scores stay in ``signals``)."""
    if not isinstance(name, str) or name not in self.signals:
      raise ValueError(f"signals: no signal named {name!r} (have {sorted(self.signals)})")
    return self.replace(scores=self.signals[name])

  def subset(self, index: Any) -> "ExitTraces":
    """The samples selected by ``index`` (int array or boolean mask over ``N``)."""
    index = np.asarray(index)
    if index.dtype == bool:
      if index.shape != (self.num_samples,):
        raise ValueError(f"index: boolean mask must have shape ({self.num_samples},), got {index.shape}")
      index = np.flatnonzero(index)
    index = validation.as_numpy("index", index, ndim=1, kind="int").astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= self.num_samples):
      bad = int(index[(index < 0) | (index >= self.num_samples)][0])
      raise ValueError(f"index: sample {bad} outside 0..{self.num_samples - 1}")
    if index.size == 0:
      raise ValueError("index: selects no samples")
    costs = self.costs if self.costs.ndim == 1 else self.costs[index]
    return ExitTraces(scores=self.scores[index], preds=self.preds[index], losses=self.losses[index],
                      costs=costs, signals={k: v[index] for k, v in self.signals.items()},
                      labels=None if self.labels is None else self.labels[index])


def split_traces(key: chex.PRNGKey, traces: ExitTraces, fraction: float = 0.5
                 ) -> tuple[ExitTraces, ExitTraces]:
  """A random ``(first, second)`` split; ``first`` holds ``round(fraction * N)`` samples."""
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  fraction = validation.as_float_scalar("fraction", fraction)
  if not np.isfinite(fraction):
    raise ValueError(f"fraction = {fraction} must be finite")
  num = traces.num_samples
  size = int(round(fraction * num))
  if not 0 < size < num:
    raise ValueError(f"fraction = {fraction} leaves an empty split of N = {num} samples")
  perm = np.asarray(jax.random.permutation(key, num))
  return traces.subset(np.sort(perm[:size])), traces.subset(np.sort(perm[size:]))


# ------------------------------------------------------------------ .npz files
TRACES_FORMAT_VERSION = 1
_TRACES_KIND = "ttamer_jax.ExitTraces"


def save_traces(path: str | os.PathLike, traces: ExitTraces) -> None:
  """Saves ``traces`` to ``path`` (``.npz``, format version ``TRACES_FORMAT_VERSION``).

  Fields: ``format_version``, ``kind``, ``scores``, ``preds``, ``losses``, ``costs``,
  ``signal_names [S]`` with ``signal_0 .. signal_{S-1}``, optional ``labels``, and
  per-field checksums. Written atomically; loaded with ``allow_pickle=False``.

  Args:
    path: destination ``.npz`` file.
    traces: the :class:`ExitTraces` (``N`` requests, ``n`` stages).

  Returns:
    ``None``.
  """
  validation.refuse_traced("save_traces", "write files outside jit (or from "
                           "jax.debug.callback)", traces=traces)
  if not isinstance(traces, ExitTraces):
    raise ValueError(f"traces: expected ExitTraces, got {type(traces).__name__}")
  names = sorted(traces.signals)
  arrays = dict(format_version=np.asarray(TRACES_FORMAT_VERSION, np.int64),
                kind=np.asarray(_TRACES_KIND), scores=np.asarray(traces.scores),
                preds=np.asarray(traces.preds), losses=np.asarray(traces.losses),
                costs=np.asarray(traces.costs), signal_names=np.asarray(names, dtype=str).reshape(-1))
  for i, name in enumerate(names):
    arrays[f"signal_{i}"] = np.asarray(traces.signals[name])
  if traces.labels is not None:
    arrays["labels"] = np.asarray(traces.labels)
  write_npz_atomic(path, arrays)


def load_traces(path: str | os.PathLike, *, max_bytes: int | None = None) -> ExitTraces:
  """Loads traces written by :func:`save_traces`; ``ValueError`` names what is wrong.

  Files over ``max_bytes`` (default :data:`ttamer_jax.data.files.MAX_FILE_BYTES`) are
  refused before they are read.

  Args:
    path: a file written by :func:`save_traces`.
    max_bytes: refuse larger files.

  Returns:
    :class:`ExitTraces` (``scores``, ``preds``, ``losses`` ``[N, n]``, ``costs``
    ``[n]`` or ``[N, n]``, ``signals``, optional ``labels [N]``).
  """
  path = os.fspath(path)
  fields = read_npz(path, "traces", max_bytes=max_bytes)
  check_format_version(path, fields, TRACES_FORMAT_VERSION, _TRACES_KIND, "traces")
  for name in ("scores", "preds", "losses", "costs", "signal_names"):
    if name not in fields:
      raise ValueError(f"{path}: field {name!r} is missing")
  for name, arr in fields.items():  # save_traces writes real numbers and integers only
    kinds = "iu" if name in ("preds", "labels", "format_version") else "fiu"
    if name not in ("kind", "signal_names") and arr.dtype.kind not in kinds:
      raise ValueError(f"{path}: field {name!r} has dtype {arr.dtype} (expected "
                       f"{'an integer' if kinds == 'iu' else 'a real number'} type)")
  names = fields["signal_names"]
  if names.ndim != 1 or (names.size and names.dtype.kind != "U"):
    raise ValueError(f"{path}: field 'signal_names' must be a 1-d array of strings")
  expected = {"format_version", "kind", "scores", "preds", "losses", "costs", "signal_names",
              "labels"} | {f"signal_{i}" for i in range(names.size)}
  extra = sorted(set(fields) - expected)
  if extra:
    raise ValueError(f"{path}: unexpected field {extra[0]!r}")
  if len(set(names.tolist())) != names.size:
    dup = next(str(x) for i, x in enumerate(names.tolist()) if x in names.tolist()[:i])
    raise ValueError(f"{path}: field 'signal_names' names signal {dup!r} twice")
  signals = {}
  for i, name in enumerate(names):
    if f"signal_{i}" not in fields:
      raise ValueError(f"{path}: field 'signal_{i}' (signal {str(name)!r}) is missing")
    signals[str(name)] = fields[f"signal_{i}"]
  try:
    return ExitTraces(scores=fields["scores"], preds=fields["preds"], losses=fields["losses"],
                      costs=fields["costs"], signals=signals, labels=fields.get("labels"))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


