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
     reward ``r_phi(x, y) - beta * sum_t log(pi_t(y_t) / pi_ref(y_t))`` (a per-token
     KL penalty folded into the sequence reward).

Batches hold whole prompts (a :class:`Group`: prompt, demonstration, n samples), so every
pass computes a prompt once for all of its completions.

Why RLOO and a loop of our own, not TRL's PPO/RLOO trainers: those trainers own the whole
loop (their own generation, reward calls, logging, checkpoints), which leaves no place
for a reward step between sampling and the policy update, nor for rounds written to disk
atomically. RLOO's leave-one-out baseline needs no value model, so two networks train
(policy, reward) instead of three, which matters on a CPU; its conventions (k1 KL summed
into the reward, a sequence-level clipped ratio) are TRL's RLOOTrainer's.

pi_ref is the starting model: with LoRA the policy with its adapter switched off,
otherwise a frozen copy. Samples land in ``OUTPUT/rounds/<t>/generations.jsonl`` before
the round trains; a checkpoint (both models, both optimisers) closes every round, and
``--save-every`` adds some inside the policy passes. The reward model ends in
``OUTPUT/reward_model/``, an HF sequence-classification directory.

metrics.jsonl: every step has ``phase`` "reward" (loss, accuracy, margin) or "policy"
(loss, clip_fraction, log_ratio, advantage_mean/std); per round, an ``event`` "reward"
(``reward_heldout_*``: r_t on the fresh pairs before its step; ``policy_reward``: r_t's
mean on pi_t's samples; ``reward_*``: after the step) and an ``event`` "round"
(``sample_reward`` under the updated r, ``kl`` = KL(pi_t || pi_ref), sample lengths).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RewardScoreConfig, SftjuiceError, TrainConfig, require
from ..data import ChatFormat, Example, collate, global_batches, load_demonstrations
from ..generation import sample
from ..losses import kl_penalty, ppo_clip_loss, reward_pair_loss, rloo_advantages
from ..models import (is_peft, load_policy, load_reward_model, load_tokenizer, resolve_model, reward_pad_id,
                      save_reward_model)
from ..storage import read_jsonl, write_jsonl
from ..training import Run, grouped_token_logprobs, shared_prompt_logprobs, start_run
from .irft import round_sections

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    token_ids: list[int]  # y_hat ~ pi_t
    logprobs: list[float]  # log pi_t(y_t | x, y_<t), the sampler's
    ref_logprobs: list[float]  # log pi_ref(y_t | x, y_<t)
    advantage: float = 0.0


@dataclass
class Group:
    """A prompt with its demonstration and its n samples: the unit of every batch, so each
    prompt is computed once for all of its completions."""
    example: Example
    samples: list[Rollout]

    @property
    def completions(self) -> list[list[int]]:  # the demonstration first
        return [self.example.completion_ids] + [x.token_ids for x in self.samples]

    def __len__(self) -> int:  # the padded width of its batch rows
        return len(self.example.prompt_ids) + max(map(len, self.completions))


def samples_in(groups: list[Group]) -> int:
    """What RFT's losses are normalised by: (demonstration, sample) pairs, i.e. samples."""
    return sum(len(g.samples) for g in groups)


def prompts_per_micro_batch(cfg: TrainConfig) -> int:
    """Batches hold whole prompts: ``per_device_batch_size`` counts samples, rounded down to
    whole prompts of ``num_samples`` each (at least one)."""
    return max(1, cfg.per_device_batch_size // cfg.num_samples)


def prompts_per_step(run: Run) -> int:
    return prompts_per_micro_batch(run.cfg) * run.cfg.gradient_accumulation_steps * run.world


# ------------------------------------------------------------------ the two scorers


def load_reference(run: Run):
    """pi_ref: None with LoRA (the policy with its adapter disabled is the starting model),
    otherwise a frozen copy of the starting model. Never prepared, so never checkpointed."""
    if is_peft(run.policy):
        return None
    ref = load_policy(run.cfg, resolve_model(run.cfg.model), trainable=False)
    return ref.to(run.accelerator.device).eval().requires_grad_(False)


def reference_logprobs(run: Run, ref, prompts: list[list[int]], groups: list[list[list[int]]]) -> list[list[list[float]]]:
    """Per-token log pi_ref of each prompt's completions."""
    adapter_off = run.policy.disable_adapter() if ref is None else contextlib.nullcontext()
    with adapter_off, run.accelerator.autocast():  # the precision the policy samples and trains in
        return grouped_token_logprobs(run.policy if ref is None else ref, run.tokenizer.pad_token_id, prompts, groups)


def reward_forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``r_phi(x, y)`` per row of a :func:`data.collate` batch (prompt + completion tokens)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return out.logits.squeeze(-1).float()


def shared_prompt_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``r_phi`` of the ``k`` completions per prompt of a :func:`data.collate_shared` batch,
    computing each prompt once (its keys and values cached and repeated, as
    :func:`training.shared_prompt_logprobs` does for the policy). The completions are the
    second call's whole input, so HF's head reads each at its last non-padding token."""
    prompt_mask = batch["prompt_mask"]
    k = batch["completion_ids"].shape[0] // prompt_mask.shape[0]
    C = batch["completion_ids"].shape[1]
    cache = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=batch["prompt_positions"],
                  use_cache=True).past_key_values
    cache.batch_repeat_interleave(k)
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), batch["completion_mask"].long()], dim=1)
    start = batch["prompt_positions"][:, -1:].repeat_interleave(k, dim=0) + 1
    out = model(input_ids=batch["completion_ids"], attention_mask=mask, position_ids=start + torch.arange(C, device=start.device),
                past_key_values=cache, use_cache=True)
    return out.logits.squeeze(-1).float()


@torch.no_grad()
def reward_scores(model, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 16) -> list[float]:
    """``r_phi(x, y)`` for many pairs. The head reads the last token that is not padding (HF's
    rule), so these are the scores the saved directory gives under AutoModelForSequenceClassification."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i: i + batch_size], completions[i: i + batch_size], model.config.pad_token_id)
        out += reward_forward(model, {k: v.to(device) for k, v in batch.items()}).tolist()
    model.train(was_training)
    return out


def setup_reward(run: Run, total_steps: int) -> Run:
    """r_phi with its own optimiser and schedule, as a view of the run sharing everything
    else (accelerator, data, batch sizes), so ``Run.optimizer_step`` trains it with the same
    exact global normalisation and ``save_state`` checkpoints it beside the policy."""
    cfg = run.cfg
    name = cfg.reward_model or cfg.model
    path = resolve_model(name) if run.is_main else None
    run.accelerator.wait_for_everyone()
    path = path or resolve_model(name)
    if cfg.reward_model and (path / "tokenizer_config.json").exists():
        if load_tokenizer(path).get_vocab() != run.tokenizer.get_vocab():
            raise SftjuiceError(f"{path}: the reward model's tokenizer differs from the policy's; it must read the same tokens")
    pad = reward_pad_id(run.tokenizer, run.chat.stop_token_ids)
    model = load_reward_model(path, pad_token_id=pad)
    reward = dataclasses.replace(run, model=model, pad_id=pad,
                                 cfg=dataclasses.replace(cfg, learning_rate=cfg.reward_learning_rate))
    reward.setup_optimizer(total_steps)  # prepared after the policy: state files model_1, optimizer_1
    return reward


@torch.no_grad()
def group_rewards(reward: Run, groups: list[Group], batch_size: int = 16) -> list[list[float]]:
    """r_phi of each group's completions (demonstration first), each prompt computed once."""
    model = reward.accelerator.unwrap_model(reward.model)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(groups), batch_size):
        gs = groups[i: i + batch_size]
        batch = reward.collate_shared([g.example.prompt_ids for g in gs], [c for g in gs for c in g.completions])
        out += shared_prompt_rewards(model, batch).view(len(gs), -1).tolist()
    model.train(was_training)
    return out


def score_round(run: Run, reward: Run, groups: list[Group]) -> tuple[list[float], list[float]]:
    """r_phi of each prompt's demonstration, and of each sample (flat, a prompt's n together)."""
    scores = run.map_sharded(groups, lambda gs: group_rewards(reward, gs))
    return [s[0] for s in scores], [x for s in scores for x in s[1:]]


def pair_stats(prefix: str, demo: list[float], own: list[float], n: int) -> dict[str, float]:
    margins = [demo[i // n] - s for i, s in enumerate(own)]
    return {f"{prefix}_accuracy": sum(m > 0 for m in margins) / len(margins), f"{prefix}_margin": sum(margins) / len(margins)}


# ------------------------------------------------------------------------- a round


def generate_round(run: Run, ref, r: int, section: list[int]) -> list[dict]:
    """Sample for a section's prompts with pi_t, or reload what round ``r`` already sampled."""
    cfg, path = run.cfg, run.output / "rounds" / str(r) / "generations.jsonl"
    if path.exists():
        return read_jsonl(path)
    seed = (cfg.seed * 1_000_003 + r) * 101 + run.accelerator.process_index

    def work(indices: list[int]) -> list[dict]:
        examples = [run.examples[i] for i in indices]
        samples = sample(run.policy, [e.prompt_ids for e in examples], cfg, run.chat.stop_token_ids,
                         run.tokenizer.pad_token_id, seed=seed, bf16=cfg.bf16, progress=run.is_main)
        refs = reference_logprobs(run, ref, [e.prompt_ids for e in examples], [[s.token_ids for s in ss] for ss in samples])
        return [
            {"example": i, "prompt": run.demos[e.index].prompt, "demonstration": run.demos[e.index].completion,
             "samples": [{"completion": run.chat.decode(s.token_ids), "token_ids": s.token_ids, "finished": s.finished,
                          "token_logprobs": s.logprobs, "ref_token_logprobs": r} for s, r in zip(ss, rr)]}
            for i, e, ss, rr in zip(indices, examples, samples, refs)
        ]

    rows = run.map_sharded(section, work)
    if run.is_main:
        write_jsonl(path, rows)
    run.accelerator.wait_for_everyone()
    return rows


def groups_of(run: Run, rows: list[dict]) -> list[Group]:
    return [Group(run.examples[row["example"]],
                  [Rollout(s["token_ids"], s["token_logprobs"], s["ref_token_logprobs"]) for s in row["samples"]])
            for row in rows]


def rollout_advantages(rollouts: list[Rollout], rewards: list[float], beta: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, kl)`` per rollout: RLOO over each prompt's n samples of the learned
    reward minus ``beta`` times the summed per-token KL of pi_t (the sampler) to pi_ref."""
    pad = torch.nn.utils.rnn.pad_sequence
    logps = pad([torch.tensor(x.logprobs) for x in rollouts], batch_first=True)
    ref = pad([torch.tensor(x.ref_logprobs) for x in rollouts], batch_first=True)
    mask = pad([torch.ones(len(x.logprobs)) for x in rollouts], batch_first=True)
    kl = kl_penalty(logps, ref, mask)
    advantages = rloo_advantages((torch.tensor(rewards) - beta * kl).view(-1, n)).flatten()
    return advantages, kl


def reward_micro_loss(reward: Run):
    cfg = reward.cfg

    def micro_loss(items: list[Group]):
        # a prompt's demonstration and samples share it: it is computed once for all of them
        batch = reward.collate_shared([g.example.prompt_ids for g in items], [c for g in items for c in g.completions])
        scores = shared_prompt_rewards(reward.model, batch).view(len(items), -1)
        rejected = scores[:, 1:].flatten()  # one pair per sample, its prompt's demonstration chosen
        chosen = scores[:, :1].expand(-1, scores.shape[1] - 1).flatten()
        loss = reward_pair_loss(chosen, rejected, cfg.reward_loss, cfg.reward_l2)
        margin = (chosen - rejected).detach()
        return loss.sum(), {"loss": loss.sum(), "accuracy": (margin > 0).float().sum(), "margin": margin.sum(),
                            "reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum()}

    return micro_loss


def policy_micro_loss(run: Run):
    cfg = run.cfg

    def micro_loss(items: list[Group]):
        batch = run.collate_shared([g.example.prompt_ids for g in items], [x.token_ids for g in items for x in g.samples])
        logps = shared_prompt_logprobs(run.model, batch).sum(-1)
        xs = [x for g in items for x in g.samples]
        old = torch.tensor([sum(x.logprobs) for x in xs], device=logps.device)
        advantages = torch.tensor([x.advantage for x in xs], device=logps.device)
        loss, clipped = ppo_clip_loss(logps, old, advantages, cfg.clip_range)
        return loss.sum(), {"loss": loss.sum(), "clip_fraction": clipped.float().sum(),
                            "log_ratio": (logps - old).detach().sum()}

    return micro_loss


def plan_rounds(run: Run) -> list[dict]:
    """Every round's section and optimiser steps (one reward pass, K policy passes), fixed
    before training starts (the learning-rate schedules need their totals)."""
    cfg = run.cfg
    plan = []
    for r in range(max(1, round(cfg.epochs * cfg.rounds))):
        epoch, t = divmod(r, cfg.rounds)
        section = round_sections(len(run.examples), cfg.rounds, cfg.seed, epoch)[t]
        if not section:
            raise SftjuiceError(f"--rounds {cfg.rounds} leaves rounds without prompts ({len(run.examples)} demonstrations)")
        per_pass = len(global_batches(len(section), prompts_per_step(run), 0, 0, min_size=run.world))
        plan.append({"section": section, "reward_steps": per_pass, "policy_steps": per_pass * cfg.policy_steps})
    return plan


def check_options(cfg: TrainConfig) -> None:
    if cfg.rounds < 1 or cfg.policy_steps < 0:
        raise SftjuiceError("--rounds must be >= 1 and --policy-steps >= 0")
    if cfg.num_samples < 2:
        raise SftjuiceError("--method rft needs --num-samples >= 2: each sample's baseline is the mean reward "
                            "of the other samples of its prompt (RLOO)")
    if cfg.reward_loss == "linear" and cfg.reward_l2 <= 0:
        raise SftjuiceError("--reward-loss linear is unbounded below: bound the rewards with --reward-l2 > 0")
    if cfg.temperature != 1.0 or cfg.top_p != 1.0:
        log.warning("--temperature/--top-p change the sampling distribution: the policy gradient and the KL "
                    "estimate assume samples from pi_t itself, so they are biased")


def train(cfg: TrainConfig) -> Path:
    check_options(cfg)
    run = start_run(cfg)
    n, micro = cfg.num_samples, prompts_per_micro_batch(cfg)
    plan = plan_rounds(run)
    run.setup_optimizer(sum(p["policy_steps"] for p in plan))
    reward = setup_reward(run, sum(p["reward_steps"] for p in plan))
    ref = load_reference(run)
    state = run.resume() or {"step": 0}  # "step" counts reward and policy updates
    reward_loss, policy_loss = reward_micro_loss(reward), policy_micro_loss(run)
    bar = run.progress(sum(p["reward_steps"] + p["policy_steps"] for p in plan), state["step"])
    step = 0
    for r, rnd in enumerate(plan):
        start, end = step, step + rnd["reward_steps"] + rnd["policy_steps"]
        if end <= state["step"]:  # finished before a resume
            step = end
            continue
        t0 = time.time()
        rows = generate_round(run, ref, r, rnd["section"])
        groups = groups_of(run, rows)
        t1 = time.time()

        # reward step: demonstrations up, pi_t's samples down (mid-round checkpoints come after it)
        reward_step_due = state["step"] <= start
        if reward_step_due:
            held_out = score_round(run, reward, groups)
            for batch in global_batches(len(groups), prompts_per_step(run), cfg.seed, r * 1000, min_size=run.world):
                step += 1
                stats = reward.optimizer_step([groups[i] for i in batch], reward_loss, samples_in, length=len,
                                              micro_batch_size=micro)
                if step % cfg.log_every == 0:
                    run.log_metrics({"step": step, "round": r, "phase": "reward", **stats})
                bar.update(1)
                bar.set_postfix(round=r, reward_loss=f"{stats['loss']:.4f}", accuracy=f"{stats['accuracy']:.2f}")
        step = start + rnd["reward_steps"]
        demo, own = score_round(run, reward, groups)
        if reward_step_due:
            run.log_metrics({
                "step": step, "event": "reward", "round": r, **pair_stats("reward_heldout", *held_out, n),
                "demonstration_reward": sum(held_out[0]) / len(held_out[0]), "policy_reward": sum(held_out[1]) / len(held_out[1]),
                **pair_stats("reward", demo, own, n),
            })
        t2 = time.time()

        # policy step: K passes of PPO-clip on RLOO advantages of r_phi - beta * KL(pi_t || pi_ref)
        rollouts = [x for g in groups for x in g.samples]
        advantages, kl = rollout_advantages(rollouts, own, cfg.beta, n)
        for x, a in zip(rollouts, advantages.tolist()):
            x.advantage = a
        for k in range(cfg.policy_steps):
            for batch in global_batches(len(groups), prompts_per_step(run), cfg.seed, r * 1000 + 1 + k, min_size=run.world):
                step += 1
                if step <= state["step"]:
                    continue
                stats = run.optimizer_step([groups[i] for i in batch], policy_loss, samples_in, length=len,
                                           micro_batch_size=micro)
                adv = advantages.view(-1, n)[batch]
                if step % cfg.log_every == 0:
                    run.log_metrics({"step": step, "round": r, "phase": "policy", "pass": k, **stats,
                                     "advantage_mean": adv.mean().item(), "advantage_std": adv.std(correction=0).item()})
                bar.update(1)
                bar.set_postfix(round=r, loss=f"{stats['loss']:.4f}", clip=f"{stats['clip_fraction']:.2f}")
                if cfg.save_every and step % cfg.save_every == 0 and step != end:
                    run.save_checkpoint({"step": step, "round": r})
        samples = [s for row in rows for s in row["samples"]]
        run.log_metrics({
            "step": step, "event": "round", "round": r, "samples": len(samples),
            "sample_reward": sum(own) / len(own), "kl": kl.mean().item(),
            "sample_length_mean": sum(len(s["token_ids"]) for s in samples) / len(samples),
            "sample_cut_fraction": sum(not s["finished"] for s in samples) / len(samples),
            "generation_seconds": round(t1 - t0, 2), "reward_seconds": round(t2 - t1, 2),
            "policy_seconds": round(time.time() - t2, 2),
        })
        run.save_checkpoint({"step": step, "round": r + 1})
    bar.close()
    run.accelerator.wait_for_everyone()
    if run.is_main:
        save_reward_model(run.accelerator.unwrap_model(reward.model), run.tokenizer, run.output / "reward_model")
    return run.finish()


def score_file(cfg: RewardScoreConfig) -> Path:
    """``sftjuice reward score``: each prompt/response row of a file, with its learned reward."""
    require(cfg, "reward_model", "data", "output")
    demos = load_demonstrations(cfg.data, cfg.skip_invalid)
    path = resolve_model(cfg.reward_model)
    tokenizer = load_tokenizer(path)
    model = load_reward_model(path)
    chat = ChatFormat(tokenizer)  # the template the reward model was trained with, saved beside it
    examples = chat.encode(demos, cfg.max_prompt_length, cfg.max_length, cfg.skip_invalid)
    scores = reward_scores(model, [e.prompt_ids for e in examples], [e.completion_ids for e in examples], cfg.batch_size)
    rows = [{"prompt": demos[e.index].prompt, "completion": demos[e.index].completion, **demos[e.index].extra, "reward": s}
            for e, s in zip(examples, scores)]
    out = Path(cfg.output)
    write_jsonl(out, rows)
    return out
