"""The demo's data preparation: per-task low-quality demonstrations."""

from __future__ import annotations

import json

import pytest

from sftjuice.config import SftjuiceError
from sftjuice.demo import DemoConfig, baseline_of, prepare_data, stage_config, stages
from sftjuice.verifiers import check_steps, exact


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multistep_low_quality_rows_are_wrong_steps(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), task="multistep_arithmetic", train_size=40, test_size=8,
                     low_quality_fraction=0.3, seed=3)
    assert cfg.new_tokens == 64 and cfg.verifier_name == "exact"
    train, _, test = prepare_data(cfg, tmp_path)
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


def test_validation_rows_are_clean_and_disjoint_from_training_and_test_rows(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), train_size=30, validation_size=12, test_size=10, low_quality_fraction=0.5)
    train, validation, test = (rows(p) for p in prepare_data(cfg, tmp_path))
    questions = [{r["prompt"] for r in part} for part in (train, validation, test)]
    assert len(validation) == 12 and not questions[1] & questions[0] and not questions[1] & questions[2]
    assert not any(r.get("low_quality") for r in validation)
    with pytest.raises(SftjuiceError, match="--train-size 2000 \\+ --validation-size 64: must be <="):
        DemoConfig(train_size=2000)


def test_a_folder_prepared_before_validation_existed_is_reused(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), train_size=20, test_size=4)
    prepare_data(cfg, tmp_path)
    record = tmp_path / "data" / "settings.json"
    old = json.loads(record.read_text())
    del old["validation_size"]
    record.write_text(json.dumps(old))
    (tmp_path / "data" / "validation.jsonl").unlink()
    assert len(rows(prepare_data(cfg, tmp_path)[1])) == 64


def test_stages_start_from_sft_best_and_continued_sft_is_early_stopped(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), methods=["sft", "irft"], max_epochs=5)
    plan = stages(cfg)
    assert [(s.name, s.start) for s in plan] == [("base", ""), ("sft-best", "base"), ("sft-best+sft", "sft-best"),
                                                  ("sft-best+irft", "sft-best")]
    assert baseline_of(cfg) == "sft-best+sft"
    configs = {s.name: stage_config(cfg, s, "m", "b", "train.jsonl", "val.jsonl", tmp_path / s.name) for s in plan[1:]}
    best, more, irft = configs["sft-best"], configs["sft-best+sft"], configs["sft-best+irft"]
    for c in (best, more):
        assert (c.eval_data, c.eval_size, c.verifier, c.epochs, c.patience) == ("val.jsonl", 64, "exact", 5.0, 2)
    assert best.learning_rate == 5e-5 and more.learning_rate == 2e-5  # SFT's default; continued SFT's tuned rate
    assert irft.eval_data == "val.jsonl" and irft.epochs == 1.0  # IRFT's margins on validation rows, never test rows
    multistep = DemoConfig(output=str(tmp_path), task="multistep_arithmetic", methods=["sft"])
    assert stage_config(multistep, stages(multistep)[2], "m", "b", "t", "v", tmp_path / "y").learning_rate == 5e-6

    old = DemoConfig(output=str(tmp_path), methods=["sft", "sft3"], start="sft")
    plan = stages(old)
    assert [s.name for s in plan] == ["base", "sft", "sft+sft", "sft+sft3"] and baseline_of(old) == "sft+sft"
    one = stage_config(old, plan[1], "m", "b", "train.jsonl", "val.jsonl", tmp_path / "sft")
    assert one.eval_data is None and one.epochs == 1.0
    assert stage_config(old, plan[3], "m", "b", "t", "v", tmp_path / "x").epochs == 3.0
