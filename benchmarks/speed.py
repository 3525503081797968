"""Speed and memory of an IRFT round: sftjuice against TRL and plain `generate`, side by side.

Every contender runs in its own process (so its peak RSS is its own) on the same model,
data and seed, in one invocation of this script. Prints a table, writes
benchmarks/results/speed.md and speed.json; the last line reads

    speed: train_x=<ours/TRL> gen_x=<ours/plain> round_x=<ours/composed> mfu=<fraction> rss_ratio=<ours/TRL>

Contenders:
  train   TRL DPOTrainer (precompute_ref_log_probs, batch 8) with its CPU defaults (bf16
          autocast + gradient checkpointing) and in fp32 without checkpointing, against
          sftjuice's IRFT pass with references known; tokens/s counts the real (non-pad)
          tokens of both sides.
  gen     plain model.generate (batch 32, fp32, temperature 1) against sftjuice's sampler.
  round   a whole IRFT round (sample + reference log-probs + one pass) against the same work
          composed from plain generate + TRL DPOTrainer.
  peak    the CPU's fp32 and bf16 matmul rate; MFU = 6 * parameters * tokens/s / peak.

    python benchmarks/speed.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEED = 0


# ---------------------------------------------------------------------------- data


def make_pairs(n: int, questions_per_prompt: int = 4) -> list[dict]:
    """Preference-style rows from the shipped demo data: a prompt of several questions, the
    true answers (chosen) and another prompt's answers (rejected), ~140 tokens a side."""
    from sftjuice.storage import read_jsonl
    from importlib.resources import files

    rows = read_jsonl(files("sftjuice") / "demo_data" / "comparison__sort.train.jsonl")
    k = questions_per_prompt
    out = []
    for i in range(n):
        qs = rows[i * k: (i + 1) * k]
        other = rows[(i + n) * k: (i + n + 1) * k]
        out.append({
            "prompt": "Answer each question on its own line.\n" + "\n".join(r["prompt"] for r in qs),
            "chosen": "\n".join(r["completion"] for r in qs),
            "rejected": "\n".join(r["completion"] for r in other),
        })
    return out


def load(bf16_weights: bool = False):
    import torch
    from sftjuice.config import ModelConfig
    from sftjuice.models import load_policy, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model = load_policy(ModelConfig(), path, trainable=False)
    if bf16_weights:
        model.to(torch.bfloat16)
    return path, model, load_tokenizer(path)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


# ---------------------------------------------------------------------- contenders


def trl_train(args, pairs, precision: str) -> dict:
    """TRL DPOTrainer on the pairs; the steps after its reference pre-computation are timed."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    path, model, tok = load()
    model.train()
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    opts = {} if precision == "default" else {"bf16": False, "gradient_checkpointing": False}
    cfg = DPOConfig(output_dir=str(args.work / f"trl-{precision}"), per_device_train_batch_size=8,
                    max_steps=args.train_steps, learning_rate=1e-6, precompute_ref_log_probs=True,
                    use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=SEED,
                    max_length=1024, dataloader_num_workers=0, **opts)

    class Clock(TrainerCallback):
        begun = ended = None

        def on_step_begin(self, *a, **k):
            self.begun = self.begun or time.time()

        def on_step_end(self, *a, **k):
            self.ended = time.time()

    clock = Clock()
    t0 = time.time()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[clock])
    trainer.train()
    ds = trainer.train_dataset
    steps = args.train_steps
    per_step = [len(ds[i]["prompt_ids"]) * 2 + len(ds[i]["chosen_ids"]) + len(ds[i]["rejected_ids"])
                for i in range(len(ds))]
    # the trainer's sampler shuffles, so count the mean real length of a row per row trained on
    tokens = sum(per_step) * steps * 8 / len(per_step)
    seconds = clock.ended - clock.begun
    return {"tokens_per_s": tokens / seconds, "train_seconds": seconds, "precompute_seconds": clock.begun - t0,
            "wall_seconds": time.time() - t0, "peak_rss_gb": peak_rss_gb(), "steps": steps,
            "precision": "bf16 autocast + checkpointing" if precision == "default" else "fp32"}


def our_pairs(run, pairs):
    """IRFT pairs with their references filled in (not timed: the sampler gives them in a round)."""
    from sftjuice.algorithms.rounds import Completion, Group
    from sftjuice.data import parse_row

    out = []
    for p, e in zip(pairs, run.examples):
        rejected = run.chat.completion_ids(parse_row({"prompt": p["prompt"], "completion": p["rejected"]}, "").prompt, p["rejected"])
        out.append(Group(e, [Completion(rejected, [0.0])], demonstration_logprob=0.0))
    return out


def start(args, pairs, name: str, **overrides):
    from sftjuice.config import IRFTConfig
    from sftjuice.storage import write_jsonl
    from sftjuice.training import start_run

    data = args.work / f"{name}.jsonl"
    write_jsonl(data, [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    options = dict(per_device_batch_size=8, learning_rate=1e-6, lr_scheduler="constant", seed=SEED,
                   max_new_tokens=args.new_tokens, generation_batch_size=32)
    cfg = IRFTConfig(data=str(data), output=str(args.work / name), overwrite=True, **{**options, **overrides})
    return start_run(cfg)


def ours_train(args, pairs) -> dict:
    from sftjuice.algorithms.irft import pair_micro_loss
    from sftjuice.algorithms.rounds import samples_in

    run = start(args, pairs, "ours-train")
    learner = run.learner(run.policy_model, run.cfg.learning_rate, args.train_steps)
    items = our_pairs(run, pairs)
    loss = pair_micro_loss(learner, run.cfg)
    tokens = flops = 0
    # FLOPs actually executed: the shared prompt runs once for both sides, the LM head only
    # on completion positions, and the input embedding is a lookup
    model = learner.model
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - head - (0 if tied else model.get_input_embeddings().weight.numel())
    t0 = time.time()
    for step in range(args.train_steps):
        batch = items[step * 8: (step + 1) * 8]
        learner.step(batch, loss, samples_in, length=len)
        for x in batch:
            completions = len(x.example.completion_ids) + len(x.samples[0].token_ids)
            tokens += 2 * len(x.example.prompt_ids) + completions
            flops += 6 * body * (len(x.example.prompt_ids) + completions) + 6 * head * completions
    seconds = time.time() - t0
    return {"tokens_per_s": tokens / seconds, "executed_flops_per_s": flops / seconds, "train_seconds": seconds,
            "peak_rss_gb": peak_rss_gb(), "steps": args.train_steps, "precision": "fp32",
            "parameters": sum(p.numel() for p in model.parameters())}


def prompts_of(tok, pairs) -> list[list[int]]:
    from sftjuice.data import ChatFormat

    chat = ChatFormat(tok, [tok.eos_token_id])
    return [chat.prompt_ids([{"role": "user", "content": p["prompt"]}]) for p in pairs]


def plain_generate(args, pairs) -> dict:
    import torch

    _, model, tok = load()
    torch.manual_seed(SEED)
    prompts = prompts_of(tok, pairs)
    tok.padding_side = "left"
    new = 0
    t0 = time.time()
    for i in range(0, len(prompts), 32):
        enc = tok.pad({"input_ids": prompts[i: i + 32]}, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        # real new tokens: up to and including the first end-of-turn token of each row
        for row in gen.tolist():
            new += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    seconds = time.time() - t0
    return {"new_tokens_per_s": new / seconds, "seconds": seconds, "new_tokens": new, "peak_rss_gb": peak_rss_gb()}


def ours_generate(args, pairs) -> dict:
    from sftjuice.config import SamplingConfig
    from sftjuice.generation import sample

    _, model, tok = load()
    prompts = prompts_of(tok, pairs)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, generation_batch_size=32)
    t0 = time.time()
    out = sample(model, prompts, cfg, [tok.eos_token_id], tok.pad_token_id, seed=SEED, progress=False)
    seconds = time.time() - t0
    new = sum(len(s.token_ids) for ss in out for s in ss)
    return {"new_tokens_per_s": new / seconds, "seconds": seconds, "new_tokens": new, "peak_rss_gb": peak_rss_gb()}


def ours_round(args, pairs) -> dict:
    """Generate + reference log-probs of the demonstrations + one pass, as irft.train does."""
    from sftjuice.algorithms import rounds
    from sftjuice.algorithms.irft import demonstration_logprobs, pair_micro_loss
    from sftjuice.training import weights_fingerprint

    run = start(args, pairs, f"ours-round-{len(pairs)}-{args.max_length}", max_length=args.max_length,
                max_prompt_length=args.max_length)
    learner = run.learner(run.policy_model, run.cfg.learning_rate, len(pairs) // 8 + 1)
    loss = pair_micro_loss(learner, run.cfg)
    t0 = time.time()
    rows = rounds.sample_round(run, 0, list(range(len(run.examples))), SEED, weights_fingerprint(run.policy),
                               annotate=demonstration_logprobs(run))
    items = rounds.groups_of(rows, run.examples)
    t1 = time.time()
    for batch in rounds.batches(run, len(items), 0, 0):
        learner.step([items[i] for i in batch], loss, rounds.samples_in, length=len)
    t2 = time.time()
    return {"seconds": t2 - t0, "generate_and_reference_seconds": t1 - t0, "train_seconds": t2 - t1,
            "peak_rss_gb": peak_rss_gb(), "prompts": len(pairs), "max_length": args.max_length}


def composed_round(args, pairs) -> dict:
    """The same round from stock parts: plain generate, then TRL DPOTrainer (fp32, reference
    log-probs precomputed) on (demonstration, sample) pairs."""
    import torch

    _, model, tok = load()
    torch.manual_seed(SEED)
    prompts = prompts_of(tok, pairs)
    tok.padding_side = "left"
    t0 = time.time()
    samples = []
    for i in range(0, len(prompts), 32):
        enc = tok.pad({"input_ids": prompts[i: i + 32]}, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        samples += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    generate_seconds = time.time() - t0
    del model
    dpo_pairs = [{**p, "rejected": s} for p, s in zip(pairs, samples)]
    args.train_steps = len(pairs) // 8
    trl = trl_train(args, dpo_pairs, "fp32")
    return {"seconds": generate_seconds + trl["wall_seconds"], "generate_seconds": generate_seconds,
            "trl_seconds": trl["wall_seconds"], "peak_rss_gb": peak_rss_gb()}


def matmul_peak(args, pairs) -> dict:
    import torch

    out = {}
    for name, dtype, n in (("fp32", torch.float32, 2048), ("bf16", torch.bfloat16, 1024)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps, t0 = 0, time.time()
        while time.time() - t0 < 2.0:
            a @ b
            reps += 1
        out[f"{name}_gflops"] = 2 * n ** 3 * reps / (time.time() - t0) / 1e9
    return out


CONTENDERS = {"trl-default": lambda a, p: trl_train(a, p, "default"), "trl-fp32": lambda a, p: trl_train(a, p, "fp32"),
              "ours-train": ours_train, "plain-generate": plain_generate, "ours-generate": ours_generate,
              "ours-round": ours_round, "composed-round": composed_round, "peak": matmul_peak}


# -------------------------------------------------------------------- orchestration


def run_contender(name: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--contender", name, "--work", str(args.work), "--pairs", str(extra.get("pairs", args.pairs)),
           "--train-steps", str(args.train_steps), "--new-tokens", str(args.new_tokens),
           "--max-length", str(extra.get("max_length", args.max_length))]
    print(f"  running {name} {extra or ''} ...", end=" ", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    print(f"{time.time() - t0:.0f} s", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and a smaller cost curve (< 10 minutes)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sftjuice-speed"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.contender:
        # prompts grow with the length budget: about 35 tokens per question plus the template
        result = CONTENDERS[args.contender](args, make_pairs(args.pairs, max(1, args.max_length // 64)))
        print(json.dumps(result))
        return
    round_pairs = args.pairs
    if args.quick:  # same contenders, less work: 4 training steps, 32 new tokens, 16-prompt rounds
        args.train_steps, args.pairs, args.new_tokens, round_pairs = 4, 32, 32, 16
    r = {name: run_contender(name, args) for name in ("peak", "ours-train", "trl-fp32", "ours-generate", "plain-generate")}
    # TRL's CPU defaults autocast to bf16; where the CPU has no bf16 matrix unit that runs at
    # about 1 GFLOP/s (a step would take tens of minutes), so it is only run where bf16 is fast
    bf16_usable = r["peak"]["bf16_gflops"] > 0.5 * r["peak"]["fp32_gflops"]
    r["trl-default"] = run_contender("trl-default", args) if bf16_usable else None
    r["ours-round"] = run_contender("ours-round", args, pairs=round_pairs)
    r["composed-round"] = run_contender("composed-round", args, pairs=round_pairs)
    if args.quick:
        sizes = [(8, 128), (8, 256), (16, 256)]
    else:
        sizes = [(64, 128), (64, 256), (64, 512), (128, 256), (256, 256)]
    curve = [r["ours-round"] if (p, m) == (round_pairs, args.max_length) else run_contender("ours-round", args, pairs=p, max_length=m)
             for p, m in sizes]
    report(args, r, curve)


def report(args, r: dict, curve: list[dict]) -> None:
    from sftjuice.report import markdown_table, text_table

    trl_runs = [x for x in (r["trl-fp32"], r["trl-default"]) if x]
    skipped = [] if r["trl-default"] else [{"what": "train: TRL DPOTrainer (its CPU defaults: bf16 autocast + checkpointing)",
                                            "rate": "not run", "peak RSS GB": "", "note": f"bf16 matmul here: {r['peak']['bf16_gflops']:.1f} GFLOP/s"}]
    best_trl = max(trl_runs, key=lambda x: x["tokens_per_s"])
    ours = r["ours-train"]
    peak = r["peak"]["fp32_gflops"] * 1e9
    # 6 x parameters x counted tokens over-states the work of the shared-prompt path (its
    # prompt tokens count twice but run once), so MFU is taken from the FLOPs executed
    mfu = ours["executed_flops_per_s"] / peak
    nominal_mfu = 6 * ours["parameters"] * ours["tokens_per_s"] / peak
    summary = {
        "train_x": ours["tokens_per_s"] / best_trl["tokens_per_s"],
        "gen_x": r["ours-generate"]["new_tokens_per_s"] / r["plain-generate"]["new_tokens_per_s"],
        "round_x": r["composed-round"]["seconds"] / r["ours-round"]["seconds"],
        "mfu": mfu,
        "rss_ratio": ours["peak_rss_gb"] / best_trl["peak_rss_gb"],
    }
    rows = [
        {"what": "train: sftjuice IRFT pass", "rate": f"{ours['tokens_per_s']:.0f} tok/s", "peak RSS GB": f"{ours['peak_rss_gb']:.2f}",
         "note": f"{ours['precision']}; MFU {mfu:.2f} of FLOPs executed (6 x params x tok/s would say {nominal_mfu:.2f})"},
        *({"what": f"train: TRL DPOTrainer ({x['precision']})", "rate": f"{x['tokens_per_s']:.0f} tok/s",
           "peak RSS GB": f"{x['peak_rss_gb']:.2f}", "note": f"+{x['precompute_seconds']:.0f} s setup (tokenise, reference precompute)"} for x in trl_runs),
        *skipped,
        {"what": "generate: sftjuice sampler", "rate": f"{r['ours-generate']['new_tokens_per_s']:.0f} new tok/s", "peak RSS GB": f"{r['ours-generate']['peak_rss_gb']:.2f}", "note": "batch 32, fp32"},
        {"what": "generate: model.generate", "rate": f"{r['plain-generate']['new_tokens_per_s']:.0f} new tok/s", "peak RSS GB": f"{r['plain-generate']['peak_rss_gb']:.2f}", "note": "batch 32, fp32"},
        {"what": "round: sftjuice IRFT", "rate": f"{r['ours-round']['seconds']:.0f} s", "peak RSS GB": f"{r['ours-round']['peak_rss_gb']:.2f}", "note": f"{r['ours-round']['prompts']} prompts, {args.new_tokens} new tokens"},
        {"what": "round: generate + TRL DPO", "rate": f"{r['composed-round']['seconds']:.0f} s", "peak RSS GB": f"{r['composed-round']['peak_rss_gb']:.2f}", "note": f"{r['ours-round']['prompts']} prompts, {args.new_tokens} new tokens"},
        {"what": "CPU matmul peak", "rate": f"fp32 {r['peak']['fp32_gflops']:.0f} / bf16 {r['peak']['bf16_gflops']:.0f} GFLOP/s", "peak RSS GB": "", "note": ""},
    ]
    columns = ["what", "rate", "peak RSS GB", "note"]
    curve_rows = [{"prompts": c["prompts"], "max length": c["max_length"], "round seconds": f"{c['seconds']:.1f}",
                   "peak RSS GB": f"{c['peak_rss_gb']:.2f}"} for c in curve]
    last = "speed: " + " ".join(f"{k}={v:.2f}" for k, v in summary.items())
    print("\n" + text_table(rows, columns) + "\n\ncost curve (sftjuice IRFT round)\n" + text_table(curve_rows, list(curve_rows[0])))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.md").write_text(
        f"# Speed ({'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d')}, SmolLM2-135M, {os.cpu_count()} CPU cores)\n\n"
        + markdown_table(rows, columns) + "\n## Cost curve\n\n" + markdown_table(curve_rows, list(curve_rows[0]))
        + f"\n`{last}`\n")
    (RESULTS / "speed.json").write_text(json.dumps({"summary": summary, "nominal_mfu": nominal_mfu, "runs": r, "curve": curve}, indent=1))
    print(last)


if __name__ == "__main__":
    main()
