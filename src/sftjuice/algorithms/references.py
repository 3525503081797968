"""The reference policies, in one place.

pi_SFT is the policy as training starts, frozen: pi_ref of RFT's and SRPPO's KL penalty,
SRPPO's reward, DPO's reference in RSO and steps, the sampler of RSO's candidates and of
steps' rollouts. What it is depends on how the policy trains:

- full weights: a frozen copy of the starting policy, made before the first step;
- ``--lora`` from a full model: the policy with its adapter switched off (the base is the
  starting model, so no copy is kept);
- ``--lora`` from a LoRA adapter directory (an SFT run's ``final/`` with ``--lora``): the
  policy with its trainable adapter switched to the frozen copy of that adapter that
  :func:`models.load_policy` loads beside it (TRL's ``ref_adapter_name``). Switching the
  adapter off would give the adapter's base model, not pi_SFT.

IRFT's pi_t, the policy frozen at the start of round t, is the policy itself, read before
the round's first step (:func:`round_start`): at round 0 it is pi_SFT in every case.

The other models a method loads beside the policy are here too: pi_base (SRPPO's reward
and RSO's implicit one) and the reward model (RFT's, trained; RSO's, frozen).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from ..config import RFTConfig, RSOConfig, SftjuiceError, SRPPOConfig
from ..models import (REFERENCE_ADAPTER, is_peft, load_policy, load_reward_model, load_tokenizer, resolve_model,
                      reward_pad_id)
from ..training import MANIFEST, Run, file_fingerprint

# ------------------------------------------------------------------ pi_SFT and IRFT's pi_t


def starting_policy(run: Run) -> Callable[[], ContextManager]:
    """pi_SFT: ``with pi_sft() as model:`` scores or samples with it. Call before the first
    step (and before a resume loads a checkpoint): a full-weight policy is copied then."""
    if not is_peft(run.policy):
        frozen = copy.deepcopy(run.policy).eval().requires_grad_(False)
        return lambda: contextlib.nullcontext(frozen)
    trainable = run.policy.active_adapter

    @contextlib.contextmanager
    def pi_sft():
        policy = run.policy
        if REFERENCE_ADAPTER not in policy.peft_config:
            with policy.disable_adapter():
                yield policy
            return
        policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)  # frozen while it is active, too
        try:
            yield policy
        finally:
            policy.set_adapter(trainable)

    return pi_sft


def round_start(run: Run):
    """IRFT's pi_t: the policy as it stands, which is pi_t until the round's first step."""
    return run.policy


# ------------------------------------------------------------ pi_base and the implicit reward


def base_model_of(cfg: SRPPOConfig | RSOConfig) -> str:
    """``--base-model``, or the starting model of the sftjuice SFT run whose ``OUTPUT/final``
    (or ``OUTPUT/merged``) is ``--model``, checked against that run's fingerprint of it."""
    if cfg.base_model:
        return cfg.base_model
    model = Path(cfg.model).expanduser()
    manifest = model.parent / MANIFEST
    why = "is not the final/ of an sftjuice SFT run (OUTPUT/final beside OUTPUT/manifest.json)"
    if model.is_dir() and manifest.is_file():
        try:
            run = json.loads(manifest.read_text())
            method, base = run["method"], run["config"]["model"]
        except (OSError, ValueError, KeyError, TypeError):
            method, base = None, None
        if method != "sft":
            why = f"comes from a --method {method} run, whose starting model is not the pretrained base"
        else:
            try:
                same = file_fingerprint(resolve_model(base)) == run.get("model")
            except SftjuiceError:
                same = False
            if same:
                return base
            why = (f"comes from an SFT run whose starting model {base} is not found here or is not the model "
                   "it trained (changed, or passed as a loaded model)")
    raise SftjuiceError(f"--base-model is needed: --model {cfg.model} {why}; give the pretrained model it was fine-tuned from")


def load_base(run: Run, name: str):
    """pi_base, frozen, on the run's device; it must read the policy's tokens."""
    path = resolve_model(name) if run.is_main else None
    run.accelerator.wait_for_everyone()
    path = path or resolve_model(name)
    if (path / "tokenizer_config.json").exists() and load_tokenizer(path).get_vocab() != run.tokenizer.get_vocab():
        raise SftjuiceError(f"--base-model {path}: its tokenizer differs from --model's; the reward compares both models on the same tokens")
    base = load_policy(run.cfg, path, trainable=False)
    if base.config.vocab_size != run.policy_model.config.vocab_size:
        raise SftjuiceError(f"--base-model {path}: vocabulary of {base.config.vocab_size} tokens, --model has "
                            f"{run.policy_model.config.vocab_size}; the reward compares both models on the same tokens")
    return base.to(run.accelerator.device).eval().requires_grad_(False)


@dataclass(frozen=True)
class ImplicitReward:
    """SRPPO's reward, RSO's ``--reward implicit``: r(x, y) = sum_t log pi_SFT(y_t) - log
    pi_base(y_t) of a finished response; a response cut before its end of turn gets
    ``no_eos_penalty`` (its partial log-ratio grows with its length). Tokens in ``skip``
    are left out of the sum: ``--reward-tokens answer`` skips the chat template's (the
    end of turn), which the base model never learned to predict, so on SmolLM2 it carried
    about as much log-ratio as a whole short answer."""
    no_eos_penalty: float
    skip: frozenset[int] = frozenset()

    def __call__(self, token_ids: list[int], sft_logprobs: list[float], base_logprobs: list[float], finished: bool) -> float:
        if not finished:
            return self.no_eos_penalty
        keep = [t not in self.skip for t in token_ids]
        return math.fsum(x for x, k in zip(sft_logprobs, keep) if k) - math.fsum(x for x, k in zip(base_logprobs, keep) if k)


def template_ids(run: Run) -> frozenset[int]:
    """The chat template's tokens a response can hold: end of turn and other special tokens."""
    return frozenset(run.tokenizer.all_special_ids) | frozenset(run.chat.stop_token_ids)


def implicit_reward(run: Run, cfg: SRPPOConfig | RSOConfig) -> ImplicitReward:
    return ImplicitReward(cfg.no_eos_penalty, template_ids(run) if cfg.reward_tokens == "answer" else frozenset())


# -------------------------------------------------------------------- the reward model


def load_reward(run: Run, cfg: RFTConfig | RSOConfig):
    """r_phi: a scalar head on ``--reward-model`` (default: the policy's starting model)."""
    if cfg.reward_model is None and not isinstance(cfg.model, str):
        raise SftjuiceError("--reward-model is needed when the policy is given as a loaded model")
    name = cfg.reward_model or cfg.model
    path = resolve_model(name) if run.is_main else None
    run.accelerator.wait_for_everyone()
    path = path or resolve_model(name)
    if cfg.reward_model and (path / "tokenizer_config.json").exists():
        if load_tokenizer(path).get_vocab() != run.tokenizer.get_vocab():
            raise SftjuiceError(f"{path}: the reward model's tokenizer differs from the policy's; it must read the same tokens")
    return load_reward_model(path, pad_token_id=reward_pad_id(run.tokenizer, run.chat.stop_token_ids))
