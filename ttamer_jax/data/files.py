"""Atomic file writes and the size limit on reads, shared by every writer and loader.

A file appears at its destination complete or not at all: data goes to a
temporary file in the destination folder, is flushed to disk and moved into place
with ``os.replace``; on any error the temporary file is removed. Files get the
usual permissions (``0666 & ~umask``), not ``mkstemp``'s ``0600``.

A destination that exists and is not a regular file (a folder, a FIFO, a device
such as ``/dev/null``) is refused before anything is written: replacing it would
destroy something the user never meant as an output (:func:`check_replaceable`).

Every loader refuses a file larger than :data:`MAX_FILE_BYTES` before reading
it (and an ``.npz`` archive whose members would expand beyond it), so a wrong or
hostile path cannot exhaust memory. The limit is raised per call with
``max_bytes=`` or for the process with the environment variable
``TTAMER_MAX_FILE_BYTES``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
import zipfile
from typing import Iterator, Mapping

import numpy as np

# Default size limit of every loader: 1 GiB (about 40 million requests x 4 stages
# of traces with two signals).
MAX_FILE_BYTES = 1 << 30
MAX_FILE_BYTES_ENV = "TTAMER_MAX_FILE_BYTES"


def max_file_bytes(max_bytes: int | None = None) -> int:
  """The size limit in force: ``max_bytes``, else ``$TTAMER_MAX_FILE_BYTES``, else
  :data:`MAX_FILE_BYTES`."""
  if max_bytes is not None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
      raise ValueError(f"max_bytes: must be a positive integer, got {max_bytes!r}")
    return max_bytes
  env = os.environ.get(MAX_FILE_BYTES_ENV)
  if env:
    try:
      value = int(env)
    except ValueError:
      value = 0
    if value < 1:
      raise ValueError(f"${MAX_FILE_BYTES_ENV} = {env!r}: must be a positive integer (bytes)")
    return value
  return MAX_FILE_BYTES


def _limit_hint(limit: int) -> str:
  return (f"the limit is {limit} bytes; pass max_bytes=... or set ${MAX_FILE_BYTES_ENV} "
          "to read larger files")


def check_file_size(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> int:
  """Raises ``ValueError`` if ``path`` is larger than the limit; returns the limit.

  A missing file raises ``FileNotFoundError`` (callers report it as such).
  """
  limit = max_file_bytes(max_bytes)
  size = os.stat(path).st_size
  if size > limit:
    raise ValueError(f"{os.fspath(path)}: {what} file is {size} bytes, too large ({_limit_hint(limit)})")
  return limit


def check_expanded_size(path: str | os.PathLike, what: str, size: int, limit: int) -> None:
  """``size``: bytes the file's contents expand to (e.g. the members of a zip)."""
  if size > limit:
    raise ValueError(f"{os.fspath(path)}: {what} file expands to {size} bytes, too large "
                     f"({_limit_hint(limit)})")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"))


def check_replaceable(path: str | os.PathLike) -> None:
  """``path`` must be missing or a regular file (following links): writers replace the
  file at their destination, which must never be a folder, a FIFO or a device."""
  try:
    mode = os.stat(path).st_mode
  except (FileNotFoundError, NotADirectoryError):
    return  # nothing there (or a dangling link, which the rename replaces)
  if stat.S_ISREG(mode):
    return
  kind = next((name for test, name in _SPECIAL if test(mode)), "not a regular file")
  raise ValueError(f"{os.fspath(path)}: is {kind}; an output must be a regular file, which is "
                   "replaced (give another name)")


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
  """Holds Ctrl-C (SIGINT) back until the block ends, then raises ``KeyboardInterrupt``.

  For the short phase in which a command writes several files (a policy, its JSON copy,
  a cascade): each file is atomic on its own, and an interrupt between two of them
  would leave a new policy beside a stale cascade. The interrupt then goes to the
  handler in place before (Python's raises ``KeyboardInterrupt``). Only the main thread
  handles signals; elsewhere, or when SIGINT is ignored, the block runs as is.
  """
  handler = (signal.getsignal(signal.SIGINT)
             if threading.current_thread() is threading.main_thread() else None)
  if not callable(handler):  # another thread, or SIGINT ignored / left to the OS
    yield
    return
  caught = []
  signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, handler)
  if caught:
    handler(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside ``path``; moved onto ``path`` if the block succeeds."""
  path = os.fspath(path)
  check_replaceable(path)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~_umask())
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path, ".txt") as tmp:
    with open(tmp, "w") as f:
      f.write(text)


# The earliest time a zip can record: every member gets it, so equal arrays give
# bit-identical files (np.savez stamps the current time; hashable artefacts and
# reproducible runs need a constant).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` as an uncompressed ``.npz`` (``np.load`` reads it) with fixed
  member timestamps; object arrays are refused (never pickled)."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
    for name, arr in arrays.items():
      info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
      with archive.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
