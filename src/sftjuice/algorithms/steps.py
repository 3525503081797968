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

This module holds the model-free pieces as pure functions; the loops come below them.

Round t of either method samples ``--num-samples`` solutions per prompt of its section from
pi_t and scores each with the verifier against the row's reference answer (its ``answer``
field, else the demonstration's final answer). Positives: distinct verified solutions (at
most ``--max-positives``); negatives: wrong ones (at most ``--max-negatives``).

- ``--method rest`` (positive-only self-training): SFT on the positives, nothing else; a
  prompt none of whose samples verifies gives nothing (not its demonstration: that would be
  plain SFT mixed in).
- ``--method steps``: each negative is paired with a positive of its prompt, else with the
  demonstration when its own answer verifies (small models often solve nothing); with
  ``--credit step`` the negative is cut after its first pit found by ``--rollouts`` rollouts
  of pi_SFT from each prefix; with ``--credit response`` it stays whole (with its end-of-turn
  token, if it had one). DPO against pi_SFT (the starting model,
  :func:`references.starting_policy`), whose log-probs of both sides are computed at round time.

Everything a round trains on, rollouts included, is in its round file before its first
step. One pass over a round's prompts that have pairs (positives), in batches of prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from ..config import RestConfig, StepsConfig, VerifiedConfig
from ..data import Example
from ..generation import Sample, derive_seed, sample
from ..losses import preference_loss, sft_loss
from ..scoring import sequence_logprobs_of, shared_logprobs
from ..training import Learner, Run, start_run
from ..verifiers import load_verifier, reference_answer
from . import references, rounds

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
    for part in split_steps(text):  # a solution's step (not an optimiser's)
        end += len(part)
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


def token_cuts(decode: Callable[[list[int]], str], token_ids: list[int]) -> list[int]:
    """How many of ``token_ids`` make up each prefix ``y_hat_{1:i}``: for every step end of
    ``split_steps(decode(token_ids))``, the first token boundary at or after it.

    The cut is on the token ids the policy sampled (re-tokenising the prefix text could give
    other ids, whose log-probs would not be the ones the policy produced). A line break is
    almost always a token boundary, and then ``decode(token_ids[:cut]) == text[:end]``
    exactly; where a token holds the break and more (``"\\n\\n"``, ``".\\n"``) the prefix
    keeps that whole token. A trailing end-of-turn token decodes to nothing, so no cut
    ever includes it: the last step's cut is the response without its end of turn."""
    text = decode(token_ids)
    prefixes = [decode(token_ids[:k]) for k in range(len(token_ids) + 1)]
    cuts = []
    for end in step_ends(text):
        cuts.append(next(k for k in range(1, len(token_ids) + 1)
                         if len(prefixes[k]) >= end and prefixes[k].startswith(text[:end])))
    return cuts


# ------------------------------------------------------------------------- the loops
#
# `rest` and `steps` share one round loop (``_train``). Each round samples
# ``--num-samples`` solutions per prompt of its section from pi_t and scores them with the
# verifier against the row's reference answer; everything the round trains on (verdicts,
# for `steps` the rollouts, values, pits, cut negatives and pi_SFT's log-probs) lands in
# ``OUTPUT/rounds/<t>/generations.jsonl`` before its first step, so a resumed run never
# samples, rolls out or scores a finished round again.


def user_prompt(messages: list[dict]) -> str:
    """What a verifier sees as the prompt: the last user message."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def verified(score: float) -> bool:
    return score >= SUCCESS_THRESHOLD


def score_of(verifier, prompt: str, answer: str, text: str, finished: bool) -> float:
    """The verifier's score of a response; one that never ended (cut at --max-new-tokens)
    scores 0, whatever its last line says: it is no solution to keep or to learn to end."""
    return float(verifier(prompt, text, answer)) if finished else 0.0


def split_verified(texts: list[str], scores: list[float], max_positives: int, max_negatives: int) -> tuple[list[int], list[int]]:
    """Indices of a prompt's positives (verified, distinct texts, at most ``max_positives``)
    and negatives (not verified, with at least one non-blank step, at most ``max_negatives``)."""
    positives, negatives, seen = [], [], set()
    for j, (text, score) in enumerate(zip(texts, scores)):
        if verified(score):
            if len(positives) < max_positives and text.strip() not in seen:
                seen.add(text.strip())
                positives.append(j)
        elif len(negatives) < max_negatives and split_steps(text):
            negatives.append(j)
    return positives, negatives


def verdicts(run: Run, cfg, verifier, answers: list[str]):
    """``annotate`` for :func:`rounds.sample_round`: each sample's score, the positives and negatives."""
    def annotate(examples: list[Example], samples: list[list[Sample]]) -> list[dict]:
        rows = []
        for e, ss in zip(examples, samples):
            prompt, answer = user_prompt(run.demos[e.index].prompt), answers[e.index]
            texts = [run.chat.decode(s.token_ids) for s in ss]
            scores = [score_of(verifier, prompt, answer, t, s.finished) for t, s in zip(texts, ss)]
            positives, negatives = split_verified(texts, scores, cfg.max_positives, getattr(cfg, "max_negatives", 0))
            rows.append({"answer": answer, "scores": scores, "positives": positives, "negatives": negatives})
        return rows

    return annotate


def make_pairs(run: Run, verifier, examples: list[Example], samples: list[list[Sample]], rows: list[dict]) -> None:
    """Each negative with a positive of its prompt (in turn), else with the demonstration when
    its own answer verifies, else no pair. The negative is the whole sample for now."""
    for e, ss, row in zip(examples, samples, rows):
        d = run.demos[e.index]
        row["demonstration_verified"] = verified(score_of(verifier, user_prompt(d.prompt), row["answer"], d.completion, True))
        chosen = [(i, ss[i].token_ids) for i in row["positives"]] or (
            [(None, e.completion_ids)] if row["demonstration_verified"] else [])
        row["pairs"] = [{"negative": j, "positive": chosen[k % len(chosen)][0], "chosen_ids": chosen[k % len(chosen)][1],
                         "rejected_ids": ss[j].token_ids} for k, j in enumerate(row["negatives"])] if chosen else []


def find_pits(run: Run, cfg, verifier, model, r: int, examples: list[Example], samples: list[list[Sample]],
              rows: list[dict]) -> None:
    """Cut every pair's negative after its first pit. Each distinct prefix ``y_hat_{1:i}``
    (``i < L``; ``i = 0`` is the bare prompt, shared by a prompt's negatives) gets
    ``--rollouts`` completions of pi_SFT (``model``), all of them in one sampler call, each
    prefix prefilled once for its rollouts. A rollout keeps the sample's length budget: it
    may add ``--max-new-tokens`` minus its prefix's tokens (a longer one is cut and scores 0),
    so the value of the full response is consistently its own score."""
    chat = run.chat
    jobs: dict[tuple[int, tuple[int, ...]], int] = {}  # (prompt position, prefix ids) -> job
    for p, (ss, row) in enumerate(zip(samples, rows)):
        for pair in row["pairs"]:
            ids = ss[pair["negative"]].token_ids
            pair["cuts"] = token_cuts(chat.decode, ids)
            pair["steps"] = len(pair["cuts"])
            for cut in [0] + pair["cuts"][:-1]:
                jobs.setdefault((p, tuple(ids[:cut])), len(jobs))
    keys = list(jobs)
    drawn = sample(model, [examples[p].prompt_ids + list(prefix) for p, prefix in keys], cfg, chat.stop_token_ids,
                   run.tokenizer.pad_token_id, seed=[derive_seed(cfg.seed, "rollouts", r, examples[p].index, prefix)
                                                    for p, prefix in keys],
                   num_samples=cfg.rollouts, bf16=run.bf16, progress=run.is_main)
    scored = []
    for (p, prefix), continuations in zip(keys, drawn):
        budget, prompt = cfg.max_new_tokens - len(prefix), user_prompt(run.demos[examples[p].index].prompt)
        out = []
        for c in continuations:
            ids, finished = c.token_ids[:budget], c.finished and len(c.token_ids) <= budget
            text = chat.decode(list(prefix) + ids)
            out.append({"token_ids": ids, "finished": finished, "score": score_of(verifier, prompt, rows[p]["answer"], text, finished)})
        scored.append(out)
    for p, (ss, row) in enumerate(zip(samples, rows)):
        row["rollouts_drawn"] = cfg.rollouts * sum(q == p for q, _ in keys)
        for pair in row["pairs"]:
            ids = ss[pair["negative"]].token_ids
            pair["rollouts"] = [scored[jobs[(p, tuple(ids[:cut]))]] for cut in [0] + pair["cuts"][:-1]]
            own = row["scores"][pair["negative"]]
            pair["values"] = prefix_values([[x["score"] for x in rs] for rs in pair["rollouts"]] + [[own]], cfg.value)
            pair["pit"] = first_pit(pair["values"])
            pair["rejected_ids"] = ids[: pair["cuts"][pair["pit"] - 1]]  # no end-of-turn token


def ragged_sequence_logprobs(model, pad_id: int, prompts: list[list[int]], groups: list[list[list[int]]]) -> list[list[float]]:
    """:func:`scoring.sequence_logprobs_of` for groups of different sizes (padded with empty
    completions, which score 0 and are dropped)."""
    width = max(map(len, groups), default=0)
    padded = [g + [[]] * (width - len(g)) for g in groups]
    return [lps[: len(g)] for lps, g in zip(sequence_logprobs_of(model, pad_id, prompts, padded), groups)] if width else []


def pair_reference_logprobs(run: Run, model, examples: list[Example], rows: list[dict]) -> None:
    """log pi_SFT of both sides of every pair, each prompt computed once: DPO's reference."""
    with run.accelerator.autocast():  # the precision the policy trains in
        logps = ragged_sequence_logprobs(model, run.tokenizer.pad_token_id, [e.prompt_ids for e in examples],
                                         [[c for p in row["pairs"] for c in (p["chosen_ids"], p["rejected_ids"])] for row in rows])
    for row, lps in zip(rows, logps):
        for k, pair in enumerate(row["pairs"]):
            pair["ref_chosen"], pair["ref_rejected"] = lps[2 * k], lps[2 * k + 1]


def steps_annotate(run: Run, cfg, verifier, answers: list[str], pi_sft, r: int, timing: dict):
    """``annotate`` for `steps`: verdicts, pairs, (credit step) rollouts and pits, references
    (``pi_sft`` from :func:`references.starting_policy`)."""
    judge = verdicts(run, cfg, verifier, answers)

    def annotate(examples: list[Example], samples: list[list[Sample]]) -> list[dict]:
        rows = judge(examples, samples)
        make_pairs(run, verifier, examples, samples, rows)
        t0 = time.time()
        with pi_sft() as sft_model:
            if cfg.credit == "step":
                find_pits(run, cfg, verifier, sft_model, r, examples, samples, rows)
            timing["rollout_seconds"] = round(time.time() - t0, 2)
            pair_reference_logprobs(run, sft_model, examples, rows)
        return rows

    return annotate


# what a batch holds: a prompt with its pairs (`steps`) or its positives (`rest`)


@dataclass
class PairGroup:
    example: Example
    chosen: list[list[int]]
    rejected: list[list[int]]
    ref_chosen: list[float]
    ref_rejected: list[float]

    def __len__(self) -> int:
        return len(self.example.prompt_ids) + max(map(len, self.chosen + self.rejected))


@dataclass
class PositiveGroup:
    example: Example
    positives: list[list[int]]

    def __len__(self) -> int:
        return len(self.example.prompt_ids) + max(map(len, self.positives))


def pair_groups(rows: list[dict], examples: list[Example]) -> list[PairGroup]:
    return [PairGroup(examples[row["example"]], [p["chosen_ids"] for p in row["pairs"]], [p["rejected_ids"] for p in row["pairs"]],
                      [p["ref_chosen"] for p in row["pairs"]], [p["ref_rejected"] for p in row["pairs"]])
            for row in rows if row["pairs"]]


def positive_groups(rows: list[dict], examples: list[Example]) -> list[PositiveGroup]:
    return [PositiveGroup(examples[row["example"]], [row["samples"][i]["token_ids"] for i in row["positives"]])
            for row in rows if row["positives"]]


def step_pairs_in(groups: list[PairGroup]) -> int:
    return sum(len(g.chosen) for g in groups)


def positive_tokens(groups: list[PositiveGroup]) -> int:
    return sum(len(c) for g in groups for c in g.positives)


def _collate_ragged(learner: Learner, groups, lists: list[list[list[int]]]):
    """A shared-prompt batch of groups with different numbers of completions: each padded to
    the widest with empty completions (masked out, log-prob 0). Returns (batch, width)."""
    k = max(map(len, lists))
    return learner.collate_shared([g.example.prompt_ids for g in groups],
                                  [c for cs in lists for c in cs + [[]] * (k - len(cs))]), k


def dpo_micro_loss(learner: Learner, beta: float, sft_weight: float = 0.0):
    """DPO against pi_SFT, plus ``sft_weight`` times the positive's per-token NLL (the NLL term
    Pang et al. 2024 found crucial), summed over the micro-batch's pairs (normalised by the step)."""
    def micro_loss(groups: list[PairGroup]):
        batch, k = _collate_ragged(learner, groups, [g.chosen + g.rejected for g in groups])
        logps = shared_logprobs(learner.model, batch).sum(-1).view(len(groups), k)
        chosen = torch.cat([logps[i, : len(g.chosen)] for i, g in enumerate(groups)])
        rejected = torch.cat([logps[i, len(g.chosen): 2 * len(g.chosen)] for i, g in enumerate(groups)])
        ref_chosen = torch.tensor([x for g in groups for x in g.ref_chosen], device=logps.device)
        ref_rejected = torch.tensor([x for g in groups for x in g.ref_rejected], device=logps.device)
        loss, margin = preference_loss(chosen, ref_chosen, rejected, ref_rejected, "sigmoid", beta)
        if sft_weight:
            lengths = torch.tensor([len(c) for g in groups for c in g.chosen], device=logps.device)
            loss = loss - sft_weight * chosen / lengths
        return loss.sum(), {"loss": loss.sum(), "margin": margin.sum(), "margin_positive": (margin > 0).float().sum(),
                            "logp_chosen": chosen.detach().sum(), "logp_rejected": rejected.detach().sum()}

    return micro_loss


def positive_micro_loss(learner: Learner):
    """SFT on the positives: summed NLL of their tokens (normalised by the step by the token count)."""
    def micro_loss(groups: list[PositiveGroup]):
        batch, _ = _collate_ragged(learner, groups, [g.positives for g in groups])
        nll = sft_loss(shared_logprobs(learner.model, batch), batch["completion_mask"])
        return nll, {"loss": nll}

    return micro_loss


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def round_metrics(rows: list[dict]) -> dict:
    """What a round's file says: the policy's training accuracy (share of samples verified),
    positives, negatives, and for `steps` the pairs, steps, first pits, Q_0 and rollouts."""
    scores = [s for row in rows for s in row["scores"]]
    out = {"accuracy": _mean([float(verified(s)) for s in scores]), "positives": sum(len(row["positives"]) for row in rows),
           "prompts_solved": sum(bool(row["positives"]) for row in rows)}
    if "pairs" not in rows[0]:
        return out
    pairs = [p for row in rows for p in row["pairs"]]
    out.update(negatives=sum(len(row["negatives"]) for row in rows), pairs=len(pairs),
               demonstration_pairs=sum(p["positive"] is None for p in pairs))
    cut = [p for p in pairs if "pit" in p]
    if cut:
        rollouts = [x["score"] for p in cut for rs in p["rollouts"] for x in rs]
        out.update(steps_mean=_mean([p["steps"] for p in cut]), pit_mean=_mean([p["pit"] for p in cut]),
                   pit_fraction_mean=_mean([p["pit"] / p["steps"] for p in cut]), q0_mean=_mean([p["values"][0] for p in cut]),
                   rollouts_drawn=sum(row.get("rollouts_drawn", 0) for row in rows),
                   rollout_accuracy=_mean([float(verified(s)) for s in rollouts]))
    return out


def tally(sums: dict, items: list, stats: dict) -> dict:
    """A step's loss (and margin) added to the round's sums, whose means it reports."""
    return {**sums, "steps": sums.get("steps", 0) + 1, **{k: sums.get(k, 0) + stats[k] for k in ("loss", "margin") if k in stats}}


def _train(cfg: VerifiedConfig, model=None, tokenizer=None, data=None) -> Path:
    verifier = load_verifier(cfg.verifier)  # a bad --verifier stops the run before the model loads
    run = start_run(cfg, model, tokenizer, data)
    answers = [reference_answer(d.extra, d.completion) for d in run.demos]
    pairs = cfg.method == "steps"
    plan = rounds.plan(len(run.examples), cfg.rounds, cfg.epochs, cfg.seed)
    # A round trains on the prompts that have pairs (positives): at most its section. The
    # schedule runs on this planned clock; the steps a round does not need only advance it.
    round_steps = [rounds.steps_per_pass(run, len(rnd.section)) for rnd in plan]
    policy = run.learner(run.policy_model, cfg.learning_rate, sum(round_steps))
    pi_sft = references.starting_policy(run) if pairs else None  # made before any step
    state = run.resume()
    micro_loss, weight = (dpo_micro_loss(policy, cfg.beta, cfg.sft_weight), step_pairs_in) if pairs else (positive_micro_loss(policy), positive_tokens)
    for ctx in rounds.each_round(run, plan, round_steps, state):
        r, t0 = ctx.index, time.time()
        timing = {"rollout_seconds": 0.0} if pairs else {}  # stays 0 when the round's file is read back
        annotate = steps_annotate(run, cfg, verifier, answers, pi_sft, r, timing) if pairs else verdicts(run, cfg, verifier, answers)
        rows = rounds.sample_round(run, r, ctx.round.section, cfg.seed, ctx.pi_t, annotate=annotate)
        groups = pair_groups(rows, run.examples) if pairs else positive_groups(rows, run.examples)
        t1 = time.time()
        batches = rounds.passes(run, len(groups), r, 1)
        rounds.train_steps(ctx, policy, groups, batches, micro_loss, weight, tally=tally, until=ctx.end)
        run.log_metrics({
            "step": ctx.step, "event": "round", "round": r, **rounds.sample_stats(rows), **round_metrics(rows),
            "train_prompts": len(groups), "train_steps": len(batches),
            **{k: ctx.sums[k] / ctx.sums["steps"] for k in ("loss", "margin") if k in ctx.sums},
            "generation_seconds": round(t1 - t0, 2), **timing, "train_seconds": round(time.time() - t1, 2),
        })
        ctx.checkpoint()
    return run.finish()


def train(cfg: StepsConfig, model=None, tokenizer=None, data=None) -> Path:
    """``--method steps``: DPO of verified solutions over wrong ones cut after their first pit."""
    return _train(cfg, model, tokenizer, data)


def train_rest(cfg: RestConfig, model=None, tokenizer=None, data=None) -> Path:
    """``--method rest``: SFT on the policy's own verified-correct solutions, nothing else."""
    return _train(cfg, model, tokenizer, data)
