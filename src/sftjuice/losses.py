"""The losses, as small pure functions side by side.

With ``u`` the margin between the demonstration and a model's own sample,

- SFT:   ``-log pi(y^E|x)``: pushes demonstrations up, nothing down;
- IRFT:  ``l(u)`` with ``u = beta*[log pi/pi_t](y^E) - beta*[log pi/pi_t](y_hat)``, the
         implicit reward of the policy against the round's frozen copy ``pi_t``.
         logistic ``l(u) = log(1+e^-u)`` is SPIN's (and DPO's) loss; linear ``-u`` is the
         exact maximum-likelihood IRL gradient; hinge ``max(0, 1-u)`` is SLiC's;
- RFT reward step: the same ``l`` on an explicit reward model's scores.
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


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, num_tokens: int | float) -> torch.Tensor:
    """Summed NLL of completion tokens divided by ``num_tokens`` (the number of completion
    tokens in the whole global batch, so micro-batches and processes add up exactly)."""
    return -(token_logps * mask).sum() / num_tokens


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
