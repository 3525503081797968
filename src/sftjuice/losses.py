"""The losses, as small pure functions side by side.

With ``u`` the margin between the demonstration and a model's own sample,

- SFT:   ``-log pi(y^E|x)``: pushes demonstrations up, nothing down;
- IRFT:  ``l(u)`` with ``u = beta*[log pi/pi_t](y^E) - beta*[log pi/pi_t](y_hat)``, the
         implicit reward of the policy against the round's frozen copy ``pi_t``.
         logistic ``l(u) = log(1+e^-u)`` is SPIN's (and DPO's) loss; linear ``-u`` is the
         exact maximum-likelihood IRL gradient; hinge ``max(0, 1-u)`` is SLiC's;
- RFT reward step: the same ``l`` on an explicit reward model's scores;
- RFT policy step: PPO-clip on RLOO advantages of ``r - kl_coef * sum_t log(pi/pi_ref)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PairLoss = Literal["logistic", "linear", "hinge"]


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position, in fp32, without materialising the
    full log-softmax: the chosen logit minus the log-partition."""
    logits = logits.float()
    return logits.gather(-1, token_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the completion tokens; the optimiser step divides it by the number of
    completion tokens in the whole global batch, so micro-batches and processes add up exactly."""
    return -(token_logps * mask).sum()


def margin_loss(u: torch.Tensor, kind: PairLoss) -> torch.Tensor:
    """``l(u)`` per pair."""
    if kind == "logistic":
        return -F.logsigmoid(u)
    if kind == "linear":
        return -u
    if kind == "hinge":
        return torch.relu(1 - u)
    raise ValueError(f"unknown loss '{kind}'")


def irl_pair_loss(
    policy_chosen: torch.Tensor,
    ref_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: PairLoss = "logistic",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IRFT / SPIN loss per pair, from sequence log-probs (sums over response tokens).

    Returns ``(loss, chosen_reward, rejected_reward)`` with the implicit rewards
    ``beta * (log pi_theta - log pi_t)``."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return margin_loss(chosen_reward - rejected_reward, kind), chosen_reward.detach(), rejected_reward.detach()


def reward_pair_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, kind: Literal["logistic", "linear"] = "logistic", l2: float = 0.0
) -> torch.Tensor:
    """Reward-model loss per pair (demonstration = chosen, own sample = rejected).
    The linear loss is unbounded below, so ``l2`` penalises the reward values' size."""
    return margin_loss(r_chosen - r_rejected, kind) + l2 * (r_chosen.square() + r_rejected.square())


# RFT policy step: KL-regularised policy gradient against the learned reward (Algorithm 1)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``log pi(y_t) - log pi_ref(y_t)`` (k1) summed over the response
    tokens, per sequence. For ``y ~ pi`` it is unbiased for ``KL(pi(.|x) || pi_ref(.|x))``,
    and ``r - kl_coef * kl_penalty`` used as a REINFORCE reward gives the exact gradient of
    ``E[r] - kl_coef * KL`` (what the closed form ``pi_ref * exp(r / kl_coef)`` maximises)."""
    return ((logps - ref_logps) * mask).sum(-1)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``rewards[..., n]`` holds the n >= 2
    samples of one prompt; each is baselined by the mean reward of the other n - 1, an
    unbiased baseline that needs no value model."""
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)


def ppo_clip_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate (Schulman et al. 2017) per sequence, on sequence log-probs (sums
    over response tokens) with the sampler's as ``old_logps``: the sequence is one action, as
    the advantage is one number per sequence (TRL's RLOOTrainer does the same). At ratio 1
    the gradient is ``-A * grad log pi(y|x)``; once the ratio left ``[1-eps, 1+eps]`` in the
    advantage's direction the gradient is 0. Returns ``(loss, clipped)``."""
    ratio = (logps - old_logps).exp()
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)
    clipped = ((ratio > 1 + clip_range) & (advantages > 0)) | ((ratio < 1 - clip_range) & (advantages < 0))
    return loss, clipped


# Preference losses on pairs (RSO, per-step DPO)

PreferenceLoss = Literal["sigmoid", "hinge", "hinge-norm"]


def preference_loss(
    policy_w: torch.Tensor,
    ref_w: torch.Tensor | None,
    policy_l: torch.Tensor,
    ref_l: torch.Tensor | None,
    kind: PreferenceLoss,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per (winner, loser) pair from sequence log-probs (sums over response tokens),
    the three losses RSO compares (Liu et al. 2024, ALGORITHMS.md "RSO" step 5):

    - ``sigmoid`` (DPO): ``-log sigmoid(beta * D)``, ``D = [log pi/pi_ref](y_w) - [log pi/pi_ref](y_l)``;
      its optimum is ``pi_ref * exp(r / beta)`` for the reward that ranked the pairs;
    - ``hinge`` (SLiC): ``max(0, 1 - beta * [log pi(y_w) - log pi(y_l)])``, no reference: the
      policy may drift anywhere once the margin is met (the paper finds it reward-hacks), so
      ``ref_w`` and ``ref_l`` are ignored and may be None;
    - ``hinge-norm``: ``max(0, 1 - beta * D)``, SLiC's hinge on DPO's reference-normalised margin.

    Per-step negatives (Setlur et al. 2024) use ``sigmoid`` (DPO, their ``beta``),
    the loser being the wrong response cut after its first pit.

    Returns ``(loss, margin)``: the loss per pair and the detached margin inside it
    (``beta * D``, or ``beta * [log pi(y_w) - log pi(y_l)]`` for ``hinge``), the number to log:
    positive when the policy already prefers the winner."""
    if kind == "hinge":
        margin = beta * (policy_w - policy_l)
        return margin_loss(margin, "hinge"), margin.detach()
    if kind not in ("sigmoid", "hinge-norm"):
        raise ValueError(f"unknown preference loss '{kind}'")
    if ref_w is None or ref_l is None:
        raise ValueError(f"the '{kind}' loss needs the reference log-probs")
    margin = beta * ((policy_w - ref_w) - (policy_l - ref_l))
    return margin_loss(margin, "logistic" if kind == "sigmoid" else "hinge"), margin.detach()
