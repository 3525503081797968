"""SFT: minimise -E_D log pi_theta(y^E | x), the baseline every method is compared to."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ..config import SFTConfig
from ..data import Example, global_batches
from ..losses import sft_loss
from ..scoring import completion_logprobs
from ..training import Learner, Run, start_run, steps_for
from . import rounds


def sft_micro_loss(learner: Learner):
    """Summed NLL of a micro-batch's completion tokens (normalised by the step)."""

    def micro_loss(items: list[Example]):
        batch = learner.collate([e.prompt_ids for e in items], [e.completion_ids for e in items])
        nll = sft_loss(completion_logprobs(learner.model, batch), batch["completion_mask"])
        return nll, {"loss": nll}

    return micro_loss


def completion_tokens(items: list[Example]) -> int:
    return sum(len(e.completion_ids) for e in items)


def train(cfg: SFTConfig, model=None, tokenizer=None, data=None,
          on_epoch_end: Callable[[int, "Run"], bool] | None = None) -> Path:
    """Each epoch is a round of the shared step loop (nothing sampled). ``on_epoch_end(epoch,
    run)`` (epochs count from 1) runs at the end of each epoch, before that epoch's
    checkpoint, so a resumed run calls it again for an epoch it had not saved; returning
    True ends training there (early stopping on a validation split)."""
    run = start_run(cfg, model, tokenizer, data)
    examples = run.examples
    per_epoch, total = steps_for(len(examples), run.prompts_per_step, cfg.epochs)
    policy = run.learner(run.policy_model, cfg.learning_rate, total)
    state = run.resume()
    micro_loss = sft_micro_loss(policy)
    epochs = math.ceil(total / per_epoch)  # the last may be part of one
    plan = [rounds.Round(e, e, []) for e in range(epochs)]
    round_steps = [min(per_epoch, total - e * per_epoch) for e in range(epochs)]
    for ctx in rounds.each_round(run, plan, round_steps, state, sampled=False):
        # a tail batch too small to split over the processes is dropped: its step only moves the schedule
        batches = global_batches(len(examples), run.prompts_per_step, cfg.seed, ctx.index, min_size=run.world)
        rounds.train_steps(ctx, policy, examples, [(0, b) for b in batches[: ctx.end - ctx.start]], micro_loss,
                           completion_tokens, extra=lambda b: {"completion_tokens": completion_tokens([examples[j] for j in b])},
                           until=ctx.end)
        stop = bool(on_epoch_end and on_epoch_end(ctx.index + 1, run))
        ctx.checkpoint()
        if stop:
            break
    return run.finish()
