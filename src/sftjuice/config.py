"""Typed configuration: a common base per command and one dataclass per training method,
the way TRL has ``DPOConfig`` and ``GRPOConfig``.

Every field is a command-line flag (``--max-new-tokens`` or ``--max_new_tokens``) and a key
of the YAML file given with ``--config``; flags win over the file. A field's metadata holds
its allowed range, checked when the config is made (from flags, YAML or Python), so a bad
value stops the run at once with one line naming the option and its range. A flag that the
chosen method does not take is an error naming the methods that do.

Batch sizes count prompts in every method: ``--per-device-batch-size 8`` puts 8
demonstrations in a micro-batch, each with everything the method generates for it (SFT:
the demonstration alone; IRFT/SPIN: its sample(s); RFT: its ``--num-samples`` samples).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

DEFAULT_MODEL = "smollm2-135m-instruct"


class SftjuiceError(Exception):
    """A problem the user can fix (bad input, bad option). Reported in one line, no traceback."""


def option(default, help: str, *, gt=None, ge=None, le=None, lt=None, alias: str | None = None,
           chosen: str | None = None):
    """A field with its help text, allowed range (``gt``/``ge``/``le``/``lt``), another flag
    name (``alias``, e.g. the name a paper uses) and where its default comes from (``chosen``,
    shown after the default in --help)."""
    meta = {"help": help, **{k: v for k, v in dict(gt=gt, ge=ge, le=le, lt=lt, alias=alias, chosen=chosen).items()
                             if v is not None}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Narrowed(typing.NamedTuple):
    default: object
    changes: dict


def _narrowed(default, **changes) -> _Narrowed:
    """A ``_defaults`` entry that also narrows the option's range (``gt``/``ge``/``le``/``lt``)
    or adds an ``alias`` or a ``chosen``."""
    return _Narrowed(default, changes)


PLATEAU_RESULTS = "benchmarks/results/quality-plateau-<task>.md"


def _tuned(default, **by_task) -> _Narrowed:
    """A default the plateau benchmark chose on validation (issue 25), with each task's choice
    (task=value), which --help shows beside it: where the tasks disagree, the user sees both."""
    choices = ", ".join(f"{task} {value}" for task, value in by_task.items())
    return _Narrowed(default, {"chosen": f"chosen on validation by the plateau benchmark: {choices}; {PLATEAU_RESULTS}"})


def config(cls):
    """``@dataclass`` for a config class. Its ``_defaults`` (option name -> default, or
    ``_narrowed(...)``) re-declares options it inherits with the defaults it changes, keeping
    their type, help and range: each option is declared, and its help written, once."""
    own = cls.__dict__.get("__annotations__")
    if own is None:
        cls.__annotations__ = own = {}
    for name, change in cls.__dict__.get("_defaults", {}).items():
        base = next(vars(c)["__dataclass_fields__"][name] for c in cls.__mro__[1:]
                    if name in vars(c).get("__dataclass_fields__", {}))
        default, changes = change if isinstance(change, _Narrowed) else (change, {})
        meta = dict(base.metadata)
        for side in ({"gt", "ge"}, {"lt", "le"}):  # a new bound replaces the old one on its side
            if side & changes.keys():
                meta = {k: v for k, v in meta.items() if k not in side}
        own[name] = base.type
        setattr(cls, name, option(default, **{**meta, **changes}))
    return dataclass(cls)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _range_text(meta: dict) -> str:
    lo = f"> {meta['gt']}" if "gt" in meta else f">= {meta['ge']}" if "ge" in meta else None
    hi = f"< {meta['lt']}" if "lt" in meta else f"<= {meta['le']}" if "le" in meta else None
    return " and ".join(x for x in (lo, hi) if x)


class Checked:
    """Checks every field against its declared range and type after construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                raise SftjuiceError(f"{flag(f.name)} {value}: must be a finite number")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = all((
                    "gt" not in meta or value > meta["gt"], "ge" not in meta or value >= meta["ge"],
                    "lt" not in meta or value < meta["lt"], "le" not in meta or value <= meta["le"]))
                if not ok:
                    raise SftjuiceError(f"{flag(f.name)} {value}: must be {_range_text(meta)}")
        self.check()

    def check(self) -> None:
        """Checks between fields; subclasses extend it."""


# ----------------------------------------------------------------- shared option groups


@config
class ModelConfig(Checked):
    model: str = option(DEFAULT_MODEL, "HF model directory, hub id in the local cache, or 'smollm2-135m-instruct'")
    lora: bool = option(False, "train a LoRA adapter instead of all weights")
    lora_r: int = option(16, "LoRA rank", ge=1)
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)", gt=0)
    lora_dropout: float = option(0.05, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = option(["all-linear"], "module names LoRA adapts ('all-linear' = every linear layer but the head)")
    chat_template: str | None = option(None, "for a tokenizer without a chat template: 'chatml' or a Jinja file (saved with the trained model)")
    bf16: Literal["auto", "true", "false"] = option(
        "false", "bf16 autocast for forward/backward and sampling (fp32 master weights); auto = where a cached "
        "micro-benchmark finds bf16 matrix math faster than fp32 on this machine (env SFTJUICE_BF16 sets what auto means)")
    seed: int = option(0, "random seed (data order, sampling, initialisation)", ge=0)


@config
class DataConfig(Checked):
    data: str | None = option(None, "demonstrations: JSONL / JSON file or a `datasets` directory")
    skip_invalid: bool = option(False, "skip invalid rows (counted and reported) instead of stopping")
    max_prompt_length: int = option(512, "rows whose rendered prompt is longer are invalid", ge=1)
    max_length: int = option(1024, "prompt + completion tokens; longer completions are truncated (and counted)", ge=2)


@config
class SamplingConfig(Checked):
    num_samples: int = option(1, "responses sampled per prompt", ge=1)
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", ge=0)
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)", gt=0, le=1)
    max_new_tokens: int = option(128, "longest sampled response, in tokens", ge=1)
    # 64 rather than 32: a decode step's matmuls have one row per sequence, and the default
    # model's run at 0.47-0.56 of the fp32 ceiling on 32 rows and 0.61-0.77 on 96 (two runs,
    # README "What it found"); the cache costs ~0.9 GB for 64 rows of 300 positions of it
    generation_batch_size: int = option(64, "sequences decoded together", ge=1)
    generation_backend: Literal["torch", "vllm"] = option(
        "torch", "sampling engine: the in-process KV-cache sampler, or vLLM (needs the vllm package; README: vLLM)")
    vllm_gpu_memory_utilization: float = option(0.3, "vLLM: share of GPU memory for its engine (it shares the GPU with training)", gt=0, le=1)


# ----------------------------------------------------------------------- training


@config
class TrainConfig(ModelConfig, DataConfig):
    """What every training method takes."""
    method: str = option("sft", "training method: sft, irft, spin, rft, srppo, rso, steps, rest")
    output: str | None = option(None, "output directory (checkpoints, metrics.jsonl, final/)")
    learning_rate: float = option(5e-5, "peak learning rate (AdamW)", gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = option("linear", "learning-rate schedule after warmup")
    warmup_ratio: float = option(0.0, "share of steps with linear warmup", ge=0, le=1)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", ge=0)
    per_device_batch_size: int = option(8, "prompts per process per micro-batch, each with what the method generates for it", ge=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step", ge=1)
    pack: bool = option(False, "train on each micro-batch packed into one padding-free row (a block mask keeps its "
                        "sequences apart; each prompt computed once): the padded layout's loss and gradients up to fp32 rounding "
                        "(LoRA dropout draws other masks)")
    save_every: int = option(0, "checkpoint every N optimiser steps (0 = at the end of each epoch/round only)", ge=0)
    keep_checkpoints: int = option(1, "how many checkpoints to keep", ge=1)
    resume: bool = option(False, "continue the run in --output from its last checkpoint")
    overwrite: bool = option(False, "delete what --output holds and start afresh")
    merge_lora: bool = option(False, "with --lora: also write the merged model to OUTPUT/merged/")
    log_every: int = option(1, "append metrics every N optimiser steps", ge=1)
    max_bad_steps: int = option(3, "stop after this many optimiser steps in a row with a non-finite loss or gradient norm "
                            "(each is skipped: it never reaches the weights)", ge=1)
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "none", "also log metrics.jsonl's numbers through accelerate's tracker (TensorBoard: OUTPUT/sftjuice/; W&B: honours WANDB_MODE)")

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise SftjuiceError("--resume and --overwrite exclude each other")
        if self.merge_lora and not self.lora:
            raise SftjuiceError("--merge-lora needs --lora")
        expected = {c: m for m, c in METHOD_CONFIGS.items()}.get(type(self))
        if expected and self.method != expected:
            raise SftjuiceError(f"--method {self.method}: {type(self).__name__} is --method {expected}")


# Option groups that some methods share, mixed in before TrainConfig (SPIN counts
# --iterations: it takes neither epochs nor rounds).


@config
class EpochsConfig(Checked):
    epochs: float = option(1.0, "passes over the data", gt=0)


@config
class RoundsConfig(EpochsConfig):
    rounds: int = option(4, "T: generation rounds per epoch; each round samples for its section of the data, then trains on it", ge=1)


@config
class PairLossConfig(Checked):
    """Methods that fit pairs (chosen, rejected) by their log-prob margins: IRFT, SPIN, RSO, steps."""
    beta: float = option(0.1, "the pair loss's scale on the log-prob margins to the reference (DPO's beta); "
                     "irft/spin: the implicit reward is beta * log(pi / pi_t)", gt=0)


@config
class ImplicitRewardConfig(Checked):
    """The implicit reward log pi_SFT(y|x) - log pi_base(y|x) of SRPPO and of RSO's --reward implicit."""
    base_model: str | None = option(None, "implicit reward: pi_base, the pretrained model --model was fine-tuned from; default: "
                                "the starting model of the sftjuice SFT run whose OUTPUT/final is --model")
    no_eos_penalty: float = option(-1.0, "implicit reward of a sample cut at --max-new-tokens (no end of turn), instead of its "
                               "log-ratio; in nats, 0 = pi_SFT and pi_base agree")
    reward_tokens: Literal["all", "answer"] = option(
        "all", "implicit reward over all of a response's tokens, or its answer only (without the chat template's end of "
               "turn, which the base model never learned and which can carry as much log-ratio as the answer)")


# ------------------------------------------------------------------------ methods


@config
class SFTConfig(EpochsConfig, TrainConfig):
    """SFT: minimise -log pi(y^E|x) over the demonstrations."""
    eval_data: str | None = option(None, "held-out demonstrations: after each epoch the model is judged on them, and OUTPUT/final "
                                   "is the best epoch's model (early stopping; OUTPUT/best holds it while the run goes on)")
    eval_size: int = option(64, "at most this many --eval-data rows", ge=1)
    patience: int = option(2, "with --eval-data: stop after this many epochs without a better one", ge=1)
    verifier: str | None = option(None, "with --eval-data: judge greedy answers with this verifier (exact, steps or "
                                  "module:function) and keep the most accurate epoch (equal ones: the lower NLL); none: the epoch of lowest "
                                  "per-token NLL of the held-out demonstrations")
    max_new_tokens: int = option(128, "with --verifier: longest greedy answer, in tokens", ge=1)
    # defaults this method changes; the learning rate is SFT's from a pretrained model (from an
    # SFT-trained one, continued SFT, the plateau benchmark chose lower ones)
    _defaults = dict(method="sft", learning_rate=_narrowed(5e-5, chosen=(
        "continued SFT from an SFT-trained model: the plateau benchmark chose numbers__round_number 2e-05, "
        f"multistep_arithmetic 5e-06 on validation; {PLATEAU_RESULTS}")))

    def check(self) -> None:
        super().check()
        if self.verifier and not self.eval_data:
            raise SftjuiceError("--verifier judges --eval-data: give both")


@config
class OnlineConfig(TrainConfig, SamplingConfig):
    """Methods that sample rounds from the policy being trained."""
    # defaults these methods change: they start from an SFT model, so a smaller, constant rate (docs/methods.md)
    _defaults = dict(learning_rate=1e-5 / 3, lr_scheduler="constant")


@config
class PolicyGradientConfig(RoundsConfig, OnlineConfig):
    """RFT and SRPPO: PPO-clip and a KL estimate on samples of pi_t. Both take the samples to
    come from pi_t itself, whose untempered log-probs are the ratio's denominator and the
    KL's; a temperature or nucleus would sample another policy and bias both."""
    policy_steps: int = option(1, "K: PPO-clip passes over a round's samples; 0 (rft only) trains the reward alone", ge=0)
    kl_coef: float = option(0.1, "weight of the per-token KL to pi_ref = pi_SFT (the starting model) in the policy's reward", ge=0)
    clip_range: float = option(0.2, "PPO-clip epsilon on the ratio pi_theta / pi_t of a whole sample", gt=0, lt=1)
    # defaults these methods change: at least 2 samples a prompt (RLOO baselines each by the
    # others), and fewer prompts a batch, each carrying its samples
    _defaults = dict(num_samples=_narrowed(2, ge=2), per_device_batch_size=4)

    def check(self) -> None:
        super().check()
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if value != 1.0:
                raise SftjuiceError(f"{flag(name)} {value}: --method {self.method} samples from pi_t itself (1), the "
                                    "policy its PPO ratio and KL estimate divide by")


@config
class PairConfig(PairLossConfig, OnlineConfig):
    """The implicit-reward pair loss of IRFT and SPIN."""
    passes: int = option(1, "K: passes over a round's (demonstration, sample) pairs", ge=1)
    loss: Literal["logistic", "linear", "hinge"] = option("logistic", "l(u): logistic (SPIN), linear (exact IRL gradient), hinge")
    keep_previous_round: bool = option(False, "also train on the previous round's samples, re-scored by the current pi_t (SPIN's practice)")
    sft_weight: float = option(0.0, "add this weight times the demonstration's per-token NLL to each pair's loss", ge=0)
    eval_data: str | None = option(None, "held-out demonstrations: each round reports the implicit-reward margin on them")
    eval_size: int = option(64, "at most this many --eval-data rows", ge=1)


@config
class IRFTConfig(RoundsConfig, PairConfig):
    """IRFT (Algorithm 2): T generation rounds per epoch, K passes of the pair loss each."""
    # defaults this method changes: the plateau benchmark's IRFT (T=2, the demonstration's NLL
    # term, which Pang et al. 2024 found crucial), at the learning rate it chose
    _defaults = dict(method="irft", rounds=2, sft_weight=1.0,
                     learning_rate=_tuned(2e-6, numbers__round_number=2e-6, multistep_arithmetic=2e-6))


@config
class SPINConfig(PairConfig):
    """SPIN (Chen et al. 2024): IRFT with one generation round over the whole data per iteration."""
    iterations: int = option(1, "generation rounds over the whole data", ge=1)
    # defaults this method changes: the plateau benchmark's SPIN (the previous iteration's
    # samples kept, SPIN's practice; the demonstration's NLL term), at the learning rate it chose
    _defaults = dict(method="spin", keep_previous_round=True, sft_weight=1.0,
                     learning_rate=_tuned(2e-6, numbers__round_number=2e-6, multistep_arithmetic=2e-6))

    @property
    def rounds(self) -> int:
        return 1

    @property
    def epochs(self) -> float:
        return float(self.iterations)


@config
class RFTConfig(PolicyGradientConfig):
    """RFT (Algorithm 1): an explicit reward model, then KL-regularised RL against it."""
    reward_loss: Literal["logistic", "linear"] = option("logistic", "reward-step l(u): logistic (Bradley-Terry) or linear (exact IRL gradient; needs --reward-l2)")
    reward_l2: float = option(0.0, "L2 penalty on the reward values of each pair, bounds the linear loss", ge=0)
    reward_model: str | None = option(None, "reward model's starting point (HF directory); default: the policy's starting model")
    reward_learning_rate: float = option(2e-5, "reward model's peak learning rate (AdamW, same schedule as the policy's; 0 keeps the reward fixed)", ge=0)
    # defaults this method changes: the plateau benchmark's RFT (T=2) at the learning rate both
    # tasks chose (its reward's learning rate and steps were not tuned: 2 trials an arm)
    _defaults = dict(method="rft", rounds=2,
                     learning_rate=_tuned(2e-6, numbers__round_number=2e-6, multistep_arithmetic=2e-6))

    def check(self) -> None:
        super().check()
        if self.reward_loss == "linear" and self.reward_l2 <= 0:
            raise SftjuiceError("--reward-loss linear is unbounded below: bound the rewards with --reward-l2 > 0")


@config
class SRPPOConfig(ImplicitRewardConfig, PolicyGradientConfig):
    """Self-Rewarding PPO (Zhang et al. 2025): reward log pi_SFT(y|x) - log pi_base(y|x), KL-regularised RL from pi_SFT."""
    prompts: str | None = option(None, "extra unlabelled prompts (JSONL / JSON / datasets dir; completions ignored) sampled "
                             "and trained on with --data's; only --data's demonstrations are ranked in the metrics")
    # defaults this method changes
    _defaults = dict(method="srppo", num_samples=4, kl_coef=0.05)

    def check(self) -> None:
        super().check()
        if self.policy_steps < 1:  # unlike RFT's, its reward does not train: 0 would train nothing
            raise SftjuiceError(f"--policy-steps {self.policy_steps}: --method srppo trains only the policy: must be >= 1")


@config
class VerifiedConfig(RoundsConfig, OnlineConfig):
    """Methods that keep what a verifier accepts among the policy's own solutions (Setlur et al. 2024)."""
    verifier: str | None = option(None, "answer verifier: a built-in one (exact, steps) or module:function; default exact")
    max_positives: int = option(2, "distinct verified-correct solutions kept per prompt (paper: up to 4 of 8)", ge=1)
    # defaults these methods change: the paper's 8 samples, scaled down for a CPU
    _defaults = dict(num_samples=4)


@config
class RestConfig(VerifiedConfig):
    """Positive-only self-training (RFT/ReST-style): SFT on the policy's own verified-correct solutions."""
    # defaults this method changes: the plateau benchmark's rest (T=2) at the learning rate
    # multistep_arithmetic chose (round_number chose 1e-5 by 1.3 points, multistep 2e-6 by
    # 2.4; both within validation noise; IRFT and SPIN chose 2e-6 on both)
    _defaults = dict(method="rest", rounds=2,
                     learning_rate=_tuned(2e-6, numbers__round_number=1e-5, multistep_arithmetic=2e-6))


@config
class StepsConfig(PairLossConfig, VerifiedConfig):
    """Per-step negatives (Setlur et al. 2024): DPO of a verified solution over a wrong one cut at its first pit."""
    max_negatives: int = option(2, "wrong solutions per prompt made into negatives (paper: 8)", ge=1)
    rollouts: int = option(3, "K: completions of pi_SFT from each step prefix of a negative (paper: 5)", ge=1)
    value: Literal["any", "mean"] = option("any", "a prefix's value from its rollouts: any verifies (the paper's) or their mean score")
    credit: Literal["step", "response"] = option(
        "step", "step: the negative is cut after its first pit; response: the whole wrong solution (no rollouts)")
    sft_weight: float = option(1.0, "add this weight times the verified positive's per-token NLL to each pair's loss", ge=0)
    # defaults this method changes: the plateau benchmark's steps arm (T=2, the positive's NLL
    # term) at the learning rate it chose (it ran on multistep_arithmetic only: the noisy task)
    _defaults = dict(method="steps", rounds=2, learning_rate=_tuned(2e-6, multistep_arithmetic=2e-6))


@config
class RSOConfig(RoundsConfig, PairLossConfig, ImplicitRewardConfig, OnlineConfig):
    """RSO (Liu et al. 2024): rejection-sample pairs towards pi* ∝ pi_SFT exp(r/rejection_beta) from N candidates of the frozen starting model, then fit them with a DPO/SLiC loss."""
    num_accepted: int = option(8, "M: distinct candidates kept per prompt by rejection sampling; they form M/2 random pairs", ge=2)
    reward: Literal["model", "implicit"] = option(
        "model", "model: a sequence-classification reward (--reward-model); implicit: log pi_SFT(y) - log pi_base(y) (--base-model)")
    reward_model: str | None = option(None, "--reward model: an AutoModelForSequenceClassification directory with the "
                                  "policy's tokenizer, e.g. an RFT run's OUTPUT/reward_model")
    rejection_beta: float = option(0.5, "rejection sampling's temperature: it draws towards pi* ∝ pi_SFT exp(r / rejection_beta); "
                               "in the reward's units (retune per reward): near 0 = best-of-N, large = plain sampling. "
                               "Formerly --beta, which is now the DPO coefficient (formerly --gamma): an old --beta is not caught", gt=0)
    loss: Literal["sigmoid", "hinge", "hinge-norm"] = option(
        "sigmoid", "sigmoid (DPO), hinge (SLiC: no reference), hinge-norm (hinge on DPO's reference-normalised margin)")
    passes: int = option(1, "passes over a round's pairs", ge=1)
    # defaults this method changes: N candidates (the paper: 64, here --num-candidates too) at
    # the paper's temperature, which must be > 0 (greedy would draw one candidate N times)
    _defaults = dict(method="rso", num_samples=_narrowed(16, ge=2, alias="num-candidates"), temperature=_narrowed(0.7, gt=0),
                     beta=0.05, per_device_batch_size=2, gradient_accumulation_steps=4)

    def check(self) -> None:
        super().check()
        if self.num_accepted > self.num_samples:
            raise SftjuiceError(f"--num-accepted {self.num_accepted}: must be <= --num-candidates {self.num_samples}")
        if self.reward == "implicit" and self.reward_model:
            raise SftjuiceError("--reward-model is for --reward model; --reward implicit reads --base-model")
        if self.reward == "model" and self.base_model:
            raise SftjuiceError("--base-model is for --reward implicit; --reward model reads --reward-model")


METHOD_CONFIGS: dict[str, type[TrainConfig]] = {
    "sft": SFTConfig, "irft": IRFTConfig, "spin": SPINConfig, "rft": RFTConfig,
    "srppo": SRPPOConfig, "steps": StepsConfig, "rest": RestConfig,
    "rso": RSOConfig,
}


# Options renamed so that a name has one meaning (issue 24), per method: old -> (new, what it is).
# An old name the method no longer takes stops with a pointer to the new one. RSO's old --beta
# (now --rejection-beta) cannot be caught: --beta is now its DPO coefficient, the old --gamma.
RENAMED = {"rft": {"beta": ("kl_coef", "RFT's per-token KL coefficient")},
           "rso": {"gamma": ("beta", "RSO's DPO coefficient"), "beta": ("rejection_beta", "RSO's rejection-sampling beta")}}


def saved_under_new_names(method: str, saved: dict) -> dict:
    """The options a run saved (its manifest's config), under today's names: a run started
    before the renames keeps its old ones, recognised by an old name its method no longer takes."""
    renames = RENAMED.get(method, {})
    if not renames or all(old in _field_names(METHOD_CONFIGS[method]) for old in renames.keys() & saved.keys()):
        return saved
    return {renames[k][0] if k in renames else k: v for k, v in saved.items()}


def method_config(method: str) -> type[TrainConfig]:
    if method not in METHOD_CONFIGS:
        raise SftjuiceError(f"--method {method}: must be one of {', '.join(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method]


# ------------------------------------------------------------------- other commands


@config
class GenerateConfig(ModelConfig, DataConfig, SamplingConfig):
    output: str | None = option(None, "JSONL file for the samples")


@config
class RewardScoreConfig(DataConfig):
    reward_model: str | None = option(None, "reward model directory (e.g. OUTPUT/reward_model of an RFT run)")
    output: str | None = option(None, "JSONL file: the input rows, each with its 'reward'")
    batch_size: int = option(16, "sequences scored together", ge=1)


@config
class EvalConfig(ModelConfig, SamplingConfig):
    judge: str = option("verifier", "verifier (final-answer match), loglik (reference log-prob per token), "
                    "gap (log-prob gap on --pairs), or a reward-model directory")
    verifier: str | None = option(None, "--judge verifier: a built-in verifier (exact, steps) or module:function; default exact")
    data: str | None = option(None, "prompts with references (an 'answer' field, else the completion): JSONL / JSON / datasets dir")
    baseline: str | None = option(None, "a second model judged on the same prompts; the win rate is --model's over it")
    output: str | None = option(None, "directory for eval.json and eval.md (and gap.png)")
    pairs: str | None = option(None, "--judge gap: JSONL of {prompt, chosen, rejected}; --model may be a training output folder")
    responses: str | None = option(None, "--model's responses as prompt/completion rows (e.g. sftjuice generate output), not generated")
    baseline_responses: str | None = option(None, "--baseline's responses, as --responses")
    skip_invalid: bool = option(False, "skip invalid rows (counted and reported) instead of stopping")
    batch_size: int = option(16, "sequences scored together (log-likelihood, reward model, gap)", ge=1)
    # defaults this command changes: greedy answers
    _defaults = dict(temperature=0.0)


# ------------------------------------------------------------------------ parsing


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _aliases(cls) -> dict[str, str]:
    """alias (as a field-like name) -> field name."""
    return {f.metadata["alias"].replace("-", "_"): f.name for f in dataclasses.fields(cls) if "alias" in f.metadata}


def _check_names(cls, names: list[str], source: str) -> None:
    """Every name must be a field of ``cls``; for training, one of another method's is named as such."""
    known = _field_names(cls) | set(_aliases(cls))
    for name in names:
        key = name.replace("-", "_")
        if key in known:
            continue
        if issubclass(cls, TrainConfig) and key in RENAMED.get(cls().method, {}):
            new, what = RENAMED[cls().method][key]
            raise SftjuiceError(f"{source}{flag(key)} was renamed: use {flag(new)} ({what})")
        takers = [m for m, c in METHOD_CONFIGS.items() if key in _field_names(c)]
        if issubclass(cls, TrainConfig) and takers:
            raise SftjuiceError(f"{source}{flag(key)} is not used by --method {cls().method}; "
                                f"methods that take it: {', '.join(takers)}")
        raise SftjuiceError(f"{source}unknown option {flag(key)} (see --help)")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SftjuiceError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SftjuiceError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SftjuiceError(f"{path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _flags_in(argv: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def _types(cls) -> dict[str, tuple[type, tuple]]:
    """Each field's (base type, Literal choices or ()), with ``X | None`` read as ``X``."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is Literal:
            out[name] = (type(args[0]), tuple(args))
        elif typing.get_origin(hint) is list:
            out[name] = (list, (args[0],))
        elif args and typing.get_origin(hint) is not None:  # X | None
            out[name] = (args[0], ())
        else:
            out[name] = (hint, ())
    return out


def _coerce(name: str, value, kind: tuple[type, tuple], source: str):
    """A flag's or YAML value as its field's type; a bad one is a one-line error."""
    base, choices = kind
    if isinstance(value, bool) and "true" in choices:  # a tri-state like --bf16 auto|true|false
        value = str(value).lower()
    try:
        if value is None:
            return None
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError
        if base is list:
            items = value if isinstance(value, list) else [value]
            return [choices[0](v) for v in items]
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        value = base(value)
    except (TypeError, ValueError):
        raise SftjuiceError(f"{source}{flag(name)} {value!r}: expected {'true or false' if base is bool else base.__name__}") from None
    if choices and value not in choices:
        raise SftjuiceError(f"{source}{flag(name)} {value!r}: must be one of {', '.join(map(str, choices))}")
    return value


def _parser(cls, prog: str):
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with any of these options; flags win")
    for f in dataclasses.fields(cls):
        names = [flag(f.name)] + ([f"--{f.name}"] if "_" in f.name else []) + (
            [flag(f.metadata["alias"])] if "alias" in f.metadata else [])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        bounds = _range_text(f.metadata)
        kind = _types(cls)[f.name][0]
        tri_state = "true" in _types(cls)[f.name][1]
        extra = {"nargs": "?", "const": "true"} if kind is bool or tri_state else {"nargs": "+"} if kind is list else {}
        parser.add_argument(*names, dest=f.name, metavar=f.name.upper() if kind is not bool else None,
                            help=f"{f.metadata.get('help', '')} ({bounds + '; ' if bounds else ''}default: {default})"
                                 + (f" [{f.metadata['chosen']}]" if "chosen" in f.metadata else ""), **extra)
    return parser


def parse_args(cls, argv: list[str], prog: str):
    """Parse ``argv`` into ``cls``; a ``--config FILE`` YAML supplies values that flags override.
    For ``train``, ``cls`` is chosen by ``--method`` (from the flags, else the YAML)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    raw = _read_yaml(Path(known.config)) if known.config else {}
    if cls is TrainConfig:
        cls = method_config(known.method or raw.get("method") or "sft")
    raw = {_aliases(cls).get(k, k): v for k, v in raw.items()}
    parser = _parser(cls, prog)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    _check_names(cls, [f for f in _flags_in(argv) if f != "config"], "")
    _check_names(cls, list(raw), f"{known.config}: ")
    flags = vars(parser.parse_args(argv))
    flags.pop("config", None)
    kinds = _types(cls)
    values = {k: _coerce(k, v, kinds[k], f"{known.config}: ") for k, v in raw.items()}
    values.update({k: _coerce(k, v, kinds[k], "") for k, v in flags.items()})
    return cls(**values)


def require(cfg, *names: str) -> None:
    missing = [n for n in names if getattr(cfg, n) in (None, "")]
    if missing:
        raise SftjuiceError(f"missing required option(s): {', '.join(flag(n) for n in missing)}")


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    from .storage import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_dict(cfg), sort_keys=False))
