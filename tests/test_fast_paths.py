"""Every speed lever keeps the numbers: each fast path against the plain fp32 computation."""

from __future__ import annotations

import pytest
import torch

from sftjuice.data import collate, collate_shared
from sftjuice.losses import token_logprobs
from sftjuice.training import completion_logprobs, shared_prompt_logprobs

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
    shared = shared_prompt_logprobs(model, collate_shared(PROMPTS, COMPLETIONS, tokenizer.pad_token_id))
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # an arbitrary loss of all four
    g_sep = grads(model, (separate.sum(-1) * weights).sum())
    g_sh = grads(model, (shared.sum(-1) * weights).sum())
    for a, b in zip(g_sep, g_sh):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)  # fp32 sums in another order


def test_grouped_logprobs_match_one_sequence_at_a_time(tokenizer):
    """RFT's reference pass: each prompt once for its k completions, batched with padding."""
    from sftjuice.training import grouped_token_logprobs

    model = build_tiny_model(tokenizer, seed=3)
    groups = [COMPLETIONS[:2], COMPLETIONS[2:]]
    out = grouped_token_logprobs(model, tokenizer.pad_token_id, PROMPTS, groups)
    with torch.no_grad():
        for p, g, rows in zip(PROMPTS, groups, out):
            for c, row in zip(g, rows):
                torch.testing.assert_close(torch.tensor(row), full_logprobs(model, p, c), rtol=0, atol=1e-5)


def test_fused_adamw_matches_the_plain_one_over_steps(tokenizer):
    """The training optimiser is AdamW's fused kernel: same weights after a few steps."""
    plain, fused = build_tiny_model(tokenizer, seed=3), build_tiny_model(tokenizer, seed=3)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, **kw)
            for m, kw in ((plain, {"foreach": False}), (fused, {"fused": True}))]
    batch = collate([PROMPTS[0], PROMPTS[1]], COMPLETIONS[:2], tokenizer.pad_token_id)
    for _ in range(3):
        for m, opt in zip((plain, fused), opts):
            completion_logprobs(m, batch).sum().neg().backward()
            opt.step()
            opt.zero_grad()
    moved = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), build_tiny_model(tokenizer, seed=3).parameters()))
    assert moved > 1e-3  # the steps did change the weights
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_token_logprobs_without_the_full_log_softmax():
    logits = torch.randn(3, 5, 50, dtype=torch.float64) * 4
    ids = torch.randint(0, 50, (3, 5))
    expected = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids).double(), expected, rtol=0, atol=1e-5)  # fp32 result


def test_bf16_grid_snapping_stops_tiny_steps_from_flipping_bf16_weights():
    """The dequantised GGUF weights sit between bf16 values, many exactly halfway; a 5e-7
    update then flips their bf16 cast by a whole bf16 step. Snapped weights do not flip."""
    torch.manual_seed(0)
    snapped = (torch.randn(10_000) * 0.05).to(torch.bfloat16).float()
    # exactly halfway between a bf16 value and the next one up (the worst case)
    ulp = 2.0 ** (torch.floor(torch.log2(snapped.abs())) - 7)  # bf16 keeps 8 significant bits
    halfway = snapped + ulp / 2
    step = 5e-7 * torch.sign(torch.randn(10_000))  # an Adam-sized update
    flips = lambda w: ((w + step).to(torch.bfloat16) != w.to(torch.bfloat16)).float().mean().item()  # noqa: E731
    assert flips(snapped) < 0.01  # only weights so small that 5e-7 is half their bf16 spacing
    assert flips(halfway) > 0.4


@pytest.mark.realmodel
def test_default_model_weights_lie_on_the_bf16_grid(default_model_dir):
    from safetensors.torch import load_file

    for name, w in load_file(default_model_dir / "model.safetensors").items():
        assert w.dtype == torch.bfloat16, name  # stored in bf16, loaded as exact fp32


def test_bf16_autocast_training_tracks_fp32_over_several_steps(tiny_model_dir, demo_file, tmp_path):
    """bf16 autocast with fp32 master weights (on bf16-grid weights): the loss curve of
    several optimiser steps stays close to fp32's, not only at step 0."""
    args = ["train", "--model", tiny_model_dir, "--data", demo_file, "--per-device-batch-size", "4",
            "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--seed", "1"]
    run_cli(*args, "--output", tmp_path / "fp32")
    run_cli(*args, "--output", tmp_path / "bf16", "--bf16")
    fp32 = [m["loss"] for m in read_metrics(tmp_path / "fp32")]
    bf16 = [m["loss"] for m in read_metrics(tmp_path / "bf16")]
    assert len(fp32) == 6 and fp32[-1] < fp32[0] - 0.1  # it is learning
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=5e-3)


def test_shared_prompt_rewards_match_separate_sequences(tiny_model_dir, tokenizer):
    from sftjuice.algorithms.rft import reward_forward, shared_prompt_rewards
    from sftjuice.models import load_reward_model, reward_pad_id

    pad = reward_pad_id(tokenizer, [tokenizer.eos_token_id])
    model = load_reward_model(tiny_model_dir, pad_token_id=pad)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    separate = reward_forward(model, collate(prompts, COMPLETIONS, pad))
    shared = shared_prompt_rewards(model, collate_shared(PROMPTS, COMPLETIONS, pad))
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for a, b in zip(grads(model, (separate * weights).sum()), grads(model, (shared * weights).sum())):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)
