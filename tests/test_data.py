"""Demonstration loading, validation and chat templating."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sftjuice.data import ChatFormat, DataError, collate, load_demonstrations

from .conftest import run_cli, write_jsonl

GOOD_CHAT = {"messages": [{"role": "user", "content": "Sort 3, 1."}, {"role": "assistant", "content": "1, 3"}]}
GOOD_PC = {"prompt": "Sort 2, 1.", "completion": "1, 2"}


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([GOOD_PC, "{not json"], ":2: invalid JSON"),
        ([GOOD_PC, {"prompt": "x", "completion": ""}], ":2: field 'completion': empty completion"),
        ([{"prompt": "x", "completion": 3}], ":1: field 'completion': expected a string, got int"),
        ([{"prompt": "x"}], ":1: field 'completion': missing"),
        ([{"prompt": 5, "completion": "y"}], ":1: field 'prompt': expected a non-empty list"),
        ([{"messages": "hi"}], ":1: field 'messages': expected a non-empty list"),
        ([{"messages": [{"role": "user", "content": 1}]}], ":1: field 'messages[0]': expected"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: field 'messages': last message has role 'user'"),
        ([{"messages": [{"role": "assistant", "content": "hi"}]}], ":1: field 'messages': no prompt"),
        ([GOOD_CHAT, GOOD_CHAT, {"text": "x"}], ":3: field '<row>': expected a 'messages' field or a 'prompt' field"),
        ([[1, 2]], ":1: field '<row>': expected a JSON object"),
    ],
)
def test_invalid_rows_name_file_line_and_field(tmp_path, rows, expected):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_demonstrations(path)
    assert str(path) + expected in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_demonstrations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no valid rows"):
        load_demonstrations(tmp_path / "empty.jsonl")


def test_skip_invalid_counts_and_reports(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_PC, {"prompt": "x", "completion": " "}, GOOD_CHAT, "[]"])
    with caplog.at_level(logging.WARNING):
        demos = load_demonstrations(path, skip_invalid=True)
    assert len(demos) == 2
    assert "skipped 2 of 4 rows" in caplog.text and f"{path}:2: field 'completion'" in caplog.text


def test_formats_json_dataset_dir_and_aliases(tmp_path):
    import datasets

    rows = [GOOD_CHAT, {"prompt": "Q?", "response": "A."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
             "completion": [{"role": "assistant", "content": "A."}], "answer": "A"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    demos = load_demonstrations(tmp_path / "d.json")
    assert [d.completion for d in demos] == ["1, 3", "A.", "A."]
    assert demos[2].prompt[0]["role"] == "system" and demos[2].extra == {"answer": "A"}
    datasets.Dataset.from_list([GOOD_PC, GOOD_PC]).save_to_disk(str(tmp_path / "ds"))
    assert len(load_demonstrations(tmp_path / "ds")) == 2


def test_training_tokens_are_the_generation_prompt_plus_the_rendered_turn(tokenizer):
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id])
    messages = [{"role": "user", "content": "Sort 2, -0.2, 0 in ascending order."}]
    ex = chat.encode(load_rows([{"prompt": messages, "completion": "-0.2, 0, 2"}]), 512, 1024)[0]
    generation_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ex.prompt_ids == list(generation_prompt)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "-0.2, 0, 2"}],
                                         tokenize=True, return_dict=False)
    # the whole rendered chat, up to and including the end-of-turn token
    assert list(full)[: len(ex.prompt_ids) + len(ex.completion_ids)] == ex.prompt_ids + ex.completion_ids
    assert ex.completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ex.completion_ids) == "-0.2, 0, 2<|im_end|>"


def load_rows(rows):
    from sftjuice.data import parse_row

    return [parse_row(r, f"row {i}") for i, r in enumerate(rows)]


def test_prompt_over_limit_is_an_error_and_long_completions_are_truncated(tokenizer, caplog):
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id])
    demos = load_rows([{"prompt": "Sort 2, 1.", "completion": "1, 2 " * 50}, {"prompt": "word " * 300, "completion": "x"}])
    with pytest.raises(DataError, match=r"row 1: field 'prompt': \d+ tokens > --max-prompt-length 64"):
        chat.encode(demos, max_prompt_length=64, max_length=80)
    with caplog.at_level(logging.WARNING):
        examples = chat.encode(demos, max_prompt_length=64, max_length=80, skip_invalid=True)
    assert len(examples) == 1
    assert len(examples[0].prompt_ids) + len(examples[0].completion_ids) == 80
    assert "truncated the completion of 1 of 1 rows" in caplog.text and "skipped 1 of 2 rows" in caplog.text


def test_collate_labels_only_completion_tokens():
    batch = collate([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch["completion_ids"].tolist() == [[1, 2, 0], [3, 4, 9]]
    assert batch["completion_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["input_ids"].dtype == torch.long


def test_cli_reports_bad_input_in_one_line(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_PC, {"prompt": "x", "completion": ""}])
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_PC])
    cases = [
        (["--data", bad], f"{bad}:2: field 'completion': empty completion"),
        (["--data", tmp_path / "missing.jsonl"], "missing.jsonl: file not found"),
        (["--data", good, "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--data", good, "--max-prompt-length", "8"], "field 'prompt': 37 tokens > --max-prompt-length 8"),
    ]
    for args, message in cases:
        proc = run_cli("train", "--model", tiny_model_dir, "--output", tmp_path / "o", *args, check=False)
        assert proc.returncode == 2
        assert message in proc.stderr and "Traceback" not in proc.stderr
