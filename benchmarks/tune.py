"""Equal-effort tuning for the quality benchmark, on validation prompts.

Every method gets the same search: its learning rate at its default (the method's config in
``sftjuice.config``; the committed results are from before the search picked new ones)
and at one third and three times it, each trained from the same one-epoch SFT model (made as
benchmarks/quality.py makes it: clean demonstrations, seed 0) and judged on validation
prompts: rows of the task's training file after the demonstrations used for training, so
they are held out from training and disjoint from the test prompts the benchmark reports on.

Prints and writes benchmarks/results/tune.md and tune.json.

    python benchmarks/tune.py [--factors 0.333 1 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from importlib.resources import files
from pathlib import Path

from sftjuice.config import METHOD_CONFIGS
from sftjuice.data import load_demonstrations
from sftjuice.demo import DemoConfig, run_stages
from sftjuice.evaluation import evaluate_model
from sftjuice.report import markdown_table, text_table
from sftjuice.storage import read_jsonl, write_jsonl

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0], help="learning-rate multipliers")
    ap.add_argument("--methods", nargs="+", default=["sft", "irft", "spin", "rft"])
    ap.add_argument("--validation-size", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("runs/quality"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    demo = DemoConfig(output=str(args.work / "tune" / "clean-seed0"), methods=[], seed=0, start="sft")
    run_stages(demo)  # the one-epoch SFT model every setting starts from
    sft_model = Path(demo.output) / "sft" / "final"
    train = Path(demo.output) / "data" / "train.jsonl"
    validation = args.work / "tune" / "validation.jsonl"
    rows = read_jsonl(files("sftjuice") / "demo_data" / f"{demo.task}.train.jsonl")
    write_jsonl(validation, rows[demo.train_size: demo.train_size + args.validation_size])

    held_out = load_demonstrations(validation)
    results = [{"method": "sft (start)", "learning rate": "—", **summary(evaluate_model(sft_model, held_out, demo.max_new_tokens)),
                "train s": "0"}]
    for method in args.methods:
        config = METHOD_CONFIGS[method]
        for factor in args.factors:
            lr = config().learning_rate * factor
            out = args.work / "tune" / f"{method}-lr{lr:.1e}"
            timing = out / "train_seconds.json"
            if not timing.exists():
                t0 = time.time()
                monitor = {"eval_data": str(validation), "eval_size": 16} if method in ("irft", "spin") else {}
                sampling = {} if method == "sft" else {"max_new_tokens": demo.max_new_tokens}
                train(config(model=str(sft_model), data=str(train), output=str(out), seed=0, learning_rate=lr,
                             resume=True, **sampling, **monitor))
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                timing.write_text(json.dumps(time.time() - t0))
            ev = out / "validation.json"
            if not ev.exists():
                ev.write_text(json.dumps(summary(evaluate_model(out / "final", held_out, demo.max_new_tokens))))
            results.append({"method": f"sft+{method}", "learning rate": f"{lr:.1e}" + (" (benchmark)" if factor == 1 else ""),
                            **json.loads(ev.read_text()), "train s": f"{json.loads(timing.read_text()):.0f}"})
            shutil.rmtree(out / "final", ignore_errors=True)  # 0.5 GB each; the scores are kept

    columns = list(results[0])
    header = (f"Tuning on {args.validation_size} validation prompts ({demo.task}, clean demonstrations, seed 0, "
              f"{demo.train_size} demonstrations); this invocation took {(time.time() - started) / 60:.0f} min")
    print("\n" + header + "\n\n" + text_table(results, columns))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune.md").write_text(f"# {header}\n\n" + markdown_table(results, columns))
    (RESULTS / "tune.json").write_text(json.dumps({"factors": args.factors, "rows": results}, indent=1))
    print(f"\nwrote {RESULTS / 'tune'}.md/.json")


def summary(ev: dict) -> dict:
    """The validation scores of one model, as table cells."""
    return {"accuracy": "{mean:.1%} [{low:.1%}, {high:.1%}]".format(**ev["accuracy"]),
            "log-prob gap": f"{ev['logprob_gap']['mean']:.2f}"}


if __name__ == "__main__":
    main()
