"""Plots of tune and demo results (optional: imports matplotlib, only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..config import Config
from .search import Measured

__all__ = ["plot_bars"]


def plot_bars(path: str | Path, results: Mapping[str, Mapping[str, Measured]], config: Config,
              title: str) -> Path:
    """Two panels: goodput/throughput and p99 (with each SLO) per model, one bar per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(config.models)
    labels = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(names))]
        res = results[label]
        ax1.bar(xs, [res[n].throughput if n in res else 0 for n in names], width, label=label)
        ax2.bar(xs, [(res[n].p99_ms or 0) if n in res else 0 for n in names], width, label=label)
    for j, n in enumerate(names):
        slo = config.models[n].slo
        if slo:
            ax2.hlines(slo["latency_ms"], j - width / 2, j + 0.8 - width / 2, colors="red", linestyles="dashed")
    centre = [j + 0.4 - width / 2 for j in range(len(names))]
    for ax, ylabel in ((ax1, "throughput (req/s)"), (ax2, "p99 latency (ms); dashed: SLO")):
        ax.set_xticks(centre, names)
        ax.set_ylabel(ylabel)
    ax2.set_yscale("log")
    ax1.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
