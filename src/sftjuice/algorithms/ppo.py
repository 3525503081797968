"""The KL-regularised policy step that RFT and Self-Rewarding PPO share: reference
log-probs recorded at sampling time, RLOO advantages of a sequence reward minus ``kl_coef``
times the summed per-token KL to pi_ref, and PPO-clip on whole samples.

pi_ref is the starting model pi_SFT (:func:`references.starting_policy`).
"""

from __future__ import annotations

import torch

from ..data import Example
from ..losses import kl_penalty, ppo_clip_loss, rloo_advantages
from ..scoring import shared_logprobs, token_logprobs_of
from ..training import Learner, Run
from .rounds import Completion, Group


def reference_token_logprobs(run: Run, pi_ref):
    """``annotate`` for :func:`rounds.sample_round`: per-token log pi_ref of each sample
    (``pi_ref`` from :func:`references.starting_policy`)."""
    def annotate(examples: list[Example], samples) -> list[dict]:
        with pi_ref() as ref, run.accelerator.autocast():  # the precision the policy samples and trains in
            refs = token_logprobs_of(ref, run.tokenizer.pad_token_id, [e.prompt_ids for e in examples],
                                     [[s.token_ids for s in ss] for ss in samples])
        return [{"ref_token_logprobs": rr} for rr in refs]

    return annotate


def rollout_advantages(samples: list[Completion], rewards: list[float], kl_coef: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, kl)`` per sample: RLOO over each prompt's n samples of the learned
    reward minus ``kl_coef`` times the summed per-token KL of pi_t (the sampler) to pi_ref."""
    pad = torch.nn.utils.rnn.pad_sequence
    logps = pad([torch.tensor(x.logprobs) for x in samples], batch_first=True)
    ref = pad([torch.tensor(x.ref_logprobs) for x in samples], batch_first=True)
    mask = pad([torch.ones(len(x.logprobs)) for x in samples], batch_first=True)
    kl = kl_penalty(logps, ref, mask)
    advantages = rloo_advantages((torch.tensor(rewards) - kl_coef * kl).view(-1, n)).flatten()
    return advantages, kl


def policy_micro_loss(policy: Learner, clip_range: float):
    def micro_loss(groups: list[Group]):
        batch = policy.collate_shared([g.example.prompt_ids for g in groups], [s.token_ids for g in groups for s in g.samples])
        logps = shared_logprobs(policy.model, batch).sum(-1)
        samples = [s for g in groups for s in g.samples]
        old = torch.tensor([s.logprob for s in samples], device=logps.device)
        advantages = torch.tensor([s.advantage for s in samples], device=logps.device)
        loss, clipped = ppo_clip_loss(logps, old, advantages, clip_range)
        return loss.sum(), {"loss": loss.sum(), "clip_fraction": clipped.float().sum(),
                            "log_ratio": (logps - old).detach().sum()}

    return micro_loss


def assign_advantages(groups: list[Group], rewards: list[float], kl_coef: float, n: int):
    """Set each sample's RLOO advantage (of ``rewards`` minus ``kl_coef`` times its KL to pi_ref);
    returns the per-sample KL and a function giving a batch's advantage statistics to log."""
    samples = [s for g in groups for s in g.samples]
    advantages, kl = rollout_advantages(samples, rewards, kl_coef, n)
    for s, a in zip(samples, advantages.tolist()):
        s.advantage = a

    def batch_stats(batch: list[int]) -> dict[str, float]:
        adv = advantages.view(-1, n)[batch]
        return {"advantage_mean": adv.mean().item(), "advantage_std": adv.std(correction=0).item()}

    return kl, batch_stats
