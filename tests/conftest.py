"""Shared fixtures: a tiny Llama built from a config, with the real SmolLM2 tokenizer; the
command line in a fresh process; the kill/resume harness."""

from __future__ import annotations

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests check the algorithms' arithmetic in fp32; bf16 has its own tests that ask for it
os.environ.setdefault("SFTJUICE_BF16", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from sftjuice.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).float()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """An HF directory holding a tiny random Llama and the real SmolLM2 tokenizer."""
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def wrong_task_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model after SFT on another task (place-value questions): a policy whose own
    answers are confident and unlike the sorting demonstrations, as a pretrained model's are."""
    from sftjuice.algorithms import sft
    from sftjuice.config import SFTConfig

    root = tmp_path_factory.mktemp("wrong_task")
    rows = (REPO / "src/sftjuice/demo_data/numbers__place_value.train.jsonl").read_text().splitlines()[:24]
    (root / "other.jsonl").write_text("\n".join(rows) + "\n")
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(root / "other.jsonl"), output=str(root / "run"), epochs=30,
                      per_device_batch_size=8, learning_rate=3e-3, lr_scheduler="constant", seed=4)
    return sft.train(cfg)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sort_rows(n: int = 24):
    """Demonstrations from the shipped demo data (real generator output)."""
    src = REPO / "src/sftjuice/demo_data/comparison__sort.train.jsonl"
    return [json.loads(line) for line in src.read_text().splitlines()[:n]]


@pytest.fixture
def demo_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "demos.jsonl", sort_rows())


def run_cli(*args: str, env: dict | None = None, check: bool = True, launcher: list[str] | None = None):
    """Run the real command line in a fresh process."""
    cmd = (launcher or [sys.executable, "-m", "sftjuice.cli"]) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def per_token_nll(model, examples) -> float:
    """Sum over ``examples`` of the completion's mean NLL per token, by a plain forward pass
    of each full sequence: what an ``sft_weight`` term adds to a pair loss, per unit weight."""
    total = 0.0
    with torch.no_grad():
        for e in examples:
            logp = model(torch.tensor([e.prompt_ids + e.completion_ids])).logits[0].log_softmax(-1)
            start = len(e.prompt_ids) - 1
            total -= sum(logp[start + t, tok].item() for t, tok in enumerate(e.completion_ids)) / len(e.completion_ids)
    return total


# ------------------------------------------------------------------ kill and resume


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith("seconds") and k != "time"} for m in records]


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)


def assert_ends_as(out: Path, straight: Path) -> None:
    """``out`` (stopped and resumed) ended as ``straight`` (never interrupted): the same weights
    byte for byte (RFT's reward model too), round files and metrics."""
    assert_same_weights(straight / "final", out / "final")
    if (straight / "reward_model").exists():
        assert_same_weights(straight / "reward_model", out / "reward_model")
    for f in sorted(straight.glob("rounds/*/*.jsonl")):
        assert (out / f.relative_to(straight)).read_text() == f.read_text(), f
    assert untimed(read_metrics(out)) == untimed(read_metrics(straight))


def round_files(out: Path) -> dict[Path, int]:
    """When each round file under ``out`` was written (ns)."""
    return {f: f.stat().st_mtime_ns for f in sorted(out.glob("rounds/*/*.jsonl"))}


def kill_at_random_moments(args: list, out: Path, duration: float, seed: str, kills: int = 3,
                           env: dict | None = None) -> int:
    """Run ``args --output out`` (then ``--resume``) ``kills`` times, each SIGKILLed at a seeded
    random moment of its life (start-up, sampling, a step, a checkpoint write) unless it ends
    first; ``duration`` is an uninterrupted run's. A resumed run rewrites no round file an
    earlier one wrote (it reads them back: no resampling). Returns how many were killed."""
    rng = random.Random(seed)
    killed, attempt, retimed = 0, 0, False
    while attempt < kills:
        written = round_files(out)
        fresh = not out.exists()
        cmd = [sys.executable, "-m", "sftjuice.cli", *map(str, args), "--output", str(out)] + ([] if fresh else ["--resume"])
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            # a resumed run has less left to do, so its moments come sooner (under load, three
            # resumes at the first run's scale could all finish)
            proc.wait(timeout=rng.uniform(0.2, 0.9) * duration / (1 + attempt))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            if fresh and not retimed:  # faster than the (cold) uninterrupted run: time a new try by this one
                duration, retimed = time.time() - started, True
                shutil.rmtree(out)
                continue
        attempt += 1
        assert {f: t for f, t in round_files(out).items() if f in written} == written, "a resumed run resampled"
    return killed


def resume(args: list, out: Path, env: dict | None = None) -> None:
    """``args --output out --resume`` to the end; it rewrites no round file (no resampling)."""
    written = round_files(out)
    run_cli(*args, "--output", out, "--resume", env=env)
    assert {f: t for f, t in round_files(out).items() if f in written} == written, "the resumed run resampled"


def pytest_terminal_summary(terminalreporter):
    """The stop-signal campaign's totals (test_reliability.py), when its tests ran."""
    import sys

    module = sys.modules.get(f"{__package__}.test_reliability") if __package__ else None
    line = module.campaign_summary() if module else None
    if line:
        terminalreporter.write_line(line)
