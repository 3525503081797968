"""Resume is exact in every mode: a run killed with SIGKILL at seeded random moments (during
start-up, sampling, a step or a checkpoint write) and resumed each time ends with the same
weights, byte for byte, the same round files and the same metrics as a run never interrupted,
and never samples again what a killed run wrote. The harness is in conftest.py."""

from __future__ import annotations

import shutil
import time

import pytest

from .conftest import (assert_ends_as, assert_same_weights, kill_at_random_moments, read_metrics, resume, run_cli,
                       sort_rows, untimed, write_jsonl)

SMALL = ["--seed", "3", "--learning-rate", "1e-3", "--per-device-batch-size", "2", "--save-every", "1",
         "--keep-checkpoints", "2"]
SAMPLED = ["--max-new-tokens", "8", "--lr-scheduler", "constant"]
METHODS = {
    "sft": ["--method", "sft", "--epochs", "2"],
    # held-out rows = training rows: each epoch is better than the last, replaces OUTPUT/best and
    # is moved to final/ at the end (a kill may fall between any two of these)
    "sft-early-stopping": ["--method", "sft", "--epochs", "4", "--eval-data", "{data}", "--verifier", "exact",
                           "--max-new-tokens", "4", "--patience", "1"],
    "irft": ["--method", "irft", "--rounds", "2", "--passes", "2", *SAMPLED],
    "spin-keep-previous": ["--method", "spin", "--iterations", "2", "--keep-previous-round", *SAMPLED],
    "rft": ["--method", "rft", "--rounds", "2", "--reward-learning-rate", "1e-3", *SAMPLED],
    "srppo": ["--method", "srppo", "--rounds", "2", "--num-samples", "2", "--base-model", "{base}", *SAMPLED],
    "rso": ["--method", "rso", "--rounds", "2", "--reward", "implicit", "--base-model", "{base}", "--num-candidates", "4",
            "--num-accepted", "2", *SAMPLED],
    "steps": ["--method", "steps", "--rounds", "2", "--num-samples", "2", "--rollouts", "2", *SAMPLED],
}
KILLS = 3


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_killed_at_random_moments_and_resumed_ends_identical(method, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    # srppo/rso: the tiny model as its own base (a zero reward; resume does not care)
    args = ["train", "--model", tiny_model_dir, "--data", data, *SMALL,
            *[{"{base}": str(tiny_model_dir), "{data}": str(data)}.get(a, a) for a in METHODS[method]]]
    t0 = time.time()
    run_cli(*args, "--output", tmp_path / "straight")
    duration = time.time() - t0
    out = tmp_path / "killed"
    assert kill_at_random_moments(args, out, duration, seed=f"kill {method}", kills=KILLS) >= 2, \
        "the runs ended before they could be killed"
    resume(args, out)
    assert_ends_as(out, tmp_path / "straight")


@pytest.mark.slow
def test_a_second_run_into_a_used_folder_refuses_and_resume_lists_what_changed(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "o", *SMALL, "--method", "irft",
            "--rounds", "1", *SAMPLED]
    run_cli(*args)
    other = write_jsonl(tmp_path / "other.jsonl", sort_rows(9)[1:])
    again = run_cli(*[a if a != data else other for a in args], check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1] == (
        f"sftjuice train: error: {tmp_path / 'o'} is not empty (another run's files): use --resume to continue "
        "that run, --overwrite to delete it, or another --output")
    resumed = run_cli(*[a if a != data else other for a in args], "--resume", "--beta", "0.2", check=False)
    assert resumed.returncode == 2
    last = resumed.stderr.strip().splitlines()[-1]
    assert "was started with other settings: " in last and "--beta 0.1 -> 0.2" in last
    assert last.endswith("; the data changed (use --overwrite or another --output)")
    assert run_cli(*args, "--overwrite").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rft", "steps"])
@pytest.mark.parametrize("left", ["none", "mid-round"])
def test_resumed_from_an_earlier_checkpoint_ends_identical(method, left, tiny_model_dir, tmp_path):
    """The states a kill can leave, made exactly: no checkpoint yet (RFT logs its reward steps
    before its first one), or only a checkpoint inside the last round (whose round record sums
    steps from both sides of the resume). The metrics log must end as an uninterrupted run's."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    args = ["train", "--model", tiny_model_dir, "--data", data, *SMALL, *METHODS[method]]
    out = tmp_path / "killed"
    run_cli(*args, "--output", out)
    shutil.copytree(out, tmp_path / "straight")  # what the uninterrupted run left; then the kill's damage
    shutil.rmtree(out / "final")
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    for c in checkpoints if left == "none" else checkpoints[-1:]:  # keep-checkpoints 2: the last round's end, and before it
        shutil.rmtree(c)
    run_cli(*args, "--output", out, "--resume")
    assert_same_weights(tmp_path / "straight/final", out / "final")
    assert untimed(read_metrics(out)) == untimed(read_metrics(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "irft", "rft", "steps"])
def test_a_run_resumed_for_more_epochs_ends_as_one_run_for_all_of_them(method, tiny_model_dir, tmp_path):
    """With a constant schedule a run's rounds and steps do not depend on how many follow, so
    ``--resume --epochs 2`` on a finished one-epoch run equals a two-epoch run (the plateau
    benchmark validates each epoch this way)."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    options = ["--method", "sft"] if method == "sft" else METHODS[method]  # without sft's --epochs 2
    args = ["train", "--model", tiny_model_dir, "--data", data, *SMALL, *options, "--lr-scheduler", "constant"]
    run_cli(*args, "--epochs", "2", "--output", tmp_path / "straight")
    run_cli(*args, "--epochs", "1", "--output", tmp_path / "grown")
    run_cli(*args, "--epochs", "2", "--output", tmp_path / "grown", "--resume")
    assert_same_weights(tmp_path / "straight/final", tmp_path / "grown/final")
    assert untimed(read_metrics(tmp_path / "grown")) == untimed(read_metrics(tmp_path / "straight"))


def test_more_epochs_on_resume_are_refused_where_the_schedule_depends_on_the_total(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "o", *SMALL, "--method", "sft"]
    run_cli(*args, "--epochs", "1")
    grown = run_cli(*args, "--epochs", "2", "--resume", check=False)
    assert grown.returncode == 2 and "--epochs 1.0 -> 2.0" in grown.stderr.strip().splitlines()[-1]
