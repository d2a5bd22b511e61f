"""Training early-exit networks with optax, and ``.npz`` checkpoints of their parameters.

The loss is the weighted sum over exits of the class cross-entropy, plus
``error_weight`` times the weighted sum of each error head's binary
cross-entropy against "this exit's prediction is wrong" (target computed from the
current logits with gradients stopped):

    L = sum_i w_i CE(logits_i, y) + error_weight * sum_i w_i BCE(err_i, [argmax logits_i != y])

Optimiser: AdamW under a warm-up + cosine-decay schedule, with global-norm
clipping. Everything is seeded: the network's initial parameters by the
``nnx.Rngs`` it was built with, the batch order by ``TrainConfig.seed``; on CPU two
runs with the same seeds give bit-identical parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.core.progress import progress_iter
from ttamer_jax.data.files import atomic_path, check_expanded_size, check_file_size, write_npz
from ttamer_jax.networks.nn import MODELS, EarlyExitNet, StaticGraph, build_model, predict

CHECKPOINT_FORMAT_VERSION = 1
_META_KEY = "__meta__"
_PARAM_PREFIX = "param:"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of :func:`train`.

  Attributes:
    num_steps: optimiser steps.
    batch_size: samples per step (capped at the training-set size); batches are
      drawn from a fresh permutation each epoch, the tail of an epoch is dropped.
    learning_rate: peak learning rate.
    weight_decay: AdamW decoupled weight decay.
    warmup_steps: linear warm-up from 0 to the peak, then cosine decay to
      ``final_lr_fraction * learning_rate``.
    final_lr_fraction: see ``warmup_steps``.
    exit_weights: ``[n]`` non-negative weight of each exit's loss, or ``None`` for
      uniform weights ``1 / n``.
    error_weight: weight of the error heads' loss (ignored without error heads).
    clip_norm: global gradient-norm clip, or ``None``.
    seed: seed of the batch order.
  """

  num_steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  warmup_steps: int = 50
  final_lr_fraction: float = 0.01
  exit_weights: Sequence[float] | None = None
  error_weight: float = 1.0
  clip_norm: float | None = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainHistory:
  """Per-step training curves (on the training batches).

  Attributes:
    loss: ``[steps]`` total loss.
    exit_loss: ``[steps, n]`` cross-entropy of each exit.
    error_loss: ``[steps, n]`` BCE of each error head (zeros without error heads).
    exit_accuracy: ``[steps, n]`` batch accuracy of each exit.
    seconds: wall time of the whole run, compilation included.
    aux_loss: ``[steps]`` the auxiliary term (zeros without ``aux_loss``).
  """

  loss: np.ndarray
  exit_loss: np.ndarray
  error_loss: np.ndarray
  exit_accuracy: np.ndarray
  seconds: float
  aux_loss: np.ndarray | None = None


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """AdamW on a warm-up + cosine schedule, after optional global-norm clipping."""
  warmup = min(config.warmup_steps, max(config.num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_steps, warmup + 1),
      end_value=config.learning_rate * config.final_lr_fraction)
  adamw = optax.adamw(schedule, weight_decay=config.weight_decay)
  if config.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)


def exit_loss(model: EarlyExitNet, x: chex.Array, y: chex.Array, exit_weights: chex.Array,
              error_weight: float, aux_loss: Callable | None = None, aux_lam: Any = None):
  """Joint loss of all exits on one batch; returns ``(loss, aux)``.

  Args:
    model: the network.
    x: ``[B, *input_shape]`` inputs.
    y: ``[B]`` int labels.
    exit_weights: ``[n]`` weights of the exits.
    error_weight: weight of the error-head loss.
    aux_loss: optional ``(logits [B, n, C], labels [B]) -> []`` added to the loss
      (e.g. a weighted :func:`ttamer_jax.serving_loss`); called with a third argument,
      ``aux_lam``, when that is given.
    aux_lam: optional ``[]`` traced value passed to ``aux_loss`` (e.g. this step's
      ``lam``: scheduling it does not recompile).

  Returns:
    ``loss`` ``[]`` and ``aux = {"ce": [n], "error_bce": [n], "accuracy": [n],
    "aux": []}``.
  """
  out = model(x)
  logits = out.logits  # [B, n, C]
  labels = jnp.broadcast_to(y[:, None], logits.shape[:2])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=0)
  wrong = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1) != labels)
  loss = jnp.sum(exit_weights * ce)
  if out.error_logits is None:
    bce = jnp.zeros_like(ce)
  else:
    bce = optax.sigmoid_binary_cross_entropy(out.error_logits, wrong.astype(out.error_logits.dtype))
    bce = bce.mean(axis=0)
    loss = loss + error_weight * jnp.sum(exit_weights * bce)
  if aux_loss is None:
    extra = jnp.zeros((), loss.dtype)
  else:
    extra = aux_loss(logits, y) if aux_lam is None else aux_loss(logits, y, aux_lam)
  return loss + extra, dict(ce=ce, error_bce=bce, accuracy=1.0 - wrong.mean(axis=0), aux=extra)


def _check_config(config: TrainConfig, n: int) -> np.ndarray:
  validation.check_positive_int("num_steps", config.num_steps)
  validation.check_positive_int("batch_size", config.batch_size)
  for name in ("learning_rate", "weight_decay", "error_weight", "final_lr_fraction"):
    value = getattr(config, name)
    if not np.isfinite(value) or value < 0:
      raise ValueError(f"{name} = {value!r} must be finite and >= 0")
  if config.warmup_steps < 0:
    raise ValueError(f"warmup_steps = {config.warmup_steps} must be >= 0")
  if config.clip_norm is not None and not config.clip_norm > 0:
    raise ValueError(f"clip_norm = {config.clip_norm!r} must be > 0 or None")
  if config.exit_weights is None:
    return np.full((n,), 1.0 / n, np.float32)
  weights = validation.as_numpy("exit_weights", config.exit_weights, ndim=1)
  validation.check_shape("exit_weights", weights, (n,))
  validation.check_nonnegative("exit_weights", weights)
  if weights.sum() <= 0:
    raise ValueError("exit_weights: all zero (at least one exit must be trained)")
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _cached_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return make_optimizer(config)


@functools.partial(jax.jit, static_argnames=("graph", "aux_loss"), donate_argnums=(1,))
def _train_step(graph, state, x, y, idx, exit_weights, error_weight, aux_loss=None, aux_lam=None):
  """One AdamW step on the batch ``idx``; ``state`` is the split (network, optimiser)."""
  net, opt = nnx.merge(graph.graphdef, state)
  loss_fn = lambda m: exit_loss(m, x[idx], y[idx], exit_weights, error_weight, aux_loss, aux_lam)
  (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(net)
  opt.update(net, grads)
  return nnx.state((net, opt)), (loss, aux)


def _aux_schedule(aux_lam: Any, num_steps: int, aux_loss: Callable | None) -> np.ndarray:
  """``[num_steps]`` float32 values of ``aux_lam`` (a number, an array or ``step -> value``)."""
  if aux_loss is None:
    raise ValueError("aux_lam: given without aux_loss (it is aux_loss's third argument)")
  if callable(aux_lam):
    values = np.asarray([aux_lam(t) for t in range(num_steps)], np.float64)
  else:
    values = np.broadcast_to(validation.as_numpy("aux_lam", aux_lam), (num_steps,)) \
        if np.ndim(aux_lam) == 0 else validation.as_numpy("aux_lam", aux_lam, ndim=1)
  validation.check_shape("aux_lam", values, (num_steps,))
  bad = ~((values >= 0) & (values <= 1))
  if bad.any():
    t = int(np.flatnonzero(bad)[0])
    raise ValueError(f"aux_lam at step {t} = {float(values[t])!r} is outside [0, 1]")
  return np.asarray(values, np.float32)


def check_labels(model: EarlyExitNet, y: Any, num: int, name: str = "y") -> np.ndarray:
  """``[num]`` int labels in ``[0, num_classes)``; raises ``ValueError`` otherwise."""
  y = validation.as_numpy(name, y, ndim=1, kind="int")
  validation.check_shape(name, y, (num,))
  bad = (y < 0) | (y >= model.num_classes)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{name}[{i}] = {y[i]} is not a class in [0, {model.num_classes})")
  return y.astype(np.int32)


def _batch_order(seed: int, num: int, batch_size: int, num_steps: int) -> np.ndarray:
  """``[num_steps, batch_size]`` sample indices: per-epoch permutations, tails dropped."""
  rng = np.random.default_rng(seed)
  per_epoch = num // batch_size
  epochs = -(-num_steps // per_epoch)
  order = np.concatenate([rng.permutation(num)[:per_epoch * batch_size] for _ in range(epochs)])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size).astype(np.int32)


def train(model: EarlyExitNet, x: Any, y: Any, config: TrainConfig = TrainConfig(), *,
          progress: bool = True, aux_loss: Callable | None = None,
          aux_lam: Any = None) -> TrainHistory:
  """Trains ``model`` in place on ``(x, y)``.

  Args:
    model: an early-exit network (its parameters are updated in place).
    x: ``[N, *input_shape]`` training inputs.
    y: ``[N]`` int labels.
    config: hyper-parameters and the batch-order seed.
    progress: show progress on stderr: a tqdm bar on a terminal, else one plain line
      every few seconds (step, loss, ETA; :func:`ttamer_jax.core.progress.progress_iter`).
    aux_loss: optional extra term ``(logits [B, n, C], labels [B]) -> []`` (a
      hashable function: it is a static argument of the compiled step), or
      ``(logits, labels, lam) -> []`` when ``aux_lam`` is given.
    aux_lam: the third argument of ``aux_loss`` per step: a number, ``[num_steps]``
      values, or a function ``step -> value`` (e.g. a ``lam`` schedule). Each value must
      lie in ``[0, 1]``; it is passed traced, so a schedule compiles one step.

  Returns:
    The :class:`TrainHistory`.
  """
  start = time.perf_counter()
  x = model.check_input(x)
  y = check_labels(model, y, x.shape[0])
  weights = _check_config(config, model.num_stages)
  batch_size = min(config.batch_size, x.shape[0])
  order = _batch_order(config.seed, x.shape[0], batch_size, config.num_steps)

  # The step is jitted once per (network structure, hyper-parameters): the seed only
  # orders the batches, and the cached optimiser makes equal configs share the graph.
  static_config = dataclasses.replace(config, seed=0, exit_weights=tuple(weights.tolist()))
  optimizer = nnx.Optimizer(model, _cached_optimizer(static_config), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  graph = StaticGraph(graphdef)
  x_dev, y_dev, weights = jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights)
  error_weight = jnp.asarray(config.error_weight, jnp.float32)
  lams = None if aux_lam is None else _aux_schedule(aux_lam, config.num_steps, aux_loss)

  bar = progress_iter(range(config.num_steps), desc=f"train {type(model).__name__}",
                      total=config.num_steps, enabled=progress)
  refresh = max(1, config.num_steps // 50)
  metrics = []
  for t in bar:
    state, m = _train_step(graph, state, x_dev, y_dev, order[t], weights, error_weight, aux_loss,
                           None if lams is None else lams[t])
    metrics.append(m)
    if progress and (t % refresh == 0 or t == config.num_steps - 1):
      bar.set_postfix_str(f"loss {float(m[0]):.4f}, last exit acc {float(m[1]['accuracy'][-1]):.3f}")
  nnx.update((model, optimizer), state)
  loss = np.asarray(jnp.stack([m[0] for m in metrics]))
  stacked = {k: np.asarray(jnp.stack([m[1][k] for m in metrics])) for k in metrics[0][1]}
  return TrainHistory(loss=loss, exit_loss=stacked["ce"], error_loss=stacked["error_bce"],
                      exit_accuracy=stacked["accuracy"], seconds=time.perf_counter() - start,
                      aux_loss=stacked["aux"])


def exit_accuracy(model: EarlyExitNet, x: Any, y: Any, *, batch_size: int = 512) -> np.ndarray:
  """``[n]`` accuracy of each exit on ``(x, y)``."""
  x = model.check_input(x)
  y = check_labels(model, y, x.shape[0])
  logits = predict(model, x, batch_size=batch_size).logits
  return (np.argmax(logits, axis=-1) == y[:, None]).mean(axis=0)


# ------------------------------------------------------------ checkpoints
def _param_arrays(model: EarlyExitNet):
  """``(names, leaves, treedef)`` of the ``nnx.Param`` state; names like ``convs/0/kernel``."""
  state = nnx.state(model, nnx.Param)
  with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
  names = []
  for path, _ in with_path:
    parts = []
    for key in path:
      if isinstance(key, jax.tree_util.DictKey):
        parts.append(str(key.key))
      elif isinstance(key, jax.tree_util.SequenceKey):
        parts.append(str(key.idx))
      elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
        parts.append(key.name)
    names.append("/".join(parts))
  return names, [leaf for _, leaf in with_path], treedef


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def save_checkpoint(path: str | os.PathLike, model: EarlyExitNet, *,
                    metadata: dict | None = None) -> None:
  """Writes the network's class, config and parameters to ``path`` (``.npz``).

  The file is written to a temporary file beside ``path`` and moved into place,
  so a failure never leaves a half-written checkpoint. ``metadata`` must be
  JSON-serialisable (e.g. the training config and accuracy).

  Args:
    path: destination ``.npz`` file.
    model: the network.
    metadata: JSON-serialisable extra fields.

  Returns:
    ``None``.
  """
  path = os.fspath(path)
  names, leaves, _ = _param_arrays(model)
  meta = dict(format_version=CHECKPOINT_FORMAT_VERSION, model=type(model).__name__,
              config=_jsonable(model.config()), metadata=metadata or {})
  try:
    meta_json = json.dumps(meta)
  except (TypeError, ValueError, RecursionError) as e:  # ValueError: circular reference
    raise ValueError(f"metadata: not JSON-serialisable ({e})") from None
  arrays = {_PARAM_PREFIX + name: np.asarray(leaf) for name, leaf in zip(names, leaves)}
  arrays[_META_KEY] = np.asarray(meta_json)
  with atomic_path(path, ".npz") as tmp:
    write_npz(tmp, arrays)


def _read_checkpoint(path, max_bytes=None):
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"checkpoint {path!r}: no such file")
  if os.path.isdir(path):
    raise ValueError(f"checkpoint {path!r}: is a directory")
  limit = check_file_size(path, "checkpoint", max_bytes)
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # (an ndarray is no context manager)
      raise ValueError("a single .npy array, not an .npz archive")
    with data:
      check_expanded_size(path, "checkpoint", sum(i.file_size for i in data.zip.infolist()), limit)
      if len(set(data.files)) != len(data.files):  # zip readers disagree on which copy wins
        raise ValueError(f"entry {next(k for i, k in enumerate(data.files) if k in data.files[:i])!r} "
                         "appears more than once")
      files = {k: data[k] for k in data.files}
  except Exception as e:
    raise ValueError(f"checkpoint {path!r}: not a readable .npz file ({e})") from None
  if _META_KEY not in files:
    raise ValueError(f"checkpoint {path!r}: missing {_META_KEY!r} entry "
                     "(not a ttamer_jax checkpoint)")
  try:
    meta = json.loads(str(files.pop(_META_KEY)))
  except (json.JSONDecodeError, RecursionError) as e:
    raise ValueError(f"checkpoint {path!r}: corrupt metadata ({type(e).__name__}: "
                     f"{str(e)[:100]})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"checkpoint {path!r}: corrupt metadata (not a JSON object)")
  version = meta.get("format_version")
  if type(version) is not int or version != CHECKPOINT_FORMAT_VERSION:  # not True, not 1.0
    raise ValueError(f"checkpoint {path!r}: format_version {version!r} is not supported "
                     f"(expected {CHECKPOINT_FORMAT_VERSION})")
  for field in ("model", "config"):
    if field not in meta:
      raise ValueError(f"checkpoint {path!r}: metadata lacks {field!r}")
  other = sorted(k for k in files if not k.startswith(_PARAM_PREFIX))
  if other:
    raise ValueError(f"checkpoint {path!r}: unexpected entry {other[0]!r} (neither "
                     f"{_META_KEY!r} nor a {_PARAM_PREFIX!r} parameter)")
  params = {k[len(_PARAM_PREFIX):]: v for k, v in files.items() if k.startswith(_PARAM_PREFIX)}
  return meta, params


def checkpoint_metadata(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict:
  """The ``{"format_version", "model", "config", "metadata"}`` record of a checkpoint."""
  meta, _ = _read_checkpoint(path, max_bytes)
  return meta


def load_checkpoint(path: str | os.PathLike, model: EarlyExitNet | None = None, *,
                    max_bytes: int | None = None) -> EarlyExitNet:
  """Restores parameters from ``path`` into ``model`` (in place) and returns it.

  With ``model=None`` the network is rebuilt from the stored class and config.
  Files over ``max_bytes`` (default :data:`ttamer_jax.data.files.MAX_FILE_BYTES`) are
  refused before they are read.

  Args:
    path: a file written by :func:`save_checkpoint`.
    model: the network to restore into, or ``None`` to rebuild it.
    max_bytes: refuse larger files.

  Returns:
    The network, parameters restored.

  Raises:
    ValueError: missing or corrupt file, unsupported ``format_version``, a
      different network class or config, missing/unexpected parameters, or a
      parameter with the wrong shape, dtype or non-finite entries.
  """
  path = os.fspath(path)
  meta, params = _read_checkpoint(path, max_bytes)
  if model is None:
    if not isinstance(meta["model"], str) or meta["model"] not in MODELS:
      raise ValueError(f"checkpoint {path!r}: unknown network {meta['model']!r} (metadata 'model')")
    # Parameter shapes first, without allocating: a hand-edited config (hidden = 10**9)
    # must be refused, not built.
    try:
      abstract = nnx.eval_shape(lambda: build_model(meta["model"], meta["config"]))
    except ValueError as e:
      raise ValueError(f"checkpoint {path!r}: metadata 'config' does not build a "
                       f"{meta['model']} ({e})") from None
    _match_params(path, abstract, params)
    model = build_model(meta["model"], meta["config"])
  if type(model).__name__ != meta["model"]:
    raise ValueError(f"checkpoint {path!r}: holds a {meta['model']}, cannot load into a "
                     f"{type(model).__name__}")
  if _jsonable(model.config()) != meta["config"]:
    raise ValueError(f"checkpoint {path!r}: config {meta['config']} differs from the model's "
                     f"{_jsonable(model.config())}")
  names, treedef = _match_params(path, model, params)
  new = []
  for name in names:
    arr = params[name]
    validation.check_finite(f"checkpoint parameter {name!r}", arr)
    new.append(jnp.asarray(arr))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
  return model


def _match_params(path, model, params):
  """``(names, treedef)`` of ``model``'s parameters once ``params`` match them in name,
  shape and dtype (``model`` may be abstract, from ``nnx.eval_shape``)."""
  names, leaves, treedef = _param_arrays(model)
  missing = sorted(set(names) - set(params))
  unexpected = sorted(set(params) - set(names))
  if missing or unexpected:
    raise ValueError(f"checkpoint {path!r}: parameters do not match the model "
                     f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
  for name, leaf in zip(names, leaves):
    arr = params[name]
    if arr.shape != leaf.shape:
      raise ValueError(f"checkpoint {path!r}: parameter {name!r} has shape {arr.shape}, "
                       f"model expects {tuple(leaf.shape)}")
    if arr.dtype != leaf.dtype:
      raise ValueError(f"checkpoint {path!r}: parameter {name!r} has dtype {arr.dtype}, "
                       f"model expects {leaf.dtype}")
  return names, treedef
