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
    save_figure(fig, path)


Series = list[tuple[str, list[float], list[float], list[tuple[float, float]] | None]]


def plot_lines(path: Path, series: Series, xlabel: str, ylabel: str, title: str) -> None:
    """One line per series: (label, xs, ys, optional (low, high) band), e.g. a metric across checkpoints."""
    plot_line_panels(path, [("", ylabel, series)], xlabel, title, columns=1)


def plot_line_panels(path: Path, panels: list[tuple[str, str, Series]], xlabel: str, title: str,
                     columns: int = 3) -> None:
    """Panels of lines, each (label, ylabel, series) as :func:`plot_lines` takes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 if columns == 1 else 4.8 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, ylabel, series) in zip(axes.flat, panels):
        for name, xs, ys, band in series:
            (line,) = ax.plot(xs, ys, marker="o", label=name)
            if band:
                ax.fill_between(xs, [lo for lo, _ in band], [hi for _, hi in band], color=line.get_color(), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps are whole numbers
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if label:
            ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_intervals(path: Path, panels: list[tuple[str, list[str], list[float], list[tuple[float, float]]]],
                   xlabel: str, title: str, columns: int = 3, sharex: bool = True) -> None:
    """Horizontal estimates with (low, high) intervals and a line at 0, one panel per
    (label, names, values, intervals), e.g. each method's difference to a baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    height = max(2.0, 0.35 * max((len(p[1]) for p in panels), default=1) + 1.2)
    fig, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, height * rows), squeeze=False, sharex=sharex)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, names, values, intervals) in zip(axes.flat, panels):
        ys = list(range(len(names)))[::-1]
        excludes = [lo > 0 or hi < 0 for lo, hi in intervals]
        err = [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]
        for y, v, e0, e1, strong in zip(ys, values, *err, excludes):
            ax.errorbar([v], [y], xerr=[[e0], [e1]], fmt="o", capsize=3, color="#c44e52" if strong else "#4c72b0")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys, names)
        ax.set_title(label)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a kill leaves the previous plot) and free it."""
    import matplotlib.pyplot as plt

    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))
