"""Judging policies on held-out prompts: a verifier for checkable answers, the
log-likelihood of reference answers, and the statistics (confidence intervals, win rates)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from .config import SamplingConfig
from .data import ChatFormat, Demonstration
from .generation import sample
from .training import sequence_logprobs


# ------------------------------------------------------------------------ verifier


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> str:
    """The last non-empty line, without an "answer is"/"answer:" lead-in or a final period."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    last = re.split(r"(?i)answer(?: is)?\s*:?", last)[-1]
    return re.sub(r"\s+", " ", last).strip().rstrip(".").strip()


def _same(got: str, want: str) -> bool:
    if got == want:
        return True
    a, b = _number(got), _number(want)
    return a is not None and a == b


def verify(response: str, answer: str) -> bool:
    """Exact or numeric (``0.50`` = ``1/2``) match of the final answer, item by item for
    comma-separated lists."""
    got, want = final_answer(response).split(","), final_answer(answer).split(",")
    return len(got) == len(want) and all(_same(g.strip(), w.strip()) for g, w in zip(got, want))


# ---------------------------------------------------------------------- statistics


@dataclass
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def proportion(successes: int, n: int, z: float = 1.96) -> Estimate:
    """Wilson score interval: sound at 0% and 100%, unlike the normal approximation."""
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, centre - half, centre + half, n)


def mean_interval(values: list[float], z: float = 1.96) -> Estimate:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Estimate(m, m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n), n)


@dataclass
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def rate(self) -> Estimate:
        """Win rate among decided comparisons (ties counted apart)."""
        return proportion(self.wins, self.wins + self.losses)


def compare(scores: list[float], baseline: list[float], tol: float = 1e-9) -> WinRate:
    wins = sum(a > b + tol for a, b in zip(scores, baseline))
    losses = sum(b > a + tol for a, b in zip(scores, baseline))
    return WinRate(wins, len(scores) - wins - losses, losses)


# --------------------------------------------------------------- model judgements


def greedy_responses(model, chat: ChatFormat, demos: list[Demonstration], max_new_tokens: int,
                     batch_size: int = 32, bf16: bool = False) -> list[str]:
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, generation_batch_size=batch_size)
    prompts = [chat.prompt_ids(d.prompt) for d in demos]
    out = sample(model, prompts, cfg, chat.stop_token_ids, chat.tokenizer.pad_token_id, seed=0, bf16=bf16,
                 progress=False)
    return [chat.decode(ss[0].token_ids) for ss in out]


def answer_logprobs(model, chat: ChatFormat, demos: list[Demonstration], batch_size: int = 16) -> list[float]:
    """Per-token log-likelihood of each reference answer (moves before accuracy does)."""
    prompts = [chat.prompt_ids(d.prompt) for d in demos]
    answers = [chat.completion_ids(d.prompt, d.completion) for d in demos]
    sums = sequence_logprobs(model, chat.tokenizer.pad_token_id, prompts, answers, batch_size)
    return [s / len(a) for s, a in zip(sums, answers)]


def logprob_gaps(model, chat: ChatFormat, prompts: list[list[dict]], chosen: list[str], rejected: list[str],
                 batch_size: int = 16) -> list[float]:
    """log pi(chosen|x) - log pi(rejected|x) for each (prompt, chosen, rejected) triple."""
    ids = [chat.prompt_ids(p) for p in prompts]
    pad = chat.tokenizer.pad_token_id
    c = sequence_logprobs(model, pad, ids, [chat.completion_ids(p, y) for p, y in zip(prompts, chosen)], batch_size)
    r = sequence_logprobs(model, pad, ids, [chat.completion_ids(p, y) for p, y in zip(prompts, rejected)], batch_size)
    return [a - b for a, b in zip(c, r)]
