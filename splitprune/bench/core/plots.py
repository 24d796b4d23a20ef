"""Matplotlib (Agg) figures of the paper-claim suites, saved as PNG next to the JSON/CSV results."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf",
          "#bcbd22"]


def figure(ncols: int = 1, width: float = 6.4, height: float = 4.4):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(ax, series: list[tuple[str, list[float], list[float]]], xlabel: str, ylabel: str = "test accuracy (%)",
           logx: bool = False, title: str | None = None, markers: bool = True) -> None:
    """series: (label, xs, accuracies in [0, 1])."""
    for i, (label, xs, ys) in enumerate(series):
        ax.plot(xs, [100 * y for y in ys], marker="o" if markers else None, markersize=3.5, linewidth=1.6,
                color=COLORS[i % len(COLORS)], label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def hline(ax, y: float, label: str, color: str = "gray") -> None:
    ax.axhline(100 * y, color=color, linestyle="--", linewidth=1, label=label)


def zoom_y(ax, values: list[float], pad: float = 1.0, floor: float | None = None) -> None:
    """Limit the y axis to the interesting range of accuracies (in [0, 1])."""
    values = [v for v in values if v is not None]
    if not values:
        return
    lo, hi = 100 * min(values) - pad, 100 * max(values) + pad
    if floor is not None:
        lo = max(lo, floor)
    ax.set_ylim(lo, min(hi, 100))


def accuracy_panels(records: dict, names: list[str], curve, epoch_title: str, path: Path) -> Path:
    """Two panels: accuracy per epoch, and accuracy against cumulative training traffic (log x)."""
    fig, (ax1, ax2) = figure(2)
    points = {n: curve(records[n]) for n in names}
    by_epoch = [(records[n]["label"], [p["epoch"] for p in points[n]], [p["accuracy"] for p in points[n]])
                for n in names]
    by_bytes = [(records[n]["label"], [p["bytes"] / 1e6 for p in points[n]], [p["accuracy"] for p in points[n]])
                for n in names]
    curves(ax1, by_epoch, "epoch", title=epoch_title)
    curves(ax2, by_bytes, "cumulative training traffic, up + down (MB, log)", logx=True,
           title="accuracy against training traffic")
    accuracies = sorted(a for _, _, ys in by_epoch for a in ys)
    for ax in (ax1, ax2):
        zoom_y(ax, accuracies[len(accuracies) // 4:], pad=2.0)
    return save(fig, path)
