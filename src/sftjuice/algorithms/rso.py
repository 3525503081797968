"""RSO: statistical rejection sampling optimisation (Liu et al., ICLR 2024, arXiv 2309.06657).

DPO and SLiC fit preference pairs drawn from ``pi_SFT``, but the policy they aim for is
``pi*(y|x) ∝ pi_SFT(y|x) exp(r(x,y)/rejection_beta)``. RSO draws the pairs from ``pi*`` itself:

  1. per prompt, N candidates from ``pi_SFT`` (paper: 64) scored by a reward ``r``
     (a reward model, or the SRPPO log-ratio ``log pi_SFT - log pi_base``);
  2. rejection sampling keeps M of them (paper: 8), approximately distributed as ``pi*``
     (``accept``); rejection_beta -> 0 is best-of-N, rejection_beta -> inf is plain sampling;
  3. the M accepted form M/2 disjoint random pairs, the reward labelling winner and loser
     (``pair_up``);
  4. the policy, starting at and regularised towards ``pi_ref = pi_SFT``, fits the pairs with
     ``losses.preference_loss`` (``sigmoid`` = DPO, ``hinge`` = SLiC, ``hinge-norm``).

The model-free steps 2 and 3 are pure functions (``accept``, ``pair_up``); the loop comes
below them. All candidates come from ``pi_SFT``, the frozen starting model
(:func:`references.starting_policy`), never from the policy being trained. Each
epoch of the prompts is still split into ``--rounds`` sections, each drawing its candidates
and then training on its pairs, so a killed run redraws at most one section. Round t:

  1. draws N candidates per prompt of section t from ``pi_SFT`` (the sampler prefills each
     prompt once for its N rows) and scores them: with the reward model (each prompt
     computed once for its N candidates), or the implicit reward, whose ``log pi_SFT(y)``
     is the sum of the sampler's own token log-probs (no extra pass) and ``log pi_base(y)``
     one pass of the base model; a candidate cut at ``--max-new-tokens`` gets
     ``--no-eos-penalty`` instead of its log-ratio, as in SRPPO;
  2. per prompt, with a generator seeded by (seed, round, prompt), ``accept`` keeps up to M
     *distinct* responses (copies of a response are one response: they weigh in the pool as
     the draws ``pi_SFT`` made, and share their first copy's score) and ``pair_up`` pairs
     them; candidates, rewards, the accepted indices and the pairs land in
     ``OUTPUT/rounds/<t>/generations.jsonl`` before the round trains;
  3. ``--passes`` passes over the section's prompts, each a batch item with its pairs,
     minimising ``preference_loss`` against ``pi_SFT``, whose log-probs are the sampler's
     (the reference costs nothing), normalised by the pairs in the global batch. A global
     batch whose prompts have no pair (every candidate the same response) is skipped.

metrics.jsonl: every step has loss, margin (``beta * D``, or the plain log-prob margin
for ``hinge``), margin_positive, logp_winner/logp_loser and pairs; per round an ``event``
"round": acceptance_rate (accepted / candidates), first_pass_acceptance (mean
``exp((r - r_max)/rejection_beta)``: ~1 is plain sampling, ~1/N best-of-N), distinct_per_prompt,
pairs, prompts_without_pairs, reward_candidates / reward_accepted (mean r), reward_pair_gap
(mean ``r_w - r_l``), the round's pair-weighted loss and margin, sample lengths, timings.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RSOConfig, SftjuiceError
from ..data import Example
from ..generation import derive_seed
from ..losses import preference_loss
from ..scoring import rewards_of, shared_logprobs, token_logprobs_of
from ..training import Learner, Run, start_run, weights_fingerprint
from . import references, rounds
from .rounds import Completion


def accept(rewards: list[float], rejection_beta: float, num_accepted: int, rng: random.Random,
           keys: list | None = None) -> list[int]:
    """Statistical rejection sampling (RSO's Algorithm 1; ALGORITHMS.md "RSO" step 3): the
    indices of up to ``num_accepted`` (M) candidates, in the order they were accepted.

    The candidates were drawn from ``pi_SFT``; the target is ``pi* ∝ pi_SFT exp(r/rejection_beta)``.
    Rejection sampling with proposal ``pi_SFT`` accepts ``y`` with probability
    ``pi*(y) / (C pi_SFT(y)) = exp((r(y) - r_max) / rejection_beta)`` where ``r_max`` bounds the reward.
    The true bound is unknown, so (as in the paper) the largest reward among the remaining
    candidates stands in for it:

        while fewer than M accepted and candidates remain:
            r_max = max reward among the remaining candidates
            visit the remaining candidates in a fresh random order, accepting each with
            probability exp((r - r_max) / rejection_beta) (u < that, u ~ U[0, 1)); stop at M
            remove the accepted ones

    The best remaining candidate is always accepted when visited (``u < 1``), so every pass
    accepts at least one and the loop ends. With fewer than M candidates all are returned
    (in acceptance order). The first accepted candidate follows ``pi*`` only approximately:
    exactly only when the N candidates contain the highest-reward outputs that matter (the
    empirical ``r_max`` equals the true bound) and a pass rarely rejects all of them, i.e. for
    N large against the spread of ``exp(r/rejection_beta)``; later ones are drawn without replacement
    from the same finite set, which is what makes the M accepted distinct.

    Duplicates: without ``keys`` every candidate is its own response. With ``keys`` (one per
    candidate, equal for copies of one response, e.g. its token ids), copies stay in the
    pool as separate draws, so a response keeps the weight ``pi_SFT`` gave it, but once one
    copy is accepted the others leave the pool: the accepted responses are distinct, and
    fewer than M when fewer distinct responses were drawn. (Removing copies before
    accepting would no longer sample ``pi_SFT``; keeping accepted copies would pair a
    response with itself, a tie that ``pair_up`` drops.)
    The acceptance rate to log is ``len(result) / len(rewards)``."""
    if not rejection_beta > 0:
        raise ValueError(f"rejection_beta must be > 0, got {rejection_beta}")
    if num_accepted < 0:
        raise ValueError(f"num_accepted must be >= 0, got {num_accepted}")
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError("rewards must be finite")  # an inf or nan r_max would never accept
    keys = list(range(len(rewards))) if keys is None else keys
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < num_accepted and remaining:
        r_max = max(rewards[i] for i in remaining)
        order = remaining[:]
        rng.shuffle(order)
        taken = set()  # keys accepted in this pass
        for i in order:
            if keys[i] in taken:  # a copy of a response this pass already accepted
                continue
            if rng.random() < math.exp((rewards[i] - r_max) / rejection_beta):
                accepted.append(i)
                taken.add(keys[i])
                if len(accepted) == num_accepted:
                    break
        remaining = [i for i in remaining if keys[i] not in taken]
    return accepted


def pair_up(accepted: list[int], rewards: list[float], rng: random.Random) -> list[tuple[int, int]]:
    """RSO step 4: the accepted candidates in ``len(accepted) // 2`` disjoint random pairs,
    each as ``(winner, loser)`` by reward (an odd one out is left unpaired).

    Random pairing, not best-against-worst: the accepted set is (approximately) a sample of
    ``pi*``, and random pairs of it are pairs from ``pi*``, what RSO's loss is derived for.
    A pair of equal rewards is dropped: a tie carries no preference (and ``y_w``, ``y_l``
    would be interchangeable), so fewer than M/2 pairs may come back."""
    if len(set(accepted)) != len(accepted):
        raise ValueError("accepted indices must be distinct")
    order = accepted[:]
    rng.shuffle(order)
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        if rewards[a] > rewards[b]:
            pairs.append((a, b))
        elif rewards[b] > rewards[a]:
            pairs.append((b, a))
    return pairs


# ---------------------------------------------------------------------- one prompt


def accept_and_pair(candidates: list[list[int]], rewards: list[float], rejection_beta: float, num_accepted: int,
           rng: random.Random) -> dict:
    """Steps 2 and 3 for one prompt's candidates (token ids) and their rewards: copies of a
    response take its first copy's reward, ``accept`` keeps up to M distinct responses and
    ``pair_up`` pairs them. What the round file stores per prompt."""
    first: dict[tuple, int] = {}
    keys = [first.setdefault(tuple(c), i) for i, c in enumerate(candidates)]
    rewards = [rewards[k] for k in keys]  # a response has one score, however often it was drawn
    accepted = accept(rewards, rejection_beta, num_accepted, rng, keys=keys)
    return {"rewards": rewards, "accepted": accepted, "pairs": [list(p) for p in pair_up(accepted, rewards, rng)]}


def candidate_pairs(run: Run, cfg: RSOConfig, r: int, reward_model, base):
    """``annotate`` for :func:`rounds.sample_round`: each prompt's candidates scored, accepted
    and paired (:func:`accept_and_pair`). ``reward_model`` scores in full precision (a judge); with
    ``base`` (the implicit reward) log pi_base is taken in the run's precision, that of the
    sampler's log pi_SFT."""
    per_batch = max(1, cfg.generation_batch_size // cfg.num_samples)  # prompts a pass, as the sampler
    implicit = references.implicit_reward(run, cfg)

    def annotate(examples: list[Example], samples) -> list[dict]:
        prompts = [e.prompt_ids for e in examples]
        candidates = [[s.token_ids for s in ss] for ss in samples]
        if base is None:
            rewards = rewards_of(reward_model, prompts, candidates, per_batch)
        else:
            with run.accelerator.autocast():
                by_base = token_logprobs_of(base, run.tokenizer.pad_token_id, prompts, candidates, per_batch)
            rewards = [[implicit(s.token_ids, s.logprobs, b, s.finished) for s, b in zip(ss, bs)]
                       for ss, bs in zip(samples, by_base)]
        return [accept_and_pair(c, rw, cfg.rejection_beta, cfg.num_accepted, random.Random(derive_seed(cfg.seed, "accept", r, e.index)))
                for e, c, rw in zip(examples, candidates, rewards)]

    return annotate


# ----------------------------------------------------------------------- the loss


@dataclass
class Pairs:
    """A prompt with its accepted (winner, loser) pairs: the unit of RSO's batches."""
    example: Example
    pairs: list[tuple[Completion, Completion]]

    def __len__(self) -> int:  # the padded width of its batch rows
        return len(self.example.prompt_ids) + max((len(c.token_ids) for p in self.pairs for c in p), default=0)


def accepted_pairs_in(items: list[Pairs]) -> int:
    """The count the loss is normalised by."""
    return sum(len(g.pairs) for g in items)


def pairs_of(rows: list[dict], examples: list[Example]) -> list[Pairs]:
    def completion(s: dict) -> Completion:  # the sampler's log-probs: those of pi_SFT, the reference
        return Completion(s["token_ids"], s["token_logprobs"], s["finished"])

    return [Pairs(examples[row["example"]], [(completion(row["samples"][w]), completion(row["samples"][l]))
                                             for w, l in row["pairs"]]) for row in rows]


NO_PAIR = (Completion([], []), Completion([], []))


def pair_micro_loss(learner: Learner, cfg: RSOConfig):
    def micro_loss(items: list[Pairs]):
        # every prompt gets the same number of pair slots, its own first, then empty ones
        # (masked; a micro-batch of prompts without pairs still runs, for DDP's gradient sync)
        k = max(1, max(len(g.pairs) for g in items))
        slots = [g.pairs[j] if j < len(g.pairs) else NO_PAIR for g in items for j in range(k)]
        batch = learner.collate_shared([g.example.prompt_ids for g in items], [c.token_ids for p in slots for c in p])
        logps = shared_logprobs(learner.model, batch).sum(-1).view(-1, 2)
        device = logps.device
        ref = torch.tensor([[w.logprob, l.logprob] for w, l in slots], device=device)
        real = torch.tensor([j < len(g.pairs) for g in items for j in range(k)], device=device)
        loss, margin = preference_loss(logps[:, 0], ref[:, 0], logps[:, 1], ref[:, 1], cfg.loss, cfg.beta)
        loss, margin, w = loss * real, margin * real, real.float()
        return loss.sum(), {"loss": loss.sum(), "margin": margin.sum(), "margin_positive": ((margin > 0) & real).float().sum(),
                            "logp_winner": (logps[:, 0].detach() * w).sum(), "logp_loser": (logps[:, 1].detach() * w).sum()}

    return micro_loss


# --------------------------------------------------------------------- metrics


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def selection_stats(rows: list[dict], rejection_beta: float) -> dict:
    """What rejection sampling did in a round (see the module docstring)."""
    rewards = [x for row in rows for x in row["rewards"]]
    accepted = [row["rewards"][i] for row in rows for i in row["accepted"]]
    return {
        "acceptance_rate": len(accepted) / len(rewards),
        "first_pass_acceptance": _mean([math.exp((x - max(row["rewards"])) / rejection_beta) for row in rows for x in row["rewards"]]),
        "distinct_per_prompt": _mean([len({tuple(s["token_ids"]) for s in row["samples"]}) for row in rows]),
        "pairs": sum(len(row["pairs"]) for row in rows),
        "prompts_without_pairs": sum(not row["pairs"] for row in rows),
        "reward_candidates": _mean(rewards), "reward_accepted": _mean(accepted),
        "reward_pair_gap": _mean([row["rewards"][w] - row["rewards"][l] for row in rows for w, l in row["pairs"]]),
    }


TRAIN_SUMS = ("loss", "margin", "margin_positive")


def tally(sums: dict, items: list[Pairs], stats: dict) -> dict:
    """A step's loss and margins, weighted by its pairs, added to the round's sums."""
    n = accepted_pairs_in(items)
    return {**sums, "pairs": sums.get("pairs", 0) + n, **{k: sums.get(k, 0) + stats[k] * n for k in TRAIN_SUMS}}


def train_stats(sums: dict) -> dict:
    """The round's loss and margins, weighted by pairs, over every step it took."""
    pairs = sums.get("pairs", 0)
    return {k: sums[k] / pairs if pairs else None for k in TRAIN_SUMS} | {"skipped_steps": sums.get("skipped", 0)}


# ------------------------------------------------------------------------ the loop


def reward_of(run: Run, cfg: RSOConfig):
    """(reward model, pi_base): the one ``--reward`` uses, frozen on the run's device."""
    if cfg.reward == "implicit":
        return None, references.load_base(run, cfg.base_model)
    return references.load_reward(run, cfg).to(run.accelerator.device).eval().requires_grad_(False), None


def train(cfg: RSOConfig, model=None, tokenizer=None, data=None) -> Path:
    if cfg.reward == "model" and not cfg.reward_model:
        raise SftjuiceError("--method rso needs --reward-model DIR (a sequence-classification reward with the policy's "
                            "tokenizer, e.g. an RFT run's OUTPUT/reward_model), or --reward implicit")
    if cfg.reward == "implicit":
        if model is not None and not cfg.base_model:
            raise SftjuiceError("--base-model is needed when the policy is given as a loaded model")
        cfg = dataclasses.replace(cfg, base_model=references.base_model_of(cfg))  # the manifest names the base it used
    run = start_run(cfg, model, tokenizer, data)
    plan = rounds.plan(len(run.examples), cfg.rounds, cfg.epochs, cfg.seed)
    round_steps = [rounds.steps_per_pass(run, len(rnd.section)) * cfg.passes for rnd in plan]
    policy = run.learner(run.policy_model, cfg.learning_rate, sum(round_steps))
    # pi_SFT, before any step or resume: it draws every round's candidates (so every round
    # file names it) and is the loss's reference
    pi_sft = weights_fingerprint(run.policy)
    starting = references.starting_policy(run)
    reward_model, base = reward_of(run, cfg)
    state = run.resume()
    micro_loss = pair_micro_loss(policy, cfg)
    for ctx in rounds.each_round(run, plan, round_steps, state):
        r, t0 = ctx.index, time.time()
        with starting() as sft:
            rows = rounds.sample_round(run, r, ctx.round.section, cfg.seed, pi_sft, model=sft,
                                       annotate=candidate_pairs(run, cfg, r, reward_model, base))
        t1 = time.time()
        items = pairs_of(rows, run.examples)
        # a global batch without a pair takes no step (every prompt of it drew one response)
        rounds.train_steps(ctx, policy, items, rounds.passes(run, len(items), r, cfg.passes), micro_loss, accepted_pairs_in,
                           extra=lambda batch: {"pairs": accepted_pairs_in([items[i] for i in batch])}, tally=tally)
        run.log_metrics({
            "step": ctx.end, "event": "round", "round": r, **rounds.sample_stats(rows), **selection_stats(rows, cfg.rejection_beta),
            **train_stats(ctx.sums), "generation_seconds": round(t1 - t0, 2), "train_seconds": round(time.time() - t1, 2),
        })
        ctx.checkpoint()
    return run.finish()
