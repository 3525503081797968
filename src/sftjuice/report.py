"""Tables and plots of results."""

from __future__ import annotations

import json
from pathlib import Path

from .storage import atomic_write_text


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*columns), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(r.get(c, "")) for c in columns)) for r in rows]
    return "\n".join(lines)


def plot_bars(path: Path, names: list[str], panels: list[tuple[str, list[float], list[tuple[float, float]] | None]],
              title: str) -> None:
    """One bar chart per panel: (label, values, optional (low, high) intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (label, values, intervals) in zip(axes[0], panels):
        err = None
        if intervals:
            err = [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]
        ax.bar(names, values, yerr=err, capsize=4, color="#4c72b0")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_lines(path: Path, series: list[tuple[str, list[float], list[float], list[tuple[float, float]] | None]],
               xlabel: str, ylabel: str, title: str) -> None:
    """One line per series: (label, xs, ys, optional (low, high) band), e.g. a metric across checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, xs, ys, band in series:
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        if band:
            ax.fill_between(xs, [lo for lo, _ in band], [hi for _, hi in band], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))
