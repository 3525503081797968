"""sftjuice eval: the verifier, intervals and win rates against hand values; the loglik,
reward-model and gap judges against plain forward passes; checkpoints of a training
folder; the command line end to end; bad pairs rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sftjuice.algorithms import sft
from sftjuice.cli import main
from sftjuice.config import EvalConfig, SamplingConfig, SFTConfig
from sftjuice.data import CHATML_TEMPLATE, ChatFormat, DataError, load_demonstrations
from sftjuice.evaluation import (Response, RewardJudge, WinRate, accuracy, compare, load_pairs, mean_interval,
                                 proportion, run_eval)
from sftjuice.generation import sample
from sftjuice.verifiers import exact

from .conftest import run_cli, sort_rows, write_jsonl


def plain_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log pi(completion | prompt): one unpadded sequence, no cache, full log-softmax."""
    ids = prompt_ids + completion_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logp[len(prompt_ids) + t - 1, tok].item() for t, tok in enumerate(completion_ids))


def pairs_rows(n: int = 4) -> list[dict]:
    """Preference pairs on the demo prompts: the demonstration against a shuffled answer."""
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": ", ".join(reversed(r["completion"].split(", ")))}
            for r in sort_rows(n)]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("-0.4, -0.2, 0, 2", "-0.4, -0.2, 0, 2", True),  # exact
        ("0.5", "1/2", True),  # numeric
        ("1/2", "0.50", True),
        ("The answer is 42.", "42", True),
        ("Let me see.\nAnswer: -7", "-7", True),
        ("-0.2, -0.4, 0, 2", "-0.4, -0.2, 0, 2", False),  # list order matters
        ("-0.4, -0.2, 0", "-0.4, -0.2, 0, 2", False),
        ("43", "42", False),
        ("seven", "7", False),
    ],
)
def test_verifier_hand_cases(response, answer, expected):
    assert exact("", response, answer) == float(expected)


@pytest.mark.parametrize(
    "successes, n, low, high",
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_against_published_values(successes, n, low, high):
    e = proportion(successes, n)
    assert (e.mean, e.n) == (successes / n, n)
    assert e.low == pytest.approx(low, abs=1e-4) and e.high == pytest.approx(high, abs=1e-4)


def test_mean_interval_against_hand_values():
    e = mean_interval([1.0, 2.0, 3.0, 4.0])  # sd = sqrt(5/3), half width = 1.96 * sd / 2
    assert e.mean == 2.5 and e.low == pytest.approx(2.5 - 1.2651744, abs=1e-6) and e.high == pytest.approx(3.7651744, abs=1e-6)


def test_win_rate_counts_ties_apart():
    # verifier outcomes per prompt: both right and both wrong are ties
    w = compare([1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1])
    assert (w.wins, w.ties, w.losses) == (2, 3, 1) and w.n == 6
    assert vars(w.rate()) == vars(proportion(2, 3))
    w = compare([0.5, -1.0, 2.0], [0.5 + 1e-12, -2.0, 3.0])  # scores: equal within rounding is a tie
    assert (w.wins, w.ties, w.losses) == (1, 1, 1)
    assert WinRate(0, 4, 0).rate().n == 0  # nothing decided: no rate
    # several samples per prompt: a prompt's share of correct samples
    assert accuracy([[1.0], [0.0], [1.0], [1.0]]).mean == 0.75 and accuracy([[1.0], [0.0]]).low == proportion(1, 2).low
    assert vars(accuracy([[1.0, 0.0], [1.0, 1.0]])) == vars(mean_interval([0.5, 1.0]))


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "q", "chosen": "a"}, ":2: field 'rejected': missing"),
        ({"chosen": "a", "rejected": "b"}, ":2: field 'prompt': missing"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, ":2: field 'prompt': empty"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, ":2: field 'prompt[0]': expected"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, ":2: field 'chosen': expected a string, got int"),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, ":2: field 'rejected': empty"),
        ("{oops", ":2: invalid JSON"),
    ],
)
def test_bad_pairs_row_names_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pairs_rows(1)[0], row])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(path) + expected in str(e.value)
    if not isinstance(row, str):  # (a line that is not JSON stops the load whatever --skip-invalid says)
        assert len(load_pairs(path, skip_invalid=True)) == 1


def test_cli_reports_bad_options_and_rows_in_one_line(tmp_path, tiny_model_dir, capsys):
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a"}])
    assert main(["eval", "--judge", "gap", "--pairs", str(bad), "--model", str(tiny_model_dir), "--output", str(tmp_path)]) == 2
    assert f"sftjuice eval: error: {bad}:1: field 'rejected': missing" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(2))
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path)]
    assert main(["eval", "--num-samples", "2", *common]) == 2
    assert "--num-samples > 1 needs --temperature > 0" in capsys.readouterr().err
    assert main(["eval", "--judge", "verfier", *common]) == 2
    assert "--judge is verifier, loglik, gap or a reward-model directory" in capsys.readouterr().err
    other = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "something else", "completion": "1"}])
    assert main(["eval", "--responses", str(other), *common]) == 2
    assert f"{other}: no response for the prompt of {data}:1 (and 1 more)" in capsys.readouterr().err


# ------------------------------------------------------------------------- judges


def test_loglik_judge_equals_a_plain_forward_pass(tiny_model_dir, policy, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(4))
    run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), judge="loglik", output=str(tmp_path / "out"), batch_size=3))
    ev = json.loads((tmp_path / "out/eval.json").read_text())
    chat = ChatFormat(tokenizer)
    hand = []
    for d in load_demonstrations(data):
        c = chat.completion_ids(d.prompt, d.completion)
        hand.append(plain_logprob(policy, chat.prompt_ids(d.prompt), c) / len(c))
    ours = [r["model"]["score"] for r in ev["records"]]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(hand), atol=1e-4, rtol=0)
    assert ev["model"]["score"]["mean"] == pytest.approx(sum(hand) / len(hand), abs=1e-4)
    assert ev["model"]["score"]["n"] == 4 and "accuracy" not in ev["model"] and "win_rate" not in ev


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_judge_scores_the_ids_the_policy_saw(reward_dir, tiny_model_dir, policy, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    direct = lambda ids: rm(torch.tensor([ids])).logits[0, 0].item()  # noqa: E731
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id])
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(4))
    demos = load_demonstrations(data)

    # sampled ids are scored as they are; responses without ids are rendered from their text
    responses = [[Response("?", [17, 230, 5, tokenizer.eos_token_id][: 2 + i % 3]), Response(f"{i}, 2")]
                 for i in range(len(demos))]
    judge = RewardJudge(str(reward_dir), batch_size=3)
    ours = judge.score(demos, responses, chat)
    with torch.no_grad():
        hand = [[direct(chat.prompt_ids(d.prompt) + rs[0].token_ids),
                 direct(chat.prompt_ids(d.prompt) + chat.completion_ids(d.prompt, rs[1].text))]
                for d, rs in zip(demos, responses)]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(hand), atol=1e-5, rtol=0)
    # file responses: the directory's own tokenizer renders them (the same one here)
    texts_only = [[Response(r.text) for r in rs] for rs in responses]
    assert judge.score(demos, texts_only, None)[0][1] == pytest.approx(hand[0][1], abs=1e-5)

    # a reward model with another chat template reads prompt and response in its own
    from transformers import AutoTokenizer

    other = tmp_path / "other_template"
    rm.save_pretrained(other)
    own = AutoTokenizer.from_pretrained(reward_dir)
    own.chat_template = CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> ")
    own.save_pretrained(other)
    own_chat = ChatFormat(own)
    assert own_chat.prompt_ids(demos[0].prompt) != chat.prompt_ids(demos[0].prompt)
    with torch.no_grad():
        hand = [[direct(own_chat.prompt_ids(d.prompt) + own_chat.completion_ids(d.prompt, r.text)) for r in rs]
                for d, rs in zip(demos, responses)]
    ours = RewardJudge(str(other), batch_size=3).score(demos, responses, chat)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(hand), atol=1e-5, rtol=0)

    # end to end: the greedy responses of the policy, with the ids it generated
    run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), judge=str(reward_dir), output=str(tmp_path / "out"),
                        max_new_tokens=6))
    ev = json.loads((tmp_path / "out/eval.json").read_text())
    prompts = [chat.prompt_ids(d.prompt) for d in demos]
    greedy = sample(policy, prompts, SamplingConfig(temperature=0.0, max_new_tokens=6), chat.stop_token_ids,
                    tokenizer.pad_token_id, seed=0, progress=False)
    with torch.no_grad():
        hand = [direct(p + ss[0].token_ids) for p, ss in zip(prompts, greedy)]
    assert [r["model"]["responses"] for r in ev["records"]] == [[chat.decode(ss[0].token_ids)] for ss in greedy]
    torch.testing.assert_close(torch.tensor([r["model"]["score"] for r in ev["records"]]), torch.tensor(hand),
                               atol=1e-5, rtol=0)
    assert ev["model"]["score"]["mean"] == pytest.approx(sum(hand) / len(hand), abs=1e-5)


def test_gap_of_a_model_equals_hand_computed_logprob_differences(tiny_model_dir, policy, tokenizer, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(4))
    run_eval(EvalConfig(model=str(tiny_model_dir), judge="gap", pairs=str(pairs), output=str(tmp_path / "out")))
    ev = json.loads((tmp_path / "out/eval.json").read_text())
    chat = ChatFormat(tokenizer)
    hand = []
    for r in pairs_rows(4):
        msgs = [{"role": "user", "content": r["prompt"]}]
        p = chat.prompt_ids(msgs)
        hand.append(plain_logprob(policy, p, chat.completion_ids(msgs, r["chosen"]))
                    - plain_logprob(policy, p, chat.completion_ids(msgs, r["rejected"])))
    [result] = ev["results"]
    torch.testing.assert_close(torch.tensor([r["gaps"][0] for r in ev["records"]]), torch.tensor(hand), atol=1e-3, rtol=0)
    assert result["gap"]["mean"] == pytest.approx(sum(hand) / 4, abs=1e-3) and result["step"] is None
    assert result["chosen_preferred"]["mean"] == sum(h > 0 for h in hand) / 4
    assert not (tmp_path / "out/gap.png").exists()  # one model: no curve


@pytest.mark.parametrize("lora", [False, True])
def test_gap_across_the_checkpoints_of_a_training_folder(tiny_model_dir, tmp_path, lora):
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(8))
    run = tmp_path / "run"
    sft.train(SFTConfig(model=str(tiny_model_dir), data=str(data), output=str(run), per_device_batch_size=4,
                          save_every=1, keep_checkpoints=100, learning_rate=1e-2 if lora else 1e-3, lora=lora))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(4))
    out = tmp_path / "out"
    assert main(["eval", "--judge", "gap", "--pairs", str(pairs), "--model", str(run), "--baseline", str(tiny_model_dir),
                 "--output", str(out)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert [(r["role"], r["name"], r["step"]) for r in ev["results"]] == [
        ("model", "run start", 0), ("model", "run step 1", 1), ("model", "run step 2", 2), ("model", "run final", 2),
        ("baseline", str(tiny_model_dir), None)]
    start, step1, step2, final, baseline = zip(*(r["gaps"] for r in ev["records"]))
    assert start == baseline  # the run started from the baseline
    torch.testing.assert_close(torch.tensor(step2), torch.tensor(final), atol=1e-4, rtol=0)  # final = the last step
    assert all(abs(a - b) > 1e-3 for a, b in zip(start, step1))  # the checkpoints hold the trained weights
    assert (out / "gap.png").stat().st_size > 0 and "run step 2" in (out / "eval.md").read_text()


# ---------------------------------------------------------------- command line


def test_cli_verifier_with_a_baseline_end_to_end(tiny_model_dir, tmp_path):
    rows = sort_rows(8)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    # the baseline's responses come from a file: 4 of 8 right (one in a sentence)
    answers = [r["completion"] if i % 2 == 0 else "1, 2, 3" for i, r in enumerate(rows)]
    answers[2] = f"The answer is {rows[2]['completion']}."
    responses = write_jsonl(tmp_path / "b.jsonl", [{"prompt": r["prompt"], "completion": a} for r, a in zip(rows, answers)])
    out = tmp_path / "out"
    proc = run_cli("eval", "--model", tiny_model_dir, "--baseline-responses", responses, "--data", data,
                   "--judge", "verifier", "--max-new-tokens", 6, "--output", out)
    assert "accuracy" in proc.stdout and "wins / ties / losses" in proc.stdout
    ev = json.loads((out / "eval.json").read_text())
    assert ev["judge"] == "verifier" and ev["prompts"] == 8 and ev["decoding"] == "greedy decoding"
    records = ev["records"]
    assert [r["source"] for r in records] == [f"{data}:{i}" for i in range(1, 9)]
    assert [r["baseline"]["responses"] for r in records] == [[a] for a in answers]
    assert [r["baseline"]["score"] for r in records] == [1.0, 0.0] * 4
    assert ev["baseline"]["accuracy"] == vars(proportion(4, 8)) == ev["baseline"]["score"]
    for role in ("model", "baseline"):  # accuracy = mean of per-prompt correctness
        correct = [r[role]["score"] for r in records]
        assert ev[role]["accuracy"]["mean"] == sum(correct) / 8 and ev[role]["accuracy"]["n"] == 8
        assert all(len(r[role]["responses"]) == 1 for r in records)
    assert [r["model"]["score"] for r in records] == [exact("", r["model"]["responses"][0], r["reference"]) for r in records]
    outcomes = [r["outcome"] for r in records]
    win = ev["win_rate"]
    assert (win["wins"], win["ties"], win["losses"]) == tuple(outcomes.count(o) for o in ("win", "tie", "loss"))
    for r in records:
        a, b = r["model"]["score"], r["baseline"]["score"]
        assert r["outcome"] == ("win" if a > b else "loss" if a < b else "tie")
    if win["wins"] + win["losses"]:
        assert win["rate"] == vars(proportion(win["wins"], win["wins"] + win["losses"]))
    md = (out / "eval.md").read_text()
    assert md.startswith("# sftjuice eval: --judge verifier on 8 prompts") and f"| baseline: {responses} |" in md


def test_cut_file_responses_are_scored_without_an_end_of_turn_token(reward_dir, tokenizer, tmp_path):
    """A response cut at the length limit never had an end-of-turn token; re-rendered from its
    text (e.g. a `sftjuice generate` file, which records "finished"), it must not get one."""
    from transformers import AutoModelForSequenceClassification

    from sftjuice.evaluation import read_responses

    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id])
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(2))
    demos = load_demonstrations(data)
    rows = [{"prompt": d.prompt, "completion": "1, 2, 3", "finished": finished} for d, finished in zip(demos, (True, False))]
    responses = read_responses(write_jsonl(tmp_path / "r.jsonl", rows), demos)
    assert [r[0].finished for r in responses] == [True, False]
    [[finished], [cut]] = RewardJudge(str(reward_dir), batch_size=2).score(demos, responses, chat)
    ids = [chat.completion_ids(d.prompt, "1, 2, 3") for d in demos]
    assert ids[1][-1] == tokenizer.eos_token_id
    with torch.no_grad():
        direct = lambda p, c: rm(torch.tensor([chat.prompt_ids(p) + c])).logits[0, 0].item()  # noqa: E731
        assert finished == pytest.approx(direct(demos[0].prompt, ids[0]), abs=1e-5)
        assert cut == pytest.approx(direct(demos[1].prompt, ids[1][:-1]), abs=1e-5)


def test_a_tokenizer_without_chat_template_needs_one_chosen(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    tok = AutoTokenizer.from_pretrained(bare)
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(4))
    args = ["eval", "--model", str(bare), "--data", str(data), "--output", str(tmp_path / "o"), "--max-new-tokens", "4"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "the tokenizer has no chat template; choose one with --chat-template chatml (or a Jinja file): it is saved with the trained model")
    assert main(args + ["--chat-template", "chatml"]) == 0


def test_the_verifier_ignores_case_and_reads_thousands_separators(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Round 49,731 to the nearest thousand.", "completion": "50000"},
            {"prompt": "Is 3 > 2? Answer True or False.", "completion": "True"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    responses = write_jsonl(tmp_path / "r.jsonl", [{"prompt": rows[0]["prompt"], "completion": "Answer: 50,000."},
                                                   {"prompt": rows[1]["prompt"], "completion": "TRUE"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--responses", str(responses),
                 "--output", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["model"]["accuracy"]["mean"] == 1.0
