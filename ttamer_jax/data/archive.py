"""The checksummed ``.npz`` archive format shared by trace, cascade and policy files.

Every field carries a SHA-256 checksum (``checksum_names [F]``, ``checksums
[F, 32]``) so a flipped bit is reported with the field it landed in; files are
written atomically (:func:`ttamer_jax.data.files.atomic_path`) and read with
``allow_pickle=False`` under the size limit of :mod:`ttamer_jax.data.files`.
A ``kind`` tag and a ``format_version`` name what a file is and which reader it needs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Mapping

import numpy as np

from ttamer_jax.data.files import atomic_path, check_expanded_size, check_file_size, write_npz


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


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"


def _not_a_zip(raw: bytes, what: str) -> str | None:
  """What a file that is no ``.npz`` (zip) archive looks like, or ``None`` for a zip
  or a ``.npy`` (which ``np.load`` itself tells apart). Never unpickles anything."""
  if raw.startswith(_ZIP_MAGIC) or raw.startswith(_NPY_MAGIC):
    return None
  head = raw[:64].lstrip()
  if not raw:
    kind = "is empty"
  elif head[:1] in (b"{", b"["):
    kind = "holds JSON text (a policy's .json copy? pass the .npz beside it)"
  elif raw[:1] == b"\x80":
    kind = "is a Python pickle, which ttamer_jax never loads"
  else:
    kind = "is not a zip archive"
  return f"not a readable {what} .npz file: it {kind}"


def read_npz(path: str | os.PathLike, what: str, *, max_bytes: int | None = None
             ) -> dict[str, np.ndarray]:
  """Reads every field of an ``.npz`` written by :func:`write_npz_atomic`.

  Raises ``ValueError`` naming the file and the field when the archive is
  larger than the size limit (:func:`ttamer_jax.data.files.check_file_size`; also its
  members' expanded size, so a small compressed archive cannot expand without
  bound), truncated, not a zip, holds pickled objects, fails a zip CRC or a
  SHA-256 checksum. ``what`` names the kind of file in messages ("traces",
  "policy").
  """
  path = os.fspath(path)
  limit = check_file_size(path, what, max_bytes)  # a missing file is FileNotFoundError.
  with open(path, "rb") as f:
    raw = f.read()
  not_zip = _not_a_zip(raw, what)
  if not_zip:  # numpy's own message would suggest loading it "unsafely" with allow_pickle
    raise ValueError(f"{path}: {not_zip}")
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
    raise ValueError(f"{path}: field 'checksums' is missing (not a ttamer_jax {what} file; write it "
                     f"with ttamer_jax.save_{what})")
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


def check_format_version(path: str, fields: Mapping[str, np.ndarray], supported: int | tuple,
                         kind: str, what: str) -> int:
  """Checks the ``kind`` tag and ``format_version`` field of a loaded archive
  (``supported``: the version, or the tuple of versions, this reader reads)."""
  if "kind" not in fields or str(fields["kind"]) != kind:
    got = str(fields["kind"]) if "kind" in fields else "no kind field"
    raise ValueError(f"{path}: field 'kind' = {got!r}; this is not a {what} file ({kind!r})")
  if "format_version" not in fields:
    raise ValueError(f"{path}: field 'format_version' is missing")
  v = fields["format_version"]
  if v.shape != () or v.dtype.kind not in "iu":
    raise ValueError(f"{path}: field 'format_version' must be an integer scalar, got {v.dtype}{v.shape}")
  version = int(v)
  versions = supported if isinstance(supported, tuple) else (supported,)
  if version not in versions:
    newer = " (written by a newer ttamer_jax; upgrade)" if version > max(versions) else ""
    which = ("version " + str(versions[0]) if len(versions) == 1
             else "versions " + ", ".join(map(str, versions)))
    raise ValueError(f"{path}: format_version = {version} is not supported "
                     f"(this ttamer_jax reads {which}){newer}")
  return version




def field_error(path: str, error: Exception, prefix: str = "") -> ValueError:
  """A constructor's message, which names its field first (``"edges[0, 0] is nan"``,
  ``"key: must be ..."``), as a file's: ``"<path>: field 'edges[0, 0]' is nan"``."""
  text = str(error)
  m = re.match(r"([A-Za-z_]\w*(?:\[[^\]]*\])?)(.*)", text, re.S)
  if m is None:
    return ValueError(f"{path}: field {prefix.rstrip('.') or '?'}: {text}")
  name, rest = m.groups()
  return ValueError(f"{path}: field '{prefix}{name}'{rest}")
