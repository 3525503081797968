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
import logging
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from .config import DEFAULT_MODEL, TrainConfig, _f
from .data import ChatFormat, load_demonstrations
from .evaluation import answer_logprobs, greedy_responses, mean_interval, proportion, verify
from .models import load_policy, load_tokenizer, resolve_model, stop_token_ids
from .report import markdown_table, plot_bars, text_table, write_json
from .storage import atomic_write_text, read_jsonl, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    output: str = _f("runs/demo", "output directory")
    model: str = _f(DEFAULT_MODEL, "starting model")
    task: str = _f("numbers__round_number", "demo task: a file pair in sftjuice/demo_data")
    train_size: int = _f(128, "demonstrations used for training")
    test_size: int = _f(100, "held-out prompts for evaluation")
    methods: list[str] = _f(["sft", "irft", "spin", "rft"], "methods compared after the shared SFT epoch")
    seed: int = _f(0, "random seed")
    max_new_tokens: int = _f(24, "longest sampled or evaluated answer")


# What each method does after the shared SFT epoch; all start from the SFT model and see
# the same demonstrations once more.
STAGE_SETTINGS = {
    "sft": dict(method="sft", epochs=1.0, learning_rate=5e-5, lr_scheduler="linear"),
    "irft": dict(method="irft", epochs=1.0, rounds=4, passes=1, beta=0.1, loss="logistic",
                 learning_rate=1e-5, lr_scheduler="constant"),
    "spin": dict(method="spin", iterations=1, passes=1, beta=0.1, loss="logistic",
                 learning_rate=1e-5, lr_scheduler="constant"),
    "rft": dict(method="rft", epochs=1.0, rounds=4, num_samples=2, policy_steps=1, beta=0.1,
                learning_rate=1e-5, reward_learning_rate=2e-5, lr_scheduler="constant"),
}


@dataclass
class Stage:
    name: str
    start: str  # stage whose final model this one starts from ("" = the base model)
    settings: dict = field(default_factory=dict)


def stages(cfg: DemoConfig) -> list[Stage]:
    unknown = [m for m in cfg.methods if m not in STAGE_SETTINGS]
    if unknown:
        from .config import SftjuiceError

        raise SftjuiceError(f"--methods: unknown {unknown}; choose from {sorted(STAGE_SETTINGS)}")
    out = [Stage("base", ""), Stage("sft", "base", STAGE_SETTINGS["sft"])]
    for m in cfg.methods:
        out.append(Stage(f"sft+{m}" if m != "sft" else "sft+sft", "sft", STAGE_SETTINGS[m]))
    return out


def prepare_data(cfg: DemoConfig, out: Path) -> tuple[Path, Path]:
    data = files("sftjuice") / "demo_data"
    train, test = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    if not train.exists():
        write_jsonl(train, read_jsonl(data / f"{cfg.task}.train.jsonl")[: cfg.train_size])
        write_jsonl(test, read_jsonl(data / f"{cfg.task}.test.jsonl")[: cfg.test_size])
    return train, test


def evaluate(model_dir: Path, test: Path, cfg: DemoConfig) -> dict:
    tok = load_tokenizer(model_dir)
    model = load_policy(TrainConfig(), model_dir, trainable=False)
    chat = ChatFormat(tok, stop_token_ids(model))
    demos = load_demonstrations(test)
    responses = greedy_responses(model, chat, demos, cfg.max_new_tokens)
    correct = [verify(r, d.completion) for r, d in zip(responses, demos)]
    loglik = answer_logprobs(model, chat, demos)
    return {"accuracy": vars(proportion(sum(correct), len(correct))), "answer_logprob": vars(mean_interval(loglik)),
            "correct": correct, "responses": responses}


def run_demo(cfg: DemoConfig) -> None:
    out = Path(cfg.output)
    train, test = prepare_data(cfg, out)
    base = resolve_model(cfg.model)
    plan = stages(cfg)
    models = {"base": base}
    results = []
    for i, stage in enumerate(plan, start=1):
        stage_dir = out / stage.name
        log.info("[%d/%d] %s%s", i, len(plan), stage.name, f" (from {stage.start})" if stage.start else "")
        seconds = 0.0
        if stage.start:
            timing = stage_dir / "train_seconds.json"
            if not (stage_dir / "final").exists():
                t0 = time.time()
                tcfg = TrainConfig(model=str(models[stage.start]), data=str(train), output=str(stage_dir),
                                   seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                                   resume=(stage_dir / "checkpoints").exists(), **stage.settings)
                from .algorithms import METHODS

                METHODS[tcfg.method](tcfg)
                atomic_write_text(timing, json.dumps(time.time() - t0))
            seconds = json.loads(timing.read_text())
            models[stage.name] = stage_dir / "final"
        eval_file = stage_dir / "eval.json"
        if not eval_file.exists():
            write_json(eval_file, evaluate(models[stage.name], test, cfg))
        ev = json.loads(eval_file.read_text())
        acc, ll = ev["accuracy"], ev["answer_logprob"]
        results.append({
            "stage": stage.name, "accuracy": f"{acc['mean']:.1%} [{acc['low']:.1%}, {acc['high']:.1%}]",
            "answer log-prob/token": f"{ll['mean']:.3f} ± {(ll['high'] - ll['mean']):.3f}",
            "train seconds": f"{seconds:.0f}", "_acc": acc, "_ll": ll,
        })
        log.info("%s: accuracy %s, answer log-prob/token %s", stage.name, results[-1]["accuracy"],
                 results[-1]["answer log-prob/token"])
    report(cfg, out, results)


def report(cfg: DemoConfig, out: Path, results: list[dict]) -> None:
    columns = ["stage", "accuracy", "answer log-prob/token", "train seconds"]
    header = (f"sftjuice demo: {cfg.task}, {cfg.train_size} demonstrations, {cfg.test_size} held-out prompts, "
              f"greedy decoding, exact-match verifier (95% intervals)")
    print("\n" + header + "\n\n" + text_table(results, columns) + "\n")
    atomic_write_text(out / "results.md", f"# {header}\n\n" + markdown_table(results, columns))
    write_json(out / "results.json", [{k: v for k, v in r.items() if not k.startswith("_")} | {
        "accuracy_estimate": r["_acc"], "answer_logprob_estimate": r["_ll"]} for r in results])
    names = [r["stage"] for r in results]
    plot_bars(out / "results.png", names, [
        ("held-out accuracy", [r["_acc"]["mean"] for r in results], [(r["_acc"]["low"], r["_acc"]["high"]) for r in results]),
        ("answer log-prob / token", [r["_ll"]["mean"] for r in results], [(r["_ll"]["low"], r["_ll"]["high"]) for r in results]),
    ], title=f"sftjuice demo: {cfg.task}, {cfg.train_size} demonstrations")
    print(f"results: {out / 'results.md'}, {out / 'results.png'}")
