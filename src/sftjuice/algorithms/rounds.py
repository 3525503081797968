"""Rounds: what every sampling method shares.

A run's epochs of demonstrations are split into rounds. Round ``r`` takes its *section* of
the prompts, samples from the policy as it stands at the round's start (``pi_t``), scores
what it needs with forward-only passes, and writes everything the round trains on to
``OUTPUT/rounds/<r>/<name>.jsonl`` atomically, before its first step. A resumed run finds
the file again and never samples a finished round twice; each row records a fingerprint of
the policy that sampled it, and resuming checks it, so a folder never mixes two runs.

Batches hold whole prompts: a :class:`Group` is a prompt with its demonstration and its
samples, so every pass computes a prompt once for all of its completions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import SftjuiceError
from ..data import Demonstration, Example, epoch_order, global_batches
from ..generation import Sample, derive_seed, sample
from ..scoring import token_logprobs_of
from ..storage import read_jsonl, write_jsonl
from ..training import Run, weights_fingerprint


@dataclass
class Round:
    index: int  # over the whole run
    epoch: int
    section: list[int]  # indices into the run's examples whose prompts this round samples


def plan(n_examples: int, rounds_per_epoch: int, epochs: float, seed: int) -> list[Round]:
    """Every round's section, fixed before training starts (the schedules need the total):
    each shuffled epoch split into ``rounds_per_epoch`` near-equal sections."""
    out = []
    for r in range(max(1, round(epochs * rounds_per_epoch))):
        epoch, t = divmod(r, rounds_per_epoch)
        order = epoch_order(n_examples, seed, epoch)
        section = order[t * n_examples // rounds_per_epoch: (t + 1) * n_examples // rounds_per_epoch]
        if not section:
            raise SftjuiceError(f"--rounds {rounds_per_epoch} leaves rounds without prompts ({n_examples} demonstrations)")
        out.append(Round(r, epoch, section))
    return out


def batches(run: Run, n_groups: int, r: int, pass_: int) -> list[list[int]]:
    """One pass's global batches of whole prompts, shuffled by a seed named for the pass."""
    return global_batches(n_groups, run.prompts_per_step, derive_seed(run.cfg.seed, "batches", r, pass_), 0,
                          min_size=run.world)


def steps_per_pass(run: Run, n_groups: int) -> int:
    return len(global_batches(n_groups, run.prompts_per_step, 0, 0, min_size=run.world))


# ------------------------------------------------------------------ what a round holds


@dataclass
class Completion:
    """A sampled response with the log-probs each method needs."""
    token_ids: list[int]
    logprobs: list[float]  # log pi_t(y_k | x, y_<k) per token: the sampler's, in training precision
    finished: bool = True
    ref_logprobs: list[float] | None = None  # per token under pi_ref (RFT, SRPPO)
    advantage: float = 0.0  # set by policy-gradient methods before their step

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class Group:
    """A prompt with its demonstration and its samples: the unit of every batch."""
    example: Example
    samples: list[Completion]
    demonstration_logprob: float | None = None  # log pi_t(y^E | x)

    @property
    def completions(self) -> list[list[int]]:  # the demonstration first
        return [self.example.completion_ids] + [s.token_ids for s in self.samples]

    def __len__(self) -> int:  # the padded width of its batch rows
        return len(self.example.prompt_ids) + max(map(len, self.completions))

    @property
    def differs(self) -> list[bool]:
        """Per sample: not the demonstration token for token. A pair of two equal responses
        has no gradient in a pair loss, so it is left out of the loss and of its count."""
        return [s.token_ids != self.example.completion_ids for s in self.samples]


def samples_in(groups: list[Group]) -> int:
    return sum(len(g.samples) for g in groups)


def distinct_pairs_in(groups: list[Group]) -> int:
    """The count pair losses are normalised by: (demonstration, sample) pairs whose sample
    differs from the demonstration."""
    return sum(sum(g.differs) for g in groups)


def groups_of(rows: list[dict], examples: list[Example]) -> list[Group]:
    def completions(row: dict) -> list[Completion]:
        refs = row.get("ref_token_logprobs") or [None] * len(row["samples"])
        return [Completion(s["token_ids"], s["token_logprobs"], s["finished"], ref) for s, ref in zip(row["samples"], refs)]

    return [Group(examples[row["example"]], completions(row), row.get("demonstration_logprob")) for row in rows]


# --------------------------------------------------------------- the loop they share


@dataclass
class RoundContext:
    """One round as its steps see it, yielded by :func:`each_round`: which round, its steps
    (``start`` < step <= ``end``), the resumed state, the fingerprint of its sampling policy
    pi_t, and ``step``, the cursor :func:`train_steps` moves. ``sums`` are totals a method
    keeps over the round's steps; mid-round checkpoints carry them, so a round resumed
    inside reports what an uninterrupted one does."""
    run: Run
    round: Round
    start: int
    end: int
    state: dict
    bar: object
    pi_t: str | None
    step: int = 0
    sums: dict = field(default_factory=dict)

    def __post_init__(self):
        self.step = self.start
        if self.resumed_inside:
            self.sums = dict(self.state.get("round_sums", {}))

    @property
    def index(self) -> int:
        return self.round.index

    @property
    def resumed_inside(self) -> bool:
        return self.state["step"] > self.start

    def checkpoint(self) -> None:
        """The checkpoint that ends the round; a sampling method's records the next round's pi_t."""
        fingerprint = {} if self.pi_t is None else {"round_policy": weights_fingerprint(self.run.policy)}
        self.run.save_checkpoint({"step": self.end, "round": self.index + 1, **fingerprint})


def each_round(run: Run, plan: list[Round], round_steps: list[int], state: dict, sampled: bool = True):
    """A :class:`RoundContext` for every round a resumed run has not finished (``state`` from
    :meth:`Run.resume`), under one progress bar. The method's round ends at step ``end`` with
    ``ctx.checkpoint()``. ``sampled=False`` (SFT): no round samples, so no pi_t to record."""
    bar = run.progress(sum(round_steps), state["step"])
    try:
        step = 0
        for rnd, steps in zip(plan, round_steps):
            start, step = step, step + steps
            if step <= state["step"]:  # finished before a resume
                continue
            yield RoundContext(run, rnd, start, step, state, bar, round_policy(run, state, start) if sampled else None)
    finally:
        bar.close()


def passes(run: Run, n_items: int, r: int, count: int, first: int = 0) -> list[tuple[int, list[int]]]:
    """(pass, global batch) for ``count`` passes over a round's ``n_items`` items."""
    return [(k, batch) for k in range(count) for batch in batches(run, n_items, r, first + k)]


def train_steps(ctx: RoundContext, learner, items: list, batches: list[tuple[int, list[int]]], micro_loss, weight, *,
                phase: str | None = None, extra=None, tally=None, until: int | None = None,
                checkpoints: bool = True) -> None:
    """The step loop every method runs on: one optimiser step per (pass, global batch of
    indices into ``items``). Steps a resumed run already took are counted, not run. Every
    step is logged (with ``extra(batch)``'s numbers) and counted by :meth:`Run.after_step`;
    a checkpoint inside the round (``--save-every``, a stop signal) records pi_t and
    ``ctx.sums``. A batch of ``weight`` 0 changes neither the weights nor AdamW's moments
    (:meth:`Learner.step`; the schedule moves on) and is counted in ``ctx.sums["skipped"]``.
    Options: ``tally(sums, items, stats)`` adds a step that trained to ``ctx.sums``;
    ``until``: the planned steps this phase had no batch for move the schedule on to it;
    ``checkpoints=False``: none inside this phase (RFT's reward pass)."""
    run, r = ctx.run, ctx.index
    for k, batch in batches:
        ctx.step += 1
        step = ctx.step
        if step <= ctx.state["step"]:
            continue
        chosen = [items[i] for i in batch]
        t0 = time.time()
        stats = learner.step(chosen, micro_loss, weight, length=len)
        stats.update(extra(batch) if extra else {})
        if stats.get("skipped") and not stats.get("nonfinite"):  # nothing to learn from
            ctx.sums["skipped"] = ctx.sums.get("skipped", 0) + 1
        elif tally and not stats.get("skipped"):  # a non-finite step does not count in the round's means
            ctx.sums = tally(ctx.sums, chosen, stats)
        if step % run.cfg.log_every == 0 or step == ctx.end:
            run.log_metrics({"step": step, "round": r, **({"phase": phase} if phase else {}), "pass": k, **stats,
                             "step_seconds": round(time.time() - t0, 3)})
        ctx.bar.set_postfix(round=r, **{phase or "loss": f"{stats.get('loss', float('nan')):.4f}"})
        ctx.bar.update(1)
        if run.after_step(step, stats) and checkpoints and step != ctx.end:
            run.save_checkpoint({"step": step, "round": r, **({"round_policy": ctx.pi_t} if ctx.pi_t else {}),
                                 **({"round_sums": ctx.sums} if ctx.sums else {})})
    if until is not None and ctx.step < until:
        for _ in range(until - ctx.step):
            learner.advance_schedule()
        ctx.bar.update(until - ctx.step)
        ctx.step = until


# ------------------------------------------------------------------------- sampling


def round_policy(run: Run, state: dict, round_start: int) -> str:
    """The fingerprint of the round's sampling policy pi_t: the policy now, or, when the run
    resumed inside the round, the one its checkpoint recorded at the round's start."""
    if state["step"] > round_start:
        return state["round_policy"]
    return weights_fingerprint(run.policy)


def round_file(run: Run, r: int, name: str, policy: str, make: Callable[[], list[dict]]) -> list[dict]:
    """The rows of ``rounds/<r>/<name>.jsonl``: read back if round ``r`` wrote them before
    with the policy whose fingerprint is ``policy``, else ``make()`` (every process calls it)
    and written atomically by the main process."""
    path = run.output / "rounds" / str(r) / f"{name}.jsonl"
    if path.exists():
        rows = read_jsonl(path)
        other = {row.get("policy") for row in rows} - {policy}
        if other:
            raise SftjuiceError(f"{path}: made by a policy ({other.pop()}) other than this run's pi_{r} ({policy}); "
                                "the folder mixes runs (use --overwrite or another --output)")
        return rows
    rows = [{**row, "policy": policy} for row in make()]
    if run.is_main:
        write_jsonl(path, rows)
    run.accelerator.wait_for_everyone()
    return rows


def sample_round(run: Run, r: int, indices: list[int], seed: int, policy: str, name: str = "generations",
                 data: tuple[list[Example], list[Demonstration]] | None = None,
                 annotate: Callable[[list[Example], list[list[Sample]]], list[dict]] | None = None,
                 num_samples: int | None = None, model=None) -> list[dict]:
    """Sample for the prompts ``indices`` (of ``data`` = (examples, demonstrations), by default
    the run's) with ``model`` (default: the current policy, pi_t; ``policy`` is the
    fingerprint of the policy the round belongs to), add what ``annotate(examples, samples)``
    returns per prompt: the round's :func:`round_file`. Prompt i's samples are seeded
    ``derive_seed(seed, name, r, i)``, the same however the prompts are split over processes."""
    cfg, chat = run.cfg, run.chat
    examples, demos = data or (run.examples, run.demos)
    model = model or run.policy

    def work(idx: list[int]) -> list[dict]:
        chosen = [examples[i] for i in idx]
        prompts = [e.prompt_ids for e in chosen]
        seeds = [derive_seed(seed, name, r, i) for i in idx]
        samples = sample(model, prompts, cfg, chat.stop_token_ids, run.tokenizer.pad_token_id, seed=seeds,
                         num_samples=num_samples, bf16=run.bf16, progress=run.is_main)
        if cfg.generation_backend != "torch":  # another engine's precision: re-score in the training one
            with run.accelerator.autocast():
                rescored = token_logprobs_of(model, run.tokenizer.pad_token_id, prompts,
                                             [[s.token_ids for s in ss] for ss in samples])
            samples = [[Sample(s.token_ids, lp, s.finished) for s, lp in zip(ss, lps)] for ss, lps in zip(samples, rescored)]
        extra = annotate(chosen, samples) if annotate else [{} for _ in chosen]
        return [{"example": i, "prompt": demos[e.index].prompt, "demonstration": demos[e.index].completion,
                 "samples": [{"completion": chat.decode(s.token_ids), "token_ids": s.token_ids, "finished": s.finished,
                              "token_logprobs": s.logprobs} for s in ss], **x}
                for i, e, ss, x in zip(idx, chosen, samples, extra)]

    return round_file(run, r, name, policy, lambda: run.map_sharded(indices, work))


def sample_stats(rows: list[dict]) -> dict[str, float]:
    """Per-round metrics of the samples: count, mean length, share cut at --max-new-tokens."""
    samples = [s for row in rows for s in row["samples"]]
    return {"samples": len(samples),
            "sample_length_mean": sum(len(s["token_ids"]) for s in samples) / len(samples),
            "sample_cut_fraction": sum(not s["finished"] for s in samples) / len(samples)}
