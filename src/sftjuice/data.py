"""Demonstrations: loading, validation, chat templating and batching.

A demonstration is a prompt (a chat history) and the human response to it. Rows come
in the two usual formats:

- chat: ``{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}``,
  the final assistant turn being the demonstration;
- prompt/completion: ``{"prompt": str | messages, "completion" (or "response"): str | messages}``.

The prompt is rendered with the tokenizer's chat template plus the generation prompt,
exactly as for sampling, so the prompt tokens of a training example are the tokens the
model is conditioned on when it generates. Only completion tokens carry labels.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SftjuiceError

log = logging.getLogger(__name__)


class DataError(SftjuiceError):
    pass


@dataclass
class Demonstration:
    prompt: list[dict]  # chat messages, ending with a user (or tool) turn
    completion: str | None  # the demonstration; None for prompt-only rows
    source: str  # "file:line" for messages about this row
    extra: dict = field(default_factory=dict)  # other fields of the row, passed through (e.g. "answer")


@dataclass
class InvalidRow:
    source: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: field '{self.field}': {self.reason}"


# ---------------------------------------------------------------------------- loading


def _read_rows(path: Path):
    """Yield (location, row) for a JSONL / JSON file or a `datasets` directory."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure means "not a saved dataset"
            raise DataError(f"{path}: not a directory saved with datasets.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: dataset has splits {list(ds)}, expected a 'train' split")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path}:row {i}", row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, row in enumerate(rows):
            yield f"{path}:item {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        yield f"{path}:{lineno}", row


def _check_messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(name, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{name}[{i}]", "expected {\"role\": str, \"content\": str}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_of(value, name: str) -> str:
    """A completion given as a string or as a list with one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _check_messages(value, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise ValueError(name, "expected a string or one assistant message")
        return msgs[0]["content"]
    raise ValueError(name, f"expected a string, got {type(value).__name__}")


def parse_row(row, source: str, require_completion: bool = True) -> Demonstration:
    """Validate one row; raises ValueError(field, reason) when it is bad."""
    if not isinstance(row, dict):
        raise ValueError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = _check_messages(row["messages"], "messages")
        if msgs[-1]["role"] == "assistant":
            prompt, completion = msgs[:-1], msgs[-1]["content"]
            if not prompt:
                raise ValueError("messages", "no prompt before the final assistant turn")
        elif require_completion:
            raise ValueError("messages", f"last message has role '{msgs[-1]['role']}', expected 'assistant'")
        else:
            prompt, completion = msgs, None
        extra = {k: v for k, v in row.items() if k != "messages"}
    elif "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise ValueError("prompt", "empty")
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = _check_messages(p, "prompt")
        key = "completion" if "completion" in row else "response" if "response" in row else None
        if key is None:
            if require_completion:
                raise ValueError("completion", "missing (expected 'completion' or 'response')")
            completion = None
        else:
            completion = _text_of(row[key], key)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "response")}
    else:
        raise ValueError("<row>", "expected a 'messages' field or a 'prompt' field")
    if completion is not None and not completion.strip():
        raise ValueError("completion" if "messages" not in row else "messages", "empty completion")
    return Demonstration(prompt=prompt, completion=completion, source=source, extra=extra)


def load_rows(path: str | Path, parse, skip_invalid: bool = False) -> list:
    """``parse(row, source)`` over a file's rows. A bad row (``parse`` raises
    ``ValueError(field, reason)``) raises DataError naming file, line and field, unless
    ``skip_invalid``: then bad rows are skipped, counted and reported."""
    path = Path(path)
    items, invalid = [], []
    for source, row in _read_rows(path):
        try:
            items.append(parse(row, source))
        except ValueError as e:
            bad = InvalidRow(source, *e.args)
            if not skip_invalid:
                raise DataError(f"{bad} (use --skip-invalid to skip such rows)") from None
            invalid.append(bad)
    report_skipped(invalid, len(items) + len(invalid), str(path))
    if not items:
        raise DataError(f"{path}: no valid rows" + (f" ({len(invalid)} invalid)" if invalid else " (empty)"))
    return items


def load_demonstrations(path: str | Path, skip_invalid: bool = False, require_completion: bool = True) -> list[Demonstration]:
    """Load and validate demonstrations (see :func:`load_rows`)."""
    return load_rows(path, lambda row, source: parse_row(row, source, require_completion), skip_invalid)


def report_skipped(invalid: list[InvalidRow], total: int, what: str) -> None:
    if invalid:
        shown = "; ".join(str(b) for b in invalid[:3])
        log.warning("skipped %d of %d rows of %s: %s%s", len(invalid), total, what, shown, " ..." if len(invalid) > 3 else "")


# ------------------------------------------------------------------ chat templating

# For base models without a chat template: ChatML, the most widely used one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[int]
    index: int  # position in the demonstration list
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class ChatFormat:
    """Renders chats with one tokenizer the same way for training, generation and evaluation."""

    def __init__(self, tokenizer, stop_token_ids: list[int] | None = None):
        if tokenizer.chat_template is None:
            log.warning("tokenizer has no chat template; using ChatML (saved with the model)")
            tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        stops = set(stop_token_ids or [])
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        self.stop_token_ids = sorted(stops)
        self.end_of_turn_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.stop_token_ids[0]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def completion_ids(self, messages: list[dict], completion: str) -> list[int]:
        """The tokens the model should generate after the prompt, ending with its stop token."""
        tok = self.tokenizer
        prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full_text = tok.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        text = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else completion
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i, t in enumerate(ids):  # drop template text after the end of the turn (e.g. a newline)
            if t in self.stop_token_ids:
                return ids[: i + 1]
        return ids + [self.end_of_turn_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, demos: list[Demonstration], max_prompt_length: int, max_length: int, skip_invalid: bool = False) -> list[Example]:
        """Tokenise demonstrations. Prompts over ``max_prompt_length`` are invalid rows;
        completions that do not fit in ``max_length`` are truncated and counted."""
        examples, invalid, truncated = [], [], 0
        for i, d in enumerate(demos):
            p = self.prompt_ids(d.prompt)
            problem = None
            if len(p) > max_prompt_length:
                problem = InvalidRow(d.source, "prompt", f"{len(p)} tokens > --max-prompt-length {max_prompt_length}")
            elif len(p) >= max_length:
                problem = InvalidRow(d.source, "prompt", f"{len(p)} tokens leave no room under --max-length {max_length}")
            if problem:
                if not skip_invalid:
                    raise DataError(f"{problem} (use --skip-invalid to skip such rows)")
                invalid.append(problem)
                continue
            c = self.completion_ids(d.prompt, d.completion) if d.completion is not None else []
            cut = len(p) + len(c) > max_length
            if cut:
                c = c[: max_length - len(p)]
                truncated += 1
            examples.append(Example(p, c, i, cut))
        report_skipped(invalid, len(demos), "the data")
        if truncated:
            log.warning("truncated the completion of %d of %d rows to --max-length %d", truncated, len(examples), max_length)
        if not examples:
            raise DataError("no rows left after tokenisation")
        return examples


# ------------------------------------------------------------------------- batching


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch layout ``[pad.. prompt | completion ..pad]``: prompts are left-padded so that
    every completion starts at the same column. The model then only needs logits for the
    last ``C + 1`` positions (``logits_to_keep``), and chosen/rejected pairs that share a
    prompt line up. Position ids skip the padding, so any position encoding sees the
    same sequence as without padding."""
    P = max(len(p) for p in prompts)
    C = max(max(len(c) for c in completions), 1)
    B = len(prompts)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P: P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p): P + len(c)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completion_mask = attention_mask[:, P:].bool()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_ids": input_ids[:, P:],
        "completion_mask": completion_mask,
    }


def collate_shared(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch ``k`` completions per prompt (``completions[i*k:(i+1)*k]`` answer ``prompts[i]``)
    so that each prompt is computed once: prompts left-padded ``[B, P]``, completions
    right-padded ``[B*k, C]``."""
    prompt = collate(prompts, [[]] * len(prompts), pad_id)
    P = prompt["input_ids"].shape[1] - 1  # collate leaves one completion column
    C = max(max(len(c) for c in completions), 1)
    completion_ids = torch.full((len(completions), C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), C), dtype=torch.bool)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = True
    return {
        "prompt_ids": prompt["input_ids"][:, :P],
        "prompt_mask": prompt["attention_mask"][:, :P],
        "prompt_positions": prompt["position_ids"][:, :P],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of ``range(n)``, identical on every process for a given seed."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def global_batches(n: int, batch_size: int, seed: int, epoch: int, min_size: int = 1) -> list[list[int]]:
    """Shuffled index batches of one epoch. A last batch smaller than ``min_size`` (the
    number of processes: each needs an item) is dropped."""
    order = epoch_order(n, seed, epoch)
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < min_size:
        batches.pop()
    return batches
