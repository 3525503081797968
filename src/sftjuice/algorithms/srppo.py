"""Self-Rewarding PPO (Zhang et al. 2025, arXiv 2510.21090): a reward from two frozen
models and no labels, the SFT model against the pretrained model it was fine-tuned from:

    r(x, y) = log pi_SFT(y|x) - log pi_base(y|x)      summed over the response's tokens

What SFT added to the base model is what the demonstrations taught; a response that the
SFT model likes much more than the base model does is one that looks like them. The
policy starts at pi_SFT and is optimised against r with a per-token KL penalty to
pi_ref = pi_SFT. Each epoch of the prompts (``--data``'s, plus ``--prompts``) is split into
T sections; round t

  1. samples n >= 2 responses y_hat ~ pi_t for the prompts of section t, keeping their
     token log-probs (the sampler's) and, in one forward pass per model, those of pi_SFT
     and pi_base; the demonstration of each labelled prompt is scored alongside;
  2. rewards each finished sample with r (not length-normalised, paid once at the end of
     turn); a sample cut at ``--max-new-tokens`` never reached its end of turn and gets
     ``--no-eos-penalty`` instead, because its partial log-ratio grows with its length;
  3. K passes of PPO-clip over the samples with RLOO advantages of
     ``r(x, y) - kl_coef * sum_t log(pi_t(y_t) / pi_SFT(y_t))``: each sample baselined by
     the mean of its prompt's other n-1 samples. There is no value network and no GAE (the
     paper trains a value head); the policy is the only model that trains. Samples are
     drawn at temperature 1 (the spec's 0.7 would sample another policy than the pi_t whose
     untempered log-probs the ratios and the KL use, and bias both: the config refuses it).

Why -1 for a cut sample: the reward's zero is "pi_SFT and pi_base agree", and a finished
sample of pi_SFT scores KL(pi_SFT || pi_base) >= 0 on average (summed over a response,
several nats even on short answers). -1 sits a nat below that neutral point, so a cut
sample ranks below nearly every finished one of its prompt, while its RLOO advantage stays
on the scale of the differences between finished samples (a penalty like
``-max_new_tokens`` would swamp every other signal in the batch). The round record reports
``finished_reward_mean`` to check the gap.

Chat-template tokens the base model never learned to predict (``<|im_end|>``) can carry a
large share of the log-ratio; they are kept in r, and each round reports their share of
the |log-ratio| mass (``reward_template_share``) beside their share of the tokens.

Memory: the policy, pi_SFT and pi_base, about three times the weights; with LoRA pi_SFT is
the policy's own weights under its reference adapter or none (:func:`references.starting_policy`),
so twice the weights. ``--base-model`` defaults to the starting model of the sftjuice SFT
run whose ``OUTPUT/final`` is ``--model`` (:func:`references.base_model_of`).

Samples, their per-token log-probs under pi_SFT and pi_base, and r of each demonstration
land in ``OUTPUT/rounds/<t>/generations.jsonl`` before the round trains; a checkpoint
closes every round and ``--save-every`` adds some inside the policy passes.

metrics.jsonl: every step has ``phase`` "policy" (loss, clip_fraction, log_ratio,
advantage_mean/std); per round an ``event`` "round": ``sample_reward`` (mean r of the
round's samples, cut ones at the penalty), ``finished_reward_mean``, ``demonstration_reward``,
``kl`` (KL(pi_t || pi_SFT) on the samples), sample lengths, the template shares, and
``reward_heldout_*``: r ranking each demonstration over its prompt's samples on the round's
fresh prompts, before any step trained on them (accuracy = wins / (wins + losses); a
sample with the same tokens or the same reward as its demonstration is a tie, counted
apart); timings (``generation_seconds`` includes both reference passes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..config import SftjuiceError, SRPPOConfig
from ..data import Demonstration, Example, load_demonstrations
from ..scoring import token_logprobs_of
from ..training import Run, start_run
from . import references, rounds
from .ppo import assign_advantages, policy_micro_loss
from .rounds import Group, groups_of, samples_in

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ the reward


def _token_logprobs(model, pad_id: int, examples: list[Example], samples) -> list[tuple[list[float] | None, list[list[float]]]]:
    """Per prompt: per-token log-probs of its demonstration (None for an unlabelled prompt)
    and of its samples, each prompt computed once for all of them."""
    out = [None] * len(examples)
    for labelled in (True, False):  # a batch's groups must be the same size
        idx = [i for i, e in enumerate(examples) if bool(e.completion_ids) == labelled]
        if not idx:
            continue
        groups = [([examples[i].completion_ids] if labelled else []) + [s.token_ids for s in samples[i]] for i in idx]
        for i, scores in zip(idx, token_logprobs_of(model, pad_id, [examples[i].prompt_ids for i in idx], groups)):
            out[i] = (scores[0], scores[1:]) if labelled else (None, scores)
    return out


def reference_scores(run: Run, pi_sft, base, reward: references.ImplicitReward):
    """``annotate`` for :func:`rounds.sample_round`: per-token log pi_SFT (``ref_token_logprobs``,
    also pi_ref of the KL) and log pi_base (``base_token_logprobs``) of each sample, and r of
    the demonstration (``pi_sft`` from :func:`references.starting_policy`)."""
    pad = run.tokenizer.pad_token_id

    def annotate(examples: list[Example], samples) -> list[dict]:
        with run.accelerator.autocast():  # the precision the policy samples and trains in
            with pi_sft() as sft:
                by_sft = _token_logprobs(sft, pad, examples, samples)
            by_base = _token_logprobs(base, pad, examples, samples)
        return [{"ref_token_logprobs": s_samples, "base_token_logprobs": b_samples,
                 "demonstration_reward": None if s_demo is None else reward(e.completion_ids, s_demo, b_demo, True)}
                for e, (s_demo, s_samples), (b_demo, b_samples) in zip(examples, by_sft, by_base)]

    return annotate


def round_rewards(rows: list[dict], reward: references.ImplicitReward) -> list[float]:
    """r of every sample of a round, prompt-major (a prompt's n together)."""
    return [reward(s["token_ids"], sft, base, s["finished"]) for row in rows
            for s, sft, base in zip(row["samples"], row["ref_token_logprobs"], row["base_token_logprobs"])]


# ----------------------------------------------------------------------- metrics


def ranking_stats(groups: list[Group], rows: list[dict], rewards: list[float], n: int) -> dict:
    """r ranking each demonstration over its prompt's samples (labelled prompts only)."""
    wins = losses = ties = 0
    margins = []
    for i, (g, row) in enumerate(zip(groups, rows)):
        demo = row["demonstration_reward"]
        if demo is None:
            continue
        for s, r in zip(g.samples, rewards[i * n: (i + 1) * n]):
            margins.append(demo - r)
            if s.token_ids == g.example.completion_ids or demo == r:
                ties += 1
            elif demo > r:
                wins += 1
            else:
                losses += 1
    demos = [row["demonstration_reward"] for row in rows if row["demonstration_reward"] is not None]
    return {"demonstration_reward": sum(demos) / len(demos) if demos else None,
            "reward_heldout_accuracy": wins / (wins + losses) if wins + losses else None,
            "reward_heldout_ties": ties, "reward_heldout_margin": sum(margins) / len(margins) if margins else None}


def template_stats(rows: list[dict], template_ids: set[int]) -> dict:
    """Of the finished samples' per-token |log pi_SFT - log pi_base|: the share on chat-template
    tokens (end of turn, special tokens), beside their share of the tokens."""
    mass = on_template = 0.0
    tokens = template_tokens = 0
    for row in rows:
        for s, sft, base in zip(row["samples"], row["ref_token_logprobs"], row["base_token_logprobs"]):
            if not s["finished"]:
                continue
            for t, a, b in zip(s["token_ids"], sft, base):
                mass += abs(a - b)
                tokens += 1
                if t in template_ids:
                    on_template += abs(a - b)
                    template_tokens += 1
    return {"reward_template_share": on_template / mass if mass else None,
            "template_token_share": template_tokens / tokens if tokens else None}


# ---------------------------------------------------------------------- the loop


def with_prompts(run: Run, cfg: SRPPOConfig) -> tuple[list[Example], list[Demonstration]]:
    """The run's examples and demonstrations, followed by ``--prompts`` (unlabelled: their
    completions, if any, are dropped)."""
    if not cfg.prompts:
        return run.examples, run.demos
    extra = [dataclasses.replace(d, completion=None)
             for d in load_demonstrations(cfg.prompts, cfg.skip_invalid, require_completion=False)]
    encoded = run.chat.encode(extra, cfg.max_prompt_length, cfg.max_length, skip_invalid=cfg.skip_invalid)
    offset = len(run.demos)
    return run.examples + [dataclasses.replace(e, index=e.index + offset) for e in encoded], run.demos + extra


def train(cfg: SRPPOConfig, model=None, tokenizer=None, data=None) -> Path:
    if model is not None and not cfg.base_model:
        raise SftjuiceError("--base-model is needed when the policy is given as a loaded model")
    cfg = dataclasses.replace(cfg, base_model=references.base_model_of(cfg))  # the manifest names the base it used
    run = start_run(cfg, model, tokenizer, data)
    examples, demos = with_prompts(run, cfg)
    n = cfg.num_samples
    plan = rounds.plan(len(examples), cfg.rounds, cfg.epochs, cfg.seed)
    per_pass = [rounds.steps_per_pass(run, len(rnd.section)) for rnd in plan]
    policy = run.learner(run.policy_model, cfg.learning_rate, sum(per_pass) * cfg.policy_steps)
    pi_sft = references.starting_policy(run)  # pi_SFT = pi_ref
    base = references.load_base(run, cfg.base_model)
    state = run.resume()
    reward = references.implicit_reward(run, cfg)
    annotate = reference_scores(run, pi_sft, base, reward)
    policy_loss = policy_micro_loss(policy, cfg.clip_range)
    round_steps = [steps * cfg.policy_steps for steps in per_pass]
    for ctx in rounds.each_round(run, plan, round_steps, state):
        r, t0 = ctx.index, time.time()
        rows = rounds.sample_round(run, r, ctx.round.section, cfg.seed, ctx.pi_t, data=(examples, demos), annotate=annotate)
        groups = groups_of(rows, examples)
        rewards = round_rewards(rows, reward)
        t1 = time.time()

        # K passes of PPO-clip on RLOO advantages of r - kl_coef * KL(pi_t || pi_SFT)
        kl, advantage_stats = assign_advantages(groups, rewards, cfg.kl_coef, n)
        rounds.train_steps(ctx, policy, groups, rounds.passes(run, len(groups), r, cfg.policy_steps), policy_loss, samples_in,
                           phase="policy", extra=advantage_stats)
        samples = [s for g in groups for s in g.samples]
        finished = [x for x, s in zip(rewards, samples) if s.finished]
        run.log_metrics({
            "step": ctx.step, "event": "round", "round": r, **rounds.sample_stats(rows),
            "sample_reward": sum(rewards) / len(rewards),
            "finished_reward_mean": sum(finished) / len(finished) if finished else None,
            **ranking_stats(groups, rows, rewards, n), "kl": kl.mean().item(), **template_stats(rows, references.template_ids(run)),
            "generation_seconds": round(t1 - t0, 2), "policy_seconds": round(time.time() - t1, 2),
        })
        ctx.checkpoint()
    return run.finish()
