"""RSO on tiny models: the losses through a model, the round file (candidates from the frozen
start, acceptance, pairs), both rewards end to end, options (kill and resume: test_resume.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from sftjuice.algorithms.rounds import Completion
from sftjuice.algorithms.rso import NO_PAIR, Pairs, accept_and_pair, pair_micro_loss, accepted_pairs_in
from sftjuice.cli import main
from sftjuice.config import RSOConfig
from sftjuice.models import load_policy, load_reward_model, reward_pad_id, save_reward_model
from sftjuice.scoring import rewards_of, token_logprobs_of
from sftjuice.storage import read_jsonl

from .conftest import read_metrics, run_cli, sort_rows, write_jsonl

SMALL = ["--num-candidates", "4", "--num-accepted", "2", "--max-new-tokens", "8", "--rounds", "2"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A reward model as cheap as it gets: the tiny model's backbone with a fresh score head."""
    path = tmp_path_factory.mktemp("rso_reward") / "reward_model"
    model = load_reward_model(tiny_model_dir, pad_token_id=reward_pad_id(tokenizer, [tokenizer.eos_token_id]))
    save_reward_model(model, tokenizer, path)
    return path


# --------------------------------------------------------------------- one prompt


def test_copies_are_one_response_and_pairs_are_disjoint():
    """Copies share their first copy's reward and are accepted at most once; the accepted are
    min(M, distinct) responses in disjoint pairs, winner above loser."""
    a, b, c = [5, 6, 2], [7, 2], [8, 9, 9, 2]
    candidates = [a, b, list(a), c, list(a), list(b)]
    for seed in range(50):
        got = accept_and_pair(candidates, [0.3, -1.0, 0.9, 2.0, 0.1, 5.0], rejection_beta=1.0, num_accepted=4, rng=random.Random(seed))
        assert got["rewards"] == [0.3, -1.0, 0.3, 2.0, 0.3, -1.0]
        texts = [tuple(candidates[i]) for i in got["accepted"]]
        assert len(texts) == len(set(texts)) == 3  # three distinct responses, fewer than M = 4
        assert len(got["pairs"]) == 1
        (w, l), = got["pairs"]
        assert {w, l} <= set(got["accepted"]) and got["rewards"][w] > got["rewards"][l]
    # one response drawn N times: nothing to pair
    assert accept_and_pair([a, list(a), list(a)], [1.0, 1.0, 1.0], 0.5, 2, random.Random(0))["pairs"] == []


# ------------------------------------------------------------------------ the loss


def _pairs_run(tiny_model_dir, demo_file, tmp_path, **kw):
    from sftjuice.training import start_run

    cfg = RSOConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(tmp_path / "o"),
                    reward_model="unused", max_grad_norm=0, **kw)
    run = start_run(cfg)
    return cfg, run, run.learner(run.policy_model, cfg.learning_rate, 1)


def _items(run, n_pairs: list[int], ref_noise: float = 0.0) -> list[Pairs]:
    """Prompts with n_pairs[i] (winner, loser) pairs, the references the model's own log-probs
    (each token's moved by up to ``ref_noise``, so that margins are not 0)."""
    rng = random.Random(0)
    items = []
    for e, n in zip(run.examples, n_pairs):
        comps = [[rng.randrange(200, 5000) for _ in range(rng.randrange(2, 6))] + [2] for _ in range(2 * n)]
        [refs] = token_logprobs_of(run.policy, run.tokenizer.pad_token_id, [e.prompt_ids], [comps]) if n else [[]]
        cs = [Completion(c, [x + rng.uniform(-ref_noise, ref_noise) for x in lp]) for c, lp in zip(comps, refs)]
        items.append(Pairs(e, list(zip(cs[0::2], cs[1::2]))))
    return items


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "hinge-norm"])
def test_one_step_of_each_loss_raises_the_winners_margin(kind, tiny_model_dir, demo_file, tmp_path):
    """A real optimiser step through the model: pi_theta = pi_SFT at first (margin 0, sigmoid loss
    log 2, hinge 1), then the step raises log pi(y_w) - log pi(y_l) and lowers the loss."""
    cfg, run, learner = _pairs_run(tiny_model_dir, demo_file, tmp_path, loss=kind, learning_rate=1e-3, beta=0.5)
    items = _items(run, [2, 1, 3])
    loss = pair_micro_loss(learner, cfg)
    with torch.no_grad():
        before_sum, before = loss(items)
    if kind != "hinge":  # plain hinge has no reference: its margin is the raw log-prob gap
        assert before["margin"].item() == pytest.approx(0.0, abs=1e-3)
        assert before_sum.item() / 6 == pytest.approx(math.log(2) if kind == "sigmoid" else 1.0, abs=1e-3)
    learner.step(items, loss, accepted_pairs_in)
    with torch.no_grad():
        after_sum, after = loss(items)
    assert after["margin"].item() > before["margin"].item() + 0.1
    assert after_sum.item() < before_sum.item()
    assert after["logp_winner"].item() - after["logp_loser"].item() > before["logp_winner"].item() - before["logp_loser"].item()


def test_empty_pair_slots_change_nothing(tiny_model_dir, demo_file, tmp_path):
    """Prompts with fewer pairs than others in their micro-batch (and prompts without any) get
    masked slots: the sums equal those of each prompt computed alone. The references are moved
    off the policy's log-probs: at margin 0, the count of positive margins would depend on
    rounding (it did under torch 2.6)."""
    cfg, run, learner = _pairs_run(tiny_model_dir, demo_file, tmp_path)
    items = _items(run, [1, 3, 0], ref_noise=0.5)
    loss = pair_micro_loss(learner, cfg)
    with torch.no_grad():
        together = loss(items)[1]
        alone = [loss([g])[1] for g in items]
    for key in together:
        assert together[key].item() == pytest.approx(sum(a[key].item() for a in alone), abs=1e-4)
    assert accepted_pairs_in(items) == 4 and NO_PAIR[0].logprob == 0.0


# ------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def rso_run(tmp_path_factory, tiny_model_dir, reward_dir):
    """The command line with only the required options and small sizes (and a learning rate at
    which the policy visibly moves between rounds)."""
    root = tmp_path_factory.mktemp("rso_run")
    data = write_jsonl(root / "demos.jsonl", sort_rows(16))
    run_cli("train", "--method", "rso", "--model", tiny_model_dir, "--data", data, "--output", root / "o",
            "--reward-model", reward_dir, *SMALL, "--learning-rate", "1e-3")
    return root / "o"


def test_rso_runs_with_a_reward_model_and_its_output_loads(rso_run):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(rso_run / "final")
    rounds = [m for m in read_metrics(rso_run) if m.get("event") == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        # 8 prompts of 4 distinct candidates (a random model), 2 accepted each, in one pair
        assert r["samples"] == 32 and r["distinct_per_prompt"] == 4 and r["acceptance_rate"] == 0.5
        assert r["pairs"] == 8 and r["prompts_without_pairs"] == 0 and r["skipped_steps"] == 0
        assert r["reward_pair_gap"] > 0 and 0 < r["first_pass_acceptance"] <= 1
        assert r["loss"] > 0 and r["margin"] is not None
    steps = [m for m in read_metrics(rso_run) if "event" not in m]
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-4)  # pi_theta = pi_SFT, the reference, at first


def test_a_round_without_pairs_trains_nothing_and_counts_its_skipped_steps(tmp_path, tiny_model_dir, reward_dir):
    """At a temperature near 0 every candidate is the same response, so no prompt has a pair:
    every step is skipped (logged, counted in the round's skipped_steps), and the weights stay
    the starting model's."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(16))
    run_cli("train", "--method", "rso", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "o",
            "--reward-model", reward_dir, *SMALL, "--temperature", "1e-6", "--learning-rate", "1e-3")
    metrics = read_metrics(tmp_path / "o")
    steps = [m for m in metrics if "event" not in m]
    rounds = [m for m in metrics if m.get("event") == "round"]
    assert steps and all(m["skipped"] == 1 and m["pairs"] == 0 and "loss" not in m for m in steps)
    assert [r["pairs"] for r in rounds] == [0, 0] and [r["distinct_per_prompt"] for r in rounds] == [1, 1]
    assert sum(r["skipped_steps"] for r in rounds) == len(steps) and all(r["loss"] is None for r in rounds)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "final").state_dict()
    assert all(torch.equal(start[k], final[k]) for k in start)


def test_round_file_holds_scored_candidates_of_the_frozen_start(rso_run, tiny_model_dir, reward_dir, tokenizer):
    """Every round's candidates come from the starting model (the sampler's log-probs are its
    fresh log-probs, in round 1 too, after round 0 trained); the rewards are the reward model's;
    accepted = min(M, distinct); pairs disjoint, winner above loser."""
    from sftjuice.data import ChatFormat

    start = load_policy(RSOConfig(), tiny_model_dir, trainable=False).eval()
    final = load_policy(RSOConfig(), rso_run / "final", trainable=False).eval()
    rm = load_reward_model(reward_dir).eval()
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id])
    for r in (0, 1):
        rows = read_jsonl(rso_run / f"rounds/{r}/generations.jsonl")
        assert len(rows) == 8 and len({row["policy"] for row in rows}) == 1
        moved = 0.0
        for row in rows:
            prompt = chat.prompt_ids(row["prompt"])
            cands = [s["token_ids"] for s in row["samples"]]
            assert len(cands) == 4
            [fresh], [now] = (token_logprobs_of(m, tokenizer.pad_token_id, [prompt], [cands]) for m in (start, final))
            for s, f, n in zip(row["samples"], fresh, now):
                torch.testing.assert_close(torch.tensor(s["token_logprobs"]), torch.tensor(f), atol=1e-4, rtol=0)
                moved = max(moved, max(abs(a - b) for a, b in zip(f, n)))
            [scores] = rewards_of(rm, [prompt], [cands])
            assert row["rewards"] == pytest.approx(scores, abs=1e-4)
            distinct = len({tuple(c) for c in cands})
            assert len(row["accepted"]) == min(2, distinct) == len(set(row["accepted"]))
            flat = [i for p in row["pairs"] for i in p]
            assert len(flat) == len(set(flat)) and set(flat) <= set(row["accepted"])
            assert all(row["rewards"][w] > row["rewards"][l] for w, l in row["pairs"])
        assert moved > 1e-4  # the trained policy did move: the match above is to the start, not to it
    assert rows[0]["policy"] == read_jsonl(rso_run / "rounds/0/generations.jsonl")[0]["policy"]


def test_implicit_reward_finds_the_base_and_scores_the_log_ratio(wrong_task_model_dir, tiny_model_dir, tmp_path):
    """--reward implicit with --model the final/ of an SFT run: the base is that run's starting
    model; a finished candidate's reward is log pi_SFT - log pi_base, a cut one --no-eos-penalty."""
    from sftjuice.data import ChatFormat
    from sftjuice.models import load_tokenizer

    data = write_jsonl(tmp_path / "demos.jsonl", sort_rows(8))
    out = tmp_path / "o"
    run_cli("train", "--method", "rso", "--model", wrong_task_model_dir, "--data", data, "--output", out,
            "--reward", "implicit", "--base-model", tiny_model_dir, *SMALL, "--max-new-tokens", "12", "--rejection-beta", "2")
    assert json.loads((out / "manifest.json").read_text())["config"]["base_model"] == str(tiny_model_dir)
    tok = load_tokenizer(out / "final")
    chat = ChatFormat(tok, [tok.eos_token_id])
    base = load_policy(RSOConfig(), tiny_model_dir, trainable=False).eval()
    finished = 0
    for r in (0, 1):
        for row in read_jsonl(out / f"rounds/{r}/generations.jsonl"):
            cands = [s["token_ids"] for s in row["samples"]]
            [by_base] = token_logprobs_of(base, tok.pad_token_id, [chat.prompt_ids(row["prompt"])], [cands])
            for s, b, got in zip(row["samples"], by_base, row["rewards"]):
                want = sum(s["token_logprobs"]) - sum(b) if s["finished"] else -1.0
                assert got == pytest.approx(want, abs=1e-3)
                finished += s["finished"]
    assert finished > 0
    rounds = [m for m in read_metrics(out) if m.get("event") == "round"]
    assert len(rounds) == 2 and sum(r["pairs"] for r in rounds) > 0

    # without --base-model it is found in --model's run folder (a tiny run: one round, one candidate pair)
    run_cli("train", "--method", "rso", "--model", wrong_task_model_dir, "--data", write_jsonl(tmp_path / "two.jsonl", sort_rows(2)),
            "--output", tmp_path / "found", "--reward", "implicit", "--num-candidates", "2", "--num-accepted", "2",
            "--max-new-tokens", "4", "--rounds", "1")
    assert json.loads((tmp_path / "found/manifest.json").read_text())["config"]["base_model"] == str(tiny_model_dir)


@pytest.mark.parametrize("argv, message", [
    ([], "--method rso needs --reward-model DIR (a sequence-classification reward with the policy's tokenizer, "
         "e.g. an RFT run's OUTPUT/reward_model), or --reward implicit"),
    (["--reward-model", "r", "--num-candidates", "4"], "--num-accepted 8: must be <= --num-candidates 4"),
    (["--reward", "implicit", "--reward-model", "r"], "--reward-model is for --reward model; --reward implicit reads --base-model"),
    (["--reward-model", "r", "--base-model", "b"], "--base-model is for --reward implicit; --reward model reads --reward-model"),
    (["--reward-model", "r", "--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--reward-model", "r", "--num-accepted", "1"], "--num-accepted 1: must be >= 2"),
])
def test_rso_options_are_checked_in_one_line(argv, message, capsys, tmp_path):
    assert main(["train", "--method", "rso", *argv, "--data", "d.jsonl", "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"sftjuice train: error: {message}"
    assert not (tmp_path / "o").exists()


