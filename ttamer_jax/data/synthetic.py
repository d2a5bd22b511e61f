"""Synthetic exit traces with a known ground truth (tests, demos, benchmarks).

* :func:`sample_traces`: traces whose states follow a given :class:`~ttamer_jax.Cascade`.
* :func:`overthinking_cascade` and :func:`workload_traces`: the built-in over-thinking
  workload (exits with correlated mistakes and max-softmax / entropy signals).
* :func:`synthetic_cascade` and :func:`synthetic_workload`: random cascades in
  three regimes and train / calibration / test traces sampled from them.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.replay import sample_states
from ttamer_jax.data.traces import ExitTraces


def sample_traces(key: chex.PRNGKey, cascade, num_samples: int, *, loss: str = "bernoulli",
                  num_classes: int = 10) -> ExitTraces:
  """Synthetic traces whose ground truth is a known :class:`~ttamer_jax.Cascade`.

  Each sample follows the cascade's Markov chain; its score at stage ``i`` is
  ``(state + u) / K`` with ``u ~ U[0, 1)`` (so ``K`` uniform bins on ``[0, 1]`` recover
  the state exactly). With ``loss="bernoulli"`` (values must lie in ``[0, 1]``) the
  true loss is a 0/1 error drawn with probability ``values[i, state]`` and the
  prediction equals a random label iff the error is 0; with ``loss="expected"`` the
  loss is ``values[i, state]`` itself and predictions are drawn the same way.

  Args:
    key: PRNG key of the samples.
    cascade: the ground truth, ``n`` stages of ``K`` states.
    num_samples: ``N`` requests.
    loss: ``"bernoulli"`` (0/1 errors) or ``"expected"`` (the values themselves).
    num_classes: labels are drawn uniformly from this many classes.

  Returns:
    :class:`~ttamer_jax.ExitTraces` with ``[N, n]`` scores, preds and losses,
    ``costs [n]``, ``signals={"state_score": scores}`` and ``labels [N]``.
  """
  if not isinstance(cascade, Cascade):
    raise ValueError(f"cascade: expected a ttamer_jax.Cascade, got {type(cascade).__name__}")
  if loss not in ("bernoulli", "expected"):
    raise ValueError(f"loss: must be 'bernoulli' or 'expected', got {loss!r}")
  num_samples = validation.check_positive_int("num_samples", num_samples)
  num_classes = validation.check_positive_int("num_classes", num_classes)
  values = np.asarray(cascade.values)
  if loss == "bernoulli" and (values.max() > 1):
    raise ValueError(f"cascade.values: max {values.max():.4g} > 1 cannot be an error probability "
                     "(use loss='expected')")
  k_states, k_score, k_err, k_label, k_wrong = jax.random.split(key, 5)
  states = np.asarray(sample_states(k_states, cascade, num_samples))
  n, k = cascade.num_stages, cascade.num_states
  scores = (states + np.asarray(jax.random.uniform(k_score, states.shape))) / k
  p_err = values[np.arange(n)[None, :], states]
  err = np.asarray(jax.random.uniform(k_err, states.shape)) < p_err
  losses = err.astype(np.float32) if loss == "bernoulli" else p_err
  labels = np.asarray(jax.random.randint(k_label, (num_samples,), 0, num_classes))
  offset = np.asarray(jax.random.randint(k_wrong, states.shape, 1, max(num_classes, 2)))
  preds = np.where(err, (labels[:, None] + offset) % num_classes, labels[:, None])
  return ExitTraces(scores=scores, preds=preds, losses=losses, costs=np.asarray(cascade.costs),
                    signals={"state_score": scores}, labels=labels)



def overthinking_cascade(num_stages: int = 5, num_states: int = 16, *, overthink: float = 0.15,
                         decay: float = 0.75) -> Cascade:
  """A built-in cascade with over-thinking, defined at any resolution ``K``.

  State ``s`` is a bin of a latent difficulty ``u = (s + 0.5) / K``; stage ``i``'s
  error probability is ``u * decay**i``. Between stages ``u`` drifts 0.125 easier
  (Laplace kernel, width 0.1) or, with probability ``overthink``, the deeper model
  over-thinks and ``u`` jumps 0.25 harder (width 0.1875). ``init ~ exp(-3u)``; costs
  grow 1.6x per stage and sum to 1. The kernels live in ``u`` units, so ``K = 16``
  and ``K = 1000`` describe the same workload; ``(5, 8)`` is
  :func:`~ttamer_jax.demo_cascade` exactly.

  Args:
    num_stages: ``n``.
    num_states: ``K`` difficulty bins.
    overthink: probability that a deeper stage jumps to a harder bin.
    decay: per-stage factor of the error probability.

  Returns:
    A :class:`~ttamer_jax.Cascade`: ``values [n, K]``, ``init [K]``,
    ``trans [n-1, K, K]``, ``costs [n]`` (summing to 1).
  """
  n = validation.check_positive_int("num_stages", num_stages)
  k = validation.check_positive_int("num_states", num_states)
  u = (np.arange(k) + 0.5) / k
  values = np.stack([u * decay**i for i in range(n)])
  d = u[None, :] - u[:, None]
  easier = np.exp(-np.abs(d + 0.125) / 0.1)
  harder = np.exp(-np.abs(d - 0.25) / 0.1875)
  row = ((1 - overthink) * easier / easier.sum(1, keepdims=True)
         + overthink * harder / harder.sum(1, keepdims=True))
  init = np.exp(-3 * u)
  costs = 1.6 ** np.arange(n)
  return Cascade(values=values, init=init / init.sum(),
                 trans=np.broadcast_to(row / row.sum(1, keepdims=True), (n - 1, k, k)),
                 costs=costs / costs.sum())


def workload_traces(key: chex.PRNGKey, cascade: Cascade, num_samples: int, *,
                    num_classes: int = 10, repeat_mistake: float = 0.7) -> ExitTraces:
  """Synthetic exit traces of ``cascade`` with the signals real exits expose.

  States and 0/1 losses as :func:`~ttamer_jax.sample_traces`
  (``"bernoulli"``). Exits of one network make correlated mistakes: a wrong exit
  that follows a wrong exit repeats its prediction with probability
  ``repeat_mistake``, otherwise picks a uniformly random wrong class. Signals:
  ``"error_prob"`` (a learned error estimate: the bin of the true error
  probability plus within-bin jitter; also the primary score), ``"max_softmax"``
  (``1 - p_err * (0.85 + 0.3 u)`` clipped to ``[1/C, 1]``, ``u`` the jitter) and
  ``"entropy"`` (entropy of a softmax with that max, times log-normal noise).

  Args:
    key: PRNG key of the samples.
    cascade: the ground truth, ``n`` stages of ``K`` states, values in ``[0, 1]``.
    num_samples: ``N`` requests.
    num_classes: ``C`` classes of the labels and predictions.
    repeat_mistake: probability that a wrong exit after a wrong exit repeats it.

  Returns:
    :class:`~ttamer_jax.ExitTraces` with ``[N, n]`` arrays, ``costs [n]``, the
    signals above and ``labels [N]``.
  """
  k_tr, k_noise, k_rep, k_wrong = jax.random.split(key, 4)
  tr = sample_traces(k_tr, cascade, num_samples, loss="bernoulli", num_classes=num_classes)
  k, n = cascade.num_states, tr.num_stages
  score = np.asarray(tr.scores, np.float64)
  state = np.minimum(np.floor(score * k), k - 1).astype(np.int64)
  jitter = score * k - state
  p_err = np.asarray(cascade.values, np.float64)[np.arange(n)[None, :], state]
  conf = np.clip(1 - p_err * (0.85 + 0.3 * jitter), 1.0 / num_classes, 1.0)
  rest = np.maximum(1 - conf, 1e-12) / max(num_classes - 1, 1)
  entropy = -(conf * np.log(conf) + (1 - conf) * np.log(rest))
  noise = np.exp(0.1 * np.asarray(jax.random.normal(k_noise, entropy.shape)))
  wrong = np.asarray(tr.losses) > 0
  labels = np.asarray(tr.labels)
  repeat = np.asarray(jax.random.uniform(k_rep, wrong.shape)) < repeat_mistake
  offset = np.asarray(jax.random.randint(k_wrong, wrong.shape, 1, max(num_classes, 2)))
  preds = np.where(wrong, (labels[:, None] + offset) % num_classes, labels[:, None])
  for i in range(1, n):
    copy = wrong[:, i] & wrong[:, i - 1] & repeat[:, i]
    preds[:, i] = np.where(copy, preds[:, i - 1], preds[:, i])
  signals = {"error_prob": score, "max_softmax": conf, "entropy": np.maximum(entropy, 0.0) * noise}
  return ExitTraces(scores=score, preds=preds, losses=tr.losses, costs=tr.costs, signals=signals,
                    labels=labels)


@dataclasses.dataclass(frozen=True)
class TraceWorkload:
  """Exit traces sampled from a known cascade (no network involved).

  Attributes:
    name: workload name (includes the regime).
    train, calibration, test: :class:`~ttamer_jax.ExitTraces` splits.
    cascade: the ground-truth :class:`~ttamer_jax.Cascade` they were sampled from.
  """

  name: str
  train: ExitTraces
  calibration: ExitTraces
  test: ExitTraces
  cascade: Cascade



# ------------------------------------------------------------- synthetic
SYNTHETIC_REGIMES = ("random", "improving", "overthink")


def synthetic_cascade(seed: int = 0, num_stages: int = 4, num_states: int = 6, *,
                      regime: str = "overthink") -> Cascade:
  """A random cascade whose values are error probabilities in ``[0, 1]``.

  Regimes:
    * ``"random"``: the distribution of :func:`~ttamer_jax.random_cascade`
      (uniform losses, flat-Dirichlet ``init`` and transition rows), drawn with
      NumPy from ``seed``; costs uniform, normalised to sum to 1.
    * ``"improving"``: state ``s`` is a bin of difficulty with loss
      ``(s + 0.5) / K * decay**i`` (a random ``decay`` in ``[0.55, 0.85]``);
      requests mostly keep or lower their difficulty bin from stage to stage; costs
      grow with depth.
    * ``"overthink"``: as ``"improving"``, but each transition row moves a random
      20-40% of its mass to harder bins and, at every stage after the first, a
      random third of the states have a loss *above* that state's loss at the
      previous stage -- later stages are sometimes worse.

  Args:
    seed: NumPy seed of the draw.
    num_stages: ``n``.
    num_states: ``K``.
    regime: ``"random"``, ``"improving"`` or ``"overthink"`` (above).

  Returns:
    A :class:`~ttamer_jax.Cascade`: ``values [n, K]`` in ``[0, 1]``, ``init [K]``,
    ``trans [n-1, K, K]``, ``costs [n]``.
  """
  if regime not in SYNTHETIC_REGIMES:
    raise ValueError(f"regime: must be one of {SYNTHETIC_REGIMES}, got {regime!r}")
  n = validation.check_positive_int("num_stages", num_stages)
  k = validation.check_positive_int("num_states", num_states)
  rng = np.random.default_rng(seed)
  if regime == "random":
    costs = rng.uniform(0.1, 1.0, n)
    return Cascade.from_arrays(rng.uniform(size=(n, k)), rng.dirichlet(np.ones(k)),
                               rng.dirichlet(np.ones(k), size=(n - 1, k)) if n > 1 else None,
                               costs / costs.sum())
  decay = rng.uniform(0.55, 0.85)
  base = (np.arange(k) + 0.5) / k
  values = np.stack([base * decay**i for i in range(n)])
  s, t = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  trans = []
  for _ in range(n - 1):
    easier = np.exp(-np.abs(t - (s - rng.uniform(0, 1.5))) / 0.8)
    easier /= easier.sum(1, keepdims=True)
    if regime == "overthink":
      harder = np.exp(-np.abs(t - (s + 2)) / 1.5)
      harder /= harder.sum(1, keepdims=True)
      w = rng.uniform(0.2, 0.4, size=(k, 1))
      easier = (1 - w) * easier + w * harder
    trans.append(easier)
  if regime == "overthink":
    for i in range(1, n):
      worse = rng.choice(k, size=max(1, k // 3), replace=False)
      values[i, worse] = np.minimum(1.0, values[i - 1, worse] * rng.uniform(1.2, 2.0, len(worse)))
  init = np.exp(-np.arange(k) / (k / 3))
  costs = 1.5 ** np.arange(n) * rng.uniform(0.8, 1.2, n)
  return Cascade.from_arrays(values, init / init.sum(),
                             np.stack(trans) if n > 1 else None, costs / costs.sum())


def synthetic_workload(*, seed: int = 0, regime: str = "overthink", num_stages: int = 4,
              num_states: int = 6, sizes=(2000, 2000, 4000),
              num_classes: int = 10) -> TraceWorkload:
  """Exit traces sampled from :func:`synthetic_cascade` (0/1 losses, known ground truth).

  The score of each exit is ``(state + u) / K`` (see
  :func:`sample_traces`), so ``K`` uniform bins on ``[0, 1]``
  recover the state; it is also stored as the signal ``"state_score"``.

  Args:
    seed: seed of the cascade and of the samples.
    regime: see :func:`synthetic_cascade`.
    num_stages, num_states: ``n`` and ``K``.
    sizes: number of samples in (train, calibration, test).
    num_classes: labels are drawn uniformly from this many classes.

  Returns:
    A :class:`~ttamer_jax.data.TraceWorkload`: the ground-truth cascade and the
    train, calibration and test :class:`~ttamer_jax.ExitTraces` (``[sizes[j], n]``).
  """
  if len(tuple(sizes)) != 3:
    raise ValueError(f"sizes: expected (train, calibration, test) sizes, got {sizes!r}")
  cascade = synthetic_cascade(seed, num_stages, num_states, regime=regime)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
  splits = [sample_traces(kk, cascade, validation.check_positive_int(name, int(m)),
                          num_classes=num_classes)
            for kk, m, name in zip(keys, sizes, ("sizes[0]", "sizes[1]", "sizes[2]"))]
  return TraceWorkload(name=f"synthetic-{regime}", train=splits[0], calibration=splits[1],
                       test=splits[2], cascade=cascade)
