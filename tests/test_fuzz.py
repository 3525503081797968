"""Bad input never ends in a traceback: a corpus of malformed data files and bad option
sets through the real command line. Each ends with an exit code != 0 and one short last
line on stderr, ``sftjuice COMMAND: error: ...``, naming the file (and for a bad row its
line and field) or the option.

The corpus runs in-process (``sftjuice.cli.main(argv)``: an uncaught exception fails the
test with its traceback); a handful of cases run as real processes to show that the
process prints no traceback either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sftjuice.cli import main

from .conftest import run_cli

GOOD = {"prompt": "Sort 2, 1.", "completion": "1, 2"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Sort 3, 1."}, {"role": "assistant", "content": "1, 3"}]}
COMMANDS = ("train", "generate", "eval", "reward")
MAX_LINE = 300


def user(text="Sort 3, 1."):
    return {"role": "user", "content": text}


def assistant(text="1, 3"):
    return {"role": "assistant", "content": text}


def lines(*rows) -> bytes:
    """JSONL bytes; a str row is written as it is."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


@dataclass
class DataCase:
    id: str
    content: object  # bytes for a file, or a callable(path) that creates the --data path
    expect: tuple[str, ...]  # besides the file name, e.g. the line (":2:") and the field ("'completion'")
    name: str = "d.jsonl"
    commands: tuple[str, ...] = COMMANDS  # the commands that reject it (generate and eval take prompt-only rows)
    args: tuple[str, ...] = ()
    expect_for: dict = field(default_factory=dict)  # command -> expect, where it differs


def _dataset(rows=None, splits=None):
    def make(path: Path):
        import datasets

        if splits:
            datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(path))
        else:
            datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return make


def _directory(files: dict[str, bytes]):
    def make(path: Path):
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
    return make


PRETTY = json.dumps([GOOD, GOOD, {"prompt": "x", "completion": ""}], indent=1)
PRETTY_LINE = [n for n, line in enumerate(PRETTY.splitlines(), start=1) if line == " {"][2]  # where item 2 starts

DATA_CASES = [
    # --- not JSON
    DataCase("invalid-json-line", lines(GOOD, "{not json"), (":2:", "invalid JSON")),
    DataCase("unterminated-object", lines('{"prompt": "x", "completion": "y"'), (":1:", "invalid JSON")),
    DataCase("trailing-garbage", lines(GOOD, GOOD, '{"prompt": "x", "completion": "y"} z'), (":3:", "invalid JSON")),
    DataCase("nul-bytes", b"\x00\x00\x00\n", (":1:", "invalid JSON")),
    DataCase("deep-nesting", lines("[" * 50000 + "]" * 50000), (":1:", "nested too deeply")),
    DataCase("huge-integer", lines('{"prompt": "x", "completion": "y", "n": 1' + "0" * 5000 + "}"), (":1:", "JSON")),
    # --- not UTF-8
    DataCase("latin-1", lines(GOOD) + '{"prompt": "café", "completion": "y"}\n'.encode("latin-1"),
             (":2:", "not valid UTF-8", "byte 0xe9", "column 16")),
    DataCase("utf-16", lines(GOOD).decode().encode("utf-16"), (":1:", "not valid UTF-8", "byte 0xff")),
    DataCase("cut-utf8-sequence", lines(GOOD, GOOD) + b'{"prompt": "\xe2\x82", "completion": "y"}\n',
             (":3:", "not valid UTF-8", "byte 0xe2")),
    DataCase("lone-surrogate", lines('{"prompt": "x\\ud800", "completion": "y"}'), (":1:", "'prompt'", "lone surrogate")),
    # --- wrong types, missing or empty fields
    DataCase("completion-int", lines({"prompt": "x", "completion": 3}), (":1:", "'completion'", "got int")),
    DataCase("completion-null", lines(GOOD, {"prompt": "x", "completion": None}), (":2:", "'completion'")),
    DataCase("completion-empty", lines(GOOD, {"prompt": "x", "completion": ""}), (":2:", "'completion'", "empty completion")),
    DataCase("completion-whitespace", lines({"prompt": "x", "completion": " \n\t"}), (":1:", "'completion'", "empty")),
    DataCase("completion-user-message", lines({"prompt": "x", "completion": [user()]}), (":1:", "'completion'")),
    DataCase("completion-and-response", lines({"prompt": "x", "completion": "a", "response": "b"}), (":1:", "'<row>'", "both")),
    DataCase("duplicate-key", lines('{"prompt": "x", "completion": "a", "completion": "b"}'), (":1:", "'completion'", "twice")),
    DataCase("missing-completion", lines(GOOD, {"prompt": "x"}), (":2:", "'completion'", "missing"),
             commands=("train", "reward", "eval"), expect_for={"eval": (":2:", "'answer'")}),
    DataCase("prompt-int", lines({"prompt": 5, "completion": "y"}), (":1:", "'prompt'")),
    DataCase("prompt-empty", lines({"prompt": "  ", "completion": "y"}), (":1:", "'prompt'", "empty")),
    DataCase("prompt-empty-list", lines({"prompt": [], "completion": "y"}), (":1:", "'prompt'")),
    DataCase("prompt-ends-with-assistant", lines({"prompt": [user(), assistant()], "completion": "y"}),
             (":1:", "'prompt[1].role'", "assistant turn")),
    DataCase("prompt-without-user-turn", lines({"prompt": [{"role": "system", "content": "Be brief."}], "completion": "y"}),
             (":1:", "'prompt'", "no user turn")),
    DataCase("no-prompt-field", lines(GOOD, {"text": "x"}), (":2:", "'<row>'", "'prompt' field")),
    DataCase("row-is-list", lines([1, 2]), (":1:", "'<row>'", "JSON object")),
    DataCase("row-is-string", lines('"hello"'), (":1:", "'<row>'")),
    DataCase("row-is-null", lines(GOOD, "null"), (":2:", "'<row>'")),
    # --- chat messages
    DataCase("messages-string", lines({"messages": "hi"}), (":1:", "'messages'")),
    DataCase("messages-empty", lines(GOOD_CHAT, {"messages": []}), (":2:", "'messages'", "non-empty")),
    DataCase("message-not-object", lines({"messages": ["hi", assistant()]}), (":1:", "'messages[0]'")),
    DataCase("role-unknown", lines({"messages": [user(), {"role": "robot", "content": "x"}, assistant()]}),
             (":1:", "'messages[1].role'", "'robot' is not one of system, user, assistant, tool")),
    DataCase("role-missing", lines({"messages": [{"content": "x"}, assistant()]}), (":1:", "'messages[0]'", "role")),
    DataCase("role-int", lines({"messages": [{"role": 1, "content": "x"}, assistant()]}), (":1:", "'messages[0]'")),
    DataCase("content-int", lines({"messages": [user(), {"role": "assistant", "content": 7}]}), (":1:", "'messages[1]'")),
    DataCase("content-null", lines({"messages": [{"role": "user", "content": None}, assistant()]}), (":1:", "'messages[0]'")),
    DataCase("messages-without-user-turn", lines({"messages": [{"role": "system", "content": "Be brief."}, assistant()]}),
             (":1:", "'messages'", "no user turn")),
    DataCase("messages-only-assistant", lines({"messages": [assistant()]}), (":1:", "'messages'", "no prompt")),
    DataCase("messages-end-with-user", lines(GOOD_CHAT, {"messages": [user()]}), (":2:", "'messages'", "last message"),
             commands=("train", "reward", "eval"), expect_for={"eval": (":2:", "'answer'")}),
    DataCase("messages-and-prompt", lines({**GOOD_CHAT, "prompt": "x"}), (":1:", "'<row>'", "both")),
    # --- JSON files
    DataCase("json-list-of-numbers", b"[1, 2, 3]", (":1: item 0", "'<row>'"), name="d.json"),
    DataCase("json-bad-item-line", PRETTY.encode(), (f":{PRETTY_LINE}: item 2", "'completion'"), name="d.json"),
    DataCase("json-dict", json.dumps({"rows": [GOOD]}).encode(), ("expected a JSON list of rows, got an object",), name="d.json"),
    DataCase("json-string", b'"hello"', ("expected a JSON list",), name="d.json"),
    DataCase("json-invalid", b'[{"prompt": "x",\n', (":2:", "invalid JSON"), name="d.json"),
    DataCase("json-empty-list", b"[]", ("no valid rows",), name="d.json"),
    # --- empty files and encodings
    DataCase("empty-file", b"", ("no valid rows", "empty file")),
    DataCase("whitespace-only", b" \n\t\n   \n", ("no valid rows", "whitespace")),
    DataCase("bom-then-bad-row", b"\xef\xbb\xbf" + lines(GOOD, {"prompt": "x", "completion": ""}), (":2:", "'completion'")),
    DataCase("crlf-then-bad-row", lines(GOOD).replace(b"\n", b"\r\n") + b'{"prompt": 1}\r\n', (":2:", "'prompt'")),
    DataCase("all-invalid-skipped", lines({"prompt": "x", "completion": ""}, {"prompt": "y", "completion": " "}),
             ("no valid rows (2 invalid)",), args=("--skip-invalid",)),
    # --- directories and paths
    DataCase("directory-not-a-dataset", _directory({"a.txt": b"hello"}), ("not one written by datasets.save_to_disk",), name="dir"),
    DataCase("empty-directory", _directory({}), ("not one written by datasets.save_to_disk",), name="dir"),
    DataCase("dataset-corrupt", _directory({"state.json": b"{oops", "dataset_info.json": b"{}"}), ("cannot load the saved dataset",),
             name="dir"),
    DataCase("dataset-without-train-split", _dataset(splits={"test": [GOOD]}), ("expected a 'train' split",), name="ds"),
    DataCase("dataset-bad-row", _dataset([GOOD, {"prompt": "x", "completion": ""}]), (":row 1:", "'completion'"), name="ds"),
    DataCase("nonexistent", None, ("file not found",), name="missing.jsonl"),
    DataCase("parent-is-a-file", lambda p: p.parent.write_text("x"), ("file not found",), name="f/d.jsonl"),
    # --- too long for the options
    DataCase("prompt-too-long", lines(GOOD), (":1:", "'prompt'", "--max-prompt-length 8"),
             commands=("train", "generate", "reward"), args=("--max-prompt-length", "8")),
]
DATA_RUNS = [(c, cmd) for c in DATA_CASES for cmd in c.commands]
assert len(DATA_CASES) >= 30 and len({c.id for c in DATA_CASES}) == len(DATA_CASES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Every case's --data path, written once."""
    root = tmp_path_factory.mktemp("fuzz")
    paths = {}
    for case in DATA_CASES:
        (root / case.id).mkdir()
        path = root / case.id / case.name
        if isinstance(case.content, bytes):
            path.write_bytes(case.content)
        elif case.content is not None:
            case.content(path)
        paths[case.id] = path
    return paths


def command_argv(command: str, model, data, out: Path) -> list:
    return {
        "train": ["train", "--method", "sft", "--model", model, "--data", data, "--output", out],
        "generate": ["generate", "--model", model, "--data", data, "--output", out / "samples.jsonl"],
        "eval": ["eval", "--model", model, "--data", data, "--judge", "verifier", "--output", out],
        "reward": ["reward", "score", "--reward-model", model, "--data", data, "--output", out / "scored.jsonl"],
    }[command]


def run_in_process(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, stderr: str, *expected: str) -> str:
    assert code not in (0, None), f"exit code {code}; stderr:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("sftjuice "), last
    assert len(last) < MAX_LINE, f"{len(last)} characters: {last}"
    for text in expected:
        assert text in last, f"{text!r} not in {last!r}"
    return last


@pytest.mark.parametrize("case, command", DATA_RUNS, ids=[f"{cmd}-{c.id}" for c, cmd in DATA_RUNS])
def test_bad_data_is_one_line(case, command, corpus, tiny_model_dir, tmp_path, capsys):
    data = corpus[case.id]
    argv = command_argv(command, tiny_model_dir, data, tmp_path / "out") + list(case.args)
    code, err = run_in_process(capsys, argv)
    name = data.name if case.content is not None else str(data)
    assert_one_line_error(code, err, f"sftjuice {command}", name, *case.expect_for.get(command, case.expect))


SUBPROCESS_RUNS = [("train", "latin-1"), ("generate", "role-unknown"), ("eval", "json-dict"),
                   ("reward", "dataset-without-train-split")]


@pytest.mark.parametrize("command, case_id", SUBPROCESS_RUNS, ids=[f"{a}-{b}" for a, b in SUBPROCESS_RUNS])
def test_bad_data_in_a_real_process(command, case_id, corpus, tiny_model_dir, tmp_path):
    case = next(c for c in DATA_CASES if c.id == case_id)
    proc = run_cli(*command_argv(command, tiny_model_dir, corpus[case_id], tmp_path / "out"), check=False)
    assert_one_line_error(proc.returncode, proc.stderr, corpus[case_id].name, *case.expect_for.get(command, case.expect))


# ------------------------------------------------------------------ no permission


def _unprivileged_launcher() -> list[str]:
    """Run the CLI as a user the file permissions apply to (root reads anything)."""
    python = [sys.executable, "-m", "sftjuice.cli"]
    if os.geteuid() != 0:
        return python
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and no setpriv to drop privileges: permissions would not apply")
    launcher = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"] + python
    probe = subprocess.run(launcher[:-2] + ["-c", "import sftjuice.cli"], capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"cannot run sftjuice as user 'nobody': {probe.stderr.strip().splitlines()[-1:]}")
    return launcher


@pytest.mark.parametrize("kind", ["file", "directory", "parent"])
def test_no_permission_is_one_line(kind, tiny_model_dir):
    launcher = _unprivileged_launcher()
    root = Path(tempfile.mkdtemp(prefix="sftjuice-perm-"))  # outside pytest's private (0700) tree
    try:
        root.chmod(0o755)
        model = root / "model"
        shutil.copytree(tiny_model_dir, model)
        for p in [model, *model.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "sub").mkdir(mode=0o755)
        (root / "home").mkdir()
        (root / "home").chmod(0o777)  # for the libraries' caches
        if kind == "file":
            data = root / "sub" / "d.jsonl"
            data.write_bytes(lines(GOOD))
            data.chmod(0)
        elif kind == "directory":  # a `datasets` directory that cannot be listed
            data = root / "sub" / "ds"
            _dataset([GOOD])(data)
            data.chmod(0)
        else:  # a parent directory that cannot be entered
            data = root / "sub" / "d.jsonl"
            data.write_bytes(lines(GOOD))
            (root / "sub").chmod(0)
        proc = run_cli("train", "--method", "sft", "--model", model, "--data", data, "--output", root / "out",
                       check=False, launcher=launcher, env={"HOME": str(root / "home")})
        assert_one_line_error(proc.returncode, proc.stderr, str(data), "Permission denied")
    finally:
        for p in (root / "sub", root / "sub" / "ds", root / "sub" / "d.jsonl"):
            if p.exists() or p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------- bad options


@dataclass
class OptionCase:
    id: str
    argv: object  # callable(ctx) -> argv
    expect: tuple[str, ...]


@dataclass
class Ctx:
    model: Path
    data: Path
    tmp: Path

    def train(self, *extra, data=True, output=True):
        return (["train", "--model", self.model] + (["--data", self.data] if data else [])
                + (["--output", self.tmp / "out"] if output else []) + list(extra))

    def generate(self, *extra, output=True):
        return (["generate", "--model", self.model, "--data", self.data]
                + (["--output", self.tmp / "s.jsonl"] if output else []) + list(extra))

    def eval(self, *extra, data=True):
        return ["eval", "--model", self.model] + (["--data", self.data] if data else []) + ["--output", self.tmp / "e"] + list(extra)

    def reward(self, *extra, model=True):
        return (["reward", "score"] + (["--reward-model", self.model] if model else [])
                + ["--data", self.data, "--output", self.tmp / "r.jsonl"] + list(extra))

    def config(self, text: str) -> Path:
        path = self.tmp / "c.yaml"
        path.write_text(text)
        return path


OPTION_CASES = [
    OptionCase("train-unknown-option", lambda c: c.train("--method", "sft", "--no-such-option", "1"), ("--no-such-option",)),
    OptionCase("train-epochs-abc", lambda c: c.train("--epochs", "abc"), ("--epochs", "abc")),
    OptionCase("train-method-nope", lambda c: c.train("--method", "nope"), ("nope",)),
    OptionCase("train-lr-not-a-number", lambda c: c.train("--learning-rate", "fast"), ("--learning-rate",)),
    OptionCase("train-seed-float", lambda c: c.train("--seed", "1.5"), ("--seed",)),
    OptionCase("train-lr-scheduler-bogus", lambda c: c.train("--lr-scheduler", "bogus"), ("--lr-scheduler",)),
    OptionCase("train-batch-size-zero", lambda c: c.train("--per-device-batch-size", "0"), ("--per-device-batch-size",)),
    OptionCase("train-missing-data", lambda c: c.train(data=False), ("--data",)),
    OptionCase("train-missing-output", lambda c: c.train(output=False), ("--output",)),
    OptionCase("train-model-not-found", lambda c: c.train("--model", str(c.tmp / "no-model")), ("no-model",)),
    OptionCase("train-config-missing", lambda c: c.train("--config", str(c.tmp / "missing.yaml")), ("missing.yaml",)),
    OptionCase("train-config-unknown-key", lambda c: c.train("--config", c.config("bogusoption: 0.1\n")), ("c.yaml", "bogusoption")),
    OptionCase("train-config-list", lambda c: c.train("--config", c.config("- 1\n- 2\n")), ("c.yaml",)),
    OptionCase("train-config-not-yaml", lambda c: c.train("--config", c.config("a: [1, 2\nb: 3\n")), ("c.yaml", "YAML")),
    OptionCase("generate-temperature-abc", lambda c: c.generate("--temperature", "abc"), ("--temperature",)),
    OptionCase("generate-unknown-option", lambda c: c.generate("--bogus"), ("--bogus",)),
    OptionCase("generate-missing-output", lambda c: c.generate(output=False), ("--output",)),
    OptionCase("generate-unknown-model", lambda c: c.generate("--model", "no-such-model"), ("no-such-model",)),
    OptionCase("eval-judge-nonexistent-dir", lambda c: c.eval("--judge", str(c.tmp / "nonexistent-dir")), ("--judge", "nonexistent-dir")),
    OptionCase("eval-missing-data", lambda c: c.eval(data=False), ("--data",)),
    OptionCase("eval-samples-with-greedy", lambda c: c.eval("--num-samples", "2", "--temperature", "0"), ("--num-samples",)),
    OptionCase("eval-batch-size-abc", lambda c: c.eval("--batch-size", "many"), ("--batch-size",)),
    OptionCase("reward-without-score", lambda c: ["reward", "--data", c.data], ("reward score",)),
    OptionCase("reward-missing-reward-model", lambda c: c.reward(model=False), ("--reward-model",)),
    OptionCase("reward-model-not-found", lambda c: c.reward("--reward-model", str(c.tmp / "no-rm")), ("no-rm",)),
    OptionCase("reward-batch-size-abc", lambda c: c.reward("--batch-size", "x"), ("--batch-size",)),
    # output paths the operating system refuses (one line naming the path, exit code 1)
    OptionCase("train-output-under-a-file", lambda c: c.train("--output", str(c.data / "out")), ("good.jsonl", "Not a directory")),
    OptionCase("generate-output-under-a-file", lambda c: c.generate("--output", str(c.data / "s.jsonl")), ("good.jsonl",)),
    OptionCase("eval-output-is-a-file", lambda c: c.eval("--output", str(c.data)), ("good.jsonl",)),
    OptionCase("reward-output-is-a-directory", lambda c: c.reward("--output", str(c.tmp)), ("Is a directory",)),
    # range checks being added
    OptionCase("train-beta-negative", lambda c: c.train("--method", "irft", "--beta", "-1"), ("--beta",)),
    OptionCase("train-learning-rate-zero", lambda c: c.train("--learning-rate", "0"), ("--learning-rate",)),
    OptionCase("train-sft-with-beta", lambda c: c.train("--method", "sft", "--beta", "0.5"), ("--beta",)),
    # renamed options (issue 24): the old name points to the new one
    OptionCase("train-rso-old-gamma", lambda c: c.train("--method", "rso", "--gamma", "0.1"), ("--gamma was renamed", "--beta")),
    OptionCase("train-rft-old-beta", lambda c: c.train("--method", "rft", "--beta", "0.05"), ("--beta was renamed", "--kl-coef")),
    OptionCase("generate-top-p-over-1", lambda c: c.generate("--top-p", "1.5"), ("--top-p",)),
    OptionCase("generate-temperature-negative", lambda c: c.generate("--temperature", "-0.5"), ("--temperature",)),
    OptionCase("generate-max-new-tokens-zero", lambda c: c.generate("--max-new-tokens", "0"), ("--max-new-tokens",)),
    OptionCase("generate-num-samples-zero", lambda c: c.generate("--num-samples", "0"), ("--num-samples",)),
    # reliability options
    OptionCase("train-max-bad-steps-zero", lambda c: c.train("--max-bad-steps", "0"), ("--max-bad-steps 0", "must be >= 1")),
    OptionCase("train-max-bad-steps-float", lambda c: c.train("--max-bad-steps", "2.5"), ("--max-bad-steps", "expected int")),
    OptionCase("train-max-bad-steps-yaml", lambda c: c.train("--config", c.config("max_bad_steps: -1\n")), ("--max-bad-steps -1",)),
    OptionCase("train-steps-sft-weight-negative", lambda c: c.train("--method", "steps", "--sft-weight", "-1"),
               ("--sft-weight -1.0", "must be >= 0")),
    OptionCase("train-srppo-temperature", lambda c: c.train("--method", "srppo", "--temperature", "0.7"),
               ("--temperature 0.7", "--method srppo")),
    OptionCase("train-rft-top-p", lambda c: c.train("--method", "rft", "--top-p", "0.9"), ("--top-p 0.9", "--method rft")),
]
assert len(OPTION_CASES) >= 15


@pytest.fixture
def ctx(tiny_model_dir, tmp_path) -> Ctx:
    data = tmp_path / "good.jsonl"
    data.write_bytes(lines(GOOD, GOOD_CHAT))
    return Ctx(tiny_model_dir, data, tmp_path)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in OPTION_CASES])
def test_bad_options_are_one_line(case, ctx, capsys):
    argv = case.argv(ctx)
    code, err = run_in_process(capsys, argv)
    assert_one_line_error(code, err, f"sftjuice {argv[0]}", *case.expect)


def test_bad_option_in_a_real_process(ctx):
    proc = run_cli(*ctx.train("--epochs", "abc"), check=False)
    assert_one_line_error(proc.returncode, proc.stderr, "--epochs")


# ------------------------------------------------------------------------ coverage


def test_the_corpus_reaches_every_command(tmp_path):
    """What the corpus covers, checked whichever cases run and in whatever order: every command
    meets bad data and bad options, each case has a unique id (the ids are the report) and the
    real-process runs are cases their command rejects."""
    ctx = Ctx(tmp_path / "model", tmp_path / "good.jsonl", tmp_path)
    assert len({c.id for c in OPTION_CASES}) == len(OPTION_CASES)
    assert all(c.commands and set(c.commands) <= set(COMMANDS) for c in DATA_CASES)
    option_commands = {c.argv(ctx)[0] for c in OPTION_CASES}
    for command in COMMANDS:
        assert sum(cmd == command for _, cmd in DATA_RUNS) >= 30, command
        assert command in option_commands, command
    for command, case_id in SUBPROCESS_RUNS:
        assert command in next(c for c in DATA_CASES if c.id == case_id).commands, (command, case_id)
