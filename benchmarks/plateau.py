"""The plateau question (issue 25): does any method beat continued SFT when every method
starts from an SFT model trained to its best?

The earlier quality benchmark (quality.py) started every method from one SFT epoch (4-16
optimiser steps), from which three more SFT epochs gained 5.5 points: more SFT won by
default. Here every arm starts from **SFT-best**: SFT for up to 12 epochs, validated after
each epoch, keeping the best epoch (patience 2). The protocol runs in stages of at most
about an hour, each resumable after a kill and committed when it ends:

  sft-best   SFT-best per (task, seed), fp32; on seed 0 also bf16 autocast (precision check)
  precision-speed  a training step's seconds in fp32 and bf16, alone and alternated, every task
  arms       first each arm's tuning trials on the validation split, seed 0, the same count
             for every arm; then every arm at its chosen trial from SFT-best on 3 seeds,
             judged on the held-out prompts
  restore    a fresh machine: rebuild the work folder from the committed results files

Splits (all from the task files shipped in sftjuice/demo_data, disjoint by question):
training = the first 128 rows of <task>.train.jsonl (multistep_arithmetic: 30% of them with
a wrong step, chosen per seed as the demo does); validation = train rows 1500-1799 (300,
clean); held-out test = the 500 rows of <task>.test.jsonl plus train rows 1800-1999 (700).
Tuning and early stopping read validation only; the test prompts judge the arms once.

    python benchmarks/plateau.py --estimate           # the stages, which ran, minutes each
    python benchmarks/plateau.py --stage sft-best     # run (or resume) a stage, then report
    python benchmarks/plateau.py --report             # rewrite results/quality-plateau-<task>.*

Work folder: --work (default runs/plateau)/<task>/seed<k>/<unit>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASKS = {"numbers__round_number": 0.0, "multistep_arithmetic": 0.3}  # task -> share of wrong demonstrations
TRAIN_SIZE = 128
VALIDATION = (1500, 1800)  # rows of <task>.train.jsonl
EXTRA_TEST = (1800, 2000)  # rows of <task>.train.jsonl added to <task>.test.jsonl's 500
SEEDS = 3
MAX_EPOCHS = 12
PATIENCE = 2
SFT_LR = 5e-5  # SFTConfig's default, linear decay over MAX_EPOCHS
ARM_MAX_EPOCHS = 6  # each arm from SFT-best: up to this many passes over the demonstrations, validated after each
ARM_MIN_EPOCHS = 4  # ... and at least this many: patience counts only from here (see arm_stops)
ARM_BATCH = 2  # prompts a step for every arm: 64 steps a pass over the 128 demonstrations, 256+ a trial


@dataclass(frozen=True)
class Arm:
    """One arm from SFT-best: a method, the settings every trial shares, and its trials (the
    same number for every arm). ``grows`` is the option raised by one each epoch (a run
    resumed for one more epoch equals a longer run: constant schedule, no warmup)."""
    method: str
    fixed: dict
    trials: tuple[dict, ...]
    grows: str = "epochs"
    max_epochs: int = ARM_MAX_EPOCHS


# The trials: one learning-rate sweep per arm, the step size lr x (beta for pair losses);
# the pair methods keep beta 0.1 and the demonstration's NLL term (sft_weight 1, which
# Pang et al. 2024 found crucial) fixed, a pruning of the 3 x 2 x 2 grid. A first pass
# (8 prompts a step, patience from epoch 0: 32-48 steps a trial, kept in seed0/first-pass/) pruned it
# further: lr 5e-5 fell 5-15 points below SFT-best for sft, irft and spin, so every arm has two.
PAIR_LRS = tuple({"learning_rate": lr} for lr in (2e-6, 1e-5))
ARMS: dict[str, Arm] = {
    # continued SFT may take as many steps as the costliest arm: rft's 128 a pass (64 reward and
    # 64 policy steps) x 6, where SFT takes 64 a pass
    "sft": Arm("sft", {}, tuple({"learning_rate": lr} for lr in (5e-6, 2e-5)), max_epochs=4 * ARM_MAX_EPOCHS),
    "irft": Arm("irft", {"rounds": 2, "beta": 0.1, "sft_weight": 1.0}, PAIR_LRS),
    "spin": Arm("spin", {"keep_previous_round": True, "beta": 0.1, "sft_weight": 1.0}, PAIR_LRS, grows="iterations"),
    "rft": Arm("rft", {"rounds": 2}, PAIR_LRS),
    "rest": Arm("rest", {"rounds": 2}, PAIR_LRS),
    "steps": Arm("steps", {"rounds": 2, "sft_weight": 1.0}, PAIR_LRS),
    "steps-response": Arm("steps", {"rounds": 2, "sft_weight": 1.0, "credit": "response"}, PAIR_LRS),
}
BASELINE = "sft"  # continued SFT from SFT-best
# The arms each task runs by default (--arms overrides). round_number asks the paper's
# question (demonstrations only: irft, spin, rft; rest as the verifier floor); its one-line
# answers leave per-step credit nothing to cut, so steps runs where answers have steps.
# multistep_arithmetic (30% wrong steps) asks whether verified self-samples correct bad
# demonstrations (rest, steps, steps-response), beside irft and spin; rft (the costliest
# arm, ARM_COST) ran there last, so the other arms' 3 seeds came first.
TASK_ARMS = {"numbers__round_number": ["sft", "irft", "spin", "rft", "rest"],
             "multistep_arithmetic": ["sft", "irft", "spin", "rest", "steps", "steps-response", "rft"]}
# --estimate before an arm has run: its training epoch in SFT epochs (the quality benchmark's
# one-epoch stages at 128 demonstrations), and each epoch's start-up (loading, reference models)
ARM_COST = {"sft": 1.0, "irft": 2.5, "spin": 3.5, "rft": 7.0, "rest": 2.5, "steps": 8.0, "steps-response": 4.0}
ARM_STARTUP = 20.0


# ------------------------------------------------------------------------ data


def task_data(work: Path, task: str) -> tuple[Path, Path]:
    """The validation and held-out files of a task (the same for every seed)."""
    from sftjuice.storage import read_jsonl, write_jsonl

    src = files("sftjuice") / "demo_data"
    folder = work / task / "data"
    validation, test = folder / "validation.jsonl", folder / "test.jsonl"
    if not test.exists():
        rows = read_jsonl(src / f"{task}.train.jsonl")
        write_jsonl(validation, rows[slice(*VALIDATION)])
        write_jsonl(test, read_jsonl(src / f"{task}.test.jsonl") + rows[slice(*EXTRA_TEST)])
    return validation, test


def train_file(work: Path, task: str, seed: int) -> Path:
    """The seed's 128 demonstrations, made wrong where the task's condition says, by the demo's own code."""
    from sftjuice.demo import DemoConfig, prepare_data

    cfg = DemoConfig(output=str(work / task / f"seed{seed}"), task=task, train_size=TRAIN_SIZE, test_size=2,
                     seed=seed, low_quality_fraction=TASKS[task], methods=["sft"])
    return prepare_data(cfg, Path(cfg.output))[0]


# ------------------------------------------------------------------------ validation


@dataclass
class Validator:
    """Greedy accuracy (the task's verifier) and the reference answers' per-token NLL of a model."""
    demos: list
    max_new_tokens: int
    verifier: str

    def __call__(self, model, chat) -> dict:
        import torch
        from sftjuice.evaluation import held_out_scores
        from sftjuice.verifiers import load_verifier

        was_training = model.training
        model.eval()
        t0 = time.time()
        with torch.no_grad():
            scores = held_out_scores(model, chat, self.demos, load_verifier(self.verifier), self.max_new_tokens)
        model.train(was_training)
        correct = [ok for _, ok in scores]
        return {"accuracy": sum(correct) / len(correct), "nll": statistics.fmean(nll for nll, _ in scores),
                "correct": correct, "seconds": round(time.time() - t0, 1)}


def validator(work: Path, task: str) -> Validator:
    from sftjuice.data import load_demonstrations
    from sftjuice.demo import task_spec

    spec = task_spec(task)
    return Validator(load_demonstrations(task_data(work, task)[0]), spec.max_new_tokens, spec.verifier)


def best_epoch(curve: list[dict]) -> dict:
    """The first epoch with the highest validation accuracy (a tie keeps the shorter training)."""
    return max(curve, key=lambda e: (e["accuracy"], -e["epoch"]))


def patience_spent(curve: list[dict]) -> bool:
    return bool(curve) and curve[-1]["epoch"] - best_epoch(curve)["epoch"] >= PATIENCE


def trained_best(curve: list[dict]) -> dict:
    """An arm's best epoch after at least one (epoch 0, SFT-best itself, is what the arm is judged against)."""
    return best_epoch([e for e in curve if e["epoch"]])


def arm_stops(curve: list[dict], max_epochs: int) -> bool:
    """An arm trains ARM_MIN_EPOCHS epochs, then on while its validation accuracy improved within
    PATIENCE epochs, up to max_epochs."""
    epoch = curve[-1]["epoch"]
    return epoch >= max_epochs or epoch >= ARM_MIN_EPOCHS and epoch - trained_best(curve)["epoch"] >= PATIENCE


# ------------------------------------------------------------------------ stage 1: SFT-best


def sft_best_config(work: Path, task: str, seed: int, precision: str, model: str):
    from sftjuice.config import SFTConfig

    return SFTConfig(model=model, data=str(train_file(work, task, seed)), seed=seed, resume=True, epochs=float(MAX_EPOCHS),
                     output=str(work / task / f"seed{seed}" / f"sft-best-{precision}" / "run"), learning_rate=SFT_LR,
                     bf16="true" if precision == "bf16" else "false")


def sft_best(work: Path, task: str, seed: int, precision: str, model: str) -> dict:
    """SFT for up to MAX_EPOCHS epochs from the base model, validated after each; ``best/`` is the
    best epoch's model. Resumable: the SFT run resumes from its last epoch checkpoint and the
    curve (curve.json) is rewritten epoch by epoch, so a kill loses at most one epoch."""
    from sftjuice.algorithms.sft import train
    from sftjuice.models import save_model
    from sftjuice.storage import atomic_write_text

    unit = work / task / f"seed{seed}" / f"sft-best-{precision}"
    done_file = unit / "done.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    curve_file = unit / "curve.json"
    validate = validator(work, task)

    def on_epoch_end(epoch: int, run) -> bool:
        curve = [e for e in json.loads(curve_file.read_text()) if e["epoch"] < epoch] if curve_file.exists() else []
        # judged from disk in fp32 like every other model here: in memory, a bf16 run's model
        # decodes under accelerate's autocast (and on this machine several times slower)
        save_model(run.policy, run.tokenizer, unit / "epoch")
        result = validate_dir(validate, unit / "epoch")
        curve.append({"epoch": epoch, "step": epoch * -(-TRAIN_SIZE // run.prompts_per_step),
                      **{k: result[k] for k in ("accuracy", "nll", "seconds")}})
        if best_epoch(curve)["epoch"] == epoch:
            shutil.rmtree(unit / "best", ignore_errors=True)
            os.replace(unit / "epoch", unit / "best")
        atomic_write_text(curve_file, json.dumps(curve, indent=1))
        logging.info("%s seed %d %s epoch %d: validation accuracy %.1f%%, NLL/token %.4f", task, seed, precision,
                     epoch, 100 * result["accuracy"], result["nll"])
        return patience_spent(curve) or (precision == "bf16" and epoch >= BF16_EPOCHS)

    t0 = time.time()
    cfg = sft_best_config(work, task, seed, precision, model)
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
    stopped = patience_spent(curve) or (precision == "bf16" and len(curve) >= BF16_EPOCHS)
    if not stopped:  # else: it stopped and was killed before done.json
        train(cfg, on_epoch_end=on_epoch_end)
    curve = json.loads(curve_file.read_text())
    best = best_epoch(curve)
    seconds = time.time() - t0
    metrics = [json.loads(line) for line in (unit / "run" / "metrics.jsonl").read_text().splitlines()]
    result = {"task": task, "seed": seed, "precision": precision, "best_epoch": best["epoch"], "best_step": best["step"],
              "validation_accuracy": best["accuracy"], "validation_nll": best["nll"], "curve": curve,
              "stopped_at_epoch": curve[-1]["epoch"], "steps": metrics[-1]["step"],
              "train_seconds": round(sum(m.get("step_seconds", 0.0) for m in metrics), 1),
              "validation_seconds": round(sum(e["seconds"] for e in curve), 1),
              "wall_seconds_this_invocation": round(seconds, 1), "learning_rate": SFT_LR, "schedule": "linear",
              "max_epochs": MAX_EPOCHS, "patience": PATIENCE, "load_average": os.getloadavg()}
    atomic_write_text(done_file, json.dumps(result, indent=1))
    shutil.rmtree(unit / "run" / "checkpoints", ignore_errors=True)  # ~1.6 GB; best/ is what later stages start from
    shutil.rmtree(unit / "run" / "final", ignore_errors=True)  # the last epoch's model: not the one kept
    shutil.rmtree(unit / "epoch", ignore_errors=True)
    return result


# the accuracy side of the precision check runs on the first task only: its bf16 SFT-best took
# 27-43 s a step against fp32's 2.5, which looked like hours for a multistep bf16 SFT-best. Those
# seconds were the load's (other runs shared the 2 cores): the precision-speed stage times both
# precisions alone, alternated, on every task.
PRECISION_TASKS = ("numbers__round_number",)
BF16_EPOCHS = 3  # the bf16 run stops here: epochs 1-3 against fp32's, same schedule


# ------------------------------------------------------------------------ precision speed

SPEED_STEPS = 6  # SFT steps a timing run; the first is left out (warm-up)
SPEED_REPEATS = 2


def precision_speed(work: Path, model: str) -> dict:
    """Seconds a training step in fp32 and in bf16 autocast: SFT from the base model on each
    task's seed-0 demonstrations at SFT-best's 8 prompts a step, the precisions alternated
    (fp32, bf16, fp32, bf16) so a drifting load weighs on both alike. Run it with the machine
    otherwise idle (the load average before and after each run is kept): the SFT-best units'
    own seconds cannot say this, other runs shared the cores while they ran."""
    from sftjuice import SFTConfig, train
    from sftjuice.storage import atomic_write_text

    runs = []
    for task in TASKS:
        data = train_file(work, task, 0)
        for repeat in range(SPEED_REPEATS):
            for precision in ("fp32", "bf16"):
                out = work / "precision-speed" / f"{task}-{precision}-{repeat}"
                load_before = os.getloadavg()[0]
                train(SFTConfig(model=model, data=str(data), output=str(out), seed=0, overwrite=True,
                                epochs=SPEED_STEPS * 8 / TRAIN_SIZE, bf16="true" if precision == "bf16" else "false"))
                steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:SPEED_STEPS]
                runs.append({"task": task, "precision": precision, "repeat": repeat, "steps": len(steps),
                             "seconds_per_step": statistics.median(m["step_seconds"] for m in steps),
                             "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)})
                logging.info("%s %s repeat %d: %.2f s a step", task, precision, repeat, runs[-1]["seconds_per_step"])
                shutil.rmtree(out)
    result = {"runs": runs, "steps_timed": SPEED_STEPS - 1, "prompts_per_step": 8, "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d")}
    atomic_write_text(work / "precision-speed.json", json.dumps(result, indent=1))
    return result


def precision_speed_rows(work: Path, task: str) -> list[dict]:
    path = work / "precision-speed.json"
    runs = [r for r in json.loads(path.read_text())["runs"] if r["task"] == task] if path.exists() else []
    return [{"precision": r["precision"], "repeat": r["repeat"], "s/step (median)": f"{r['seconds_per_step']:.2f}",
             "steps timed": r["steps"], "load before, after": f"{r['load_before']:.1f}, {r['load_after']:.1f}"}
            for r in runs]


def precision_speed_raw(work: Path) -> list[dict]:
    path = work / "precision-speed.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def speed_ratio(work: Path, task: str) -> float | None:
    """bf16's seconds a step over fp32's, medians over the repeats, from the precision-speed stage."""
    path = work / "precision-speed.json"
    runs = [r for r in json.loads(path.read_text())["runs"] if r["task"] == task] if path.exists() else []
    per = {p: [r["seconds_per_step"] for r in runs if r["precision"] == p] for p in ("fp32", "bf16")}
    return statistics.median(per["bf16"]) / statistics.median(per["fp32"]) if all(per.values()) else None


def sft_best_units(seeds: int) -> list[tuple[str, int, str]]:
    """(task, seed, precision): seed 0 first, with the precision check, then the other seeds."""
    units = [(t, 0, p) for t in TASKS for p in ("fp32", "bf16") if p == "fp32" or t in PRECISION_TASKS]
    return units + [(t, s, "fp32") for s in range(1, seeds) for t in TASKS]


# ------------------------------------------------------------------------ stages 2-3: arms


def validate_dir(validate: Validator, model_dir: Path) -> dict:
    from sftjuice.config import ModelConfig
    from sftjuice.evaluation import load_judged

    model, chat = load_judged(model_dir, ModelConfig())
    return validate(model, chat)


def round_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("event") == "round"]


def last_step(run_dir: Path) -> int:
    return max((json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines()), default=0)


def round_summary(run_dir: Path) -> list[dict]:
    """Each round's diagnostics the report reads, from the run's metrics."""
    keys = ("round", "step", "pairs", "identical_pairs", "heldout_margin", "accuracy", "acceptance_rate", "loss", "margin")
    return [{k: r[k] for k in keys if k in r} for r in round_records(run_dir)]


def keep_as_best(final: Path, unit: Path) -> None:
    """Copy a run's final model to unit/best, replacing any earlier one (a kill leaves either)."""
    tmp = unit / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    shutil.rmtree(unit / "best", ignore_errors=True)
    os.replace(tmp, unit / "best")


def arm_config(work: Path, task: str, seed: int, name: str, settings: dict, epochs: int, output: Path):
    """The method's config for ``epochs`` epochs from the seed's fp32 SFT-best: its defaults, the
    task's answer length and verifier where it takes them, the arm's and the trial's settings."""
    import dataclasses

    from sftjuice.config import METHOD_CONFIGS
    from sftjuice.demo import task_spec

    arm = ARMS[name]
    cls = METHOD_CONFIGS[arm.method]
    has = {f.name for f in dataclasses.fields(cls)}
    spec = task_spec(task)
    options = {"max_new_tokens": spec.max_new_tokens, "verifier": spec.verifier,
               "eval_data": str(task_data(work, task)[0]), "eval_size": 16, "lr_scheduler": "constant",
               "per_device_batch_size": ARM_BATCH}
    options = {k: v for k, v in options.items() if k in has}
    if arm.method == "sft":  # the benchmark stops early on its own validation prompts: SFT's --eval-data
        del options["eval_data"], options["verifier"]  # would also choose among one run's epochs (a 4-epoch run kept epoch 1)
    start = work / task / f"seed{seed}" / "sft-best-fp32" / "best"
    return cls(model=str(start), data=str(train_file(work, task, seed)), output=str(output), seed=seed, resume=True,
               keep_checkpoints=1, **options, **arm.fixed, **settings, **{arm.grows: epochs})


def run_arm(work: Path, task: str, seed: int, name: str, trial: int, epochs: int | None = None) -> dict:
    """One trial of an arm on one seed from SFT-best. Tuning (``epochs`` None): epoch by epoch,
    validated after each, until ``arm_stops``; ``best/`` is the best trained epoch's model (epoch
    0, SFT-best itself, is recorded too: the first pass let it win, and every arm then stopped
    after 2 epochs with nothing to compare on test). The other seeds (``epochs``: seed 0's best
    trained epoch for the chosen trial, the same rule for every arm) train that many epochs and
    are not validated: the validation decoding was most of a trial's time. Resumable: an epoch
    resumes inside its run; curve.json grows by epoch."""
    from sftjuice.api import train
    from sftjuice.storage import atomic_write_text

    settings = ARMS[name].trials[trial]
    unit = work / task / f"seed{seed}" / f"arm-{name}-t{trial}"
    done_file, curve_file, run_dir = unit / "done.json", unit / "curve.json", unit / "run"
    if done_file.exists():
        return json.loads(done_file.read_text())
    start = json.loads((work / task / f"seed{seed}" / "sft-best-fp32" / "done.json").read_text())
    unit.mkdir(parents=True, exist_ok=True)
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else [
        {"epoch": 0, "step": 0, "accuracy": start["validation_accuracy"], "nll": start["validation_nll"],
         "train_seconds": 0.0, "seconds": 0.0}]
    validate = validator(work, task) if epochs is None else None
    while not arm_stops(curve, ARMS[name].max_epochs) if epochs is None else curve[-1]["epoch"] < epochs:
        epoch = curve[-1]["epoch"] + 1 if epochs is None else epochs
        t0 = time.time()
        final = train(arm_config(work, task, seed, name, settings, epoch, run_dir))
        seconds = time.time() - t0
        result = validate_dir(validate, final) if validate else {"accuracy": None, "nll": None, "seconds": 0.0}
        steps = last_step(run_dir)
        curve.append({"epoch": epoch, "step": steps, "accuracy": result["accuracy"], "nll": result["nll"],
                      "train_seconds": round(seconds, 1), "seconds": result["seconds"]})
        if validate is None or trained_best(curve)["epoch"] == epoch:
            keep_as_best(final, unit)
        atomic_write_text(curve_file, json.dumps(curve, indent=1))
        logging.info("%s seed %d %s trial %d epoch %d (%d steps): %s", task, seed, name, trial, epoch, steps,
                     f"validation accuracy {result['accuracy']:.1%}, NLL/token {result['nll']:.4f}" if validate else "trained")
    best = trained_best(curve) if epochs is None else curve[-1]
    result = {"task": task, "seed": seed, "arm": name, "method": ARMS[name].method, "trial": trial,
              "settings": {**ARMS[name].fixed, **settings}, "best_epoch": best["epoch"], "best_step": best["step"],
              "validation_accuracy": best["accuracy"], "validation_nll": best["nll"], "curve": curve,
              "steps": curve[-1]["step"], "train_seconds": round(sum(e["train_seconds"] for e in curve), 1),
              "validation_seconds": round(sum(e["seconds"] for e in curve), 1),
              "model": str(unit / "best"),
              "rounds": round_summary(run_dir),
              "load_average": os.getloadavg()}
    atomic_write_text(done_file, json.dumps(result, indent=1))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    return result


def chosen_trial(work: Path, task: str, name: str) -> int | None:
    """The trial whose best trained epoch has the best validation accuracy on seed 0 (ties: the
    earlier trial), once every trial ran."""
    done = [work / task / "seed0" / f"arm-{name}-t{t}" / "done.json" for t in range(len(ARMS[name].trials))]
    if not all(p.exists() for p in done):
        return None
    scores = [json.loads(p.read_text())["validation_accuracy"] for p in done]
    return max(range(len(scores)), key=lambda t: (scores[t], -t))


START = "sft-best"  # the starting model, judged on test beside the arms


def unit_of(work: Path, task: str, seed: int, name: str) -> Path | None:
    """Where an arm's chosen trial (or START) ran on a seed; None before the trial is chosen."""
    if name == START:
        return work / task / f"seed{seed}" / "sft-best-fp32"
    chosen = chosen_trial(work, task, name)
    return None if chosen is None else work / task / f"seed{seed}" / f"arm-{name}-t{chosen}"


def test_eval(work: Path, task: str, seed: int, name: str) -> dict:
    """The arm's best trained model on validation (or SFT-best) judged once on the held-out test prompts."""
    from sftjuice.data import load_demonstrations
    from sftjuice.demo import task_spec
    from sftjuice.evaluation import evaluate_model
    from sftjuice.storage import atomic_write_text

    unit = unit_of(work, task, seed, name)
    path = unit / "test.json"
    if not path.exists():
        model = unit / "best" if name == START else json.loads((unit / "done.json").read_text())["model"]
        spec = task_spec(task)
        t0 = time.time()
        ev = evaluate_model(model, load_demonstrations(task_data(work, task)[1]), spec.max_new_tokens, spec.verifier)
        atomic_write_text(path, json.dumps({"correct": ev["correct"], "accuracy": ev["accuracy"]["mean"],
                                            "answer_logprob": ev["answer_logprob"]["mean"], "seconds": time.time() - t0}))
    return json.loads(path.read_text())


def arms_of(args, task: str) -> list[str]:
    return args.arms or TASK_ARMS[task]


def arm_units(task: str, arms: list[str], seeds: int) -> list[tuple[str, int, str, int | None]]:
    """("tune", 0, arm, trial) for every trial on seed 0, then per seed SFT-best's test evaluation
    ("start", seed, START, None) and ("arm", seed, arm, None) for every arm's chosen trial (seed
    0's is its tuning run) with its test evaluation."""
    units = [("tune", 0, a, t) for a in arms for t in range(len(ARMS[a].trials))]
    return units + [u for s in range(seeds) for u in [("start", s, START, None)] + [("arm", s, a, None) for a in arms]]


def run_arms(args, task: str, started: float) -> None:
    """The task's arm units in order, starting none after --budget-minutes since ``started``."""
    for kind, seed, name, trial in arm_units(task, arms_of(args, task), args.seeds):
        if not (args.work / task / f"seed{seed}" / "sft-best-fp32" / "done.json").exists():
            print(f"{task} seed {seed}: SFT-best has not run yet (--stage sft-best first)")
            return
        if time.time() - started > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes:.0f} min spent: the rest of the stage runs on the next call")
            return
        if kind == "tune":
            print(f"== tune {task} {name} trial {trial} {ARMS[name].trials[trial]}", flush=True)
            run_arm(args.work, task, 0, name, trial)
            continue
        if kind == "start":
            print(f"== test {task} SFT-best seed {seed}", flush=True)
            test_eval(args.work, task, seed, START)
            continue
        chosen = chosen_trial(args.work, task, name)
        epochs = None if seed == 0 else json.loads((args.work / task / "seed0" / f"arm-{name}-t{chosen}" / "done.json")
                                                   .read_text())["best_epoch"]  # trained: >= 1
        print(f"== arm {task} {name} seed {seed} (trial {chosen}" + (f", {epochs} epochs)" if seed else ")"), flush=True)
        run_arm(args.work, task, seed, name, chosen, epochs)
        if seed == 0 and not tested(args.work, task, 0, name):  # a restored tuning run has no model yet
            replay_chosen(args.work, task, name, chosen)
        test_eval(args.work, task, seed, name)


# ------------------------------------------------------------------------ restore
#
# The work folder (models, curves, test answers) lives outside git; a fresh machine starts
# without it. `--stage restore` rebuilds a task's folder from its committed results file:
# what only records (seed 0's tuning trials, the precision timings) is copied back, and the
# models the remaining units start from are retrained. SFT-best retrains the recorded schedule
# to the recorded best epoch, its validation NLL checked against the recorded curve after every
# epoch (a fingerprint of the weights) and its accuracy at the best epoch; each arm's chosen
# trial on seed 0 retrains when the arms stage reaches it (replay_chosen). A unit whose
# fingerprint differs keeps what the replay measured, and the report says so.

REPRODUCED_NLL = 1e-3  # |replayed - recorded| validation NLL/token counted as the same weights


def recorded(results: Path, task: str) -> dict:
    path = results / f"quality-plateau-{task}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def validation_nll(validate: Validator, model_dir: Path) -> float:
    """The reference answers' mean NLL/token on validation, without decoding: Validator's ``nll``."""
    import torch
    from sftjuice.config import ModelConfig
    from sftjuice.evaluation import answer_logprobs, load_judged

    model, chat = load_judged(model_dir, ModelConfig())
    with torch.no_grad():
        return statistics.fmean(-lp for lp in answer_logprobs(model, chat, validate.demos))


def restore_sft_best(work: Path, task: str, record: dict, model: str) -> dict:
    """Retrain a recorded SFT-best unit to its best epoch (see the section comment)."""
    from sftjuice.algorithms.sft import train
    from sftjuice.models import save_model
    from sftjuice.storage import atomic_write_text

    seed, precision, best = record["seed"], record["precision"], record["best_epoch"]
    unit = work / task / f"seed{seed}" / f"sft-best-{precision}"
    done_file, checks_file = unit / "done.json", unit / "replay.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    validate = validator(work, task)
    by_epoch = {e["epoch"]: e for e in record["curve"]}

    def on_epoch_end(epoch: int, run) -> bool:
        save_model(run.policy, run.tokenizer, unit / "epoch")
        result = validate_dir(validate, unit / "epoch") if epoch == best else {"nll": validation_nll(validate, unit / "epoch")}
        checks = [c for c in json.loads(checks_file.read_text()) if c["epoch"] < epoch] if checks_file.exists() else []
        checks.append({"epoch": epoch, "recorded_nll": by_epoch[epoch]["nll"], "replayed_nll": result["nll"]}
                      | ({"recorded_accuracy": by_epoch[epoch]["accuracy"], "replayed_accuracy": result["accuracy"]}
                         if epoch == best else {}))
        if epoch == best:
            shutil.rmtree(unit / "best", ignore_errors=True)
            os.replace(unit / "epoch", unit / "best")
        atomic_write_text(checks_file, json.dumps(checks, indent=1))
        logging.info("restore %s seed %d epoch %d: validation NLL/token %.6f (recorded %.6f)%s", task, seed, epoch,
                     result["nll"], by_epoch[epoch]["nll"],
                     f", accuracy {result['accuracy']:.1%} (recorded {by_epoch[epoch]['accuracy']:.1%})" if epoch == best else "")
        return epoch >= best

    t0 = time.time()
    checks = json.loads(checks_file.read_text()) if checks_file.exists() else []
    if not any(c["epoch"] == best for c in checks):
        assert (record["max_epochs"], record["learning_rate"]) == (MAX_EPOCHS, SFT_LR), "recorded under another schedule"
        train(sft_best_config(work, task, seed, precision, model), on_epoch_end=on_epoch_end)
        checks = json.loads(checks_file.read_text())
    last = checks[-1]
    same = (all(abs(c["replayed_nll"] - c["recorded_nll"]) <= REPRODUCED_NLL for c in checks)
            and last["replayed_accuracy"] == last["recorded_accuracy"])
    result = dict(record, replay={"reproduced": same, "checks": checks, "seconds": round(time.time() - t0, 1)})
    if not same:  # the arms start from the replayed model: judge it by what it measured
        result.update(validation_accuracy=last["replayed_accuracy"], validation_nll=last["replayed_nll"])
    atomic_write_text(done_file, json.dumps(result, indent=1))
    shutil.rmtree(unit / "run" / "checkpoints", ignore_errors=True)
    shutil.rmtree(unit / "run" / "final", ignore_errors=True)
    return result


def restore_records(work: Path, task: str, record: dict) -> None:
    """The finished arm runs, their test answers and the precision timings, copied back from
    the results file (files from before the restore stage kept only seed 0's trial table: no
    best_step or round diagnostics, which replay_chosen measures again for the chosen trial);
    a unit that was running starts over."""
    from sftjuice.storage import atomic_write_text

    def fraction(pct: str) -> float:  # "27.3%" of the validation prompts -> 82/300
        n = VALIDATION[1] - VALIDATION[0]
        return round(float(pct.rstrip("%")) * n / 100) / n

    for run in record.get("arm_runs", []):  # results files written since the restore stage: lossless
        done_file = work / task / f"seed{run['seed']}" / f"arm-{run['arm']}-t{run['trial']}" / "done.json"
        if not done_file.exists():
            model_there = run["model"] and Path(run["model"]).exists()
            atomic_write_text(done_file, json.dumps(run | ({} if model_there else {"model": None}), indent=1))
    for where, answers in record.get("test_answers", {}).items():  # judged once: no model needed again
        if not (work / task / where).exists():
            atomic_write_text(work / task / where, json.dumps(answers))
    for row in record.get("trials", []):
        name, t = row["arm"], row["trial"]
        done_file = work / task / "seed0" / f"arm-{name}-t{t}" / "done.json"
        if row["val acc"] == "" or done_file.exists():  # "": it was running: it starts over
            continue
        curve = [{"epoch": int(e), "step": None, "accuracy": fraction(a), "nll": None}
                 for e, a in (x.split(":") for x in row["curve"].split())]
        atomic_write_text(done_file, json.dumps({
            "task": task, "seed": 0, "arm": name, "method": ARMS[name].method, "trial": t,
            "settings": {**ARMS[name].fixed, **ARMS[name].trials[t]}, "best_epoch": row["best epoch"], "best_step": None,
            "validation_accuracy": fraction(row["val acc"]), "validation_nll": float(row["val NLL"]), "curve": curve,
            "steps": row["steps"], "train_seconds": float(row["train s"]), "validation_seconds": None, "model": None,
            "rounds": [], "restored_from": f"benchmarks/results/quality-plateau-{task}.json"}, indent=1))
    speed_file = work / "precision-speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.exists() else {"runs": [], "restored_from": "benchmarks/results"}
    if not any(r["task"] == task for r in speed["runs"]):
        speed["runs"] += record.get("precision_speed", {}).get("raw", [])
    if not any(r["task"] == task for r in speed["runs"]):  # older files: the rounded table
        for r in record.get("precision_speed", {}).get("runs", []):
            before, after = map(float, r["load before, after"].split(", "))
            speed["runs"].append({"task": task, "precision": r["precision"], "repeat": r["repeat"], "steps": r["steps timed"],
                                  "seconds_per_step": float(r["s/step (median)"]), "load_before": before, "load_after": after})
    atomic_write_text(speed_file, json.dumps(speed, indent=1))


def replay_chosen(work: Path, task: str, name: str, trial: int) -> dict:
    """A restored chosen trial's model on seed 0: its settings trained for its recorded best
    epoch in one run (the arms' schedule is constant, so this equals the tuning run's epoch),
    validated once against the record."""
    from sftjuice.api import train
    from sftjuice.storage import atomic_write_text

    unit = work / task / "seed0" / f"arm-{name}-t{trial}"
    done = json.loads((unit / "done.json").read_text())
    if done["model"]:
        return done
    t0 = time.time()
    final = train(arm_config(work, task, 0, name, ARMS[name].trials[trial], done["best_epoch"], unit / "replay"))
    seconds = time.time() - t0
    result = validate_dir(validator(work, task), final)
    keep_as_best(final, unit)
    same = abs(result["nll"] - done["validation_nll"]) <= REPRODUCED_NLL and result["accuracy"] == done["validation_accuracy"]
    done.update(model=str(unit / "best"), best_step=last_step(unit / "replay"), rounds=round_summary(unit / "replay"),
                replay={"reproduced": same, "recorded_accuracy": done["validation_accuracy"],
                        "replayed_accuracy": result["accuracy"], "recorded_nll": done["validation_nll"],
                        "replayed_nll": result["nll"], "train_seconds": round(seconds, 1),
                        "validation_seconds": result["seconds"]})
    logging.info("restore %s %s trial %d: validation %.1f%% (recorded %.1f%%), NLL/token %.4f (recorded %.4f)", task,
                 name, trial, 100 * result["accuracy"], 100 * done["validation_accuracy"], result["nll"],
                 done["validation_nll"])
    atomic_write_text(unit / "done.json", json.dumps(done, indent=1))
    shutil.rmtree(unit / "replay" / "checkpoints", ignore_errors=True)
    shutil.rmtree(unit / "replay" / "final", ignore_errors=True)
    return done


def replay_words(replay: dict) -> str:
    """A replay's check, for the report: reproduced or not, and by how much."""
    checks = replay.get("checks", [replay])
    nll = max(abs(c["replayed_nll"] - c["recorded_nll"]) for c in checks)
    last = checks[-1]
    acc = f"val acc {last['replayed_accuracy']:.1%} (recorded {last['recorded_accuracy']:.1%})"
    return f"{'reproduced' if replay['reproduced'] else 'replay differs'}: {acc}, NLL/token within {nll:.1e}"


def restore(args, task: str, started: float) -> None:
    record = recorded(args.results, task)
    if not record:
        print(f"{task}: no results file to restore from")
        return
    restore_records(args.work, task, record)
    for sft in sorted(record["sft_best"], key=lambda d: (d["seed"], d["precision"])):
        if sft["precision"] != "fp32":  # only fp32 SFT-best starts the arms
            continue
        if time.time() - started > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes:.0f} min spent: the rest of the stage runs on the next call")
            return
        print(f"== restore {task} SFT-best seed {sft['seed']}", flush=True)
        restore_sft_best(args.work, task, sft, args.model)


# ------------------------------------------------------------------------ report


def load_done(work: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob(pattern))]


def precision_rows(done: list[dict]) -> list[dict]:
    """Seed 0's fp32 and bf16 SFT-best on validation, side by side."""
    rows = []
    for task in TASKS:
        pair = {d["precision"]: d for d in done if d["task"] == task and d["seed"] == 0}
        if set(pair) != {"fp32", "bf16"}:
            continue
        for e in pair["bf16"]["curve"]:
            f = next((x for x in pair["fp32"]["curve"] if x["epoch"] == e["epoch"]), None)
            rows.append({"task": task, "epoch": e["epoch"],
                         "fp32 val acc": f"{f['accuracy']:.1%}" if f else "", "bf16 val acc": f"{e['accuracy']:.1%}",
                         "fp32 val NLL": f"{f['nll']:.4f}" if f else "", "bf16 val NLL": f"{e['nll']:.4f}",
                         "fp32 s/step": f"{pair['fp32']['train_seconds'] / pair['fp32']['steps']:.1f}",
                         "bf16 s/step": f"{pair['bf16']['train_seconds'] / pair['bf16']['steps']:.1f}"})
    return rows


def precision_verdict(done: list[dict], alone_ratio: float | None) -> str:
    """What the precision check decides, in words: bf16 only if it is faster (timed alone, where
    the precision-speed stage ran) and its best validation accuracy over the epochs both ran is
    within noise of fp32's."""
    pair = {d["precision"]: d for d in done if d["seed"] == 0}
    n = min(len(pair["fp32"]["curve"]), len(pair["bf16"]["curve"]))
    best = {p: max(e["accuracy"] for e in pair[p]["curve"][:n]) for p in pair}
    shared = pair["bf16"]["train_seconds"] / pair["bf16"]["steps"] / (pair["fp32"]["train_seconds"] / pair["fp32"]["steps"])
    ratio = shared if alone_ratio is None else alone_ratio
    prompts = VALIDATION[1] - VALIDATION[0]
    noise = 1.96 * (2 * best["fp32"] * (1 - best["fp32"]) / prompts) ** 0.5  # two independent proportions
    close = abs(best["bf16"] - best["fp32"]) <= noise
    timing = (f"In the SFT-best runs above bf16 autocast took {shared:.1f}x fp32's seconds a training step, but other "
              "runs shared the machine then" + (f"; timed alone and alternated (below) it takes {alone_ratio:.2f}x"
                                                if alone_ratio is not None else " (the precision-speed stage has not run)"))
    return (f"{timing}. Best validation accuracy over epochs 1-{n}: fp32 {best['fp32']:.1%}, bf16 {best['bf16']:.1%} "
            f"({'within' if close else 'outside'} ±{noise:.1%}, two independent proportions). "
            + ("bf16 is faster here and within noise: **the better choice on this machine**. " if ratio < 1 and close
               else "**fp32 stays**: bf16 is " + ("slower here" if ratio >= 1 else "outside noise") + ". ")
            + "The benchmark runs in fp32 throughout (chosen before the alone timing), so every arm compares alike.\n")


def report(args) -> None:
    from sftjuice.report import markdown_table, plot_line_panels, text_table, write_json

    done = load_done(args.work, "*/seed*/sft-best-*/done.json")
    planned = sft_best_units(args.seeds)
    ran = {(d["task"], d["seed"], d["precision"]) for d in done}
    for task in args.tasks:
        if not (args.work / task).exists():  # a fresh machine: the committed files are all there is (--stage restore)
            print(f"{task}: nothing under {args.work / task}; its results files stay as they are")
            continue
        mine = [d for d in done if d["task"] == task]
        lines = [f"# Plateau benchmark: {task}, {TRAIN_SIZE} demonstrations"
                 + (f" ({TASKS[task]:.0%} with a wrong step)" if TASKS[task] else " (limited data)"), ""]
        stages = []  # (stage, unit, status)
        for t, s, p in planned:
            if t == task:
                started = (args.work / t / f"seed{s}" / f"sft-best-{p}" / "curve.json").exists()
                stages.append(("sft-best", f"seed {s}, {p}", "done" if (t, s, p) in ran else "under way" if started else "to run"))
        for kind, seed, name, trial in arm_units(task, arms_of(args, task), args.seeds):
            unit = args.work / task / f"seed{seed}" / (f"arm-{name}-t{trial}" if kind == "tune" else "")
            ran_it = (unit / "done.json").exists() if kind == "tune" else tested(args.work, task, seed, name)
            what = f"{name} trial {trial}" if kind == "tune" else f"{name}, seed {seed}"
            stages.append((kind, what, "done" if ran_it else "to run"))
        complete = all(status == "done" for *_, status in stages)
        lines += ["## Stages", "", "| stage | unit | status |", "|---|---|---|"]
        lines += [f"| {stage} | {unit} | {status} |" for stage, unit, status in stages]
        lines.append("")
        lines += ["## SFT-best", "",
                  f"SFT from the base model (lr {SFT_LR:g}, linear decay over {MAX_EPOCHS} epochs, 8 prompts a step), "
                  f"validated after each epoch on {VALIDATION[1] - VALIDATION[0]} validation prompts (greedy, the task's "
                  f"verifier); the best epoch is kept, patience {PATIENCE}.", ""]
        rows = []
        for d in sorted(mine, key=lambda d: (d["seed"], d["precision"])):
            rows.append({"seed": d["seed"], "precision": d["precision"], "best epoch": d["best_epoch"],
                         "best step": d["best_step"], "val acc": f"{d['validation_accuracy']:.1%}",
                         "val NLL/token": f"{d['validation_nll']:.4f}", "stopped at": d["stopped_at_epoch"],
                         "train s": f"{d['train_seconds']:.0f}", "validation s": f"{d['validation_seconds']:.0f}",
                         "curve (epoch: acc)": " ".join(f"{e['epoch']}:{e['accuracy']:.0%}" for e in d["curve"])}
                        | ({"restored": replay_words(d["replay"])} if "replay" in d else {}))
        for t, s_, p in planned:  # a unit under way: its curve so far
            curve_file = args.work / t / f"seed{s_}" / f"sft-best-{p}" / "curve.json"
            if t == task and (t, s_, p) not in ran and curve_file.exists():
                curve = json.loads(curve_file.read_text())
                rows.append({"seed": s_, "precision": p, "best epoch": f"{best_epoch(curve)['epoch']} so far",
                             "val acc": f"{best_epoch(curve)['accuracy']:.1%}", "stopped at": "running",
                             "curve (epoch: acc)": " ".join(f"{e['epoch']}:{e['accuracy']:.1%}" for e in curve)})
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            lines += [markdown_table(rows, columns)]
            if any("replay" in d for d in mine):
                lines += ["restored: the work folder was lost with its machine and rebuilt by `--stage restore`: the "
                          "recorded schedule retrained to the best epoch, validation NLL/token compared with the "
                          "recorded curve after every epoch and accuracy at the best epoch (the largest NLL difference shown).", ""]
            print(f"\n{task}: SFT-best\n" + text_table(rows, columns))
        prec, speed = precision_rows(mine), precision_speed_rows(args.work, task)
        if prec or speed:
            lines += ["## Precision: bf16 autocast against fp32", ""]
        if prec:
            lines += ["Seed 0's SFT-best in each precision, on validation:", "", markdown_table(prec, list(prec[0])),
                      precision_verdict(mine, speed_ratio(args.work, task))]
        elif task not in PRECISION_TASKS and speed:
            lines += [f"The accuracy side of the check ran on {', '.join(PRECISION_TASKS)} only (its results file); "
                      "here, the speed side.", ""]
        if speed:
            lines += [f"Seconds a training step, alone on the machine (the load average counts the run's own threads; "
                      f"{SPEED_STEPS - 1} SFT steps of 8 prompts timed "
                      "after one warm-up step, from the base model, the precisions alternated; `--stage precision-speed`): "
                      f"bf16 takes **{speed_ratio(args.work, task):.2f}x** fp32's.", "", markdown_table(speed, list(speed[0]))]
        first = first_pass(args.work, task)
        if first:
            lines += ["## First pass (seed 0, validation): pruned the grid", "",
                      "8 prompts a step, patience 2 counted from epoch 0 (SFT-best itself). Every finished trial stopped after "
                      "2 epochs without beating SFT-best, so every arm's choice was SFT-best: the test comparison "
                      f"would have been 0 by construction. The trials below now train at least {ARM_MIN_EPOCHS} "
                      f"epochs at {ARM_BATCH} prompts a step, and lr 5e-5 (below SFT-best by 5-15 points for "
                      "irft and spin) left the grid.", "", markdown_table(first, list(first[0])), ""]
        trials, arm_results, diffs = arm_tables(args, task)
        lines += ["## Tuning trials (seed 0, validation only)", "",
                  f"Each trial trains from seed 0's SFT-best epoch by epoch at {ARM_BATCH} prompts a step, "
                  f"at least {ARM_MIN_EPOCHS} passes over the demonstrations and on while validation accuracy "
                  f"improved within {PATIENCE} (up to {ARM_MAX_EPOCHS}; continued SFT up to {ARMS['sft'].max_epochs}), "
                  "validated after each; epoch 0 is SFT-best itself. best epoch: the best trained epoch (>= 1), "
                  "whose model the arm keeps. Every arm gets the same number of trials; the chosen one has the "
                  "best validation accuracy.", ""]
        lines += [markdown_table(trials, list(trials[0])) if trials else "(to run)\n"]
        restored = [f"{d['arm']} trial {d['trial']}" for d in load_done(args.work, f"{task}/seed0/arm-*-t*/done.json")
                    if "restored_from" in d]
        if restored:
            lines += [f"Copied back from this file after the work folder was lost (`--stage restore`): {', '.join(restored)}. "
                      "A chosen trial's model was retrained on seed 0 at its settings for its best epoch before its test "
                      "evaluation; the arms table says whether that replay reproduced the recorded validation scores.", ""]
        lines += [f"## Arms against continued SFT ({BASELINE}) on the held-out test prompts", ""]
        if arm_results:
            columns = list(dict.fromkeys(k for row in arm_results for k in row))  # SFT-best's row has fewer
            lines += [markdown_table(arm_results, columns),
                      "diff: accuracy minus continued SFT's, in points, mean over seeds and prompts, with the 95% "
                      "paired two-level bootstrap interval (seeds, then prompts shared by all seeds); width in points.", "",
                      verdict_text(arm_results, diffs, complete), ""]
            print(f"\n{task}: arms\n" + text_table(arm_results, columns))
        else:
            lines += ["(to run)", ""]
        name = f"quality-plateau-{task}"
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{name}.md").write_text("\n".join(lines) + "\n")
        write_json(args.results / f"{name}.json", {
            "task": task, "train_size": TRAIN_SIZE, "low_quality_fraction": TASKS[task],
            "splits": {"train": [0, TRAIN_SIZE], "validation_train_rows": list(VALIDATION),
                       "test": f"{task}.test.jsonl (500) + train rows {EXTRA_TEST[0]}-{EXTRA_TEST[1] - 1}"},
            "stages": {"sft-best": {f"seed{s}-{p}": (t, s, p) in ran for t, s, p in planned if t == task}},
            "arms": {n: {"method": a.method, "fixed": a.fixed, "trials": a.trials, "max_epochs": a.max_epochs}
                     for n, a in ARMS.items() if n in arms_of(args, task)},
            "sft_best": mine, "trials": trials, "results": arm_results,
            "arm_runs": load_done(args.work, f"{task}/seed*/arm-*-t*/done.json"),
            "test_answers": {str(path.relative_to(args.work / task)): json.loads(path.read_text())
                             for path in sorted((args.work / task).glob("seed*/*/test.json"))},
            "precision_speed": {"runs": speed, "bf16_over_fp32": speed_ratio(args.work, task),
                                "raw": [r for r in precision_speed_raw(args.work) if r["task"] == task]}})
        if mine:
            series = [(f"seed {d['seed']} {d['precision']}", [e["epoch"] for e in d["curve"]],
                       [100 * e["accuracy"] for e in d["curve"]], None) for d in mine]
            nll = [(f"seed {d['seed']} {d['precision']}", [e["epoch"] for e in d["curve"]],
                    [e["nll"] for e in d["curve"]], None) for d in mine]
            plot_line_panels(args.results / f"{name}.png",
                             [("validation accuracy", "accuracy (%)", series), ("validation NLL", "NLL / token", nll)],
                             xlabel="SFT epoch", title=f"{task}: SFT-best curves", columns=2)
        print(f"wrote {args.results / name}.md/.json" + ("/.png" if mine else ""))


def first_pass(work: Path, task: str) -> list[dict]:
    lrs = {"sft": (5e-6, 2e-5, 5e-5)}  # the first pass's grids (pair arms: 2e-6, 1e-5, 5e-5)
    rows = []
    for unit in sorted((work / task / "seed0" / "first-pass").glob("arm-*")):
        curve = json.loads((unit / "curve.json").read_text())
        done = json.loads((unit / "done.json").read_text()) if (unit / "done.json").exists() else None
        arm, trial = unit.name.removeprefix("arm-").rsplit("-t", 1)
        rows.append({"arm": arm, "lr": f"{lrs.get(arm, (2e-6, 1e-5, 5e-5))[int(trial)]:g}",
                     "stopped by": "patience" if done else "the session's end",
                     "steps": curve[-1]["step"], "curve (epoch: val acc)": " ".join(f"{e['epoch']}:{e['accuracy']:.1%}" for e in curve)})
    return rows


def tested(work: Path, task: str, seed: int, name: str) -> dict | None:
    unit = unit_of(work, task, seed, name)
    return json.loads((unit / "test.json").read_text()) if unit and (unit / "test.json").exists() else None


def arm_tables(args, task: str) -> tuple[list[dict], list[dict], dict]:
    """The tuning trials, each arm's test result against continued SFT over the seeds both have,
    and the differences behind that table, by (arm, the arm it is compared with)."""
    from sftjuice.stats import paired_bootstrap_difference

    trials = []
    for name in arms_of(args, task):
        chosen = chosen_trial(args.work, task, name)
        for t in range(len(ARMS[name].trials)):
            path = args.work / task / "seed0" / f"arm-{name}-t{t}" / "done.json"
            if not path.exists():
                if path.with_name("curve.json").exists():
                    curve = json.loads(path.with_name("curve.json").read_text())
                    trials.append({"arm": name, "trial": t, "settings": " ".join(f"{k}={v}" for k, v in ARMS[name].trials[t].items()),
                                   "best epoch": "", "val acc": "", "val NLL": "", "steps": curve[-1]["step"], "train s": "",
                                   "curve": " ".join(f"{e['epoch']}:{e['accuracy']:.1%}" for e in curve), "chosen": "running"})
                continue
            d = json.loads(path.read_text())
            trials.append({"arm": name, "trial": t, "settings": " ".join(f"{k}={v}" for k, v in d["settings"].items()),
                           "best epoch": d["best_epoch"], "val acc": f"{d['validation_accuracy']:.1%}",
                           "val NLL": f"{d['validation_nll']:.4f}", "steps": d["steps"], "train s": f"{d['train_seconds']:.0f}",
                           "curve": " ".join(f"{e['epoch']}:{e['accuracy']:.1%}" for e in d["curve"]),
                           "chosen": "yes" if t == chosen else ""})
    names = [START] + arms_of(args, task)
    seeds = {name: [s for s in range(args.seeds) if tested(args.work, task, s, name)] for name in names}

    diffs = {}

    def versus(name: str, other: str) -> tuple[str, str]:
        both = [s for s in seeds[name] if s in seeds[other]]
        if name == other or not both:
            return "", ""
        d = diffs[name, other] = paired_bootstrap_difference(
            *([[float(c) for c in tested(args.work, task, s, n)["correct"]] for s in both] for n in (name, other)),
            shared_prompts=True)
        return f"{d.points()} {d.verdict}", f"{100 * d.width:.1f}"

    out = []
    for name in names:
        if not seeds[name]:
            continue
        scores = [[float(c) for c in tested(args.work, task, s, name)["correct"]] for s in seeds[name]]
        row = {"arm": name, "seeds": len(scores),
               "test acc (per seed)": f"{statistics.fmean(map(statistics.fmean, scores)):.1%} ("
                                      + " ".join(f"{statistics.fmean(x):.1%}" for x in scores) + ")"}
        row[f"diff vs {BASELINE} [95%]"], row["width"] = versus(name, BASELINE)
        row[f"diff vs {START} [95%]"], _ = versus(name, START)
        if name in VERIFIER_ARMS and VERIFIER_FLOOR in seeds:
            row[f"diff vs {VERIFIER_FLOOR} [95%]"], _ = versus(name, VERIFIER_FLOOR)
        if name == START:
            out.append(row)
            continue
        runs = [json.loads((unit_of(args.work, task, s, name) / "done.json").read_text()) for s in seeds[name]]
        row.update({"epochs": " ".join(str(r["best_epoch"]) for r in runs),
                    "steps": " ".join(str(r["best_step"]) for r in runs),
                    "train s": f"{statistics.fmean(r['train_seconds'] for r in runs):.0f}",
                    "val acc, NLL (seed 0)": f"{runs[0]['validation_accuracy']:.1%}, {runs[0]['validation_nll']:.4f}"
                    + (" (not above SFT-best)" if best_epoch(runs[0]["curve"])["epoch"] == 0 else "")
                    + (f"; {replay_words(runs[0]['replay'])}" if "replay" in runs[0] else "")
                    if seeds[name][0] == 0 else ""})
        rounds_all = [x for r in runs for x in r["rounds"]]
        pairs = sum(x.get("pairs", 0) + x.get("identical_pairs", 0) for x in rounds_all)
        if any("identical_pairs" in x for x in rounds_all) and pairs:
            row["identical pairs"] = f"{sum(x.get('identical_pairs', 0) for x in rounds_all) / pairs:.0%}"
        for key, label in (("heldout_margin", "held-out margin"), ("accuracy", "verified share")):
            values = [x[key] for x in rounds_all if key in x]
            if values:
                row[label] = f"{statistics.fmean(values):.3f}"
        out.append(row)
    return trials, out, diffs


DEMONSTRATION_ONLY = ("irft", "spin", "rft")  # the goal: one of these beats continued SFT
VERIFIER_ARMS = ("steps", "steps-response")  # ... and on the noisy task one of these beats rest
VERIFIER_FLOOR = "rest"


def verdict_text(rows: list[dict], diffs: dict, complete: bool) -> str:
    """The goal's question: which arms' intervals exclude 0 against continued SFT (and, for the
    verifier arms, against rest), and the widest interval. It is final once every planned unit
    has run (`complete`), and "so far" until then."""
    seeds = {r["arm"]: r["seeds"] for r in rows}
    done = {a: d for (a, other), d in diffs.items() if other == BASELINE}
    said = [f"{a} {d.points()} ({d.verdict})" for a, d in done.items()]
    wins = [a for a in DEMONSTRATION_ONLY if a in done and done[a].low > 0]
    heading = "Verdict" if complete else "Verdict so far"
    text = (f"**{heading}** ({min((seeds[a] for a in done), default=0)}+ seeds per arm): against continued SFT, "
            + "; ".join(said) + ". "
            + (f"Demonstration-only arms whose interval excludes 0 above: {', '.join(wins)}. " if wins else
               "No demonstration-only arm (irft, spin, rft) that ran beats continued SFT with an interval excluding 0. ")
            + (f"Widest interval: {max(100 * d.width for d in done.values()):.1f} points (target: at most 8, i.e. ±4)."
               if done else ""))
    against = {a: diffs[a, VERIFIER_FLOOR] for a in VERIFIER_ARMS if (a, VERIFIER_FLOOR) in diffs}
    if against:
        beat = [a for a, d in against.items() if d.low > 0]
        text += (f" Against {VERIFIER_FLOOR} (positive-only self-training with the same verifier): "
                 + "; ".join(f"{a} {d.points()} {d.verdict}" for a, d in against.items()) + ". "
                 + (f"Verifier arms whose interval excludes 0 above {VERIFIER_FLOOR}: {', '.join(beat)}." if beat else
                    f"No verifier arm beats {VERIFIER_FLOOR} with an interval excluding 0."))
    return text


# ------------------------------------------------------------------------ estimate


def estimate(args) -> None:
    """Each planned unit's minutes: measured where it ran, else from the fastest finished unit of
    its task (the machine alone: another job on these 2 cores slows a unit several times)."""
    # a unit the committed results file records has run, whether or not this machine has its work folder
    done = {(d["task"], d["seed"], d["precision"]): d for d in
            [d for t in args.tasks for d in recorded(args.results, t).get("sft_best", [])]
            + load_done(args.work, "*/seed*/sft-best-*/done.json")}
    total = 0.0
    print("stage sft-best (each unit: up to %d epochs, validated after each)" % MAX_EPOCHS)
    for unit in [u for u in sft_best_units(args.seeds) if u[0] in args.tasks]:
        d = done.get(unit)
        if d:
            minutes, how = (d["train_seconds"] + d["validation_seconds"]) / 60, "ran"
        else:
            same = [v for k, v in done.items() if k[0] == unit[0]]
            epochs = statistics.fmean(v["stopped_at_epoch"] for v in same) if same else MAX_EPOCHS
            # the fastest unit's rate: the machine alone (units that shared it ran up to 9x slower)
            per_epoch = min((v["train_seconds"] + v["validation_seconds"]) / v["stopped_at_epoch"]
                            for v in same) if same else (240 if "multistep" in unit[0] else 120)
            minutes, how = epochs * per_epoch / 60, "to run, from " + ("measured units" if same else "a guess")
            total += minutes
        print(f"  {unit[0]} seed {unit[1]} {unit[2]}: {minutes:.0f} min ({how})")
    print(f"remaining in sft-best: about {total:.0f} min")
    remaining = total
    for task in args.tasks:
        sft = [d for (t, _, p), d in done.items() if t == task and p == "fp32"]
        if sft:
            sft_epoch = min(d["train_seconds"] / d["stopped_at_epoch"] for d in sft)  # alone, as above
            val_epoch = min(d["validation_seconds"] / d["stopped_at_epoch"] for d in sft)
        else:
            sft_epoch, val_epoch = (150, 150) if "multistep" in task else (40, 55)
        committed = {r["arm"]: r["seeds"] for r in recorded(args.results, task).get("results", [])}
        if not (args.work / task).exists() and all(committed.get(a) == args.seeds for a in [START, *arms_of(args, task)]):
            print(f"stage arms, {task}: done (every arm on {args.seeds} seeds in the committed results)")
            continue
        finished = load_done(args.work, f"{task}/seed*/arm-*/done.json")
        trained = {}  # seconds per training epoch (with its start-up) by arm
        for d in finished:
            trained.setdefault(d["arm"], []).append(d["train_seconds"] / max(1, len(d["curve"]) - 1))
        tuned = [d for d in finished if d["seed"] == 0]
        epochs = statistics.fmean(len(d["curve"]) - 1 for d in tuned) if tuned else 4.0
        best = statistics.fmean(d["best_epoch"] for d in tuned) if tuned else 2.0
        print(f"stage arms, {task} (per epoch: SFT {sft_epoch:.0f} s, validation {val_epoch:.0f} s, start-up "
              f"{ARM_STARTUP:.0f} s; {epochs:.1f} epochs a trial, the other seeds {best:.1f})")
        task_total = 0.0
        test_eval_seconds = val_epoch * 700 / 300
        for kind, seed, name, trial in arm_units(task, arms_of(args, task), args.seeds):
            unit = args.work / task / f"seed{seed}" / (f"arm-{name}-t{trial}" if kind == "tune" else "")
            if (unit / "done.json").exists() if kind == "tune" else tested(args.work, task, seed, name):
                continue
            if kind == "start":
                task_total += test_eval_seconds / 60
                continue
            train_epoch = statistics.fmean(trained[name]) if name in trained else ARM_COST[name] * sft_epoch + ARM_STARTUP
            if kind == "tune":
                task_total += epochs * (train_epoch + val_epoch) / 60
            else:  # seed 0's is its tuning run; the others train seed 0's best epoch count, unvalidated
                task_total += ((best * train_epoch if seed else 0) + test_eval_seconds) / 60
        print(f"  remaining: about {task_total:.0f} min")
        remaining += task_total
    print(f"all stages: about {remaining / 60:.1f} h remaining")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["sft-best", "arms", "precision-speed", "restore"],
                    help="run (or resume) a stage, then report: sft-best, arms (the tuning trials on seed 0, "
                         "then the chosen trial of every arm on every seed, judged on the test prompts), or "
                         "precision-speed (a training step's seconds in fp32 and bf16, alternated: run it alone, ~10 min), "
                         "or restore (rebuild a lost work folder from the committed results files, retraining SFT-best)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: each task's TASK_ARMS")
    ap.add_argument("--estimate", action="store_true", help="print the stages and their minutes, then exit")
    ap.add_argument("--report", action="store_true", help="rewrite the results files from what has run")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--budget-minutes", type=float, default=60.0, help="start no new unit after this long")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=Path("runs/plateau"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.estimate:
        estimate(args)
        return
    if args.stage == "sft-best":
        started = time.time()
        for task, seed, precision in sft_best_units(args.seeds):
            if task not in args.tasks:
                continue
            if time.time() - started > 60 * args.budget_minutes:
                print(f"budget of {args.budget_minutes:.0f} min spent: the rest of the stage runs on the next call")
                break
            print(f"== sft-best {task} seed {seed} {precision}", flush=True)
            sft_best(args.work, task, seed, precision, args.model)
    if args.stage == "precision-speed":
        precision_speed(args.work, args.model)
    if args.stage == "restore":
        started = time.time()
        for task in args.tasks:
            restore(args, task, started)
    if args.stage == "arms":
        started = time.time()  # one budget for the whole call, not one a task
        for task in args.tasks:
            run_arms(args, task, started)
    report(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
