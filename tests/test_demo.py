"""The demo's data preparation: per-task low-quality demonstrations."""

from __future__ import annotations

import json

import pytest

from sftjuice.config import SftjuiceError
from sftjuice.demo import DemoConfig, prepare_data
from sftjuice.verifiers import check_steps, exact


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multistep_low_quality_rows_are_wrong_steps(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), task="multistep_arithmetic", train_size=40, test_size=8,
                     low_quality_fraction=0.3, seed=3)
    assert cfg.new_tokens == 64 and cfg.verifier_name == "exact"
    train, test = prepare_data(cfg, tmp_path)
    got, test_rows = rows(train), rows(test)
    assert len(got) == 40 and len(test_rows) == 8 and all("answer" in r for r in test_rows)
    bad = [r for r in got if r.get("low_quality")]
    assert len(bad) == 12
    for r in bad:
        assert exact(r["prompt"], r["completion"], r["correct_answer"]) == 0.0  # the wrong answer does not verify
        assert not all(check_steps(r["prompt"], r["completion"]))  # a wrong or missing step
        assert r["answer"] != r["correct_answer"]  # the row claims what its demonstration says
        assert exact(r["prompt"], r["completion"], r["answer"]) == 1.0
    for r in got:
        if not r.get("low_quality"):
            assert exact(r["prompt"], r["completion"], r["answer"]) == 1.0 and all(check_steps(r["prompt"], r["completion"]))


def test_round_number_low_quality_is_another_answer(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), train_size=20, test_size=4, low_quality_fraction=0.5)
    assert cfg.new_tokens == 16
    got = rows(prepare_data(cfg, tmp_path)[0])
    bad = [r for r in got if r.get("low_quality")]
    assert len(bad) == 10 and all(exact(r["prompt"], r["completion"], r["correct_answer"]) == 0.0 for r in bad)
    with pytest.raises(SftjuiceError, match="other settings"):
        prepare_data(DemoConfig(output=str(tmp_path), train_size=30, test_size=4, low_quality_fraction=0.5), tmp_path)


def test_unknown_task_and_method(tmp_path):
    with pytest.raises(SftjuiceError, match="not a demo task"):
        DemoConfig(task="nope")
    with pytest.raises(SftjuiceError, match="unknown"):
        DemoConfig(methods=["sft", "dpo"])
    assert DemoConfig(methods=["sft", "sft3"]).methods == ["sft", "sft3"]


def test_low_quality_rows_are_not_the_rows_an_epoch_puts_last(tmp_path):
    """The wrong rows are drawn from a stream of their own: drawn with random.Random(seed),
    the stream that also orders the epochs, they were exactly the epoch's last rows (seed 0),
    so every wrong demonstration fell in the last round and the last batches."""
    from sftjuice.data import epoch_order

    for seed in range(4):
        cfg = DemoConfig(output=str(tmp_path / str(seed)), train_size=40, test_size=4, low_quality_fraction=0.25, seed=seed)
        got = rows(prepare_data(cfg, tmp_path / str(seed))[0])
        bad = {i for i, r in enumerate(got) if r.get("low_quality")}
        order = epoch_order(40, seed, 0)
        assert len(bad) == 10 and bad != set(order[-10:])
        assert len(bad & set(order[:20])) >= 2  # some wrong rows in the epoch's first half
