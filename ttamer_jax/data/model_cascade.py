"""A cascade of heterogeneous scikit-learn models on tabular data (a trace workload).

What a user with a model cascade holds: several models of increasing cost
trained on the same task, run on a calibration set and a test set, with their
confidences, predictions, 0/1 errors and measured per-request latency. The data
are generated offline (``sklearn.datasets.make_classification``: several
informative and redundant features, clusters per class, label noise), so the
workload needs no download. scikit-learn is imported when the workload is built.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ttamer_jax.core import validation
from ttamer_jax.data.traces import ExitTraces

STAGES = ("tree", "logistic", "naive_bayes", "forest", "boosting")


@dataclasses.dataclass(frozen=True)
class ModelCascade:
  """Calibration and test traces of a trained model cascade.

  Attributes:
    name: workload name.
    calibration: traces the policies are fitted / chosen on.
    test: held-out traces (costs: the calibration split's measured latencies).
    stages: the models, cheapest first.
    info: per-stage test accuracy and measured milliseconds per request.
  """

  name: str
  calibration: ExitTraces
  test: ExitTraces
  stages: tuple
  info: dict


def _models(seed: int) -> list[tuple[str, Any]]:
  from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
  from sklearn.linear_model import LogisticRegression
  from sklearn.naive_bayes import GaussianNB
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.tree import DecisionTreeClassifier

  return [
      ("tree", DecisionTreeClassifier(max_depth=10, min_samples_leaf=5, random_state=seed)),
      ("logistic", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))),
      ("naive_bayes", GaussianNB()),
      ("forest", RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=1,
                                        random_state=seed)),
      ("boosting", HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1,
                                                  random_state=seed)),
  ]


def _latency_ms(model, x: np.ndarray, repeats: int) -> float:
  """Median milliseconds per request of ``predict_proba`` on batches of 256."""
  batch = x[:256]
  model.predict_proba(batch)  # warm caches
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    model.predict_proba(batch)
    times.append((time.perf_counter() - start) / batch.shape[0])
  return 1e3 * float(np.median(times))


def _traces(models, x, y, costs) -> ExitTraces:
  probs = [m.predict_proba(x) for _, m in models]
  conf = np.stack([p.max(axis=1) for p in probs], axis=1)
  preds = np.stack([p.argmax(axis=1) for p in probs], axis=1).astype(np.int32)
  entropy = np.stack([-(p * np.log(np.clip(p, 1e-12, 1))).sum(axis=1) for p in probs], axis=1)
  margin = np.stack([np.diff(np.sort(p, axis=1)[:, -2:], axis=1)[:, 0] for p in probs], axis=1)
  losses = (preds != y[:, None]).astype(np.float32)
  return ExitTraces(scores=conf, preds=preds, losses=losses, costs=costs,
                    signals={"max_softmax": conf, "entropy": entropy, "margin": margin},
                    labels=y)


def model_cascade(*, seed: int = 0, num_samples: int = 24000, num_classes: int = 6,
                  fractions=(0.4, 0.3, 0.3), repeats: int = 15) -> ModelCascade:
  """Trains the cascade of :data:`STAGES` and records its traces with measured latency.

  Args:
    seed: seed of the data and the models.
    num_samples: requests generated (train + calibration + test).
    num_classes: classes of the task.
    fractions: train / calibration / test fractions.
    repeats: timed rounds per model (the median per request is the stage cost).
  """
  from sklearn.datasets import make_classification

  num = validation.check_positive_int("num_samples", num_samples)
  k = validation.check_positive_int("num_classes", num_classes)
  fr = validation.as_numpy("fractions", fractions, ndim=1)
  validation.check_shape("fractions", fr, (3,))
  if np.any(fr <= 0) or abs(fr.sum() - 1) > 1e-6:
    raise ValueError(f"fractions: expected three positive numbers summing to 1, got {tuple(fr)}")
  x, y = make_classification(n_samples=num, n_features=24, n_informative=12, n_redundant=6,
                             n_classes=k, n_clusters_per_class=3, class_sep=1.0, flip_y=0.03,
                             random_state=seed)
  x = x.astype(np.float32)
  cut = np.cumsum((fr[:2] * num).astype(int))
  perm = np.random.default_rng(seed).permutation(num)
  train, cal, test = np.split(perm, cut)
  models = _models(seed)
  for _, m in models:
    m.fit(x[train], y[train])
  ms = np.asarray([_latency_ms(m, x[cal], repeats) for _, m in models])
  cal_traces = _traces(models, x[cal], y[cal], ms)
  test_traces = _traces(models, x[test], y[test], ms)
  accuracy = (1 - np.asarray(test_traces.losses).mean(axis=0)).tolist()
  return ModelCascade(name=f"sklearn-cascade-{k}class", calibration=cal_traces, test=test_traces,
                      stages=tuple(name for name, _ in models),
                      info=dict(test_accuracy=accuracy, ms_per_request=ms.tolist()))
