"""Does reward learning beat SFT here? SFT, SPIN, IRFT (T > 1) and RFT from the same
demonstrations, several seeds, clean and partly low-quality demonstrations.

Each (condition, seed) is one run of the demo's stages (src/sftjuice/demo.py): one SFT
epoch from the base model, then from that SFT model one more epoch of each method on the
same demonstrations: more SFT (the compute-matched baseline), IRFT, SPIN and RFT. Held-out
prompts of the task judge every model with the answer verifier.

Prints and writes benchmarks/results/quality.md, quality.json and quality.png: accuracy
(mean over seeds with a 95% t-interval), win rate against the continued SFT (prompt by
prompt, pooled over seeds, ties apart), the log-prob gap between reference and wrong
answers, the IRFT/SPIN implicit-reward margin on held-out pairs per round, and wall time.

    python benchmarks/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from sftjuice.demo import DemoConfig, run_stages
from sftjuice.evaluation import compare
from sftjuice.report import markdown_table, plot_bars, text_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_t(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (Student t over seeds)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def margins_by_round(stage_dir: Path) -> list[float]:
    metrics = stage_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    rounds = [json.loads(line) for line in metrics.read_text().splitlines() if '"event": "round"' in line]
    return [r["heldout_margin"] for r in rounds if "heldout_margin" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, clean demonstrations only, 32 of them, 40 prompts (< 10 minutes)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=96)
    ap.add_argument("--test-size", type=int, default=100)
    ap.add_argument("--low-quality", type=float, default=0.3, help="share of demonstrations replaced in the noisy condition")
    ap.add_argument("--task", default="numbers__round_number")
    ap.add_argument("--methods", nargs="+", default=["sft", "irft", "spin", "rft"])
    ap.add_argument("--work", type=Path, default=Path("runs/quality"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        args.seeds, args.train_size, args.test_size = 1, 32, 40
    started = time.time()
    runs: dict[str, list[list[dict]]] = {}
    conditions = {"clean": 0.0, f"{args.low_quality:.0%} low-quality": args.low_quality}
    if args.quick:
        conditions = {"clean": 0.0}
    base_eval = None
    for cond, fraction in conditions.items():
        for seed in range(args.seeds):
            out = args.work / ("quick" if args.quick else "full") / cond.split()[0] / f"seed{seed}"
            if base_eval and not (out / "base" / "eval.json").exists():  # greedy base: the same everywhere
                (out / "base").mkdir(parents=True, exist_ok=True)
                shutil.copy(base_eval, out / "base" / "eval.json")
            print(f"== {cond}, seed {seed}: {out}", flush=True)
            cfg = DemoConfig(output=str(out), task=args.task, train_size=args.train_size, test_size=args.test_size,
                             methods=args.methods, seed=seed, low_quality_fraction=fraction)
            results = run_stages(cfg)
            for r in results:
                r["margins"] = margins_by_round(out / r["stage"])
            runs.setdefault(cond, []).append(results)
            base_eval = out / "base" / "eval.json"
    report(args, runs, time.time() - started)


def report(args, runs: dict[str, list[list[dict]]], seconds: float) -> None:
    rows, plot_rows = [], []
    for cond, seeds in runs.items():
        stages = [r["stage"] for r in seeds[0]]
        baseline = "sft+sft" if "sft+sft" in stages else "sft"
        for i, stage in enumerate(stages):
            per_seed = [s[i] for s in seeds]
            acc, acc_hw = mean_t([r["accuracy"]["mean"] for r in per_seed])
            gap, gap_hw = mean_t([r["logprob_gap"]["mean"] for r in per_seed])
            base = [s[stages.index(baseline)] for s in seeds]
            wins = compare([float(c) for r in per_seed for c in r["correct"]],
                           [float(c) for r in base for c in r["correct"]])
            rate = wins.rate()
            margins = [r["margins"] for r in per_seed if r["margins"]]
            rounds = [sum(m[t] for m in margins) / len(margins) for t in range(len(margins[0]))] if margins else []
            rows.append({
                "condition": cond, "method": stage,
                "accuracy": f"{acc:.1%} ± {acc_hw:.1%}" if len(per_seed) > 1 else "{mean:.1%} [{low:.1%}, {high:.1%}]".format(**per_seed[0]["accuracy"]),
                f"win rate vs {baseline}": "—" if stage == baseline else f"{rate.mean:.2f} [{rate.low:.2f}, {rate.high:.2f}] ({wins.wins}/{wins.ties}/{wins.losses})",
                "log-prob gap": f"{gap:.2f}" + (f" ± {gap_hw:.2f}" if len(per_seed) > 1 else ""),
                "held-out margin by round": " ".join(f"{m:.2f}" for m in rounds),
                "train s": f"{sum(r['train_seconds'] for r in per_seed) / len(per_seed):.0f}",
            })
            seconds_mean = sum(r["train_seconds"] for r in per_seed) / len(per_seed)
            one = per_seed[0]["accuracy"]  # one seed: the Wilson interval over prompts
            interval = (acc - acc_hw, acc + acc_hw) if len(per_seed) > 1 else (one["low"], one["high"])
            plot_rows.append((f"{cond.split()[0]}:{stage}", acc, interval, gap, float("nan") if stage == baseline else rate.mean,
                              seconds_mean))
    columns = list(rows[0])
    header = (f"Quality: {args.task}, {args.train_size} demonstrations, {args.test_size} held-out prompts, "
              f"{args.seeds} seed(s), greedy decoding, exact-match verifier; this invocation took {seconds / 60:.0f} min (finished stages are reused)")
    print("\n" + header + "\n\n" + text_table(rows, columns))
    RESULTS.mkdir(exist_ok=True)
    name = "quality-quick" if args.quick else "quality"
    (RESULTS / f"{name}.md").write_text(
        f"# {header}\n\n" + markdown_table(rows, columns)
        + "\nAccuracy: mean over seeds ± 95% t half-width (one seed: Wilson interval over prompts). "
          "Win rate: prompts where the method is right and the baseline wrong, over prompts where exactly one "
          "is right (wins/ties/losses pooled over seeds). Log-prob gap: log pi(reference answer) - "
          "log pi(another question's answer) on held-out prompts. Held-out margin: IRFT/SPIN implicit-reward "
          "margin beta*[log pi/pi_t](y^E) - beta*[log pi/pi_t](y_hat) on held-out prompts, end of each round.\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                                      "seconds": seconds}, indent=1))
    plot_bars(RESULTS / f"{name}.png", [p[0] for p in plot_rows], [
        ("held-out accuracy", [p[1] for p in plot_rows], [p[2] for p in plot_rows]),
        ("log-prob gap (reference - wrong)", [p[3] for p in plot_rows], None),
        ("win rate vs continued SFT", [p[4] for p in plot_rows], None),
        ("train seconds (mean over seeds)", [p[5] for p in plot_rows], None),
    ], title=header.split(";")[0])
    print(f"\nwrote {RESULTS / name}.md/.json/.png")


if __name__ == "__main__":
    main()
