"""Plots people would rather look at than tables (matplotlib, optional extra ``plot``).

Every function draws on a fresh figure, saves it atomically to ``path`` (PNG by the
suffix) and returns the path. matplotlib is imported lazily with the ``Agg``
backend, so the library works without it and plots render without a display.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ttamer_jax.app.reports import LABELS, tolerance_text
from ttamer_jax.data.files import atomic_path

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
# LABELS (what each family is called) is shared with the text tables: reports.LABELS.


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  try:
    with atomic_path(path, os.path.splitext(path)[1] or ".png") as tmp:
      fig.savefig(tmp, dpi=130, bbox_inches="tight")
  finally:
    _pyplot().close(fig)
  return path


def _front(cost, error):
  from ttamer_jax.evaluation.frontier import pareto_front
  idx = pareto_front(cost, error)
  return np.asarray(cost, np.float64)[idx], np.asarray(error, np.float64)[idx]


def plot_pareto(frontiers: Mapping[str, Any], path: str | os.PathLike, *, title: str = "",
                error_label: str = "error rate (held out)",
                cost_label: str = "mean cost / cost of the full model",
                full_error: float | None = None, tolerance: float = 0.01,
                points: Mapping[str, Any] | None = None) -> str:
  """Error vs normalised cost of every policy family, the recall frontier highlighted.

  Args:
    frontiers: ``{name: SweepResult}`` (anything with ``cost_norm`` and ``error``).
      Each family is drawn as its Pareto staircase plus its raw points.
    path: output file.
    title, error_label, cost_label: texts of the title and the axes.
    full_error: if given, a horizontal line at the full model's error and a band
      of ``+tolerance`` above it.
    tolerance: height of that band (0.01: one point of error).
    points: ``{name: (cost_norm, error)}`` operating points to mark (e.g. the
      settings chosen on calibration, measured on test); ``None`` entries skipped.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 5))
  names = sorted(frontiers, key=lambda n: n == HIGHLIGHT)  # highlight drawn last
  handles = {}
  for name in names:
    res = frontiers[name]
    cost, err = np.asarray(res.cost_norm, np.float64), np.asarray(res.error, np.float64)
    style = dict(_STYLE.get(name, dict(lw=1.2, marker=".")))
    fc, fe = _front(cost, err)
    ax.plot(cost, err, ls="none", marker=style.get("marker") or ".", ms=2,
            color=style.get("color"), alpha=0.25)
    style["drawstyle"] = "steps-post"
    handles[name], = ax.plot(fc, fe, label=LABELS.get(name, name), **style)
  for name, point in dict(points or {}).items():
    if point is None or None in tuple(point) or name not in handles:
      continue
    ax.plot(*point, ls="none", marker="*", ms=13 if name == HIGHLIGHT else 9,
            color=handles[name].get_color(), markeredgecolor="k", markeredgewidth=0.6, zorder=20)
  extra = []
  if points:
    extra.append(ax.plot([], [], ls="none", marker="*", ms=9, color="w", markeredgecolor="k",
                         label="chosen on calibration, measured here")[0])
  if full_error is not None:
    ax.axhline(full_error, color="0.4", lw=0.8)
    extra.append(ax.axhspan(full_error, full_error + tolerance, color="0.85", alpha=0.5, lw=0,
                            label=f"full model's error + {tolerance_text(tolerance)}"))
  ax.set_xlabel(cost_label)
  ax.set_ylabel(error_label)
  ax.set_title(title or "accuracy / cost frontiers")
  ax.grid(alpha=0.3)
  # Legend: the highlighted family first, then the others in the caller's order.
  order = sorted(handles, key=lambda n: (n != HIGHLIGHT, list(frontiers).index(n)))
  ax.legend([handles[n] for n in order] + extra,
            [handles[n].get_label() for n in order] + [h.get_label() for h in extra],
            fontsize=8, loc="upper right", framealpha=0.9)
  return _save(fig, path)


def plot_index_heatmap(index: Any, path: str | os.PathLike, *, title: str = "dynamic index",
                       state_labels: Any = None, lam: float | None = None,
                       annotate: bool | None = None) -> str:
  """Heatmap of a recall policy's index table ``[n, K]`` (stage x state).

  The policy stops after stage ``i`` in state ``s`` iff ``lam * best loss so far
  <= index[i, s]``: bright cells stop early. ``-inf`` (never stop: "go") and
  ``+inf`` (always stop: "stop") are drawn as the colour-bar ends and labelled.

  Args:
    index: ``[n, K]`` table (``RecallSolution.index`` / ``RecallPolicy.index``).
    path: output file.
    title: figure title (``lam`` is appended when given).
    state_labels: ``[K]`` tick labels of the states (e.g. score bins).
    lam: the trade-off weight the table was solved for (shown in the title).
    annotate: write each finite value in its cell (default: when ``K <= 16``).
  """
  plt = _pyplot()
  idx = np.asarray(index, np.float64)
  if idx.ndim != 2:
    raise ValueError(f"index: expected an [n, K] table, got shape {idx.shape}")
  n, k = idx.shape
  finite = idx[np.isfinite(idx)]
  lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
  hi = hi if hi > lo else lo + 1e-9
  shown = np.clip(np.where(np.isposinf(idx), hi, np.where(np.isneginf(idx), lo, idx)), lo, hi)
  fig, ax = plt.subplots(figsize=(max(5.5, 0.55 * k + 2.5), max(2.8, 0.5 * n + 1.6)))
  im = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
  annotate = k <= 16 if annotate is None else annotate
  for (i, s), v in np.ndenumerate(idx):
    frac = (shown[i, s] - lo) / (hi - lo)
    color = "k" if frac > 0.6 else "w"
    if not np.isfinite(v):
      ax.text(s, i, "stop" if v > 0 else "go", ha="center", va="center", fontsize=7, color=color,
              fontweight="bold")
    elif annotate:
      ax.text(s, i, f"{v:.2g}", ha="center", va="center", fontsize=6.5, color=color)
  ax.set_xlabel("state (score bin)" if state_labels is None else "state")
  ax.set_ylabel("stage (exit)")
  ax.set_yticks(range(n), [str(i) for i in range(n)])
  if state_labels is not None:
    ax.set_xticks(range(k), [str(s) for s in state_labels], rotation=45, fontsize=7)
  else:
    ax.set_xticks(range(k), [str(s) for s in range(k)], fontsize=7 if k > 16 else 9)
  fig.colorbar(im, ax=ax, label="index: stop iff lam * best loss so far <= index")
  ax.set_title(title if lam is None else f"{title} (lam = {lam:.4g})")
  return _save(fig, path)


def plot_exit_histograms(histograms: Mapping[str, Any], path: str | os.PathLike, *,
                         title: str = "where requests stop",
                         answers: Mapping[str, Any] | None = None) -> str:
  """Grouped bars: fraction of requests stopped (or answered) at each exit, per policy.

  Args:
    histograms: ``{policy: [n]}`` fractions (e.g. ``SweepResult.stop_histogram[i]``).
    path: output file.
    title: figure title.
    answers: optional ``{policy: [n]}`` fraction *answered* by each exit, drawn in
      a second panel (with recall, the answering exit can precede the stopping one).
  """
  plt = _pyplot()
  panels = [("stopped after exit", histograms)]
  if answers:
    panels.append(("answered by exit", answers))
  names = list(histograms)
  n = np.asarray(histograms[names[0]]).shape[0] if names else 0
  fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.5, 1.3 * n + 3), 3.2 * len(panels) + 0.6),
                           sharex=True, squeeze=False)
  width = 0.8 / max(len(names), 1)
  for ax, (ylabel, hists) in zip(axes[:, 0], panels):
    for j, name in enumerate(names):
      if name not in hists:
        continue
      h = np.asarray(hists[name], np.float64)
      ax.bar(np.arange(h.shape[0]) + (j - (len(names) - 1) / 2) * width, h, width,
             label=LABELS.get(name, name), color=_STYLE.get(name, {}).get("color"),
             edgecolor="k" if name == HIGHLIGHT else None, linewidth=0.8)
    ax.set_ylabel(f"fraction {ylabel}")
    ax.set_ylim(0, 1.0)
    ax.grid(axis="y", alpha=0.3)
  axes[-1, 0].set_xticks(range(n), [f"exit {i}" for i in range(n)])
  axes[0, 0].set_title(title)
  axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  return _save(fig, path)
