"""Typed run configuration: one dataclass per command, shared knobs in shared bases.

Every field is a command-line flag (``--max-new-tokens`` or ``--max_new_tokens``) and
a key of the YAML file given with ``--config``; flags win over the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

DEFAULT_MODEL = "smollm2-135m-instruct"


class SftjuiceError(Exception):
    """A problem the user can fix (bad input, bad option). Reported in one line, no traceback."""


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str = _f(DEFAULT_MODEL, "HF model directory, hub id in the local cache, or 'smollm2-135m-instruct'")
    lora: bool = _f(False, "train a LoRA adapter instead of all weights")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: list[str] = _f(["all-linear"], "module names LoRA adapts ('all-linear' = every linear layer but the head)")
    bf16: bool = _f(False, "bf16 autocast for forward/backward (fp32 master weights); generation in bf16 too")
    seed: int = _f(0, "random seed (data order, sampling, initialisation)")


@dataclass
class DataConfig:
    data: str | None = _f(None, "demonstrations: JSONL / JSON file or a `datasets` directory")
    skip_invalid: bool = _f(False, "skip invalid rows (counted and reported) instead of stopping")
    max_prompt_length: int = _f(512, "rows whose rendered prompt is longer are invalid")
    max_length: int = _f(1024, "prompt + completion tokens; longer completions are truncated (and counted)")


@dataclass
class SamplingConfig:
    num_samples: int = _f(1, "responses sampled per prompt")
    temperature: float = _f(1.0, "sampling temperature; 0 = greedy")
    top_p: float = _f(1.0, "nucleus sampling threshold (1 = off)")
    max_new_tokens: int = _f(128, "longest sampled response, in tokens")
    generation_batch_size: int = _f(32, "prompts decoded together")
    generation_backend: Literal["auto", "torch", "vllm"] = _f(
        "auto", "sampling engine: auto = vLLM when it is installed and a GPU is present, else the in-process sampler")
    vllm_gpu_memory_utilization: float = _f(0.3, "vLLM: share of GPU memory for its engine (it shares the GPU with training)")


@dataclass
class TrainConfig(ModelConfig, DataConfig, SamplingConfig):
    method: Literal["sft", "irft", "spin", "rft"] = _f("sft", "training method")
    output: str | None = _f(None, "output directory (checkpoints, metrics.jsonl, final/)")
    epochs: float = _f(1.0, "passes over the demonstrations")
    learning_rate: float = _f(2e-5, "peak learning rate (AdamW)")
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("linear", "learning-rate schedule after warmup")
    warmup_ratio: float = _f(0.0, "share of steps with linear warmup")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    per_device_batch_size: int = _f(8, "sequences per process per micro-batch (rft: whole prompts, each with its --num-samples samples)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimiser step")
    save_every: int = _f(0, "checkpoint every N optimiser steps (0 = at the end of each epoch/round only)")
    keep_checkpoints: int = _f(1, "how many checkpoints to keep")
    resume: bool = _f(False, "continue from the last checkpoint in --output")
    merge_lora: bool = _f(False, "with --lora: also write the merged model to OUTPUT/merged/")
    log_every: int = _f(1, "append metrics every N optimiser steps")
    # IRFT / SPIN (Algorithm 2)
    rounds: int = _f(4, "T: generation rounds per epoch; each round samples for its section of the data")
    passes: int = _f(1, "K: passes over a round's (demonstration, sample) pairs")
    beta: float = _f(0.1, "KL weight; implicit reward = beta * log(pi / pi_t)")
    loss: Literal["logistic", "linear", "hinge"] = _f("logistic", "l(u): logistic (SPIN), linear (exact IRL gradient), hinge")
    iterations: int = _f(1, "SPIN: generation rounds over the whole data (= --method irft --rounds 1 --epochs N)")
    keep_previous_round: bool = _f(False, "also train on the previous round's samples (SPIN's practice)")
    sft_weight: float = _f(0.0, "IRFT/SPIN: add this weight times the demonstration's per-token NLL to each pair's loss")
    eval_data: str | None = _f(None, "held-out demonstrations: each round reports the implicit-reward margin on them")
    eval_size: int = _f(64, "at most this many --eval-data rows")
    # RFT (Algorithm 1); also uses --rounds, --beta (KL weight to pi_ref) and the sampling flags (--num-samples >= 2)
    policy_steps: int = _f(1, "K: PPO-clip passes over a round's samples against the current reward (each in global batches)")
    reward_loss: Literal["logistic", "linear"] = _f("logistic", "reward-step l(u): logistic (Bradley-Terry) or linear (exact IRL gradient; needs --reward-l2)")
    reward_l2: float = _f(0.0, "L2 penalty on the reward values of each pair, bounds the linear loss")
    reward_model: str | None = _f(None, "reward model's starting point (HF directory); default: the policy's starting model")
    reward_learning_rate: float = _f(2e-5, "reward model's peak learning rate (AdamW, same schedule as the policy's)")
    clip_range: float = _f(0.2, "PPO-clip epsilon on the ratio pi_theta / pi_t of a whole sample")


@dataclass
class GenerateConfig(ModelConfig, DataConfig, SamplingConfig):
    output: str | None = _f(None, "JSONL file for the samples")


@dataclass
class RewardScoreConfig(DataConfig):
    reward_model: str | None = _f(None, "reward model directory (e.g. OUTPUT/reward_model of an RFT run)")
    output: str | None = _f(None, "JSONL file: the input rows, each with its 'reward'")
    batch_size: int = _f(16, "sequences scored together")


def _to_field_names(cls, raw: dict, source: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise SftjuiceError(f"{source}: unknown option '{key}' (see --help)")
        out[name] = value
    return out


def parse_args(cls, argv: list[str], prog: str):
    """Parse ``argv`` into ``cls``; a ``--config FILE`` YAML supplies defaults that flags override."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, prog=prog)
    parser.add_argument("--config", type=str, default=None, help="YAML file with any of these options")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        path = Path(pre.config)
        if not path.is_file():
            raise SftjuiceError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SftjuiceError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise SftjuiceError(f"{path}: expected a mapping of option: value")
        parser.set_defaults(**_to_field_names(cls, raw, str(path)))
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


def require(cfg, *names: str) -> None:
    missing = [n for n in names if getattr(cfg, n) in (None, "")]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise SftjuiceError(f"missing required option(s): {flags}")


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


@dataclass
class EvalConfig(ModelConfig, SamplingConfig):
    judge: str = _f("verifier", "verifier (final-answer match), loglik (reference log-prob per token), "
                    "gap (log-prob gap on --pairs), or a reward-model directory")
    data: str | None = _f(None, "prompts with references (an 'answer' field, else the completion): JSONL / JSON / datasets dir")
    baseline: str | None = _f(None, "a second model judged on the same prompts; the win rate is --model's over it")
    output: str | None = _f(None, "directory for eval.json and eval.md (and gap.png)")
    pairs: str | None = _f(None, "--judge gap: JSONL of {prompt, chosen, rejected}; --model may be a training output folder")
    responses: str | None = _f(None, "--model's responses as prompt/completion rows (e.g. sftjuice generate output), not generated")
    baseline_responses: str | None = _f(None, "--baseline's responses, as --responses")
    temperature: float = _f(0.0, "sampling temperature; 0 = greedy (the default for evaluation)")
    skip_invalid: bool = _f(False, "skip invalid rows (counted and reported) instead of stopping")
    batch_size: int = _f(16, "sequences scored together (log-likelihood, reward model, gap)")
