"""IRFT: implicit reward-learning fine-tuning (Algorithm 2); SPIN is a setting of it.

The policy is its own reward model, ``r(x, y) = beta * log(pi_theta(y|x) / pi_t(y|x))``
with ``pi_t`` the policy frozen at the start of round t. Each epoch of the
demonstrations is split into T sections; round t

  1. samples responses y_hat ~ pi_t for the prompts of section t, keeping their
     log-probs (the sampler's, so no reference model is needed) and computing
     log pi_t(y^E|x) of the demonstrations in one forward pass;
  2. makes K passes over the (demonstration, sample) pairs minimising
     ``l(beta*[log pi/pi_t](y^E) - beta*[log pi/pi_t](y_hat))``.

SPIN is one round over the whole data per iteration: ``--rounds 1 --epochs N``.
Every round's samples land in ``OUTPUT/rounds/<t>/generations.jsonl`` before its
training starts, so a resumed run never samples a finished round again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SftjuiceError, TrainConfig
from ..data import Example, epoch_order, global_batches, load_demonstrations
from ..generation import sample
from ..losses import irl_pair_loss
from ..storage import read_jsonl, write_jsonl
from ..training import Run, pair_logprobs, sequence_logprobs, shared_prompt_logprobs, start_run


@dataclass
class Pair:
    example: Example  # prompt and demonstration tokens
    sample_ids: list[int]
    ref_chosen: float  # log pi_t(y^E | x)
    ref_rejected: float  # log pi_t(y_hat | x)

    def __len__(self) -> int:  # the padded width this pair needs in a batch
        return len(self.example.prompt_ids) + max(len(self.example.completion_ids), len(self.sample_ids))


def round_sections(n: int, rounds: int, seed: int, epoch: int) -> list[list[int]]:
    """Split one shuffled epoch into ``rounds`` near-equal sections."""
    order = epoch_order(n, seed, epoch)
    return [order[t * n // rounds: (t + 1) * n // rounds] for t in range(rounds)]


def generate_round(run: Run, r: int, section: list[int], data: tuple[list[Example], list] | None = None,
                   name: str = "generations") -> list[dict]:
    """Sample for the prompts ``section`` (indices into ``data`` = (examples, demonstrations),
    by default the training data) with the frozen pi_t, or reload what round ``r`` sampled."""
    cfg, path = run.cfg, run.output / "rounds" / str(r) / f"{name}.jsonl"
    if path.exists():
        return read_jsonl(path)
    examples, demos = data or (run.examples, run.demos)
    pad = run.tokenizer.pad_token_id
    seed = ((cfg.seed * 1_000_003 + r) * 101 + run.accelerator.process_index) * 2 + (name != "generations")

    def work(indices: list[int]) -> list[dict]:
        chosen = [examples[i] for i in indices]
        prompts = [e.prompt_ids for e in chosen]
        samples = sample(run.policy, prompts, cfg, run.chat.stop_token_ids, pad, seed=seed, bf16=cfg.bf16,
                         progress=run.is_main)
        ref_chosen = sequence_logprobs(run.policy, pad, prompts, [e.completion_ids for e in chosen])
        return [
            {"example": i, "prompt": demos[e.index].prompt, "demonstration": demos[e.index].completion,
             "demonstration_logprob": ref,
             "samples": [{"completion": run.chat.decode(s.token_ids), "token_ids": s.token_ids,
                          "logprob": s.logprob, "finished": s.finished} for s in ss]}
            for i, e, ss, ref in zip(indices, chosen, samples, ref_chosen)
        ]

    rows = run.map_sharded(section, work)
    if run.is_main:
        write_jsonl(path, rows)
    run.accelerator.wait_for_everyone()
    return rows


def pairs_of(run: Run, rows: list[dict], examples: list[Example] | None = None) -> list[Pair]:
    examples = run.examples if examples is None else examples
    return [Pair(examples[row["example"]], s["token_ids"], row["demonstration_logprob"], s["logprob"])
            for row in rows for s in row["samples"]]


def policy_logprobs(run: Run, pairs: list[Pair]) -> list[tuple[float, float]]:
    """``(log pi(y^E|x), log pi(y_hat|x))`` of each pair under the current policy, each prompt
    computed once, the pairs split over processes."""
    def work(ps: list[Pair]) -> list[tuple[float, float]]:
        chosen, rejected = pair_logprobs(run.policy, run.tokenizer.pad_token_id, [p.example.prompt_ids for p in ps],
                                         [p.example.completion_ids for p in ps], [p.sample_ids for p in ps])
        return list(zip(chosen, rejected))

    return run.map_sharded(pairs, work)


def heldout_margins(run: Run, pairs: list[Pair]) -> dict[str, float]:
    """The implicit reward's margin on held-out (demonstration, fresh sample) pairs that no
    step trained on: does what the policy learned to separate generalise?"""
    beta = run.cfg.beta
    margins = [beta * ((c - p.ref_chosen) - (r - p.ref_rejected)) for p, (c, r) in zip(pairs, policy_logprobs(run, pairs))]
    return {"heldout_margin": sum(margins) / len(margins),
            "heldout_margin_positive": sum(m > 0 for m in margins) / len(margins)}


def rescore(run: Run, pairs: list[Pair]) -> list[Pair]:
    """Reference log-probs of older pairs under the current pi_t."""
    return [Pair(p.example, p.sample_ids, c, r) for p, (c, r) in zip(pairs, policy_logprobs(run, pairs))]


def irft_micro_loss(run: Run):
    cfg = run.cfg

    def micro_loss(pairs: list[Pair]):
        # a demonstration and a sample share their prompt: it is computed once for both
        batch = run.collate_shared([p.example.prompt_ids for p in pairs],
                                   [ids for p in pairs for ids in (p.example.completion_ids, p.sample_ids)])
        logps = shared_prompt_logprobs(run.model, batch).sum(-1).view(-1, 2)
        policy_chosen, policy_rejected = logps[:, 0], logps[:, 1]
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], device=logps.device)
        loss, r_chosen, r_rejected = irl_pair_loss(policy_chosen, ref[:, 0], policy_rejected, ref[:, 1], cfg.beta, cfg.loss)
        if cfg.sft_weight:  # keep pushing demonstrations up as SFT does (RPO-style regulariser)
            lengths = torch.tensor([len(p.example.completion_ids) for p in pairs], device=logps.device)
            loss = loss - cfg.sft_weight * policy_chosen / lengths
        margin = r_chosen - r_rejected
        return loss.sum(), {
            "loss": loss.sum(), "reward_chosen": r_chosen.sum(), "reward_rejected": r_rejected.sum(),
            "margin": margin.sum(), "margin_positive": (margin > 0).float().sum(),
            "logp_chosen": policy_chosen.detach().sum(), "logp_rejected": policy_rejected.detach().sum(),
        }

    return micro_loss


def count(pairs: list) -> int:
    return len(pairs)


def plan_rounds(run: Run) -> list[dict]:
    """Every round's section and number of optimiser steps, fixed before training starts
    (the learning-rate schedule needs the total)."""
    cfg = run.cfg
    n_rounds = max(1, round(cfg.epochs * cfg.rounds))
    plan = []
    for r in range(n_rounds):
        epoch, t = divmod(r, cfg.rounds)
        section = round_sections(len(run.examples), cfg.rounds, cfg.seed, epoch)[t]
        n_pairs = len(section) * cfg.num_samples + (plan[-1]["new_pairs"] if cfg.keep_previous_round and plan else 0)
        per_pass = len(global_batches(n_pairs, run.global_batch_size, 0, 0, min_size=run.world))
        plan.append({"section": section, "new_pairs": len(section) * cfg.num_samples, "steps": per_pass * cfg.passes})
    return plan


def train(cfg: TrainConfig) -> Path:
    if cfg.rounds < 1 or cfg.passes < 1:
        raise SftjuiceError("--rounds and --passes must be >= 1")
    run = start_run(cfg)
    plan = plan_rounds(run)
    run.setup_optimizer(sum(p["steps"] for p in plan))
    state = run.resume() or {"step": 0}
    micro_loss = irft_micro_loss(run)
    heldout = load_heldout(run)
    bar = run.progress(sum(p["steps"] for p in plan), state["step"])
    step, previous = 0, []
    for r, rnd in enumerate(plan):
        if step + rnd["steps"] <= state["step"]:  # finished before a resume
            step += rnd["steps"]
            continue
        t0 = time.time()
        rows = generate_round(run, r, rnd["section"])
        pairs = pairs_of(run, rows)
        if heldout:
            rows_heldout = generate_round(run, r, list(range(len(heldout[0]))), heldout, "heldout")
            heldout_pairs = pairs_of(run, rows_heldout, heldout[0])
        if cfg.keep_previous_round and r > 0:
            if not previous:  # resumed: the previous round's samples are on disk
                previous = pairs_of(run, read_jsonl(run.output / "rounds" / str(r - 1) / "generations.jsonl"))
            pairs = pairs + rescore(run, previous)
        t1 = time.time()
        for k in range(cfg.passes):
            for batch in global_batches(len(pairs), run.global_batch_size, cfg.seed, r * 1000 + k, min_size=run.world):
                step += 1
                if step <= state["step"]:
                    continue
                stats = run.optimizer_step([pairs[i] for i in batch], micro_loss, count, length=len)
                if step % cfg.log_every == 0:
                    run.log_metrics({"step": step, "round": r, "pass": k, **stats})
                bar.update(1)
                bar.set_postfix(round=r, loss=f"{stats['loss']:.4f}", margin=f"{stats['margin']:.3f}")
                if cfg.save_every and step % cfg.save_every == 0 and step != step_end(plan, r):
                    run.save_checkpoint({"step": step, "round": r})
        samples = [s for row in rows for s in row["samples"]]
        run.log_metrics({
            "step": step, "event": "round", "round": r, "pairs": len(pairs),
            **(heldout_margins(run, heldout_pairs) if heldout else {}),
            "sample_length_mean": sum(len(s["token_ids"]) for s in samples) / len(samples),
            "sample_cut_fraction": sum(not s["finished"] for s in samples) / len(samples),
            "generation_seconds": round(t1 - t0, 2), "train_seconds": round(time.time() - t1, 2),
        })
        run.save_checkpoint({"step": step, "round": r + 1})
        previous = pairs_of(run, rows)
    bar.close()
    return run.finish()


def load_heldout(run: Run) -> tuple[list[Example], list] | None:
    """The ``--eval-data`` demonstrations (at most ``--eval-size``), tokenised like the training data."""
    cfg = run.cfg
    if not cfg.eval_data:
        return None
    demos = load_demonstrations(cfg.eval_data, skip_invalid=cfg.skip_invalid)[: cfg.eval_size]
    return run.chat.encode(demos, cfg.max_prompt_length, cfg.max_length, skip_invalid=cfg.skip_invalid), demos


def step_end(plan: list[dict], r: int) -> int:
    return sum(p["steps"] for p in plan[: r + 1])


def train_spin(cfg: TrainConfig) -> Path:
    """SPIN (Chen et al. 2024): IRFT with one generation round over the whole data per iteration."""
    cfg.rounds, cfg.epochs = 1, float(cfg.iterations)
    return train(cfg)
