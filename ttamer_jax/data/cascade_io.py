"""Saving and loading a :class:`~ttamer_jax.Cascade` (``ttamer solve CASCADE.npz``).

A cascade file is an ``.npz`` archive written atomically (temporary file +
``os.replace``) with the same checksummed layout as trace and policy files
(:mod:`ttamer_jax.data.archive`):

| field            | shape / dtype      | meaning |
|------------------|--------------------|---------|
| `kind`           | `[]` str           | `"ttamer_jax.Cascade"` |
| `format_version` | `[]` int64         | :data:`CASCADE_FORMAT_VERSION` |
| `values`         | `[n, K]` float     | loss of answering with stage i in state s |
| `init`           | `[K]` float        | distribution of stage 1's state |
| `trans`          | `[n-1, K, K]` float| row-stochastic transitions |
| `costs`          | `[n]` float        | cost of consulting each stage |
| `checksum_names`, `checksums` | `[F]`, `[F, 32]` | SHA-256 of every field |

Loading uses ``allow_pickle=False`` and validates the arrays exactly as the
:class:`~ttamer_jax.Cascade` constructor does; every problem is a ``ValueError``
that starts with the path and names the field.
"""

from __future__ import annotations

import os

import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import Cascade
from ttamer_jax.data.archive import check_format_version, field_error, read_npz, write_npz_atomic

CASCADE_FORMAT_VERSION = 1
_KIND = "ttamer_jax.Cascade"
_FIELDS = ("values", "init", "trans", "costs")


def save_cascade(path: str | os.PathLike, cascade: Cascade) -> None:
  """Writes ``cascade`` to ``path`` (``.npz``, format :data:`CASCADE_FORMAT_VERSION`).

  Args:
    path: destination ``.npz`` file.
    cascade: the :class:`~ttamer_jax.Cascade`.

  Returns:
    ``None``.
  """
  validation.refuse_traced("save_cascade", "write files outside jit (or from "
                           "jax.debug.callback)", cascade=cascade)
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  arrays = {f: np.asarray(getattr(cascade, f)) for f in _FIELDS}
  if arrays["values"].ndim != 2:
    raise ValueError(f"cascade: expected one cascade (values [n, K]), got values of shape "
                     f"{arrays['values'].shape}")
  arrays.update(kind=np.asarray(_KIND), format_version=np.asarray(CASCADE_FORMAT_VERSION, np.int64))
  write_npz_atomic(path, arrays)


def load_cascade(path: str | os.PathLike, *, max_bytes: int | None = None) -> Cascade:
  """Reads a cascade written by :func:`save_cascade` (``ValueError`` names what is wrong).

  Files over ``max_bytes`` (default :data:`ttamer_jax.data.files.MAX_FILE_BYTES`) are
  refused before they are read.

  Args:
    path: a file written by :func:`save_cascade`.
    max_bytes: refuse larger files.

  Returns:
    The :class:`~ttamer_jax.Cascade` (``values [n, K]``, ``init [K]``,
    ``trans [n-1, K, K]``, ``costs [n]``).
  """
  path = os.fspath(path)
  fields = read_npz(path, "cascade", max_bytes=max_bytes)
  check_format_version(path, fields, CASCADE_FORMAT_VERSION, _KIND, "cascade")
  for name in _FIELDS:
    if name not in fields:
      raise ValueError(f"{path}: field {name!r} is missing")
    if fields[name].dtype.kind not in "fiu":
      raise ValueError(f"{path}: field {name!r} must be numeric, got dtype {fields[name].dtype}")
  extra = sorted(set(fields) - set(_FIELDS) - {"kind", "format_version"})
  if extra:
    raise ValueError(f"{path}: unexpected field {extra[0]!r}")
  try:
    return Cascade(**{f: fields[f] for f in _FIELDS})
  except ValueError as e:
    raise field_error(path, e) from None
