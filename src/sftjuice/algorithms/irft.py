"""IRFT: implicit reward-learning fine-tuning (Algorithm 2); SPIN is a setting of it.

The policy is its own reward model, ``r(x, y) = beta * log(pi_theta(y|x) / pi_t(y|x))``
with ``pi_t`` the policy frozen at the start of round t. Each epoch of the
demonstrations is split into T sections; round t

  1. samples responses y_hat ~ pi_t for the prompts of section t, keeping their
     log-probs (the sampler's, so no reference model is needed) and computing
     log pi_t(y^E|x) of the demonstrations in one forward pass (with
     ``--keep-previous-round``, the previous round's samples are re-scored by pi_t too);
  2. makes K passes over the (demonstration, sample) pairs minimising
     ``l(beta*[log pi/pi_t](y^E) - beta*[log pi/pi_t](y_hat))``.

SPIN is one round over the whole data per iteration (:class:`config.SPINConfig`).
Everything round t trains on lands in ``OUTPUT/rounds/<t>/generations.jsonl`` before its
first step, so a resumed run never samples or scores a finished round again.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import PairConfig
from ..data import Example, load_demonstrations
from ..losses import irl_pair_loss
from ..scoring import sequence_logprobs_of, shared_logprobs, singletons, token_logprobs_of
from ..storage import read_jsonl
from ..training import Learner, Run, start_run
from . import references, rounds
from .rounds import Group, distinct_pairs_in, groups_of, samples_in


def pair_micro_loss(learner: Learner, cfg: PairConfig):
    def micro_loss(groups: list[Group]):
        # a demonstration and its samples share their prompt: it is computed once for all
        batch = learner.collate_shared([g.example.prompt_ids for g in groups], [c for g in groups for c in g.completions])
        logps = shared_logprobs(learner.model, batch).sum(-1).view(len(groups), -1)
        n = logps.shape[1] - 1
        policy_chosen, policy_rejected = logps[:, :1].expand(-1, n).flatten(), logps[:, 1:].flatten()
        ref = torch.tensor([[g.demonstration_logprob, s.logprob] for g in groups for s in g.samples], device=logps.device)
        loss, r_chosen, r_rejected = irl_pair_loss(policy_chosen, ref[:, 0], policy_rejected, ref[:, 1], cfg.beta, cfg.loss)
        if cfg.sft_weight:  # keep pushing demonstrations up as SFT does (RPO-style regulariser)
            lengths = torch.tensor([len(g.example.completion_ids) for g in groups for _ in g.samples], device=logps.device)
            loss = loss - cfg.sft_weight * policy_chosen / lengths
        keep = torch.tensor([d for g in groups for d in g.differs], device=logps.device).float()  # see Group.differs
        margin = r_chosen - r_rejected
        return (loss * keep).sum(), {
            "loss": (loss * keep).sum(), "reward_chosen": (r_chosen * keep).sum(),
            "reward_rejected": (r_rejected * keep).sum(), "margin": (margin * keep).sum(),
            "margin_positive": ((margin > 0).float() * keep).sum(),
            "logp_chosen": (policy_chosen.detach() * keep).sum(), "logp_rejected": (policy_rejected.detach() * keep).sum(),
        }

    return micro_loss


def policy_token_logprobs(run: Run, groups: list[Group], model=None) -> list[list[list[float]]]:
    """Per-token ``log pi`` of each group's completions (demonstration first) under ``model``
    (default: the current policy), each prompt computed once, the groups split over processes."""
    return run.map_sharded(groups, lambda gs: token_logprobs_of(
        model or run.policy, run.tokenizer.pad_token_id, [g.example.prompt_ids for g in gs], [g.completions for g in gs]))


def policy_logprobs(run: Run, groups: list[Group]) -> list[list[float]]:
    return [[sum(t) for t in g] for g in policy_token_logprobs(run, groups)]


def heldout_margins(run: Run, groups: list[Group]) -> dict[str, float]:
    """The implicit reward's margin on held-out (demonstration, fresh sample) pairs that no
    step trained on: does what the policy learned to separate generalise?"""
    beta = run.cfg.beta
    margins = [beta * ((logps[0] - g.demonstration_logprob) - (lp - s.logprob))
               for g, logps in zip(groups, policy_logprobs(run, groups)) for s, lp in zip(g.samples, logps[1:])]
    return {"heldout_margin": sum(margins) / len(margins),
            "heldout_margin_positive": sum(m > 0 for m in margins) / len(margins)}


def demonstration_logprobs(run: Run):
    """``annotate`` for :func:`rounds.sample_round`: log pi_t(y^E|x), one forward pass."""
    def annotate(examples: list[Example], samples) -> list[dict]:
        logps = sequence_logprobs_of(references.round_start(run), run.tokenizer.pad_token_id,
                                     [e.prompt_ids for e in examples], singletons([e.completion_ids for e in examples]))
        return [{"demonstration_logprob": lp[0]} for lp in logps]

    return annotate


def rescored_previous(run: Run, r: int):
    """``make`` for the round file ``previous``: the previous round's rows with their log-probs
    under the current pi_t (``--keep-previous-round``)."""
    def make() -> list[dict]:
        rows = read_jsonl(run.output / "rounds" / str(r - 1) / "generations.jsonl")
        pi_t = references.round_start(run)
        for row, logps in zip(rows, policy_token_logprobs(run, groups_of(rows, run.examples), pi_t)):
            row["demonstration_logprob"] = sum(logps[0])
            for s, lp in zip(row["samples"], logps[1:]):
                s["token_logprobs"] = lp
        return rows

    return make


def load_heldout(run: Run) -> tuple[list[Example], list] | None:
    """The ``--eval-data`` demonstrations (at most ``--eval-size``), tokenised like the training data."""
    cfg = run.cfg
    if not cfg.eval_data:
        return None
    demos = load_demonstrations(cfg.eval_data, skip_invalid=cfg.skip_invalid)[: cfg.eval_size]
    return run.chat.encode(demos, cfg.max_prompt_length, cfg.max_length, skip_invalid=cfg.skip_invalid), demos


def train(cfg: PairConfig, model=None, tokenizer=None, data=None) -> Path:
    run = start_run(cfg, model, tokenizer, data)
    plan = rounds.plan(len(run.examples), cfg.rounds, cfg.epochs, cfg.seed)
    groups_in = [len(rnd.section) + (len(plan[i - 1].section) if cfg.keep_previous_round and i else 0)
                 for i, rnd in enumerate(plan)]
    round_steps = [rounds.steps_per_pass(run, g) * cfg.passes for g in groups_in]
    policy = run.learner(run.policy_model, cfg.learning_rate, sum(round_steps))
    state = run.resume()
    micro_loss = pair_micro_loss(policy, cfg)
    heldout = load_heldout(run)
    for ctx in rounds.each_round(run, plan, round_steps, state):
        r, pi_t, t0 = ctx.index, ctx.pi_t, time.time()
        rows = rounds.sample_round(run, r, ctx.round.section, cfg.seed, pi_t, annotate=demonstration_logprobs(run))
        groups = groups_of(rows, run.examples)
        if cfg.keep_previous_round and r > 0:
            groups += groups_of(rounds.round_file(run, r, "previous", pi_t, rescored_previous(run, r)), run.examples)
        if heldout:
            rows_heldout = rounds.sample_round(run, r, list(range(len(heldout[0]))), cfg.seed, pi_t, name="heldout",
                                               data=heldout, annotate=demonstration_logprobs(run))
        t1 = time.time()
        rounds.train_steps(ctx, policy, groups, rounds.passes(run, len(groups), r, cfg.passes), micro_loss, distinct_pairs_in)
        run.log_metrics({
            "step": ctx.step, "event": "round", "round": r, "pairs": distinct_pairs_in(groups),
            "identical_pairs": samples_in(groups) - distinct_pairs_in(groups), **rounds.sample_stats(rows),
            **(heldout_margins(run, groups_of(rows_heldout, heldout[0])) if heldout else {}),
            "generation_seconds": round(t1 - t0, 2), "train_seconds": round(time.time() - t1, 2),
        })
        ctx.checkpoint()
    return run.finish()
