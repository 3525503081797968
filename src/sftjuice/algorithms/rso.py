"""RSO: statistical rejection sampling optimisation (Liu et al., ICLR 2024, arXiv 2309.06657).

DPO and SLiC fit preference pairs drawn from ``pi_SFT``, but the policy they aim for is
``pi*(y|x) ∝ pi_SFT(y|x) exp(r(x,y)/beta)``. RSO draws the pairs from ``pi*`` itself:

  1. per prompt, N candidates from ``pi_SFT`` (paper: 64) scored by a reward ``r``
     (a reward model, or the SRPPO log-ratio ``log pi_SFT - log pi_base``);
  2. rejection sampling keeps M of them (paper: 8), approximately distributed as ``pi*``
     (``accept``); beta -> 0 is best-of-N, beta -> inf is plain sampling;
  3. the M accepted form M/2 disjoint random pairs, the reward labelling winner and loser
     (``pair_up``);
  4. the policy, starting at and regularised towards ``pi_ref = pi_SFT``, fits the pairs with
     ``losses.preference_loss`` (``sigmoid`` = DPO, ``hinge`` = SLiC, ``hinge-norm``).

This module holds the model-free steps 2 and 3 as pure functions; the loop comes below them.
"""

from __future__ import annotations

import math
import random


def accept(rewards: list[float], beta: float, num_accepted: int, rng: random.Random) -> list[int]:
    """Statistical rejection sampling (RSO's Algorithm 1; ALGORITHMS.md "RSO" step 3): the
    indices of up to ``num_accepted`` (M) candidates, in the order they were accepted.

    The candidates were drawn from ``pi_SFT``; the target is ``pi* ∝ pi_SFT exp(r/beta)``.
    Rejection sampling with proposal ``pi_SFT`` accepts ``y`` with probability
    ``pi*(y) / (C pi_SFT(y)) = exp((r(y) - r_max) / beta)`` where ``r_max`` bounds the reward.
    The true bound is unknown, so (as in the paper) the largest reward among the remaining
    candidates stands in for it:

        while fewer than M accepted and candidates remain:
            r_max = max reward among the remaining candidates
            visit the remaining candidates in a fresh random order, accepting each with
            probability exp((r - r_max) / beta) (u < that, u ~ U[0, 1)); stop at M
            remove the accepted ones

    The best remaining candidate is always accepted when visited (``u < 1``), so every pass
    accepts at least one and the loop ends. With fewer than M candidates all are returned
    (in acceptance order). The first accepted candidate follows ``pi*`` only approximately:
    exactly only when the N candidates contain the highest-reward outputs that matter (the
    empirical ``r_max`` equals the true bound) and a pass rarely rejects all of them, i.e. for
    N large against the spread of ``exp(r/beta)``; later ones are drawn without replacement
    from the same finite set, which is what makes the M accepted distinct.

    Duplicate texts among the candidates are the caller's concern: they are separate
    candidates here (removing them would no longer sample ``pi_SFT``); a pair of identical
    texts scored by a deterministic reward is a tie, which ``pair_up`` drops.
    The acceptance rate to log is ``len(result) / len(rewards)``."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if num_accepted < 0:
        raise ValueError(f"num_accepted must be >= 0, got {num_accepted}")
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError("rewards must be finite")  # an inf or nan r_max would never accept
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < num_accepted and remaining:
        r_max = max(rewards[i] for i in remaining)
        order = remaining[:]
        rng.shuffle(order)
        taken = set()
        for i in order:
            if rng.random() < math.exp((rewards[i] - r_max) / beta):
                accepted.append(i)
                taken.add(i)
                if len(accepted) == num_accepted:
                    break
        remaining = [i for i in remaining if i not in taken]
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
