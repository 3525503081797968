"""Answer extraction and matching, user verifiers, and the multistep_arithmetic task."""

from __future__ import annotations

import json
import random
import runpy
import sys

import pytest

from sftjuice.config import SftjuiceError
from sftjuice.verifiers import (BUILTIN_VERIFIERS, answers_match, check_steps, corrupt_steps, exact, extract_answer,
                                load_verifier, reference_answer)

from .conftest import REPO

generate = runpy.run_path(str(REPO / "scripts" / "make_steps_data.py"))["generate"]


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("Answer: 50,000", "50000", True),  # thousands separators
        ("50 000", "50000", True),
        ("1,500", "1500", True),
        ("1, 500", "1500", False),  # ", " separates items
        ("1,5", "15", False),  # not a three-digit group: a list of two
        ("1,5", "1, 5", True),
        ("12,34", "1234", False),
        ("1,2345", "1, 2345", True),
        ("-3, 1, 5", "-3, 1, 5", True),
        ("-3,1,5", "-3, 1, 5", True),
        ("-3, 1, 5", "-3, 5, 1", False),  # order matters
        ("-0.4, -0.2, 0", "-0.4, -0.2, 0, 2", False),
        ("The answer is 0.5.", "1/2", True),  # numbers by value
        ("answer is: .5", "0.50", True),
        ("The Answer Is 3/4", "0.75", True),
        ("**Answer:** $3/4$", "0.75", True),
        ("TRUE", "True", True),  # case
        ("Paris", "paris", True),
        ("The answer is 42!", "42", True),  # trailing punctuation
        ("Answer: 42;", "42", True),
        ("\u22125", "-5", True),  # unicode minus
        ("+7", "7", True),
        ("-7", "7", False),
        ("Let me think.\nAnswer: 12\nHope this helps!", "12", True),  # the answer line, not the last line
        ("3 + 4 = 7\n7 * 2 = 14\nAnswer: 14", "Answer: 14", True),
        ("3 + 4 = 7\n7 * 2 = 14", "14", False),  # no answer line: the last line is a step
        ("1 2", "12", False),  # spaces only group thousands
        ("12 apples", "12", False),
        ("43", "42", False),
        ("seven", "7", False),
        ("", "5", False),  # empty response
        ("  \n ", "5", False),
    ],
)
def test_exact_hand_cases(response, answer, expected):
    assert exact("the prompt", response, answer) == float(expected)
    assert answers_match(extract_answer(response), extract_answer(answer)) is expected


@pytest.mark.parametrize(
    "text, answer",
    [("The answer is **42**.", "42"), ("Answer: Paris.\n", "paris"), ("first\n\n  last   line  \n", "last line"),
     ("answer: 1\nfinal answer: 2", "2"), ("", "")],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_reference_answer_prefers_the_answer_field():
    assert reference_answer({"answer": "7"}, "x = 3\nAnswer: 5") == "7"
    assert reference_answer({"answer": 7}, None) == "7"
    assert reference_answer({}, "x = 3\nAnswer: 5") == "5"
    with pytest.raises(SftjuiceError, match="no 'answer' field"):
        reference_answer({"answer": ""}, None)


# ----------------------------------------------------------------- load_verifier


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A verifier module in the working directory, as a user would write it."""
    (tmp_path / "my_checks.py").write_text(
        "THRESHOLD = 0.5\n\ndef contains(prompt, response, answer):\n    return float(answer in response)\n")
    (tmp_path / "broken_checks.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("my_checks", "broken_checks"):
        sys.modules.pop(name, None)


def test_load_builtin_verifiers():
    assert load_verifier(None) is exact and load_verifier("exact") is exact
    assert load_verifier("steps") is BUILTIN_VERIFIERS["steps"]
    assert load_verifier("steps")("Compute 2 + 3 * 4.", "3 * 4 = 12\n2 + 12 = 14\nAnswer: 14", "14") == 1.0
    with pytest.raises(SftjuiceError, match="unknown verifier 'nonsense'"):
        load_verifier("nonsense")


def test_load_user_verifier(user_module):
    contains = load_verifier("my_checks:contains")
    assert contains("q", "it is 12", "12") == 1.0 and contains("q", "it is 13", "12") == 0.0
    assert str(user_module) not in sys.path  # only while importing


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_verifier_mod:check", "verifier module 'no_such_verifier_mod' not found"),
        ("no_such_package.checks:check", "verifier module 'no_such_package.checks' not found"),
        ("my_checks:nope", "verifier function 'nope' not found in module 'my_checks'"),
        ("my_checks:THRESHOLD", "verifier 'THRESHOLD' in module 'my_checks' is not callable"),
    ],
)
def test_load_verifier_errors(user_module, spec, message):
    with pytest.raises(SftjuiceError, match=message):
        load_verifier(spec)


def test_errors_inside_the_users_module_propagate(user_module):
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_verifier("broken_checks:check")


# ---------------------------------------------------------- multistep_arithmetic


@pytest.mark.parametrize(
    "response, expected",
    [
        ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 52", [True, True, True, True]),
        ("7 + 12 = 19\n3 * 19 = 57\n57 - 5 = 52.\nAnswer: 52", [True, True, True, True]),  # commuted + and *
        ("12 + 7 = 19\n19 * 3 = 58\n58 - 5 = 53\nAnswer: 53", [True, False, False, False]),  # a slip carries on
        ("12 + 7 = 19\n19 - 5 = 14\nAnswer: 14", [True, False, False, False]),  # a skipped step
        ("12 + 8 = 19\n19 * 3 = 57\n5 - 57 = 52\nAnswer: 52", [False, True, False, True]),  # wrong operands
        ("12 + 7 = 19\n19 * 3 = 57", [True, True, False, False]),  # stops early
        ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 52\nDone.", [True, True, True, True, False]),
        ("", [False, False, False, False]),
    ],
)
def test_check_steps_hand_cases(response, expected):
    assert check_steps("Compute (12 + 7) * 3 - 5.", response) == expected


def test_generated_demonstrations_check_and_corruptions_fail():
    rows, rng = generate(200, seed=1), random.Random(0)
    kinds = set()
    for row in rows:
        assert all(check_steps(row["prompt"], row["completion"]))
        assert exact(row["prompt"], row["completion"], row["answer"]) == 1.0
        assert 2 <= len(row["completion"].splitlines()) - 1 <= 4
        bad = corrupt_steps(row, rng)
        assert not all(check_steps(bad["prompt"], bad["completion"]))
        assert exact(bad["prompt"], bad["completion"], bad["answer"]) == 0.0
        assert (bad["prompt"], bad["answer"], bad["low_quality"]) == (row["prompt"], row["answer"], True)
        kinds.add("skip" if bad["completion"].count("\n") < row["completion"].count("\n") else "slip")
    assert kinds == {"skip", "slip"}


def test_generator_is_deterministic_and_made_the_shipped_files():
    assert generate(300, seed=7) == generate(300, seed=7) != generate(300, seed=8)
    data = REPO / "src" / "sftjuice" / "demo_data"
    train, test = ([json.loads(line) for line in open(data / f"multistep_arithmetic.{split}.jsonl")]
                   for split in ("train", "test"))
    assert (len(train), len(test)) == (2000, 500)
    assert train + test == generate(2500, seed=20240611)  # the README's command, default seed
    assert not {r["completion"] for r in train} & {r["completion"] for r in test}  # the solution fixes the expression
