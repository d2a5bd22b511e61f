"""Safe file handling of every loader and writer (RELIABILITY.md, area "loaders").

Loaders (traces, cascade, policy, checkpoint ``.npz`` files and CSV / Parquet trace
tables) refuse files over the size limit before reading them, archives that would
expand past it (zip bombs), pickled or object arrays (without ever unpickling),
single ``.npy`` arrays and other format versions. Writers are atomic: a write that
fails half-way leaves nothing at the destination (or the old file untouched) and
no temporary file behind.
"""

import builtins
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from flax import nnx

import ttamer_jax as tj

# Internal: the atomic .npz writer (to write hand-made and tampered archives) and the
# module default of the size limit (patched to a small value).
from ttamer_jax.data import archive, files

pd = pytest.importorskip("pandas")

ENV = "TTAMER_MAX_FILE_BYTES"   # documented in docs/cli.md
KINDS = ["traces", "cascade", "policy", "checkpoint"]
TABLES = ["csv", "parquet"]


# ------------------------------------------------------------------ objects
@pytest.fixture(scope="module")
def objects():
  rng = np.random.default_rng(0)
  n, k, num = 3, 4, 40
  cascade = tj.Cascade(values=rng.uniform(size=(n, k)), init=rng.dirichlet(np.ones(k)),
                       trans=rng.dirichlet(np.ones(k), size=(n - 1, k)), costs=rng.uniform(size=n))
  tr = tj.ExitTraces(scores=rng.uniform(size=(num, n)), preds=rng.integers(0, 5, (num, n)),
                    losses=rng.integers(0, 2, (num, n)).astype(float), costs=np.asarray(cascade.costs),
                    signals={"entropy": rng.uniform(size=(num, n))}, labels=rng.integers(0, 5, num))
  policy = tj.fit_cascade(tr, k).recall_policy(0.5)
  model = tj.networks.EarlyExitMLP((8,), 3, hidden=4, num_blocks=2, rngs=nnx.Rngs(0))
  return dict(traces=tr, cascade=cascade, policy=policy, checkpoint=model)


SAVE = {"traces": tj.save_traces, "cascade": tj.save_cascade,
        "policy": lambda p, obj, **kw: tj.save_policy(p, obj, sidecar=False, **kw),
        "checkpoint": tj.save_checkpoint}
LOAD = {"traces": tj.load_traces, "cascade": tj.load_cascade, "policy": tj.load_policy,
        "checkpoint": tj.load_checkpoint, "csv": tj.load_traces_table,
        "parquet": tj.load_traces_table}


def _save(kind, objects, path):
  if kind in TABLES:
    df = tj.traces_to_table(objects["traces"], form="long")
    df.to_csv(path, index=False) if kind == "csv" else df.to_parquet(path)
  else:
    SAVE[kind](path, objects[kind])
  return path


def _name(kind):
  return {"csv": "t.csv", "parquet": "t.parquet"}.get(kind, f"{kind}.npz")


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)


def _forbid_reading(monkeypatch):
  """Every way a loader reads a file's contents raises AssertionError."""
  def boom(*args, **kwargs):
    raise AssertionError("the file was read")

  real_open = builtins.open

  def guarded_open(file, mode="r", *args, **kwargs):
    if "r" in mode and str(file).endswith((".npz", ".csv", ".parquet", ".npy")):
      boom()
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", guarded_open)
  monkeypatch.setattr(np, "load", boom)
  monkeypatch.setattr(pd, "read_csv", boom)
  monkeypatch.setattr(pd, "read_parquet", boom)
  import pyarrow.parquet as pq
  monkeypatch.setattr(pq, "read_metadata", boom)


# ------------------------------------------------------------------ size limit
@pytest.mark.parametrize("kind", KINDS + TABLES)
def test_files_over_the_limit_are_refused_before_reading(tmp_path, monkeypatch, objects, kind):
  if kind == "parquet":
    pytest.importorskip("pyarrow")
  path = _save(kind, objects, tmp_path / _name(kind))
  size = os.path.getsize(path)
  load = LOAD[kind]
  load(path)  # under the default limit: fine
  if kind != "parquet":  # (a Parquet table is also held to its expanded size)
    load(path, max_bytes=size)  # exactly at the limit: fine
  with monkeypatch.context() as m:
    _forbid_reading(m)
    with pytest.raises(ValueError, match=rf"{size} bytes, too large \(the limit is {size - 1} bytes; "
                                         rf"pass max_bytes=\.\.\. or set \${ENV}"):
      load(path, max_bytes=size - 1)
    m.setenv(ENV, str(size - 1))   # the environment variable
    with pytest.raises(ValueError, match=f"the limit is {size - 1} bytes"):
      load(path)
    m.delenv(ENV)
    m.setattr(files, "MAX_FILE_BYTES", 100)   # the module default
    with pytest.raises(ValueError, match="the limit is 100 bytes"):
      load(path)
  monkeypatch.setenv(ENV, "10")
  load(path, max_bytes=1 << 20)  # the argument wins over the environment


@pytest.mark.parametrize("kind", KINDS + ["csv"])
def test_bad_limits_raise_naming_the_setting(tmp_path, monkeypatch, objects, kind):
  path = _save(kind, objects, tmp_path / _name(kind))
  for bad in (0, -1, 1.5, True, "100", [100]):
    with pytest.raises(ValueError, match="max_bytes: must be a positive integer"):
      LOAD[kind](path, max_bytes=bad)
  for bad in ("abc", "0", "-5", "1e9", "12 MB"):
    monkeypatch.setenv(ENV, bad)
    with pytest.raises(ValueError, match=rf"\${ENV} = '{bad}': must be a positive integer"):
      LOAD[kind](path)


# ------------------------------------------------------------------ zip bombs
def _bomb(path, kind, objects, megabytes=8):
  """A valid file of ``kind`` plus a highly compressed member of ``megabytes`` zeros."""
  ok = _save(kind, objects, path.with_name("ok_" + path.name))
  with zipfile.ZipFile(ok) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for name in src.namelist():
      z.writestr(name, src.read(name))
    buf = io.BytesIO()
    np.save(buf, np.zeros(megabytes << 17))   # float64: megabytes MiB
    z.writestr("bomb.npy", buf.getvalue())
  return path


@pytest.mark.parametrize("kind", KINDS)
def test_zip_bombs_are_refused_before_expanding(tmp_path, monkeypatch, objects, kind):
  path = _bomb(tmp_path / "bomb.npz", kind, objects)
  size = os.path.getsize(path)
  assert size < (1 << 20)  # a small file ...
  with pytest.raises(ValueError, match=r"expands to \d+ bytes, too large \(the limit is 1048576 bytes"):
    LOAD[kind](path, max_bytes=1 << 20)   # ... that expands to 8 MiB
  monkeypatch.setattr(files, "MAX_FILE_BYTES", 1 << 20)
  with pytest.raises(ValueError, match="expands to"):
    LOAD[kind](path)


def _patch_central_size(path, member, size):
  """Rewrites the uncompressed size of ``member`` in the zip's central directory."""
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as z:
    pos = z.start_dir
    for info in z.infolist():
      name_len, extra_len, comment_len = struct.unpack("<HHH", raw[pos + 28:pos + 34])
      if info.filename == member:
        raw[pos + 24:pos + 28] = struct.pack("<I", size)
      pos += 46 + name_len + extra_len + comment_len
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["traces", "checkpoint"])
def test_lying_archives_cannot_expand_past_what_they_declare(tmp_path, objects, kind):
  path = _bomb(tmp_path / "liar.npz", kind, objects)
  _patch_central_size(path, "bomb.npy", 1000)   # declares 1000 bytes, holds 8 MiB
  with pytest.raises(ValueError, match="bomb|CRC|EOF"):
    LOAD[kind](path, max_bytes=1 << 20)
  # A member whose .npy header claims a huge array (the data is not there).
  ok = _save(kind, objects, tmp_path / "ok.npz")
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                 "shape": (1 << 60,)})
  with zipfile.ZipFile(ok) as src, zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
    for name in src.namelist():
      z.writestr(name, src.read(name))
    z.writestr("huge.npy", header.getvalue() + b"\0" * 64)
  with pytest.raises(ValueError, match="huge"):
    LOAD[kind](tmp_path / "huge.npz")


@pytest.mark.parametrize("kind", TABLES)
def test_table_bombs_are_refused(tmp_path, monkeypatch, kind):
  if kind == "parquet":
    pytest.importorskip("pyarrow")
  num = 1 << 17
  df = pd.DataFrame(dict(score_0=np.zeros(num), pred_0=np.zeros(num, int), loss_0=np.zeros(num),
                         cost_0=np.zeros(num)))
  path = tmp_path / _name(kind)
  df.to_csv(path, index=False) if kind == "csv" else df.to_parquet(path)
  size = os.path.getsize(path)
  if kind == "parquet":  # a few KB of Parquet hold 4 MiB of float64 columns
    assert size < (1 << 16)
    with pytest.raises(ValueError, match=r"expands to \d+ bytes, too large \(the limit is 1048576"):
      tj.load_traces_table(path, max_bytes=1 << 20)
  else:  # CSV: at least 2 bytes per cell, so the file itself is over the limit
    assert size > (1 << 20)
    with pytest.raises(ValueError, match="too large"):
      tj.load_traces_table(path, max_bytes=1 << 20)
  assert tj.load_traces_table(path).num_samples == num
  (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
  with pytest.raises(ValueError, match="cannot be read as a trace table"):
    tj.load_traces_table(tmp_path / "bad.parquet")


# ------------------------------------------------------------------ pickles
class _Payload:
  """Unpickling this object creates the file ``marker`` (harmless, but visible)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _pickle_files(tmp_path, objects, kind, marker):
  """Files of ``kind`` that hold the payload: in a field, as a whole pickle, as an .npy."""
  ok = _save(kind, objects, tmp_path / f"ok_{kind}.npz")
  with np.load(ok, allow_pickle=False) as z:
    fields = {k: z[k] for k in z.files}
  target = {"traces": "scores", "cascade": "values", "policy": "metadata_json",
            "checkpoint": "__meta__"}[kind]
  evil = np.empty(1, dtype=object)
  evil[0] = _Payload(marker)
  out = []
  for field in (target, "extra"):
    fields_evil = dict(fields, **{field: evil})
    path = tmp_path / f"evil_{kind}_{field}.npz"
    with open(path, "wb") as f:
      np.savez(f, **fields_evil)   # np.savez pickles object arrays
    out.append(path)
  path = tmp_path / f"evil_{kind}.pkl.npz"
  path.write_bytes(pickle.dumps(_Payload(marker)))
  out.append(path)
  path = tmp_path / f"evil_{kind}.npy"
  np.save(path, evil, allow_pickle=True)
  out.append(path)
  return out


def test_the_payload_is_live(tmp_path):
  marker = tmp_path / "marker"
  pickle.loads(pickle.dumps(_Payload(marker))).close()
  assert marker.exists()   # so its absence below means it was never unpickled


@pytest.mark.parametrize("kind", KINDS)
def test_pickled_objects_are_refused_and_never_executed(tmp_path, objects, kind):
  marker = tmp_path / "marker"
  for path in _pickle_files(tmp_path, objects, kind, marker):
    with pytest.raises(ValueError, match="pickle|not a readable|single .npy|corrupt"):
      LOAD[kind](path)
    assert not marker.exists(), path
  with pytest.raises(ValueError, match="object arrays cannot be saved"):
    archive.write_npz_atomic(tmp_path / "obj.npz", {"x": np.array([{}], dtype=object)})
  assert not (tmp_path / "obj.npz").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_single_npy_is_refused(tmp_path, kind):
  for name in ("plain.npy", "plain.npz"):
    with open(tmp_path / name, "wb") as f:
      np.save(f, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="single .npy array"):
      LOAD[kind](tmp_path / name)


@pytest.mark.parametrize("kind", KINDS)
def test_files_hold_no_pickles_and_metadata_is_json(tmp_path, objects, kind):
  path = _save(kind, objects, tmp_path / _name(kind))
  with zipfile.ZipFile(path) as z:
    for name in z.namelist():
      with z.open(name) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        dtype = read_header(f)[2]
      assert not dtype.hasobject, name
  with np.load(path, allow_pickle=False) as z:
    fields = {k: z[k] for k in z.files}
  if kind in ("policy", "checkpoint"):
    meta = fields["metadata_json" if kind == "policy" else "__meta__"]
    assert meta.dtype.kind == "U" and meta.shape == ()
    assert isinstance(json.loads(str(meta)), dict)
  if kind == "policy":  # the sidecar is the same JSON
    meta = tj.save_policy(tmp_path / "side.npz", objects["policy"])
    assert json.loads((tmp_path / "side.json").read_text()) == meta


# ------------------------------------------------------------------ format versions
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", [0, 2, 99])
def test_other_format_versions_are_refused(tmp_path, objects, kind, version):
  if kind == "policy" and version == 2:
    version = 3  # policy files are at version 2 (1 is still read): the next one is unknown
  path = _save(kind, objects, tmp_path / _name(kind))
  if kind == "checkpoint":
    with np.load(path, allow_pickle=False) as z:
      fields = {k: z[k] for k in z.files}
    meta = json.loads(str(fields["__meta__"]))
    meta["format_version"] = version
    fields["__meta__"] = np.asarray(json.dumps(meta))
    with open(path, "wb") as f:
      np.savez(f, **fields)
  else:
    fields = archive.read_npz(path, kind)
    fields["format_version"] = np.asarray(version, np.int64)
    archive.write_npz_atomic(path, fields)
  with pytest.raises(ValueError, match=f"format_version.*{version}.*not supported"):
    LOAD[kind](path)


# ------------------------------------------------------------------ atomic writes
def _half_write(real):
  def write_array(fp, array, *args, **kwargs):
    buf = io.BytesIO()
    real(buf, array, *args, **kwargs)
    fp.write(buf.getvalue()[:len(buf.getvalue()) // 2])   # half a member, then fail
    raise OSError("disk full")
  return write_array


def _fail_replace(src, dst):
  raise OSError("replace failed")


def _interrupt(*args, **kwargs):
  raise KeyboardInterrupt


FAILURES = {"half_write": (lambda m: m.setattr(np.lib.format, "write_array",
                                               _half_write(np.lib.format.write_array)), OSError),
            "replace": (lambda m: m.setattr(os, "replace", _fail_replace), OSError),
            "interrupt": (lambda m: m.setattr(np.lib.format, "write_array", _interrupt),
                          KeyboardInterrupt)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("existing", [False, True])
def test_failed_writes_leave_nothing_behind(tmp_path, monkeypatch, objects, kind, failure, existing):
  path = tmp_path / _name(kind)
  before = b"the previous file"
  if existing:
    path.write_bytes(before)
  patch, exc = FAILURES[failure]
  with monkeypatch.context() as m:
    patch(m)
    with pytest.raises(exc):
      SAVE[kind](path, objects[kind])
  assert os.listdir(tmp_path) == ([path.name] if existing else [])
  if existing:
    assert path.read_bytes() == before
  SAVE[kind](path, objects[kind])   # and a later write succeeds
  assert os.listdir(tmp_path) == [path.name]
  LOAD[kind](path)


class _Unserialisable:
  pass


def _circular():
  d = {}
  d["self"] = d
  return d


def _deep(depth=100_000):
  d = {}
  for _ in range(depth):
    d = {"a": d}
  return d


@pytest.mark.parametrize("kind", ["policy", "checkpoint"])
@pytest.mark.parametrize("metadata", [{"x": _Unserialisable()}, {"x": {1, 2}}, {(1, 2): 3},
                                      _circular(), _deep(), {"x": b"bytes"}])
def test_unserialisable_metadata_raises_and_writes_nothing(tmp_path, monkeypatch, objects, kind,
                                                           metadata):
  path = tmp_path / _name(kind)
  path.write_bytes(b"old")
  with pytest.raises(ValueError, match="metadata: not JSON-serialisable"):
    SAVE[kind](path, objects[kind], metadata=metadata)
  assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == b"old"


def test_bad_policy_metadata_arguments_write_nothing(tmp_path, objects):
  path = tmp_path / "p.npz"
  deployed = objects["policy"]
  for kwargs, field in [(dict(metadata=[1, 2]), "metadata"), (dict(metadata="abc"), "metadata"),
                        (dict(fit_date=20240101), "fit_date"), (dict(lam="x"), "lam"),
                        (dict(lam=float("nan")), "lam"), (dict(lam=1.5), "lam"),
                        (dict(lam=[0.1, 0.2]), "lam")]:
    with pytest.raises(ValueError, match=field):
      tj.save_policy(path, deployed, **kwargs)
  with pytest.raises(ValueError, match="metadata"):  # json itself failing
    import unittest.mock as mock
    with mock.patch.object(json, "dumps", side_effect=TypeError("boom")):
      tj.save_policy(path, deployed)
  assert os.listdir(tmp_path) == []


def test_writers_refuse_wrong_objects(tmp_path, objects):
  for kind, bad in [("traces", objects["cascade"]), ("cascade", objects["traces"]),
                    ("policy", objects["cascade"])]:
    with pytest.raises(ValueError, match=f"{'deployed' if kind == 'policy' else kind}: expected"):
      SAVE[kind](tmp_path / "x.npz", bad)
  assert os.listdir(tmp_path) == []
