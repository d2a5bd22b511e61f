"""Plots: files written atomically, and what is drawn (labels, legend, highlight)."""

import os
import stat

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ttamer_jax.app import plotting  # noqa: E402
from ttamer_jax.evaluation import ReplaySweep  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
  """Every figure a plotting call saves (still inspectable after it is closed)."""
  saved = []
  real = plotting._save

  def save(fig, path):
    saved.append(fig)
    return real(fig, path)

  monkeypatch.setattr(plotting, "_save", save)
  return saved


def _sweep(cost, error):
  cost, error = np.asarray(cost, float), np.asarray(error, float)
  p = cost.size
  hist = np.full((p, 3), 1 / 3)
  return ReplaySweep(param=np.linspace(0, 1, p), error=error, cost=cost, cost_norm=cost,
                     stop_histogram=hist, answer_histogram=hist)


def _frontiers():
  c = np.linspace(0.1, 1.0, 12)
  return {"no_recall": _sweep(c, 0.3 - 0.2 * c), "confidence": _sweep(c, 0.32 - 0.2 * c),
          "recall": _sweep(c, 0.25 - 0.2 * c), "hindsight": _sweep(c * 0.5, 0.1 - 0.09 * c)}


def _check_png(path):
  assert open(path, "rb").read(8) == PNG_MAGIC
  mode = stat.S_IMODE(os.stat(path).st_mode)
  mask = os.umask(0)
  os.umask(mask)
  assert mode == 0o666 & ~mask  # an ordinary file, not mkstemp's 0600
  assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")] == []


def test_pareto_recall_highlighted_first_in_legend(tmp_path, figures):
  path = plotting.plot_pareto(_frontiers(), tmp_path / "sub" / "p.png", title="t", full_error=0.05,
                              points={"recall": (0.5, 0.15), "confidence": (None, None)})
  _check_png(path)
  ax, gap = figures[-1].axes  # the frontiers, and below them the gaps to recall
  assert ax.get_ylabel() and ax.get_title() == "t" and gap.get_xlabel() and gap.get_ylabel()
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels[0] == plotting.LABELS["recall"]
  assert set(plotting.LABELS[k] for k in _frontiers()) <= set(labels)
  assert "full model's error + 1 point" in labels
  assert "chosen on calibration, measured here" in labels
  lines = {l.get_label(): l for l in ax.get_lines()}
  recall, no_recall = lines[plotting.LABELS["recall"]], lines[plotting.LABELS["no_recall"]]
  others = [l for k, l in lines.items()
            if k not in (recall.get_label(), no_recall.get_label()) and not k.startswith("_")]
  assert all(recall.get_linewidth() > l.get_linewidth() for l in others + [no_recall])
  assert all(recall.get_zorder() > l.get_zorder() for l in others)
  # No-recall often coincides with recall: it is drawn above it, thin and dashed, with
  # hollow markers, so that both stay visible where they agree.
  assert no_recall.get_zorder() > recall.get_zorder() and no_recall.get_linestyle() == "--"
  assert no_recall.get_markerfacecolor() == "none"
  # Every mark is explained: the unlabelled lines are the operating-point stars (one
  # legend entry) and the full model's error line (the band's entry); no faint points.
  for line in ax.get_lines():
    if line.get_label().startswith("_"):
      assert line.get_marker() == "*" or np.ptp(line.get_ydata()) == 0, line
    assert line.get_alpha() in (None, 1.0)
  # The gap panel: family minus recall over the common cost range (here 0.05 and 0.07 apart).
  gaps = {l.get_label(): l for l in gap.get_lines() if not l.get_label().startswith("_")}
  assert set(gaps) == {f"{plotting.LABELS[k]} - recall" for k in ("no_recall", "confidence")}
  np.testing.assert_allclose(gaps[f"{plotting.LABELS['no_recall']} - recall"].get_ydata(), 0.05)
  np.testing.assert_allclose(gaps[f"{plotting.LABELS['confidence']} - recall"].get_ydata(), 0.07)
  assert "above 0: recall more" in gap.get_legend().get_title().get_text()


def test_pareto_staircase_is_the_front(tmp_path, figures):
  res = _sweep([0.2, 0.4, 0.3, 0.8], [0.5, 0.3, 0.6, 0.1])  # (0.3, 0.6) is dominated
  plotting.plot_pareto({"recall": res}, tmp_path / "p.png")
  line = next(l for l in figures[-1].axes[0].get_lines() if l.get_label() == plotting.LABELS["recall"])
  np.testing.assert_array_equal(line.get_xdata(), [0.2, 0.4, 0.8])
  np.testing.assert_array_equal(line.get_ydata(), [0.5, 0.3, 0.1])


def test_index_heatmap_marks_infinities_and_values(tmp_path, figures):
  index = np.array([[0.1, -np.inf, 0.3], [np.inf, 0.2, 0.05]])
  _check_png(plotting.plot_index_heatmap(index, tmp_path / "h.png", lam=0.7))
  ax = figures[-1].axes[0]
  texts = sorted(t.get_text() for t in ax.texts)
  assert texts == sorted(["0.1", "go", "0.3", "stop", "0.2", "0.05"])
  assert "lam = 0.7" in ax.get_title()
  assert ax.get_xlabel() and ax.get_ylabel()
  assert figures[-1].axes[1].get_ylabel().startswith("index")  # the colour bar says what it is
  with pytest.raises(ValueError, match=r"\[n, K\]"):
    plotting.plot_index_heatmap(np.zeros(3), tmp_path / "bad.png")
  assert not os.path.exists(tmp_path / "bad.png")


def test_exit_histograms_two_panels(tmp_path, figures):
  stops = {"recall": [0.5, 0.3, 0.2], "patience": [0.1, 0.6, 0.3]}
  # answered by exit i although a later exit ran: recall answers 10% + 5% from earlier exits
  recalled = {"recall": [0.1, 0.05, 0.0], "patience": [0.0, 0.0, 0.0]}
  _check_png(plotting.plot_exit_histograms(stops, tmp_path / "e.png", recalled=recalled))
  top, bottom = figures[-1].axes
  assert [p.get_height() for p in top.patches] == pytest.approx([0.5, 0.3, 0.2, 0.1, 0.6, 0.3])
  assert [p.get_height() for p in bottom.patches] == pytest.approx([0.1, 0.05, 0.0, 0.0, 0.0, 0.0])
  assert [t.get_text() for t in bottom.get_xticklabels()] == ["exit 0", "exit 1", "exit 2"]
  assert [t.get_text() for t in top.get_legend().get_texts()] == [
      plotting.LABELS["recall"], plotting.LABELS["patience"]]
  # The lower panel is what differs with recall, and its legend gives each policy's share.
  assert "EARLIER" in bottom.get_ylabel() and "later exit was consulted" in bottom.get_title()
  assert [t.get_text() for t in bottom.get_legend().get_texts()] == [
      f"{plotting.LABELS['recall']}: 15.0%",
      f"{plotting.LABELS['patience']}: 0% (every answer from the last exit run)"]
  assert top.get_ylabel() and bottom.get_ylabel()
  assert not bottom.texts  # bars to show: no note
  plotting.plot_exit_histograms(stops, tmp_path / "none.png",
                                recalled={k: [0.0, 0.0, 0.0] for k in stops})
  (note,) = figures[-1].axes[1].texts  # an empty panel says why it is empty
  assert note.get_text().startswith("no request answered by an earlier exit")
  plotting.plot_exit_histograms(stops, tmp_path / "one.png")
  assert len(figures[-1].axes) == 1


def test_image_paths_are_checked_before_any_work(tmp_path):
  for name in ("p.png", "p.PDF", "p.svg"):
    assert plotting.check_image_path(tmp_path / name) == str(tmp_path / name)
  for name, what in (("f.txt", "extension '.txt'"), ("frontier", "no extension")):
    with pytest.raises(ValueError, match=f"--plot .*{name}: not an image file name \\({what}\\); "
                                         "use .png, .pdf or .svg"):
      plotting.check_image_path(tmp_path / name)
  assert os.listdir(tmp_path) == []


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  import matplotlib.figure

  def boom(self, *a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
  with pytest.raises(RuntimeError):
    plotting.plot_pareto(_frontiers(), tmp_path / "p.png")
  assert os.listdir(tmp_path) == []


def test_noise_bands_are_drawn_and_bound_the_paired_noise(tmp_path, figures):
  """Issue 28 goal 5: with the number of requests, the gap panel shades each gap's 95% band
  and the exit bars get 95% intervals; the band bounds the paired difference's noise."""
  n = 2000
  plotting.plot_pareto(_frontiers(), tmp_path / "p.png", num_requests=n)
  gap = figures[-1].axes[1]
  (band,) = [c for c in gap.collections if "noise band" in str(c.get_label())]
  assert "2000 requests" in band.get_label()
  # The band is +-Z95 sqrt((e_a + e_b) / N) around 0 (here e_a + e_b at the largest cost).
  ys = band.get_paths()[0].vertices[:, 1]
  e_sum = (0.3 - 0.2 * 1.0) + (0.25 - 0.2 * 1.0)
  assert ys.min() <= -plotting.Z95 * np.sqrt(e_sum / n) + 1e-12
  assert plotting.gap_noise(0.4, 100) == pytest.approx(1.959964 * np.sqrt(0.004))
  # Var(l_a - l_b) <= e_a + e_b for losses in [0, 1] whatever their pairing: checked on 0/1
  # losses that agree, disagree as much as possible, or are independent.
  rng = np.random.default_rng(0)
  for ea, eb in ((0.3, 0.25), (0.5, 0.5), (0.05, 0.6)):
    u = rng.random(100000)
    for a, b in ((u < ea, u < eb), (u < ea, u > 1 - eb), (u < ea, rng.random(u.size) < eb)):
      d = a.astype(float) - b.astype(float)
      assert d.var() <= a.mean() + b.mean() + 1e-12
  # Exit histograms: each bar's 95% interval of a share of N requests.
  stops = {"recall": [0.5, 0.3, 0.2], "patience": [0.1, 0.6, 0.3]}
  plotting.plot_exit_histograms(stops, tmp_path / "e.png", num_requests=n)
  top = figures[-1].axes[0]
  (bars_r, bars_p) = [c for c in top.containers if hasattr(c, "errorbar") and c.errorbar]
  segments = bars_r.errorbar.lines[2][0].get_segments()
  half = [abs(s[1, 1] - s[0, 1]) / 2 for s in segments]
  np.testing.assert_allclose(half, plotting.share_noise([0.5, 0.3, 0.2], n), rtol=1e-6)
  np.testing.assert_allclose(plotting.share_noise(0.5, 100), 1.959964 * 0.05, rtol=1e-6)
  assert "95% intervals" in top.texts[0].get_text()
