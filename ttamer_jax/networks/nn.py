"""Early-exit networks in ``flax.nnx`` (DESIGN.md section 8).

Every network is a stack of ``n`` blocks with an exit head after each block, and
exposes one uniform per-stage API so that training, profiling and serving can
run it one stage at a time:

  * ``model.num_stages``, ``model.num_classes``, ``model.input_shape`` (shape of
    one sample), ``model.input_kind`` (``"float"`` or ``"int"`` tokens);
  * ``model.embed(x)``: input ``[B, *input_shape]`` -> hidden ``h``;
  * ``model.block(i, h)``: hidden after block ``i`` (``i`` a Python int);
  * ``model.head(i, h)``: ``(logits [B, C], error_logit [B] or None)``;
  * ``model.stage(i, h)``: ``(h', logits, error_logit)``; stage 0 takes the raw input
    (``embed`` is part of stage 0's cost);
  * ``model(x)``: :class:`ExitOutputs` of every exit.

Stage ``i`` in the policy's sense is "block ``i`` + head ``i``". Heads predict
class logits and, optionally, a **learned error logit**: the log-odds that this
exit's prediction is wrong. The error head is an observer: it reads the exit's
features and its sorted class probabilities with gradients stopped, so training
it never changes the classifier (the backbone's accuracy does not depend on the
error-head loss weight), and it can at least reproduce a max-softmax rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.core.struct import pytree_dataclass


@pytree_dataclass
class ExitOutputs:
  """Outputs of every exit for a batch of ``B`` samples.

  Attributes:
    logits: ``[B, n, C]`` class logits of each exit.
    error_logits: ``[B, n]`` learned error log-odds of each exit, or ``None`` when
      the network has no error heads.
  """

  logits: chex.Array
  error_logits: Any = None


class ExitHead(nnx.Module):
  """Class logits and an optional learned error logit from pooled features ``[B, F]``."""

  def __init__(self, features: int, num_classes: int, error_head: bool, *, rngs: nnx.Rngs):
    self.classifier = nnx.Linear(features, num_classes, rngs=rngs)
    # Zero init: the error head starts at p(error) = 1/2 whatever the features.
    self.error = (nnx.Linear(features + num_classes, 1, kernel_init=nnx.initializers.zeros,
                             rngs=rngs) if error_head else None)

  def __call__(self, features):
    logits = self.classifier(features)
    if self.error is None:
      return logits, None
    probs = jnp.sort(jax.nn.softmax(logits, axis=-1), axis=-1)[..., ::-1]
    inputs = jax.lax.stop_gradient(jnp.concatenate([features, probs], axis=-1))
    return logits, self.error(inputs)[..., 0]


def _positive_dims(name: str, dims: Any) -> tuple[int, ...]:
  """A non-empty tuple of positive ints (``ValueError`` naming ``name`` otherwise)."""
  if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
    raise ValueError(f"{name}: expected a sequence of positive integers, got {dims!r}")
  out = tuple(validation.check_positive_int(f"{name}[{i}]", d) for i, d in enumerate(dims))
  if not out:
    raise ValueError(f"{name}: empty")
  return out


class EarlyExitNet(nnx.Module):
  """Base class: subclasses set the metadata and define ``embed``, ``block``, ``head``.

  Subclass attributes (static metadata): ``num_stages``, ``num_classes``,
  ``input_shape`` (tuple), ``input_kind`` (``"float"`` or ``"int"``) and, for
  ``"int"`` inputs, ``vocab_size``.
  """

  input_kind = "float"

  def embed(self, x):
    raise NotImplementedError

  def block(self, i: int, h):
    raise NotImplementedError

  def head(self, i: int, h):
    raise NotImplementedError

  def config(self) -> dict:
    """Constructor arguments (without ``rngs``): ``type(self)(**config, rngs=...)`` rebuilds it."""
    raise NotImplementedError

  @property
  def has_error_head(self) -> bool:
    return self.error_head

  def stage(self, i: int, h):
    """``(h', logits, error_logit)`` of stage ``i``; stage 0 takes the raw input."""
    if i == 0:
      h = self.embed(h)
    h = self.block(i, h)
    logits, err = self.head(i, h)
    return h, logits, err

  def __call__(self, x) -> ExitOutputs:
    h = x
    logits, errs = [], []
    for i in range(self.num_stages):
      h, lg, err = self.stage(i, h)
      logits.append(lg)
      errs.append(err)
    error_logits = None if errs[0] is None else jnp.stack(errs, axis=1)
    return ExitOutputs(logits=jnp.stack(logits, axis=1), error_logits=error_logits)

  def check_input(self, x, name: str = "x") -> np.ndarray:
    """Validates a batch ``[B, *input_shape]`` outside jit; returns it as NumPy.

    Raises:
      ValueError: wrong rank or sample shape, an empty batch, NaN/inf pixels, or
        tokens that are not integers in ``[0, vocab_size)``.
    """
    arr = validation.as_numpy(name, x, kind="int" if self.input_kind == "int" else "float")
    expected = tuple(self.input_shape)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
      raise ValueError(f"{name}: expected shape [batch, {', '.join(map(str, expected))}] for "
                       f"{type(self).__name__}, got {tuple(arr.shape)}")
    if arr.shape[0] < 1:
      raise ValueError(f"{name}: empty batch (shape {tuple(arr.shape)})")
    if self.input_kind == "int":
      bad = (arr < 0) | (arr >= self.vocab_size)
      if bad.any():
        i = int(np.flatnonzero(bad)[0])
        idx = tuple(int(j) for j in np.unravel_index(i, arr.shape))
        raise ValueError(f"{name}{list(idx)} = {arr.flat[i]} is not a token id in "
                         f"[0, {self.vocab_size})")
      return arr.astype(np.int32)
    validation.check_finite(name, arr)
    return validation.to_float(name, arr, np.float32)  # 1e300 must not become inf


# ------------------------------------------------------------------- MLP
class EarlyExitMLP(EarlyExitNet):
  """A residual MLP: block 0 is ``relu(W x)``; block ``i > 0`` is ``h + relu(W LN(h))``.

  Input ``[B, *input_shape]`` is flattened. Every head is linear on the hidden
  vector ``[B, hidden]``.
  """

  def __init__(self, input_shape=(64,), num_classes: int = 10, hidden: int = 128,
               num_blocks: int = 4, error_head: bool = True, *, rngs: nnx.Rngs):
    validation.check_positive_int("num_blocks", num_blocks)
    self.input_shape = _positive_dims("input_shape", input_shape)
    self.num_classes = validation.check_positive_int("num_classes", num_classes)
    self.hidden = validation.check_positive_int("hidden", hidden)
    self.num_stages = int(num_blocks)
    self.error_head = bool(error_head)
    in_features = math.prod(self.input_shape)
    self.linears = nnx.List([nnx.Linear(in_features if i == 0 else hidden, hidden, rngs=rngs)
                             for i in range(num_blocks)])
    self.norms = nnx.List([nnx.LayerNorm(hidden, rngs=rngs) for _ in range(num_blocks - 1)])
    self.heads = nnx.List([ExitHead(hidden, num_classes, error_head, rngs=rngs)
                           for _ in range(num_blocks)])

  def config(self) -> dict:
    return dict(input_shape=self.input_shape, num_classes=self.num_classes, hidden=self.hidden,
                num_blocks=self.num_stages, error_head=self.error_head)

  def embed(self, x):
    return jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)

  def block(self, i, h):
    if i == 0:
      return jax.nn.relu(self.linears[0](h))
    return h + jax.nn.relu(self.linears[i](self.norms[i - 1](h)))

  def head(self, i, h):
    return self.heads[i](h)


# ------------------------------------------------------------------- CNN
class EarlyExitCNN(EarlyExitNet):
  """A small CNN for ``[B, H, W, C]`` images (8x8 digits by default) or ``[B, L, C]``
  signals (MNIST-1D).

  Block ``i`` is a 3x3 convolution (width 5 on signals) to ``channels[i]`` feature
  maps with ReLU, followed by 2x2 (2) average pooling after every odd block
  (8x8 -> 4x4 -> 2x2). Each head concatenates global mean and max pooling
  (``2 * channels[i]`` features) and applies one linear layer, so heads are cheap
  next to blocks.

  Args:
    input_shape: ``(H, W, C)`` of an image or ``(L, C)`` of a signal.
    num_classes: ``C`` classes of every exit's ``[B, C]`` logits.
    channels: feature maps of each block; ``n = len(channels)`` exits.
    error_head: also give each exit a learned error logit ``[B]``.
    rngs: ``nnx.Rngs`` of the initial parameters.
  """

  def __init__(self, input_shape=(8, 8, 1), num_classes: int = 10,
               channels=(16, 32, 32, 64), error_head: bool = True, *, rngs: nnx.Rngs):
    self.input_shape = _positive_dims("input_shape", input_shape)
    if len(self.input_shape) not in (2, 3):
      raise ValueError(f"input_shape: expected (height, width, channels) or (length, channels), "
                       f"got {self.input_shape}")
    self.num_classes = validation.check_positive_int("num_classes", num_classes)
    if isinstance(channels, (list, tuple)) and not channels:
      raise ValueError("channels: empty (need at least one block)")
    self.channels = _positive_dims("channels", channels)
    self.num_stages = len(self.channels)
    self.error_head = bool(error_head)
    ins = (self.input_shape[-1],) + self.channels[:-1]
    kernel = (3, 3) if len(self.input_shape) == 3 else (5,)
    self.convs = nnx.List([nnx.Conv(cin, cout, kernel, rngs=rngs)
                           for cin, cout in zip(ins, self.channels)])
    self.heads = nnx.List([ExitHead(2 * c, num_classes, error_head, rngs=rngs)
                           for c in self.channels])

  def config(self) -> dict:
    return dict(input_shape=self.input_shape, num_classes=self.num_classes,
                channels=self.channels, error_head=self.error_head)

  def embed(self, x):
    return x.astype(jnp.float32)

  def block(self, i, h):
    h = jax.nn.relu(self.convs[i](h))
    spatial = h.shape[1:-1]
    if i % 2 == 1 and all(d > 1 for d in spatial):
      window = (2,) * len(spatial)
      h = nnx.avg_pool(h, window_shape=window, strides=window)
    return h

  def head(self, i, h):
    axes = tuple(range(1, h.ndim - 1))
    pooled = jnp.concatenate([h.mean(axis=axes), h.max(axis=axes)], axis=-1)
    return self.heads[i](pooled)


# ----------------------------------------------------------- Transformer
class EncoderBlock(nnx.Module):
  """Pre-LayerNorm Transformer encoder block (self-attention + MLP, residual)."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads, dim, decode=False, keep_rngs=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, h, mask=None):
    h = h + self.attn(self.norm1(h), mask=mask, deterministic=True)
    return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h))))


class EarlyExitTransformer(EarlyExitNet):
  """A small Transformer encoder for token sequences ``[B, seq_len]`` (int ids).

  Embedding = token + learned position embedding; blocks are pre-LN encoder
  blocks; head ``i`` = LayerNorm, then a linear layer on the pooled sequence:
  ``readout="cls"`` reads a learned [CLS] vector prepended to the sequence (as in
  BERT-style early exits: exit ``i`` sees only what ``i + 1`` attention steps
  gathered into it), ``readout="mean"`` averages over positions. With
  ``window=w`` attention is local (position ``j`` sees positions within ``w`` of
  it, the [CLS] vector sitting at position 0), so the receptive field of exit
  ``i`` is ``w * (i + 1)`` positions: like a CNN, early exits see only part of the
  input. ``window=None`` is full attention.
  """

  input_kind = "int"

  def __init__(self, vocab_size: int, seq_len: int, num_classes: int, dim: int = 64,
               num_heads: int = 4, num_blocks: int = 4, mlp_dim: int = 128,
               error_head: bool = True, readout: str = "cls", window: int | None = None, *,
               rngs: nnx.Rngs):
    if readout not in ("cls", "mean"):
      raise ValueError(f"readout: must be 'cls' or 'mean', got {readout!r}")
    validation.check_positive_int("num_blocks", num_blocks)
    for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_classes", num_classes),
                    ("dim", dim), ("num_heads", num_heads), ("mlp_dim", mlp_dim)):
      validation.check_positive_int(name, v)
    if dim % num_heads:
      raise ValueError(f"dim = {dim} must be a multiple of num_heads = {num_heads}")
    self.readout = readout
    self.window = None if window is None else validation.check_positive_int("window", window)
    self.vocab_size = int(vocab_size)
    self.seq_len = int(seq_len)
    self.input_shape = (self.seq_len,)
    self.num_classes = int(num_classes)
    self.dim = int(dim)
    self.num_heads = int(num_heads)
    self.num_stages = int(num_blocks)
    self.mlp_dim = int(mlp_dim)
    self.error_head = bool(error_head)
    self.tokens = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.positions = nnx.Embed(seq_len, dim, rngs=rngs)
    self.cls = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
                if readout == "cls" else None)
    self.blocks = nnx.List([EncoderBlock(dim, num_heads, mlp_dim, rngs=rngs)
                            for _ in range(num_blocks)])
    self.head_norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(num_blocks)])
    self.heads = nnx.List([ExitHead(dim, num_classes, error_head, rngs=rngs)
                           for _ in range(num_blocks)])

  def config(self) -> dict:
    return dict(vocab_size=self.vocab_size, seq_len=self.seq_len, num_classes=self.num_classes,
                dim=self.dim, num_heads=self.num_heads, num_blocks=self.num_stages,
                mlp_dim=self.mlp_dim, error_head=self.error_head, readout=self.readout,
                window=self.window)

  def embed(self, x):
    h = self.tokens(x) + self.positions(jnp.arange(x.shape[1]))[None]
    if self.cls is None:
      return h
    return jnp.concatenate([jnp.broadcast_to(self.cls[...], (h.shape[0], 1, self.dim)), h], axis=1)

  def block(self, i, h):
    mask = None
    if self.window is not None:
      pos = jnp.arange(h.shape[1])
      mask = (jnp.abs(pos[:, None] - pos[None, :]) <= self.window)[None, None]
    return self.blocks[i](h, mask)

  def head(self, i, h):
    h = self.head_norms[i](h)
    return self.heads[i](h[:, 0] if self.cls is not None else h.mean(axis=1))


MODELS = {cls.__name__: cls for cls in (EarlyExitMLP, EarlyExitCNN, EarlyExitTransformer)}


def build_model(name: str, config: dict, seed: int = 0) -> EarlyExitNet:
  """Builds a registered network from its :meth:`~EarlyExitNet.config` and a seed."""
  if name not in MODELS:
    raise ValueError(f"model: unknown network {name!r} (known: {sorted(MODELS)})")
  try:
    return MODELS[name](**config, rngs=nnx.Rngs(seed))
  except TypeError as e:
    raise ValueError(f"config: does not fit {name} ({e})") from None


# ------------------------------------------------------ batched inference
class StaticOnce:
  """A hashable structure (an ``nnx.GraphDef``, a pytree structure) as a ``jit`` static
  argument, hashed once.

  ``jit`` hashes its static arguments on every call, and hashing a GraphDef walks
  the whole module graph -- more than a small stage kernel costs. Equal structures
  share compiled kernels.
  """

  def __init__(self, value):
    self.value = value
    self._hash = hash(value)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (type(other) is type(self) and self._hash == other._hash
                             and self.value == other.value)


class StaticGraph(StaticOnce):
  """An ``nnx.GraphDef`` as a ``jit`` static argument (:class:`StaticOnce`)."""

  @property
  def graphdef(self):
    return self.value


@functools.partial(jax.jit, static_argnames=("graph",))
def _forward(graph, state, x):
  return nnx.merge(graph.graphdef, state)(x)


def predict(model: EarlyExitNet, x, *, batch_size: int = 512) -> ExitOutputs:
  """All exits of ``model`` on ``x`` ``[N, *input_shape]``, as NumPy, in fixed-size batches.

  The last batch is padded to ``batch_size`` (with copies of its first row), so
  one compilation serves any ``N``.
  """
  x = model.check_input(x)
  batch_size = validation.check_positive_int("batch_size", batch_size)
  batch_size = min(batch_size, x.shape[0])
  graphdef, state = nnx.split(model)
  graph = StaticGraph(graphdef)
  logits, errs = [], []
  for start in range(0, x.shape[0], batch_size):
    xb = x[start:start + batch_size]
    m = xb.shape[0]
    if m < batch_size:
      xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - m, axis=0)])
    out = _forward(graph, state, jnp.asarray(xb))
    logits.append(np.asarray(out.logits)[:m])
    if out.error_logits is not None:
      errs.append(np.asarray(out.error_logits)[:m])
  return ExitOutputs(logits=np.concatenate(logits),
                     error_logits=np.concatenate(errs) if errs else None)
