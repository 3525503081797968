"""Self-Rewarding PPO: the reward against plain forward passes, the no-EOS penalty, finding
pi_base from an SFT run, an end-to-end run, LoRA's pi_SFT (kill and resume: test_resume.py)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from sftjuice.algorithms import references, sft, srppo
from sftjuice.cli import main
from sftjuice.config import ModelConfig, SFTConfig, SRPPOConfig, SftjuiceError, TrainConfig, parse_args
from sftjuice.data import ChatFormat, Example
from sftjuice.generation import Sample
from sftjuice.models import load_policy, load_tokenizer
from sftjuice.storage import read_jsonl

from .conftest import build_tiny_model, read_metrics, run_cli, sort_rows, write_jsonl


def fresh_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """log pi(y_t | x, y_<t) of each response token: one unpadded sequence, full log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logps = logits.log_softmax(-1)[len(prompt) - 1: -1]
    return logps.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()


def assert_close(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_reward_is_the_difference_of_two_fresh_forward_passes_and_a_cut_sample_gets_the_penalty(tokenizer, tokens):
    """--reward-tokens answer: the same sums without the chat template's tokens (the end of turn)."""
    sft_model, base = build_tiny_model(tokenizer, seed=1).eval(), build_tiny_model(tokenizer, seed=2).eval()
    chat = ChatFormat(tokenizer)
    skip = frozenset(tokenizer.all_special_ids) | frozenset(chat.stop_token_ids) if tokens == "answer" else frozenset()
    reward = references.ImplicitReward(-1.5, skip)
    rows = sort_rows(6)
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    # three prompts with their demonstrations, and another prompt's demonstrations as samples
    # (different lengths); the last sample of the last prompt was cut before its end of turn
    examples = [Example(chat.prompt_ids(m), chat.completion_ids(m, r["completion"]), i)
                for i, (m, r) in enumerate(zip(msgs[:3], rows[:3]))]
    others = [chat.completion_ids(m, r["completion"]) for m, r in zip(msgs[3:], rows[3:])]
    samples = [[Sample(others[(i + k) % 3], [], True) for k in range(2)] for i in range(3)]
    samples[2][1] = Sample(others[0][:-1], [], False)
    run = SimpleNamespace(tokenizer=tokenizer, accelerator=SimpleNamespace(autocast=contextlib.nullcontext), policy=None)
    annotated = srppo.reference_scores(run, lambda: contextlib.nullcontext(sft_model), base, reward)(examples, samples)
    rows_out = [{**a, "samples": [{"token_ids": s.token_ids, "finished": s.finished} for s in ss]}
                for a, ss in zip(annotated, samples)]
    rewards = srppo.round_rewards(rows_out, reward)

    def ratio(prompt: list[int], response: list[int]) -> float:
        keep = [t not in skip for t in response]
        return (sum(x for x, k in zip(fresh_logprobs(sft_model, prompt, response), keep) if k)
                - sum(x for x, k in zip(fresh_logprobs(base, prompt, response), keep) if k))

    assert all(e.completion_ids[-1] in chat.stop_token_ids for e in examples)  # the end of turn is there to skip

    for e, ss, a, rr in zip(examples, samples, annotated, [rewards[i: i + 2] for i in (0, 2, 4)]):
        demo = ratio(e.prompt_ids, e.completion_ids)
        assert a["demonstration_reward"] == pytest.approx(demo, abs=1e-4)
        for s, sft_lp, base_lp, r in zip(ss, a["ref_token_logprobs"], a["base_token_logprobs"], rr):
            assert_close(sft_lp, fresh_logprobs(sft_model, e.prompt_ids, s.token_ids))
            assert_close(base_lp, fresh_logprobs(base, e.prompt_ids, s.token_ids))
            expected = ratio(e.prompt_ids, s.token_ids) if s.finished else -1.5
            assert r == pytest.approx(expected, abs=1e-4)
    assert rewards[-1] == -1.5  # the cut sample: the penalty, not its (nonzero) log-ratio
    cut_ratio = sum(annotated[2]["ref_token_logprobs"][1]) - sum(annotated[2]["base_token_logprobs"][1])
    assert abs(cut_ratio) > 0.1
    by_hand = references.ImplicitReward(-7.0)
    assert by_hand([4, 9], [-1.0, -2.0], [-3.0, -0.5], True) == pytest.approx(0.5)  # -3 - (-3.5)
    assert by_hand([4, 9], [-1.0, -2.0], [-3.0, -0.5], False) == -7.0
    assert references.ImplicitReward(-7.0, frozenset({9}))([4, 9], [-1.0, -2.0], [-3.0, -0.5], True) == pytest.approx(2.0)


def test_ranking_counts_ties_apart():
    demo = [5, 6, 2]
    groups = [SimpleNamespace(example=SimpleNamespace(completion_ids=demo),
                              samples=[SimpleNamespace(token_ids=t) for t in ([5, 6, 2], [7, 2], [8, 2], [9, 2])])]
    rows = [{"demonstration_reward": 1.0}]
    stats = srppo.ranking_stats(groups, rows, [1.0, 0.5, 2.0, -1.0], n=4)
    # the first sample is the demonstration itself: a tie; then a win, a loss, a win
    assert stats["reward_heldout_ties"] == 1 and stats["reward_heldout_accuracy"] == pytest.approx(2 / 3)
    assert stats["reward_heldout_margin"] == pytest.approx((0 + 0.5 - 1.0 + 2.0) / 4)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A one-step sftjuice SFT run from the tiny model."""
    root = tmp_path_factory.mktemp("srppo_sft")
    data = write_jsonl(root / "demos.jsonl", sort_rows())
    final = sft.train(SFTConfig(model=str(tiny_model_dir), data=str(data), output=str(root / "sft"),
                                per_device_batch_size=24, learning_rate=1e-3, seed=4))
    assert [m["step"] for m in read_metrics(root / "sft")] == [1]
    return final


def test_base_model_is_found_from_the_sft_run_or_asked_for_in_one_line(sft_run, tiny_model_dir, tmp_path, capsys):
    assert references.base_model_of(SRPPOConfig(model=str(sft_run))) == str(tiny_model_dir)
    assert references.base_model_of(SRPPOConfig(model=str(sft_run), base_model="other")) == "other"
    with pytest.raises(SftjuiceError, match="--base-model is needed: --model .* is not the final/ of an sftjuice SFT run"):
        references.base_model_of(SRPPOConfig(model=str(tiny_model_dir)))
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(4))
    assert main(["train", "--method", "srppo", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sftjuice train: error: --base-model is needed: --model ") and "pretrained model" in err[-1]
    assert not (tmp_path / "o").exists()
    cfg = parse_args(TrainConfig, ["--method", "srppo", "--kl-coef", "0.1", "--no-eos-penalty", "-3"], prog="t")
    assert (cfg.kl_coef, cfg.no_eos_penalty, cfg.num_samples, cfg.temperature, cfg.clip_range) == (0.1, -3.0, 4, 1.0, 0.2)
    with pytest.raises(SftjuiceError, match="--num-samples 1: must be >= 2"):
        SRPPOConfig(num_samples=1)


def test_srppo_runs_end_to_end_from_the_command_line(sft_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows())
    out = tmp_path / "o"
    run_cli("train", "--method", "srppo", "--model", sft_run, "--data", data, "--output", out,
            "--base-model", tiny_model_dir, "--max-new-tokens", "8", "--rounds", "2")
    metrics = read_metrics(out)
    rounds = [m for m in metrics if m.get("event") == "round"]
    assert [m["round"] for m in rounds] == [0, 1]
    for m in rounds:  # 12 prompts x 4 samples a round
        assert m["samples"] == 48 and 0 <= m["sample_cut_fraction"] <= 1
        for key in ("sample_reward", "demonstration_reward", "reward_heldout_margin", "reward_heldout_ties", "kl",
                    "reward_template_share", "template_token_share", "generation_seconds", "policy_seconds"):
            assert key in m, key
    assert abs(rounds[0]["kl"]) < 1e-3  # round 0 samples from pi_SFT itself
    assert len([m for m in metrics if m.get("phase") == "policy"]) == 6  # 3 steps of 4 prompts a round
    row = read_jsonl(out / "rounds/0/generations.jsonl")[0]
    assert len(row["base_token_logprobs"]) == 4 and row["demonstration_reward"] is not None
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_lora_pi_sft_is_the_policy_with_its_adapter_off(sft_run, tiny_model_dir, tmp_path):
    """With LoRA no copy of pi_SFT is kept: after a round of steps, round 1's reference
    log-probs are still pi_SFT's, computed by the adapted policy with its adapter off."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(16))
    extra = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sort_rows(24)[16:]])
    cfg = SRPPOConfig(model=str(sft_run), data=str(data), output=str(tmp_path / "o"), lora=True, learning_rate=1e-2,
                      max_new_tokens=6, rounds=2, prompts=str(extra), seed=4)
    srppo.train(cfg)
    sft_model = load_policy(ModelConfig(), sft_run, trainable=False)
    rows = read_jsonl(tmp_path / "o/rounds/1/generations.jsonl")
    assert any(r["demonstration"] is None for r in rows)  # an unlabelled --prompts row took part
    chat = ChatFormat(load_tokenizer(sft_run))
    moved = False
    for row in rows[:3]:
        prompt = chat.prompt_ids(row["prompt"])
        for s, ref in zip(row["samples"], row["ref_token_logprobs"]):
            assert_close(ref, fresh_logprobs(sft_model, prompt, s["token_ids"]))
            moved |= max(abs(a - b) for a, b in zip(ref, s["token_logprobs"])) > 1e-3
    assert moved  # the sampler (pi_1) is no longer pi_SFT


