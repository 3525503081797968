"""Every forward pass that scores completions: per-token and sequence log-probs of a policy,
and scalar rewards of a reward model.

The batch layouts come from :mod:`data` (``collate``: one prompt per completion;
``collate_shared``: ``k`` completions per prompt). The shared layout computes each prompt
once: its keys and values (with their gradient path) are cached and repeated for its ``k``
completions, about ``P + k*C`` instead of ``k*(P + C)`` tokens of work. The training losses
call the two differentiable passes (:func:`completion_logprobs`, :func:`shared_logprobs`,
:func:`shared_rewards`); the ``*_of`` functions batch them over lists without gradients for
reference passes, the reward CLI and evaluation.
"""

from __future__ import annotations

import torch

from .config import SftjuiceError
from .data import collate_shared
from .losses import token_logprobs
from .models import cache_of, with_cache
from .progress import bar as progress_bar


def packed_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs ``[B, C]`` of the completions of a :func:`data.collate_packed`
    batch (0 at padding): one forward pass over the packed row, logits at ``logit_rows`` only."""
    sees = batch["attention_mask"]
    attention = getattr(model, "module", model).config._attn_implementation  # (DDP/FSDP wrap the model)
    if attention not in ("sdpa", "eager"):
        raise SftjuiceError(f"--pack needs attention 'sdpa' or 'eager' (a block mask); the model uses '{attention}'")
    if attention == "eager":  # eager adds its mask to the scores
        sees = torch.zeros(sees.shape, device=sees.device).masked_fill(~sees, torch.finfo(torch.float32).min)
    out = model(input_ids=batch["input_ids"], attention_mask=sees, position_ids=batch["position_ids"],
                logits_to_keep=batch["logit_rows"], use_cache=False)
    mask = batch["completion_mask"]
    flat = token_logprobs(out.logits[0], batch["completion_ids"][mask])
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def completion_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs ``[B, C]`` of the completion tokens of a :func:`data.collate`
    batch (0 at padding). Logits are computed for the completion columns only."""
    if "logit_rows" in batch:
        return packed_logprobs(model, batch)
    C = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False)
    return token_logprobs(out.logits[:, :-1], batch["completion_ids"]) * batch["completion_mask"]


def _shared_forward(model, batch: dict[str, torch.Tensor], **head) -> tuple:
    """Run the prompts once, repeat their cache for the ``k`` completions each, then run the
    completions. Returns (prompt outputs, completion outputs, k)."""
    prompt_mask = batch["prompt_mask"]
    k = batch["completion_ids"].shape[0] // prompt_mask.shape[0]
    C = batch["completion_ids"].shape[1]
    first = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=batch["prompt_positions"],
                  use_cache=True, **head.get("prompt", {}))
    cache = cache_of(first)
    cache.batch_repeat_interleave(k)
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), batch["completion_mask"].long()], dim=1)
    start = batch["prompt_positions"][:, -1:].repeat_interleave(k, dim=0) + 1
    rest = model(input_ids=batch["completion_ids"], attention_mask=mask, position_ids=start + torch.arange(C, device=start.device),
                 use_cache=True, **with_cache(model, cache), **head.get("completion", {}))
    return first, rest, k


def shared_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs ``[B*k, C]`` of the completions of a :func:`data.collate_shared`
    batch; the same values as :func:`completion_logprobs` on the ``k`` full sequences."""
    if "logit_rows" in batch:
        return packed_logprobs(model, batch)
    C = batch["completion_ids"].shape[1]
    first, rest, k = _shared_forward(model, batch, prompt={"logits_to_keep": 1}, completion={"logits_to_keep": C})
    predicts_first = first.logits[:, -1:].repeat_interleave(k, dim=0)  # each completion's first token
    logits = torch.cat([predicts_first, rest.logits[:, :-1]], dim=1)
    return token_logprobs(logits, batch["completion_ids"]) * batch["completion_mask"]


def shared_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``r_phi`` of the ``k`` completions per prompt of a :func:`data.collate_shared` batch.
    The completions are the second call's whole input, so HF's sequence-classification head
    reads each at its last token that is not padding (``config.pad_token_id``): the score
    the saved directory gives under ``AutoModelForSequenceClassification``."""
    return _shared_forward(model, batch)[1].logits.squeeze(-1).float()


@torch.inference_mode()
def _grouped(model, pass_fn, pad_id: int, prompts: list[list[int]], groups: list[list[list[int]]],
             batch_size: int) -> list[list]:
    """``pass_fn`` over ``groups[i]`` (completions answering ``prompts[i]``; every group the
    same size), ``batch_size`` prompts at a time, in eval mode, without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    progress = progress_bar(len(prompts), "scoring", "prompt", leave=False)
    try:
        for i in range(0, len(prompts), batch_size):
            group = groups[i: i + batch_size]
            flat = [c for g in group for c in g]
            batch = {k: v.to(device) for k, v in collate_shared(prompts[i: i + batch_size], flat, pad_id).items()}
            rows = iter(pass_fn(model, batch, flat))
            out += [[next(rows) for _ in g] for g in group]
            progress.update(len(group))
    finally:
        progress.close()
        model.train(was_training)
    return out


def token_logprobs_of(model, pad_id: int, prompts: list[list[int]], groups: list[list[list[int]]],
                      batch_size: int = 16) -> list[list[list[float]]]:
    """Per-token ``log pi(y_t | x, y_<t)`` of each completion in ``groups[i]``, answering ``prompts[i]``."""
    def tokens(m, batch, flat):
        return [row[: len(c)].tolist() for row, c in zip(shared_logprobs(m, batch), flat)]

    return _grouped(model, tokens, pad_id, prompts, groups, batch_size)


def sequence_logprobs_of(model, pad_id: int, prompts: list[list[int]], groups: list[list[list[int]]],
                         batch_size: int = 16) -> list[list[float]]:
    """``log pi(y|x)`` (summed over the completion's tokens) of each completion in ``groups[i]``."""
    return [[sum(t) for t in g] for g in token_logprobs_of(model, pad_id, prompts, groups, batch_size)]


def rewards_of(model, prompts: list[list[int]], groups: list[list[list[int]]], batch_size: int = 16) -> list[list[float]]:
    """``r_phi(x, y)`` of each completion in ``groups[i]``; the model's ``pad_token_id`` pads."""
    return _grouped(model, lambda m, batch, flat: shared_rewards(m, batch).tolist(), model.config.pad_token_id,
                    prompts, groups, batch_size)


def singletons(items: list) -> list[list]:
    """One-completion groups, for the ``*_of`` functions on plain (prompt, completion) lists."""
    return [[x] for x in items]
