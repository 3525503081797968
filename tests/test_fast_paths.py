"""Every speed lever keeps the numbers: each fast path against the plain fp32 computation."""

from __future__ import annotations

import pytest
import torch

from sftjuice.data import collate, collate_packed, collate_shared
from sftjuice.losses import token_logprobs
from sftjuice.scoring import completion_logprobs, shared_logprobs, shared_rewards, token_logprobs_of

from .conftest import build_tiny_model, read_metrics, run_cli

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12]]
COMPLETIONS = [[21, 22, 2], [23, 2], [24, 25, 26, 27, 2], [28, 2]]  # two per prompt


def full_logprobs(model, prompt, completion):
    """The plain path: one unpadded sequence, logits at every position, full log-softmax."""
    logp = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    return torch.stack([logp[len(prompt) + t - 1, tok] for t, tok in enumerate(completion)])


def grads(model, value):
    return torch.autograd.grad(value, list(model.parameters()))


def test_completion_only_head_and_padding_match_the_plain_path(tokenizer):
    model = build_tiny_model(tokenizer, seed=3)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    fast = completion_logprobs(model, collate(prompts, COMPLETIONS, tokenizer.pad_token_id))
    for i, (p, c) in enumerate(zip(prompts, COMPLETIONS)):
        torch.testing.assert_close(fast[i, : len(c)], full_logprobs(model, p, c), rtol=0, atol=1e-5)
        assert (fast[i, len(c):] == 0).all()


def test_shared_prompt_forward_matches_separate_sequences(tokenizer):
    """Demonstration and sample share their prompt, computed once: same log-probs, same gradient."""
    model = build_tiny_model(tokenizer, seed=3)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    separate = completion_logprobs(model, collate(prompts, COMPLETIONS, tokenizer.pad_token_id))
    shared = shared_logprobs(model, collate_shared(PROMPTS, COMPLETIONS, tokenizer.pad_token_id))
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # an arbitrary loss of all four
    g_sep = grads(model, (separate.sum(-1) * weights).sum())
    g_sh = grads(model, (shared.sum(-1) * weights).sum())
    for a, b in zip(g_sep, g_sh):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)  # fp32 sums in another order


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_matches_the_padded_layouts_in_logprobs_and_gradients(tokenizer, attention):
    """--pack: one padding-free row with a block mask gives the padded layouts' log-probs and
    gradients, for one completion per prompt (SFT) and for two sharing their prompt (pairs)."""
    model = build_tiny_model(tokenizer, seed=3, attn_implementation=attention)
    pad = tokenizer.pad_token_id
    one_each = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # an arbitrary loss of all four
    for padded, packed in [(completion_logprobs(model, collate(one_each, COMPLETIONS, pad)),
                            completion_logprobs(model, collate_packed(one_each, COMPLETIONS, pad))),
                           (shared_logprobs(model, collate_shared(PROMPTS, COMPLETIONS, pad)),
                            shared_logprobs(model, collate_packed(PROMPTS, COMPLETIONS, pad)))]:
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
        assert (packed[~collate_shared(PROMPTS, COMPLETIONS, pad)["completion_mask"]] == 0).all()
        for a, b in zip(grads(model, (padded.sum(-1) * weights).sum()), grads(model, (packed.sum(-1) * weights).sum())):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)  # fp32 sums in another order


def test_packed_row_keeps_sequences_apart(tokenizer):
    """Changing one sequence's tokens changes no other sequence's log-probs in the packed row
    (attention never crosses a prompt, nor from one completion to its sibling)."""
    model = build_tiny_model(tokenizer, seed=3)
    pad = tokenizer.pad_token_id
    before = shared_logprobs(model, collate_packed(PROMPTS, COMPLETIONS, pad))
    changed = [list(c) for c in COMPLETIONS]
    changed[0][0] = 99  # the first prompt's first completion
    after = shared_logprobs(model, collate_packed([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12]], changed, pad))
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)
    other_prompt = shared_logprobs(model, collate_packed([PROMPTS[0], [1, 13, 12]], COMPLETIONS, pad))
    torch.testing.assert_close(other_prompt[:2], before[:2], rtol=0, atol=0)


def test_grouped_logprobs_match_one_sequence_at_a_time(tokenizer):
    """RFT's reference pass: each prompt once for its k completions, batched with padding."""
    model = build_tiny_model(tokenizer, seed=3)
    groups = [COMPLETIONS[:2], COMPLETIONS[2:]]
    out = token_logprobs_of(model, tokenizer.pad_token_id, PROMPTS, groups)
    with torch.no_grad():
        for p, g, rows in zip(PROMPTS, groups, out):
            for c, row in zip(g, rows):
                torch.testing.assert_close(torch.tensor(row), full_logprobs(model, p, c), rtol=0, atol=1e-5)


def test_learner_step_is_plain_adamw_on_the_globally_normalised_clipped_gradient(tiny_model_dir, demo_file, tmp_path):
    """A Learner's optimiser step (fused AdamW, loss summed over micro-batches and divided by
    the global token count, gradient clipped) equals plain AdamW on the mean NLL, over steps."""
    from sftjuice.algorithms.sft import completion_tokens, sft_micro_loss
    from sftjuice.config import SFTConfig
    from sftjuice.training import start_run

    cfg = SFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(tmp_path / "o"), learning_rate=1e-3,
                    weight_decay=0.01, max_grad_norm=0.5, per_device_batch_size=2, lr_scheduler="constant")
    run = start_run(cfg)
    plain = build_tiny_model(run.tokenizer, seed=0)
    plain.load_state_dict(run.policy_model.state_dict())
    learner = run.learner(run.policy_model, cfg.learning_rate, total_steps=3)
    assert learner.optimizer.optimizer.defaults["fused"]
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    examples = run.examples[:6]
    batch = collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], run.tokenizer.pad_token_id)
    for _ in range(3):
        learner.step(examples, sft_micro_loss(learner), completion_tokens, length=len)  # 3 micro-batches of 2
        loss = -completion_logprobs(plain, batch).sum() / completion_tokens(examples)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    moved = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), build_tiny_model(run.tokenizer, seed=0).parameters()))
    assert moved > 1e-3  # the steps did change the weights
    for a, b in zip(plain.parameters(), learner.unwrapped.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6)


def test_token_logprobs_without_the_full_log_softmax():
    logits = torch.randn(3, 5, 50, dtype=torch.float64) * 4
    ids = torch.randint(0, 50, (3, 5))
    expected = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids).double(), expected, rtol=0, atol=1e-5)  # fp32 result


@pytest.mark.realmodel
def test_default_model_conversion_stores_bf16_values_that_load_as_exact_fp32(default_model_dir):
    """The GGUF's dequantised weights sit between bf16 values, many exactly halfway, where the
    tiniest update flips their bf16 cast; the conversion rounds them to bf16 once, and the
    policy loads them as fp32 values on the bf16 grid."""
    from safetensors.torch import load_file

    from sftjuice.config import ModelConfig
    from sftjuice.models import load_policy

    stored = load_file(default_model_dir / "model.safetensors")
    assert {w.dtype for w in stored.values()} == {torch.bfloat16}
    model = load_policy(ModelConfig(), default_model_dir, trainable=False)
    for name, w in model.state_dict().items():
        assert w.dtype == torch.float32
        assert torch.equal(w, w.to(torch.bfloat16).float()), name


def test_bf16_autocast_training_tracks_fp32_over_several_steps(tiny_model_dir, demo_file, tmp_path):
    """bf16 autocast with fp32 master weights (on bf16-grid weights): the loss curve of
    several optimiser steps stays close to fp32's, not only at step 0."""
    args = ["train", "--model", tiny_model_dir, "--data", demo_file, "--per-device-batch-size", "4",
            "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--seed", "1"]
    run_cli(*args, "--output", tmp_path / "fp32", "--bf16", "false")
    run_cli(*args, "--output", tmp_path / "bf16", "--bf16")
    fp32 = [m["loss"] for m in read_metrics(tmp_path / "fp32")]
    bf16 = [m["loss"] for m in read_metrics(tmp_path / "bf16")]
    assert len(fp32) == 6 and fp32[-1] < fp32[0] - 0.1  # it is learning
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=5e-3)


@pytest.mark.parametrize("method", ["sft", "irft"])
def test_packed_training_follows_the_padded_run(tiny_model_dir, demo_file, tmp_path, method):
    """--pack changes the layout, not the training: every step's loss and gradient norm match
    the padded run's (fp32 sums in another order)."""
    args = ["train", "--method", method, "--model", tiny_model_dir, "--data", demo_file, "--per-device-batch-size", "4",
            "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--seed", "1",
            *(["--max-new-tokens", "8"] if method != "sft" else [])]  # the sampler is not what is compared
    run_cli(*args, "--output", tmp_path / "padded")
    run_cli(*args, "--output", tmp_path / "packed", "--pack")
    padded, packed = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")
    steps = [m for m in padded if "grad_norm" in m]
    assert len(steps) >= 6 and steps[-1]["loss"] != pytest.approx(steps[0]["loss"], rel=1e-2)  # it moved
    assert len(packed) == len(padded)
    for a, b in zip(padded, packed):
        for key in ("loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-6), (key, a)


def test_shared_prompt_rewards_match_separate_sequences(tiny_model_dir, tokenizer):
    from sftjuice.models import load_reward_model, reward_pad_id

    pad = reward_pad_id(tokenizer, [tokenizer.eos_token_id])
    model = load_reward_model(tiny_model_dir, pad_token_id=pad)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    plain = collate(prompts, COMPLETIONS, pad)  # one prompt per completion, HF's last-token read
    separate = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"],
                     position_ids=plain["position_ids"]).logits.squeeze(-1)
    shared = shared_rewards(model, collate_shared(PROMPTS, COMPLETIONS, pad))
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for a, b in zip(grads(model, (separate * weights).sum()), grads(model, (shared * weights).sum())):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)


def test_bf16_auto_measures_once_per_machine_and_follows_the_measurement(tmp_path, monkeypatch):
    import json

    from sftjuice.config import SFTConfig
    from sftjuice.models import bf16_is_fast, use_bf16

    monkeypatch.setenv("SFTJUICE_CACHE", str(tmp_path))
    monkeypatch.setenv("SFTJUICE_BF16", "auto")
    decided = bf16_is_fast()
    [(key, entry)] = json.loads((tmp_path / "bf16.json").read_text()).items()
    assert entry["bf16"] == decided == (entry["bf16_seconds"] < entry["fp32_seconds"] / 1.3)
    assert entry["fp32_seconds"] > 0 and entry["bf16_seconds"] > 0
    stamp = (tmp_path / "bf16.json").stat().st_mtime_ns
    assert use_bf16(SFTConfig(bf16="auto").bf16) is decided  # the cached decision, not a new measurement
    assert (tmp_path / "bf16.json").stat().st_mtime_ns == stamp
    assert use_bf16("false") is False and use_bf16("true") is True


def test_building_a_config_measures_nothing(tmp_path, monkeypatch):
    """Precision is settled when a run starts: a config with --bf16 auto stays "auto" and writes no cache."""
    from sftjuice.config import SFTConfig

    monkeypatch.setenv("SFTJUICE_CACHE", str(tmp_path))
    monkeypatch.setenv("SFTJUICE_BF16", "auto")
    assert SFTConfig(bf16="auto").bf16 == "auto"
    assert not (tmp_path / "bf16.json").exists()
