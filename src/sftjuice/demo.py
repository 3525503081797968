"""``sftjuice demo``: the whole idea on the default model, in minutes on a laptop CPU.

Demonstrations: questions and answers of DeepMind's mathematics_dataset generator, or the
worked multi-step arithmetic of ``multistep_arithmetic`` (shipped in ``sftjuice/demo_data``;
see its README). The base model answers in sentences, so SFT first teaches it the task, to
its best: epoch by epoch, judged on validation prompts, keeping the best epoch (SFT-best).
Then, from SFT-best and on the same demonstrations, continued SFT (early-stopped the same
way: the baseline) and each method at its defaults. Held-out test prompts judge them all
with the task's verifier, and each method's difference to continued SFT comes with a
paired 95% interval. ``--start sft`` is the older, faster layout: one SFT epoch, then about
one more epoch of each method from it (benchmarks/quality.py runs that one).

Every stage writes its model and evaluation under OUTPUT/<stage>/; running the demo
again skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal

from .config import DEFAULT_MODEL, METHOD_CONFIGS, Checked, SftjuiceError, option
from .data import load_demonstrations
from .evaluation import evaluate_model
from .generation import derive_seed
from .models import resolve_model
from .report import markdown_table, plot_bars, text_table, write_json
from .stats import Difference, paired_bootstrap_difference
from .storage import atomic_write_text, read_jsonl, write_jsonl
from .verifiers import corrupt_steps, extract_answer
from .algorithms.sft import best_of
from .api import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """What a demo task needs besides its files: the longest answer to sample or judge, its
    verifier, how a low-quality demonstration is made, and continued SFT's learning rate from
    SFT-best (the plateau benchmark's choice on the task's validation prompts,
    benchmarks/results/quality-plateau-<task>.md; round_number's where it did not run)."""
    max_new_tokens: int
    verifier: str = "exact"
    low_quality: str = "swap"  # swap: another question's answer; steps: a wrong step carried through (corrupt_steps)
    continued_sft_lr: float = 2e-5  # round_number: 2e-5 over 5e-6


DEFAULT_TASK = Task(max_new_tokens=16)  # mathematics_dataset answers take at most 11 tokens
# multistep_arithmetic's worked answers take 36 tokens (median) to 57 (longest) with the end of turn;
# 48 would cut ~10% of the held-out references before their "Answer:" line
TASKS: dict[str, Task] = {"multistep_arithmetic": Task(max_new_tokens=64, low_quality="steps", continued_sft_lr=5e-6)}

BASE = "<base>"  # in STAGE_EXTRAS: the demo's --model, resolved to its directory
# The stages' options beyond each method's defaults, by name in --methods; "method" makes a
# name another setting of a method. A method's entry applies only once it is registered.
STAGE_EXTRAS: dict[str, dict] = {
    "sft3": {"method": "sft", "epochs": 3.0},  # --start sft: continued SFT with about the compute of the costliest method
    "srppo": {"base_model": BASE},  # reward log pi_SFT - log pi_base: the model SFT started from
    "rso": {"reward": "implicit", "base_model": BASE},  # the SRPPO reward: no reward model to train first
    # whole-response DPO on (verified, wrong) pairs: the comparison per-step credit should beat
    "steps-response": {"method": "steps", "credit": "response"},
}


def task_spec(name: str) -> Task:
    return TASKS.get(name, DEFAULT_TASK)


def task_names() -> list[str]:
    return sorted(p.name[: -len(".train.jsonl")] for p in (files("sftjuice") / "demo_data").iterdir()
                  if p.name.endswith(".train.jsonl"))


def method_of(name: str) -> str:
    """The training method behind a name in --methods (``sft3`` -> ``sft``)."""
    return STAGE_EXTRAS.get(name, {}).get("method", name)


def registered_methods() -> list[str]:
    """Methods whose training loop is registered in ``sftjuice.algorithms`` (config order)."""
    from .algorithms import METHODS

    return [m for m in METHOD_CONFIGS if m in METHODS]


@dataclass
class DemoConfig(Checked):
    """SFT to its best epoch on validation, then continued SFT and each method from it, judged on held-out prompts."""
    output: str = option("runs/demo", "output directory")
    model: str = option(DEFAULT_MODEL, "starting model")
    task: str = option("numbers__round_number", "demo task: a file pair in sftjuice/demo_data (e.g. multistep_arithmetic)")
    train_size: int = option(96, "demonstrations used for training", ge=2)
    validation_size: int = option(64, "validation prompts (training rows after --train-size's) that choose SFT's best epoch", ge=2)
    test_size: int = option(100, "held-out prompts for evaluation", ge=2)
    start: Literal["sft-best", "sft"] = option(
        "sft-best", "what every method starts from: SFT to its best epoch on validation (patience 2, up to --max-epochs), "
        "with continued SFT early-stopped the same way as the baseline; or one SFT epoch (faster; the methods then "
        "barely move it, README: What it found)")
    max_epochs: int = option(6, "--start sft-best: most epochs of SFT and of continued SFT", ge=1)
    methods: list[str] = option(["sft", "irft", "spin", "rft"], "methods compared from the shared start; sft is continued SFT, "
                            f"the baseline (also {', '.join(n for n in STAGE_EXTRAS if n not in METHOD_CONFIGS)}: SFT for "
                            "3 more epochs, steps with whole-response credit)")
    seed: int = option(0, "random seed", ge=0)
    max_new_tokens: int | None = option(None, "longest sampled or evaluated answer; default: the task's "
                                    f"({DEFAULT_TASK.max_new_tokens}; multistep_arithmetic {TASKS['multistep_arithmetic'].max_new_tokens})", ge=1)
    verifier: str | None = option(None, "answer verifier (exact, steps or module:function); default: the task's (exact)")
    low_quality_fraction: float = option(0.0, "share of training demonstrations made wrong: another question's answer, or for "
                                     "multistep_arithmetic a slipped or skipped step carried to the answer", ge=0, le=1)
    keep_models: bool = option(True, "keep each stage's final model; false: delete it once evaluated unless a stage starts from it")

    def check(self) -> None:
        tasks = task_names()
        rows = sum(1 for _ in (files("sftjuice") / "demo_data" / f"{self.task}.train.jsonl").open()) if self.task in tasks else 0
        if self.task in tasks and self.train_size + self.validation_size > rows:
            raise SftjuiceError(f"--train-size {self.train_size} + --validation-size {self.validation_size}: must be <= "
                                f"{rows}, the rows of {self.task}'s training file")
        if self.task not in tasks:
            raise SftjuiceError(f"--task {self.task}: not a demo task; choose from {', '.join(tasks)}")
        known = list(METHOD_CONFIGS) + [n for n in STAGE_EXTRAS if n not in METHOD_CONFIGS]
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise SftjuiceError(f"--methods: unknown {unknown}; choose from {', '.join(known)}")

    @property
    def spec(self) -> Task:
        return task_spec(self.task)

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or self.spec.max_new_tokens

    @property
    def verifier_name(self) -> str:
        return self.verifier or self.spec.verifier


@dataclass
class Stage:
    name: str
    start: str  # stage whose final model this one starts from ("" = the base model)
    method: str = ""  # the name in --methods (a method, or a STAGE_EXTRAS setting of one)


def stages(cfg: DemoConfig) -> list[Stage]:
    """The base model; the shared start from it (SFT-best, or one SFT epoch); then from the
    start each method at its defaults plus its STAGE_EXTRAS."""
    available = set(registered_methods())
    missing = [m for m in cfg.methods if method_of(m) not in available]
    if missing:
        raise SftjuiceError(f"--methods: {missing} not available yet (no training loop registered in "
                            f"sftjuice.algorithms); available: {', '.join(sorted(available))}")
    start = cfg.start
    return [Stage("base", ""), Stage(start, "base", "sft")] + [Stage(f"{start}+{m}", start, m) for m in cfg.methods]


def baseline_of(cfg: DemoConfig) -> str:
    """The stage every method is compared to: continued SFT from the shared start."""
    return f"{cfg.start}+sft"


def early_stopped(cfg: DemoConfig, stage: Stage) -> bool:
    """--start sft-best: SFT-best itself and continued SFT are chosen epoch by epoch on validation."""
    return cfg.start == "sft-best" and stage.method == "sft"


def stage_config(cfg: DemoConfig, stage: Stage, model, base, data, validation, output):
    """The training config of a stage: the method's defaults, the run's model/data/seed, the task's
    answer length and verifier where the method takes them, validation prompts (SFT's early
    stopping; IRFT/SPIN report their implicit reward's margin on them each round), and the
    stage's STAGE_EXTRAS (and continued SFT's learning rate)."""
    extras = {k: v for k, v in STAGE_EXTRAS.get(stage.method, {}).items() if k != "method"}
    cls = METHOD_CONFIGS[method_of(stage.method)]
    has = {f.name for f in dataclasses.fields(cls)}
    options = {"max_new_tokens": cfg.new_tokens, "verifier": cfg.verifier_name, "eval_data": str(validation), "eval_size": 16}
    if early_stopped(cfg, stage):
        options.update(epochs=float(cfg.max_epochs), eval_size=cfg.validation_size, patience=2,
                       **({"learning_rate": cfg.spec.continued_sft_lr} if stage.start != "base" else {}))
    elif cls is METHOD_CONFIGS["sft"]:  # --start sft: SFT runs its epochs, no early stopping
        options = {}
    options = {k: v for k, v in options.items() if k in has}
    options.update({k: str(base) if v == BASE else v for k, v in extras.items()})
    return cls(model=str(model), data=str(data), output=str(output), seed=cfg.seed, resume=True, **options)


def corrupt(rows: list[dict], i: int, how: str, rng: random.Random) -> dict:
    """A low-quality version of ``rows[i]``. ``swap``: the answer of another training question
    (well-formed, plausible and wrong); ``steps``: one step slipped or skipped and carried to a
    wrong answer (``verifiers.corrupt_steps``). The row keeps what its demonstration claims in
    ``answer`` (so a verifier-based method sees the same noise as the others) and the truth
    in ``correct_answer``."""
    row = rows[i]
    truth = str(row.get("answer") or extract_answer(row["completion"]))
    if how == "steps":
        bad = corrupt_steps(row, rng)
    else:
        j = rng.choice([k for k in range(len(rows)) if rows[k]["completion"] != row["completion"]])
        bad = {**row, "completion": rows[j]["completion"], "low_quality": True}
    if "answer" in row:
        bad["answer"] = extract_answer(bad["completion"])
    return {**bad, "correct_answer": truth}


def prepare_data(cfg: DemoConfig, out: Path) -> tuple[Path, Path, Path]:
    """The train, validation and held-out files of the run: the task's first ``train_size``
    training rows, the ``validation_size`` clean rows after them, and the first ``test_size``
    test rows. With ``low_quality_fraction``, that share of the training demonstrations are
    made wrong the task's way (:func:`corrupt`), chosen by ``seed``. ``data/settings.json``
    records what made them; a later run into the same folder with other settings stops (a
    setting added since that run was made counts as its value then)."""
    data = files("sftjuice") / "demo_data"
    train, test, record = out / "data" / "train.jsonl", out / "data" / "test.jsonl", out / "data" / "settings.json"
    validation = out / "data" / "validation.jsonl"
    settings = {"task": cfg.task, "train_size": cfg.train_size, "test_size": cfg.test_size, "seed": cfg.seed,
                "low_quality_fraction": cfg.low_quality_fraction, "max_new_tokens": cfg.new_tokens,
                "verifier": cfg.verifier_name, "model": cfg.model, "validation_size": cfg.validation_size}
    if cfg.low_quality_fraction:  # which rows are wrong depends on the stream that picks them
        settings["low_quality_stream"] = "derive_seed(seed, 'low-quality')"
    if record.exists():
        old = json.loads(record.read_text())
        differs = {k: (old.get(k), v) for k, v in settings.items() if old.get(k, v) != v}
        if differs:
            raise SftjuiceError(f"{out} holds a run with other settings ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in differs.items())}); "
                                "choose another output folder or delete it")
    if not train.exists():
        rows = read_jsonl(data / f"{cfg.task}.train.jsonl")[: cfg.train_size]
        # a stream of its own: random.Random(seed) is also what orders the epochs
        # (data.epoch_order), and sample() then picks exactly the rows that shuffle() puts
        # last, so with seed 0 every wrong row landed in the epoch's last round and batches
        rng = random.Random(derive_seed(cfg.seed, "low-quality"))
        for i in rng.sample(range(len(rows)), round(cfg.low_quality_fraction * len(rows))):
            rows[i] = corrupt(rows, i, cfg.spec.low_quality, rng)
        write_jsonl(test, read_jsonl(data / f"{cfg.task}.test.jsonl")[: cfg.test_size])
        write_jsonl(train, rows)
    if not validation.exists():  # (folders made before validation existed have the rest)
        write_jsonl(validation, read_jsonl(data / f"{cfg.task}.train.jsonl")[cfg.train_size: cfg.train_size + cfg.validation_size])
        atomic_write_text(record, json.dumps(settings, indent=1))
    return train, validation, test


def run_stages(cfg: DemoConfig) -> list[dict]:
    """Train and evaluate every stage (skipping finished ones); one result dict per stage."""
    out = Path(cfg.output)
    train_file, validation, test = prepare_data(cfg, out)
    test_demos = load_demonstrations(test)
    plan = stages(cfg)
    starts = {s.start for s in plan}
    models = {"base": resolve_model(cfg.model)}
    results = []
    for i, stage in enumerate(plan, start=1):
        stage_dir = out / stage.name
        log.info("[%d/%d] %s%s", i, len(plan), stage.name, f" (from {stage.start})" if stage.start else "")
        eval_file = stage_dir / "eval.json"
        seconds = 0.0
        if stage.start:
            timing = stage_dir / "train_seconds.json"
            done = (stage_dir / "final").exists() or (eval_file.exists() and timing.exists() and stage.name not in starts)
            if not done:
                t0 = time.time()
                train(stage_config(cfg, stage, models[stage.start], models["base"], train_file, validation, stage_dir))
                atomic_write_text(timing, json.dumps(time.time() - t0))
                # checkpoints only serve to resume this stage (~1.6 GB each with optimiser state)
                shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
            seconds = json.loads(timing.read_text())
            models[stage.name] = stage_dir / "final"
        if not eval_file.exists():
            t0 = time.time()
            ev = evaluate_model(models[stage.name], test_demos, cfg.new_tokens, cfg.verifier_name)
            write_json(eval_file, {**ev, "eval_seconds": time.time() - t0})
        if not cfg.keep_models and stage.start and stage.name not in starts:
            shutil.rmtree(stage_dir / "final", ignore_errors=True)  # evaluated; nothing starts from it
        ev = json.loads(eval_file.read_text())
        results.append({"stage": stage.name, "start": stage.start, "method": stage.method, "train_seconds": seconds, **ev})
        acc, ll, gap = ev["accuracy"], ev["answer_logprob"], ev["logprob_gap"]
        log.info("%s: accuracy %.1f%% [%.1f%%, %.1f%%], answer log-prob/token %.3f, log-prob gap %.2f",
                 stage.name, 100 * acc["mean"], 100 * acc["low"], 100 * acc["high"], ll["mean"], gap["mean"])
    return results


def run_demo(cfg: DemoConfig) -> None:
    report(cfg, Path(cfg.output), run_stages(cfg))


def epochs_kept(stage_dir: Path) -> str:
    """An early-stopped stage's "kept k of n" (validation accuracy at k), from its metrics."""
    curve = [m for m in read_jsonl(stage_dir / "metrics.jsonl") if m.get("event") == "validation"]
    if not curve:
        return ""
    best = best_of(curve)
    return f"{best['epoch']} of {len(curve)} (val {best['accuracy']:.0%})"


def versus(results: list[dict], baseline: str) -> dict[str, Difference]:
    """Each stage's accuracy minus the baseline's on the same test prompts: a paired bootstrap over prompts."""
    base = next((r for r in results if r["stage"] == baseline), None)
    if base is None:
        return {}
    return {r["stage"]: paired_bootstrap_difference([[float(c) for c in r["correct"]]], [[float(c) for c in base["correct"]]])
            for r in results if r["stage"] != baseline}


def report(cfg: DemoConfig, out: Path, results: list[dict]) -> None:
    baseline = baseline_of(cfg)
    diffs = versus(results, baseline)
    rows = [{
        "stage": r["stage"],
        "accuracy": "{mean:.1%} [{low:.1%}, {high:.1%}]".format(**r["accuracy"]),
        f"vs {baseline} [95%]": "baseline" if r["stage"] == baseline else "" if r["stage"] not in diffs else
        f"{diffs[r['stage']].points()} {diffs[r['stage']].verdict}",
        "answer log-prob/token": "{:.3f} ± {:.3f}".format(r["answer_logprob"]["mean"], r["answer_logprob"]["high"] - r["answer_logprob"]["mean"]),
        "epoch kept": epochs_kept(out / r["stage"]) if r["stage"] != "base" else "",
        "train seconds": f"{r['train_seconds']:.0f}",
    } for r in results]
    columns = [c for c in rows[0] if c != "epoch kept" or any(row[c] for row in rows)]
    header = (f"sftjuice demo: {cfg.task}, {cfg.train_size} demonstrations"
              + (f" ({cfg.low_quality_fraction:.0%} low-quality)" if cfg.low_quality_fraction else "")
              + f", {cfg.test_size} held-out prompts, greedy decoding, verifier {cfg.verifier_name} (95% intervals)")
    start = (f"Every method starts from `{cfg.start}`: SFT from the base model, validated on {cfg.validation_size} "
             f"prompts after each epoch, best epoch kept (patience 2, at most {cfg.max_epochs}); `{baseline}` is "
             "continued SFT from it, early-stopped the same way. " if cfg.start == "sft-best" else
             "Stages after `sft` start from one SFT epoch and see the demonstrations once more. ")
    note = (start + f"vs {baseline}: accuracy difference in points on the same prompts (paired bootstrap over prompts, "
            "one seed); within noise when the interval holds 0. One seed cannot show seed variance: "
            "benchmarks/plateau.py measures it.")
    print("\n" + header + "\n\n" + text_table(rows, columns) + "\n\n" + note + "\n")
    atomic_write_text(out / "results.md", f"# {header}\n\n" + markdown_table(rows, columns) + "\n" + note
                      + " Log-prob gap (results.json, results.png): log pi(reference answer) - log pi(the next held-out "
                        "question's reference answer).\n")
    write_json(out / "results.json", [{k: v for k, v in r.items() if k not in ("correct", "responses")}
                                      | ({"versus_baseline": vars(diffs[r["stage"]])} if r["stage"] in diffs else {})
                                      for r in results])
    names = [r["stage"] for r in results]
    panels = [(label, [r[key]["mean"] for r in results], [(r[key]["low"], r[key]["high"]) for r in results])
              for label, key in (("held-out accuracy", "accuracy"), ("answer log-prob / token", "answer_logprob"),
                                 ("log-prob gap (reference - wrong)", "logprob_gap"))]
    plot_bars(out / "results.png", names, panels, title=f"sftjuice demo: {cfg.task}, {cfg.train_size} demonstrations")
    print(f"results: {out / 'results.md'}, {out / 'results.png'}")
