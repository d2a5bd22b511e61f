"""Atomic file writes shared by every writer in the library.

A file appears at its destination complete or not at all: data goes to a
temporary file in the destination folder, is flushed to disk and moved into place
with ``os.replace``; on any error the temporary file is removed. Files get the
usual permissions (``0666 & ~umask``), not ``mkstemp``'s ``0600``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


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
