"""LoRA from start to finish: SFT with --lora writes an adapter, and every method trains on
from it, merged (full weights) or with the adapter trained on; every reference to pi_SFT
(or IRFT's pi_0) is the SFT model, base + SFT adapter, never the base model alone."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sftjuice.algorithms import references
from sftjuice.algorithms.sft import completion_tokens, sft_micro_loss
from sftjuice.api import train
from sftjuice.config import (IRFTConfig, RestConfig, RFTConfig, RSOConfig, SFTConfig, SPINConfig, SRPPOConfig,
                             StepsConfig)
from sftjuice.data import ChatFormat
from sftjuice.models import load_tokenizer
from sftjuice.scoring import token_logprobs_of
from sftjuice.storage import read_jsonl
from sftjuice.training import start_run

from .conftest import read_metrics, run_cli, sort_rows, write_jsonl
from .test_fuzz import assert_one_line_error, run_in_process
from .conftest import untimed

SMALL = dict(seed=3, max_new_tokens=6, per_device_batch_size=2)
METHODS = {
    "irft": lambda **kw: IRFTConfig(rounds=2, **kw),
    "spin": lambda **kw: SPINConfig(**kw),
    "rft": lambda **kw: RFTConfig(rounds=2, **kw),
    "srppo": lambda **kw: SRPPOConfig(rounds=2, num_samples=2, **kw),
    "rso": lambda **kw: RSOConfig(rounds=2, reward="implicit", num_samples=4, num_accepted=2, **kw),
    "steps": lambda **kw: StepsConfig(rounds=2, num_samples=2, rollouts=2, **kw),
    "rest": lambda **kw: RestConfig(rounds=2, num_samples=2, **kw),
}


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir):
    """``O/final`` of an SFT run with --lora: an adapter that moved the tiny model well away from its base."""
    root = tmp_path_factory.mktemp("sft_lora")
    data = write_jsonl(root / "demos.jsonl", sort_rows(8))
    return train(SFTConfig(model=str(tiny_model_dir), data=str(data), output=str(root / "sft"), lora=True, lora_r=4,
                           epochs=4, per_device_batch_size=4, learning_rate=1e-2, lr_scheduler="constant"))


@pytest.fixture(scope="module")
def oracles(sft_adapter, tiny_model_dir):
    """The SFT model (base + SFT adapter, as transformers loads an adapter directory) and the base model."""
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in (("sft", sft_adapter), ("base", tiny_model_dir))}


def per_token(model, pad_id: int, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    return [g[0] for g in token_logprobs_of(model, pad_id, prompts, [[c] for c in completions])]


def assert_the_sft_models(recorded: list[float], prompts, completions, oracles, pad_id: int, summed: bool) -> None:
    """``recorded`` (per-token log-probs, or their sums) are the SFT model's to 1e-5, not the base model's."""
    def of(name):
        logps = per_token(oracles[name], pad_id, prompts, completions)
        return [sum(x) for x in logps] if summed else [t for x in logps for t in x]

    recorded = torch.tensor(recorded, dtype=torch.float64)
    torch.testing.assert_close(recorded, torch.tensor(of("sft"), dtype=torch.float64), atol=1e-5, rtol=0)
    assert (recorded - torch.tensor(of("base"), dtype=torch.float64)).abs().max() > 0.05


def references_in(method: str, out, chat: ChatFormat) -> tuple[list[float], list, list, bool]:
    """Every reference log-prob a run recorded in its round files before training on them:
    (values, prompt ids, completion ids, whether the values are sums over the completion).
    pi_SFT's in every round; IRFT's pi_t (log pi_t of the demonstrations) in round 0 only."""
    values, prompts, completions = [], [], []
    for path in sorted(out.glob("rounds/*/generations.jsonl")):
        r = int(path.parent.name)
        for row in read_jsonl(path):
            prompt = chat.prompt_ids(row["prompt"])
            if method in ("irft", "spin") and r == 0:
                values.append(row["demonstration_logprob"])
                scored = [chat.completion_ids(row["prompt"], row["demonstration"])]
            elif method in ("rft", "srppo"):
                values += [t for ref in row["ref_token_logprobs"] for t in ref]
                scored = [s["token_ids"] for s in row["samples"]]
            elif method == "rso":  # the candidates' sampler is pi_SFT
                values += [t for s in row["samples"] for t in s["token_logprobs"]]
                scored = [s["token_ids"] for s in row["samples"]]
            elif method == "steps":  # DPO's reference of both sides; the tiny model's positives are demonstrations
                assert all(p["positive"] is None for p in row["pairs"])
                values += [x for p in row["pairs"] for x in (p["ref_chosen"], p["ref_rejected"])]
                scored = [c for p in row["pairs"] for c in (p["chosen_ids"], p["rejected_ids"])]
            else:
                scored = []
            prompts += [prompt] * len(scored)
            completions += scored
    return values, prompts, completions, method in ("irft", "spin", "steps")


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["merged", "lora"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_from_an_sft_adapter_against_the_sft_model(method, lora, sft_adapter, oracles, tmp_path,
                                                                         caplog):
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(4))
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO, logger="sftjuice.models"):
        final = train(METHODS[method](model=str(sft_adapter), data=str(data), output=str(out), lora=lora, **SMALL))
    assert ("it trains on, and a frozen copy of it is the reference" if lora else
            "merged into its base model, whose full weights train") in caplog.text
    if lora:  # the SFT adapter trained on (its own rank, not --lora-r's 16), saved without the reference beside it
        assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
        assert not (final / "config.json").exists() and not (final / "reference").exists()
        trained, sft = load_file(final / "adapter_model.safetensors"), load_file(sft_adapter / "adapter_model.safetensors")
        assert trained.keys() == sft.keys()
        # (on the tiny model RSO's candidates all run out of tokens and tie, and `rest` verifies
        # no sample: neither has anything to step on)
        if method not in ("rso", "rest"):
            assert any(not torch.equal(trained[k], sft[k]) for k in sft)
    else:
        assert (final / "model.safetensors").exists() and not (final / "adapter_config.json").exists()

    chat = ChatFormat(load_tokenizer(sft_adapter))
    values, prompts, completions, summed = references_in(method, out, chat)
    if method == "rest":  # no reference: SFT on its own verified samples
        assert not values
        return
    assert values
    assert_the_sft_models(values, prompts, completions, oracles, chat.tokenizer.pad_token_id, summed)
    if method == "srppo":  # r(demonstration) = log pi_SFT - log pi_base, with the SFT run's base as pi_base
        rows = read_jsonl(out / "rounds/0/generations.jsonl")
        prompts = [chat.prompt_ids(row["prompt"]) for row in rows]
        demos = [chat.completion_ids(row["prompt"], row["demonstration"]) for row in rows]
        sft, base = ([sum(x) for x in per_token(oracles[m], chat.tokenizer.pad_token_id, prompts, demos)]
                     for m in ("sft", "base"))
        torch.testing.assert_close(torch.tensor([row["demonstration_reward"] for row in rows], dtype=torch.float64),
                                   torch.tensor(sft, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["merged", "lora"])
def test_the_reference_is_the_sft_model_and_stays_it_while_the_policy_trains(lora, sft_adapter, oracles, tmp_path):
    """On the demonstrations, before and after a step that moves the policy; after each use
    of the reference the policy is itself again (its trainable adapter active)."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(4))
    run = start_run(IRFTConfig(model=str(sft_adapter), data=str(data), output=str(tmp_path / "o"), lora=lora))
    policy = run.learner(run.policy_model, 1e-2, 1)
    pi_sft = references.starting_policy(run)
    pad = run.tokenizer.pad_token_id
    prompts, demos = [e.prompt_ids for e in run.examples], [e.completion_ids for e in run.examples]

    def reference():
        with pi_sft() as model:
            return [t for x in per_token(model, pad, prompts, demos) for t in x]

    def flat(model):
        return torch.tensor([t for x in per_token(model, pad, prompts, demos) for t in x], dtype=torch.float64)

    assert_the_sft_models(reference(), prompts, demos, oracles, pad, summed=False)
    torch.testing.assert_close(flat(run.policy), flat(oracles["sft"]), atol=1e-5, rtol=0)  # pi_0 = pi_SFT
    policy.step(run.examples, sft_micro_loss(policy), completion_tokens)
    assert_the_sft_models(reference(), prompts, demos, oracles, pad, summed=False)
    assert (flat(run.policy) - flat(oracles["sft"])).abs().max() > 1e-3  # the policy moved, and is active again


def test_an_adapter_without_its_base_or_with_other_tokens_and_merge_lora_without_lora_are_one_line(
        sft_adapter, tiny_model_dir, tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(4))

    def adapter_on(base, name):
        copy = shutil.copytree(sft_adapter, tmp_path / name)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
        return copy

    def train_argv(model, *extra):
        return ["train", "--method", "irft", "--model", model, "--data", data, "--output", tmp_path / f"out-{model.name}", *extra]

    orphan = adapter_on(tmp_path / "gone", "orphan")
    code, err = run_in_process(capsys, train_argv(orphan))
    assert_one_line_error(code, err, f"{orphan}: a LoRA adapter whose base model is not found here", "gone")

    other = tmp_path / "other_base"  # the tiny model's weights, its tokenizer with one more token
    shutil.copytree(tiny_model_dir, other)
    more = load_tokenizer(tiny_model_dir)
    more.add_tokens(["<extra>"])
    more.save_pretrained(other)
    foreign = adapter_on(other, "foreign")
    code, err = run_in_process(capsys, train_argv(foreign, "--lora"))
    assert_one_line_error(code, err, f"{foreign}: a LoRA adapter whose tokenizer differs from that of its base model")

    code, err = run_in_process(capsys, train_argv(sft_adapter, "--merge-lora"))
    assert_one_line_error(code, err, "--merge-lora needs --lora")


@pytest.mark.slow
def test_a_lora_run_from_an_adapter_resumed_after_its_first_round_ends_identical(sft_adapter, tmp_path):
    """Killed after round 0's checkpoint, before round 1 sampled: the resumed run rolls out
    round 1's negatives with the reference adapter it loads again and scores its pairs with
    it, and ends as an uninterrupted run."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    args = ["train", "--method", "steps", "--model", sft_adapter, "--lora", "--data", data, "--rounds", "2",
            "--num-samples", "2", "--rollouts", "2", "--max-new-tokens", "6", "--seed", "3", "--learning-rate", "1e-3",
            "--per-device-batch-size", "1", "--save-every", "1", "--keep-checkpoints", "100"]
    out = tmp_path / "killed"
    run_cli(*args, "--output", out)
    shutil.copytree(out, tmp_path / "straight")
    end_of_round_0 = next(m["step"] for m in read_metrics(out) if m.get("event") == "round" and m["round"] == 0)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "rounds/1")
    for c in out.glob("checkpoints/step-*"):
        if int(c.name.split("-")[1]) > end_of_round_0:
            shutil.rmtree(c)
    run_cli(*args, "--output", out, "--resume")
    straight, resumed = (load_file(d / "final/adapter_model.safetensors") for d in (tmp_path / "straight", out))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)
    sft = load_file(sft_adapter / "adapter_model.safetensors")
    assert any(not torch.equal(straight[k], sft[k]) for k in sft)  # the adapter trained
    assert (out / "rounds/1/generations.jsonl").read_text() == (tmp_path / "straight/rounds/1/generations.jsonl").read_text()
    assert untimed(read_metrics(out)) == untimed(read_metrics(tmp_path / "straight"))
