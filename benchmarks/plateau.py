"""The plateau question (issue 25): does any method beat continued SFT when every method
starts from an SFT model trained to its best?

The earlier quality benchmark (quality.py) started every method from one SFT epoch (4-16
optimiser steps), from which three more SFT epochs gained 5.5 points: more SFT won by
default. Here every arm starts from **SFT-best**: SFT for up to 12 epochs, validated after
each epoch, keeping the best epoch (patience 2). The protocol runs in stages of at most
about an hour, each resumable after a kill and committed when it ends:

  sft-best   SFT-best per (task, seed), fp32; on seed 0 also bf16 autocast (precision check)
  (tune)     trials on the validation split, seed 0, the same count for every arm   [to come]
  (arms)     every arm from SFT-best, 3 seeds, judged on the held-out prompts          [to come]

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
    """Greedy accuracy (the task's verifier) and the reference answers' per-token NLL of a model in memory."""
    demos: list
    max_new_tokens: int
    verifier: str

    def __call__(self, model, chat) -> dict:
        import torch
        from sftjuice.evaluation import answer_logprobs, greedy_responses, question, reference_answer
        from sftjuice.verifiers import load_verifier

        was_training = model.training
        model.eval()
        t0 = time.time()
        with torch.no_grad():
            responses = greedy_responses(model, chat, self.demos, self.max_new_tokens)
            per_token = answer_logprobs(model, chat, self.demos)
        model.train(was_training)
        verify = load_verifier(self.verifier)
        correct = [verify(question(d), r, reference_answer(d)) >= 0.5 for r, d in zip(responses, self.demos)]
        return {"accuracy": sum(correct) / len(correct), "nll": -statistics.fmean(per_token),
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


# ------------------------------------------------------------------------ stage 1: SFT-best


def sft_best(work: Path, task: str, seed: int, precision: str, model: str) -> dict:
    """SFT for up to MAX_EPOCHS epochs from the base model, validated after each; ``best/`` is the
    best epoch's model. Resumable: the SFT run resumes from its last epoch checkpoint and the
    curve (curve.json) is rewritten epoch by epoch, so a kill loses at most one epoch."""
    from sftjuice.algorithms.sft import train
    from sftjuice.config import SFTConfig
    from sftjuice.models import save_model
    from sftjuice.storage import atomic_write_text

    unit = work / task / f"seed{seed}" / f"sft-best-{precision}"
    done_file = unit / "done.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    curve_file = unit / "curve.json"
    validate = validator(work, task)
    spent = {"validation": 0.0}

    def on_epoch_end(epoch: int, run) -> bool:
        curve = [e for e in json.loads(curve_file.read_text()) if e["epoch"] < epoch] if curve_file.exists() else []
        result = validate(run.policy, run.chat)
        spent["validation"] += result["seconds"]
        curve.append({"epoch": epoch, "step": epoch * -(-TRAIN_SIZE // run.prompts_per_step),
                      **{k: result[k] for k in ("accuracy", "nll", "seconds")}})
        if best_epoch(curve)["epoch"] == epoch:
            save_model(run.policy, run.tokenizer, unit / "best")
        atomic_write_text(curve_file, json.dumps(curve, indent=1))
        logging.info("%s seed %d %s epoch %d: validation accuracy %.1f%%, NLL/token %.4f", task, seed, precision,
                     epoch, 100 * result["accuracy"], result["nll"])
        return patience_spent(curve)

    t0 = time.time()
    cfg = SFTConfig(model=model, data=str(train_file(work, task, seed)), output=str(unit / "run"), seed=seed,
                    epochs=float(MAX_EPOCHS), learning_rate=SFT_LR, bf16="true" if precision == "bf16" else "false",
                    resume=True)
    if not (curve_file.exists() and patience_spent(json.loads(curve_file.read_text()))):  # else: stopped, killed before done.json
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
              "max_epochs": MAX_EPOCHS, "patience": PATIENCE}
    atomic_write_text(done_file, json.dumps(result, indent=1))
    shutil.rmtree(unit / "run" / "checkpoints", ignore_errors=True)  # ~1.6 GB; best/ is what later stages start from
    shutil.rmtree(unit / "run" / "final", ignore_errors=True)  # the last epoch's model: not the one kept
    return result


def sft_best_units(seeds: int) -> list[tuple[str, int, str]]:
    """(task, seed, precision): seed 0 in both precisions first (the precision check), then the other seeds."""
    units = [(t, 0, p) for t in TASKS for p in ("fp32", "bf16")]
    return units + [(t, s, "fp32") for s in range(1, seeds) for t in TASKS]


# ------------------------------------------------------------------------ report


def load_done(work: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob(pattern))]


def precision_rows(done: list[dict]) -> list[dict]:
    """Seed 0's fp32 and bf16 SFT-best on validation, side by side."""
    from sftjuice.stats import paired_bootstrap_difference

    rows = []
    for task in TASKS:
        pair = {d["precision"]: d for d in done if d["task"] == task and d["seed"] == 0}
        if set(pair) != {"fp32", "bf16"}:
            continue
        row = {"task": task}
        for p in ("fp32", "bf16"):
            d = pair[p]
            row[f"{p} acc"] = f"{d['validation_accuracy']:.1%} (epoch {d['best_epoch']})"
            row[f"{p} s/step"] = f"{d['train_seconds'] / d['steps']:.2f}"
        rows.append(row)
    return rows


def report(args) -> None:
    from sftjuice.report import markdown_table, plot_line_panels, text_table, write_json

    done = load_done(args.work, "*/seed*/sft-best-*/done.json")
    planned = sft_best_units(args.seeds)
    ran = {(d["task"], d["seed"], d["precision"]) for d in done}
    for task in args.tasks:
        mine = [d for d in done if d["task"] == task]
        lines = [f"# Plateau benchmark: {task}, {TRAIN_SIZE} demonstrations"
                 + (f" ({TASKS[task]:.0%} with a wrong step)" if TASKS[task] else " (limited data)"), ""]
        lines += ["## Stages", "",
                  "| stage | unit | status |", "|---|---|---|"]
        for t, s, p in planned:
            if t == task:
                lines.append(f"| sft-best | seed {s}, {p} | {'done' if (t, s, p) in ran else 'to run'} |")
        lines += ["| tune | seed 0, validation | to run |", "| arms | 3 seeds, test prompts | to run |", ""]
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
                         "curve (epoch: acc)": " ".join(f"{e['epoch']}:{e['accuracy']:.0%}" for e in d["curve"])})
        if rows:
            lines += [markdown_table(rows, list(rows[0]))]
            print(f"\n{task}: SFT-best\n" + text_table(rows, list(rows[0])))
        prec = precision_rows(mine)
        if prec:
            lines += ["## Precision (seed 0, validation)", "", markdown_table(prec, list(prec[0]))]
        name = f"quality-plateau-{task}"
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{name}.md").write_text("\n".join(lines) + "\n")
        write_json(args.results / f"{name}.json", {
            "task": task, "train_size": TRAIN_SIZE, "low_quality_fraction": TASKS[task],
            "splits": {"train": [0, TRAIN_SIZE], "validation_train_rows": list(VALIDATION),
                       "test": f"{task}.test.jsonl (500) + train rows {EXTRA_TEST[0]}-{EXTRA_TEST[1] - 1}"},
            "stages": {"sft-best": {f"seed{s}-{p}": (t, s, p) in ran for t, s, p in planned if t == task},
                       "tune": "to run", "arms": "to run"},
            "sft_best": mine})
        if mine:
            series = [(f"seed {d['seed']} {d['precision']}", [e["epoch"] for e in d["curve"]],
                       [100 * e["accuracy"] for e in d["curve"]], None) for d in mine]
            nll = [(f"seed {d['seed']} {d['precision']}", [e["epoch"] for e in d["curve"]],
                    [e["nll"] for e in d["curve"]], None) for d in mine]
            plot_line_panels(args.results / f"{name}.png",
                             [("validation accuracy", "accuracy (%)", series), ("validation NLL", "NLL / token", nll)],
                             xlabel="SFT epoch", title=f"{task}: SFT-best curves", columns=2)
        print(f"wrote {args.results / name}.md/.json" + (".png" if mine else ""))


# ------------------------------------------------------------------------ estimate


def estimate(args) -> None:
    """Each planned unit's minutes: measured where it ran, else from the finished units of its task."""
    done = {(d["task"], d["seed"], d["precision"]): d for d in load_done(args.work, "*/seed*/sft-best-*/done.json")}
    total = 0.0
    print("stage sft-best (each unit: up to %d epochs, validated after each)" % MAX_EPOCHS)
    for unit in sft_best_units(args.seeds):
        d = done.get(unit)
        if d:
            minutes, how = (d["train_seconds"] + d["validation_seconds"]) / 60, "ran"
        else:
            same = [v for k, v in done.items() if k[0] == unit[0]]
            epochs = statistics.fmean(v["stopped_at_epoch"] for v in same) if same else MAX_EPOCHS
            per_epoch = statistics.fmean((v["train_seconds"] + v["validation_seconds"]) / v["stopped_at_epoch"]
                                         for v in same) if same else (240 if "multistep" in unit[0] else 120)
            minutes, how = epochs * per_epoch / 60, "to run, from " + ("measured units" if same else "a guess")
            total += minutes
        print(f"  {unit[0]} seed {unit[1]} {unit[2]}: {minutes:.0f} min ({how})")
    print(f"remaining in sft-best: about {total:.0f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["sft-best"], help="run (or resume) a stage, then report")
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
    report(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
