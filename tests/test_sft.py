"""SFT: the loss against a hand computation, outputs, config, distributed runs (kill and resume: test_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftjuice.algorithms import sft
from sftjuice.config import SFTConfig, TrainConfig, parse_args
from sftjuice.training import start_run

from .conftest import REPO, per_token_nll, read_metrics, run_cli, sort_rows, write_jsonl


def test_sft_loss_is_mean_nll_of_completion_tokens(tiny_model_dir, demo_file, tmp_path):
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(tmp_path / "o"),
                    per_device_batch_size=2, learning_rate=1e-9)
    run = start_run(cfg)
    learner = run.learner(run.policy_model, cfg.learning_rate, 1)
    items = run.examples[:5]  # 3 micro-batches of 2, 2, 1 with different lengths
    stats = learner.step(items, sft.sft_micro_loss(learner), sft.completion_tokens)

    model = run.policy
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in items:  # one unpadded sequence at a time, full log-softmax
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logp = model(ids).logits[0].log_softmax(-1)
            for t, tok in enumerate(e.completion_ids):
                nll -= logp[len(e.prompt_ids) + t - 1, tok].item()
                count += 1
    assert stats["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_sft_gradient_matches_a_single_full_batch(tiny_model_dir, demo_file, tmp_path):
    """Micro-batching (length-sorted, padded, accumulated) must not change the gradient."""
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(tmp_path / "o"),
                    per_device_batch_size=2, max_grad_norm=0.0)
    run = start_run(cfg)
    learner = run.learner(run.policy_model, cfg.learning_rate, 1)
    items = run.examples[:6]
    loss_fn = sft.sft_micro_loss(learner)
    learner.optimizer.step = lambda: None  # keep the gradient, skip the update
    learner.optimizer.zero_grad = lambda set_to_none=True: None
    learner.step(items, loss_fn, sft.completion_tokens, length=len)  # sorted into micro-batches
    accumulated = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    learner.model.zero_grad()
    loss, _ = loss_fn(items)
    (loss / sft.completion_tokens(items)).backward()
    for n, p in learner.model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, rtol=1e-4, atol=1e-7)


def test_config_file_sets_options_and_flags_win(tmp_path):
    (tmp_path / "c.yaml").write_text("learning-rate: 0.001\nepochs: 3\nlora: true\ndata: d.jsonl\n")
    cfg = parse_args(TrainConfig, ["--config", str(tmp_path / "c.yaml"), "--epochs", "2"], prog="t")
    assert (cfg.learning_rate, cfg.epochs, cfg.lora, cfg.data) == (0.001, 2.0, True, "d.jsonl")
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    from sftjuice.config import SftjuiceError

    with pytest.raises(SftjuiceError, match="bad.yaml: unknown option --learning-rat"):
        parse_args(TrainConfig, ["--config", str(tmp_path / "bad.yaml")], prog="t")


TRAIN = ["--epochs", "2", "--learning-rate", "1e-3", "--seed", "3"]


def test_final_directory_round_trip(tiny_model_dir, demo_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "o"
    run_cli("train", "--model", tiny_model_dir, "--data", demo_file, "--output", out, *TRAIN)
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    trained = load_file(ckpt / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in trained:
            torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_lora_adapter_and_merged_model(tiny_model_dir, demo_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    run_cli("train", "--model", tiny_model_dir, "--data", demo_file, "--output", out, *TRAIN,
            "--lora", "--lora-r", "4", "--merge-lora")
    assert (out / "final" / "adapter_config.json").exists()
    adapted = AutoModelForCausalLM.from_pretrained(out / "final")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 216, 34, 2]])
    with torch.no_grad():
        a, m, b = adapted(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, m, rtol=1e-4, atol=1e-4)
    assert (a - b).abs().max() > 1e-3  # the adapter learned something


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, demo_file, tmp_path):
    common = ["train", "--model", tiny_model_dir, "--data", demo_file, *TRAIN, "--per-device-batch-size", "2"]
    run_cli(*common, "--output", tmp_path / "one", "--gradient-accumulation-steps", "2")
    accelerate = Path(sys.executable).parent / "accelerate"
    run_cli(*common, "--output", tmp_path / "two", "--pack",  # packed under DDP: still the padded run's numbers
            # accelerate 1.15: "--cpu" with several processes needs mpirun and silently starts one;
            # "--multi_gpu" on a machine without GPUs starts real processes over gloo (MULTI_CPU)
            launcher=[str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sftjuice.cli"])
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 12
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    w1, w2 = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5)


@pytest.mark.realmodel
def test_real_default_model_loads_and_answers(default_model_dir):
    from sftjuice.config import ModelConfig, SamplingConfig
    from sftjuice.data import ChatFormat
    from sftjuice.generation import sample
    from sftjuice.models import load_policy, load_tokenizer, stop_token_ids

    model = load_policy(ModelConfig(), default_model_dir, trainable=False)
    tok = load_tokenizer(default_model_dir)
    chat = ChatFormat(tok, stop_token_ids(model))
    prompt = chat.prompt_ids([{"role": "user", "content": "What is 2+3?"}])
    [[s]] = sample(model, [prompt], SamplingConfig(temperature=0, max_new_tokens=12), chat.stop_token_ids,
                   tok.pad_token_id, seed=0, progress=False)
    text = chat.decode(s.token_ids)
    assert "5" in text and s.finished, text
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_report_to_tensorboard_writes_the_numbers_of_metrics_jsonl(tiny_model_dir, demo_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    run_cli("train", "--model", tiny_model_dir, "--data", demo_file, "--output", out, *TRAIN, "--report-to", "tensorboard")
    assert list((out / "sftjuice").glob("events.out.tfevents.*"))  # real event files (the config in a subfolder)
    acc = EventAccumulator(str(out / "sftjuice"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    expected = [(m["step"], m["loss"]) for m in read_metrics(out)]
    assert [s for s, _ in logged] == [s for s, _ in expected] and len(expected) == 6
    for (_, a), (_, b) in zip(logged, expected):
        assert a == pytest.approx(b, rel=1e-6)


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb transaction log: a 7-byte header (":W&B", magic, version),
    then LevelDB's log format, 32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last) whose tail under 7 bytes is padding."""
    data, block, pos, records, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    return records


def test_report_to_wandb_offline_logs_the_numbers_of_metrics_jsonl(tiny_model_dir, demo_file, tmp_path):
    """W&B in offline mode (no account, no network): the history in the run's .wandb file
    holds metrics.jsonl's losses at their steps."""
    pytest.importorskip("wandb")
    from wandb.proto.wandb_internal_pb2 import Record

    out = tmp_path / "o"
    run_cli("train", "--model", tiny_model_dir, "--data", demo_file, "--output", out, *TRAIN, "--report-to", "wandb",
            env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    # accelerate 1.10 (not 1.15) restarts an offline run to give it the config: the history is in the last one
    run_file = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))[-1]
    logged = []
    for data in wandb_records(run_file):
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                logged.append((items["_step"], items["train/loss"]))
    expected = [(m["step"], m["loss"]) for m in read_metrics(out)]
    assert [s for s, _ in logged] == [s for s, _ in expected] and len(expected) == 6
    for (_, a), (_, b) in zip(logged, expected):
        assert a == pytest.approx(b, rel=1e-6)


def test_the_example_fsdp_and_deepspeed_configs_parse_as_such():
    """FSDP cannot run on CPU processes through accelerate 1.15: it turns FSDP on only for
    accelerator backends (state.py: MULTI_GPU, MULTI_NPU, ...), and CPU processes stay plain
    DDP over gloo. So the examples are checked as accelerate reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(REPO / "examples/accelerate/fsdp.yaml"))
    assert str(fsdp.distributed_type) == "DistributedType.FSDP" and fsdp.num_processes == 2
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    ds = load_config_from_file(str(REPO / "examples/accelerate/deepspeed_zero2.yaml"))
    assert str(ds.distributed_type) == "DistributedType.DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 2


def test_progress_bars_show_on_a_terminal_with_a_rate_and_hide_with_quiet(tiny_model_dir, demo_file, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    def on_terminal(*extra: str) -> str:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size
        cmd = [sys.executable, "-m", "sftjuice.cli", *extra, "train", "--model", str(tiny_model_dir), "--data",
               str(demo_file), "--output", str(tmp_path / f"o{len(extra)}"), "--epochs", "1"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=follower, stderr=follower)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait() == 0
        return out.decode(errors="replace")

    shown = on_terminal()
    assert "training: 100%" in shown and ("step/s" in shown or "s/step" in shown)
    quiet = on_terminal("--quiet")
    assert "training:" not in quiet and "INFO" not in quiet and "trained model:" in quiet


# ------------------------------------------------------------ early stopping (--eval-data)


def fresh_heldout_nll(model_dir: Path, held: Path, tokenizer) -> float:
    """Mean over the held-out rows of the reference's per-token NLL, by a plain forward pass."""
    from transformers import AutoModelForCausalLM

    from sftjuice.data import ChatFormat, load_demonstrations
    from sftjuice.models import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = ChatFormat(tokenizer, stop_token_ids(model)).encode(load_demonstrations(held), 512, 1024)
    return per_token_nll(model, examples) / len(examples)


def assert_is_the_best_epoch(final: Path, held: Path, tokenizer, nll: list[float]) -> None:
    """final/ is the epoch whose held-out NLL is lowest: a fresh forward pass gives that epoch's
    value. The tolerance is what batched and one-at-a-time fp32 sums differ by (1.05e-5 relative
    on some of these CPUs), and the nearest other epoch lies beyond three times it."""
    rel = 3e-5
    best = nll.index(min(nll))
    assert min(abs(n - nll[best]) for i, n in enumerate(nll) if i != best) > 3 * rel * nll[best], nll
    assert fresh_heldout_nll(final, held, tokenizer) == pytest.approx(nll[best], rel=rel), nll


def early_stopping_run(tiny_model_dir, tmp_path, **options):
    rows = sort_rows(40)
    data, held = write_jsonl(tmp_path / "d.jsonl", rows[:16]), write_jsonl(tmp_path / "h.jsonl", rows[16:])
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"), per_device_batch_size=4,
                    lr_scheduler="constant", eval_data=str(held), **options)
    final = sft.train(cfg)
    return final, held, [m for m in read_metrics(tmp_path / "o") if m.get("event") == "validation"]


def test_early_stopping_on_heldout_nll_keeps_the_best_epoch(tiny_model_dir, tokenizer, tmp_path):
    # lr 1e-2 on 16 rows overfits: the held-out NLL falls, then rises
    final, held, curve = early_stopping_run(tiny_model_dir, tmp_path, epochs=8.0, learning_rate=1e-2, patience=2)
    nll = [c["nll"] for c in curve]
    best = nll.index(min(nll))
    assert [c["epoch"] for c in curve] == list(range(1, len(curve) + 1))
    assert [c["step"] for c in curve] == [4 * c["epoch"] for c in curve]
    assert 0 < best < len(curve) - 1, f"no interior best epoch to keep: {nll}"  # the case worth testing
    assert len(curve) == min(8, best + 1 + 2), "stopped before or after --patience epochs without a better one"
    assert_is_the_best_epoch(final, held, tokenizer, nll)
    assert json.loads((final / sft.SELECTED).read_text())["epoch"] == best + 1
    assert not (final.parent / "best").exists()


def test_early_stopping_by_verifier_breaks_equal_accuracies_by_heldout_nll(tiny_model_dir, tokenizer, tmp_path):
    # the tiny random model answers no sort question right: every epoch ties at 0, and the NLL decides
    final, held, curve = early_stopping_run(tiny_model_dir, tmp_path, epochs=8.0, learning_rate=1e-2, patience=2,
                                            verifier="exact", max_new_tokens=6)
    assert {c["accuracy"] for c in curve} == {0.0}
    nll = [c["nll"] for c in curve]
    best = nll.index(min(nll))
    assert 0 < best < len(curve) - 1 and len(curve) == min(8, best + 1 + 2), nll
    assert_is_the_best_epoch(final, held, tokenizer, nll)


def test_best_epoch_and_patience_rules():
    curve = [{"epoch": 1, "accuracy": 0.3, "nll": 1.0}, {"epoch": 2, "accuracy": 0.5, "nll": 0.9},
             {"epoch": 3, "accuracy": 0.5, "nll": 0.8}, {"epoch": 4, "accuracy": 0.4, "nll": 0.7}]
    assert sft.best_of(curve)["epoch"] == 3  # accuracy first; equal accuracies: the lower NLL
    assert sft.best_of([{k: v for k, v in e.items() if k != "accuracy"} for e in curve])["epoch"] == 4
    assert sft.best_of(curve[:2] + [{**curve[2], "nll": 0.9}])["epoch"] == 2  # a full tie keeps the earlier
    assert sft.patience_spent(curve, 1) and not sft.patience_spent(curve, 2) and not sft.patience_spent(curve[:3], 1)


def test_a_verifier_without_heldout_data_is_refused_in_one_line(tiny_model_dir, demo_file, tmp_path):
    proc = run_cli("train", "--model", tiny_model_dir, "--data", demo_file, "--output", tmp_path / "o",
                   "--verifier", "exact", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "sftjuice train: error: --verifier judges --eval-data: give both"


def test_a_run_started_before_an_option_existed_resumes(tiny_model_dir, demo_file, tmp_path):
    out = tmp_path / "o"
    args = ["train", "--model", tiny_model_dir, "--data", demo_file, "--output", out, *TRAIN]
    run_cli(*args)
    manifest = json.loads((out / "manifest.json").read_text())
    for new in ("eval_data", "eval_size", "patience", "verifier", "max_new_tokens"):
        del manifest["config"][new]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli(*args, "--resume").returncode == 0
    refused = run_cli(*args, "--resume", "--patience", "3", check=False)
    assert refused.returncode == 2 and "--patience 2 -> 3" in refused.stderr


def test_lora_early_stopping_keeps_the_best_adapter_and_merges_that_one(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    final, held, curve = early_stopping_run(tiny_model_dir, tmp_path, epochs=6.0, learning_rate=3e-2, patience=1,
                                            lora=True, lora_r=4, merge_lora=True)
    nll = [c["nll"] for c in curve]
    best = nll.index(min(nll))
    assert best < len(curve) - 1 and len(curve) == best + 2, nll  # the kept adapter is not the last one trained
    assert (final / "adapter_config.json").exists()
    assert fresh_heldout_nll(final, held, tokenizer) == pytest.approx(nll[best], rel=1e-5)
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 216, 34, 2]])
    with torch.no_grad():
        adapted = AutoModelForCausalLM.from_pretrained(final)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(final.parent / "merged")(ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
