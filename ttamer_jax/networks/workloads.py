"""Built-in workloads: data that ships with an installed package or is generated.

Nothing is downloaded. Each builder returns train / calibration / test splits
ready for the pipeline (train the network -> traces on calibration -> fit a
policy -> evaluate on test):

  * :func:`digits`: scikit-learn's bundled 8x8 handwritten digits (1797 real
    images) with an early-exit CNN or MLP;
  * :func:`sequences`: a generated token-sequence task whose difficulty varies per
    sample, with an early-exit Transformer;

Trace-only synthetic workloads (no network) are in :mod:`ttamer_jax.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

import numpy as np
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.networks import training
from ttamer_jax.networks.nn import EarlyExitCNN, EarlyExitMLP, EarlyExitNet, EarlyExitTransformer
from ttamer_jax.networks.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a labelled data set.

  Attributes:
    x: ``[N, *input_shape]`` inputs (float32 images or int32 tokens).
    y: ``[N]`` int32 labels.
    info: ``{name: [N]}`` per-sample metadata (e.g. ``"kind"`` of a sequence).
  """

  x: np.ndarray
  y: np.ndarray
  info: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True)
class Workload:
  """A data set with the network and training recipe that go with it.

  Attributes:
    name: workload name.
    train: split the network is trained on.
    calibration: split the exit traces (and the policy) are fitted on.
    test: held-out split the policy is evaluated on.
    num_classes: number of classes.
    make_model: ``seed -> EarlyExitNet`` building a fresh, untrained network.
    train_config: the default :class:`~ttamer_jax.TrainConfig`.
  """

  name: str
  train: Split
  calibration: Split
  test: Split
  num_classes: int
  make_model: Callable[[int], EarlyExitNet]
  train_config: TrainConfig


def _check_fractions(fractions) -> np.ndarray:
  fr = validation.as_numpy("fractions", fractions, ndim=1)
  validation.check_shape("fractions", fr, (3,))
  if np.any(~np.isfinite(fr)) or np.any(fr <= 0) or abs(fr.sum() - 1) > 1e-6:
    raise ValueError(f"fractions: expected three positive numbers summing to 1, got {tuple(fr)}")
  return fr


def _stratified_split(y: np.ndarray, fractions: np.ndarray, seed: int):
  """Index arrays (train, calibration, test), each holding ``fractions`` of every class."""
  rng = np.random.default_rng(seed)
  parts = ([], [], [])
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    cut1 = int(round(fractions[0] * len(idx)))
    cut2 = cut1 + int(round(fractions[1] * len(idx)))
    for part, chunk in zip(parts, (idx[:cut1], idx[cut1:cut2], idx[cut2:])):
      part.append(chunk)
  return tuple(np.sort(np.concatenate(p)) for p in parts)


# ---------------------------------------------------------------- digits
def digits(*, seed: int = 0, model: str = "cnn", fractions=(0.6, 0.2, 0.2)) -> Workload:
  """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), stratified splits.

  Pixels are scaled from ``0..16`` to ``[0, 1]`` and shaped ``[N, 8, 8, 1]`` (the
  MLP flattens them). The split is stratified by class and drawn from ``seed``.

  Args:
    seed: seed of the split.
    model: ``"cnn"`` (:class:`~ttamer_jax.EarlyExitCNN`, 4 exits) or ``"mlp"``
      (:class:`~ttamer_jax.EarlyExitMLP`, 4 exits).
    fractions: train / calibration / test fractions.
  """
  from sklearn.datasets import load_digits  # bundled with scikit-learn, no download.

  if model not in ("cnn", "mlp"):
    raise ValueError(f"model: must be 'cnn' or 'mlp', got {model!r}")
  fractions = _check_fractions(fractions)
  data = load_digits()
  x = (data.images.astype(np.float32) / 16.0)[..., None]
  y = data.target.astype(np.int32)
  splits = [Split(x=x[i], y=y[i]) for i in _stratified_split(y, fractions, seed)]
  if model == "cnn":
    make = lambda s: EarlyExitCNN((8, 8, 1), 10, channels=(32, 64, 64, 128), rngs=nnx.Rngs(s))
    config = TrainConfig(num_steps=1500, batch_size=64, learning_rate=3e-3, weight_decay=1e-4,
                         warmup_steps=100)
  else:
    make = lambda s: EarlyExitMLP((8, 8, 1), 10, hidden=128, num_blocks=4, rngs=nnx.Rngs(s))
    config = TrainConfig(num_steps=1500, batch_size=64, learning_rate=2e-3, weight_decay=1e-4,
                         warmup_steps=100)
  return Workload(name=f"digits-{model}", train=splits[0], calibration=splits[1], test=splits[2],
                  num_classes=10, make_model=make, train_config=config)


# ------------------------------------------------------------- MNIST-1D
def mnist1d(*, seed: int = 0, num_samples: int = 16000, fractions=(0.5, 0.25, 0.25)) -> Workload:
  """MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package.

  Ten digit templates as 40-step 1-D signals under random padding, translation,
  shear, scaling and correlated noise: small enough for a CPU, hard enough that
  models separate (published test accuracy: logistic regression ~32%, MLP ~68%,
  CNN ~94%). Generated with ``mnist1d.data.make_dataset`` (no download), then
  split stratified into train / calibration / test; the network is an
  :class:`~ttamer_jax.EarlyExitCNN` over ``[40, 1]`` signals with 4 exits.

  Args:
    seed: seed of the generator and the split.
    num_samples: requests generated (a multiple of 10).
    fractions: train / calibration / test fractions.
  """
  try:
    from mnist1d.data import get_dataset_args, make_dataset
  except ImportError:
    raise ImportError("the MNIST-1D workload needs the mnist1d package (pip install mnist1d)") from None
  num = validation.check_positive_int("num_samples", num_samples)
  if num < 100:
    raise ValueError(f"num_samples = {num} must be >= 100")
  fractions = _check_fractions(fractions)
  args = get_dataset_args()
  args.num_samples, args.seed, args.train_split = num, int(seed), 1.0 - 1.0 / num
  state = np.random.get_state()  # make_dataset seeds NumPy's global generator: restore it
  try:
    data = make_dataset(args)
  finally:
    np.random.set_state(state)
  x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[..., None]
  y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
  splits = [Split(x=x[i], y=y[i]) for i in _stratified_split(y, fractions, seed)]
  make = lambda s: EarlyExitCNN((40, 1), 10, channels=(32, 64, 64, 128), rngs=nnx.Rngs(s))
  config = TrainConfig(num_steps=3000, batch_size=128, learning_rate=3e-3, weight_decay=1e-4,
                       warmup_steps=150)
  return Workload(name="mnist1d-cnn", train=splits[0], calibration=splits[1], test=splits[2],
                  num_classes=10, make_model=make, train_config=config)


# ------------------------------------------------------------- sequences
SEQ_KINDS = ("marker", "pair", "decoy")


def sequence_vocab(num_content: int = 16, num_classes: int = 4) -> dict:
  """Token ids of the sequence task: content ``0..num_content-1``, then markers, then Q."""
  markers = num_content + np.arange(num_classes)
  query = num_content + num_classes
  return dict(num_content=num_content, num_classes=num_classes, markers=markers, query=query,
              vocab_size=query + 1)


def sequence_label(tokens: np.ndarray, num_content: int = 16, num_classes: int = 4) -> np.ndarray:
  """The task's labelling rule applied to ``[N, L]`` tokens (a reference decoder).

  Content token ``t`` has class ``t % C``. If the sequence holds class markers,
  the label is the class of the *first* one (lowest position); otherwise it is the
  class of the token right after the query token ``Q``.
  """
  v = sequence_vocab(num_content, num_classes)
  tokens = np.asarray(tokens)
  labels = np.full(tokens.shape[0], -1, np.int64)
  for r, row in enumerate(tokens):
    markers = np.flatnonzero((row >= num_content) & (row < num_content + num_classes))
    if markers.size:
      labels[r] = row[markers[0]] - num_content
    else:
      labels[r] = row[np.flatnonzero(row == v["query"])[0] + 1] % num_classes
  return labels.astype(np.int32)


def _generate_sequences(rng: np.random.Generator, num: int, seq_len: int, num_content: int,
                        num_classes: int, mix: np.ndarray):
  v = sequence_vocab(num_content, num_classes)
  tokens = rng.integers(0, num_content, size=(num, seq_len))
  kind = rng.choice(len(SEQ_KINDS), size=num, p=mix)
  labels = rng.integers(0, num_classes, size=num)

  def content_of_class(c):
    return int(c + num_classes * rng.integers(0, num_content // num_classes))

  for r in range(num):
    row, y = tokens[r], int(labels[r])
    p = int(rng.integers(0, seq_len - 1))  # The Q pair (p, p + 1); every sample has one.
    free = [j for j in range(seq_len) if j not in (p, p + 1)]
    if SEQ_KINDS[kind[r]] == "pair":
      row[p], row[p + 1] = v["query"], content_of_class(y)
      continue
    row[p], row[p + 1] = v["query"], content_of_class(rng.integers(0, num_classes))
    if SEQ_KINDS[kind[r]] == "marker":
      row[rng.choice(free)] = v["markers"][y]
    else:  # decoy: the first marker decides, a later one of another class distracts.
      first, second = np.sort(rng.choice(free, size=2, replace=False))
      row[first] = v["markers"][y]
      row[second] = v["markers"][(y + rng.integers(1, num_classes)) % num_classes]
  return tokens.astype(np.int32), labels.astype(np.int32), kind.astype(np.int32)


def evidence_position(tokens: np.ndarray, num_content: int = 16,
                      num_classes: int = 4) -> np.ndarray:
  """``[N]`` position of the token that decides each label (first marker, else the token after Q).

  With local attention of window ``w`` and a [CLS] read-out, exit ``i`` can only
  see positions ``< w * (i + 1)`` of the sequence, so this is the per-sample depth
  the task needs.
  """
  v = sequence_vocab(num_content, num_classes)
  tokens = np.asarray(tokens)
  pos = np.zeros(tokens.shape[0], np.int32)
  for r, row in enumerate(tokens):
    markers = np.flatnonzero((row >= num_content) & (row < num_content + num_classes))
    pos[r] = markers[0] if markers.size else np.flatnonzero(row == v["query"])[0] + 1
  return pos


def sequences(*, seed: int = 0, num_samples: int = 16000, seq_len: int = 12,
              num_content: int = 16, num_classes: int = 4, mix=(0.45, 0.35, 0.2),
              fractions=(0.6, 0.2, 0.2), dim: int = 32, num_blocks: int = 4,
              window: int = 3) -> Workload:
  """A generated sequence-classification task whose difficulty varies per sample.

  Tokens: content tokens ``0..num_content-1`` (content token ``t`` has class
  ``t % C``), class markers ``M_0..M_{C-1}`` and a query token ``Q``. Every
  sequence holds exactly one ``Q`` followed by a content token. The label is the
  class of the first marker if there is one, else the class of the token after
  ``Q`` (:func:`sequence_label` is this rule written out as a decoder). Samples
  come in three kinds (``mix`` = their probabilities):

  * **marker**: one marker ``M_y`` at a uniform position; label ``y``.
  * **pair**: no marker; label = class of the token after ``Q`` (a relation
    between neighbouring positions: one more attention step than a marker).
  * **decoy**: two markers of different classes; the first decides.

  Why difficulty varies: the network (:class:`~ttamer_jax.EarlyExitTransformer`
  with a [CLS] read-out and local attention of ``window`` positions) lets exit
  ``i`` see only the first ``window * (i + 1)`` tokens, like a CNN's receptive
  field. The deciding token sits at a uniform position
  (:func:`evidence_position`), so some samples are answered by the first exit and
  some need the full depth; an early exit that sees no evidence yet can only
  guess, and can tell (low confidence).

  Why deeper exits sometimes over-think: an early exit that sees only a decoy
  sample's first marker is right; a deeper one also sees the second marker and
  must weigh position against content, and sometimes follows the distractor.
  Likewise an exit that sees the ``Q`` pair but not yet a (decisive) marker
  further on answers from the pair.

  ``info["kind"]`` is each sample's kind (an index into :data:`SEQ_KINDS`);
  ``info["position"]`` the position of its deciding token.
  """
  num_samples = validation.check_positive_int("num_samples", num_samples)
  seq_len = validation.check_positive_int("seq_len", seq_len)
  num_classes = validation.check_positive_int("num_classes", num_classes)
  if seq_len < 4:
    raise ValueError(f"seq_len = {seq_len} must be >= 4 (a Q pair and two markers must fit)")
  if num_classes < 2 or num_content % num_classes or num_content < num_classes:
    raise ValueError(f"num_content = {num_content} must be a positive multiple of "
                     f"num_classes = {num_classes} >= 2")
  mix = validation.as_numpy("mix", mix, ndim=1)
  validation.check_shape("mix", mix, (len(SEQ_KINDS),))
  validation.check_stochastic("mix", mix)
  fractions = _check_fractions(fractions)
  rng = np.random.default_rng(seed)
  tokens, y, kind = _generate_sequences(rng, num_samples, seq_len, num_content, num_classes, mix)
  position = evidence_position(tokens, num_content, num_classes)
  # Stratify by kind, so every split sees every kind in proportion.
  splits = [Split(x=tokens[i], y=y[i], info={"kind": kind[i], "position": position[i]})
            for i in _stratified_split(kind, fractions, seed)]
  vocab_size = sequence_vocab(num_content, num_classes)["vocab_size"]
  make = lambda s: EarlyExitTransformer(vocab_size, seq_len, num_classes, dim=dim, num_heads=4,
                                        num_blocks=num_blocks, mlp_dim=2 * dim, window=window,
                                        rngs=nnx.Rngs(s))
  config = TrainConfig(num_steps=1500, batch_size=128, learning_rate=2e-3, weight_decay=1e-4,
                       warmup_steps=100)
  return Workload(name="sequences", train=splits[0], calibration=splits[1], test=splits[2],
                  num_classes=num_classes, make_model=make, train_config=config)


# -------------------------------------------------------------- training
def trained_model(workload: Workload, *, seed: int = 0, checkpoint: str | None = None,
                  config: TrainConfig | None = None,
                  progress: bool = True) -> tuple[EarlyExitNet, dict]:
  """The workload's network, trained on its train split, or loaded from ``checkpoint``.

  If ``checkpoint`` names an existing file it is loaded (a ``ValueError`` if it does
  not fit the workload's network); otherwise the network is built from ``seed``,
  trained with ``config`` (default: ``workload.train_config``) and, if
  ``checkpoint`` is given, saved there.

  Returns:
    ``(model, info)`` with ``info = {"loaded": bool, "train_seconds": float | None,
    "test_accuracy": [n] per-exit accuracy on the test split}``.
  """
  model = workload.make_model(seed)
  info = {"loaded": False, "train_seconds": None}
  if checkpoint is not None and os.path.exists(checkpoint):
    training.load_checkpoint(checkpoint, model)
    info["loaded"] = True
  else:
    config = workload.train_config if config is None else config
    history = training.train(model, workload.train.x, workload.train.y, config,
                             progress=progress)
    info["train_seconds"] = history.seconds
    if checkpoint is not None:
      training.save_checkpoint(checkpoint, model, metadata={
          "workload": workload.name, "seed": seed,
          "train_config": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in dataclasses.asdict(config).items()}})
  info["test_accuracy"] = training.exit_accuracy(model, workload.test.x, workload.test.y)
  return model, info
