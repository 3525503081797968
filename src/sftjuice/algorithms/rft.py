"""RFT: reward-learning fine-tuning with an explicit reward model (Algorithm 1).

A reward model r_phi (a scalar head on a transformer; by default on the policy's starting
model) learns what separates the demonstrations from the policy's own samples, and the
policy is optimised against it with a KL penalty to pi_ref. Each epoch of the
demonstrations is split into T sections; round t

  1. samples n >= 2 responses y_hat ~ pi_t for the prompts of section t, keeping their
     token log-probs (the sampler's) and those of pi_ref (one forward pass);
  2. reward step: one pass over the (demonstration, sample) pairs minimising
     ``l(r_phi(x, y^E) - r_phi(x, y_hat))``. Before it, r_phi has seen neither these
     prompts nor these samples: its accuracy on them is a held-out accuracy, measured
     against the policy that was just optimised to fool it;
  3. policy step: K passes of PPO-clip over the samples with RLOO advantages of the
     reward ``r_phi(x, y) - kl_coef * sum_t log(pi_t(y_t) / pi_ref(y_t))`` (a per-token
     KL penalty folded into the sequence reward).

Batches hold whole prompts (a :class:`Group`: prompt, demonstration, n samples), so every
pass computes a prompt once for all of its completions.

Why RLOO and a loop of our own, not TRL's PPO/RLOO trainers: those trainers own the whole
loop (their own generation, reward calls, logging, checkpoints), which leaves no place
for a reward step between sampling and the policy update, nor for rounds written to disk
atomically. RLOO's leave-one-out baseline needs no value model, so two networks train
(policy, reward) instead of three, which matters on a CPU; its conventions (k1 KL summed
into the reward, a sequence-level clipped ratio) are TRL's RLOOTrainer's.

pi_ref is the starting model (:func:`references.starting_policy`). Samples land in
``OUTPUT/rounds/<t>/generations.jsonl`` before the round trains; a checkpoint (both models,
both optimisers) closes every round, and ``--save-every`` adds some inside the policy passes.
The reward model ends in ``OUTPUT/reward_model/``, an HF sequence-classification directory.

metrics.jsonl: every step has ``phase`` "reward" (loss, wins and ties among the pairs whose sample differs from its demonstration, margin) or "policy"
(loss, clip_fraction, log_ratio, advantage_mean/std); per round, an ``event`` "reward"
(``reward_heldout_*``: r_t on the fresh pairs before its step; ``policy_reward``: r_t's
mean on pi_t's samples; ``reward_*``: after the step) and an ``event`` "round"
(``sample_reward`` under the updated r, ``kl`` = KL(pi_t || pi_ref), sample lengths).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch


from ..config import RFTConfig
from ..losses import reward_pair_loss
from ..models import reward_pad_id, save_reward_model
from ..scoring import rewards_of, shared_rewards
from ..training import Learner, Run, start_run
from . import references, rounds
from .ppo import assign_advantages, policy_micro_loss, reference_token_logprobs
from .rounds import Group, groups_of, samples_in

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the two scorers


def score_round(run: Run, reward: Learner, groups: list[Group]) -> tuple[list[float], list[float]]:
    """r_phi of each prompt's demonstration, and of each sample (flat, a prompt's n together)."""
    scores = run.map_sharded(groups, lambda gs: rewards_of(reward.unwrapped, [g.example.prompt_ids for g in gs],
                                                           [g.completions for g in gs]))
    return [s[0] for s in scores], [x for s in scores for x in s[1:]]


def pair_stats(prefix: str, demo: list[float], own: list[float], n: int) -> dict[str, float]:
    """r_phi's accuracy at ranking each demonstration over its prompt's samples. A sample
    scored the same as its demonstration (e.g. the same text) is a tie: counted apart, and
    left out of the accuracy, which is wins / (wins + losses)."""
    margins = [demo[i // n] - s for i, s in enumerate(own)]
    decided = [m for m in margins if m != 0]
    return {f"{prefix}_accuracy": sum(m > 0 for m in decided) / len(decided) if decided else None,
            f"{prefix}_ties": len(margins) - len(decided), f"{prefix}_margin": sum(margins) / len(margins)}


def identical_to_demonstration(g: Group) -> list[bool]:
    return [s.token_ids == g.example.completion_ids for s in g.samples]


def distinct_pairs(groups: list[Group]) -> int:
    """What the reward loss is normalised by: pairs whose sample differs from its demonstration
    (a sample identical to it is no negative and carries no loss)."""
    return sum(not same for g in groups for same in identical_to_demonstration(g))


def reward_micro_loss(reward: Learner, cfg: RFTConfig):
    def micro_loss(groups: list[Group]):
        # a prompt's demonstration and samples share it: it is computed once for all of them
        batch = reward.collate_shared([g.example.prompt_ids for g in groups], [c for g in groups for c in g.completions])
        scores = shared_rewards(reward.model, batch).view(len(groups), -1)
        rejected = scores[:, 1:].flatten()  # one pair per sample, its prompt's demonstration chosen
        chosen = scores[:, :1].expand(-1, scores.shape[1] - 1).flatten()
        distinct = ~torch.tensor([same for g in groups for same in identical_to_demonstration(g)], device=scores.device)
        loss = reward_pair_loss(chosen, rejected, cfg.reward_loss, cfg.reward_l2) * distinct
        margin = (chosen - rejected).detach() * distinct
        return loss.sum(), {"loss": loss.sum(), "wins": (margin > 0).float().sum(),
                            "ties": ((margin == 0) & distinct).float().sum(), "margin": margin.sum(),
                            "reward_chosen": (chosen.detach() * distinct).sum(),
                            "reward_rejected": (rejected.detach() * distinct).sum()}

    return micro_loss


# ---------------------------------------------------------------------- the loop


def train(cfg: RFTConfig, model=None, tokenizer=None, data=None) -> Path:
    run = start_run(cfg, model, tokenizer, data)
    n = cfg.num_samples
    plan = rounds.plan(len(run.examples), cfg.rounds, cfg.epochs, cfg.seed)
    reward_steps = [rounds.steps_per_pass(run, len(rnd.section)) for rnd in plan]  # one reward pass a round
    policy = run.learner(run.policy_model, cfg.learning_rate, sum(s * cfg.policy_steps for s in reward_steps))
    # prepared after the policy: its state files are model_1, optimizer_1
    # padded even with --pack: the reward head reads each completion at its last token
    reward = run.learner(references.load_reward(run, cfg), cfg.reward_learning_rate, sum(reward_steps),
                         pad_id=reward_pad_id(run.tokenizer, run.chat.stop_token_ids), packed=False)
    pi_ref = references.starting_policy(run)
    state = run.resume()  # "step" counts reward and policy updates
    reward_loss, policy_loss = reward_micro_loss(reward, cfg), policy_micro_loss(policy, cfg.clip_range)
    round_steps = [s * (1 + cfg.policy_steps) for s in reward_steps]
    for ctx in rounds.each_round(run, plan, round_steps, state):
        r, t0 = ctx.index, time.time()
        rows = rounds.sample_round(run, r, ctx.round.section, cfg.seed, ctx.pi_t, annotate=reference_token_logprobs(run, pi_ref))
        groups = groups_of(rows, run.examples)
        t1 = time.time()

        # reward step: demonstrations up, pi_t's samples down (mid-round checkpoints come after it,
        # so a round resumed inside has taken it, and its steps are only counted)
        if not ctx.resumed_inside:
            held_out = score_round(run, reward, groups)
        rounds.train_steps(ctx, reward, groups, rounds.passes(run, len(groups), r, 1), reward_loss, distinct_pairs,
                           phase="reward", checkpoints=False)
        demo, own = score_round(run, reward, groups)
        if not ctx.resumed_inside:
            run.log_metrics({
                "step": ctx.step, "event": "reward", "round": r, **pair_stats("reward_heldout", *held_out, n),
                "demonstration_reward": sum(held_out[0]) / len(held_out[0]), "policy_reward": sum(held_out[1]) / len(held_out[1]),
                **pair_stats("reward", demo, own, n),
                "identical_samples": len(own) - distinct_pairs(groups),
            })
        t2 = time.time()

        # policy step: K passes of PPO-clip on RLOO advantages of r_phi - kl_coef * KL(pi_t || pi_ref)
        kl, advantage_stats = assign_advantages(groups, own, cfg.kl_coef, n)
        rounds.train_steps(ctx, policy, groups, rounds.passes(run, len(groups), r, cfg.policy_steps, first=1), policy_loss,
                           samples_in, phase="policy", extra=advantage_stats)
        run.log_metrics({
            "step": ctx.step, "event": "round", "round": r, **rounds.sample_stats(rows),
            "sample_reward": sum(own) / len(own), "kl": kl.mean().item(),
            "generation_seconds": round(t1 - t0, 2), "reward_seconds": round(t2 - t1, 2),
            "policy_seconds": round(time.time() - t2, 2),
        })
        ctx.checkpoint()
    run.accelerator.wait_for_everyone()
    if run.is_main:
        save_reward_model(reward.unwrapped, run.tokenizer, run.output / "reward_model")
    return run.finish()
