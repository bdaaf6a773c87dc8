"""FROC and ROC figures as PNG files, for reports and model cards.

matplotlib is driven through its object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``):
no pyplot global state and no display, so plotting is safe inside services and worker threads.
Files are written through :func:`services.core.atomic.atomic_output`, so a reader never finds half a
PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from services.core.atomic import atomic_output
from services.evaluation.bootstrap import ConfidenceInterval, FrocBootstrap
from services.evaluation.froc import FrocResult
from services.evaluation.roc import RocResult

_DPI = 150
_SIZE_IN = (6.0, 4.8)


def _rate_label(rate: float) -> str:
    if rate < 1 and float(1 / rate).is_integer():
        return f"1/{round(1 / rate)}"
    return f"{rate:g}"


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    FigureCanvasAgg(figure)
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=_DPI)
    return Path(path)


def plot_froc(
    result: FrocResult,
    path: str | os.PathLike[str],
    *,
    ci: FrocBootstrap | None = None,
    label: str = "CADe",
    title: str | None = None,
) -> Path:
    """FROC curve on a log FP/case axis spanning the operating points (LUNA16's figure), the points
    marked, the CPM in the legend and, when ``ci`` is given, its pointwise 95 % band and CPM CI.

    The curve is drawn as the interpolated sensitivity on a dense log grid, i.e. the function the CPM
    is read from — straight vertex-to-vertex segments would bend on a log axis and mislead.
    """
    rates = np.array([p.fp_per_case for p in result.operating_points])
    sens = np.array([p.sensitivity for p in result.operating_points])
    x_min, x_max = rates[0] / 1.25, rates[-1] * 1.25
    grid = np.geomspace(x_min, x_max, 400)
    figure = Figure(figsize=_SIZE_IN)
    axes = figure.add_subplot()
    legend = f"{label}: CPM {result.cpm:.3f}"
    if ci is not None:
        legend += f" ({ci.cpm.level:.0%} CI {ci.cpm.low:.3f}–{ci.cpm.high:.3f})"
        axes.fill_between(
            ci.band_fp_per_case, ci.band_low, ci.band_high, color="tab:blue", alpha=0.2, lw=0,
            label=f"{ci.cpm.level:.0%} bootstrap band ({ci.cpm.n_resamples} resamples)",
        )  # fmt: skip
    axes.plot(grid, result.sensitivity_at(grid), color="tab:blue", lw=2, label=legend)
    axes.plot(rates, sens, "o", color="tab:red", ms=6, label="operating points")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(rates))
    axes.xaxis.set_major_formatter(FixedFormatter([_rate_label(r) for r in rates]))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlim(x_min, x_max)
    axes.set_ylim(0.0, 1.0)
    axes.set_yticks(np.linspace(0.0, 1.0, 11))
    axes.grid(True, which="major", alpha=0.4)
    axes.set_xlabel(f"false positives per case ({result.n_cases} cases)")
    axes.set_ylabel(f"sensitivity ({result.n_lesions} lesions)")
    axes.set_title(title or f"FROC ({result.rule.value} hit rule)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def plot_roc(
    result: RocResult,
    path: str | os.PathLike[str],
    *,
    auc_ci: ConfidenceInterval | None = None,
    label: str = "anomaly score",
    title: str | None = None,
) -> Path:
    """ROC curve (every vertex, ties as diagonals) with the chance line and the AUC (and its CI)."""
    figure = Figure(figsize=(5.2, 5.0))
    axes = figure.add_subplot()
    legend = f"{label}: AUC {result.auc:.3f}"
    if auc_ci is not None:
        legend += f" ({auc_ci.level:.0%} CI {auc_ci.low:.3f}–{auc_ci.high:.3f})"
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    axes.plot(result.fpr, result.tpr, color="tab:blue", lw=2, label=legend)
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_aspect("equal")
    axes.grid(True, alpha=0.4)
    axes.set_xlabel(f"false positive rate ({result.n_negative} normal cases)")
    axes.set_ylabel(f"true positive rate ({result.n_positive} abnormal cases)")
    axes.set_title(title or "ROC")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)
