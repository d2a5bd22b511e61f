"""Exit traces: a calibration set run through every stage (DESIGN.md section 5).

Users record, per request and stage, a score (any float signal: max-softmax,
entropy, learned error estimate), the prediction and its true loss, plus the cost
of each stage. Everything downstream (fitting, baselines, replay, frontiers) reads
this one container.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Mapping

import chex
import jax.numpy as jnp
import numpy as np

from ttamer_jax._io import atomic_path, check_expanded_size, check_file_size, write_npz
from ttamer_jax import validation
from ttamer_jax._struct import pytree_dataclass


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
  checked = {}
  if signals is not None and not isinstance(signals, Mapping):
    raise ValueError(f"signals: expected a mapping {{name: [N, n] array}}, got {type(signals).__name__}")
  for name, sig in dict(signals or {}).items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"signals: keys must be non-empty strings, got {name!r}")
    sig = validation.as_numpy(f"signals[{name!r}]", sig, ndim=2)
    validation.check_shape(f"signals[{name!r}]", sig, (num, n))
    validation.check_finite(f"signals[{name!r}]", sig)
    checked[name] = jnp.asarray(validation.to_float(f"signals[{name!r}]", sig, np.float32))
  validation.check_int32("preds", preds)
  if labels is not None:
    labels = validation.as_numpy("labels", labels, ndim=1, kind="int")
    validation.check_shape("labels", labels, (num,))
    validation.check_int32("labels", labels)
    labels = jnp.asarray(labels, jnp.int32)
  f32 = lambda name, a: jnp.asarray(validation.to_float(name, a, np.float32))
  return (f32("scores", scores), jnp.asarray(preds, jnp.int32), f32("losses", losses),
          f32("costs", costs), checked, labels)


@pytree_dataclass
class ExitTraces:
  """Per-sample, per-stage records of ``N`` requests through ``n`` stages.

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
    if not all(validation.is_concrete(x) for x in leaves):
      return
    arrays = _validated_traces(self.scores, self.preds, self.losses, self.costs, self.signals,
                               self.labels)
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
    return jnp.broadcast_to(self.costs, self.scores.shape)

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


def sample_traces(key: chex.PRNGKey, cascade, num_samples: int, *, loss: str = "bernoulli",
                  num_classes: int = 10) -> ExitTraces:
  """Synthetic traces whose ground truth is a known :class:`~ttamer_jax.Cascade`.

  Each sample follows the cascade's Markov chain; its score at stage ``i`` is
  ``(state + u) / K`` with ``u ~ U[0, 1)`` (so ``K`` uniform bins on ``[0, 1]`` recover
  the state exactly). With ``loss="bernoulli"`` (values must lie in ``[0, 1]``) the
  true loss is a 0/1 error drawn with probability ``values[i, state]`` and the
  prediction equals a random label iff the error is 0; with ``loss="expected"`` the
  loss is ``values[i, state]`` itself and predictions are drawn the same way.

  Returns:
    ExitTraces with ``signals={"state_score": scores}`` and ``labels``.
  """
  from ttamer_jax.simulation import sample_states  # simulation imports policies only.
  import jax

  from ttamer_jax.model import Cascade
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  if loss not in ("bernoulli", "expected"):
    raise ValueError(f"loss: must be 'bernoulli' or 'expected', got {loss!r}")
  num_samples = validation.check_positive_int("num_samples", num_samples)
  num_classes = validation.check_positive_int("num_classes", num_classes)
  values = np.asarray(cascade.values)
  if loss == "bernoulli" and (values.max() > 1):
    raise ValueError(f"cascade.values: max {values.max():.4g} > 1 cannot be an error probability "
                     "(use loss='expected')")
  k_states, k_score, k_err, k_label, k_wrong = jax.random.split(key, 5)
  states = np.asarray(sample_states(k_states, cascade, num_samples))
  n, k = cascade.num_stages, cascade.num_states
  scores = (states + np.asarray(jax.random.uniform(k_score, states.shape))) / k
  p_err = values[np.arange(n)[None, :], states]
  err = np.asarray(jax.random.uniform(k_err, states.shape)) < p_err
  losses = err.astype(np.float32) if loss == "bernoulli" else p_err
  labels = np.asarray(jax.random.randint(k_label, (num_samples,), 0, num_classes))
  offset = np.asarray(jax.random.randint(k_wrong, states.shape, 1, max(num_classes, 2)))
  preds = np.where(err, (labels[:, None] + offset) % num_classes, labels[:, None])
  return ExitTraces(scores=scores, preds=preds, losses=losses, costs=np.asarray(cascade.costs),
                    signals={"state_score": scores}, labels=labels)


def split_traces(key: chex.PRNGKey, traces: ExitTraces, fraction: float = 0.5
                 ) -> tuple[ExitTraces, ExitTraces]:
  """A random ``(first, second)`` split; ``first`` holds ``round(fraction * N)`` samples."""
  import jax

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


def _digest(name: str, arr: np.ndarray) -> np.ndarray:
  h = hashlib.sha256()
  h.update(name.encode() + b"\0" + arr.dtype.str.encode() + b"\0" + repr(arr.shape).encode())
  h.update(np.ascontiguousarray(arr).tobytes())
  return np.frombuffer(h.digest(), np.uint8)


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` plus per-field SHA-256 checksums to ``path`` atomically.

  The archive is written to a temporary file in the destination folder and moved
  into place with ``os.replace``: on any error nothing (not even a partial file)
  appears at ``path``. Checksums (``checksum_names [F]``, ``checksums [F, 32]``) let
  the loader name the field a flipped bit landed in.
  """
  path = os.fspath(path)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  for k, v in arrays.items():
    if v.dtype == object:
      raise ValueError(f"{k}: object arrays cannot be saved (allow_pickle=False)")
  names = sorted(arrays)
  payload = dict(arrays)
  payload["checksum_names"] = np.asarray(names, dtype=str)
  payload["checksums"] = np.stack([_digest(k, arrays[k]) for k in names]) if names else np.zeros((0, 32), np.uint8)
  with atomic_path(path, ".npz") as tmp:
    write_npz(tmp, payload)


def read_npz(path: str | os.PathLike, what: str, *, max_bytes: int | None = None
             ) -> dict[str, np.ndarray]:
  """Reads every field of an ``.npz`` written by :func:`write_npz_atomic`.

  Raises ``ValueError`` naming the file and the field when the archive is
  larger than the size limit (:func:`ttamer_jax._io.check_file_size`; also its
  members' expanded size, so a small compressed archive cannot expand without
  bound), truncated, not a zip, holds pickled objects, fails a zip CRC or a
  SHA-256 checksum. ``what`` names the kind of file in messages ("traces",
  "policy").
  """
  path = os.fspath(path)
  limit = check_file_size(path, what, max_bytes)  # a missing file is FileNotFoundError.
  with open(path, "rb") as f:
    raw = f.read()
  try:
    archive = np.load(io.BytesIO(raw), allow_pickle=False)
  except Exception as e:  # BadZipFile, EOFError, ValueError from numpy's parser ...
    raise ValueError(f"{path}: not a readable {what} .npz file ({type(e).__name__}: {e})") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: a single .npy array, not a {what} .npz archive")
  out = {}
  with archive:
    try:
      keys = list(archive.files)
      expanded = sum(info.file_size for info in archive.zip.infolist())
    except Exception as e:
      raise ValueError(f"{path}: corrupt {what} archive directory ({e})") from None
    if len(set(keys)) != len(keys):  # zip readers disagree on which copy they return
      dup = next(k for i, k in enumerate(keys) if k in keys[:i])
      raise ValueError(f"{path}: field {dup!r} appears more than once in the archive")
    check_expanded_size(path, what, expanded, limit)
    for key in keys:
      try:
        out[key] = archive[key]
      except Exception as e:  # zipfile.BadZipFile (CRC), pickled objects, bad headers
        raise ValueError(f"{path}: field {key!r} is corrupt ({type(e).__name__}: {e})") from None
  if "checksum_names" not in out or "checksums" not in out:
    raise ValueError(f"{path}: field 'checksums' is missing (not a ttamer_jax {what} file)")
  names, sums = out.pop("checksum_names"), out.pop("checksums")
  if names.ndim != 1 or names.dtype.kind != "U" or sums.shape != (names.shape[0], 32):
    raise ValueError(f"{path}: field 'checksums' is malformed (shape {sums.shape}, names {names.shape})")
  extra = sorted(set(out) - {str(k) for k in names})
  if extra:
    raise ValueError(f"{path}: field {extra[0]!r} is not covered by the checksums (unexpected field)")
  for key, digest in zip(names, sums):
    key = str(key)
    if key not in out:
      raise ValueError(f"{path}: field {key!r} is missing")
    if not np.array_equal(_digest(key, out[key]), digest):
      raise ValueError(f"{path}: field {key!r} fails its SHA-256 checksum (file corrupt or modified)")
  return out


def check_format_version(path: str, fields: Mapping[str, np.ndarray], supported: int,
                         kind: str, what: str) -> int:
  """Checks the ``kind`` tag and ``format_version`` field of a loaded archive."""
  if "kind" not in fields or str(fields["kind"]) != kind:
    got = str(fields["kind"]) if "kind" in fields else "no kind field"
    raise ValueError(f"{path}: field 'kind' = {got!r}; this is not a {what} file ({kind!r})")
  if "format_version" not in fields:
    raise ValueError(f"{path}: field 'format_version' is missing")
  v = fields["format_version"]
  if v.shape != () or v.dtype.kind not in "iu":
    raise ValueError(f"{path}: field 'format_version' must be an integer scalar, got {v.dtype}{v.shape}")
  version = int(v)
  if version != supported:
    newer = " (written by a newer ttamer_jax; upgrade)" if version > supported else ""
    raise ValueError(f"{path}: format_version = {version} is not supported "
                     f"(this ttamer_jax reads version {supported}){newer}")
  return version


def save_traces(path: str | os.PathLike, traces: ExitTraces) -> None:
  """Saves ``traces`` to ``path`` (``.npz``, format version ``TRACES_FORMAT_VERSION``).

  Fields: ``format_version``, ``kind``, ``scores``, ``preds``, ``losses``, ``costs``,
  ``signal_names [S]`` with ``signal_0 .. signal_{S-1}``, optional ``labels``, and
  per-field checksums. Written atomically; loaded with ``allow_pickle=False``.
  """
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

  Files over ``max_bytes`` (default :data:`ttamer_jax._io.MAX_FILE_BYTES`) are
  refused before they are read.
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


# ------------------------------------------------------------- tables (pandas)
_LONG_REQUIRED = ("sample", "stage", "score", "pred", "loss", "cost")
_WIDE_PREFIXES = ("score", "pred", "loss", "cost")


def _pandas():
  try:
    import pandas as pd
  except ImportError:
    raise ImportError("reading trace tables needs pandas (pip install 'ttamer-jax[io]')") from None
  return pd


def _column(df, name: str, kind: str = "float") -> np.ndarray:
  values = df[name].to_numpy()
  if values.dtype == object or values.dtype.kind not in "biuf":
    try:
      values = values.astype(np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"column {name!r}: must be numeric, got {df[name].dtype}") from None
  if values.dtype.kind == "f" and np.isnan(values).any():
    row = int(np.flatnonzero(np.isnan(values))[0])
    raise ValueError(f"column {name!r}: missing value (NaN) in row {row}")
  values = validation.as_numpy(f"column {name!r}", values, kind=kind)
  if kind == "int":  # before any cast: 1e30 would wrap to a garbage int64
    bad = (values < validation.INT32_MIN) | (values > validation.INT32_MAX)
    if bad.any():
      row = int(np.flatnonzero(bad)[0])
      raise ValueError(f"column {name!r}: value {values[row].item()!r} in row {row} does not fit "
                       "int32")
  return values


def _collapse_costs(costs: np.ndarray) -> np.ndarray:
  """``[N, n]`` costs that are the same for every sample become ``[n]``."""
  return costs[0] if np.all(costs == costs[:1]) else costs


def traces_from_table(table: Any, *, form: str | None = None) -> ExitTraces:
  """Builds traces from a pandas ``DataFrame`` (or pyarrow ``Table``).

  Long form, one row per (sample, stage): columns ``sample`` (any id), ``stage``
  (``0..n-1``), ``score``, ``pred``, ``loss``, ``cost``, optional ``label``
  (constant per sample); every other numeric column becomes a signal. Every
  sample must have every stage exactly once.

  Wide form, one row per sample: columns ``score_0..score_{n-1}``, ``pred_i``,
  ``loss_i``, ``cost_i``, optional ``label``; further ``{name}_{i}`` column groups
  covering every stage become signals. ``form=None`` picks long iff a ``stage``
  column exists. Costs equal for every sample are stored per stage (``[n]``).
  """
  pd = _pandas()
  if hasattr(table, "to_pandas") and not isinstance(table, pd.DataFrame):
    table = table.to_pandas()
  if not isinstance(table, pd.DataFrame):
    raise ValueError(f"table: expected a pandas DataFrame or pyarrow Table, got {type(table).__name__}")
  if form is None:
    form = "long" if "stage" in table.columns else "wide"
  if form not in ("long", "wide"):
    raise ValueError(f"form: must be 'long' or 'wide', got {form!r}")
  if len(table) == 0:
    raise ValueError("table: has no rows")
  return _from_long(table) if form == "long" else _from_wide(table)


def _from_long(df) -> ExitTraces:
  for name in _LONG_REQUIRED:
    if name not in df.columns:
      raise ValueError(f"column {name!r}: missing from the long-form table (need {list(_LONG_REQUIRED)})")
  stage = _column(df, "stage", kind="int").astype(np.int64)
  if stage.min() < 0:
    raise ValueError(f"column 'stage': value {int(stage.min())} is negative")
  n = int(stage.max()) + 1
  if n > len(df):  # every sample needs n rows: stage numbers are corrupt
    raise ValueError(f"column 'stage': value {n - 1} needs {n} rows per sample, the table has "
                     f"{len(df)} rows (every sample needs stages 0..{n - 1})")
  pd = _pandas()
  sample, sample_ids = pd.factorize(df["sample"], sort=False)  # first-appearance order
  if (sample < 0).any():
    raise ValueError(f"column 'sample': missing id in row {int(np.argmax(sample < 0))}")
  sample_ids = [x.item() if hasattr(x, "item") else x for x in np.asarray(sample_ids, dtype=object)]
  num = len(sample_ids)
  # O(rows) checks (no [num * n] table: a huge stage number in a corrupt table
  # must not allocate one).
  flat = sample.reshape(-1).astype(np.int64) * n + stage
  keys, counts = np.unique(flat, return_counts=True)
  if counts.max() > 1:
    i = int(keys[np.argmax(counts > 1)])
    raise ValueError(f"table: sample {sample_ids[i // n]!r} has stage {i % n} more than once")
  if keys.size != num * n:
    per_sample = np.bincount(keys // n, minlength=num)
    r = int(np.argmax(per_sample < n))
    have = set((keys[keys // n == r] % n).tolist())
    missing = next(j for j in range(n) if j not in have)
    raise ValueError(f"table: sample {sample_ids[r]!r} has no row for stage {missing} "
                     f"(every sample needs stages 0..{n - 1})")

  def grid(name, kind="float"):
    out = np.empty(num * n, np.int64 if kind == "int" else np.float64)
    out[flat] = _column(df, name, kind)
    return out.reshape(num, n)

  labels = None
  if "label" in df.columns:
    lab = grid("label", "int")
    bad = np.any(lab != lab[:, :1], axis=1)
    if bad.any():
      raise ValueError(f"column 'label': differs across the stages of sample {sample_ids[np.argmax(bad)]!r}")
    labels = lab[:, 0]
  extra = [c for c in df.columns if c not in _LONG_REQUIRED + ("label",)]
  signals = {}
  for c in extra:
    if df[c].dtype.kind in "biuf":
      signals[str(c)] = grid(c)
  return ExitTraces(scores=grid("score"), preds=grid("pred", "int"), losses=grid("loss"),
                    costs=_collapse_costs(grid("cost")), signals=signals, labels=labels)


def _from_wide(df) -> ExitTraces:
  groups: dict[str, dict[int, str]] = {}
  for c in df.columns:
    base, sep, idx = str(c).rpartition("_")
    if sep and base and idx.isdigit():
      other = groups.setdefault(base, {}).setdefault(int(idx), c)
      if other is not c:
        raise ValueError(f"column {str(c)!r}: same stage {int(idx)} as column {str(other)!r}")
  if "score" not in groups:
    raise ValueError("column 'score_0': missing from the wide-form table (need score_i, pred_i, "
                     "loss_i, cost_i for every stage i)")
  n = max(groups["score"]) + 1
  for prefix in _WIDE_PREFIXES:
    for i in range(n):
      if i not in groups.get(prefix, {}):
        raise ValueError(f"column '{prefix}_{i}': missing from the wide-form table ({n} stages)")
    if max(groups[prefix]) >= n:
      raise ValueError(f"column '{prefix}_{max(groups[prefix])}': stage beyond the {n} score columns")

  def block(prefix, kind="float"):
    return np.stack([_column(df, groups[prefix][i], kind) for i in range(n)], axis=1)

  signals = {}
  for base, cols in groups.items():
    if base in _WIDE_PREFIXES or sorted(cols) != list(range(n)):
      continue
    if all(df[cols[i]].dtype.kind in "biuf" for i in range(n)):
      signals[base] = block(base)
  labels = _column(df, "label", "int") if "label" in df.columns else None
  return ExitTraces(scores=block("score"), preds=block("pred", "int"), losses=block("loss"),
                    costs=_collapse_costs(block("cost")), signals=signals, labels=labels)


def traces_to_table(traces: ExitTraces, *, form: str = "long"):
  """The inverse of :func:`traces_from_table` (a pandas ``DataFrame``)."""
  pd = _pandas()
  if form not in ("long", "wide"):
    raise ValueError(f"form: must be 'long' or 'wide', got {form!r}")
  num, n = traces.num_samples, traces.num_stages
  fields = dict(score=traces.scores, pred=traces.preds, loss=traces.losses, cost=traces.cost_matrix(),
                **{k: v for k, v in traces.signals.items()})
  fields = {k: np.asarray(v) for k, v in fields.items()}
  labels = None if traces.labels is None else np.asarray(traces.labels)
  if form == "long":
    cols = dict(sample=np.repeat(np.arange(num), n), stage=np.tile(np.arange(n), num))
    cols.update({k: v.reshape(-1) for k, v in fields.items()})
    if labels is not None:
      cols["label"] = np.repeat(labels, n)
  else:
    cols = {f"{k}_{i}": v[:, i] for k, v in fields.items() for i in range(n)}
    if labels is not None:
      cols["label"] = labels
  return pd.DataFrame(cols)


def _parquet_size(path: str) -> int:
  """Bytes a Parquet table expands to in memory (from its footer; >= 8 per cell)."""
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("reading Parquet trace tables needs pyarrow (pip install pyarrow)") from None
  try:
    meta = pq.read_metadata(path)
    return max(meta.num_rows * meta.num_columns * 8,
               sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)))
  except Exception as e:  # corrupt footer (ArrowInvalid, OSError)
    raise ValueError(f"{path}: cannot be read as a trace table ({type(e).__name__}: {e})") from None


def load_traces_table(path: str | os.PathLike, *, form: str | None = None,
                      max_bytes: int | None = None) -> ExitTraces:
  """Reads a ``.csv`` or ``.parquet`` trace table (needs pandas; Parquet needs pyarrow).

  Files over ``max_bytes`` (default :data:`ttamer_jax._io.MAX_FILE_BYTES`) are
  refused before they are read.
  """
  pd = _pandas()
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".csv", ".parquet", ".pq"):
    raise ValueError(f"{path}: unknown table extension {ext!r} (use .csv or .parquet)")
  limit = check_file_size(path, "trace table", max_bytes)
  if ext != ".csv":  # compressed columns: refuse a table that would expand past the limit
    check_expanded_size(path, "trace table", _parquet_size(path), limit)
  try:
    df = pd.read_csv(path) if ext == ".csv" else pd.read_parquet(path)
  except (FileNotFoundError, ImportError):
    raise
  except Exception as e:  # parser errors, corrupt Parquet footers (ArrowInvalid) ...
    raise ValueError(f"{path}: cannot be read as a trace table ({type(e).__name__}: {e})") from None
  try:
    return traces_from_table(df, form=form)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
