"""``sftjuice demo``: the whole idea on the default model, in minutes on a laptop CPU.

Demonstrations: questions and answers of DeepMind's mathematics_dataset generator (shipped
in ``sftjuice/demo_data``, made by ``scripts/make_demo_data.sh``). The base model answers
in sentences, so SFT first teaches it the task; then, from that SFT model and on the
same demonstrations, each method spends about one more epoch: more SFT, or reward
learning (IRFT, SPIN, RFT). Held-out prompts judge them all with a verifier.

Every stage writes its model and evaluation under OUTPUT/<stage>/; running the demo
again skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import json
import shutil
import logging
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .config import DEFAULT_MODEL, METHOD_CONFIGS, Checked, SftjuiceError, _f
from .data import load_demonstrations
from .evaluation import evaluate_model
from .models import resolve_model
from .report import markdown_table, plot_bars, text_table, write_json
from .storage import atomic_write_text, read_jsonl, write_jsonl
from .api import train

log = logging.getLogger(__name__)


@dataclass
class DemoConfig(Checked):
    output: str = _f("runs/demo", "output directory")
    model: str = _f(DEFAULT_MODEL, "starting model")
    task: str = _f("numbers__round_number", "demo task: a file pair in sftjuice/demo_data")
    train_size: int = _f(96, "demonstrations used for training", ge=2)
    test_size: int = _f(100, "held-out prompts for evaluation", ge=2)
    methods: list[str] = _f(["sft", "irft", "spin", "rft"], "methods compared after the shared SFT epoch")
    seed: int = _f(0, "random seed", ge=0)
    max_new_tokens: int = _f(16, "longest sampled or evaluated answer (the task's answers take at most 11 tokens)", ge=1)
    low_quality_fraction: float = _f(0.0, "share of training demonstrations replaced by another question's answer", ge=0, le=1)


@dataclass
class Stage:
    name: str
    start: str  # stage whose final model this one starts from ("" = the base model)
    method: str = ""


def stages(cfg: DemoConfig) -> list[Stage]:
    """The base model, one SFT epoch from it, then from that SFT model one more epoch of each
    method, each at its defaults (the settings the quality benchmark tuned)."""
    unknown = [m for m in cfg.methods if m not in METHOD_CONFIGS]
    if unknown:
        raise SftjuiceError(f"--methods: unknown {unknown}; choose from {', '.join(METHOD_CONFIGS)}")
    return [Stage("base", ""), Stage("sft", "base", "sft")] + [Stage(f"sft+{m}", "sft", m) for m in cfg.methods]


def prepare_data(cfg: DemoConfig, out: Path) -> tuple[Path, Path]:
    """The train and held-out files of the run. With ``low_quality_fraction``, that share of
    the training demonstrations get the answer of another training question: well-formed,
    plausible and wrong, the kind of noise a demonstration set has."""
    import random

    data = files("sftjuice") / "demo_data"
    train, test = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    if not train.exists():
        rows = read_jsonl(data / f"{cfg.task}.train.jsonl")[: cfg.train_size]
        rng = random.Random(cfg.seed)
        for i in rng.sample(range(len(rows)), round(cfg.low_quality_fraction * len(rows))):
            j = rng.choice([k for k in range(len(rows)) if rows[k]["completion"] != rows[i]["completion"]])
            rows[i] = {**rows[i], "completion": rows[j]["completion"], "low_quality": True}
        write_jsonl(test, read_jsonl(data / f"{cfg.task}.test.jsonl")[: cfg.test_size])
        write_jsonl(train, rows)
    return train, test


def run_stages(cfg: DemoConfig) -> list[dict]:
    """Train and evaluate every stage (skipping finished ones); one result dict per stage."""
    out = Path(cfg.output)
    train_file, test = prepare_data(cfg, out)
    test_demos = load_demonstrations(test)
    plan = stages(cfg)
    models = {"base": resolve_model(cfg.model)}
    results = []
    for i, stage in enumerate(plan, start=1):
        stage_dir = out / stage.name
        log.info("[%d/%d] %s%s", i, len(plan), stage.name, f" (from {stage.start})" if stage.start else "")
        seconds = 0.0
        if stage.start:
            timing = stage_dir / "train_seconds.json"
            if not (stage_dir / "final").exists():
                t0 = time.time()
                # IRFT/SPIN also report their implicit reward's margin on held-out prompts each round
                monitor = {"eval_data": str(test), "eval_size": 16} if stage.method in ("irft", "spin") else {}
                train(METHOD_CONFIGS[stage.method](
                    model=str(models[stage.start]), data=str(train_file), output=str(stage_dir), seed=cfg.seed,
                    **({} if stage.method == "sft" else {"max_new_tokens": cfg.max_new_tokens}), resume=True, **monitor))
                atomic_write_text(timing, json.dumps(time.time() - t0))
                # checkpoints only serve to resume this stage (~1.6 GB each with optimiser state)
                shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
            seconds = json.loads(timing.read_text())
            models[stage.name] = stage_dir / "final"
        eval_file = stage_dir / "eval.json"
        if not eval_file.exists():
            write_json(eval_file, evaluate_model(models[stage.name], test_demos, cfg.max_new_tokens))
        ev = json.loads(eval_file.read_text())
        results.append({"stage": stage.name, "start": stage.start, "train_seconds": seconds, **ev})
        acc, ll, gap = ev["accuracy"], ev["answer_logprob"], ev["logprob_gap"]
        log.info("%s: accuracy %.1f%% [%.1f%%, %.1f%%], answer log-prob/token %.3f, log-prob gap %.2f",
                 stage.name, 100 * acc["mean"], 100 * acc["low"], 100 * acc["high"], ll["mean"], gap["mean"])
    return results


def run_demo(cfg: DemoConfig) -> None:
    report(cfg, Path(cfg.output), run_stages(cfg))


def report(cfg: DemoConfig, out: Path, results: list[dict]) -> None:
    rows = [{
        "stage": r["stage"],
        "accuracy": "{mean:.1%} [{low:.1%}, {high:.1%}]".format(**r["accuracy"]),
        "answer log-prob/token": "{:.3f} ± {:.3f}".format(r["answer_logprob"]["mean"], r["answer_logprob"]["high"] - r["answer_logprob"]["mean"]),
        "log-prob gap": "{:.2f} ± {:.2f}".format(r["logprob_gap"]["mean"], r["logprob_gap"]["high"] - r["logprob_gap"]["mean"]),
        "train seconds": f"{r['train_seconds']:.0f}",
    } for r in results]
    columns = list(rows[0])
    header = (f"sftjuice demo: {cfg.task}, {cfg.train_size} demonstrations"
              + (f" ({cfg.low_quality_fraction:.0%} low-quality)" if cfg.low_quality_fraction else "")
              + f", {cfg.test_size} held-out prompts, greedy decoding, exact-match verifier (95% intervals)")
    print("\n" + header + "\n\n" + text_table(rows, columns) + "\n")
    atomic_write_text(out / "results.md", f"# {header}\n\n" + markdown_table(rows, columns)
                      + "\nStages after `sft` start from the SFT model and see the demonstrations once more. "
                        "Log-prob gap: log pi(reference answer) - log pi(another question's answer).\n")
    write_json(out / "results.json", [{k: v for k, v in r.items() if k not in ("correct", "responses")} for r in results])
    names = [r["stage"] for r in results]
    panels = [(label, [r[key]["mean"] for r in results], [(r[key]["low"], r[key]["high"]) for r in results])
              for label, key in (("held-out accuracy", "accuracy"), ("answer log-prob / token", "answer_logprob"),
                                 ("log-prob gap (reference - wrong)", "logprob_gap"))]
    plot_bars(out / "results.png", names, panels, title=f"sftjuice demo: {cfg.task}, {cfg.train_size} demonstrations")
    print(f"results: {out / 'results.md'}, {out / 'results.png'}")
