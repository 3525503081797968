"""Progress bars for every long phase (sampling, scoring, training, evaluation), with a rate.

Shown on a terminal, hidden when output goes to a file or pipe, and hidden everywhere by
``sftjuice --quiet COMMAND`` (or :data:`QUIET` from Python)."""

from __future__ import annotations

from tqdm.auto import tqdm

QUIET = False


def bar(total: int, desc: str, unit: str, show: bool = True, **kw) -> tqdm:
    """A bar over ``total`` units; ``show`` False (e.g. not the main process) hides it."""
    # disable=None: tqdm's own rule, hidden when stderr is not a terminal
    return tqdm(total=total, desc=desc, unit=unit, disable=True if QUIET or not show else None, dynamic_ncols=True, **kw)
