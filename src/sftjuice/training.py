"""What every training method shares: the run (accelerator, policy, data, optimiser,
metrics, checkpoints) and the exact-normalisation optimiser step.

Processes split each global batch by rank; gradient accumulation is the number of
micro-batches a process gets. Losses are sums divided by a *global* count (completion
tokens for SFT, pairs for IRFT), so one process and N processes with the same global
batch compute the same update.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import SftjuiceError, TrainConfig, require, save_config
from .data import ChatFormat, Demonstration, Example, load_demonstrations
from .losses import token_logprobs
from .models import load_policy, load_tokenizer, resolve_model, save_model, stop_token_ids
from .storage import MetricsLog

log = logging.getLogger(__name__)


def completion_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs ``[B, C]`` of the completion tokens of a :func:`data.collate`
    batch (0 at padding). Logits are computed for the completion columns only."""
    C = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=C + 1,
        use_cache=False,
    )
    logps = token_logprobs(out.logits[:, :-1], batch["completion_ids"])
    return logps * batch["completion_mask"]


def shared_prompt_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs ``[B*k, C]`` of the completions of a :func:`data.collate_shared`
    batch, computing each prompt once: the prompt's keys and values (with their gradient
    path) are cached and repeated for its ``k`` completions. Same values as
    :func:`completion_logprobs` on the ``k`` full sequences, for about ``P + k*C`` instead of
    ``k*(P + C)`` tokens of work."""
    prompt_mask = batch["prompt_mask"]
    k = batch["completion_ids"].shape[0] // prompt_mask.shape[0]
    C = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=batch["prompt_positions"],
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    first = out.logits[:, -1:].repeat_interleave(k, dim=0)  # predicts each completion's first token
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), batch["completion_mask"].long()], dim=1)
    start = batch["prompt_positions"][:, -1:].repeat_interleave(k, dim=0) + 1
    positions = start + torch.arange(C, device=start.device)
    rest = model(input_ids=batch["completion_ids"], attention_mask=mask, position_ids=positions,
                 past_key_values=cache, use_cache=True, logits_to_keep=C).logits[:, :-1]
    logps = token_logprobs(torch.cat([first, rest], dim=1), batch["completion_ids"])
    return logps * batch["completion_mask"]


def token_logprobs_of(model, pad_id: int, prompts: list[list[int]], completions: list[list[int]],
                      batch_size: int = 16) -> list[list[float]]:
    """Per-token ``log pi(y_t | x, y_<t)`` of each completion, batched, without gradients."""
    return [g[0] for g in grouped_token_logprobs(model, pad_id, prompts, [[c] for c in completions], batch_size)]


def sequence_logprobs(model, pad_id: int, prompts: list[list[int]], completions: list[list[int]],
                      batch_size: int = 16) -> list[float]:
    """``log pi(completion | prompt)`` (summed over completion tokens) for many pairs."""
    return [sum(t) for t in token_logprobs_of(model, pad_id, prompts, completions, batch_size)]


@torch.inference_mode()
def grouped_token_logprobs(model, pad_id: int, prompts: list[list[int]], groups: list[list[list[int]]],
                           batch_size: int = 16) -> list[list[list[float]]]:
    """Per-token ``log pi(y_t | x, y_<t)`` of each completion in ``groups[i]`` (the same number
    for every prompt), answering ``prompts[i]``; each prompt is computed once, without gradients."""
    from .data import collate_shared

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        group = groups[i: i + batch_size]
        flat = [c for g in group for c in g]
        batch = {k: v.to(device) for k, v in collate_shared(prompts[i: i + batch_size], flat, pad_id).items()}
        rows = iter(row[: len(c)].tolist() for row, c in zip(shared_prompt_logprobs(model, batch), flat))
        out += [[next(rows) for _ in g] for g in group]
    model.train(was_training)
    return out


def pair_logprobs(model, pad_id: int, prompts: list[list[int]], first: list[list[int]], second: list[list[int]],
                  batch_size: int = 16) -> tuple[list[float], list[float]]:
    """``log pi(first_i | prompt_i)`` and ``log pi(second_i | prompt_i)``, each prompt computed once."""
    sums = [[sum(t) for t in g] for g in grouped_token_logprobs(model, pad_id, prompts, list(map(list, zip(first, second))), batch_size)]
    return [a for a, _ in sums], [b for _, b in sums]


def chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: object
    chat: ChatFormat
    demos: list[Demonstration]
    examples: list[Example]
    output: Path
    metrics: MetricsLog
    optimizer: torch.optim.Optimizer | None = None
    pad_id: int | None = None  # padding of training batches; None = the tokenizer's
    scheduler: object = None
    started: float = field(default_factory=time.time)

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_batch_size(self) -> int:
        return self.cfg.per_device_batch_size * self.cfg.gradient_accumulation_steps * self.world

    @property
    def policy(self):
        """The bare model (no DDP wrapper), for sampling and saving."""
        return self.accelerator.unwrap_model(self.model)

    def collate(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        from .data import collate

        return self._to_device(collate(prompts, completions, self._pad))

    def collate_shared(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        from .data import collate_shared

        return self._to_device(collate_shared(prompts, completions, self._pad))

    @property
    def _pad(self) -> int:
        return self.tokenizer.pad_token_id if self.pad_id is None else self.pad_id

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def setup_optimizer(self, total_steps: int) -> None:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel: ~5x faster than foreach on this CPU (0.10 s vs 0.47 s a step for 135M parameters)
        fused = self.accelerator.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay, fused=fused)
        self.scheduler = get_scheduler(
            self.cfg.lr_scheduler if self.cfg.lr_scheduler != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=int(self.cfg.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        # The schedule counts global steps; accelerate's prepared scheduler would step once
        # per process, so it is only registered for checkpointing.
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)

    # --------------------------------------------------------- optimiser step
    def optimizer_step(
        self,
        global_batch: list,
        micro_loss: Callable[[list], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        weight: Callable[[list], float],
        length: Callable[[object], int] | None = None,
        micro_batch_size: int | None = None,
    ) -> dict[str, float]:
        """One update on ``global_batch`` (the same list on every process).

        ``micro_loss(items)`` returns the loss *summed* over its items plus summed stats;
        ``weight(items)`` the count the loss is normalised by. Returns the stats summed
        over all processes and divided by the global weight. With ``length(item)``, a
        process's items are sorted by length before they are cut into micro-batches, so
        sequences of like length share padding (sums do not depend on the grouping).
        ``micro_batch_size`` items go through one forward (default ``per_device_batch_size``)."""
        acc = self.accelerator
        mine = global_batch[acc.process_index:: self.world]
        if length is not None:
            mine = sorted(mine, key=length)
        total = acc.reduce(torch.tensor(float(weight(mine)), device=acc.device), "sum").item()
        micro = chunks(mine, micro_batch_size or self.cfg.per_device_batch_size)
        sums: dict[str, torch.Tensor] = {}
        for i, items in enumerate(micro):
            sync = i == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss_sum, stats = micro_loss(items)
                # DDP averages gradients over processes; scale so the result is sum / total
                acc.backward(loss_sum * self.world / total)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        summed = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), "sum") if keys else []
        out = {k: float(v) / total for k, v in zip(keys, summed)}
        out["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def map_sharded(self, items: list, fn: Callable[[list], list]) -> list:
        """``fn`` over this process's share of ``items``; every process gets all results, in order."""
        from accelerate.utils import gather_object

        index = list(range(self.accelerator.process_index, len(items), self.world))
        mine = list(zip(index, fn([items[i] for i in index])))
        everything = gather_object(mine) if self.world > 1 else mine
        return [result for _, result in sorted(everything, key=lambda pair: pair[0])]

    # ---------------------------------------------------------------- metrics
    def log_metrics(self, record: dict) -> None:
        if self.is_main:
            self.metrics.write({**record, "time": round(time.time() - self.started, 2)})

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def save_checkpoint(self, state: dict) -> None:
        """Model, optimiser, scheduler, RNG states and ``state``, written atomically."""
        acc = self.accelerator
        final = self.checkpoint_dir / f"step-{state['step']:07d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if self.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step-*"))
        return found[-1] if found else None

    def resume(self) -> dict | None:
        """Restore the last checkpoint if ``--resume``; returns its state (None = fresh start)."""
        if not self.cfg.resume:
            return None
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.checkpoint_dir)
            return None
        self.accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self.metrics.truncate_after(state["step"])
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return state

    def progress(self, total: int, initial: int = 0, desc: str = "training"):
        return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not self.is_main, dynamic_ncols=True)

    def finish(self) -> Path:
        """Write ``final/``: an HF directory that ``from_pretrained`` loads."""
        self.accelerator.wait_for_everyone()
        final = self.output / "final"
        if self.is_main:
            save_model(self.policy, self.tokenizer, final, merge_lora=self.cfg.merge_lora)
            log.info("saved %s (%.0f s)", final, time.time() - self.started)
        self.accelerator.wait_for_everyone()
        return final


def start_run(cfg: TrainConfig) -> Run:
    """Validate options, seed, load policy and demonstrations, prepare the output folder."""
    require(cfg, "data", "output")
    if cfg.per_device_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise SftjuiceError("--per-device-batch-size and --gradient-accumulation-steps must be >= 1")
    output = Path(cfg.output)
    if (output / "final").exists() and not cfg.resume and any((output / "checkpoints").glob("step-*")):
        raise SftjuiceError(f"{output} already holds a finished run; use --resume or another --output")
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    demos = load_demonstrations(cfg.data, skip_invalid=cfg.skip_invalid)
    path = resolve_model(cfg.model) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()  # the main process converts the default model first
    path = path or resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    model = load_policy(cfg, path)
    chat = ChatFormat(tokenizer, stop_token_ids(model))
    examples = chat.encode(demos, cfg.max_prompt_length, cfg.max_length, skip_invalid=cfg.skip_invalid)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
    log.info(
        "%s: %d demonstrations, model %s%s, %d process(es), global batch %d",
        cfg.method, len(examples), path, " + LoRA" if cfg.lora else "", accelerator.num_processes,
        cfg.per_device_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
    )
    return Run(cfg, accelerator, model, tokenizer, chat, demos, examples, output,
               MetricsLog(output / "metrics.jsonl", enabled=accelerator.is_main_process))


def steps_for(n_items: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps) for ``epochs`` (may be fractional)."""
    per_epoch = math.ceil(n_items / batch_size)
    return per_epoch, max(1, math.ceil(per_epoch * epochs))
