"""The model-free pieces of RSO and per-step negatives: preference losses against hand values,
rejection sampling against its target distribution, pairing, prefix values and the first pit
on hand-built rollout trees, and step splitting."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sftjuice.algorithms.rso import accept, pair_up
from sftjuice.algorithms.steps import first_pit, prefix_values, split_steps, step_advantages, step_ends
from sftjuice.losses import preference_loss

# preference_loss

# Two pairs (winner, loser) of sequence log-probs, beta = 0.5 for the first, 2 for the second.
#   pair 1: policy_w -10, ref_w -12, policy_l -9, ref_l -10
#           D = (-10 + 12) - (-9 + 10) = 2 - 1 = 1;  beta*D = 0.5;  policy_w - policy_l = -1
#   pair 2: policy_w -5, ref_w -4, policy_l -6, ref_l -8
#           D = (-5 + 4) - (-6 + 8) = -1 - 2 = -3;  beta*D = -6;  policy_w - policy_l = 1
PAIRS = [(-10.0, -12.0, -9.0, -10.0, 0.5), (-5.0, -4.0, -6.0, -8.0, 2.0)]
# (kind, pair) -> (loss, margin), written out by hand:
#   sigmoid:    -log sigmoid(0.5) = log(1 + e^-0.5) = log(1.6065306597) = 0.4740769842
#               -log sigmoid(-6)  = log(1 + e^6)    = log(404.4287934927) = 6.0024756851
#   hinge:      max(0, 1 - 0.5 * -1) = 1.5;   max(0, 1 - 2 * 1) = 0   (margins -0.5 and 2)
#   hinge-norm: max(0, 1 - 0.5) = 0.5;        max(0, 1 + 6) = 7       (margins 0.5 and -6)
HAND = {
    "sigmoid": [(0.4740769842, 0.5), (6.0024756851, -6.0)],
    "hinge": [(1.5, -0.5), (0.0, 2.0)],
    "hinge-norm": [(0.5, 0.5), (7.0, -6.0)],
}


def _tensors(pw, rw, pl, rl):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (pw, rw, pl, rl)]


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "hinge-norm"])
@pytest.mark.parametrize("pair", [0, 1])
def test_preference_loss_hand_values(kind, pair):
    pw, rw, pl, rl, beta = PAIRS[pair]
    loss, margin = preference_loss(*_tensors(pw, rw, pl, rl), kind=kind, beta=beta)
    want_loss, want_margin = HAND[kind][pair]
    assert loss.item() == pytest.approx(want_loss, abs=1e-9)
    assert margin.item() == pytest.approx(want_margin, abs=1e-12)
    assert not margin.requires_grad


def test_preference_loss_batched_matches_per_pair():
    pw, rw, pl, rl = (torch.tensor([p[i] for p in PAIRS], dtype=torch.float64) for i in range(4))
    beta = 0.5
    loss, margin = preference_loss(pw, rw, pl, rl, "sigmoid", beta)
    # pair 2 at beta 0.5: beta*D = -1.5, -log sigmoid(-1.5) = log(1 + e^1.5) = 1.7014132779
    assert loss.tolist() == pytest.approx([0.4740769842, 1.7014132779], abs=1e-9)
    assert margin.tolist() == pytest.approx([0.5, -1.5])


# Gradients of pair 1 (beta 0.5):
#   sigmoid: dL/dpolicy_w = -beta * sigmoid(-beta*D) = -0.5 * sigmoid(-0.5) = -0.5 * 0.3775406688
#            = -0.1887703344; dL/dpolicy_l = +0.1887703344; the refs get the opposite signs.
#   hinge / hinge-norm (inside the hinge): dL/dpolicy_w = -beta = -0.5, dL/dpolicy_l = +0.5;
#            hinge has no reference, hinge-norm's refs get +0.5 and -0.5.
GRADS = {
    "sigmoid": (-0.1887703344, 0.1887703344, 0.1887703344, -0.1887703344),
    "hinge": (-0.5, None, 0.5, None),
    "hinge-norm": (-0.5, 0.5, 0.5, -0.5),
}


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "hinge-norm"])
def test_preference_loss_gradient_signs(kind):
    pw, rw, pl, rl, beta = PAIRS[0]
    xs = _tensors(pw, rw, pl, rl)
    loss, _ = preference_loss(*xs, kind=kind, beta=beta)
    loss.backward()
    grad_w, grad_l = xs[0].grad.item(), xs[2].grad.item()
    assert grad_w < 0  # raising the winner's log-prob lowers the loss
    assert grad_l > 0  # raising the loser's raises it
    for x, want in zip(xs, GRADS[kind]):
        if want is None:
            assert x.grad is None  # plain hinge does not look at the reference
        else:
            assert x.grad.item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("kind", ["hinge", "hinge-norm"])
def test_hinge_has_no_gradient_past_margin_one(kind):
    # policy_w - policy_l = 4 and D = 4 (equal references): beta * 4 = 2 > 1, the hinge is flat
    xs = _tensors(0.0, -3.0, -4.0, -3.0)
    loss, margin = preference_loss(*xs, kind=kind, beta=0.5)
    assert margin.item() == 2.0 and loss.item() == 0.0
    loss.backward()
    assert xs[0].grad.item() == 0.0 and xs[2].grad.item() == 0.0


def test_preference_loss_arguments():
    x = torch.tensor(-1.0)
    loss, margin = preference_loss(x, None, x - 1, None, "hinge", 1.0)  # hinge needs no reference
    assert loss.item() == 0.0 and margin.item() == 1.0
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, None, x, None, "sigmoid", 1.0)
    with pytest.raises(ValueError, match="unknown"):
        preference_loss(x, x, x, x, "logistic", 1.0)


# accept: rejection sampling towards pi* ∝ pi exp(r / rejection_beta)

PI = [0.4, 0.3, 0.2, 0.1]
REWARDS = [0.0, 1.0, 2.0, 3.0]


def _tv(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def _accepted_distribution(rejection_beta: float, num_candidates: int, trials: int, seed: int) -> list[float]:
    """How often each outcome is the (single) accepted one when the candidates are iid from PI."""
    rng = random.Random(seed)
    counts = [0] * len(PI)
    for _ in range(trials):
        outcomes = rng.choices(range(len(PI)), weights=PI, k=num_candidates)
        (i,) = accept([REWARDS[o] for o in outcomes], rejection_beta, 1, rng)
        counts[outcomes[i]] += 1
    return [c / trials for c in counts]


def _target(rejection_beta: float) -> list[float]:
    w = [p * math.exp(r / rejection_beta) for p, r in zip(PI, REWARDS)]
    return [x / sum(w) for x in w]


def test_accepted_candidate_follows_the_optimal_policy():
    """pi* = PI * e^r / Z = [0.0851, 0.1734, 0.3143, 0.4272] at rejection_beta 1.

    With N finite the scheme is exact only approximately: r_max is the largest reward *among the
    candidates*, and 0.9^N of the time the top outcome (reward 3, prob 0.1) is missing, when it
    cannot be accepted. Measured with 200000 trials, TV(accepted, pi*) is 0.27 at N = 2, 0.14 at
    N = 4, 0.046 at N = 8, 0.006 at N = 16 (P(top missing) 0.185) and 0.001-0.002 (noise) at
    N = 32 and 64. So N = 16 (e^(3/1) = 20 reward spread): bias about 0.006. The sampling noise
    of 20000 trials: each frequency has sd <= sqrt(0.25 / 20000) = 0.0035, E[TV] about 0.005, so
    TV < 0.03 leaves room for the bias plus a > 4 sd noise excursion, and a sampler that ignored
    the reward (TV(PI, pi*) = 0.37) or a best-of-N (TV 0.57) fails it by far."""
    target = _target(1.0)
    got = _accepted_distribution(rejection_beta=1.0, num_candidates=16, trials=20000, seed=0)
    tv = _tv(got, target)
    print(f"\naccept N=16 rejection_beta=1 20000 trials: target {[round(t, 4) for t in target]}, "
          f"accepted {[round(g, 4) for g in got]}, TV {tv:.4f}")
    assert tv < 0.03
    assert _tv(PI, target) > 0.3  # the test can tell pi* from pi


def test_too_few_candidates_for_the_reward_spread_are_biased():
    """The finite-N caveat, measured: with N = 4 the top outcome is missing from 66% of the
    candidate sets and the accepted distribution sits far from pi* (TV about 0.14)."""
    tv = _tv(_accepted_distribution(rejection_beta=1.0, num_candidates=4, trials=5000, seed=1), _target(1.0))
    print(f"\naccept N=4 rejection_beta=1 5000 trials: TV {tv:.4f}")
    assert tv > 0.09


def test_huge_rejection_beta_is_plain_sampling():
    got = _accepted_distribution(rejection_beta=1e9, num_candidates=16, trials=20000, seed=2)
    tv = _tv(got, PI)
    print(f"\naccept N=16 rejection_beta=1e9 20000 trials: accepted {[round(g, 4) for g in got]}, TV to pi {tv:.4f}")
    assert tv < 0.03


def test_tiny_rejection_beta_is_best_of_n():
    rng = random.Random(3)
    for _ in range(200):
        rewards = [rng.gauss(0, 1) for _ in range(10)]
        best_first = sorted(range(10), key=lambda i: -rewards[i])
        assert accept(rewards, 1e-9, 1, rng) == best_first[:1]
        assert accept(rewards, 1e-9, 3, rng) == best_first[:3]  # in acceptance order
    # with tied maxima any of them, never a lower one
    rewards = [2.0, 5.0, 1.0, 5.0]
    seen = {accept(rewards, 1e-9, 1, rng)[0] for _ in range(100)}
    assert seen == {1, 3}


def test_accepts_distinct_candidates_and_all_when_too_few():
    rng = random.Random(4)
    for rejection_beta in (0.1, 1.0, 10.0):
        for _ in range(100):
            rewards = [rng.uniform(-3, 3) for _ in range(20)]
            got = accept(rewards, rejection_beta, 8, rng)
            assert len(got) == 8 and len(set(got)) == 8 and all(0 <= i < 20 for i in got)
    # fewer candidates than M: all of them, in acceptance order (best first when rejection_beta is tiny)
    assert accept([0.5, 2.0, -1.0], 1e-9, 8, rng) == [1, 0, 2]
    got = accept([0.5, 2.0, -1.0], 1.0, 8, rng)
    assert sorted(got) == [0, 1, 2]
    assert accept([1.0, 1.0], 1.0, 8, rng) in ([0, 1], [1, 0])
    assert accept([], 1.0, 8, rng) == []
    assert accept([1.0, 2.0], 1.0, 0, rng) == []


def test_accept_arguments():
    rng = random.Random(5)
    for rejection_beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rejection_beta"):
            accept([1.0, 2.0], rejection_beta, 1, rng)
    with pytest.raises(ValueError, match="finite"):
        accept([1.0, float("inf")], 1.0, 1, rng)
    with pytest.raises(ValueError, match="num_accepted"):
        accept([1.0], 1.0, -1, rng)


# pair_up


def test_pairs_are_disjoint_winner_first_and_random():
    rewards = [0.3, -1.0, 2.5, 0.7, 1.1, -0.2, 4.0, 0.0, 9.9]  # index 8 is never accepted
    accepted = [6, 0, 3, 1, 7, 2, 5, 4]
    pairings = set()
    for seed in range(50):
        pairs = pair_up(accepted, rewards, random.Random(seed))
        assert len(pairs) == 4
        flat = [i for p in pairs for i in p]
        assert sorted(flat) == sorted(accepted)  # disjoint, covering the accepted
        assert all(rewards[w] > rewards[lo] for w, lo in pairs)
        pairings.add(frozenset(frozenset(p) for p in pairs))
    assert len(pairings) > 10  # random pairs, not a fixed ranking


def test_ties_are_dropped_and_odd_one_out():
    assert pair_up([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0], random.Random(0)) == []
    rewards = [1.0, 1.0, 2.0, 2.0]
    sizes = set()
    for seed in range(50):
        pairs = pair_up([0, 1, 2, 3], rewards, random.Random(seed))
        assert all(rewards[w] > rewards[lo] for w, lo in pairs)
        sizes.add(len(pairs))
    assert sizes == {0, 2}  # {0,1},{2,3} ties both; otherwise two pairs (1.0 vs 2.0)
    pairs = pair_up([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0, 4.0], random.Random(1))
    assert len(pairs) == 2 and len({i for p in pairs for i in p}) == 4
    with pytest.raises(ValueError, match="distinct"):
        pair_up([0, 0], [1.0], random.Random(0))


# Per-step negatives: prefix values, advantages and the first pit on hand-built rollout trees.
# successes[i] = verifier scores of the rollouts from the prefix of i steps (0 = bare prompt);
# the last entry is [score of the wrong response itself] = [0].


def test_four_step_wrong_solution():
    successes = [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0]]
    q = prefix_values(successes, "any")
    assert q == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert step_advantages(q) == [0.0, -1.0, 0.0, 0.0]
    assert first_pit(q) == 2  # step 2 lost the answer: no rollout from y_{1:2} succeeds
    m = prefix_values(successes, "mean")
    assert m == pytest.approx([0.4, 0.2, 0.0, 0.0, 0.0])
    assert step_advantages(m) == pytest.approx([-0.2, -0.2, 0.0, 0.0])
    assert first_pit(m) == 2
    assert prefix_values(successes) == q  # "any" is the default, the paper's


def test_pit_at_the_first_step():
    successes = [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0]]
    q = prefix_values(successes, "any")
    assert q == [1.0, 0.0, 0.0, 0.0]
    assert step_advantages(q) == [-1.0, 0.0, 0.0]
    assert first_pit(q) == 1
    assert prefix_values(successes, "mean") == pytest.approx([0.4, 0.0, 0.0, 0.0])


def test_non_monotone_values_take_the_first_lowest():
    # step 1 drops to 0, step 2's rollouts recover once (Monte Carlo noise), then 0 again
    successes = [[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0]]
    q = prefix_values(successes, "any")
    assert q == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert step_advantages(q) == [-1.0, 1.0, -1.0, 0.0]
    assert first_pit(q) == 1
    assert first_pit([1.0, 0.5, 0.2, 0.5, 0.2]) == 2  # first of the lowest (mean-style values)


def test_pit_at_the_answer_line_and_unsolvable_prompt():
    # every prefix can still be completed correctly; only the final answer line is wrong
    successes = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0]]
    assert prefix_values(successes, "any") == [1.0, 1.0, 1.0, 0.0]
    assert first_pit(prefix_values(successes, "any")) == 3
    assert prefix_values(successes, "mean") == pytest.approx([0.75, 0.25, 0.5, 0.0])
    assert first_pit(prefix_values(successes, "mean")) == 3
    # nothing succeeds even from the bare prompt: all advantages 0, the pit is step 1
    q = prefix_values([[0, 0], [0, 0], [0]], "any")
    assert q == [0.0, 0.0, 0.0] and step_advantages(q) == [0.0, 0.0] and first_pit(q) == 1


def test_success_threshold_and_arguments():
    assert prefix_values([[0.6, 0.4], [0.49, 0.0], [0.5]], "any") == [1.0, 0.0, 1.0]
    assert prefix_values([[0.6, 0.4], [0.49, 0.0], [0.5]], "mean") == pytest.approx([0.5, 0.245, 0.5])
    with pytest.raises(ValueError, match="no rollout"):
        prefix_values([[1.0], []])
    with pytest.raises(ValueError, match="mode"):
        prefix_values([[1.0]], "max")
    with pytest.raises(ValueError):
        first_pit([1.0])


# split_steps / step_ends


def test_steps_with_blank_lines_and_no_trailing_newline():
    text = "\nStep one\n\n  \nStep two\r\nAnswer: 4"
    steps = split_steps(text)
    # leading blank lines go with the step they lead into; "\r\n" stays whole
    assert steps == ["\nStep one\n", "\n  \nStep two\r\n", "Answer: 4"]
    # lengths 1+8+1 = 10, 1+3+8+2 = 14, 9 -> ends 10, 24, 33 = len(text)
    assert step_ends(text) == [10, 24, 33] and len(text) == 33
    for i, end in enumerate(step_ends(text), start=1):
        assert "".join(steps[:i]) == text[:end]
    assert text[:step_ends(text)[1]] == "\nStep one\n\n  \nStep two\r\n"  # the negative y_{1:2}


def test_steps_with_trailing_blank_lines_and_edge_cases():
    text = "a = 1\nb = 2\n\n"
    assert split_steps(text) == ["a = 1\n", "b = 2\n\n"]  # the last step runs to the end of text
    assert step_ends(text) == [6, 13]
    assert split_steps("42") == ["42"] and step_ends("42") == [2]
    assert split_steps("x\ny\n") == ["x\n", "y\n"] and step_ends("x\ny\n") == [2, 4]
    for blank in ("", "\n", " \n\t\n"):
        assert split_steps(blank) == [] and step_ends(blank) == []
