"""The quality benchmark's statistics path: per-seed per-prompt correctness -> the table row
of each method's difference to continued SFT (benchmarks/quality.py: summarise, table_row)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic(seed_shifts: dict[str, list[float]], prompts: int = 400, seed: int = 0) -> list[list[dict]]:
    """Stage results of len(shifts) seeds as demo.run_stages returns them. Prompt i has a
    difficulty q_i in [0.15, 0.75]; on seed s a stage answers it right when u_si < q_i + shift
    (u shared by all stages of the seed: the same prompt is hard for every model), so a
    stage's true difference to another is the mean of its shifts minus the other's."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.15, 0.75, size=prompts)
    seeds = len(next(iter(seed_shifts.values())))
    u = rng.uniform(size=(seeds, prompts))
    return [[{"stage": stage, "method": stage.split("+")[-1], "correct": (u[s] < q + shifts[s]).tolist(),
              "logprob_gap": {"mean": 1.0 + s}, "train_seconds": 10.0 * (s + 1), "eval_seconds": 2.0}
             for stage, shifts in seed_shifts.items()] for s in range(seeds)]


def test_a_known_difference_is_recovered_and_covered(quality):
    seeds = synthetic({"sft+sft": [0.0, 0.0, 0.0], "sft+irft": [0.08, 0.10, 0.12], "sft+spin": [-0.10, -0.10, -0.10],
                       "sft+rft": [0.0, 0.0, 0.0]})
    summaries = {s["stage"]: s for s in quality.summarise(seeds, resamples=4000)}
    assert summaries["sft+sft"]["difference"] is None

    irft = summaries["sft+irft"]
    correct = np.array([[r["correct"] for r in s if r["stage"] == "sft+irft"][0] for s in seeds], dtype=float)
    base = np.array([[r["correct"] for r in s if r["stage"] == "sft+sft"][0] for s in seeds], dtype=float)
    assert irft["accuracy_per_seed"] == pytest.approx(correct.mean(axis=1).tolist())
    assert irft["accuracy"] == pytest.approx(correct.mean())
    d = irft["difference"]
    assert d["mean"] == pytest.approx((correct - base).mean())
    assert d["low"] < 0.10 < d["high"] and d["low"] > 0 and d["verdict"] == "better"
    assert d["width"] == pytest.approx(d["high"] - d["low"]) and d["width"] < 0.08
    assert (d["wins"], d["ties"], d["losses"]) == (int(((correct - base) > 0).sum()), int((correct == base).sum()),
                                                  int(((correct - base) < 0).sum()))
    assert summaries["sft+spin"]["difference"]["verdict"] == "worse"
    assert summaries["sft+spin"]["difference"]["low"] < -0.10 < summaries["sft+spin"]["difference"]["high"]
    same = summaries["sft+rft"]["difference"]  # identical to the baseline on every prompt
    assert (same["mean"], same["low"], same["high"], same["verdict"]) == (0.0, 0.0, 0.0, "no difference")
    assert irft["train_seconds"] == pytest.approx(20.0) and irft["logprob_gap"] == pytest.approx(2.0)

    row = quality.table_row("numbers__round_number", "clean", irft)
    assert row["diff vs sft+sft [95%]"] == f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    assert row["verdict"] == "better" and row["width"] == f"{100 * d['width']:.1f}"
    assert row["accuracy (per seed)"].startswith(f"{irft['accuracy']:.1%} (")
    assert quality.table_row("t", "clean", summaries["sft+sft"])["diff vs sft+sft [95%]"] == "baseline"


def test_seed_disagreement_widens_the_interval(quality):
    """Two seeds gain 15 points and one loses 15: pooled as independent prompts this would be a
    clear +5; with seeds resampled the interval must include 0 and be wide."""
    seeds = synthetic({"sft+sft": [0.0, 0.0, 0.0], "sft+rft": [0.15, 0.15, -0.15]})
    d = next(s for s in quality.summarise(seeds, resamples=4000) if s["stage"] == "sft+rft")["difference"]
    assert d["low"] < 0 < d["high"] and d["verdict"] == "no difference" and d["width"] > 0.2


def test_round_diagnostics(quality, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join([
        '{"step": 1, "loss": 0.5}',
        '{"step": 2, "event": "round", "round": 0, "heldout_margin": 0.25}',
        '{"step": 4, "event": "round", "round": 1, "heldout_margin": 0.75}']))
    assert quality.round_diagnostics(tmp_path) == {"heldout_margin": [0.25, 0.75]}
    key, values = quality.rounds_mean([{"heldout_margin": [0.25, 0.75, 1.0]}, {"heldout_margin": [0.75, 0.25]}])
    assert (key, values) == ("heldout_margin", [0.5, 0.5])  # rounds every seed has
    assert quality.rounds_text(key, values) == "margin: 0.50 0.50"
    assert quality.rounds_mean([{}, {}]) == ("", []) and quality.rounds_text("", []) == ""
