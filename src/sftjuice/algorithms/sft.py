"""SFT: minimise -E_D log pi_theta(y^E | x), the baseline every method is compared to."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from ..config import SFTConfig
from ..data import Example, global_batches
from ..losses import sft_loss
from ..scoring import completion_logprobs
from ..training import Learner, Run, start_run, steps_for


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
    """``on_epoch_end(epoch, run)`` (epochs count from 1) runs at the end of each epoch, before
    that epoch's checkpoint, so a resumed run calls it again for an epoch it had not saved;
    returning True ends training there (early stopping on a validation split)."""
    run = start_run(cfg, model, tokenizer, data)
    examples = run.examples
    per_epoch, total = steps_for(len(examples), run.prompts_per_step, cfg.epochs)
    policy = run.learner(run.policy_model, cfg.learning_rate, total)
    state = run.resume()
    micro_loss = sft_micro_loss(policy)
    bar = run.progress(total, state["step"])
    for step in range(state["step"], total):
        epoch, i = divmod(step, per_epoch)
        batches = global_batches(len(examples), run.prompts_per_step, cfg.seed, epoch, min_size=run.world)
        if i >= len(batches):  # a tail batch too small to split over the processes
            continue
        t0 = time.time()
        stats = policy.step([examples[j] for j in batches[i]], micro_loss, completion_tokens, length=len)
        tokens = completion_tokens([examples[j] for j in batches[i]])
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            run.log_metrics({"step": step + 1, "epoch": round((step + 1) / per_epoch, 4), **stats,
                             "completion_tokens": tokens, "step_seconds": round(time.time() - t0, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        end_of_epoch = (step + 1) % per_epoch == 0 or step + 1 == total
        stop = bool(end_of_epoch and on_epoch_end and on_epoch_end(math.ceil((step + 1) / per_epoch), run))
        if run.after_step(step + 1, stats) or end_of_epoch:
            run.save_checkpoint({"step": step + 1})
        if stop:
            break
    bar.close()
    return run.finish()
