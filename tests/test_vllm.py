"""The vLLM generation backend, run for real on vLLM's CPU build (`make vllm`; README: vLLM).

Every test but the first needs vllm and is marked ``vllm``: CI runs them in .venv-vllm
(`pytest -m vllm`); elsewhere they skip. A tiny model's engine starts in ~5 s here.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sftjuice import generation
from sftjuice.config import IRFTConfig, SamplingConfig, SftjuiceError, parse_args
from sftjuice.storage import read_jsonl

from .conftest import assert_ends_as, build_tiny_model, kill_at_random_moments, resume, run_cli, sort_rows, write_jsonl

needs_vllm = pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed (`make vllm` sets up .venv-vllm)")
# vLLM's CPU attention takes head sizes 32, 64, 80, ...; the shared tiny model's is 16
HEADS = dict(num_attention_heads=2, num_key_value_heads=1)
# Engine and policy both compute in fp32, by other kernels (vLLM's CPU attention and fused
# layers against torch's): their log-probs differ by rounding, ~1e-6 on this model; a
# round's update moves them by > 1e-2 (asserted), so a stale or unmerged sync cannot pass.
ENGINE_ATOL = 1e-4


def test_vllm_only_when_asked_for_and_missing_is_one_line(tokenizer, monkeypatch):
    assert not generation.use_vllm(SamplingConfig())  # the default is the in-process sampler
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SftjuiceError, match="needs the vllm package") as err:
        generation.sample(build_tiny_model(tokenizer), [[1, 2]], SamplingConfig(generation_backend="vllm"),
                          [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=0, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(SftjuiceError, match="--generation-backend 'auto': must be one of torch, vllm"):
        parse_args(IRFTConfig, ["--generation-backend", "auto"], prog="t")


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_vllm")
    build_tiny_model(tokenizer, **HEADS).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fresh_logprobs(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The policy's own ``log pi(y_t | x, y_<t)``: one unpadded forward pass, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logp = model(torch.tensor([prompt + continuation])).logits[0].float().log_softmax(-1)
    model.train(was_training)
    return torch.stack([logp[len(prompt) + t - 1, tok] for t, tok in enumerate(continuation)])


def engine_logprobs(llm, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The engine's log-probs of a fixed continuation, as vLLM scores a prompt."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt + continuation}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
    return torch.tensor([out.prompt_logprobs[len(prompt) + t][tok].logprob for t, tok in enumerate(continuation)])


def spied_irft(tmp_path, monkeypatch, model_dir, **overrides):
    """A 2-round IRFT run sampled by vLLM. At each sampling call the spy records the engine's
    and the policy's log-probs of a fixed continuation, and the policy's fresh log-probs of
    each sample; it then returns vLLM's samples with their log-probs shifted by -1, so that
    only a re-scoring by the policy can put the right numbers in the round files."""
    from sftjuice.algorithms import irft

    calls = []
    real = generation._sample_vllm
    fixed_prompt, fixed = [1, 504, 2634, 30], [900, 31, 2451, 17, 42, 2]

    def spy(model, prompts, cfg, stop_ids, seeds, n, bf16):
        out = real(model, prompts, cfg, stop_ids, seeds, n, bf16)
        calls.append({
            "engine": engine_logprobs(model._sftjuice_vllm, fixed_prompt, fixed),
            "policy": fresh_logprobs(model, fixed_prompt, fixed),
            "base": None if not hasattr(model, "disable_adapter") else _without_adapter(model, fixed_prompt, fixed),
            "fresh": [[fresh_logprobs(model, p, s.token_ids) for s in ss] for p, ss in zip(prompts, out)],
        })
        return [[generation.Sample(s.token_ids, [lp - 1.0 for lp in s.logprobs], s.finished) for s in ss] for ss in out]

    monkeypatch.setattr(generation, "_sample_vllm", spy)
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    cfg = IRFTConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "run"), rounds=2, epochs=1,
                     per_device_batch_size=4, learning_rate=3e-3, lr_scheduler="constant", max_new_tokens=16,
                     generation_batch_size=8, generation_backend="vllm", seed=3, **overrides)
    out = irft.train(cfg)
    return out, calls


def _without_adapter(model, prompt, continuation):
    with model.disable_adapter():
        return fresh_logprobs(model, prompt, continuation)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@needs_vllm[0]
@needs_vllm[1]
def test_irft_sampled_by_vllm_syncs_weights_and_trains_on_the_policys_logprobs(
        tmp_path, monkeypatch, vllm_model_dir, lora):
    extra = dict(lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0) if lora else {}
    out, calls = spied_irft(tmp_path, monkeypatch, vllm_model_dir, **extra)
    assert len(calls) == 2
    # round 1 trained: the fixed continuation's log-probs moved, well past the tolerance
    assert (calls[1]["policy"] - calls[0]["policy"]).abs().max() > 1e-2
    for call in calls:  # after each sync (the second: round 1's updated weights) engine = policy
        torch.testing.assert_close(call["engine"], call["policy"], atol=ENGINE_ATOL, rtol=0)
    if lora:  # the engine has the adapter merged in: it is not the base model
        assert (calls[1]["engine"] - calls[1]["base"]).abs().max() > 1e-2
    # the loss's log-probs (the round files) are pi_t's re-scoring, not vLLM's (shifted by -1)
    for r, call in enumerate(calls):
        rows = read_jsonl(out.parent / "rounds" / str(r) / "generations.jsonl")
        assert len(rows) == len(call["fresh"]) == 4
        for row, fresh in zip(rows, call["fresh"]):
            for s, f in zip(row["samples"], fresh):
                assert s["token_ids"] and len(s["token_logprobs"]) == len(f)
                torch.testing.assert_close(torch.tensor(s["token_logprobs"]), f, atol=1e-5, rtol=0)


def two_sample_chi2_pvalue(a: torch.Tensor, b: torch.Tensor, min_count: int = 10) -> float:
    """p-value of the chi-square test that two sets of draws come from one distribution;
    tokens drawn fewer than ``min_count`` times in all share one bin."""
    tokens, counts = torch.cat([a, b]).unique(return_counts=True)
    common = tokens[counts >= min_count]
    table = torch.stack([torch.cat([(x[:, None] == common).sum(0), (~torch.isin(x, common)).sum()[None]])
                         for x in (a, b)]).double()
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((table.shape[1] - 1) / 2), stat / 2).item()


@needs_vllm[0]
@needs_vllm[1]
def test_vllm_and_the_torch_sampler_draw_from_one_distribution(tmp_path, tokenizer):
    """3,000 first tokens from each sampler at temperature 1 and at top-p 0.9, from a tiny model
    whose head is scaled up so that ~60 tokens carry 90% of the mass. Threshold: p > 0.001
    (a false alarm once in 1,000 runs; the seeds are fixed, so a pass is reproducible); the
    same test tells temperature-1 draws from top-p-0.9 ones apart (p < 0.001)."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tokenizer, seed=5, tie_word_embeddings=False, **HEADS)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # name_or_path: the engine loads it from there
    prompt, n, eos = [1, 504, 2634, 30, 17], 3000, tokenizer.eos_token_id
    with torch.no_grad():
        probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = set(order[sorted_p.cumsum(0) - sorted_p < 0.9].tolist())
    assert 20 < len(nucleus) < 2000 and sorted_p[0] < 0.5  # neither near-greedy nor near-uniform

    def draws(backend, top_p):
        cfg = SamplingConfig(temperature=1.0, top_p=top_p, max_new_tokens=1, generation_batch_size=500,
                             generation_backend=backend)
        out = generation.sample(model, [prompt], cfg, [eos], tokenizer.pad_token_id, seed=7, num_samples=n,
                                progress=False)
        return torch.tensor([s.token_ids[0] for s in out[0]])

    drawn = {(backend, top_p): draws(backend, top_p) for backend in ("torch", "vllm") for top_p in (1.0, 0.9)}
    for top_p in (1.0, 0.9):
        assert two_sample_chi2_pvalue(drawn["torch", top_p], drawn["vllm", top_p]) > 1e-3
    assert set(drawn["vllm", 0.9].tolist()) <= nucleus
    assert two_sample_chi2_pvalue(drawn["torch", 1.0], drawn["vllm", 0.9]) < 1e-3


@needs_vllm[0]
@needs_vllm[1]
def test_a_killed_vllm_run_resumes_as_the_torch_one_does(tmp_path, vllm_model_dir):
    """IRFT sampled by vLLM, SIGKILLed at three seeded moments (engine start-up, sampling, a
    step, a checkpoint) and resumed: it ends with the weights, round files and metrics of a
    run never killed, as test_resume.py asserts for the torch sampler. The engine's draws are
    seeded per prompt, so a round sampled after a resume is the one the straight run drew."""
    import time

    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    args = ["train", "--method", "irft", "--model", vllm_model_dir, "--data", data, "--rounds", "2", "--seed", "3",
            "--per-device-batch-size", "2", "--learning-rate", "1e-3", "--lr-scheduler", "constant",
            "--max-new-tokens", "8", "--generation-backend", "vllm"]
    t0 = time.time()
    run_cli(*args, "--output", tmp_path / "straight")
    out = tmp_path / "killed"
    assert kill_at_random_moments(args, out, time.time() - t0, seed="kill vllm") >= 2, "the runs ended before they could be killed"
    resume(args, out)
    assert_ends_as(out, tmp_path / "straight")
