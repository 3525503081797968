"""Does reward learning beat continued SFT here? Every registered method against more SFT,
on the same demonstrations, several seeds, several tasks and data conditions.

Each (task, condition, seed) is one run of the demo's stages (src/sftjuice/demo.py): one
SFT epoch from the base model, then from that SFT model one more epoch of each method on
the same demonstrations: more SFT ("sft+sft", the baseline), "sft+sft3" (three more SFT
epochs: continued SFT with about the compute of the costliest method), IRFT, SPIN, RFT
and every other method registered in sftjuice.algorithms. Held-out prompts of the task,
the same for every seed, judge every model with the task's verifier.

Conditions: clean (--train-size demonstrations), low-quality (the same with --low-quality
of them made wrong: another question's answer for round_number, a slipped or skipped
step carried to the answer for multistep_arithmetic) and limited (--limited-size clean
demonstrations).

The primary figure is each method's accuracy difference to continued SFT: the mean over
seeds and prompts, with a 95% paired two-level bootstrap interval (seeds, then prompts,
one prompt draw shared by all seeds: sftjuice.stats.paired_bootstrap_difference with
shared_prompts=True), so training-seed variance is in the interval. A method "wins" or
"loses" only when that interval excludes 0. Also reported: per-seed accuracies,
wins/ties/losses prompt by prompt (pooled over seeds; a count, not a test), the log-prob
gap between reference and wrong answers, per-round diagnostics from the method's
metrics.jsonl, and training seconds.

    python benchmarks/quality.py            # full run: writes benchmarks/results/quality.{md,json,png}
    python benchmarks/quality.py --quick    # round_number, clean, 1 seed, 32 demos, 40 prompts: quality-quick.*
    python benchmarks/quality.py --estimate # stages and time of the full run, from quality-quick.json

Runs are resumable stage by stage: --work/{quick,full}/<task>/<condition>/seed<k>/<stage>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from sftjuice.report import markdown_table, plot_intervals, plot_line_panels, text_table, write_json
from sftjuice.stats import paired_bootstrap_difference

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BASELINE = "sft+sft"
CONDITIONS = ("clean", "low-quality", "limited")
TASKS = ["numbers__round_number", "multistep_arithmetic"]
QUICK = {"tasks": ["numbers__round_number"], "conditions": ["clean"], "seeds": 1, "train_size": 32, "test_size": 40}
QUICK_METHODS = ["sft", "irft", "spin", "rft", "srppo", "rest"]  # the quick run's (if registered); the full run takes all
BUDGET_HOURS = 3.0
RESAMPLES = 10000
# per-round numbers worth showing, by metrics.jsonl key ("event": "round" or "reward" records); the
# first one a stage has is shown: IRFT/SPIN the implicit reward's margin on held-out pairs; RFT/SRPPO
# the reward's accuracy ranking each demonstration over fresh samples (before the round's step);
# RSO the rejection sampler's acceptance rate; steps/rest the share of the round's samples verified
ROUND_KEYS = {"heldout_margin": "margin", "reward_heldout_accuracy": "r-acc", "acceptance_rate": "accept",
              "accuracy": "verified"}
ROUND_LABELS = {"heldout_margin": "implicit-reward margin, held-out pairs", "reward_heldout_accuracy": "reward ranking accuracy",
                "acceptance_rate": "rejection-sampling acceptance", "accuracy": "share of samples verified"}
PATH_FIELDS = {"model", "data", "output", "eval_data", "reward_model", "base_model", "prompts", "resume", "overwrite"}


# ------------------------------------------------------------------------- statistics


def round_diagnostics(stage_dir: Path) -> dict[str, list[float]]:
    """Per-round numbers of a stage from its metrics.jsonl: {key: [value per round]}."""
    metrics = stage_dir / "metrics.jsonl"
    if not metrics.exists():
        return {}
    out: dict[str, list[float]] = {}
    for line in metrics.read_text().splitlines():
        if '"event"' not in line:
            continue
        record = json.loads(line)
        if record.get("event") not in ("round", "reward"):
            continue
        for key in ROUND_KEYS:
            if isinstance(record.get(key), (int, float)):
                out.setdefault(key, []).append(float(record[key]))
    return out


def rounds_mean(per_seed: list[dict[str, list[float]]]) -> tuple[str, list[float]]:
    """The first ROUND_KEYS key any seed has, and its mean over seeds round by round."""
    for key in ROUND_KEYS:
        series = [d[key] for d in per_seed if d.get(key)]
        if series:
            return key, [statistics.fmean(s[t] for s in series) for t in range(min(map(len, series)))]
    return "", []


def rounds_text(key: str, values: list[float]) -> str:
    return f"{ROUND_KEYS[key]}: " + " ".join(f"{v:.2f}" for v in values) if key else ""


def summarise(seeds: list[list[dict]], baseline: str = BASELINE, resamples: int = RESAMPLES) -> list[dict]:
    """One summary per stage of a (task, condition) from its per-seed results (``seeds[k]``:
    the stage results of seed k, as ``demo.run_stages`` returns them, each with ``correct``
    per held-out prompt, in the same prompt order for every seed). Numbers only; the
    difference to ``baseline`` is the paired two-level bootstrap with shared prompts."""
    stages = [r["stage"] for r in seeds[0]]
    by_stage = {stage: [next(r for r in s if r["stage"] == stage) for s in seeds] for stage in stages}
    base_scores = [[float(c) for c in r["correct"]] for r in by_stage[baseline]] if baseline in by_stage else None
    out = []
    for stage in stages:
        per_seed = by_stage[stage]
        scores = [[float(c) for c in r["correct"]] for r in per_seed]
        accuracies = [sum(s) / len(s) for s in scores]
        summary = {
            "stage": stage, "method": per_seed[0].get("method", ""), "seeds": len(scores), "prompts": len(scores[0]),
            "accuracy": sum(accuracies) / len(accuracies), "accuracy_per_seed": accuracies,
            "logprob_gap": statistics.fmean(r["logprob_gap"]["mean"] for r in per_seed),
            "logprob_gap_per_seed": [r["logprob_gap"]["mean"] for r in per_seed],
            "train_seconds": statistics.fmean(r.get("train_seconds", 0.0) for r in per_seed),
            "train_seconds_per_seed": [r.get("train_seconds", 0.0) for r in per_seed],
            "eval_seconds": statistics.fmean(r.get("eval_seconds", 0.0) for r in per_seed),
            "rounds": rounds_mean([r.get("rounds", {}) for r in per_seed]),
            "difference": None,
        }
        if base_scores is not None and stage != baseline:
            d = paired_bootstrap_difference(scores, base_scores, resamples=resamples, shared_prompts=True)
            flat = [(a, b) for sa, sb in zip(scores, base_scores) for a, b in zip(sa, sb)]
            wins = sum(a > b for a, b in flat)
            losses = sum(a < b for a, b in flat)
            summary["difference"] = {"mean": d.mean, "low": d.low, "high": d.high, "width": d.width, "level": d.level,
                                     "excludes_zero": d.excludes_zero,
                                     "verdict": "better" if d.low > 0 else "worse" if d.high < 0 else "no difference",
                                     "wins": wins, "ties": len(flat) - wins - losses, "losses": losses}
        out.append(summary)
    return out


def points(x: float) -> str:
    return f"{100 * x:+.1f}"


def table_row(task: str, condition: str, s: dict) -> dict:
    """A summary as a printed table row (differences in accuracy points)."""
    d = s["difference"]
    return {
        "task": task, "condition": condition, "method": s["stage"],
        "accuracy (per seed)": f"{s['accuracy']:.1%} (" + " ".join(f"{a:.0%}" for a in s["accuracy_per_seed"]) + ")",
        f"diff vs {BASELINE} [95%]": "baseline" if d is None and s["stage"] == BASELINE else "—" if d is None
        else f"{points(d['mean'])} [{points(d['low'])}, {points(d['high'])}]",
        "width": "" if d is None else f"{100 * d['width']:.1f}",
        "verdict": "" if d is None else d["verdict"],
        "W/T/L": "" if d is None else f"{d['wins']}/{d['ties']}/{d['losses']}",
        "log-prob gap": f"{s['logprob_gap']:.2f}",
        "by round": rounds_text(*s["rounds"]),
        "train s": f"{s['train_seconds']:.0f}",
    }


# ------------------------------------------------------------------------ the runs


def condition_sizes(args) -> dict[str, tuple[int, float]]:
    """Condition -> (demonstrations, low-quality share)."""
    table = {"clean": (args.train_size, 0.0), "low-quality": (args.train_size, args.low_quality),
             "limited": (args.limited_size, 0.0)}
    return {c: table[c] for c in args.conditions}


def default_methods(quick: bool) -> list[str]:
    from sftjuice.demo import registered_methods

    from sftjuice.demo import STAGE_EXTRAS, method_of

    registered = registered_methods()
    if quick:
        return [m for m in QUICK_METHODS if m in registered]
    return registered + [n for n in STAGE_EXTRAS if n not in registered and method_of(n) in registered]


def method_settings(methods: list[str], tasks: list[str]) -> dict:
    """What each stage trains with: the method's config defaults (paths left out), the
    demo's STAGE_EXTRAS, and the per-task options the demo passes."""
    from sftjuice.config import METHOD_CONFIGS
    from sftjuice.demo import STAGE_EXTRAS, method_of, task_spec

    out = {}
    for name in methods:
        if name in PEERS:
            out[name] = {"peer": "trl.experimental.sdft.SDFTTrainer", "settings": PEERS[name]}
            continue
        cls = METHOD_CONFIGS[method_of(name)]
        fields = {f.name for f in dataclasses.fields(cls)}
        out[name] = {
            "method": method_of(name),
            "defaults": {k: v for k, v in dataclasses.asdict(cls()).items() if k not in PATH_FIELDS},
            "stage_extras": {k: v for k, v in STAGE_EXTRAS.get(name, {}).items() if k != "method"},
            "per_task": {t: {k: v for k, v in (("max_new_tokens", task_spec(t).max_new_tokens),
                                                ("verifier", task_spec(t).verifier)) if k in fields} for t in tasks},
            "monitor": {"eval_size": 16} if "eval_data" in fields else {},
        }
    return out


# ------------------------------------------------------------------------ peers

# Stages trained by another library from the same SFT model on the same demonstrations, and
# judged by the same evaluation: what a user would pick instead of sftjuice.
SDFT_SETTINGS = {"learning_rate": 2e-5, "num_generations": 4, "per_device_train_batch_size": 16, "num_train_epochs": 1}
PEERS = {"trl-sdft": SDFT_SETTINGS}


def train_trl_sdft(start: Path, train_file: Path, output: Path, seed: int, max_new_tokens: int) -> None:
    """TRL's experimental SDFT (trl.experimental.sdft): on-policy self-distillation, where
    the model shown the demonstration teaches the model that is not, on the model's own
    samples. From the SFT model, one epoch of the same demonstrations, fp32, the settings
    in SDFT_SETTINGS (per_device_train_batch_size counts completions: 4 prompts x 4)."""
    from datasets import Dataset
    from sftjuice.storage import read_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    rows = read_jsonl(train_file)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["completion"]}
                              for r in rows])
    args = SDFTConfig(output_dir=str(output / "trl"), seed=seed, max_completion_length=max_new_tokens, bf16=False,
                      report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, **SDFT_SETTINGS)
    trainer = SDFTTrainer(model=AutoModelForCausalLM.from_pretrained(start, dtype="float32"), args=args,
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(start))
    trainer.train()
    trainer.save_model(str(output / ".final.tmp"))
    (output / ".final.tmp").replace(output / "final")


def run_peer(peer: str, cfg, out: Path) -> dict:
    """A peer stage of one (task, condition, seed), resumable as the demo's stages are; its
    model is deleted once evaluated (nothing starts from it)."""
    from sftjuice.data import load_demonstrations
    from sftjuice.evaluation import evaluate_model
    from sftjuice.storage import atomic_write_text

    stage, stage_dir = f"sft+{peer}", out / f"sft+{peer}"
    eval_file, timing = stage_dir / "eval.json", stage_dir / "train_seconds.json"
    if not eval_file.exists():
        if not (stage_dir / "final").exists():
            shutil.rmtree(stage_dir, ignore_errors=True)  # a killed TRL run starts over
            stage_dir.mkdir(parents=True)
            t0 = time.time()
            train_trl_sdft(out / "sft" / "final", out / "data" / "train.jsonl", stage_dir, cfg.seed, cfg.new_tokens)
            atomic_write_text(timing, json.dumps(time.time() - t0))
        t0 = time.time()
        ev = evaluate_model(stage_dir / "final", load_demonstrations(out / "data" / "test.jsonl"), cfg.new_tokens,
                            cfg.verifier_name)
        write_json(eval_file, {**ev, "eval_seconds": time.time() - t0})
    shutil.rmtree(stage_dir / "final", ignore_errors=True)
    ev = json.loads(eval_file.read_text())
    print(f"{stage}: accuracy {ev['accuracy']['mean']:.1%}", flush=True)
    return {"stage": stage, "start": "sft", "method": peer, "train_seconds": json.loads(timing.read_text()), **ev}


def run(args) -> dict[tuple[str, str], list[list[dict]]]:
    """Every (task, condition, seed), seed by seed so that an interrupted run has whole seeds."""
    from sftjuice.demo import DemoConfig, run_stages

    runs: dict[tuple[str, str], list[list[dict]]] = {}
    base_evals: dict[str, Path] = {}
    for seed in range(args.seeds):
        for task in args.tasks:
            for cond, (size, fraction) in condition_sizes(args).items():
                out = args.work / ("quick" if args.quick else "full") / task / cond / f"seed{seed}"
                if task in base_evals and not (out / "base" / "eval.json").exists():  # greedy base: the same everywhere
                    (out / "base").mkdir(parents=True, exist_ok=True)
                    shutil.copy(base_evals[task], out / "base" / "eval.json")
                print(f"== {task}, {cond}, seed {seed}: {out}", flush=True)
                peers = [m for m in args.methods if m in PEERS]
                cfg = DemoConfig(output=str(out), model=args.model, task=task, train_size=size, test_size=args.test_size,
                                 methods=[m for m in args.methods if m not in PEERS], seed=seed,
                                 low_quality_fraction=fraction, keep_models=False,  # sft/final stays: stages start from it
                                 start="sft")  # this benchmark's layout: one SFT epoch, then the methods
                results = run_stages(cfg) + [run_peer(p, cfg, out) for p in peers]
                for r in results:
                    r["rounds"] = round_diagnostics(out / r["stage"])
                runs.setdefault((task, cond), []).append(results)
                base_evals.setdefault(task, out / "base" / "eval.json")
    return runs


def report(args, runs: dict[tuple[str, str], list[list[dict]]], seconds: float, load: tuple) -> None:
    from sftjuice.demo import task_spec

    summaries = {key: summarise(seeds) for key, seeds in runs.items()}
    rows = [table_row(task, cond, s) for (task, cond), ss in summaries.items() for s in ss]
    widths = [s["difference"]["width"] for ss in summaries.values() for s in ss if s["difference"]]
    stage_seconds = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0)
                        for seeds in runs.values() for results in seeds for r in results)
    sizes = condition_sizes(args)
    size_text = ", ".join(f"{c} {n}" + (f" ({f:.0%} wrong)" if f else "") for c, (n, f) in sizes.items())
    width_text = (f"interval widths reached {100 * min(widths):.1f} to {100 * max(widths):.1f} points "
                  f"(median {100 * statistics.median(widths):.1f})") if widths else "no intervals"
    header = (f"Quality: {', '.join(args.tasks)}; demonstrations: {size_text}; {args.test_size} held-out prompts per task "
              f"(the same for every seed), {args.seeds} seed(s), greedy decoding, "
              + ", ".join(f"{t} verifier {task_spec(t).verifier} / {task_spec(t).max_new_tokens} tokens" for t in args.tasks)
              + f"; {width_text}; the stages took {stage_seconds / 60:.0f} min (training and evaluation, summed; "
              f"this invocation {seconds / 60:.0f} min, reusing finished stages)")
    columns = list(rows[0])
    print("\n" + header + "\n\n" + text_table(rows, columns))
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quality-quick" if args.quick else "quality")
    (results / f"{name}.md").write_text(
        f"# {header}\n\n" + markdown_table(rows, columns)
        + f"\ndiff: accuracy of the method minus that of continued SFT ({BASELINE}), in points, mean over seeds and "
          "prompts, with the 95% paired two-level bootstrap interval (seeds, then prompts; one prompt draw shared by "
          "all seeds, so training-seed variance is in the interval); width: that interval's width in points. "
          "verdict: better / worse only when the interval excludes 0. W/T/L: prompts where only the method / both or "
          "neither / only the baseline is right, pooled over seeds (a count, not a test). Log-prob gap: "
          "log pi(reference answer) - log pi(the next held-out question's answer), mean over seeds. by round: "
          "margin = IRFT/SPIN implicit-reward margin on held-out pairs; r-acc = the learned reward's accuracy ranking "
          "each demonstration over fresh samples before the round's step (RFT, SRPPO); accept = RSO's acceptance "
          "rate; verified = share of the round's samples the verifier accepts (steps, rest). "
          "train s: training seconds of the stage, mean over seeds.\n")
    write_json(results / f"{name}.json", {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": {c: {"demonstrations": n, "low_quality_fraction": f} for c, (n, f) in sizes.items()},
        "test_size": args.test_size, "seeds": args.seeds,
        "tasks": {t: dataclasses.asdict(task_spec(t)) for t in args.tasks},
        "baseline": BASELINE, "bootstrap": {"resamples": RESAMPLES, "shared_prompts": True, "level": 0.95},
        "settings": method_settings(args.methods, args.tasks),
        "results": [{"task": task, "condition": cond, **s} for (task, cond), ss in summaries.items() for s in ss],
        "widths": {"min": min(widths), "median": statistics.median(widths), "max": max(widths)} if widths else None,
        "rows": rows, "seconds": seconds, "stage_seconds": stage_seconds, "cpus": os.cpu_count(), "load_average": {"start": list(load), "end": list(os.getloadavg())},
    })
    panels = []
    for (task, cond), ss in summaries.items():
        shown = [s for s in ss if s["difference"] and s["stage"] != "base"]  # the base model would set the scale
        panels.append((f"{task.split('__')[-1]}, {cond}", [s["stage"] for s in shown],
                       [100 * s["difference"]["mean"] for s in shown],
                       [(100 * s["difference"]["low"], 100 * s["difference"]["high"]) for s in shown]))
    plot_intervals(results / f"{name}.png", panels, xlabel=f"accuracy - {BASELINE} (points, 95% interval)",
                   title=header.split(";")[0] + f", {args.seeds} seed(s)", columns=len(args.conditions))
    # the per-round diagnostics as curves: one panel per (task, condition, diagnostic), mean over seeds
    curves = {}
    for (task, cond), ss in summaries.items():
        for s in ss:
            key, values = s["rounds"]
            if values:
                curves.setdefault((task, cond, key), []).append((s["stage"], list(range(1, len(values) + 1)), values, None))
    if curves:
        plot_line_panels(results / f"{name}-rounds.png",
                         [(f"{task.split('__')[-1]}, {cond}", ROUND_LABELS[key], series) for (task, cond, key), series in curves.items()],
                         xlabel="round", title="per-round diagnostics (mean over seeds)")
    print(f"\nwrote {results / name}.md/.json/.png" + (f" and {name}-rounds.png" if curves else ""))


# ------------------------------------------------------------------------ estimate


def estimate(args) -> None:
    """Stages and time of the planned run from the quick run's measured seconds: each stage's
    training time scaled linearly by demonstrations (its fixed start-up cost too, so on the
    high side), evaluation by prompts, and both by the task's length factors."""
    from sftjuice.demo import task_spec
    from sftjuice.storage import read_jsonl
    from importlib.resources import files

    quick_file = args.results / "quality-quick.json"
    if not quick_file.exists():
        raise SystemExit(f"{quick_file} not found: run `python benchmarks/quality.py --quick` first")
    quick = json.loads(quick_file.read_text())
    if "results" not in quick:
        raise SystemExit(f"{quick_file} predates per-stage seconds: run `python benchmarks/quality.py --quick` again")
    q_task = quick["args"]["tasks"][0]
    q_train = quick["sizes"]["clean"]["demonstrations"]
    q_test = quick["test_size"]
    measured = {r["stage"]: r for r in quick["results"]}
    # the quick run's load: a process gets about cpus/load of a shared machine
    loads = [x for v in quick.get("load_average", {}).values() for x in (v[:2] if isinstance(v, list) else [v])]
    cpus = quick.get("cpus") or os.cpu_count()
    busy = statistics.fmean(loads) if loads else 0.0
    alone = min(1.0, cpus / busy) if busy > cpus else 1.0

    def chars(task: str) -> float:  # ~4 characters a token; ~200 for the chat template and system prompt
        rows = read_jsonl(files("sftjuice") / "demo_data" / f"{task}.train.jsonl")[:500]
        return 200 + statistics.fmean(len(r["prompt"]) + len(r["completion"]) for r in rows)

    def factors(task: str) -> tuple[float, float]:
        """(SFT-like passes, sampling and evaluation) cost of a task relative to the quick run's task:
        sequence length for the first, the answer-length limit (decoding steps) for the second."""
        return chars(task) / chars(q_task), task_spec(task).max_new_tokens / task_spec(q_task).max_new_tokens

    online_costliest = max((r["train_seconds"] for r in measured.values() if r["method"] not in ("sft", "sft3", "")),
                           default=0.0)
    eval_each = statistics.fmean(r["eval_seconds"] for r in measured.values()) if measured else 0.0
    guessed = []

    def stage_train(stage: str, method: str) -> float:
        if stage in measured:
            return measured[stage]["train_seconds"]
        if method == "sft3" and BASELINE in measured:
            return 3 * measured[BASELINE]["train_seconds"]
        guessed.append(stage)
        return online_costliest  # not in the quick run: as the costliest measured method

    def total(tasks, conditions, seeds, train, limited, test, methods) -> tuple[int, float]:
        stages, seconds = 0, 0.0
        for task in tasks:
            f_len, f_gen = factors(task)
            seconds += eval_each * test / q_test * f_gen  # the base model, once per task
            for cond in conditions:
                n = limited if cond == "limited" else train
                for stage, method in [("sft", "sft")] + [(f"sft+{m}", m) for m in methods]:
                    sft_like = method in ("sft", "sft3")
                    seconds += seeds * stage_train(stage, method) * n / q_train * (f_len if sft_like else f_gen)
                    seconds += seeds * eval_each * test / q_test * f_gen
                    stages += seeds
        return stages, seconds * alone

    planned = condition_sizes(args)
    stages, seconds = total(args.tasks, list(planned), args.seeds, args.train_size, args.limited_size, args.test_size,
                            args.methods)
    print(f"measured: {quick_file.name} ({q_task}, {q_train} demonstrations, {q_test} prompts): "
          + ", ".join(f"{s} {r['train_seconds']:.0f}s" for s, r in measured.items() if r["train_seconds"])
          + f"; evaluation {eval_each:.0f}s per model (mean)")
    if busy > cpus:
        print(f"  measured on a shared machine: load average about {busy:.1f} on {cpus} CPUs; times below are scaled "
              f"by {cpus}/{busy:.1f} = {alone:.2f} to what the machine does alone (crude; raw: x1)")
    for task in args.tasks:
        f_len, f_gen = factors(task)
        print(f"  {task}: x{f_len:.2f} for SFT stages (sequence length), x{f_gen:.2f} for sampling methods and "
              f"evaluation (answer-length limit {task_spec(task).max_new_tokens})")
    if guessed:
        print(f"  not in the quick run, taken as the costliest measured method ({online_costliest:.0f}s): "
              f"{', '.join(sorted(set(guessed)))}")
    print(f"\nplanned: tasks {', '.join(args.tasks)}; conditions "
          + ", ".join(f"{c} ({n} demonstrations{f', {f:.0%} wrong' if f else ''})" for c, (n, f) in planned.items())
          + f"; {args.test_size} prompts; {args.seeds} seeds; methods {', '.join(args.methods)}")
    print(f"  {stages} trained stages (+ {len(args.tasks)} base evaluations): about {seconds / 3600:.1f} h "
          f"on this machine alone ({'fits' if seconds <= BUDGET_HOURS * 3600 else 'does not fit'} in {BUDGET_HOURS:.0f} h)"
          + (f"; {seconds / alone / 3600:.1f} h at the quick run's load" if alone < 1 else ""))

    # the interval a size gives, prompt noise only: the share of prompts where the two models
    # disagree (discordant) sets the variance of a paired difference
    discordant = [(r["difference"]["wins"] + r["difference"]["losses"]) / (r["prompts"] * r["seeds"])
                  for r in quick["results"] if r["difference"] and r["stage"] not in ("base", "sft")]
    measured_disc = bool(discordant and any(discordant))
    disc = statistics.fmean(discordant) if measured_disc else 0.2

    def half_width(test: int, seeds: int) -> float:
        return 100 * 1.96 * math.sqrt(disc / (test * seeds))

    print(f"\nwhat fits in {BUDGET_HOURS:.0f} h: the largest --train-size (>= 32; limited = min(--limited-size, half of it)) "
          f"per choice of tasks, conditions, methods, seeds and prompts; ± = expected 95% half-width of a difference "
          f"from prompt noise alone (models disagree on {disc:.0%} of prompts: "
          f"{'the quick run' if measured_disc else 'assumed'}; seed variance widens it)")
    core = [m for m in args.methods if m in ("sft", "irft", "spin", "rft", "sft3")]
    choices = []
    for methods in dict.fromkeys((tuple(args.methods), tuple(core))):
        for tasks in dict.fromkeys((tuple(args.tasks), tuple(args.tasks[:1]))):
            for conditions in dict.fromkeys((tuple(planned), tuple(c for c in planned if c != "limited") or tuple(planned),
                                             tuple(planned)[:1])):
                for seeds in sorted({args.seeds, 3, 2}, reverse=True):
                    for test in sorted({args.test_size, 500, 200}, reverse=True):
                        for n in (512, 384, 256, 192, 128, 96, 64, 48, 32):
                            limited = min(args.limited_size, n // 2)
                            secs = total(tasks, conditions, seeds, n, limited, test, methods)[1]
                            if secs <= BUDGET_HOURS * 3600:
                                choices.append((methods, tasks, conditions, seeds, test, n, limited, secs))
                                break
    for methods, tasks, conditions, seeds, test, n, limited, secs in choices[:16]:
        print(f"  --tasks {' '.join(tasks)} --conditions {' '.join(conditions)} --seeds {seeds} --test-size {test} "
              f"--train-size {n}" + (f" --limited-size {limited}" if "limited" in conditions else "")
              + ("" if methods == tuple(args.methods) else f" --methods {' '.join(methods)}")
              + f"  -> {secs / 3600:.1f} h, ±{half_width(test, seeds):.1f} points")
    if not choices:
        print("  none of these fits: fewer tasks, conditions or methods")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="round_number, clean, 1 seed, 32 demonstrations, 40 prompts, methods sft irft spin rft srppo rest (< 10 min)")
    ap.add_argument("--estimate", action="store_true", help="print the planned stages and time (from quality-quick.json) and exit")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=256, help="demonstrations of the clean and low-quality conditions")
    ap.add_argument("--limited-size", type=int, default=128, help="demonstrations of the limited condition")
    ap.add_argument("--test-size", type=int, default=500, help="held-out prompts per task (the task files hold 500)")
    ap.add_argument("--low-quality", type=float, default=0.3, help="share of demonstrations made wrong in the low-quality condition")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: every registered method, sft3 and steps-response (quick: sft irft spin rft srppo rest); "
                         "sft is always run (the baseline); trl-sdft adds TRL's SDFT as a peer (needs trl)")
    ap.add_argument("--work", type=Path, default=Path("runs/quality"))
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the base model (an HF directory, or the default)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where quality[-quick].{md,json,png} go")
    ap.add_argument("--name", help="results file name instead of quality[-quick] (separate runs side by side)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.methods is None:
        args.methods = default_methods(args.quick)
    if "sft" not in args.methods:
        args.methods = ["sft"] + args.methods
    if args.estimate:
        estimate(args)
        return
    from sftjuice.config import SftjuiceError

    started, load = time.time(), os.getloadavg()
    try:
        runs = run(args)
    except SftjuiceError as e:
        raise SystemExit(f"quality.py: error: {e}")
    report(args, runs, time.time() - started, load)


if __name__ == "__main__":
    main()
