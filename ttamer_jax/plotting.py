"""Plots people would rather look at than tables (matplotlib, optional extra ``plot``).

Every function draws on a fresh figure, saves it atomically to ``path`` (PNG by the
suffix) and returns the path. matplotlib is imported lazily with the ``Agg``
backend, so the library works without it and plots render without a display.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np

# Recall is the point of the library: draw it last, thick and on top.
HIGHLIGHT = "recall"
_STYLE = {
    "recall": dict(color="#d62728", lw=2.6, marker="o", ms=4, zorder=10),
    "no_recall": dict(color="#1f77b4", lw=1.4, marker="s", ms=3),
    "confidence": dict(color="#2ca02c", lw=1.4, marker="^", ms=3),
    "per_stage": dict(color="#98df8a", lw=1.2, marker="v", ms=3),
    "entropy": dict(color="#9467bd", lw=1.4, marker="d", ms=3),
    "patience": dict(color="#8c564b", lw=1.4, marker="P", ms=5),
    "fixed_exit": dict(color="#7f7f7f", lw=1.0, marker="x", ms=5, ls="--"),
    "hindsight": dict(color="#000000", lw=1.0, ls=":", marker=None),
}
LABELS = {
    "recall": "recall optimum (ttamer)", "no_recall": "no-recall optimum",
    "confidence": "confidence threshold", "per_stage": "per-stage thresholds",
    "entropy": "entropy threshold", "patience": "patience", "fixed_exit": "fixed exit",
    "hindsight": "hindsight oracle (not deployable)", "recall_agree": "recall, state x agreement",
}


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise ValueError("plotting needs matplotlib: pip install 'ttamer-jax[plot]'") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1] or ".png"
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
    _pyplot().close(fig)
  return path


def _front(cost, error):
  from ttamer_jax.frontier import pareto_front
  idx = pareto_front(cost, error)
  return np.asarray(cost, np.float64)[idx], np.asarray(error, np.float64)[idx]


def plot_pareto(frontiers: Mapping[str, Any], path: str | os.PathLike, *, title: str = "",
                error_label: str = "error rate (held out)",
                cost_label: str = "mean cost / cost of the full model",
                full_error: float | None = None) -> str:
  """Error vs normalised cost of every policy family, the recall frontier highlighted.

  Args:
    frontiers: ``{name: SweepResult}`` (anything with ``cost_norm`` and ``error``).
      Each family is drawn as its Pareto staircase plus its raw points.
    path: output file.
    full_error: if given, a horizontal line at the full model's error and a band
      of +1 point.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 5))
  names = sorted(frontiers, key=lambda n: n == HIGHLIGHT)  # highlight drawn last
  for name in names:
    res = frontiers[name]
    cost, err = np.asarray(res.cost_norm, np.float64), np.asarray(res.error, np.float64)
    style = dict(_STYLE.get(name, dict(lw=1.2, marker=".")))
    fc, fe = _front(cost, err)
    ax.plot(cost, err, ls="none", marker=style.get("marker") or ".", ms=2,
            color=style.get("color"), alpha=0.25)
    style["drawstyle"] = "steps-post"
    ax.plot(fc, fe, label=LABELS.get(name, name), **style)
  if full_error is not None:
    ax.axhline(full_error, color="0.4", lw=0.8)
    ax.axhspan(full_error, full_error + 0.01, color="0.85", alpha=0.5, lw=0,
               label="full model's error + 1 point")
  ax.set_xlabel(cost_label)
  ax.set_ylabel(error_label)
  ax.set_title(title or "accuracy / cost frontiers")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper right")
  return _save(fig, path)


def plot_index_heatmap(index: Any, path: str | os.PathLike, *, title: str = "dynamic index",
                       state_labels: Any = None) -> str:
  """Heatmap of a recall policy's index table ``[n, K]`` (stage x state).

  ``-inf`` (never stop) and ``+inf`` (always stop) are drawn as the colour-bar ends
  and annotated.
  """
  plt = _pyplot()
  idx = np.asarray(index, np.float64)
  finite = idx[np.isfinite(idx)]
  lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
  hi = hi if hi > lo else lo + 1e-9
  shown = np.clip(np.where(np.isposinf(idx), hi, np.where(np.isneginf(idx), lo, idx)), lo, hi)
  fig, ax = plt.subplots(figsize=(max(5, 0.45 * idx.shape[1] + 2), max(2.5, 0.5 * idx.shape[0] + 1.5)))
  im = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
  for (i, s), v in np.ndenumerate(idx):
    if not np.isfinite(v):
      ax.text(s, i, "stop" if v > 0 else "go", ha="center", va="center", fontsize=7, color="w")
  ax.set_xlabel("state")
  ax.set_ylabel("stage")
  ax.set_yticks(range(idx.shape[0]))
  if state_labels is not None:
    ax.set_xticks(range(idx.shape[1]), [str(s) for s in state_labels], rotation=45, fontsize=7)
  fig.colorbar(im, ax=ax, label="stop iff lam * best loss so far <= index")
  ax.set_title(title)
  return _save(fig, path)


def plot_exit_histograms(histograms: Mapping[str, Any], path: str | os.PathLike, *,
                         title: str = "where requests stop") -> str:
  """Grouped bars: fraction of requests answered (or stopped) at each exit, per policy."""
  plt = _pyplot()
  names = list(histograms)
  hists = [np.asarray(histograms[n], np.float64) for n in names]
  n = hists[0].shape[0] if hists else 0
  fig, ax = plt.subplots(figsize=(max(5, 1.2 * n + 2), 4))
  width = 0.8 / max(len(names), 1)
  for j, (name, h) in enumerate(zip(names, hists)):
    ax.bar(np.arange(n) + (j - (len(names) - 1) / 2) * width, h, width,
           label=LABELS.get(name, name), color=_STYLE.get(name, {}).get("color"))
  ax.set_xticks(range(n), [f"exit {i}" for i in range(n)])
  ax.set_ylabel("fraction of requests")
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)
