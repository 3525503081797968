"""The Python API as the README shows it, and the per-method configs' checks."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sftjuice.cli import main
from sftjuice.config import SFTConfig

from .conftest import REPO, read_metrics, run_cli, write_jsonl


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
    from sftjuice import train

    for precision in ("false", "true", "false"):
        out = tmp_path / precision / str(len(list(tmp_path.iterdir())))
        train(SFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(out), epochs=0.25, bf16=precision))
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps and (out / "final" / "config.json").exists()


METHODS = ["sft", "irft", "spin", "rft", "srppo", "rso", "steps", "rest"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_no_tuning_flags(method, wrong_task_model_dir, tmp_path):
    """Only --model, --data and --output, as a user starts: --model is the final/ of an sftjuice
    SFT run (whose manifest names its base, which srppo and rso's implicit reward need) and the
    data is four rows of the task it learned, so its answers end and some verify (rest trains
    on those; rso needs candidates whose rewards differ). Every default is the method's own."""
    from safetensors.torch import load_file

    rows = (REPO / "src/sftjuice/demo_data/numbers__place_value.train.jsonl").read_text().splitlines()[:4]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "o"
    args = ["train", "--method", method, "--model", wrong_task_model_dir, "--data", data, "--output", out]
    if method == "rso":  # its default reward is a reward model, which no SFT run names: one line says so
        refused = run_cli(*args, check=False)
        assert refused.returncode == 2 and not out.exists()
        assert refused.stderr.strip().splitlines()[-1] == (
            "sftjuice train: error: --method rso needs --reward-model DIR (a sequence-classification reward with the "
            "policy's tokenizer, e.g. an RFT run's OUTPUT/reward_model), or --reward implicit")
        args += ["--reward", "implicit"]
    done = run_cli(*args)
    assert done.stdout.strip().splitlines()[-1] == f"trained model: {out / 'final'}"
    assert json.loads((out / "manifest.json").read_text())["method"] == method
    steps = [m for m in read_metrics(out) if "event" not in m]
    assert steps and all(math.isfinite(m["loss"]) for m in steps)
    start, end = load_file(wrong_task_model_dir / "model.safetensors"), load_file(out / "final/model.safetensors")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)  # it stepped


@pytest.mark.parametrize("argv, message", [
    (["--method", "sft", "--beta", "0.5"], "--beta is not used by --method sft; methods that take it: irft, spin, steps, rso"),
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
