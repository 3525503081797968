"""The Python API as the README shows it, and the per-method configs' checks."""

from __future__ import annotations

import re

import pytest

from sftjuice.cli import main
from sftjuice.config import IRFTConfig, RFTConfig, SFTConfig, SPINConfig

from .conftest import REPO


def test_the_readme_example_runs(tiny_model_dir, demo_file, tmp_path, monkeypatch):
    """The README's Python block, run as written with the tiny model and data put in place."""
    from transformers import AutoModelForCausalLM

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    code = block.replace('"runs/sft/final"', repr(str(tiny_model_dir))).replace('"demos.jsonl"', repr(str(demo_file)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    for out in ("runs/irft", "runs/irft-mem"):
        assert (tmp_path / out / "final" / "config.json").exists()
        AutoModelForCausalLM.from_pretrained(tmp_path / out / "final")
    assert scope["final"] == tmp_path / "runs/irft-mem/final" or str(scope["final"]).endswith("runs/irft-mem/final")


def test_runs_of_either_precision_follow_each_other_in_one_process(tiny_model_dir, demo_file, tmp_path):
    """accelerate keeps one precision per process; a second train() with another --bf16 must still run in it."""
    import json

    from sftjuice import train

    for precision in ("false", "true", "false"):
        out = tmp_path / precision / str(len(list(tmp_path.iterdir())))
        train(SFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(out), epochs=0.25, bf16=precision))
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps and (out / "final" / "config.json").exists()


@pytest.mark.parametrize("cls", [SFTConfig, IRFTConfig, SPINConfig, RFTConfig])
def test_every_method_runs_with_no_tuning_flags(cls):
    cfg = cls(data="d.jsonl", output="o")
    assert cfg.method in ("sft", "irft", "spin", "rft")


@pytest.mark.parametrize("argv, message", [
    (["--method", "sft", "--beta", "0.5"], "--beta is not used by --method sft; methods that take it: irft, spin, rft, steps, rso"),
    (["--method", "spin", "--rounds", "3"], "--rounds is not used by --method spin; methods that take it: irft, rft, srppo, steps, rest, rso"),
    (["--method", "irft", "--top-p", "1.5"], "--top-p 1.5: must be > 0 and <= 1"),
    (["--method", "rft", "--num-samples", "1"], "--num-samples 1: must be >= 2"),
    (["--method", "irft", "--temperature", "-0.5"], "--temperature -0.5: must be >= 0"),
])
def test_train_options_are_checked_in_one_line(argv, message, capsys, tmp_path):
    assert main(["train", *argv, "--data", "d.jsonl", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"sftjuice train: error: {message}")  # later methods may follow in the list
    assert not (tmp_path / "o").exists()
