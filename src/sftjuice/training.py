"""What every training method shares.

- A :class:`Learner` is one model that trains: the model, its optimiser and schedule, and the
  exact-normalisation optimiser step. A run holds as many as its method needs (RFT: policy
  and reward model).
- A :class:`Run` is everything else: the accelerator, the demonstrations, the output folder
  (manifest, metrics, checkpoints of all learners, ``final/``) and resume.

Processes split each global batch by rank; gradient accumulation is the number of
micro-batches a process gets. Losses are sums divided by a *global* count (completion
tokens for SFT, pairs for IRFT), so one process and N processes with the same global
batch compute the same update.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, set_seed

from .config import (SamplingConfig, SftjuiceError, TrainConfig, config_dict, flag, require, save_config,
                     saved_under_new_names)
from .data import ChatFormat, Demonstration, Example, collate, collate_packed, collate_shared, load_demonstrations
from .progress import bar as progress_bar
from .models import (load_policy, load_pretrained, load_tokenizer, resolve_model, save_merged, save_model,
                     stop_token_ids, use_bf16)
from .stopping import DIVERGED, FOLDER_IN_USE, LOCK, PREEMPTED, RunStopped, install_stop_handlers, lock_output, \
    release, resume_command, signal_received
from .storage import MetricsLog, atomic_write_text

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ checkpoint files

CHECKPOINT_FILES = "files.json"  # a checkpoint's files and sizes, the last file written


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` is not whole (a file missing, cut or unreadable), or
    None. Checkpoints written before ``files.json`` existed are judged by loading them."""
    try:
        json.loads((path / "trainer_state.json").read_text())
        listed = json.loads((path / CHECKPOINT_FILES).read_text()) if (path / CHECKPOINT_FILES).exists() else {}
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError) as e:
        return f"unreadable: {' '.join(str(e).split())[:120]}"
    for name, size in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _remove_dir(path: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a hidden folder, never a
    checkpoint with some of its files."""
    if path.exists():
        gone = path.with_name(f".{path.name}.removing")
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)


def chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


class Learner:
    """One trained model: prepared with its AdamW optimiser, a schedule over ``total_steps``
    global steps, and the optimiser step that normalises exactly over the global batch."""

    def __init__(self, run: "Run", model: torch.nn.Module, learning_rate: float, total_steps: int, pad_id: int,
                 packed: bool):
        from transformers import get_scheduler

        cfg, acc = run.cfg, run.accelerator
        self.run, self.pad_id, self.packed = run, pad_id, packed
        params = [p for p in model.parameters() if p.requires_grad]
        # the fused kernel: ~5x faster than foreach on this CPU (0.10 s vs 0.47 s a step for 135M parameters)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=cfg.weight_decay,
                                      fused=acc.device.type in ("cpu", "cuda"))
        self.scheduler = get_scheduler(
            cfg.lr_scheduler if cfg.lr_scheduler != "constant" else "constant_with_warmup", optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
        # The schedule counts global steps; accelerate's prepared scheduler would step once
        # per process, so it is only registered for checkpointing.
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)

    def advance_schedule(self) -> None:
        """The schedule's next step. Also taken by a planned step that leaves the weights and
        AdamW's moments as they are, for which torch's warning that no optimiser step came
        first is expected."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    @property
    def unwrapped(self):
        """The bare model (no DDP wrapper), for sampling, scoring and saving."""
        return self.run.accelerator.unwrap_model(self.model)

    def collate(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        """A micro-batch, one prompt per completion: padded, or packed with ``--pack``."""
        return self.run.to_device((collate_packed if self.packed else collate)(prompts, completions, self.pad_id))

    def collate_shared(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        """A micro-batch, ``k`` completions per prompt: padded, or packed with ``--pack``."""
        return self.run.to_device((collate_packed if self.packed else collate_shared)(prompts, completions, self.pad_id))

    def step(self, global_batch: list, micro_loss: Callable[[list], tuple[torch.Tensor, dict[str, torch.Tensor]]],
             weight: Callable[[list], float], length: Callable[[object], int] | None = None) -> dict[str, float]:
        """One update on ``global_batch`` (the same list on every process).

        ``micro_loss(items)`` returns the loss *summed* over its items plus summed stats;
        ``weight(items)`` the count the loss is normalised by. Returns the stats summed over
        all processes and divided by the global weight. With ``length(item)``, a process's
        items are sorted by length before they are cut into micro-batches, so sequences of
        like length share padding (sums do not depend on the grouping)."""
        run, acc = self.run, self.run.accelerator
        mine = global_batch[acc.process_index:: run.world]
        if length is not None:
            mine = sorted(mine, key=length)
        total = acc.reduce(torch.tensor(float(weight(mine)), device=acc.device), "sum").item()
        if total == 0:  # nothing to learn from (e.g. every sample equals its demonstration): the
            self.advance_schedule()  # schedule moves on, the weights and AdamW's moments do not
            return {"lr": self.scheduler.get_last_lr()[0], "skipped": 1}
        micro = chunks(mine, run.cfg.per_device_batch_size)
        sums: dict[str, torch.Tensor] = {}
        for i, items in enumerate(micro):
            sync = i == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss_sum, stats = micro_loss(items)
                # DDP averages gradients over processes; scale so the result is sum / total
                acc.backward(loss_sum * run.world / total)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        # the norm of the synchronised gradient (an infinite max_norm measures without clipping:
        # the gradient is multiplied by exactly 1)
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), run.cfg.max_grad_norm or math.inf))
        keys = sorted(sums)
        summed = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), "sum") if keys else []
        out = {k: float(v) / total for k, v in zip(keys, summed)}
        # Both numbers are reduced over processes, so every process takes the same decision: a
        # non-finite loss or gradient never reaches the weights or AdamW's moments; the
        # schedule moves on, as for any planned step (Run.after_step counts and stops).
        finite = math.isfinite(grad_norm) and math.isfinite(out.get("loss", 0.0))
        if finite:
            self.optimizer.step()
        self.advance_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["grad_norm"] = grad_norm
        if not finite:
            out.update(skipped=1, nonfinite=1)
        return out


# -------------------------------------------------------------------- fingerprints


def file_fingerprint(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names, sizes and contents; for weight
    files over 64 MiB the first and last 8 MiB, so a 14 GB model is not read whole)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(8 << 20))
                fh.seek(-(8 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of a model's trainable weights (every 997th value of each tensor):
    any optimiser step changes it, so a round file names the policy that sampled it."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().flatten()[::997].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def rows_fingerprint(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------- the run


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    policy_model: torch.nn.Module  # the starting policy as loaded; see :attr:`policy` once prepared
    tokenizer: object
    chat: ChatFormat
    demos: list[Demonstration]
    examples: list[Example]
    output: Path
    metrics: MetricsLog
    bf16: bool = False  # --bf16 as decided when the run started (auto: measured on this machine)
    learners: list[Learner] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    last_checkpoint: Path | None = None
    unsaved_steps: int = 0  # optimiser steps since the last checkpoint
    bad_in_row: int = 0  # non-finite steps in a row (each skipped)
    stopping: bool = False  # every process agreed to stop at the next checkpoint
    carried: dict = field(default_factory=dict)  # what every checkpoint's state also holds (SFT's validation curve)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def prompts_per_step(self) -> int:
        """The global batch, in prompts (the one batch unit of every method)."""
        return self.cfg.per_device_batch_size * self.cfg.gradient_accumulation_steps * self.world

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def learner(self, model, learning_rate: float, total_steps: int, pad_id: int | None = None,
                packed: bool | None = None) -> Learner:
        """Prepare ``model`` to train; learners are checkpointed in the order they are made.
        ``packed`` defaults to ``--pack``."""
        learner = Learner(self, model, learning_rate, total_steps,
                          self.tokenizer.pad_token_id if pad_id is None else pad_id,
                          self.cfg.pack if packed is None else packed)
        self.learners.append(learner)
        return learner

    @property
    def policy(self):
        """The bare policy (no DDP wrapper), for sampling and saving."""
        return self.learners[0].unwrapped if self.learners else self.policy_model

    def map_sharded(self, items: list, fn: Callable[[list], list]) -> list:
        """``fn`` over this process's share of ``items``; every process gets all results, in order."""
        from accelerate.utils import gather_object

        index = list(range(self.accelerator.process_index, len(items), self.world))
        mine = list(zip(index, fn([items[i] for i in index])))
        everything = gather_object(mine) if self.world > 1 else mine
        return [result for _, result in sorted(everything, key=lambda pair: pair[0])]

    def log_metrics(self, record: dict) -> None:
        """A line of metrics.jsonl, and the same numbers to the ``--report-to`` tracker, under
        ``train/`` for optimiser steps (``reward/``, ``policy/`` for RFT's two phases) and
        ``<event>/`` for per-round records."""
        # a non-finite number becomes null (JSON has none); a "nonfinite" event says which
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.is_main:
            self.metrics.write({**record, "time": round(time.time() - self.started, 2)})
        if self.cfg.report_to != "none":
            group = record.get("event") or record.get("phase") or "train"
            self.accelerator.log({f"{group}/{k}": v for k, v in record.items() if k not in ("step", "event", "phase")
                                  and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=record["step"])

    def progress(self, total: int, initial: int = 0, desc: str = "training"):
        return progress_bar(total, desc, "step", show=self.is_main, initial=initial)

    # ------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def after_step(self, step: int, stats: dict) -> bool:
        """Every method calls this after each optimiser step, on every process. It counts the
        steps :meth:`Learner.step` skipped as non-finite, logging each, and stops the run after
        ``--max-bad-steps`` in a row; it returns whether to checkpoint now: on ``--save-every``,
        or to stop on a signal (then :meth:`save_checkpoint` ends the run)."""
        self.unsaved_steps += 1
        if stats.get("nonfinite"):
            self.bad_in_row += 1
            what = [f"{k} {stats[k]}" for k in ("loss", "grad_norm") if k in stats and not math.isfinite(stats[k])]
            self.log_metrics({"step": step, "event": "nonfinite", "reason": ", ".join(what), "in_a_row": self.bad_in_row})
            if self.bad_in_row >= self.cfg.max_bad_steps:
                raise RunStopped(
                    f"diverged at step {step}: {self.bad_in_row} optimiser steps in a row with a non-finite loss or "
                    f"gradient norm ({', '.join(what)}; --max-bad-steps {self.cfg.max_bad_steps}; each was skipped, so the weights are step "
                    f"{step - self.bad_in_row}'s); last good checkpoint: {self.last_checkpoint or 'none'}. Usual causes: "
                    f"--learning-rate {self.cfg.learning_rate:g} too high, or bf16 overflow (--bf16 {str(self.cfg.bf16).lower()})",
                    DIVERGED)
        else:
            self.bad_in_row = 0
        return bool(self.cfg.save_every and step % self.cfg.save_every == 0) or self.stop_requested()

    def stop_requested(self) -> bool:
        """Whether a stop signal reached any process: the flag is summed over the processes
        after every step, so all of them stop after the same one."""
        if not self.stopping:
            flag = torch.tensor(float(signal_received() is not None), device=self.accelerator.device)
            self.stopping = (self.accelerator.reduce(flag, "sum").item() if self.world > 1 else flag.item()) > 0
        return self.stopping

    def save_checkpoint(self, state: dict) -> None:
        """Every learner's model, optimiser and schedule, the RNG states and ``state``, written
        atomically: a kill leaves the previous checkpoint whole. After a stop signal, the
        run ends here (:class:`RunStopped`). ``state`` is merged over :attr:`carried`."""
        state = {**self.carried, **state}
        acc = self.accelerator
        final = self.checkpoint_dir / f"step-{state['step']:07d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_main:
            for junk in self.checkpoint_dir.glob(".step-*"):  # what a kill left
                shutil.rmtree(junk, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every process's files (its RNG state) are in before the listing
        if self.is_main:
            atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1))
            atomic_write_text(tmp / CHECKPOINT_FILES, json.dumps(
                {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}, indent=1))
            _remove_dir(final)
            os.replace(tmp, final)
            for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                _remove_dir(old)
        acc.wait_for_everyone()
        self.last_checkpoint, self.unsaved_steps = final, 0
        if self.stop_requested():
            name = signal.Signals(signal_received()).name if signal_received() else "a stop signal (to another process)"
            raise RunStopped(f"{name}: stopped after step {state['step']}, saved {final}; continue with: "
                             f"{resume_command()}", PREEMPTED)

    def resume(self) -> dict:
        """Restore the newest whole checkpoint (with ``--resume``); returns its state,
        ``{"step": 0}`` on a fresh start. A damaged checkpoint (a file missing or cut, or one
        that does not load) is named in one line and an earlier one is loaded instead; if none
        is whole, the run stops: it never trains from a half-loaded state (a load that failed
        part way is overwritten whole by the next one)."""
        found = sorted(self.checkpoint_dir.glob("step-*"), reverse=True) if self.cfg.resume else []
        damaged = []
        for path in found:
            problem = checkpoint_problem(path)
            if problem is None:
                try:
                    self.accelerator.load_state(str(path))
                except Exception as e:  # noqa: BLE001 - a file cut or corrupted in a way its size does not show
                    problem = f"does not load: {' '.join(str(e).split())[:120]}"
            if problem is None:
                break
            damaged.append(path)
            log.warning("--resume: %s is damaged (%s); trying the checkpoint before it", path, problem)
        else:
            if damaged:
                raise SftjuiceError(
                    f"--resume: no whole checkpoint in {self.checkpoint_dir} (all {len(damaged)} damaged, the newest: "
                    f"{damaged[0].name}): start afresh with --overwrite, or put back a whole checkpoint")
            if self.cfg.resume:  # killed before its first checkpoint: the run starts over, and so does its log
                self.metrics.truncate_after(-1)
            return {"step": 0}
        state = json.loads((path / "trainer_state.json").read_text())
        self.metrics.truncate_after(state["step"])
        self.last_checkpoint = path
        log.log(logging.WARNING if damaged else logging.INFO, "resumed from %s (step %d)", path, state["step"])
        return state

    def finish(self, keep: Path | None = None) -> Path:
        """Write ``final/``: an HF directory that ``from_pretrained`` loads. It is the policy
        as it stands, or the model saved earlier in ``keep`` (SFT's best epoch), moved there;
        with ``keep`` gone, a run killed after the move, ``final/`` already holds it."""
        self.accelerator.wait_for_everyone()
        final = self.output / "final"
        if self.is_main and keep is None:
            save_model(self.policy, self.tokenizer, final, merge_lora=self.cfg.merge_lora)
            log.info("saved %s (%.0f s)", final, time.time() - self.started)
        elif self.is_main and keep.exists():
            if self.cfg.merge_lora:
                from transformers import AutoModelForCausalLM

                save_merged(load_pretrained(AutoModelForCausalLM, keep, "the kept adapter"), self.tokenizer,
                            self.output / "merged")
            _remove_dir(final)
            os.replace(keep, final)
        for tracker in self.accelerator.trackers:  # flush --report-to files
            tracker.finish()
        self.accelerator.wait_for_everyone()
        release(self.output)
        return final


# ------------------------------------------------------------------ output folder

MANIFEST = "manifest.json"
# options that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "overwrite", "log_every", "max_bad_steps"}


# a run may be resumed for more of these: its rounds and batches so far do not depend on how
# many follow, and with a constant schedule and no warmup neither does its learning rate
GROWABLE = {"epochs", "iterations"}


def can_grow(old: dict, key: str, value) -> bool:
    return (value >= old.get(key, value) and old.get("lr_scheduler") == "constant"
            and not old.get("warmup_ratio"))


def manifest_of(cfg: TrainConfig, data_fp: str, model_fp: str) -> dict:
    from importlib.metadata import version

    return {"sftjuice": version("sftjuice"), "method": cfg.method, "data": data_fp, "model": model_fp,
            "config": {k: v for k, v in config_dict(cfg).items() if k not in RESUMABLE_CHANGES}}


def check_output(output: Path, cfg: TrainConfig, manifest: dict) -> None:
    """An output folder belongs to one run. A new run refuses a folder that holds anything
    unless ``--overwrite`` (which empties it); ``--resume`` continues only the run that the
    folder's manifest describes, and lists what differs otherwise."""
    used = output.exists() and any(not p.name.endswith(".tmp") and p.name != LOCK  # a kill's leftovers and the lock aside
                                   for p in output.iterdir())
    if not used or cfg.overwrite:
        return
    if not cfg.resume:
        raise SftjuiceError(f"{output} is not empty (another run's files): use --resume to continue that run, "
                            "--overwrite to delete it, or another --output")
    path = output / MANIFEST
    if not path.exists():
        raise SftjuiceError(f"{output} holds files but no {MANIFEST}: not an sftjuice run to resume "
                            "(use --overwrite or another --output)")
    old = json.loads(path.read_text())
    # a run started before options were renamed keeps its old names; one started before an
    # option existed ran with its default
    saved = {**config_dict(type(cfg)()), **saved_under_new_names(old.get("method"), old["config"])}
    changes = [f"{flag(k)} {saved.get(k)!r} -> {v!r}" for k, v in manifest["config"].items()
               if saved.get(k) != v and not (k in GROWABLE and can_grow(saved, k, v))]
    changes += [f"the {what} changed" for what in ("data", "model") if old.get(what) != manifest[what]]
    if old.get("precision", manifest["precision"]) != manifest["precision"]:  # --bf16 auto decides per machine
        changes.append(f"the precision changed ({old['precision']} -> {manifest['precision']})")
    if changes:
        raise SftjuiceError(f"--resume: {output} was started with other settings: {'; '.join(changes)} "
                            "(use --overwrite or another --output)")


def claim_output(output: Path, cfg: TrainConfig, manifest: dict) -> None:
    """Main process: empty the folder on ``--overwrite``, write the manifest and config."""
    if cfg.overwrite and output.exists():
        for p in output.iterdir():
            if p.name != LOCK:  # this run's
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=1))
    save_config(cfg, output / "config.yaml")


# ---------------------------------------------------------------------- start


def start_run(cfg: TrainConfig, model=None, tokenizer=None, data=None) -> Run:
    """Seed, load the policy and the demonstrations, claim the output folder.

    ``model`` and ``tokenizer`` may be loaded objects instead of ``cfg.model``; ``data`` may
    be a ``datasets.Dataset`` or a list of rows instead of ``cfg.data``."""
    require(cfg, "output")
    if data is None:
        require(cfg, "data")
    output = Path(cfg.output)
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # accelerate keeps one precision per process: a second run in the same Python process
        # (the API, a benchmark) with another --bf16 would be refused
        AcceleratorState._reset_state()
    bf16 = use_bf16(cfg.bf16)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available(),
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=str(output))
    if accelerator.distributed_type == DistributedType.FSDP and isinstance(cfg, SamplingConfig):
        # each process samples its own prompts for its own number of decoding steps, while a
        # sharded model needs every process in every forward pass
        raise SftjuiceError(f"--method {cfg.method} samples from the policy, which FSDP shards: run it with DDP "
                            "(accelerate launch --multi_gpu) or on one process; FSDP runs --method sft")
    if accelerator.distributed_type == DistributedType.FSDP and getattr(cfg, "eval_data", None) and cfg.method == "sft":
        raise SftjuiceError("--eval-data: each process judges its share of the held-out rows on the whole model, which "
                            "FSDP shards: run it with DDP (accelerate launch --multi_gpu) or on one process")
    set_seed(cfg.seed)
    demos = load_demonstrations(cfg.data if data is None else data, skip_invalid=cfg.skip_invalid)
    data_fp = file_fingerprint(Path(cfg.data)) if data is None else rows_fingerprint(list(data))
    if model is None:
        path = resolve_model(cfg.model) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()  # the main process converts the default model first
        path = path or resolve_model(cfg.model)
        model_fp = file_fingerprint(path)
    else:
        path, model_fp = Path(model.name_or_path), weights_fingerprint(model)
    manifest = {**manifest_of(cfg, data_fp, model_fp), "precision": "bf16" if bf16 else "fp32"}
    busy = None
    if accelerator.is_main_process:
        try:
            lock_output(output)
        except RunStopped as e:
            busy = str(e)
    if accelerator.num_processes > 1:  # every process stops, not only the one that tried the lock
        from accelerate.utils import broadcast_object_list

        busy = broadcast_object_list([busy])[0]
    if busy:
        raise RunStopped(busy, FOLDER_IN_USE)
    check_output(output, cfg, manifest)
    accelerator.wait_for_everyone()  # every process checked before the main one writes
    if accelerator.is_main_process:
        claim_output(output, cfg, manifest)
    tokenizer = tokenizer or load_tokenizer(path)
    model = load_policy(cfg, model if model is not None else path)
    chat = ChatFormat(tokenizer, stop_token_ids(model), cfg.chat_template)
    examples = chat.encode(demos, cfg.max_prompt_length, cfg.max_length, skip_invalid=cfg.skip_invalid)
    if cfg.report_to != "none":
        accelerator.init_trackers("sftjuice", config={k: v for k, v in config_dict(cfg).items()
                                                      if isinstance(v, (int, float, str, bool))})
    accelerator.wait_for_everyone()
    log.info("%s: %d demonstrations, model %s%s, %d process(es), %d prompts a step", cfg.method, len(examples),
             getattr(model, "name_or_path", cfg.model), " + LoRA" if cfg.lora else "", accelerator.num_processes,
             cfg.per_device_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes)
    run = Run(cfg, accelerator, model, tokenizer, chat, demos, examples, output,
              MetricsLog(output / "metrics.jsonl", enabled=accelerator.is_main_process), bf16=bf16)
    install_stop_handlers(run)
    return run


def steps_for(n_items: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps) for ``epochs`` (may be fractional)."""
    per_epoch = math.ceil(n_items / batch_size)
    return per_epoch, max(1, math.ceil(per_epoch * epochs))
