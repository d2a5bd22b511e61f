"""Atomic file writes and the size limit on reads, shared by every writer and loader.

A file appears at its destination complete or not at all: data goes to a
temporary file in the destination folder, is flushed to disk and moved into place
with ``os.replace``; on any error the temporary file is removed. Files get the
usual permissions (``0666 & ~umask``), not ``mkstemp``'s ``0600``.

Every loader refuses a file larger than :data:`MAX_FILE_BYTES` before reading
it (and an ``.npz`` archive whose members would expand beyond it), so a wrong or
hostile path cannot exhaust memory. The limit is raised per call with
``max_bytes=`` or for the process with the environment variable
``TTAMER_MAX_FILE_BYTES``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zipfile
from typing import Iterator


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside ``path``; moved onto ``path`` if the block succeeds."""
  path = os.fspath(path)
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


# 1980-01-01 00:00 as MS-DOS (time, date): the earliest time a zip can record.
_ZIP_EPOCH = struct.pack("<HH", 0, (0 << 9) | (1 << 5) | 1)


def fix_zip_times(path: str | os.PathLike) -> None:
  """Sets every member's modification time in the zip ``path`` to 1980-01-01, in place.

  ``np.savez`` stamps each member with the current time, so two saves of equal
  arrays differ in a few header bytes. With the stamps fixed, equal contents give
  bit-identical files (hashable artefacts, reproducible runs). Only the time and
  date fields of the local and central headers change; no CRC covers them.
  """
  with zipfile.ZipFile(path) as z:
    offsets = [info.header_offset for info in z.infolist()]
    start_dir = z.start_dir
  with open(path, "r+b") as f:
    for offset in offsets:
      f.seek(offset)
      if f.read(4) != b"PK\x03\x04":
        raise ValueError(f"{os.fspath(path)}: unexpected zip layout (local header)")
      f.seek(offset + 10)
      f.write(_ZIP_EPOCH)
    pos = start_dir
    for _ in offsets:
      f.seek(pos)
      head = f.read(46)
      if head[:4] != b"PK\x01\x02":
        raise ValueError(f"{os.fspath(path)}: unexpected zip layout (central directory)")
      name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
      f.seek(pos + 12)
      f.write(_ZIP_EPOCH)
      pos += 46 + name_len + extra_len + comment_len
