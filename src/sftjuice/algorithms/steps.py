"""Per-step negatives (Setlur et al., NeurIPS 2024, arXiv 2406.14532): DPO against the
prefix of a wrong solution that ends at its first mistake.

A wrong sample ``y_hat`` is split into steps at line breaks (``split_steps``). The value
``Q_i`` of the prefix ``y_hat_{1:i}`` is estimated by K rollouts of ``pi_SFT`` from it and the
verifier (``prefix_values``); ``A_i = Q_i - Q_{i-1}`` is the step's advantage
(``step_advantages``). The first pit ``c`` (``first_pit``) is the first step with the lowest
value: the step where the solution went wrong. The pair ``(y_plus, y_hat_{1:c})``, with
``y_plus`` a verified-correct solution and the negative cut at ``step_ends(y_hat)[c - 1]``
without an end-of-turn token, is fitted with DPO against ``pi_SFT``
(``losses.preference_loss(kind="sigmoid")``); with shared prefixes this has the optimum of
advantage-weighted RL, so credit goes to the step that lost the answer, not to the whole text.

This module holds the model-free pieces as pure functions; the loop comes below them.
"""

from __future__ import annotations

from typing import Literal

SUCCESS_THRESHOLD = 0.5
"""A rollout verifies when its score is at least this (verifiers return scores in [0, 1];
a partial-credit verifier's 0.5 counts as a success, its 0.4 does not)."""


def split_steps(text: str) -> list[str]:
    """The steps of a solution: one per non-empty line (a line of only whitespace is empty),
    cut at ``"\\n"`` (a ``"\\r\\n"`` stays whole inside its step).

    The steps partition the text, so ``"".join(steps[:i]) == text[:step_ends(text)[i - 1]]``
    and ``"".join(steps) == text``: a step is its line *with* its line break, preceded by the
    blank lines before it (those belong to the step they lead into, so a prefix ends right after
    a step's line break), and the last step also takes any blank lines after it. A text without
    a non-empty line has no steps."""
    pieces = [line + "\n" for line in text.split("\n")]
    pieces[-1] = pieces[-1][:-1]  # the text's last line has no break of its own
    steps: list[str] = []
    pending = ""
    for piece in pieces:
        pending += piece
        if piece.strip():
            steps.append(pending)
            pending = ""
    if steps:
        steps[-1] += pending
    return steps


def step_ends(text: str) -> list[int]:
    """Character offsets where each step of ``split_steps(text)`` ends: just after the step's
    line break, and ``len(text)`` for the last step. ``text[:step_ends(text)[c - 1]]`` is the
    prefix ``y_hat_{1:c}``. (Tokenise the prefix by cutting the full text's token offsets
    there, or by tokenising the prefix itself, but do it the same way for ``pi_theta`` and
    ``pi_SFT``.)"""
    ends, end = [], 0
    for step in split_steps(text):
        end += len(step)
        ends.append(end)
    return ends


def prefix_values(successes: list[list[float]], mode: Literal["any", "mean"] = "any") -> list[float]:
    """``Q_i`` of each prefix from verifier scores of its rollouts.

    ``successes[i]`` holds the scores of the rollouts from ``y_hat_{1:i}``: index 0 is the bare
    prompt, index ``L`` (the last) is the full response, whose only completion is itself, so it
    holds ``[v(y_hat)]``, the response's own score (0 for a wrong solution; no rollouts needed).
    The result has the same length, ``L + 1``.

    - ``"any"`` (the paper's): 1.0 if any rollout verifies (score >= ``SUCCESS_THRESHOLD``),
      else 0.0: whether the prefix can still reach the answer;
    - ``"mean"``: the mean score, a smoother Monte Carlo estimate of the success rate (with
      few rollouts either is noisy)."""
    if mode not in ("any", "mean"):
        raise ValueError(f"unknown mode '{mode}'")
    values = []
    for i, scores in enumerate(successes):
        if not scores:
            raise ValueError(f"prefix {i} has no rollout scores")
        if mode == "any":
            values.append(1.0 if any(s >= SUCCESS_THRESHOLD for s in scores) else 0.0)
        else:
            values.append(sum(scores) / len(scores))
    return values


def step_advantages(values: list[float]) -> list[float]:
    """``A_i = Q_i - Q_{i-1}`` for the steps ``i = 1..L`` (``values[0]`` is the bare prompt's
    ``Q_0``): how much step i changed the chance of reaching the answer."""
    return [values[i] - values[i - 1] for i in range(1, len(values))]


def first_pit(values: list[float]) -> int:
    """The first pit ``c``, 1-based over the steps: the first step ``i in 1..L`` with the lowest
    ``Q_i`` (``values[0]``, the bare prompt, is not a step). The negative is ``y_hat_{1:c}``.

    With ``values`` from ``prefix_values`` of a wrong response, ``Q_L`` is the response's own
    score, 0, so the lowest value is 0 and a pit always exists; with ``"any"`` values it is the
    first step after which no rollout succeeded. Values need not be monotone (rollouts are
    noisy): for ``[1, 0, 1, 0, 0]`` the pit is step 1, the first of the lowest. ``c = L`` means
    only the answer line lost it (the negative is the whole response, still without
    end-of-turn); when ``Q_0`` is already 0 the pit is step 1 and all advantages are 0, so the
    pair says little about which step failed."""
    if len(values) < 2:
        raise ValueError("values needs the bare prompt's and at least one step's")
    lowest = min(values[1:])
    return values.index(lowest, 1)
