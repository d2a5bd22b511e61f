"""Trace tables: CSV and Parquet files and pandas ``DataFrame`` s (docs/trace_format.md),
and :func:`read_traces`, the one reader of a traces file of any supported kind.

pandas (and pyarrow for Parquet) are imported when a table is read or written,
never by ``import ttamer_jax``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.data.files import check_expanded_size, check_file_size
from ttamer_jax.data.traces import ExitTraces, load_traces

_LONG_REQUIRED = ("sample", "stage", "score", "pred", "loss", "cost")
# How to get the table dependencies (core dependencies of the package, missing only
# from an environment installed without them): a line that works from PyPI packages
# alone, and the one of a checkout.
INSTALL_HINT = 'pip install pandas pyarrow, or pip install -e . in a ttamer_jax checkout'
# Extensions :func:`read_traces` reads, and how.
TRACE_EXTENSIONS = {".npz": "npz", ".csv": "table", ".parquet": "table", ".pq": "table"}
_WIDE_PREFIXES = ("score", "pred", "loss", "cost")


def _pandas():
  try:
    import pandas as pd
  except ImportError:
    raise ImportError(f"reading trace tables needs pandas (and pyarrow for Parquet): {INSTALL_HINT}"
                      ) from None
  return pd


# What pandas infers for an object column of plain numbers (no text, no dates).
_NUMBER_OBJECTS = ("integer", "floating", "mixed-integer-float", "decimal", "empty")


def _column_values(col, name: str) -> np.ndarray:
  """A column's values as a NumPy number array; any other type is refused by name.

  Dates (``datetime64``) and durations (``timedelta64``) would cast to nanosecond
  counts and booleans to 0/1 -- numbers, but not the ones the user recorded; text is
  no number at all. Nullable extension columns (``Int64``, ``Float64``) become floats
  with NaN for their missing values (refused below, with the row)."""
  pd = _pandas()
  types = pd.api.types
  dtype = col.dtype
  if types.is_bool_dtype(dtype):
    raise ValueError(f"column {name!r}: must be numeric, has type bool (store 0/1 as integers "
                     "or floats)")
  if types.is_datetime64_any_dtype(dtype) or types.is_timedelta64_dtype(dtype) or isinstance(
      dtype, pd.PeriodDtype):
    raise ValueError(f"column {name!r}: must be numeric, has type {dtype} (dates or durations "
                     "would be read as counts of time units)")
  if dtype == object or types.is_string_dtype(dtype):  # noqa: E721 (a dtype equals object)
    inferred = types.infer_dtype(col, skipna=True)
    if inferred not in _NUMBER_OBJECTS:
      numeric = pd.to_numeric(col, errors="coerce")
      bad = np.flatnonzero(numeric.isna().to_numpy() & col.notna().to_numpy())
      at = f" ({col.iloc[bad[0]]!r} in row {int(bad[0])})" if bad.size else ""
      raise ValueError(f"column {name!r}: must be numeric, holds {inferred} values{at}")
    return col.to_numpy(dtype=np.float64, na_value=np.nan)
  if not types.is_numeric_dtype(dtype) or types.is_complex_dtype(dtype):
    raise ValueError(f"column {name!r}: must be numeric (real numbers), has type {dtype}")
  if isinstance(dtype, np.dtype):
    return col.to_numpy()
  return col.to_numpy(dtype=np.float64, na_value=np.nan)  # nullable Int64 / Float64 ...


def _column(df, name: str, kind: str = "float") -> np.ndarray:
  values = _column_values(df[name], name)
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

  Args:
    table: a pandas ``DataFrame`` or pyarrow ``Table``.
    form: ``"long"``, ``"wide"`` or ``None`` (chosen by the columns).

  Returns:
    :class:`~ttamer_jax.ExitTraces` with ``[N, n]`` arrays.
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
  _check_unique_columns([str(c) for c in table.columns])
  return _from_long(table) if form == "long" else _from_wide(table)


def _check_unique_columns(names: list) -> None:
  """Each column name once: with two ``loss`` columns, which one is meant?"""
  seen = set()
  for c in names:
    if c in seen:
      raise ValueError(f"column {c!r}: appears more than once in the header (which one is meant?)")
    seen.add(c)


def _csv_header(path: str) -> list | None:
  """The header row of a CSV file as written (pandas renames a second ``loss`` to
  ``loss.1``), or ``None`` when it cannot be read as text (pandas then reports it)."""
  import csv
  try:
    with open(path, newline="", encoding="utf-8") as f:
      return next(csv.reader(f), [])
  except (OSError, UnicodeDecodeError, csv.Error):
    return None


def check_csv_header(path: str) -> None:
  """Refuses a CSV header with a repeated column or that is one column holding another
  delimiter (a ``;``- or tab-separated export), before pandas reads the table."""
  header = _csv_header(path)
  if header is None:
    return
  _check_unique_columns(header)
  if len(header) == 1:
    for sep, what in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
      if sep in header[0]:
        raise ValueError(f"the header is one column ({header[0][:40]!r}...) separated by {what}, "
                         "not commas: save the table as comma-separated CSV")


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
    if df[c].dtype.kind in "iuf":  # other columns (ids, text, dates, flags) are not signals
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
    if all(df[cols[i]].dtype.kind in "iuf" for i in range(n)):
      signals[base] = block(base)
  labels = _column(df, "label", "int") if "label" in df.columns else None
  return ExitTraces(scores=block("score"), preds=block("pred", "int"), losses=block("loss"),
                    costs=_collapse_costs(block("cost")), signals=signals, labels=labels)


def traces_to_table(traces: ExitTraces, *, form: str = "long"):
  """The inverse of :func:`traces_from_table` (a pandas ``DataFrame``).

  Args:
    traces: :class:`~ttamer_jax.ExitTraces` (``N`` requests, ``n`` stages).
    form: ``"long"`` (``N n`` rows) or ``"wide"`` (``N`` rows).

  Returns:
    A pandas ``DataFrame``.
  """
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
    raise ImportError(f"reading Parquet trace tables needs pyarrow: {INSTALL_HINT}") from None
  try:
    meta = pq.read_metadata(path)
    return max(meta.num_rows * meta.num_columns * 8,
               sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)))
  except Exception as e:  # corrupt footer (ArrowInvalid, OSError)
    raise ValueError(f"{path}: cannot be read as a trace table ({type(e).__name__}: {e})") from None


def load_traces_table(path: str | os.PathLike, *, form: str | None = None,
                      max_bytes: int | None = None) -> ExitTraces:
  """Reads a ``.csv`` or ``.parquet`` trace table (needs pandas; Parquet needs pyarrow).

  Files over ``max_bytes`` (default :data:`ttamer_jax.data.files.MAX_FILE_BYTES`) are
  refused before they are read.

  Args:
    path: a ``.csv`` or ``.parquet`` file.
    form: ``"long"``, ``"wide"`` or ``None`` (chosen by the columns).
    max_bytes: refuse larger files.

  Returns:
    :class:`~ttamer_jax.ExitTraces` with ``[N, n]`` arrays.
  """
  pd = _pandas()
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".csv", ".parquet", ".pq"):
    raise ValueError(f"{path}: unknown table extension {ext!r} (use .csv or .parquet)")
  limit = check_file_size(path, "trace table", max_bytes)
  if ext != ".csv":  # compressed columns: refuse a table that would expand past the limit
    check_expanded_size(path, "trace table", _parquet_size(path), limit)
  if ext == ".csv":
    try:
      check_csv_header(path)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
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


def read_traces(path: str | os.PathLike, *, max_bytes: int | None = None) -> ExitTraces:
  """Reads a traces file of any supported kind, chosen by its extension.

  ``.npz``: :func:`~ttamer_jax.load_traces` (written by :func:`~ttamer_jax.save_traces`);
  ``.csv``, ``.parquet`` or ``.pq``: :func:`load_traces_table` (long or wide form; needs
  pandas, and pyarrow for Parquet). What ``ttamer fit``, ``evaluate`` and ``sweep`` read.
  Another extension raises ``ValueError`` listing the accepted ones; a bad file raises
  ``ValueError`` naming the path, the column or field, and the problem.

  Args:
    path: a ``.npz``, ``.csv``, ``.parquet`` or ``.pq`` file.
    max_bytes: refuse larger files.

  Returns:
    :class:`~ttamer_jax.ExitTraces` with ``[N, n]`` arrays.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  kind = TRACE_EXTENSIONS.get(ext)
  if kind is None:
    what = f"extension {ext!r}" if ext else "no extension"
    raise ValueError(f"{path}: unknown traces file type ({what}); use one of "
                     f"{', '.join(TRACE_EXTENSIONS)} (docs/trace_format.md)")
  if kind == "npz":
    return load_traces(path, max_bytes=max_bytes)
  return load_traces_table(path, max_bytes=max_bytes)
