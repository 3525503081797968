"""sftjuice.stats: the paired two-level bootstrap against hand cases, and its coverage on
simulated benchmarks with a known true difference and training-seed variance."""

from __future__ import annotations

import numpy as np
import pytest

from sftjuice.stats import Difference, paired_bootstrap_difference, per_seed_means

TRUE_D = 0.05
SEEDS, PROMPTS = 5, 200
REPLICATIONS = 200  # simulated experiments per regime
RESAMPLES = 1000  # bootstrap resamples per experiment (fewer than the default, for speed)


# ------------------------------------------------------------------------- hand cases


@pytest.mark.parametrize("shared", [False, True])
def test_identical_arms_give_zero(shared):
    base = [[1, 0, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]
    d = paired_bootstrap_difference(base, base, resamples=500, shared_prompts=shared)
    assert (d.mean, d.low, d.high, d.width) == (0.0, 0.0, 0.0, 0.0)
    assert (d.seeds, d.prompts) == (3, 5)
    assert not d.excludes_zero


@pytest.mark.parametrize("shared", [False, True])
def test_constant_shift_is_recovered_exactly(shared):
    base = [[0.0, 0.5, 0.25, 0.9], [0.3, 0.2, 0.7, 0.1]]
    method = [[x + 0.1 for x in row] for row in base]
    d = paired_bootstrap_difference(method, base, resamples=500, shared_prompts=shared)
    # exactly 0.1 up to float rounding of x + 0.1 - x
    assert d.mean == pytest.approx(0.1, abs=1e-12)
    assert d.low == pytest.approx(0.1, abs=1e-12) and d.high == pytest.approx(0.1, abs=1e-12)
    assert d.excludes_zero


def test_single_seed_resamples_prompts_only():
    rng = np.random.default_rng(0)
    method = (rng.random((1, 400)) < 0.6).astype(float)
    base = (rng.random((1, 400)) < 0.5).astype(float)
    d = paired_bootstrap_difference(method.tolist(), base.tolist(), resamples=2000)
    diff = method[0] - base[0]
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    assert d.seeds == 1 and d.mean == pytest.approx(diff.mean())
    # the percentile interval of a paired mean matches the normal interval closely
    assert d.low == pytest.approx(diff.mean() - 1.96 * se, abs=0.15 * se)
    assert d.high == pytest.approx(diff.mean() + 1.96 * se, abs=0.15 * se)


def test_deterministic_for_a_seed_and_summaries():
    method, base = [[1, 1, 0, 1], [1, 0, 0, 1]], [[0, 1, 0, 1], [1, 0, 0, 0]]
    a = paired_bootstrap_difference(method, base, resamples=300, seed=7)
    assert a == paired_bootstrap_difference(method, base, resamples=300, seed=7)
    assert a.low <= a.mean <= a.high and a.width == a.high - a.low
    assert per_seed_means(method) == [0.75, 0.5]


@pytest.mark.parametrize("method, base, match", [
    ([[1, 0, 1]], [[1, 0]], "shape"),
    ([[1, 0], [1, 1]], [[1, 0]], "shape"),
    ([[1, 0], [1]], [[1, 0], [1, 1]], "different numbers of prompts"),
    ([], [], "non-empty"),
    ([[]], [[]], "non-empty"),
    ([[1, float("nan")]], [[1, 0]], "finite"),
])
def test_bad_shapes_raise(method, base, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_difference(method, base, resamples=10)


@pytest.mark.parametrize("mean, low, high, shown", [
    (0.027, 0.004, 0.05, "+2.7 [+0.4, +5.0] better"), (-0.027, -0.05, -0.004, "-2.7 [-5.0, -0.4] worse"),
    (0.012, -0.008, 0.032, "+1.2 [-0.8, +3.2] within noise"),
    (0.01, 0.0, 0.02, "+1.0 [+0.0, +2.0] within noise"),  # an interval touching 0 does not exclude it
])
def test_a_difference_reads_in_points_with_its_verdict(mean, low, high, shown):
    d = Difference(mean=mean, low=low, high=high, seeds=3, prompts=700)
    assert f"{d.points()} {d.verdict}" == shown


def test_bad_level_raises():
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_difference([[1]], [[0]], level=95)


# ---------------------------------------------------------------------------- coverage


def simulate(rng: np.random.Generator, seed_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """One benchmark: SEEDS x PROMPTS 0/1 scores of the method and the baseline.

    Prompts are drawn fresh from the population (difficulty p_i ~ U(0.25, 0.75), shared by
    both arms); each training run (arm, seed) adds a seed effect ~ U with mean 0 and sd
    ``seed_sd``; the method adds TRUE_D. Everything stays inside [0, 1] (no clipping), so the
    population expectation of method - baseline is exactly TRUE_D.
    """
    p = rng.uniform(0.25, 0.75, PROMPTS)
    half = np.sqrt(3) * seed_sd
    p_method = p + TRUE_D + rng.uniform(-half, half, (SEEDS, 1))
    p_base = p + rng.uniform(-half, half, (SEEDS, 1))
    assert p_method.max() <= 1 and p_base.min() >= 0
    return (rng.random((SEEDS, PROMPTS)) < p_method).astype(float), (rng.random((SEEDS, PROMPTS)) < p_base).astype(float)


def coverage(seed_sd: float, sim_seed: int) -> tuple[float, float]:
    """Share of REPLICATIONS experiments whose interval covers TRUE_D: two-level, pooled-naive."""
    rng = np.random.default_rng(sim_seed)
    two = naive = 0
    for r in range(REPLICATIONS):
        method, base = simulate(rng, seed_sd)
        d = paired_bootstrap_difference(method.tolist(), base.tolist(), resamples=RESAMPLES, seed=r)
        # the mistake being fixed: the S x n cells pooled as one seed of S * n independent prompts
        p = paired_bootstrap_difference([method.ravel().tolist()], [base.ravel().tolist()], resamples=RESAMPLES, seed=r)
        two += d.low <= TRUE_D <= d.high
        naive += p.low <= TRUE_D <= p.high
    return two / REPLICATIONS, naive / REPLICATIONS


def test_coverage_with_moderate_seed_variance():
    # per-arm seed sd 0.03: the seed part of the difference (sd ~0.042 per seed) is as large as
    # the prompt-sampling noise of one seed's mean over 200 prompts (sd ~0.047).
    two, naive = coverage(seed_sd=0.03, sim_seed=1)
    print(f"moderate seed variance: two-level coverage {two:.3f}, pooled-naive {naive:.3f}")
    # nominal 0.95 +- 3 binomial sd for 200 replications (sd = sqrt(.95 * .05 / 200) = 0.0154)
    assert 0.904 <= two <= 0.996
    assert two > naive


def test_pooling_seeds_undercovers_with_strong_seed_variance():
    # per-arm seed sd 0.06: training-seed variance dominates. Pooling ignores it and covers far
    # less often. (With only 5 seeds the two-level interval is itself below nominal here,
    # ~0.9: 5 resampled seeds cannot show the full spread; more seeds is the remedy.)
    two, naive = coverage(seed_sd=0.06, sim_seed=2)
    print(f"strong seed variance: two-level coverage {two:.3f}, pooled-naive {naive:.3f}")
    assert naive < 0.8
    assert two > naive + 0.1


def test_shared_prompts_when_the_gain_sits_on_a_few_prompts():
    # Near-deterministic outcomes (greedy decoding): prompts are easy (0.97) or hard (0.03);
    # the method fixes a random 12.5% of the hard ones (+0.8), so TRUE_D = 0.5 * 0.125 * 0.8.
    # Which prompts were drawn now moves the difference for every seed alike; per-seed prompt
    # draws shrink that by a factor of SEEDS, one shared draw per resample does not.
    rng = np.random.default_rng(3)
    per_seed = shared = 0
    for r in range(REPLICATIONS):
        hard = rng.random(PROMPTS) < 0.5
        p = np.where(hard, 0.03, 0.97)
        helped = hard & (rng.random(PROMPTS) < 0.125)
        method = (rng.random((SEEDS, PROMPTS)) < p + 0.8 * helped).astype(float).tolist()
        base = (rng.random((SEEDS, PROMPTS)) < p).astype(float).tolist()
        a = paired_bootstrap_difference(method, base, resamples=RESAMPLES, seed=r)
        b = paired_bootstrap_difference(method, base, resamples=RESAMPLES, seed=r, shared_prompts=True)
        per_seed += a.low <= TRUE_D <= a.high
        shared += b.low <= TRUE_D <= b.high
    per_seed, shared = per_seed / REPLICATIONS, shared / REPLICATIONS
    print(f"gain on few prompts: per-seed prompt draws {per_seed:.3f}, shared prompt draws {shared:.3f}")
    assert 0.904 <= shared <= 0.996  # nominal 0.95 +- 3 binomial sd, as above
    assert shared > per_seed


def test_result_type():
    assert isinstance(paired_bootstrap_difference([[1]], [[0]], resamples=5), Difference)
