"""How real machines fail a run, with real processes, files and signals: an optimiser that
diverges, two runs started into one folder, a damaged checkpoint, and a stop signal
(preemption). Each test asserts what the user sees (the exit status and the one line) and
what is left on disk (the weights, the checkpoints, metrics.jsonl)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftjuice.training import DIVERGED, FOLDER_IN_USE, PREEMPTED, checkpoint_problem

from .conftest import REPO, build_tiny_model, read_metrics, run_cli, sort_rows, write_jsonl
from .conftest import untimed
from .conftest import assert_same_weights


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "sftjuice.cli", "--quiet", *map(str, args)]


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def checkpoints(out: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in sorted((out / "checkpoints").glob("step-*"))}


# ----------------------------------------------------------------------- divergence


def test_a_diverging_learning_rate_is_skipped_then_stops_the_run(tiny_model_dir, tmp_path):
    """On the tiny model a learning rate of 1e8 makes step 1's update overflow the next
    forward pass: steps 2, 3 and 4 have a NaN loss, none of them reaches the weights, and the
    third in a row (--max-bad-steps 3) stops the run with status 3."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(24))
    out = tmp_path / "o"
    proc = run_cli("train", "--model", tiny_model_dir, "--data", data, "--output", out, "--per-device-batch-size", "4",
                   "--learning-rate", "1e8", "--lr-scheduler", "constant", "--save-every", "1", "--keep-checkpoints", "10",
                   check=False)
    assert proc.returncode == DIVERGED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (
        "sftjuice train: diverged at step 4: 3 optimiser steps in a row with a non-finite loss or gradient norm "
        "(loss nan, grad_norm nan; --max-bad-steps 3; each was skipped, so the weights are step 1's); last good "
        f"checkpoint: {out / 'checkpoints/step-0000003'}. Usual causes: --learning-rate 1e+08 too high, or bf16 "
        "overflow (--bf16 false)")
    metrics = read_metrics(out)
    assert [(m["step"], m["in_a_row"]) for m in metrics if m.get("event") == "nonfinite"] == [(2, 1), (3, 2), (4, 3)]
    steps = [m for m in metrics if "event" not in m]
    assert [m.get("nonfinite") for m in steps] == [None, 1, 1, 1]
    assert steps[0]["loss"] is not None and all(m["loss"] is None for m in steps[1:])  # JSON null, not NaN
    # the skipped steps left the weights as step 1 made them, finite
    saved = checkpoints(out)
    assert sorted(saved) == [1, 2, 3] and not (out / "final").exists()
    for step in (2, 3):
        assert_same_weights(saved[1], saved[step])
    assert all(torch.isfinite(w).all() for w in weights(saved[3]).values())


def test_a_nan_in_one_batch_is_skipped_and_training_goes_on(tokenizer, tmp_path):
    """A real fault in a real run: a model whose input embedding of one token (" zebra") is NaN,
    and one demonstration of twelve that uses it. Each epoch, the one step whose batch holds
    it is skipped (the weights and AdamW's state stay as they were, the schedule moves on);
    every other step trains; the run ends normally."""
    model_dir = tmp_path / "model"
    model = build_tiny_model(tokenizer, tie_word_embeddings=False)  # the NaN row feeds the input only
    [zebra] = tokenizer.encode(" zebra")
    with torch.no_grad():
        model.model.embed_tokens.weight[zebra] = float("nan")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = sort_rows(11) + [{"prompt": "Sort 3, zebra, 1 in ascending order.", "completion": "1, 3"}]
    data = write_jsonl(tmp_path / "demos.jsonl", rows)
    out = tmp_path / "o"
    run_cli("train", "--model", model_dir, "--data", data, "--output", out, "--per-device-batch-size", "4",
            "--epochs", "2", "--learning-rate", "1e-3", "--save-every", "1", "--keep-checkpoints", "100")
    metrics = read_metrics(out)
    bad = [m["step"] for m in metrics if m.get("event") == "nonfinite"]
    assert len(bad) == 2 and bad[0] <= 3 < bad[1] <= 6, bad  # one step in each epoch of 3 steps
    assert [m["step"] for m in metrics if m.get("nonfinite")] == bad
    saved = {0: model_dir, **checkpoints(out)}
    for step in range(1, 7):
        before, after = weights(saved[step - 1]), weights(saved[step])
        changed = [n for n in after if not torch.equal(before[n].nan_to_num(), after[n].nan_to_num())]
        assert (not changed) if step in bad else changed, (step, changed)
    final = weights(out / "final")
    embedding = final.pop("model.embed_tokens.weight")
    assert torch.isnan(embedding[zebra]).all() and torch.isfinite(embedding[:zebra]).all()
    assert all(torch.isfinite(w).all() for w in final.values())


# ------------------------------------------------------------------ two runs, one folder

LOCK_REPEATS = 10


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_one_proceeds(tiny_model_dir, tmp_path):
    """Started at the same moment, many times: each time exactly one run proceeds and ends
    normally, the other stops with status 4 and one line naming the first one's pid."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(24))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--per-device-batch-size", "1", "--epochs", "2"]
    for repeat in range(LOCK_REPEATS):
        out = tmp_path / f"o{repeat}"
        procs = [subprocess.Popen(cli(*args, "--output", out), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        ends = [(p.pid, p.wait(timeout=600), p.stderr.read()) for p in procs]
        (winner, code_w, _), (loser, code_l, err) = sorted(ends, key=lambda e: e[1])
        assert (code_w, code_l) == (0, FOLDER_IN_USE), (repeat, ends)
        assert last_line(err) == (f"sftjuice train: {out} is in use by another run (pid {winner}): wait for it to end, "
                                  "or use another --output")
        assert "Traceback" not in err
        assert (out / "final/model.safetensors").exists()
        assert [m["step"] for m in read_metrics(out)] == list(range(1, 49))  # one run's log, not two


@pytest.mark.slow
def test_a_running_run_refuses_a_resume_and_a_killed_ones_lock_does_not(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(24))
    out = tmp_path / "o"
    args = ["train", "--model", tiny_model_dir, "--data", data, "--output", out, "--per-device-batch-size", "1",
            "--epochs", "4", "--save-every", "1"]
    first = subprocess.Popen(cli(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not checkpoints(out):  # any: --keep-checkpoints rotates the first ones away within a step or two
        assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused, it holds the lock however long the second takes to start
    second = run_cli(*args, "--resume", check=False)
    assert second.returncode == FOLDER_IN_USE, second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid})" in last_line(second.stderr)
    first.kill()
    first.wait()
    assert (out / ".lock").read_text().strip() == str(first.pid)  # a stale lock file, of a dead process
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0 and (out / "final").exists()


# ------------------------------------------------------------------ a damaged checkpoint

DAMAGED_ARGS = ["--per-device-batch-size", "4", "--epochs", "2", "--learning-rate", "1e-3", "--save-every", "1",
                "--keep-checkpoints", "3"]


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory) -> tuple[list, Path]:
    """A run of 12 steps never interrupted, moved aside to ``straight``; it keeps the
    checkpoints of steps 10, 11 and 12. Each test copies it back (to the --output its
    manifest names), damages the copy and resumes it."""
    root = tmp_path_factory.mktemp("damaged")
    data = write_jsonl(root / "demos.jsonl", sort_rows(24))
    args = ["train", "--model", tiny_model_dir, "--data", data, *DAMAGED_ARGS, "--output", root / "o"]
    run_cli(*args)
    os.replace(root / "o", root / "straight")
    assert sorted(checkpoints(root / "straight")) == [10, 11, 12]
    return args, root / "straight"


def damaged_copy(straight: Path) -> Path:
    out = straight.with_name("o")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final")  # as if stopped after its last checkpoint
    return out


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def garble(path: Path) -> None:  # the same size: found only by loading it
    with open(path, "r+b") as f:
        f.write(b"\0" * 4096)


# step -> how it is damaged; the run resumes from the newest step not named
DAMAGES = {
    "truncated-weights": {12: lambda c: truncate(c / "model.safetensors")},
    "missing-optimizer": {12: lambda c: (c / "optimizer.bin").unlink()},
    "missing-rng-state": {12: lambda c: (c / "random_states_0.pkl").unlink()},
    "missing-trainer-state": {12: lambda c: (c / "trainer_state.json").unlink()},
    # the weights load, then the optimiser does not: the next checkpoint must replace all of it
    "garbled-optimizer": {12: lambda c: garble(c / "optimizer.bin")},
    "two-damaged": {12: lambda c: truncate(c / "optimizer.bin"), 11: lambda c: (c / "model.safetensors").unlink()},
}
PROBLEMS = {"truncated-weights": "model.safetensors has", "missing-optimizer": "optimizer.bin is missing",
            "missing-rng-state": "random_states_0.pkl is missing", "missing-trainer-state": "trainer_state.json is missing",
            "garbled-optimizer": "does not load", "two-damaged": "optimizer.bin has"}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_and_an_earlier_one_resumed(damage, straight_run):
    args, straight = straight_run
    out = damaged_copy(straight)
    saved = checkpoints(out)
    for step, hurt in DAMAGES[damage].items():
        hurt(saved[step])
    proc = run_cli(*args, "--resume")
    warnings = [line for line in proc.stderr.splitlines() if "--resume:" in line]
    assert len(warnings) == len(DAMAGES[damage]), proc.stderr[-3000:]
    assert f"{saved[12]} is damaged (" in warnings[0] and PROBLEMS[damage] in warnings[0], warnings
    resumed_from = max(set(saved) - set(DAMAGES[damage]))
    assert f"resumed from {saved[resumed_from]} (step {resumed_from})" in proc.stderr
    assert_same_weights(straight / "final", out / "final")
    assert untimed(read_metrics(out)) == untimed(read_metrics(straight))
    assert all(checkpoint_problem(c) is None for c in checkpoints(out).values())


def test_no_whole_checkpoint_stops_with_a_choice(straight_run):
    args, straight = straight_run
    out = damaged_copy(straight)
    for c in checkpoints(out).values():
        truncate(c / "model.safetensors")
    before = {p: p.read_bytes() for p in [*out.glob("checkpoints/**/*"), out / "metrics.jsonl"] if p.is_file()}
    proc = run_cli(*args, "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (
        f"sftjuice train: error: --resume: no whole checkpoint in {out / 'checkpoints'} (all 3 damaged, the newest: "
        "step-0000012): start afresh with --overwrite, or put back a whole checkpoint")
    after = {p: p.read_bytes() for p in [*out.glob("checkpoints/**/*"), out / "metrics.jsonl"] if p.is_file()}
    assert after == before and not (out / "final").exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------- preemption

STOP_SIGNALS = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
PREEMPT = {  # methods with --save-every 0: a stop checkpoints mid-epoch / mid-round by itself
    "sft": ["--method", "sft", "--epochs", "2", "--per-device-batch-size", "1"],
    "irft": ["--method", "irft", "--rounds", "2", "--passes", "3", "--per-device-batch-size", "1",
             "--max-new-tokens", "8", "--lr-scheduler", "constant"],
    "steps": ["--method", "steps", "--rounds", "2", "--num-samples", "2", "--rollouts", "2", "--per-device-batch-size", "1",
              "--max-new-tokens", "8", "--lr-scheduler", "constant"],
    # RFT's reward steps are not checkpointed inside a round: a stop there comes after the first policy step
    "rft": ["--method", "rft", "--rounds", "2", "--policy-steps", "2", "--per-device-batch-size", "1",
            "--reward-learning-rate", "1e-3", "--max-new-tokens", "8", "--lr-scheduler", "constant"],
    "rso": ["--method", "rso", "--rounds", "2", "--reward", "implicit", "--base-model", "{base}", "--num-candidates", "4",
            "--num-accepted", "2", "--passes", "2", "--per-device-batch-size", "1", "--gradient-accumulation-steps", "1",
            "--max-new-tokens", "8", "--lr-scheduler", "constant"],
}
CAMPAIGN: dict[str, tuple[int, int]] = {}  # method -> (stops with a checkpoint, stops with nothing to save)


def campaign_summary() -> str | None:
    """e.g. ``stop signals: 15 stops (12 saved a checkpoint within one step, 3 had nothing to
    save), 5 of 5 resumed runs identical``: printed after the session by conftest's
    pytest_terminal_summary for the stop tests that ran (each asserts its own stops)."""
    if not CAMPAIGN:
        return None
    saved, nothing = sum(a for a, _ in CAMPAIGN.values()), sum(b for _, b in CAMPAIGN.values())
    return (f"stop signals: {saved + nothing} stops ({saved} saved a checkpoint within one step (RFT: or after its "
            f"reward pass), {nothing} had nothing to save), {len(CAMPAIGN)} of {len(CAMPAIGN)} resumed runs identical "
            f"({', '.join(CAMPAIGN)})")
STOPS = 4


def handlers_installed(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``proc`` catches SIGTERM (sftjuice's handlers, installed as the command line
    starts; before that, while the interpreter itself starts, a signal has its default action)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        except FileNotFoundError:  # it ended
            return
        mask = next(line for line in status if line.startswith("SigCgt"))
        if int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.005)


def logged_step(out: Path) -> int:
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines()[-5:] if line.endswith("}")]
    return max(steps, default=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", PREEMPT)
def test_stop_signals_at_random_moments_then_resume_ends_identical(method, tiny_model_dir, tmp_path):
    """SIGTERM, SIGUSR1 and SIGINT in turn: the first at a random moment of the run's life
    (start-up, sampling, a step, a checkpoint), the others at a random step of what is left,
    a random part of the way into it. Each stop comes within one step of its signal (the
    checkpoint's step against metrics.jsonl's last step when it was sent), exits 75 with one
    line naming the checkpoint and the --resume command; the resumed run ends with the
    weights, round files and metrics of a run never stopped."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8 if method != "sft" else 24))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--seed", "3", "--learning-rate", "1e-3",
            *[str(tiny_model_dir) if a == "{base}" else a for a in PREEMPT[method]]]
    t0 = time.time()
    run_cli(*args, "--output", tmp_path / "straight")
    duration = time.time() - t0
    total = max(m["step"] for m in read_metrics(tmp_path / "straight"))
    phases = {m["step"]: m.get("phase") for m in read_metrics(tmp_path / "straight") if "event" not in m}
    out = tmp_path / "stopped"
    rng = random.Random(f"stop {method}")
    stops, saved, tries = 0, 0, 0
    while stops < STOPS and tries < 3 * STOPS:
        tries += 1
        done = max(checkpoints(out), default=0) if (out / "checkpoints").exists() else 0
        if done >= total - 1:  # no step left to stop at: the stopped run starts over
            shutil.rmtree(out)
            done = 0
        target = rng.randint(done + 1, total - 1)
        started = time.time()
        fresh = not out.exists()
        proc = subprocess.Popen(cli(*args, "--output", out, *([] if fresh else ["--resume"])), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        handlers_installed(proc)
        if fresh:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.1, 0.9) * duration)
        else:
            while proc.poll() is None and logged_step(out) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            if fresh:  # it ran faster than the first (cold) one: time the next try by this one
                duration = time.time() - started
            shutil.rmtree(out)  # it ended before its signal (a fast machine runs the last steps within the wait)
            continue
        sig = STOP_SIGNALS[stops % len(STOP_SIGNALS)]
        before = logged_step(out)
        proc.send_signal(sig)
        after = logged_step(out)
        err = proc.communicate(timeout=300)[1]
        if (out / "final").exists():  # the signal came as the run ended, after its last checkpoint
            shutil.rmtree(out)
            continue
        assert proc.returncode == PREEMPTED, err[-3000:]
        last = last_line(err)
        resume = f"continue with: sftjuice {' '.join(map(str, args))} --output {out} --resume"
        assert last.startswith(f"sftjuice train: {sig.name}: stopped") and last.endswith(resume), last
        if "saved" in last:
            step = max(checkpoints(out))
            assert f"stopped after step {step}, saved {checkpoints(out)[step]};" in last
            limit = after + 1
            while phases.get(limit) == "reward":  # RFT checkpoints no reward step: it stops at the round's first policy step
                limit += 1
            assert before <= step <= limit, (before, step, after)
            saved += 1
        else:  # before the first step, or no step since the last checkpoint (e.g. while sampling)
            assert "with no optimiser step to save" in last
            assert logged_step(out) == max(checkpoints(out), default=0) or not (out / "checkpoints").exists()
        stops += 1
    assert stops >= 2, "the runs ended before they could be stopped"
    run_cli(*args, "--output", out, "--resume")
    assert_same_weights(tmp_path / "straight/final", out / "final")
    for f in sorted((tmp_path / "straight").glob("rounds/*/*.jsonl")):
        assert (out / f.relative_to(tmp_path / "straight")).read_text() == f.read_text(), f
    assert untimed(read_metrics(out)) == untimed(read_metrics(tmp_path / "straight"))
    CAMPAIGN[method] = (saved, stops - saved)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_accelerate_launch_a_signal_to_one_process_stops_all_after_the_same_step(tiny_model_dir, tmp_path):
    """Two processes (DDP over gloo); SIGTERM reaches rank 1 alone. Both stop after the same
    step, with one checkpoint of it, and the run resumed under the launcher ends with the
    weights of one never stopped."""
    import psutil

    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(24))
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sftjuice.cli"]
    args = ["train", "--model", tiny_model_dir, "--data", data, "--seed", "3", "--learning-rate", "1e-3",
            "--per-device-batch-size", "1", "--epochs", "3"]
    run_cli(*args, "--output", tmp_path / "straight", launcher=launcher)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(launcher + ["--quiet", *map(str, args), "--output", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while logged_step(out) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    [rank1] = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "sftjuice.cli" in c.cmdline() and c.environ().get("RANK") == "1"]
    before = logged_step(out)
    rank1.send_signal(signal.SIGTERM)
    after = logged_step(out)
    err = proc.communicate(timeout=300)[1]
    lines = [line for line in err.splitlines() if line.startswith("sftjuice train: ")]
    [step] = checkpoints(out)
    assert before <= step <= after + 1, (before, step, after)
    saved = f"stopped after step {step}, saved {out / 'checkpoints' / f'step-{step:07d}'}; continue with: accelerate launch"
    assert sorted(line.split(": stopped")[0] for line in lines) == [
        "sftjuice train: SIGTERM", "sftjuice train: a stop signal (to another process)"], err[-3000:]
    assert all(saved in line for line in lines), lines
    assert checkpoint_problem(checkpoints(out)[step]) is None
    run_cli(*args, "--output", out, "--resume", launcher=launcher)
    assert_same_weights(tmp_path / "straight/final", out / "final")
    assert untimed(read_metrics(out)) == untimed(read_metrics(tmp_path / "straight"))


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_damages_no_checkpoint(tiny_model_dir, tmp_path):
    """Two signals a random few milliseconds apart (the second may land in a checkpoint's
    write): the process dies by the second; every checkpoint left is whole, and the run
    resumes to the weights of one never stopped."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(24))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--seed", "3", "--learning-rate", "1e-3",
            "--per-device-batch-size", "1", "--epochs", "2", "--save-every", "2", "--keep-checkpoints", "2"]
    run_cli(*args, "--output", tmp_path / "straight")
    out = tmp_path / "stopped"
    rng = random.Random("twice")
    for attempt in range(3):
        proc = subprocess.Popen(cli(*args, "--output", out, *(["--resume"] if attempt else [])), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while logged_step(out) < 8 * (attempt + 1) + 1:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
        assert proc.returncode in (-signal.SIGTERM, PREEMPTED), proc.returncode  # 75: the first stop was quicker
        assert all(checkpoint_problem(c) is None for c in checkpoints(out).values())
    run_cli(*args, "--output", out, "--resume")
    assert_same_weights(tmp_path / "straight/final", out / "final")


# A harness for the start-up case: a real `sftjuice train` process that gets SIGTERM from inside
# the import of torch (a meta-path finder raises it as torch is looked up, then lets the usual
# finders load it), the moment at which raising the stop there could abort the process.
SIGNAL_IN_IMPORT = """
import signal, sys
class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGTERM)
        return None
sys.meta_path.insert(0, SignalOnImport())
from sftjuice.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_stop_signal_inside_an_import_stops_the_run_when_start_up_ends(tiny_model_dir, tmp_path):
    """A stop raised inside an import can unwind into a C extension's initialisation and abort
    the process (SIGABRT, seen once in CI as torch loaded). So a signal there is held until
    start-up ends: the run exits 75 with its one line after claiming its folder, before any
    step, and resumes to the weights of a run never stopped."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(24))
    args = ["train", "--model", tiny_model_dir, "--data", data, "--seed", "3", "--learning-rate", "1e-3",
            "--per-device-batch-size", "4"]
    out = tmp_path / "stopped"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_IMPORT, "--quiet", *map(str, args), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == PREEMPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (f"sftjuice train: SIGTERM: stopped, with no optimiser step to save yet; continue "
                                      f"with: sftjuice {' '.join(map(str, args))} --output {out} --resume")
    assert (out / "manifest.json").exists()  # start-up ran to its end: the folder is claimed
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    run_cli(*args, "--output", tmp_path / "straight")
    run_cli(*args, "--output", out, "--resume")
    assert_same_weights(tmp_path / "straight/final", out / "final")


# ------------------------------------------------------------------- scale of data


def test_a_bad_row_near_the_end_of_100k_rows_is_reported_before_training(tiny_model_dir, tmp_path):
    """The benchmark's case (benchmarks/data_scale.py) at 100k rows: the row at line 99,999 is
    named with its line before anything trains (no output folder is made), and with
    --skip-invalid it is counted and the other 99,999 rows are kept."""
    from sftjuice.data import load_demonstrations

    spec = importlib.util.spec_from_file_location("data_scale", REPO / "benchmarks/data_scale.py")
    data_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_scale)
    bad = tmp_path / "rows.jsonl"
    data_scale.write_rows(bad, 100_000, bad_line=99_999)
    proc = run_cli("--quiet", "train", "--model", tiny_model_dir, "--data", bad, "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (f"sftjuice train: error: {bad}:99999: field 'completion': empty completion "
                                      "(use --skip-invalid to skip such rows)")
    assert not (tmp_path / "o").exists()
    assert len(load_demonstrations(bad, skip_invalid=True)) == 99_999
