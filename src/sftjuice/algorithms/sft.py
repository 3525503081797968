"""SFT: minimise -E_D log pi_theta(y^E | x), the baseline every method is compared to.

With ``--eval-data``, SFT stops early: after each epoch the policy is judged on the
held-out demonstrations (greedy accuracy by ``--verifier``, else the reference answers'
per-token NLL, which also breaks ties in accuracy), the best epoch's model is kept in
``OUTPUT/best``, training ends after ``--patience`` epochs without a better one, and
``OUTPUT/final`` is the best epoch's model.
Each judgement is a metrics.jsonl ``event`` "validation" and part of every checkpoint, so a
resumed run chooses what an uninterrupted one does."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Callable

import torch

from ..config import SFTConfig
from ..data import Demonstration, Example, global_batches, load_demonstrations
from ..losses import sft_loss
from ..models import save_model
from ..scoring import completion_logprobs
from ..storage import atomic_write_text
from ..training import Learner, Run, start_run, steps_for
from . import rounds

log = logging.getLogger(__name__)

SELECTED = "sftjuice_selected.json"  # in OUTPUT/best and OUTPUT/final: the validation record of the epoch kept


def sft_micro_loss(learner: Learner):
    """Summed NLL of a micro-batch's completion tokens (normalised by the step)."""

    def micro_loss(items: list[Example]):
        batch = learner.collate([e.prompt_ids for e in items], [e.completion_ids for e in items])
        nll = sft_loss(completion_logprobs(learner.model, batch), batch["completion_mask"])
        return nll, {"loss": nll}

    return micro_loss


def completion_tokens(items: list[Example]) -> int:
    return sum(len(e.completion_ids) for e in items)


# ------------------------------------------------------------ early stopping


def judge(run: Run, demos: list[Demonstration]) -> dict:
    """The policy on the held-out demonstrations, each process judging its share: the reference
    answers' mean per-token NLL, and with ``--verifier`` the share of greedy answers it accepts."""
    from ..evaluation import held_out_scores
    from ..verifiers import load_verifier

    cfg, model = run.cfg, run.policy
    verify = load_verifier(cfg.verifier) if cfg.verifier else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        results = run.map_sharded(demos, lambda share: held_out_scores(model, run.chat, share, verify, cfg.max_new_tokens, run.bf16))
    model.train(was_training)
    record = {"nll": statistics.fmean(nll for nll, _ in results)}
    if verify is not None:
        record["accuracy"] = sum(ok for _, ok in results) / len(results)
    return record


def best_of(curve: list[dict]) -> dict:
    """The epoch to keep: the highest accuracy, equal accuracies (a few held-out answers move
    it in steps) going to the lower NLL; without a verifier the lowest NLL. A full tie keeps
    the earlier epoch."""
    return max(curve, key=lambda e: (e.get("accuracy", 0.0), -e["nll"], -e["epoch"]))


def patience_spent(curve: list[dict], patience: int) -> bool:
    return bool(curve) and curve[-1]["epoch"] - best_of(curve)["epoch"] >= patience


def validate(run: Run, demos: list[Demonstration], curve: list[dict], epoch: int, step: int) -> bool:
    """Judge the epoch just trained, append it to ``curve``, keep its model in OUTPUT/best if
    it is the best so far; True when patience is spent."""
    record = {"epoch": epoch, "step": step, **judge(run, demos)}
    curve.append(record)
    run.log_metrics({"step": step, "event": "validation", **record})
    best = best_of(curve)
    if best is record and run.is_main:
        # never merged here: merge_and_unload would take the adapter out of the model in training
        # (Run.finish merges the kept adapter)
        save_model(run.policy, run.tokenizer, run.output / "best")
        atomic_write_text(run.output / "best" / SELECTED, json.dumps(record, indent=1))
    run.accelerator.wait_for_everyone()
    log.info("validation, epoch %d: %s; best epoch %d", epoch,
             ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k in ("accuracy", "nll")), best["epoch"])
    return patience_spent(curve, run.cfg.patience)


# ------------------------------------------------------------------ training


def train(cfg: SFTConfig, model=None, tokenizer=None, data=None,
          on_epoch_end: Callable[[int, "Run"], bool] | None = None) -> Path:
    """Each epoch is a round of the shared step loop (nothing sampled). ``on_epoch_end(epoch,
    run)`` (epochs count from 1) runs at the end of each epoch, before that epoch's
    checkpoint, so a resumed run calls it again for an epoch it had not saved; returning
    True ends training there (a caller's own early stopping)."""
    run = start_run(cfg, model, tokenizer, data)
    examples = run.examples
    per_epoch, total = steps_for(len(examples), run.prompts_per_step, cfg.epochs)
    policy = run.learner(run.policy_model, cfg.learning_rate, total)
    state = run.resume()
    micro_loss = sft_micro_loss(policy)
    heldout = load_demonstrations(cfg.eval_data, skip_invalid=cfg.skip_invalid)[: cfg.eval_size] if cfg.eval_data else None
    curve = run.carried["validation"] = list(state.get("validation", []))
    epochs = math.ceil(total / per_epoch)  # the last may be part of one
    plan = [rounds.Round(e, e, []) for e in range(epochs)]
    round_steps = [min(per_epoch, total - e * per_epoch) for e in range(epochs)]
    # a run stopped early and killed before final/ must not train on when resumed
    todo = [] if patience_spent(curve, cfg.patience) else plan
    for ctx in rounds.each_round(run, todo, round_steps, state, sampled=False):
        # a tail batch too small to split over the processes is dropped: its step only moves the schedule
        batches = global_batches(len(examples), run.prompts_per_step, cfg.seed, ctx.index, min_size=run.world)
        rounds.train_steps(ctx, policy, examples, [(0, b) for b in batches[: ctx.end - ctx.start]], micro_loss,
                           completion_tokens, extra=lambda b: {"completion_tokens": completion_tokens([examples[j] for j in b])},
                           until=ctx.end)
        stop = bool(on_epoch_end and on_epoch_end(ctx.index + 1, run))
        if heldout:
            stop = validate(run, heldout, curve, ctx.index + 1, ctx.end) or stop
        ctx.checkpoint()
        if stop:
            break
    if not heldout:
        return run.finish()
    final = run.finish(keep=run.output / "best")
    chosen = best_of(curve)
    log.info("kept epoch %d of %d (%s): %s", chosen["epoch"], curve[-1]["epoch"],
             "the most accurate" if "accuracy" in chosen else "the lowest validation NLL", final)
    return final
