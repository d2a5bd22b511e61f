"""Plots people would rather look at than tables (matplotlib).

Every function draws on a fresh figure, saves it atomically to ``path`` (the
format by the suffix: ``.png``, ``.pdf``, ``.svg``, ... -- :func:`check_image_path`
checks it before any work) and returns the path. matplotlib is imported lazily
with the ``Agg`` backend, so the library imports without it and plots render
without a display.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ttamer_jax.app.reports import LABELS, tolerance_text
from ttamer_jax.data.files import atomic_path

# Recall is the point of the library: drawn thick, first in the legend, above the
# heuristics. The no-recall optimum often coincides with it over part of the cost
# range, so it is drawn above it, thin and dashed with hollow markers: where the two
# agree both stay visible (and the gap panel shows where they differ).
HIGHLIGHT = "recall"
_STYLE = {
    "recall": dict(color="#d62728", lw=3.2, marker="o", ms=5, zorder=10),
    "no_recall": dict(color="#1f77b4", lw=1.3, ls=(0, (4, 2)), marker="s", ms=5, mfc="none",
                      mew=1.0, zorder=11),
    "confidence": dict(color="#2ca02c", lw=1.4, marker="^", ms=3),
    "per_stage": dict(color="#98df8a", lw=1.2, marker="v", ms=3),
    "entropy": dict(color="#9467bd", lw=1.4, marker="d", ms=3),
    "patience": dict(color="#8c564b", lw=1.4, marker="P", ms=5),
    "fixed_exit": dict(color="#7f7f7f", lw=1.0, marker="x", ms=5, ls="--"),
    "hindsight": dict(color="#000000", lw=1.0, ls=":", marker=None),
}
# LABELS (what each family is called) is shared with the text tables: reports.LABELS.
# The families whose error gap to recall the Pareto plot's lower panel draws.
GAP_FAMILIES = ("no_recall", "confidence")
# Two-sided normal quantile of the 95% bands and error bars.
Z95 = 1.959964
# Image types suggested in messages (matplotlib writes more: see check_image_path).
IMAGE_TYPES = (".png", ".pdf", ".svg")


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def check_image_path(path: str | os.PathLike, what: str = "--plot") -> str:
  """``path`` must end in an image type matplotlib writes (``.png``, ``.pdf``, ``.svg``,
  ...): checked before any work, so a typo fails at once, not after the computation."""
  ext = os.path.splitext(os.fspath(path))[1].lower()
  try:
    from matplotlib.backend_bases import FigureCanvasBase
  except ImportError:
    raise ValueError(f"{what} needs matplotlib (pip install matplotlib)") from None
  supported = sorted("." + k for k in FigureCanvasBase.get_supported_filetypes())
  if ext not in supported:
    got = f"extension {ext!r}" if ext else "no extension"
    others = ", ".join(x for x in supported if x not in IMAGE_TYPES)
    raise ValueError(f"{what} {os.fspath(path)}: not an image file name ({got}); use "
                     f"{', '.join(IMAGE_TYPES[:-1])} or {IMAGE_TYPES[-1]} (matplotlib also "
                     f"writes {others})")
  return os.fspath(path)


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


def _gap_curve(base, other):
  """``(cost, error gap, error sum)`` of the staircases ``other - base`` (and
  ``other + base``) over their common cost range."""
  from ttamer_jax.evaluation.frontier import staircase
  bc, be = _front(base.cost_norm, base.error)
  oc, oe = _front(other.cost_norm, other.error)
  low, high = max(bc[0], oc[0]), max(bc[-1], oc[-1])
  cuts = np.unique(np.concatenate([[low, high], bc, oc]))
  cuts = cuts[(cuts >= low) & (cuts <= high)]
  a, b = staircase(oc, oe, cuts), staircase(bc, be, cuts)
  return cuts, a - b, a + b


def gap_noise(error_sum: Any, num_requests: int) -> np.ndarray:
  """Half-width of a conservative 95% band of the mean paired difference of two
  policies' losses in ``[0, 1]`` on ``num_requests`` requests, from their mean
  losses' sum ``e_a + e_b``: per request ``d^2 <= |d| <= l_a + l_b``, so
  ``Var(d) <= e_a + e_b`` whatever the pairing (a gap outside it is more than noise)."""
  return Z95 * np.sqrt(np.maximum(np.asarray(error_sum, np.float64), 0.0) / num_requests)


def share_noise(share: Any, num_requests: int) -> np.ndarray:
  """Half-width of the 95% normal interval of a share of ``num_requests`` requests."""
  p = np.clip(np.asarray(share, np.float64), 0.0, 1.0)
  return Z95 * np.sqrt(p * (1 - p) / num_requests)


def plot_pareto(frontiers: Mapping[str, Any], path: str | os.PathLike, *, title: str = "",
                error_label: str = "error rate (held out)",
                cost_label: str = "mean cost / cost of the full model",
                full_error: float | None = None, tolerance: float = 0.01,
                points: Mapping[str, Any] | None = None,
                gaps: tuple = GAP_FAMILIES, num_requests: int | None = None) -> str:
  """Error vs normalised cost of every policy family, the recall frontier highlighted.

  The upper panel draws each family's Pareto staircase (its grid points that no
  other point of the family beats; the dominated ones are left out). When the
  frontiers include ``"recall"`` and one of ``gaps``, a lower panel draws the error
  gap ``family - recall`` vs cost over their common cost range (above 0: recall is
  more accurate at that cost) -- where recall and no-recall coincide on the upper
  panel, this shows where and by how much they differ.

  Args:
    frontiers: ``{name: ReplaySweep}`` (anything with ``cost_norm`` and ``error``).
    path: output file (its suffix names the image type: :func:`check_image_path`).
    title, error_label, cost_label: texts of the title and the axes.
    full_error: if given, a horizontal line at the full model's error and a band
      of ``+tolerance`` above it.
    tolerance: height of that band (0.01: one point of error).
    points: ``{name: (cost_norm, error)}`` operating points to mark (e.g. the
      settings chosen on calibration, measured on test); ``None`` entries skipped.
    gaps: the families whose gap to recall the lower panel draws.
    num_requests: the requests the frontiers were measured on: the lower panel then
      shades, around 0, each gap's conservative 95% noise band (:func:`gap_noise`, for
      losses in ``[0, 1]``); a gap outside its band is a difference, not noise.
  """
  plt = _pyplot()
  gap_names = [g for g in gaps if g in frontiers and g != HIGHLIGHT] if HIGHLIGHT in frontiers else []
  if gap_names:
    fig, (ax, gax) = plt.subplots(2, 1, figsize=(9.5, 6.8), sharex=True,
                                  gridspec_kw=dict(height_ratios=(3, 1.15), hspace=0.08))
  else:
    fig, ax = plt.subplots(figsize=(9.5, 5))
    gax = None
  names = sorted(frontiers, key=lambda n: _STYLE.get(n, {}).get("zorder", 2))
  handles = {}
  for name in names:
    res = frontiers[name]
    style = dict(_STYLE.get(name, dict(lw=1.2, marker=".")))
    fc, fe = _front(res.cost_norm, res.error)
    handles[name], = ax.plot(fc, fe, label=LABELS.get(name, name), drawstyle="steps-post",
                             **style)
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
  ax.set_ylabel(error_label)
  ax.set_title(title or "accuracy / cost frontiers")
  ax.grid(alpha=0.3)
  # Legend: the highlighted family first, then the others in the caller's order.
  order = sorted(handles, key=lambda n: (n != HIGHLIGHT, list(frontiers).index(n)))
  ax.legend([handles[n] for n in order] + extra,
            [handles[n].get_label() for n in order] + [h.get_label() for h in extra],
            fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  if gax is None:
    ax.set_xlabel(cost_label)
    return _save(fig, path)
  gax.axhline(0.0, color="k", lw=0.8)
  for name in gap_names:
    x, y, total = _gap_curve(frontiers[HIGHLIGHT], frontiers[name])
    style = _STYLE.get(name, {})
    gax.plot(x, y, drawstyle="steps-post", color=style.get("color"), lw=1.4,
             ls=style.get("ls", "-"), label=f"{LABELS.get(name, name)} - recall")
    if num_requests:  # one grey band per gap (they nearly coincide), one legend entry
      half = gap_noise(total, num_requests)
      gax.fill_between(x, -half, half, step="post", color="0.5", alpha=0.12, lw=0,
                       label=None if name != gap_names[0] else
                       f"95% noise band of a gap\n(conservative; {num_requests} requests)")
  gax.set_xlabel(cost_label)
  gax.set_ylabel("error gap\nto recall")
  gax.grid(alpha=0.3)
  gax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
             title="above 0: recall more\naccurate at equal cost", title_fontsize=7.5,
             alignment="left")
  return _save(fig, path)


def _error_bars(shares: np.ndarray, num_requests: int | None) -> dict:
  """``bar()`` keywords of the shares' 95% intervals (none without ``num_requests``)."""
  if not num_requests:
    return {}
  return dict(yerr=share_noise(shares, num_requests), error_kw=dict(lw=0.8, capsize=1.5,
                                                                    ecolor="0.2"))


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
                         recalled: Mapping[str, Any] | None = None,
                         num_requests: int | None = None) -> str:
  """Grouped bars: fraction of requests stopped after each exit, per policy.

  Args:
    histograms: ``{policy: [n]}`` fractions (e.g. ``ReplaySweep.stop_histogram[i]``).
    path: output file.
    title: figure title.
    recalled: optional ``{policy: [n]}`` fraction of requests *answered by* each exit
      although a later exit was consulted (``ReplaySweep.recalled_histogram[i]``),
      drawn in a second panel: what recall does. A policy that answers with the last
      exit it consulted has no bar there; the legend gives each policy's total share.
    num_requests: the requests the shares are of: each bar then gets its 95% interval
      (:func:`share_noise`), so bars that differ by more than their noise show it.
  """
  plt = _pyplot()
  names = list(histograms)
  n = np.asarray(histograms[names[0]]).shape[0] if names else 0
  rows = 2 if recalled else 1
  fig, axes = plt.subplots(rows, 1, figsize=(max(6.5, 1.3 * n + 3), 3.2 * rows + 0.6),
                           sharex=True, squeeze=False)
  width = 0.8 / max(len(names), 1)
  offset = lambda j: (j - (len(names) - 1) / 2) * width
  style = lambda name: dict(color=_STYLE.get(name, {}).get("color"),
                            edgecolor="k" if name == HIGHLIGHT else None, linewidth=0.8)
  top = axes[0, 0]
  for j, name in enumerate(names):
    h = np.asarray(histograms[name], np.float64)
    top.bar(np.arange(h.shape[0]) + offset(j), h, width, label=LABELS.get(name, name), **style(name),
            **_error_bars(h, num_requests))
  top.set_ylabel("fraction stopped\nafter exit")
  top.set_ylim(0, 1.0)
  top.grid(axis="y", alpha=0.3)
  top.set_title(title)
  top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  if recalled:
    ax = axes[1, 0]
    peak = 0.0
    for j, name in enumerate(names):
      h = np.asarray(recalled.get(name, np.zeros(n)), np.float64)
      peak = max(peak, float(h.max(initial=0.0)))
      total = float(h.sum())
      label = (f"{LABELS.get(name, name)}: {100 * total:.1f}%" if total > 0 else
               f"{LABELS.get(name, name)}: 0% (every answer from the last exit run)")
      ax.bar(np.arange(n) + offset(j), h, width, label=label, **style(name),
             **_error_bars(h, num_requests))
    ax.set_ylabel("fraction answered by\nan EARLIER exit")
    ax.set_ylim(0, max(0.05, 1.25 * peak))
    if peak == 0:  # an empty panel is a result too: say it in words
      ax.text(0.5, 0.5, "no request answered by an earlier exit than the last one consulted:\n"
              "at these operating points, every policy answers with the last exit it ran",
              transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("answered by this exit although a later exit was consulted (recall)",
                 fontsize=9)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="share of requests", title_fontsize=7.5)
  if num_requests:
    top.text(1.01, 0.0, f"bars: 95% intervals\n({num_requests} requests)", transform=top.transAxes,
             fontsize=7.5, va="bottom", color="0.3")
  axes[-1, 0].set_xticks(range(n), [f"exit {i}" for i in range(n)])
  return _save(fig, path)
