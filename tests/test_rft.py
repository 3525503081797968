"""RFT: reward loss, RLOO/KL/PPO-clip against hand values, a reward step, a policy step
within its KL budget, the saved reward model, `reward score` (kill and resume: test_resume.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sftjuice.algorithms import references, rft, sft
from sftjuice.algorithms.ppo import rollout_advantages
from sftjuice.algorithms.rounds import Completion
from sftjuice.config import ModelConfig, RFTConfig, SamplingConfig, SFTConfig, SftjuiceError, TrainConfig, parse_args
from sftjuice.data import ChatFormat
from sftjuice.generation import sample
from sftjuice.losses import kl_penalty, ppo_clip_loss, reward_pair_loss, rloo_advantages
from sftjuice.models import load_policy, load_reward_model, load_tokenizer
from sftjuice.storage import read_jsonl
from sftjuice.scoring import rewards_of, sequence_logprobs_of, singletons

from .conftest import REPO, assert_same_weights, read_metrics, run_cli, sort_rows, write_jsonl


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    "kind, l2, r_c, r_r, expected_loss, expected_grad_c, expected_grad_r",
    [
        # log(1 + e^-0.5); d/dr_c = -sigmoid(-0.5) = -d/dr_r
        ("logistic", 0.0, 1.0, 0.5, 0.47407698418010663, -0.3775406687981454, 0.3775406687981454),
        # -(1 - 0.5) + 0.1 * (1 + 0.25); d/dr_c = -1 + 0.1 * 2 * 1, d/dr_r = 1 + 0.1 * 2 * 0.5
        ("linear", 0.1, 1.0, 0.5, -0.375, -0.8, 1.1),
        # -(-2 - 1) + 0.5 * (4 + 1); d/dr_c = -1 + 0.5 * 2 * (-2), d/dr_r = 1 + 0.5 * 2 * 1
        ("linear", 0.5, -2.0, 1.0, 5.5, -3.0, 2.0),
    ],
)
def test_reward_loss_against_hand_values(kind, l2, r_c, r_r, expected_loss, expected_grad_c, expected_grad_r):
    chosen = torch.tensor([r_c], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([r_r], dtype=torch.float64, requires_grad=True)
    loss = reward_pair_loss(chosen, rejected, kind, l2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(expected_grad_c)
    assert rejected.grad.item() == pytest.approx(expected_grad_r)


def test_rloo_advantages_and_kl_against_a_hand_example():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # each sample minus the mean of its prompt's other samples
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(rloo_advantages(rewards), expected)
    torch.testing.assert_close(rloo_advantages(rewards).sum(-1), torch.zeros(2))  # a zero-mean baseline per prompt
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(3, 1))

    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 9.9]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second sequence has 2 tokens
    torch.testing.assert_close(kl_penalty(logps, ref, mask), torch.tensor([0.5 - 1.0 + 0.0, 0.3 - 1.0]))

    # the round's computation: 2 prompts x 2 samples, reward minus kl_coef * summed per-token KL
    rollouts = [Completion([5, 2], [-1.0, -0.5], ref_logprobs=[-2.0, -0.5]),  # kl 1.0
                Completion([7], [-0.2], ref_logprobs=[-0.2]),  # kl 0
                Completion([5, 6, 2], [-1.0, -1.0, -1.0], ref_logprobs=[-0.5, -0.5, -0.5]),  # kl -1.5
                Completion([2], [-0.3], ref_logprobs=[-1.3])]  # kl 1.0
    advantages, kl = rollout_advantages(rollouts, [3.0, 1.0, 0.0, 2.0], kl_coef=0.5, n=2)
    torch.testing.assert_close(kl, torch.tensor([1.0, 0.0, -1.5, 1.0]))
    shaped = [3.0 - 0.5, 1.0, 0.0 + 0.75, 2.0 - 0.5]
    torch.testing.assert_close(advantages, torch.tensor([shaped[0] - shaped[1], shaped[1] - shaped[0],
                                                         shaped[2] - shaped[3], shaped[3] - shaped[2]]))


def test_ppo_clip_loss_gradient_against_the_formula():
    """At ratio 1: d loss / d log pi = -A. Clipped in the advantage's direction: gradient 0."""
    eps = 0.2
    old = torch.tensor([-3.0, -3.0, -3.0, -3.0, -3.0], dtype=torch.float64)
    log_ratio = torch.tensor([0.0, 0.0, math.log(1.5), math.log(1.5), math.log(0.5)], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 2.0, -1.0, -1.0], dtype=torch.float64)
    logps = (old + log_ratio).requires_grad_()
    loss, clipped = ppo_clip_loss(logps, old, adv, eps)
    ratio = log_ratio.exp()
    # -min(ratio * A, clip(ratio) * A): A > 0 with ratio 1.5 is capped at 1.2 * A; A < 0 with ratio 0.5 at 0.8 * A
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.0, 1.0, -1.2 * 2, 1.5, 0.8], dtype=torch.float64))
    assert clipped.tolist() == [False, False, True, False, True]
    loss.sum().backward()
    # unclipped: d(-ratio * A)/d log pi = -ratio * A
    expected = torch.where(clipped, torch.zeros_like(adv), -ratio * adv)
    torch.testing.assert_close(logps.grad, expected)
    assert torch.autograd.gradcheck(lambda lp: ppo_clip_loss(lp, old[:2], adv[:2], eps)[0], (logps[:2].detach().requires_grad_(),))


def test_rft_options_come_from_the_config_file_and_are_checked(tmp_path):
    (tmp_path / "c.yaml").write_text("method: rft\npolicy-steps: 3\nreward-loss: linear\nreward_l2: 0.05\n"
                                     "num-samples: 4\ntemperature: 1\nclip-range: 0.1\nreward-learning-rate: 1e-4\n")
    cfg = parse_args(TrainConfig, ["--config", str(tmp_path / "c.yaml"), "--policy-steps", "2"], prog="t")
    assert (cfg.method, cfg.policy_steps, cfg.reward_loss, cfg.reward_l2, cfg.num_samples, cfg.temperature,
            cfg.clip_range, cfg.reward_learning_rate) == ("rft", 2, "linear", 0.05, 4, 1.0, 0.1, 1e-4)
    with pytest.raises(SftjuiceError, match="--num-samples 1: must be >= 2"):
        RFTConfig(num_samples=1)
    with pytest.raises(SftjuiceError, match="--reward-l2"):
        RFTConfig(reward_loss="linear")
    assert RFTConfig().num_samples == 2  # runs with no flags


def test_ties_are_ties_and_identical_pairs_carry_no_loss(tiny_model_dir, tmp_path):
    """A sample identical to its demonstration is no negative: it adds nothing to the reward
    loss nor to its normaliser, and is counted apart; a tied score is not an error."""
    from sftjuice.algorithms.rounds import Group, samples_in
    from sftjuice.models import reward_pad_id
    from sftjuice.training import start_run

    assert rft.pair_stats("r", [1.0, 2.0], [0.5, 1.0, 2.0, 3.0], n=2) == {
        "r_accuracy": 1 / 2, "r_ties": 2, "r_margin": (0.5 + 0.0 + 0.0 - 1.0) / 4}
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(4))
    cfg = RFTConfig(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"))
    run = start_run(cfg)
    reward = run.learner(references.load_reward(run, cfg), 1e-3, 1, pad_id=reward_pad_id(run.tokenizer, run.chat.stop_token_ids))
    loss = rft.reward_micro_loss(reward, cfg)
    e = run.examples[0]
    other = Completion([216, 34, 2], [-1.0] * 3)
    with_copy = [Group(e, [Completion(list(e.completion_ids), [-1.0] * len(e.completion_ids)), other])]
    alone = [Group(e, [other, other])]
    (l_copy, s_copy), (l_alone, _) = loss(with_copy), loss(alone)
    assert l_copy.item() == pytest.approx(l_alone.item() / 2, rel=1e-5)  # one distinct pair of the two
    assert (rft.distinct_pairs(with_copy), samples_in(with_copy)) == (1, 2)
    assert s_copy["ties"].item() == 0 and s_copy["wins"].item() in (0.0, 1.0)


# -------------------------------------------------------------------- on tiny models

COMMON = ["--seed", "4", "--max-new-tokens", "12", "--per-device-batch-size", "4", "--lr-scheduler", "constant",
          "--rounds", "3", "--epochs", "2"]


@pytest.fixture(scope="module")
def reward_run(wrong_task_model_dir, tmp_path_factory):
    """Six rounds of reward learning against a fixed policy (no policy steps): the
    wrong-task model, whose answers are unlike the sorting demonstrations."""
    root = tmp_path_factory.mktemp("rft_reward")
    data = write_jsonl(root / "demos.jsonl", sort_rows())
    out = root / "o"
    run_cli("train", "--method", "rft", "--model", wrong_task_model_dir, "--data", data, "--output", out, *COMMON,
            "--num-samples", "2", "--policy-steps", "0", "--reward-learning-rate", "1e-3")
    return out


def test_reward_steps_raise_demonstrations_over_samples(reward_run):
    records = [m for m in read_metrics(reward_run) if m.get("event") == "reward"]
    assert len(records) == 6
    for m in records:  # each step: the round's pairs are further apart after it than before
        assert m["reward_margin"] > m["reward_heldout_margin"]
    # on fresh prompts and samples, never seen by the reward model before its step
    assert abs(records[0]["reward_heldout_margin"]) < 0.1  # the untrained head barely separates them
    assert records[-1]["reward_heldout_accuracy"] >= 0.9 and records[-1]["reward_heldout_margin"] > 1.0
    steps = [m for m in read_metrics(reward_run) if m.get("phase") == "reward"]
    assert len(steps) == 12 and not any(m.get("phase") == "policy" for m in read_metrics(reward_run))


def test_saved_reward_model_reloads_with_transformers_and_gives_the_same_scores(reward_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "reward_model").eval()
    tok = AutoTokenizer.from_pretrained(reward_run / "reward_model")
    chat = ChatFormat(tok)
    rows = read_jsonl(reward_run / "rounds/5/generations.jsonl")
    pairs = [(chat.prompt_ids(r["prompt"]), chat.completion_ids(r["prompt"], r["demonstration"]), s["token_ids"])
             for r in rows for s in r["samples"]]
    with torch.no_grad():  # one unpadded sequence at a time, plain transformers
        score = lambda p, c: model(torch.tensor([p + c])).logits[0, 0].item()  # noqa: E731
        hf = [(score(p, d), score(p, s)) for p, d, s in pairs]
    margins = [d - s for d, s in hf]
    # the last round's record scored these pairs after its reward step, with the same weights
    [last] = [m for m in read_metrics(reward_run) if m.get("event") == "reward" and m["round"] == 5]
    assert sum(margins) / len(margins) == pytest.approx(last["reward_margin"], abs=1e-4)
    decided = [m for m in margins if abs(m) > 1e-6]
    assert sum(m > 0 for m in decided) / len(decided) == pytest.approx(last["reward_accuracy"])
    assert len(margins) - len(decided) == last["reward_ties"]

    ours = [x[0] for x in rewards_of(load_reward_model(reward_run / "reward_model"), [p for p, _, _ in pairs],
                                     singletons([s for _, _, s in pairs]))]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor([s for _, s in hf]), atol=1e-5, rtol=0)

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "completion": r["demonstration"], "id": i}
                                                  for i, r in enumerate(rows)])
    run_cli("reward", "score", "--reward-model", reward_run / "reward_model", "--data", data, "--output", tmp_path / "s.jsonl")
    scored = read_jsonl(tmp_path / "s.jsonl")
    assert [r["id"] for r in scored] == list(range(len(rows)))
    demo_scores = [d for d, _ in hf][:: len(rows[0]["samples"])]
    torch.testing.assert_close(torch.tensor([r["reward"] for r in scored]), torch.tensor(demo_scores), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mixed_policy_dir(wrong_task_model_dir, tmp_path_factory):
    """The wrong-task model after a short SFT (6 steps) on the sorting demonstrations mixed
    with place-value rows: on sorting prompts it mostly still answers a digit, sometimes a
    list. Its samples differ in what the reward learned against the wrong-task policy tells
    apart (a short answer scores about -1.65, a finished list about +1.25), so a policy step
    has something to gain, and the KL it spends is a choice."""
    root = tmp_path_factory.mktemp("mixed_policy")
    place_value = (REPO / "src/sftjuice/demo_data/numbers__place_value.train.jsonl").read_text().splitlines()[:24]
    data = write_jsonl(root / "mix.jsonl", sort_rows() + place_value)
    return sft.train(SFTConfig(model=str(wrong_task_model_dir), data=str(data), output=str(root / "run"), epochs=2,
                                 per_device_batch_size=8, learning_rate=3e-3, lr_scheduler="constant", seed=4))


MAX_NEW_TOKENS = 16  # most sorted lists fit; the reward is read at the <|im_end|> of a finished one


def measure(policy, ref, reward, tok, prompts, n=16):
    """Mean learned reward of the policy's samples and the k1 estimate of KL(policy || ref).
    On 24 prompts x 16 samples the mean reward moves by 0.1 to 0.2 between sampling seeds."""
    chat = ChatFormat(tok, [tok.eos_token_id])
    cfg = SamplingConfig(num_samples=n, max_new_tokens=MAX_NEW_TOKENS)
    samples = sample(policy, prompts, cfg, chat.stop_token_ids, tok.pad_token_id, seed=123, progress=False)
    ps = [p for p, ss in zip(prompts, samples) for _ in ss]
    cs = [s.token_ids for ss in samples for s in ss]
    rewards = [x[0] for x in rewards_of(reward, ps, singletons(cs))]
    ref_logps = [x[0] for x in sequence_logprobs_of(ref, tok.pad_token_id, ps, singletons(cs))]
    kl = [s.logprob - r for s, r in zip((s for ss in samples for s in ss), ref_logps)]
    return sum(rewards) / len(rewards), sum(kl) / len(kl)


@pytest.mark.slow
def test_policy_steps_raise_the_learned_reward_within_the_kl_its_coefficient_allows(reward_run, mixed_policy_dir, tmp_path):
    """Against a fixed learned reward (--reward-learning-rate 0), a policy that improves
    J_c = E[r] - c * KL over pi_ref (c = --kl-coef) has KL <= (E[r] - E_ref[r]) / c; a larger c
    holds it closer to pi_ref, trading reward for it: under J_1 the c = 1 policy beats the
    c = 0.1 one."""
    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows())
    tok = load_tokenizer(mixed_policy_dir)
    prompts = [ChatFormat(tok).prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in sort_rows()]
    ref = load_policy(ModelConfig(), mixed_policy_dir, trainable=False)
    reward = load_reward_model(reward_run / "reward_model")
    r0, kl0 = measure(ref, ref, reward, tok, prompts)
    assert abs(kl0) < 1e-3  # pi_0 = pi_ref
    results = {}
    for kl_coef in (0.1, 1.0):
        # 6 rounds of 4 prompts x 8 samples, 2 PPO passes of 2 steps each: small steps, so the
        # KL penalty (zero in round 0, where pi_t = pi_ref) acts before the policy has moved far
        cfg = RFTConfig(model=str(mixed_policy_dir), data=str(data), output=str(tmp_path / f"b{kl_coef}"),
                        reward_model=str(reward_run / "reward_model"), reward_learning_rate=0.0, num_samples=8,
                        policy_steps=2, learning_rate=1e-3, kl_coef=kl_coef, seed=4, max_new_tokens=MAX_NEW_TOKENS,
                        per_device_batch_size=2, lr_scheduler="constant", rounds=6, epochs=1)
        final = rft.train(cfg)
        assert_same_weights(reward_run / "reward_model", final.parent / "reward_model")  # the reward stayed fixed
        results[kl_coef] = measure(load_policy(ModelConfig(), final, trainable=False), ref, reward, tok, prompts)
    results["ref"] = (r0, kl0)
    r, kl = results[0.1]
    assert r > r0 + 1.0, results  # a third of the reward's range (-1.65 to 1.3); 5x the seed-to-seed spread
    assert 0 < kl <= (r - r0) / 0.1, results
    r1, kl1 = results[1.0]
    # the exact optima pi_ref * exp(r / kl_coef) / Z of this nearly two-valued reward have a KL ratio
    # of about 2.4 (estimated from 16 samples a prompt); trained policies give 5 to 12
    assert 0 < kl1 < kl / 2, results
    assert r1 - kl1 > r - kl, results  # J_1(pi_c=1) > J_1(pi_c=0.1): the extra KL bought less than its cost


def test_reward_is_read_at_the_end_of_turn_token(tiny_model_dir, tokenizer):
    """SmolLM2 pads with its end-of-turn token; the reward model pads with another one, so a
    finished answer is scored at <|im_end|> and differs from the same answer cut short."""
    from sftjuice.models import load_reward_model, reward_pad_id

    eos = tokenizer.eos_token_id
    pad = reward_pad_id(tokenizer, [eos])
    assert pad != eos and tokenizer.pad_token_id == eos
    model = load_reward_model(tiny_model_dir, pad_token_id=pad)
    prompt, answer = [1, 4093, 198, 1780], [216, 34, 28]
    [[finished, cut, longer]] = rewards_of(model, [prompt], [[answer + [eos], answer, answer + [eos, 216]]])
    assert finished != pytest.approx(cut, abs=1e-6)
    [[alone]] = rewards_of(model, [prompt], [[answer + [eos]]])
    assert finished == pytest.approx(alone, abs=1e-5)  # padding to the longer row changes nothing


@pytest.mark.parametrize("method", ["rft", "srppo"])
@pytest.mark.parametrize("option", [("--temperature", "0.7"), ("--top-p", "0.9")])
def test_ppo_methods_sample_from_the_policy_their_ratio_divides_by(method, option, capsys):
    """PPO's ratio and the KL estimate divide by pi_t's untempered log-probs: samples drawn at
    another temperature or from a nucleus come from another policy, so the config refuses them."""
    from sftjuice.cli import main

    assert main(["train", "--method", method, *option, "--data", "d.jsonl", "--output", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sftjuice train: error: {option[0]} {float(option[1])}: --method {method}")
    assert parse_args(TrainConfig, ["--method", method], prog="t").temperature == 1.0
