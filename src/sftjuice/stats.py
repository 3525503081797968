"""Statistics for the quality benchmark: a method's accuracy difference to a baseline.

Each method and the baseline are trained with several seeds and scored on the same
held-out prompts; ``scores[s][i]`` is seed ``s``'s score (0/1 correctness, or a value
in [0, 1]) on prompt ``i``. The reported figure is the mean difference method -
baseline with a bootstrap interval.

Why two levels. Two sources of chance move the difference: which prompts were drawn
(prompt sampling) and how each training run happened to go (training-seed variance).
Pooling the S x n scores as if they were S * n independent prompts ignores the second
and gives intervals that are too narrow when seeds disagree, so the bootstrap first
resamples seeds, then prompts within each resampled seed. Method and baseline of the
same seed share the prompt indices (they answered the same prompts), which pairs them:
the per-prompt difficulty cancels in the difference.

Why percentile. The statistic is a mean, its bootstrap distribution is close to
symmetric, and the percentile interval is simple, stays within the reachable range
and needs no variance formula for the two-level design (BCa's jackknife has no
obvious form here). Known limits: with few seeds the seed level is slightly
anti-conservative (resampling S values reproduces (S-1)/S of their variance and no
t-like widening), while resampling prompts inside each seed counts the
per-(seed, prompt) noise a second time, which is conservative; the two roughly offset
for moderate seed variance (see tests/test_stats.py for measured coverage).

``shared_prompts=True`` draws one set of prompt indices per resample and uses it for
every drawn seed (the "pigeonhole" bootstrap for crossed designs). Because all seeds
are scored on the same prompts, it is the variant that also accounts for prompts on
which the method's gain is concentrated (prompt x method interaction), which the
default per-seed draw shrinks by a factor of S; it is more conservative otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_ELEMENTS = 4_000_000  # index elements per vectorised chunk (~32 MB of int64)


@dataclass(frozen=True)
class Difference:
    """Mean difference method - baseline with a bootstrap interval."""

    mean: float  # observed mean over all (seed, prompt) of method - baseline
    low: float
    high: float
    seeds: int
    prompts: int
    level: float = 0.95

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies strictly on one side of 0 (a difference at this level)."""
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        return "better" if self.low > 0 else "worse" if self.high < 0 else "within noise"

    def points(self) -> str:
        """In points with the interval, as the reports print it: "+1.2 [-0.8, +3.2]"."""
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def _matrix(scores: list[list[float]], name: str) -> np.ndarray:
    rows = [list(r) for r in scores]
    if not rows or not rows[0]:
        raise ValueError(f"{name}: expected a non-empty list of seeds, each a non-empty list of prompt scores")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"{name}: seeds have different numbers of prompts {sorted(lengths)}; "
                         "every seed must be scored on the same prompts")
    m = np.asarray(rows, dtype=float)
    if not np.isfinite(m).all():
        raise ValueError(f"{name}: scores must be finite numbers")
    return m


def per_seed_means(scores: list[list[float]]) -> list[float]:
    """Mean score of each seed over its prompts."""
    return _matrix(scores, "scores").mean(axis=1).tolist()


def paired_bootstrap_difference(method: list[list[float]], baseline: list[list[float]], resamples: int = 10000,
                                seed: int = 0, level: float = 0.95, shared_prompts: bool = False) -> Difference:
    """Paired two-level bootstrap of mean(method - baseline).

    ``method[s][i]`` and ``baseline[s][i]`` are seed ``s``'s scores on prompt ``i`` (same
    shape). Each resample draws S seeds with replacement and, for each drawn seed, n prompt
    indices with replacement (the same indices for method and baseline); its statistic is
    the mean difference over the drawn (seed, prompt) cells. With one seed this is a plain
    paired bootstrap over prompts. The interval is the percentile interval at ``level``.
    """
    m, b = _matrix(method, "method"), _matrix(baseline, "baseline")
    if m.shape != b.shape:
        raise ValueError(f"method has shape {m.shape} (seeds, prompts) but baseline has {b.shape}; "
                         "both must score the same seeds on the same prompts")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")

    diff = m - b
    S, n = diff.shape
    flat = diff.ravel()
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, _CHUNK_ELEMENTS // (S * n))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        if S == 1:
            rows = np.zeros((k, 1, 1), dtype=np.int64)
        else:
            rows = rng.integers(0, S, size=(k, S, 1)) * n
        cols = rng.integers(0, n, size=(k, 1 if shared_prompts else S, n))
        stats[start:start + k] = flat[rows + cols].mean(axis=(1, 2))
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Difference(float(diff.mean()), float(low), float(high), S, n, level)
