"""Saving and loading deployable policies (``.npz`` arrays + JSON metadata).

One ``.npz`` file holds everything serving needs: the discretiser's bin edges,
the policy's arrays (index table, stop table, thresholds, mixture components)
and a JSON metadata document (``metadata_json``): format version, policy
structure, number of stages and states, score signal, ``lam``, fit date, library
version and user fields. Every field carries a SHA-256 checksum; the file is
written atomically (temporary file + ``os.replace``) and loaded with
``allow_pickle=False``. A human-readable copy of the metadata is written beside
it (``<name>.json``); the loader reads only the ``.npz``: the ``.npz`` rules, and
editing the ``.json`` changes nothing (:func:`sidecar_differences` says when the
two disagree; ``ttamer evaluate`` prints a warning line then).

Supported policies: :class:`~ttamer_jax.core.RecallPolicy`,
:class:`~ttamer_jax.core.NoRecallPolicy`, the heuristics of
:mod:`ttamer_jax.core.heuristics` (except the non-deployable hindsight oracle) and
:class:`~ttamer_jax.core.MixturePolicy` of those.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import numpy as np

from ttamer_jax.core import heuristics, validation
from ttamer_jax.core.model import default_float
from ttamer_jax.core.policies import MixturePolicy, NoRecallPolicy, RecallPolicy
from ttamer_jax.data.answers import AnswerModel
from ttamer_jax.data.archive import check_format_version, field_error, read_npz, write_npz_atomic
from ttamer_jax.data.discretise import FEATURES, DeployedPolicy, Discretiser, check_consistent
from ttamer_jax.data.files import write_text

# Version 2 adds the optional answer model (posterior-answer stages) and the
# full cost that normalises the costs; version 1 files are still read.
POLICY_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_KIND = "ttamer_jax.DeployedPolicy"

# type name -> (class, array fields, static fields as {metadata key: attribute}). The
# metadata key "stages" is the file format's name for a heuristic's ``num_stages``.
_STAGES = {"stages": "num_stages"}
_LEAF_TYPES = {
    "recall": (RecallPolicy, ("index", "values", "lam"), {}),
    "no_recall": (NoRecallPolicy, ("stop",), {}),
    "threshold": (heuristics.ThresholdPolicy, ("thresholds",), {"direction": "direction"}),
    "patience": (heuristics.PatiencePolicy, ("patience",), _STAGES),
    "fixed_exit": (heuristics.FixedExitPolicy, ("exit_stage",), _STAGES),
}


def _type_name(policy) -> str:
  if isinstance(policy, MixturePolicy):
    return "mixture"
  for name, (cls, _, _) in _LEAF_TYPES.items():
    if type(policy) is cls:
      return name
  raise ValueError(f"policy: cannot save a {type(policy).__name__} (supported: "
                   f"{sorted(_LEAF_TYPES) + ['mixture']})")


def _encode(policy, prefix: str, arrays: dict) -> dict:
  name = _type_name(policy)
  if name == "mixture":
    arrays[f"{prefix}.prob_second"] = np.asarray(policy.prob_second, np.float64)
    arrays[f"{prefix}.key"] = np.asarray(policy.key, np.uint32)
    return dict(type="mixture", first=_encode(policy.first, f"{prefix}.first", arrays),
                second=_encode(policy.second, f"{prefix}.second", arrays))
  _, fields, static = _LEAF_TYPES[name]
  for f in fields:
    arrays[f"{prefix}.{f}"] = np.asarray(getattr(policy, f))
  return dict(type=name, **{key: getattr(policy, attr) for key, attr in static.items()})


# dtype kinds each stored array may have (checked before any value is looked at).
_REAL = "fiu"
_FIELD_KINDS = {"index": _REAL, "values": _REAL, "lam": _REAL, "stop": "b", "thresholds": _REAL,
                "patience": "iu", "exit_stage": "iu", "prob_second": _REAL, "key": "iu",
                "edges": _REAL, "metadata_json": "U", "weights": _REAL, "mean": _REAL,
                "scale": _REAL, "loss_scale": _REAL}


def _field(arrays, path, key, ndim=None):
  if key not in arrays:
    raise ValueError(f"{path}: field {key!r} is missing")
  arr = arrays[key]
  kinds = _FIELD_KINDS.get(key.rsplit(".", 1)[-1])
  if kinds is not None and arr.dtype.kind not in kinds:
    raise ValueError(f"{path}: field {key!r} has dtype {arr.dtype} (expected "
                     f"{'bool' if kinds == 'b' else 'a string' if kinds == 'U' else 'a real number type'})")
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(f"{path}: field {key!r} must have {ndim} dimensions, got shape {arr.shape}")
  return arr


def _decode(spec: Any, prefix: str, arrays: dict, path: str, used: set):
  if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
    raise ValueError(f"{path}: metadata 'policy' entry for {prefix!r} is malformed")
  kind = spec["type"]
  if kind == "mixture":
    used.update({f"{prefix}.prob_second", f"{prefix}.key"})
    first = _decode(spec.get("first"), f"{prefix}.first", arrays, path, used)
    second = _decode(spec.get("second"), f"{prefix}.second", arrays, path, used)
    prob_second = _field(arrays, path, f"{prefix}.prob_second", 0)
    key = _field(arrays, path, f"{prefix}.key", 1)
    try:
      return MixturePolicy(first=first, second=second, prob_second=prob_second.astype(default_float()),
                           key=key)
    except ValueError as e:  # "key: ..." -> "field 'policy.key': ..."
      raise field_error(path, e, prefix + ".") from None
  if kind not in _LEAF_TYPES:
    raise ValueError(f"{path}: unknown policy type {kind!r} in the metadata")
  cls, fields, static = _LEAF_TYPES[kind]
  used.update(f"{prefix}.{f}" for f in fields)
  values = {f: _field(arrays, path, f"{prefix}.{f}") for f in fields}
  if set(spec) - {"type", *static}:
    raise ValueError(f"{path}: unexpected entries {sorted(set(spec) - {'type', *static})} for {prefix!r}")
  kwargs = {attr: spec.get(key) for key, attr in static.items()}
  if kind == "recall":
    _check_recall(path, prefix, **values)
  elif kind == "no_recall":
    if values["stop"].dtype != bool or values["stop"].ndim != 2:
      raise ValueError(f"{path}: field '{prefix}.stop' must be a 2-d bool table, got "
                       f"{values['stop'].dtype}{values['stop'].shape}")
  try:
    return cls(**values, **kwargs)
  except ValueError as e:  # "thresholds: ..." -> "field 'policy.thresholds': ..."
    for key, attr in static.items():  # named as in the file
      if str(e).startswith(attr) and key != attr:
        e = ValueError(key + str(e)[len(attr):])
    raise field_error(path, e, prefix + ".") from None


def _check_recall(path, prefix, index, values, lam):
  if index.ndim != 2 or values.shape != index.shape:
    raise ValueError(f"{path}: fields '{prefix}.index' {index.shape} and '{prefix}.values' "
                     f"{values.shape} must be equal [n, K] tables")
  if np.isnan(index).any():
    raise ValueError(f"{path}: field '{prefix}.index' holds NaN")
  validation.check_nonnegative(f"{path}: field '{prefix}.values'", values)
  if lam.shape != ():
    raise ValueError(f"{path}: field '{prefix}.lam' must be a scalar, got shape {lam.shape}")
  try:
    validation.check_lam(lam)
  except ValueError as e:
    raise field_error(path, e, prefix + ".") from None


def _policy_lam(policy):
  if isinstance(policy, RecallPolicy):
    return float(policy.lam)
  if isinstance(policy, MixturePolicy):
    lams = [_policy_lam(policy.first), _policy_lam(policy.second)]
    return lams if None not in lams else None
  return None


def _recall_lams(policy, prefix: str = "policy") -> list[tuple[str, float]]:
  """``(field, lam)`` of every recall policy in ``policy`` (a mixture's leaves in order)."""
  if isinstance(policy, RecallPolicy):
    return [(f"{prefix}.lam", float(policy.lam))]
  if isinstance(policy, MixturePolicy):
    return _recall_lams(policy.first, prefix + ".first") + _recall_lams(policy.second,
                                                                        prefix + ".second")
  return []


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _same_lam(a: float, b: float) -> bool:
  """Equal as stored: the arrays hold lam in float32 (the JSON keeps the float64)."""
  return np.float32(a) == np.float32(b)


def _same_lams(recorded: Any, expected: Any) -> bool:
  """``recorded`` (from JSON) has the nesting of ``expected`` (:func:`_policy_lam`) and
  equal numbers."""
  if isinstance(expected, list):
    return (isinstance(recorded, list) and len(recorded) == len(expected)
            and all(_same_lams(a, b) for a, b in zip(recorded, expected)))
  return expected is not None and _is_number(recorded) and _same_lam(recorded, expected)


def recorded_lam_problem(lam: Any, policy) -> str | None:
  """Why a recorded ``lam`` contradicts ``policy`` (``None`` when it does not).

  A recall policy decides with the ``lam`` it was solved at (its ``lam`` field), so
  the file must record that one: a report of ``J`` at another ``lam`` would describe
  a policy that acts otherwise. ``null`` is always allowed; a mixture of two recall
  policies may record the list of their ``lam`` s (what :func:`save_policy` writes).
  """
  if lam is None:
    return None
  if isinstance(lam, list):
    expected = _policy_lam(policy)
    if _same_lams(lam, expected):
      return None
    return (f"lam = {json.dumps(lam)[:60]} is not the list of this mixture's lams "
            f"({json.dumps(expected)[:60]})")
  if not _is_number(lam) or not 0 <= lam <= 1:
    return f"lam = {json.dumps(lam)[:60]} must be null or a number in [0, 1]"
  for field, value in _recall_lams(policy):
    if not _same_lam(lam, value):
      return (f"lam = {lam!r} disagrees with field {field!r} = {value!r}, the lam the policy "
              "decides with")
  return None


def full_cost_problem(full_cost: Any) -> str | None:
  """Why a recorded ``full_cost`` is invalid: it must be ``null`` or a finite number >= 0."""
  if full_cost is None or (_is_number(full_cost) and full_cost >= 0):
    return None
  return f"full_cost = {json.dumps(full_cost)[:60]} must be null or a finite number >= 0"


def default_fit_date() -> str:
  """Now (UTC, ISO 8601), or ``$SOURCE_DATE_EPOCH`` when set (the reproducible-builds
  convention), so that re-running a seeded job writes a bit-identical policy file."""
  epoch = os.environ.get("SOURCE_DATE_EPOCH")
  if epoch:
    try:
      return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).isoformat()
    except (ValueError, OverflowError, OSError):
      raise ValueError(f"$SOURCE_DATE_EPOCH = {epoch!r}: must be an integer number of seconds "
                       "since 1970-01-01 UTC") from None
  return datetime.datetime.now(datetime.timezone.utc).isoformat()


def sidecar_path(path: str | os.PathLike) -> str:
  """``policy.npz -> policy.json``: the human-readable metadata copy."""
  base, ext = os.path.splitext(os.fspath(path))
  return (base if ext == ".npz" else os.fspath(path)) + ".json"


def sidecar_differences(path: str | os.PathLike, metadata: dict) -> list[str]:
  """How the ``.json`` copy beside the policy file ``path`` disagrees with the
  ``metadata`` the ``.npz`` holds (from :func:`load_policy` ``with_metadata=True``).

  Returns one short description per differing top-level key (``"lam: 0.5 in
  policy.json, 0.9 in policy.npz"``), or one saying the copy is not valid JSON;
  ``[]`` when there is no copy or it agrees. The ``.npz`` rules: :func:`load_policy`
  never reads the copy, so a hand edit of it changes nothing.
  """
  side = sidecar_path(path)
  if os.fspath(side) == os.fspath(path) or not os.path.isfile(side):
    return []
  name, npz = os.path.basename(side), os.path.basename(os.fspath(path))
  # A faithful copy is the metadata's own text (plus a newline): read no more than a
  # few times that, so a huge file beside the policy cannot exhaust memory.
  limit = 4 * len(json.dumps(metadata, indent=2, sort_keys=True).encode()) + 4096
  size = os.path.getsize(side)
  if size > limit:
    return [f"{name} is {size} bytes, far more than the metadata it copies (not read)"]
  try:
    with open(side, encoding="utf-8") as f:
      copy = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    return [f"{name} is not a readable JSON document ({type(e).__name__})"]
  if not isinstance(copy, dict):
    return [f"{name} does not hold a JSON object"]
  show = lambda v: json.dumps(v, sort_keys=True)[:60]
  out = []
  for key in sorted(set(copy) | set(metadata)):
    if key not in copy:
      out.append(f"{key}: missing in {name}, {show(metadata[key])} in {npz}")
    elif key not in metadata:
      out.append(f"{key}: {show(copy[key])} in {name}, absent from {npz}")
    elif copy[key] != metadata[key]:
      out.append(f"{key}: {show(copy[key])} in {name}, {show(metadata[key])} in {npz}")
  return out


def _encode_answers(model: AnswerModel | None, arrays: dict) -> dict | None:
  if model is None:
    return None
  for f in ("weights", "mean", "scale", "loss_scale"):
    arrays[f"answers.{f}"] = np.asarray(getattr(model, f))
  return dict(score_name=model.score_name, unit_scores=bool(model.unit_scores))


def _decode_answers(spec: Any, arrays: dict, path: str, used: set) -> AnswerModel | None:
  if spec is None:
    return None
  if not isinstance(spec, dict) or set(spec) != {"score_name", "unit_scores"} or not isinstance(
      spec["score_name"], str) or not isinstance(spec["unit_scores"], bool):
    raise ValueError(f"{path}: metadata 'answers' must be null or "
                     "{score_name: str, unit_scores: bool}")
  fields = {f: _field(arrays, path, f"answers.{f}") for f in ("weights", "mean", "scale",
                                                               "loss_scale")}
  used.update(f"answers.{f}" for f in fields)
  w = fields["weights"]
  if w.ndim != 2 or fields["mean"].shape != w.shape or fields["scale"].shape != w.shape or (
      fields["loss_scale"].shape != ()):
    raise ValueError(f"{path}: fields 'answers.*' must be [P, D] weights, mean and scale and a "
                     f"scalar loss_scale, got {w.shape}, {fields['mean'].shape}, "
                     f"{fields['scale'].shape}, {fields['loss_scale'].shape}")
  for f, arr in fields.items():
    validation.check_finite(f"{path}: field 'answers.{f}'", arr)
  if np.any(fields["scale"] <= 0) or float(fields["loss_scale"]) <= 0:
    raise ValueError(f"{path}: fields 'answers.scale' and 'answers.loss_scale' must be > 0")
  return AnswerModel(**fields, score_name=spec["score_name"], unit_scores=spec["unit_scores"])


def save_policy(path: str | os.PathLike, deployed: DeployedPolicy, *, lam: Any = None,
                fit_date: str | None = None, metadata: dict | None = None,
                sidecar: bool = True, full_cost: float | None = None) -> dict:
  """Saves a :class:`DeployedPolicy` to ``path`` (``.npz``) and returns its metadata.

  Args:
    path: destination file.
    deployed: the policy, its discretiser and score signal.
    lam: recorded trade-off weight (default: taken from the policy when it has one).
    fit_date: ISO-8601 date of the fit (default: :func:`default_fit_date`, i.e. now
      in UTC or ``$SOURCE_DATE_EPOCH``).
    metadata: extra JSON-serialisable user fields (stored under ``"user"``).
    sidecar: also write the metadata as ``<name>.json`` for humans.
    full_cost: the mean cost of running every stage on the fitting traces (raw
      units), recorded as ``full_cost``: the policy's costs were shares of it, so
      its ``lam`` is unit-free.

  Returns:
    The metadata written (a JSON-serialisable ``dict``: format version, policy
    structure, ``num_stages``, ``num_states``, ``lam``, fit date, user fields).
  """
  validation.refuse_traced("save_policy", "write files outside jit (or from jax.debug.callback)",
                           deployed=deployed, lam=lam, full_cost=full_cost)
  if not isinstance(deployed, DeployedPolicy):
    raise ValueError(f"deployed: expected a DeployedPolicy, got {type(deployed).__name__}")
  n, k = check_consistent(deployed, "deployed")
  if metadata is not None and not isinstance(metadata, dict):
    raise ValueError(f"metadata: expected a dict of JSON-serialisable user fields, got "
                     f"{type(metadata).__name__}")
  if fit_date is not None and not isinstance(fit_date, str):
    raise ValueError(f"fit_date: expected an ISO-8601 string, got {type(fit_date).__name__}")
  if lam is not None:
    validation.check_scalar_lam(lam)
    problem = recorded_lam_problem(float(lam), deployed.policy)
    if problem:
      raise ValueError(f"lam: {problem} (the file would contradict itself; pass lam=None)")
  if full_cost is not None:
    full_cost = validation.as_nonnegative_scalar("full_cost", full_cost)
  arrays: dict[str, np.ndarray] = {}
  spec = _encode(deployed.policy, "policy", arrays)
  answers = _encode_answers(deployed.answers, arrays)
  from ttamer_jax._version import __version__
  meta = dict(format_version=POLICY_FORMAT_VERSION, kind=_KIND, policy=spec, num_stages=n,
              num_states=k, score_name=deployed.score_name, feature=deployed.discretiser.feature,
              lam=_policy_lam(deployed.policy) if lam is None else float(lam),
              fit_date=fit_date or default_fit_date(), answers=answers, full_cost=full_cost,
              cost_unit=("shares of full_cost, the mean cost of running every stage (lam is "
                         "unit-free)") if full_cost is not None else None,
              library_version=__version__, user=dict(metadata or {}))
  try:
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError, RecursionError) as e:
    raise ValueError(f"metadata: not JSON-serialisable ({e})") from None
  arrays.update(format_version=np.asarray(POLICY_FORMAT_VERSION, np.int64), kind=np.asarray(_KIND),
                metadata_json=np.asarray(text), edges=np.asarray(deployed.discretiser.edges))
  write_npz_atomic(path, arrays)
  if sidecar:
    write_text(sidecar_path(path), text + "\n")
  return meta


def load_policy(path: str | os.PathLike, *, num_stages: int | None = None,
                with_metadata: bool = False, max_bytes: int | None = None):
  """Loads a policy saved by :func:`save_policy`.

  Args:
    path: the ``.npz`` file.
    num_stages: the number of stages the caller serves; a file built for another
      number raises ``ValueError``.
    with_metadata: also return the metadata dict.
    max_bytes: size limit (default :data:`ttamer_jax.data.files.MAX_FILE_BYTES`); larger
      files are refused before they are read.

  Returns:
    :class:`DeployedPolicy` (or ``(DeployedPolicy, metadata)``). Corrupt files, a
    wrong format version, inconsistent fields or a stage mismatch raise
    ``ValueError`` naming the field.

  Only the ``.npz`` is read: the metadata is its ``metadata_json`` field, and the
  ``.json`` copy beside it is for people (editing it changes nothing;
  :func:`sidecar_differences` lists where it disagrees).
  """
  path = os.fspath(path)
  arrays = read_npz(path, "policy", max_bytes=max_bytes)
  check_format_version(path, arrays, READABLE_VERSIONS, _KIND, "policy")
  text = _field(arrays, path, "metadata_json", 0)
  try:
    meta = json.loads(str(text))
  except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
    raise ValueError(f"{path}: field 'metadata_json' is not valid JSON "
                     f"({type(e).__name__}: {str(e)[:100]})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: field 'metadata_json' must hold a JSON object")
  for key in ("format_version", "policy", "num_stages", "num_states", "score_name", "feature"):
    if key not in meta:
      raise ValueError(f"{path}: metadata field {key!r} is missing")
  if isinstance(meta["format_version"], bool) or meta["format_version"] != int(arrays["format_version"]):
    raise ValueError(f"{path}: metadata format_version {meta['format_version']!r} disagrees with "
                     f"field 'format_version' = {int(arrays['format_version'])}")
  if meta["feature"] not in FEATURES:
    raise ValueError(f"{path}: metadata feature {meta['feature']!r} is not one of {FEATURES}")
  if not isinstance(meta["score_name"], str):
    raise ValueError(f"{path}: metadata score_name must be a string")
  used = {"format_version", "kind", "metadata_json", "edges"}
  try:
    policy = _decode(meta["policy"], "policy", arrays, path, used)
  except ValueError as e:
    raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  answers = _decode_answers(meta.get("answers"), arrays, path, used)
  extra = sorted(set(arrays) - used)
  if extra:
    raise ValueError(f"{path}: unexpected field {extra[0]!r}")
  edges = _field(arrays, path, "edges", 2)
  try:
    disc = Discretiser(edges=edges, feature=meta["feature"])
  except ValueError as e:
    raise field_error(path, e) from None
  deployed = DeployedPolicy(policy=policy, discretiser=disc, score_name=meta["score_name"],
                            answers=answers)
  n, k = check_consistent(deployed, path)
  for problem in (recorded_lam_problem(meta.get("lam"), policy),
                  full_cost_problem(meta.get("full_cost"))):
    if problem:  # the arrays decide how the policy acts: a report must not say otherwise
      raise ValueError(f"{path}: metadata {problem} (was the file edited? "
                       "save the policy again)")
  if (n, k) != (meta["num_stages"], meta["num_states"]):
    raise ValueError(f"{path}: metadata says {meta['num_stages']} stages x {meta['num_states']} "
                     f"states, the arrays hold {n} x {k}")
  if num_stages is not None and num_stages != n:
    raise ValueError(f"{path}: policy built for {n} stages, but {num_stages} were requested "
                     "(num_stages mismatch)")
  return (deployed, meta) if with_metadata else deployed
