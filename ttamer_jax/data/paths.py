"""The files a command reads and writes, checked before any work.

Each check raises ``ValueError`` with one line naming the path and what is wrong, so a
command that fails on its arguments has written nothing (docs/DESIGN.md, "Validation
happens once at the boundary"). The writes themselves are atomic (:mod:`.files`).
"""

from __future__ import annotations

import os

from ttamer_jax.data.files import check_replaceable
from ttamer_jax.data.tables import read_traces
from ttamer_jax.data.traces import ExitTraces


def check_input(path: str, what: str) -> str:
  """``path`` must be an existing file (not a folder); ``what`` names it in the error."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such {what} file")
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory, not a {what} file")
  if not os.path.isfile(path):  # a FIFO would block the read, a device never end
    raise ValueError(f"{path}: is not a regular file (a FIFO or a device?), not a {what} file")
  return path


def check_output(path: str, what: str) -> str:
  """An output file: a file name (not empty, not ending in a separator) whose folder
  exists and is writable, and which is missing or a regular file (a FIFO or a device
  would be replaced); checked before any work."""
  if not path:
    raise ValueError(f"'': empty {what} file name")
  if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
    raise ValueError(f"{path}: ends with {path[-1]!r}, a folder; give a {what} file name")
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory; give a {what} file name")
  if not os.path.isdir(folder):
    raise ValueError(f"{path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"{path}: folder {folder} is not writable")
  check_replaceable(path)
  return path


def same_file(a: str, b: str) -> bool:
  """Whether ``a`` and ``b`` name one file, whether or not it exists yet: the same path
  once links and ``..`` are resolved, or (both existing) the same file (hard links)."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_outputs(outputs: list[tuple[str, str, str]], *inputs: str | None) -> None:
  """Every output of a command, ``(label, path, kind)`` (files it writes beside them
  included), is a valid output (:func:`check_output`), none is an input, and no two are
  one file -- the second write would replace the first; checked before any work."""
  for i, (label, path, kind) in enumerate(outputs):
    check_output(path, kind)
    check_distinct(path, label, *inputs)
    for other, other_path, _ in outputs[:i]:
      if same_file(path, other_path):
        raise ValueError(f"{label} {path}: is also {other} ({other_path}); each output needs a "
                         "file of its own")


def check_distinct(output: str, what: str, *inputs: str | None) -> None:
  """An output file must not be one of the input files (it would overwrite it)."""
  for path in inputs:
    if path and same_file(output, path):
      raise ValueError(f"{what} {output}: is an input file of this command; choose another name")


def read_traces_file(path: str, what: str = "traces") -> ExitTraces:
  """An input traces file (``.npz``, ``.csv``, ``.parquet``/``.pq``; chosen by extension,
  :func:`~ttamer_jax.read_traces`): it must exist; a bad file or a missing table
  dependency is a one-line ``ValueError``."""
  check_input(path, what)
  try:
    return read_traces(path)
  except ImportError as e:
    raise ValueError(f"{path}: {e}") from None


def check_matplotlib(what: str) -> None:
  """``what`` (a flag, a command) needs matplotlib: a one-line error without it."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ValueError(f"{what} needs matplotlib (pip install matplotlib)") from None
