"""Boundary checks shared by constructors, solvers and loaders.

Every check runs outside ``jit`` on concrete arrays and raises ``ValueError``
naming the field, the first offending index and the rule broken. Values that are
JAX tracers (the caller is inside ``jit``/``vmap``) cannot be inspected and are
passed through unchecked: validation belongs at the boundary. Functions that
only run at the boundary (quantile bins, selection, file I/O, host-side sums)
refuse tracers with :func:`refuse_traced`, naming the ``jit``-able alternative.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

# Absolute tolerance on |sum(row) - 1| for probability vectors. Loose enough for
# float32 rows normalised in float32 at K = 4096 (error ~1e-6), tight enough to
# catch a row that was never normalised.
ROW_SUM_TOL = 1e-5


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds data we can look at (not an abstract tracer)."""
  return not isinstance(x, jax.core.Tracer)


_ZERO = np.zeros((), np.int32)


def is_staging() -> bool:
  """True inside a staged trace (``jit``, ``scan``, ``eval_shape``): there even a
  constant becomes a tracer, so host code (NumPy on ``jnp`` results) cannot run. Under
  ``vmap``/``grad`` alone, or ``jax.ensure_compile_time_eval()``, constants stay
  concrete. (A transfer, not ``jnp.asarray(0)``, which compiles a program.)"""
  return not is_concrete(jax.device_put(_ZERO))


def refuse_traced(function: str, alternative: str, **values: Any) -> None:
  """``ValueError`` naming ``function``, the traced field and the ``jit``-able
  ``alternative`` when ``function`` -- which runs on the host, on concrete arrays -- is
  given a traced value (any pytree leaf of ``values``) or is called inside ``jit``.

  Without it the caller would get JAX's ``TracerArrayConversionError`` from deep
  inside, or a misleading "cannot be converted to an array".
  """
  for name, value in values.items():
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(value)):
      raise ValueError(f"{name}: {function} runs at the boundary on concrete arrays, got a traced "
                       f"value (inside jit, vmap or grad); {alternative}")
  if is_staging():
    raise ValueError(f"{function}: runs at the boundary on concrete arrays, but was called inside "
                     f"jit (call it outside, or under jax.ensure_compile_time_eval() when every "
                     f"input is concrete); {alternative}")


def key_seed(key) -> np.ndarray:
  """A NumPy seed from a JAX PRNG key (legacy ``[2]`` uint32 data or a typed key)."""
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key, np.uint32).reshape(-1)


def device_array(x: Any, dtype: Any = None) -> jax.Array:
  """``x`` on the default device as a JAX array of ``dtype``: a host copy is converted
  by NumPy and transferred (``jnp.asarray`` of a NumPy array compiles a small program
  per shape and dtype, which added up to dozens per fit); a JAX array is cast."""
  if isinstance(x, jax.Array):
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)
  arr = np.asarray(x, dtype)
  return jax.device_put(arr.astype(jax.dtypes.canonicalize_dtype(arr.dtype), copy=False))


def fmt_index(flat_index: int, shape: Sequence[int]) -> str:
  if len(shape) == 0:
    return ""
  idx = np.unravel_index(flat_index, shape)
  return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def as_numpy(name: str, x: Any, *, ndim: int | None = None, kind: str = "float") -> np.ndarray:
  """Converts ``x`` to a NumPy array, checking dimensionality and numeric kind."""
  try:
    arr = np.asarray(x)
  except Exception as e:  # ragged lists, objects that refuse conversion
    raise ValueError(f"{name}: cannot be converted to an array ({e})") from None
  if arr.dtype == object or arr.dtype.kind not in "biuf":
    raise ValueError(f"{name}: must be a numeric array, got dtype {arr.dtype}")
  if kind == "int" and arr.dtype.kind == "f":
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
      raise ValueError(f"{name}: must hold integers, got dtype {arr.dtype} with non-integer entries")
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
  return arr


def check_shape(name: str, arr: np.ndarray, shape: Sequence[int]) -> None:
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")


def check_finite(name: str, arr: np.ndarray) -> None:
  if np.isfinite(arr).all():
    return
  i = int(np.flatnonzero(~np.isfinite(arr))[0])
  raise ValueError(f"{name}{fmt_index(i, arr.shape)} is {arr.flat[i].item()} (must be finite)")


def check_nonnegative(name: str, arr: np.ndarray) -> None:
  # One pass for valid input (NaN fails both comparisons); the diagnosis only on failure.
  if arr.dtype.kind == "f" and (arr >= 0).all() and (arr < np.inf).all():
    return
  check_finite(name, arr)
  bad = arr < 0
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{name}{fmt_index(i, arr.shape)} = {arr.flat[i].item()!r} is negative (must be >= 0)")


def check_stochastic(name: str, arr: np.ndarray, tol: float = ROW_SUM_TOL) -> None:
  """Entries in [0, 1], each vector along the last axis summing to 1 within ``tol``."""
  if not (arr.dtype.kind == "f" and ((arr >= 0) & (arr <= 1 + tol)).all()):
    check_nonnegative(name, arr)
    big = arr > 1 + tol
    if big.any():
      i = int(np.flatnonzero(big)[0])
      raise ValueError(f"{name}{fmt_index(i, arr.shape)} = {arr.flat[i].item()!r} exceeds 1 (not a probability)")
  if arr.shape[-1] == 0:
    return
  # einsum's sum over a short last axis is 1.3-1.5x faster than ndarray.sum's; it casts
  # every numeric dtype to float64 itself.
  sums = np.einsum("...k->...", arr, dtype=np.float64)
  off = np.abs(sums - 1.0) > tol
  if off.any():
    i = int(np.flatnonzero(off)[0])
    where = fmt_index(i, sums.shape)
    raise ValueError(
        f"{name}{where} sums to {sums.flat[i]:.9g} (rows must sum to 1 within {tol:g})")


def check_lam(lam: Any) -> None:
  """``lam`` (scalar or array) must lie in [0, 1]; tracers are passed through."""
  if not is_concrete(lam):
    return
  arr = as_numpy("lam", lam)
  bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"lam{fmt_index(i, arr.shape)} = {arr.flat[i].item()!r} is outside [0, 1]")


def check_scalar_lam(lam: Any) -> None:
  """``lam`` must be one number in [0, 1] (functions that return one policy or value)."""
  check_lam(lam)
  if is_concrete(lam) and np.ndim(lam) != 0:
    raise ValueError(f"lam: expected one number, got shape {np.shape(lam)} "
                     "(jax.vmap over lam, or ttamer_jax.sweep, for many lam values)")


def to_float(name: str, arr: np.ndarray, dtype: Any) -> np.ndarray:
  """``arr`` converted to the float ``dtype``, refusing values the conversion overflows.

  Finite float64 input can overflow float32 (``1e39 -> inf``); that would turn a
  validated, finite field into ``inf`` (and later NaN) behind the caller's back.
  """
  with np.errstate(over="ignore", invalid="ignore"):
    out = np.asarray(arr).astype(dtype)
  if out.dtype.kind == "f" and np.asarray(arr).size:
    bad = ~np.isfinite(out) & np.isfinite(np.asarray(arr, np.float64))
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(f"{name}{fmt_index(i, out.shape)} = {np.asarray(arr).flat[i].item()!r} "
                       f"overflows {np.dtype(dtype).name} (|value| must be <= "
                       f"{float(np.finfo(dtype).max):.4g})")
  return out


# Headroom below the float type's largest value for the sums the library computes in
# it (over requests, stages, bootstrap weights): products with lam, weights and
# smoothing terms of such a sum stay finite too.
SUM_HEADROOM = 16.0


def check_sum_fits(name: str, total: float, what: str, dtype: Any, hint: str) -> None:
  """``total``, a float64 bound on a sum computed in ``dtype`` (``what`` says which
  sum), must stay below ``finfo(dtype).max / SUM_HEADROOM``: every value may be a
  finite float32 while their sum is ``inf`` (3e38 + 3e38)."""
  limit = float(np.finfo(dtype).max) / SUM_HEADROOM
  if not total <= limit:
    raise ValueError(f"{name}: too large: {what} = {total:.4g} must stay below "
                     f"{limit:.4g} so that sums stay finite in {np.dtype(dtype).name} ({hint})")


def check_normal(name: str, arr: np.ndarray, dtype: Any, hint: str) -> None:
  """Non-zero entries must be normal numbers of ``dtype``: subnormals (float32 below
  1.2e-38) keep few significant bits and XLA's CPU kernels flush them to 0, so the
  host and the device would see different numbers."""
  tiny = np.finfo(dtype).tiny
  bad = (arr != 0) & (np.abs(arr) < tiny)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{name}{fmt_index(i, arr.shape)} = {arr.flat[i].item()!r} is below "
                     f"{float(tiny):.3g}, the least normal {np.dtype(dtype).name} ({hint})")


def check_int_range(name: str, arr: np.ndarray, low: int, high: int) -> None:
  """Integer entries in ``[low, high)`` (e.g. state ids, or values that fit int32)."""
  if not arr.size:
    return
  bad = (arr < low) | (arr >= high)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{name}{fmt_index(i, arr.shape)} = {arr.flat[i].item()!r} is outside "
                     f"[{low}, {high - 1}]")


INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


def check_int32(name: str, arr: np.ndarray) -> None:
  """Entries representable as int32 (the dtype states and predictions are stored in)."""
  check_int_range(name, arr, INT32_MIN, INT32_MAX + 1)


def as_float_scalar(name: str, value: Any) -> float:
  """A real scalar as a Python float (``ValueError`` naming ``name`` otherwise)."""
  arr = as_numpy(name, value)
  if arr.ndim != 0:
    raise ValueError(f"{name}: expected a number, got shape {arr.shape}")
  return float(arr)


def as_nonnegative_scalar(name: str, value: Any) -> float:
  """A finite real scalar ``>= 0`` as a Python float (``ValueError`` naming ``name``)."""
  value = as_float_scalar(name, value)
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"{name} = {value} must be a finite number >= 0")
  return value


def check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}: must be an integer, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} = {value} must be >= 1")
  return int(value)
