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
import os
import random
import re
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

ROLES = ("system", "user", "assistant", "tool")


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple]) -> dict:
    """json object hook: a key given twice would silently lose its first value."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(key, "given twice in one object")
    return row


def _parse_json(line: str, where: str):
    """One JSONL line -> (value, problem): a duplicate key is a problem of the row
    (``(field, reason)``); anything else that is not readable JSON is a DataError at ``where``."""
    try:
        return json.loads(line, object_pairs_hook=_no_duplicates), None
    except _DuplicateKey as e:
        return None, e.args
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: unreadable JSON: {str(e).split(';')[0]}") from None


def _bad_unicode(value, name: str):
    """(field, reason) for the first string holding a lone surrogate (JSON's ``\ud800``
    escape): it cannot be tokenised or written as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return name or "<row>", f"not valid Unicode (lone surrogate \\u{ord(value[e.start]):04x} at character {e.start + 1})"
    elif isinstance(value, dict):
        for k, v in value.items():
            bad = _bad_unicode(k, name) or _bad_unicode(v, f"{name}.{k}" if name else str(k))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = _bad_unicode(v, f"{name}[{i}]")
            if bad:
                return bad
    return None


def _read_rows(path: Path):
    """Yield (location, row, problem) for a JSONL / JSON file or a `datasets` directory;
    ``problem`` is None or the (field, reason) of a row that is unusable as it stands.
    Every problem with the file itself is a DataError of one line naming the file (and
    the line)."""
    try:
        is_dir = path.is_dir()
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{path}: file not found") from None
    except OSError as e:  # e.g. no permission to look into a parent directory
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if is_dir:
        for source, row in _dataset_rows(path):
            yield source, row, None
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    text = _decode(data, path)
    if not text.strip():
        raise DataError(f"{path}: no valid rows ({'empty file' if not data else 'the file holds only whitespace'})")
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        yield from _json_items(text, path)
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row, problem = _parse_json(line, f"{path}:{lineno}")
        if problem is None and "\\u" in line:
            problem = _check_unicode(row)
        yield f"{path}:{lineno}", row, problem


def _check_unicode(row):
    try:
        return _bad_unicode(row, "")
    except RecursionError:
        return "<row>", "nested too deeply"


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 (a byte-order mark at the start is accepted); the first bad byte is reported
    with its line and column."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, e.start) + 1
        column = len(data[line_start: e.start].decode("utf-8")) + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


def _json_items(text: str, path: Path):
    """The rows of a JSON list, each located by the line it starts on and its index."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{path}: unreadable JSON: {str(e).split(';')[0]}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {_kind(rows)}")
    escapes = "\\u" in text
    decoder, pos, lineno, counted = json.JSONDecoder(object_pairs_hook=_no_duplicates), text.index("[") + 1, 1, 0
    blank = re.compile(r"[ \t\n\r]*")
    for i, row in enumerate(rows):
        pos = blank.match(text, pos).end()
        lineno += text.count("\n", counted, pos)
        counted = pos
        source = f"{path}:{lineno}: item {i}"
        try:  # again, item by item: its position, and keys given twice
            _, pos = decoder.raw_decode(text, pos)
        except _DuplicateKey as e:
            yield source, row, e.args
            pos = json.JSONDecoder().raw_decode(text, pos)[1]
        else:
            yield source, row, _check_unicode(row) if escapes else None
        pos = blank.match(text, pos).end() + 1  # past the comma


def _dataset_rows(path: Path):
    try:
        names = set(os.listdir(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read directory: {e.strerror or e}") from None
    if not names & {"dataset_dict.json", "state.json"}:
        raise DataError(f"{path}: a directory, but not one written by datasets.save_to_disk "
                        "(no dataset_dict.json or state.json)")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable saved dataset"
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {reason})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)}, expected a 'train' split")
        if len(ds) > 1:
            log.info("%s: reading the 'train' split (also has %s)", path, ", ".join(s for s in ds if s != "train"))
        ds = ds["train"]
    for i, row in enumerate(ds):
        # Arrow stores a field that some rows lack as null in those rows
        yield f"{path}:row {i}", {k: v for k, v in row.items() if v is not None}


def check_messages(value, name: str) -> list[dict]:
    """A non-empty list of ``{"role": one of ROLES, "content": str}`` messages."""
    if not isinstance(value, list) or not value:
        raise ValueError(name, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = (f"got {_kind(m)}" if not isinstance(m, dict) else
                   "missing 'role'" if "role" not in m else "missing 'content'" if "content" not in m else
                   f"'role' is {_kind(m['role'])}" if not isinstance(m["role"], str) else
                   f"'content' is {_kind(m['content'])}")
            raise ValueError(f"{name}[{i}]", f"expected {{\"role\": str, \"content\": str}}, {got}")
        if m["role"] not in ROLES:
            raise ValueError(f"{name}[{i}].role", f"{_short(m['role'])} is not one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_prompt(msgs: list[dict], name: str) -> list[dict]:
    """A prompt is a chat the model answers next: it has a user turn and does not end with
    an assistant turn."""
    if not any(m["role"] == "user" for m in msgs):
        raise ValueError(name, "no user turn")
    if msgs[-1]["role"] == "assistant":
        raise ValueError(f"{name}[{len(msgs) - 1}].role", "the prompt ends with an assistant turn "
                         "(put the demonstration in 'completion')")
    return msgs


def text_of(value, name: str) -> str:
    """A completion given as a string or as a list with one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = check_messages(value, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise ValueError(name, "expected a string or one assistant message")
        return msgs[0]["content"]
    raise ValueError(name, f"expected a string, got {'null' if value is None else type(value).__name__}")


def parse_row(row, source: str, require_completion: bool = True) -> Demonstration:
    """Validate one row; raises ValueError(field, reason) when it is bad."""
    if not isinstance(row, dict):
        raise ValueError("<row>", f"expected a JSON object, got {'null' if row is None else type(row).__name__}")
    if "messages" in row:
        clash = [k for k in ("prompt", "completion", "response") if k in row]
        if clash:
            raise ValueError("<row>", f"has both 'messages' and '{clash[0]}': use one format")
        msgs = check_messages(row["messages"], "messages")
        if msgs[-1]["role"] == "assistant":
            prompt, completion = msgs[:-1], msgs[-1]["content"]
            if not prompt:
                raise ValueError("messages", "no prompt before the final assistant turn")
        elif require_completion:
            raise ValueError("messages", f"last message has role '{msgs[-1]['role']}', expected 'assistant'")
        else:
            prompt, completion = msgs, None
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError("messages", "no user turn")
        extra = {k: v for k, v in row.items() if k != "messages"}
    elif "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise ValueError("prompt", "empty")
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = check_prompt(check_messages(p, "prompt"), "prompt")
        if "completion" in row and "response" in row:
            raise ValueError("<row>", "has both 'completion' and 'response': use one")
        key = "completion" if "completion" in row else "response" if "response" in row else None
        if key is None:
            if require_completion:
                raise ValueError("completion", "missing (expected 'completion' or 'response')")
            completion = None
        else:
            completion = text_of(row[key], key)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "response")}
    else:
        raise ValueError("<row>", "expected a 'messages' field or a 'prompt' field")
    if completion is not None and not completion.strip():
        raise ValueError("completion" if "messages" not in row else "messages", "empty completion")
    return Demonstration(prompt=prompt, completion=completion, source=source, extra=extra)


def load_rows(path, parse, skip_invalid: bool = False) -> list:
    """``parse(row, source)`` over the rows of a file (or of an in-memory ``datasets.Dataset``
    or list of dicts). A bad row (``parse`` raises ``ValueError(field, reason)``) raises
    DataError naming file, line and field, unless ``skip_invalid``: then bad rows are
    skipped, counted and reported."""
    if isinstance(path, (str, Path)):
        path, rows = Path(path), _read_rows(Path(path))
    else:
        rows = ((f"<data>:row {i}", row, None) for i, row in enumerate(path))
        path = "<data>"
    items, invalid = [], []
    for source, row, problem in rows:
        try:
            if problem is not None:
                raise ValueError(*problem)
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


def load_demonstrations(path, skip_invalid: bool = False, require_completion: bool = True) -> list[Demonstration]:
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

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def _read_template(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--chat-template {path}: {getattr(e, 'strerror', None) or e}") from None


class ChatFormat:
    """Renders chats with one tokenizer the same way for training, generation and evaluation."""

    def __init__(self, tokenizer, stop_token_ids: list[int] | None = None, template: str | None = None):
        """``template``: 'chatml' or a Jinja file, for a tokenizer that has no chat template
        (it is then saved with the trained model); a tokenizer without one needs it."""
        if template is not None:
            tokenizer.chat_template = CHATML_TEMPLATE if template == "chatml" else _read_template(template)
        if tokenizer.chat_template is None:
            raise DataError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; choose one with "
                            "--chat-template chatml (or a Jinja file): it is saved with the trained model")
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

    def completion_ids(self, messages: list[dict], completion: str, finished: bool = True) -> list[int]:
        """The tokens the model should generate after the prompt, ending with its stop token;
        a response cut at the length limit (``finished`` False) has none."""
        ids = self._turn_ids(messages, completion)
        return ids if finished else [t for t in ids if t not in self.stop_token_ids]

    def _turn_ids(self, messages: list[dict], completion: str) -> list[int]:
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
            if len(p) + len(c) > max_length:
                c = c[: max_length - len(p)]
                truncated += 1
            examples.append(Example(p, c, i))
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
    return {
        "prompt_ids": prompt["input_ids"][:, :P],
        "prompt_mask": prompt["attention_mask"][:, :P],
        "prompt_positions": prompt["position_ids"][:, :P],
        **right_padded(completions, pad_id),
    }


def right_padded(completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``completion_ids`` ``[B, C]`` (right-padded) and its ``completion_mask``."""
    C = max(max(len(c) for c in completions), 1)
    completion_ids = torch.full((len(completions), C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), C), dtype=torch.bool)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = True
    return {"completion_ids": completion_ids, "completion_mask": completion_mask}


def collate_packed(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """The same work as :func:`collate_shared` (``k`` completions per prompt; ``k = 1`` is
    :func:`collate`'s) in one row with no padding: each prompt once, then its completions.

    A block mask lets each completion attend to its prompt and to its own earlier tokens only,
    and its positions continue from its prompt's end, so every completion sees what it sees
    alone. ``logit_rows`` are the row's positions whose logits predict the completion tokens,
    in the order of ``completion_ids[completion_mask]`` (``[B*k, C]``, right-padded as in
    :func:`collate_shared`, so the losses read both layouts alike). Every matmul of the pass
    then sees all the micro-batch's real tokens as rows, and none of its padding."""
    k = len(completions) // len(prompts)
    ids: list[int] = []
    positions: list[int] = []
    group: list[int] = []  # the prompt each token belongs to
    owner: list[int] = []  # the completion each token belongs to (-1: the prompt, seen by all of its completions)
    logit_rows: list[int] = []
    for i, p in enumerate(prompts):
        ids += p
        positions += range(len(p))
        group += [i] * len(p)
        owner += [-1] * len(p)
        prompt_end = len(ids) - 1  # its logits predict each completion's first token
        for j in range(i * k, (i + 1) * k):
            c = completions[j]
            if c:
                logit_rows += [prompt_end, *range(len(ids), len(ids) + len(c) - 1)]
            ids += c
            positions += range(len(p), len(p) + len(c))
            group += [i] * len(c)
            owner += [j] * len(c)
    group_t, owner_t = torch.tensor(group), torch.tensor(owner)
    T = len(ids)
    sees = ((group_t[:, None] == group_t[None, :])
            & ((owner_t[None, :] == -1) | (owner_t[None, :] == owner_t[:, None]))
            & torch.ones(T, T, dtype=torch.bool).tril())
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": sees[None, None],
        "logit_rows": torch.tensor(logit_rows, dtype=torch.long),
        **right_padded(completions, pad_id),
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
