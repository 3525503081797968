"""`--method steps` (per-step negatives) and `--method rest` (positive-only self-training) on
the round engine: the token cut of a negative, what a round file holds, what `rest` trains
on, both methods end to end from the command line (kill and resume: test_resume.py).

The pure pieces (steps, prefix values, first pit) are tested in test_rso_steps_pieces.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sftjuice.algorithms.steps import first_pit, prefix_values, split_steps, step_ends, token_cuts
from sftjuice.config import RestConfig, StepsConfig

from .conftest import REPO, build_tiny_model, per_token_nll, read_metrics, run_cli, write_jsonl

MULTISTEP = REPO / "src/sftjuice/demo_data/multistep_arithmetic.train.jsonl"

# Verifiers written to a module of their own, loaded as --verifier module:function.
# `parity`: demonstrations (they hold "Answer:") and about half of the random samples verify,
# so rollouts succeed from some prefixes and not from others. `one_line`: a response without
# a line break is correct.
VERIFIERS = '''
def parity(prompt, response, answer):
    return float("Answer:" in response or len(response) % 2 == 0)


def one_line(prompt, response, answer):
    return float("\\n" not in response.strip())
'''


@pytest.fixture(scope="session")
def lined_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama whose samples break lines (about 1 token in 6) and often end
    (end of turn about 1 in 25): random text, but with steps and finished answers. Every
    input embedding has a constant component, and only the line break's and end of turn's
    output rows read it, so their logits stay high whatever the context."""
    path = tmp_path_factory.mktemp("lined")
    model = build_tiny_model(tokenizer, tie_word_embeddings=False)
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    assert tokenizer.decode([newline]) == "\n"
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[newline, 0] = 1.15
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 0.96
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def multistep_file(tmp_path):
    return write_jsonl(tmp_path / "multistep.jsonl", MULTISTEP.read_text().splitlines()[:16])


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the cut of a negative


def test_token_cuts_on_synthetic_tokens():
    # tokens: "a = 1" ".\n" "b" "\n\n" "c" <end of turn>; the "\n\n" token holds a step's
    # break and the blank line that leads into the next step
    vocab = ["a = 1", ".\n", "b", "\n\n", "c", ""]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    ids = [0, 1, 2, 3, 4, 5]
    text = decode(ids)
    assert split_steps(text) == ["a = 1.\n", "b\n", "\nc"] and step_ends(text) == [7, 9, 11]
    cuts = token_cuts(decode, ids)
    assert cuts == [2, 4, 5]  # the first token boundary at or after each step's end
    assert decode(ids[:2]) == text[:7]  # exact where a line break ends its token
    assert decode(ids[:4]) == text[:10] and text[:10].startswith(text[:9])  # the whole "\n\n" token
    assert 5 not in ids[:cuts[-1]]  # the last step's cut is the response without its end of turn


def test_token_cuts_on_real_tokens_reproduce_the_text_without_end_of_turn(tokenizer):
    eot = tokenizer.eos_token_id
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for text in ["2 + 10 = 12\n12 * 3 = 36\n36 + 14 = 50\nAnswer: 50",
                 "11 * 3 = 33\n  33 + 4 = 37\n\n37 + 7 = 44\nAnswer: 44 \n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
        ends, cuts = step_ends(text), token_cuts(decode, ids)
        assert len(cuts) == len(ends) == len(split_steps(text))
        for c, (end, cut) in enumerate(zip(ends, cuts), start=1):
            prefix = decode(ids[:cut])
            assert eot not in ids[:cut]
            assert prefix.startswith(text[:end]) and len(decode(ids[:cut - 1])) < end
            if not text[end:end + 1].isspace():  # a break before text ends its token: the cut is exact
                assert prefix == text[:end], (c, prefix)
        assert cuts[-1] == len(ids) - 1


# ------------------------------------------------------------------ what a round holds


def test_round_file_holds_rollouts_values_and_pits(lined_model_dir, multistep_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftjuice import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "steps_parity.py").write_text(VERIFIERS)
    out = tmp_path / "o"
    cfg = StepsConfig(model=str(lined_model_dir), data=str(multistep_file), output=str(out), rounds=2, epochs=0.5,
                      max_new_tokens=24, rollouts=2, verifier="steps_parity:parity", sft_weight=0.0)  # the bare DPO loss
    train(cfg)
    scope: dict = {}
    exec(VERIFIERS, scope)
    verify = scope["parity"]
    tok = AutoTokenizer.from_pretrained(lined_model_dir)
    sft = AutoModelForCausalLM.from_pretrained(lined_model_dir).eval()
    eot = tok.eos_token_id
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    def logprob(prompt_ids, completion):
        with torch.no_grad():
            logp = sft(torch.tensor([prompt_ids + completion])).logits[0].log_softmax(-1)
        return sum(logp[len(prompt_ids) + t - 1, x].item() for t, x in enumerate(completion))

    rows = rows_of(out / "rounds/0/generations.jsonl")
    assert len(rows) == 8
    pits, values_seen = [], set()
    for row in rows:
        prompt = row["prompt"][-1]["content"]
        prompt_ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        samples = row["samples"]
        assert row["scores"] == [verify(prompt, s["completion"], row["answer"]) if s["finished"] else 0.0 for s in samples]
        assert all(row["scores"][j] >= 0.5 and samples[j]["finished"] for j in row["positives"])
        assert all(row["scores"][j] < 0.5 for j in row["negatives"])
        assert row["demonstration_verified"]  # "Answer:" is in every demonstration
        prefixes = set()
        for pair in row["pairs"]:
            ids = samples[pair["negative"]]["token_ids"]
            text = decode(ids)
            assert pair["cuts"] == token_cuts(decode, ids) and pair["steps"] == len(step_ends(text)) == len(pair["rollouts"])
            for i, (cut, rollouts) in enumerate(zip([0] + pair["cuts"][:-1], pair["rollouts"])):
                prefixes.add(tuple(ids[:cut]))
                assert len(rollouts) == 2
                for x in rollouts:  # each rollout keeps the sample's length budget
                    assert len(x["token_ids"]) <= 24 - cut
                    whole = decode(ids[:cut] + x["token_ids"])
                    assert x["score"] == (verify(prompt, whole, row["answer"]) if x["finished"] else 0.0)
            values = prefix_values([[x["score"] for x in rs] for rs in pair["rollouts"]] + [[row["scores"][pair["negative"]]]], "any")
            assert pair["values"] == values and pair["pit"] == first_pit(values)
            pits.append(pair["pit"])
            values_seen.update(values[:-1])
            # the negative: the sampled tokens through step c, without an end-of-turn token
            c = pair["pit"]
            assert pair["rejected_ids"] == ids[: pair["cuts"][c - 1]] and eot not in pair["rejected_ids"]
            assert decode(pair["rejected_ids"]).startswith(text[: step_ends(text)[c - 1]])
            positive = samples[pair["positive"]]["token_ids"] if pair["positive"] is not None else None
            assert pair["chosen_ids"] == (positive or tok(row["demonstration"], add_special_tokens=False)["input_ids"] + [eot])
            assert pair["ref_chosen"] == pytest.approx(logprob(prompt_ids, pair["chosen_ids"]), abs=2e-3)
            assert pair["ref_rejected"] == pytest.approx(logprob(prompt_ids, pair["rejected_ids"]), abs=2e-3)
        # the prompt's negatives share their bare-prompt rollouts; every distinct prefix was rolled out once
        assert len({json.dumps(p["rollouts"][0]) for p in row["pairs"]}) <= 1
        assert row["rollouts_drawn"] == 2 * len(prefixes)
    assert max(pits) > 1 and values_seen == {0.0, 1.0}  # the data exercises pits past step 1
    first, rnd = read_metrics(out)[:2]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # pi_theta = pi_SFT at the first step
    assert rnd["event"] == "round" and rnd["pairs"] == sum(len(r["pairs"]) for r in rows)
    assert rnd["pit_mean"] == pytest.approx(sum(pits) / len(pits))


def test_credit_response_pairs_whole_samples_without_rollouts(tiny_model_dir, multistep_file, tmp_path):
    from sftjuice import train

    out = tmp_path / "o"
    train(StepsConfig(model=str(tiny_model_dir), data=str(multistep_file), output=str(out), rounds=2, epochs=0.5,
                      max_new_tokens=8, credit="response"))
    rows = rows_of(out / "rounds/0/generations.jsonl")
    pairs = [(row, p) for row in rows for p in row["pairs"]]
    assert pairs
    for row, p in pairs:
        assert p["rejected_ids"] == row["samples"][p["negative"]]["token_ids"] and "rollouts" not in p
    assert "pit_mean" not in read_metrics(out)[1]


def test_rest_trains_only_on_verified_samples(lined_model_dir, multistep_file, tmp_path, monkeypatch):
    """The round's positives are exactly the finished one-line samples (distinct, at most 2 a
    prompt), and the single step's loss is the mean NLL of their tokens under the starting
    model: nothing else (no wrong sample, no demonstration) is in the loss."""
    from sftjuice import train
    from sftjuice.scoring import token_logprobs_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rest_one_line.py").write_text(VERIFIERS)
    out = tmp_path / "o"
    train(RestConfig(model=str(lined_model_dir), data=str(multistep_file), output=str(out), rounds=1, epochs=1,
                     max_new_tokens=16, per_device_batch_size=16, verifier="rest_one_line:one_line"))
    rows = rows_of(out / "rounds/0/generations.jsonl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lined_model_dir)
    positives, prompts = [], []
    for row in rows:
        seen, want = set(), []
        for j, s in enumerate(row["samples"]):
            if s["finished"] and "\n" not in s["completion"].strip() and s["completion"].strip() not in seen and len(want) < 2:
                seen.add(s["completion"].strip())
                want.append(j)
        assert row["positives"] == want
        if want:
            prompts.append(tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
            positives.append([row["samples"][j]["token_ids"] for j in want])
    n_samples = sum(len(r["samples"]) for r in rows)
    assert 0 < sum(map(len, positives)) < n_samples  # some samples verify, most do not
    start = AutoModelForCausalLM.from_pretrained(lined_model_dir)
    logps = token_logprobs_of(start, tok.pad_token_id, prompts, [[c for c in cs] for cs in positives], batch_size=1)
    tokens = [x for group in logps for completion in group for x in completion]
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(-sum(tokens) / len(tokens), rel=1e-4)
    assert metrics[1]["positives"] == sum(map(len, positives)) and metrics[1]["accuracy"] > 0


# ------------------------------------------------------------- the command line, resumed


@pytest.mark.slow
@pytest.mark.parametrize("method", ["steps", "rest"])
def test_cli_runs_with_only_model_data_output(method, tiny_model_dir, multistep_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    sizes = ["--max-new-tokens", "24", "--rounds", "2"] + (["--rollouts", "2"] if method == "steps" else [])
    run_cli("train", "--method", method, "--model", tiny_model_dir, "--data", multistep_file, "--output", out, *sizes)
    AutoModelForCausalLM.from_pretrained(out / "final")
    rounds = [m for m in read_metrics(out) if m.get("event") == "round"]
    assert [m["round"] for m in rounds] == [0, 1] and all(m["samples"] == 32 for m in rounds)
    if method == "steps":  # nothing a random model writes verifies; the demonstrations pair with its samples
        assert all(m["pairs"] > 0 and m["rollouts_drawn"] > 0 and m["accuracy"] == 0 for m in rounds)
        assert all("loss" in m for m in read_metrics(out) if "event" not in m)


def test_sft_weight_adds_the_positives_per_token_nll(tiny_model_dir, multistep_file, tmp_path):
    from sftjuice.algorithms.steps import PairGroup, dpo_micro_loss
    from sftjuice.training import start_run

    cfg = StepsConfig(model=str(tiny_model_dir), data=str(multistep_file), output=str(tmp_path / "o"))
    run = start_run(cfg)
    learner = run.learner(run.policy_model, cfg.learning_rate, 1)
    groups = [PairGroup(e, [list(e.completion_ids)], [[216, 34, 2]], [-30.0], [-20.0]) for e in run.examples[:3]]
    losses = {w: dpo_micro_loss(learner, cfg.beta, w)(groups)[0].item() for w in (0.0, 0.5)}
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * per_token_nll(run.policy, run.examples[:3]), rel=1e-4)
