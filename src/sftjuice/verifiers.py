"""Verifiers: does a response reach the reference answer?

A verifier is any callable ``(prompt, response, answer) -> float`` in [0, 1], where
``prompt`` is the last user message and ``answer`` the reference answer (the row's
``answer`` field, else its demonstration: :func:`reference_answer`). The built-in ones are
in :data:`BUILTIN_VERIFIERS`; ``--verifier module:function`` loads a user's own
(:func:`load_verifier`).

How the built-in ``exact`` verifier reads and compares answers:

- The final answer (:func:`extract_answer`) is what follows the last "Answer:", "answer is"
  or "answer is:" (any case) in the last line that has one, else the last non-empty line.
  It is normalised: whitespace collapsed, lower case, ``−`` (unicode minus) read as ``-``,
  trailing ``. ! ; :`` and surrounding ``$`` / ``*`` dropped.
- Answers are compared as comma-separated lists, item by item and in order, so a single
  answer is a list of one. Commas in ``d{1,3}(,ddd)+`` with no space after them are
  thousands separators (``50,000`` is one number, and so is ``100,200``); any other comma
  separates items (``1,5``, ``1, 500`` and ``-3, 1, 5`` are lists).
- Items that are numbers (sign, digits, decimal point, ``a/b``; ``50 000`` with spaces
  between groups of three digits) are compared as exact fractions: ``0.50`` = ``1/2`` =
  ``.5``, ``+7`` = ``7``. Other items must be equal strings (case already folded).
- An empty answer never matches.

The multistep_arithmetic demo task (``scripts/make_steps_data.py``) shows its work one
operation per line; :func:`check_steps` grades those lines and :func:`corrupt_steps` makes
the realistic wrong demonstrations of the low-quality experiments.
"""

from __future__ import annotations

import ast
import importlib
import operator
import os
import random
import re
import sys
from fractions import Fraction
from typing import Callable

from .config import SftjuiceError

Verifier = Callable[[str, str, str], float]

_MARKER = re.compile(r"\banswer\**(?:\s+is\b\s*:?|\s*:)", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_SPACED_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:/\d+|\.\d*)?|\.\d+)")


def _normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace("\u2212", "-")).strip().lower()
    while True:  # strip until stable: "**42**." and "$42$." both end as "42"
        stripped = text.rstrip(".!;:").strip("*$ ")
        if stripped == text:
            return text
        text = stripped


def extract_answer(text: str) -> str:
    """The final answer of a response or demonstration, normalised (module docstring)."""
    lines = [line for line in text.splitlines() if line.strip()]
    marked = [line for line in lines if _MARKER.search(line)]
    if marked:
        return _normalise(_MARKER.split(marked[-1])[-1])
    return _normalise(lines[-1]) if lines else ""


def _number(item: str) -> Fraction | None:
    if _SPACED_THOUSANDS.fullmatch(item):
        item = item.replace(" ", "")
    item = re.sub(r"^([+-]) ", r"\1", re.sub(r" ?/ ?", "/", item))
    if not _NUMBER.fullmatch(item):
        return None
    try:
        return Fraction(item)
    except ZeroDivisionError:
        return None


def _items(answer: str) -> list[str]:
    answer = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), _normalise(answer))
    return [item.strip() for item in answer.split(",")]


def _same(got: str, want: str) -> bool:
    a, b = _number(got), _number(want)
    return a == b if a is not None and b is not None else got == want


def answers_match(got: str, want: str) -> bool:
    """Whether two final answers agree: lists item by item, numbers by value."""
    got_items, want_items = _items(got), _items(want)
    if got_items == [""] or want_items == [""] or len(got_items) != len(want_items):
        return False
    return all(_same(g, w) for g, w in zip(got_items, want_items))


def exact(prompt: str, response: str, answer: str) -> float:
    """1.0 when the response's final answer matches the reference's, else 0.0."""
    return float(answers_match(extract_answer(response), extract_answer(answer)))


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "exact": exact,  # every demo task has one final answer
    # multistep_arithmetic: only the final answer is graded; per-step credit comes from
    # rollouts, not from the verifier (check_steps grades the steps for tests and analysis)
    "steps": exact,
}


def load_verifier(spec: str | None) -> Verifier:
    """A built-in verifier by name (None: "exact"), or ``module:function`` imported with
    the working directory on ``sys.path``, as for a user's own script."""
    if spec is None or spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec or "exact"]
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SftjuiceError(f"unknown verifier '{spec}': use one of {', '.join(BUILTIN_VERIFIERS)} or module:function")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # the module may have been written since the last import
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # only the module itself (or a package on its path) missing; errors inside it propagate
        if e.name != module_name and not module_name.startswith(f"{e.name}."):
            raise
        raise SftjuiceError(f"verifier module '{module_name}' not found (in {cwd} or on sys.path)") from None
    finally:
        if added:
            sys.path.remove(cwd)
    if not hasattr(module, function_name):
        raise SftjuiceError(f"verifier function '{function_name}' not found in module '{module_name}' ({module.__file__})")
    function = getattr(module, function_name)
    if not callable(function):
        raise SftjuiceError(f"verifier '{function_name}' in module '{module_name}' is not callable")
    return function


def reference_answer(row_extra: dict, completion: str | None) -> str:
    """The row's ``answer`` field, else the final answer of its demonstration."""
    answer = row_extra.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer)
    if completion and extract_answer(completion):
        return extract_answer(completion)
    raise SftjuiceError("row has no 'answer' field and no demonstration to take the answer from")


# ------------------------------------------------------------- multistep_arithmetic

_OPERATIONS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul)}
_EXPRESSION = re.compile(r"[\d(][\d\s()+\-*]*[\d)]")
_STEP = re.compile(r"(-?\d+) ?([-+*×]) ?(-?\d+) ?= ?(-?\d+)")
_SLIPS = (-10, -1, 1, 10)  # carry and off-by-one errors


def _work(prompt: str, fault: tuple[int, int | None] | None = None) -> tuple[list[tuple[int, str, int, int]], int]:
    """The question's operations in evaluation order, each ``(left, op, right, value)``, and
    the final value. ``fault=(i, delta)``: operation i's result is off by delta; ``(i, None)``:
    operation i is skipped (its left operand carries on). Either propagates to the answer."""
    found = _EXPRESSION.search(prompt)
    if not found:
        raise ValueError(f"no arithmetic expression in {prompt!r}")
    steps: list[tuple[int, str, int, int]] = []
    count = 0

    def evaluate(node: ast.expr) -> int:
        nonlocal count
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if not (isinstance(node, ast.BinOp) and type(node.op) in _OPERATIONS):
            raise ValueError(f"not an expression of +, - and * on integers: {found.group()!r}")
        left, right = evaluate(node.left), evaluate(node.right)
        index, count = count, count + 1
        if fault == (index, None):
            return left
        symbol, apply = _OPERATIONS[type(node.op)]
        value = apply(left, right) + (fault[1] if fault is not None and fault[0] == index else 0)
        steps.append((left, symbol, right, value))
        return value

    value = evaluate(ast.parse(found.group(), mode="eval").body)
    return steps, value


def _step_ok(line: str, expected: tuple[int, str, int, int]) -> bool:
    parsed = _STEP.fullmatch(_normalise(line))
    if not parsed:
        return False
    a, op, b, value = int(parsed[1]), parsed[2].replace("×", "*"), int(parsed[3]), int(parsed[4])
    x, want_op, y, want_value = expected
    operands_ok = (a, b) == (x, y) or (op != "-" and (a, b) == (y, x))
    return op == want_op and operands_ok and value == want_value


def check_steps(prompt: str, response: str) -> list[bool]:
    """Line by line against the worked solution of a multistep_arithmetic question: one
    entry per line of the solution (its steps, then the answer line) or of the response,
    whichever is longer; missing and extra lines are False. Lines are the non-empty ones
    between ``"\\n"``, the steps of ``algorithms.steps.split_steps``, so the first False is
    the first wrong step."""
    steps, value = _work(prompt)
    lines = [line for line in response.split("\n") if line.strip()]
    checks = [i < len(lines) and _step_ok(lines[i], step) for i, step in enumerate(steps)]
    checks.append(len(lines) > len(steps) and answers_match(extract_answer(lines[len(steps)]), str(value)))
    return checks + [False] * (len(lines) - len(checks))


def corrupt_steps(row: dict, rng: random.Random) -> dict:
    """A realistic wrong demonstration of a multistep_arithmetic row: one step's result is
    slipped (off by 1 or 10), or one operation is skipped, and the error carries through
    to a wrong final answer. ``answer`` stays the correct one; ``low_quality`` is set."""
    steps, correct = _work(row["prompt"])
    while True:  # a slip in the last operation always changes the answer, so this ends
        index = rng.randrange(len(steps))
        skip = len(steps) > 1 and rng.random() < 0.5
        wrong_steps, value = _work(row["prompt"], (index, None if skip else rng.choice(_SLIPS)))
        if value != correct:
            break
    completion = "\n".join([f"{a} {op} {b} = {v}" for a, op, b, v in wrong_steps] + [f"Answer: {value}"])
    return {**row, "completion": completion, "answer": row.get("answer", str(correct)), "low_quality": True}
