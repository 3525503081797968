"""The README and docs/ cannot rot silently: the README stays short, every relative link
resolves, and every command a page shows parses with sftjuice's own parser (nothing trains).

Which commands are run rather than only parsed is listed in docs/development.md,
"How the docs stay true"."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest

from sftjuice.config import (METHOD_CONFIGS, EvalConfig, GenerateConfig, RewardScoreConfig, SftjuiceError, TrainConfig,
                             flag, parse_args)

from .conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 10 * 1024  # "at most about 10 KB" (issue 24)
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _name(path) -> str:
    return str(path.relative_to(REPO))


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a link there is code, not a link)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def _anchors(path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", _prose(path.read_text()), re.M)}


def _command_lines(text: str) -> list[str]:
    """Every line of a code block (fenced, not python; or indented by 4 spaces), with
    backslash continuations joined."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang.strip() != "python":
            lines += body.splitlines()
    lines += [line for line in _prose(text).splitlines() if line.startswith("    ")]
    joined, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append((buf + line).strip())
        buf = ""
    return joined


def _sftjuice_argv(line: str) -> list[str] | None:
    """The arguments after ``sftjuice`` (or ``-m sftjuice.cli``, or ``make demo ARGS="..."``)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, tok in enumerate(tokens):
        launched = i == 0 or tokens[0].rsplit("/", 1)[-1] == "time"  # sftjuice ..., /usr/bin/time -f %M sftjuice ...
        if (launched and tok.rsplit("/", 1)[-1] == "sftjuice") or (tok == "sftjuice.cli" and tokens[i - 1] == "-m"):
            return tokens[i + 1:]
    if tokens[:2] == ["make", "demo"]:
        args = [t.split("=", 1)[1] for t in tokens[2:] if t.startswith("ARGS=")]
        return ["demo", *shlex.split(args[0] if args else "")]
    return None


def _docs_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            argv = _sftjuice_argv(line)
            if argv is not None:
                out.append((_name(page), line, argv))
    return out


def _parse(argv: list[str]):
    """Parse a command's arguments as ``sftjuice`` would, without running it."""
    if argv and argv[0] == "--quiet":
        argv = argv[1:]
    command, rest = argv[0], argv[1:]
    if command == "train":
        return parse_args(TrainConfig, rest, prog="sftjuice train")
    if command == "generate":
        return parse_args(GenerateConfig, rest, prog="sftjuice generate")
    if command == "eval":
        return parse_args(EvalConfig, rest, prog="sftjuice eval")
    if command == "reward":
        assert rest[:1] == ["score"], "sftjuice reward takes only 'score'"
        return parse_args(RewardScoreConfig, rest[1:], prog="sftjuice reward score")
    if command == "demo":
        from sftjuice.demo import DemoConfig

        return parse_args(DemoConfig, rest, prog="sftjuice demo")
    raise AssertionError(f"unknown command {command!r}")


# ------------------------------------------------------------------------ the README


def test_the_readme_is_short():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move reference text to docs/ (limit {README_LIMIT})"


def test_the_readme_starts_with_the_two_commands():
    first = re.search(r"(?:^    .+\n)+", _prose(README.read_text()), re.M).group(0)  # the first code block
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make demo", "make test"]


def test_the_readme_links_every_docs_page():
    linked = {m for m in LINK.findall(_prose(README.read_text()))}
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


# ------------------------------------------------------------------------ links


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{_name(page)}: link to {target} (no such file)"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_name(page)}: link to {target} (no such heading)"


# ------------------------------------------------------------------------ commands


def test_the_docs_show_commands():
    """The checks below must have something to check: a page losing its commands is a change to notice."""
    commands = _docs_commands()
    pages = {page for page, _, _ in commands}
    assert len(commands) >= 25 and {"docs/methods.md", "docs/evaluation.md", "docs/processes.md"} <= pages


@pytest.mark.parametrize("page, line, argv", _docs_commands(), ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None)
def test_every_sftjuice_command_in_the_docs_parses(page, line, argv):
    try:
        cfg = _parse(argv)
    except SftjuiceError as e:
        pytest.fail(f"{page}: `{line}`: {e}")
    except SystemExit:
        pytest.fail(f"{page}: `{line}`: argparse rejected it")
    if argv[0] == "train":
        method = argv[argv.index("--method") + 1] if "--method" in argv else "sft"
        assert cfg.method == method


def test_every_benchmark_flag_in_the_docs_exists():
    shown = 0
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            m = re.search(r"benchmarks/(\w+)\.py((?: [^#]*)?)", line)
            if not m:
                continue
            source = (REPO / "benchmarks" / f"{m.group(1)}.py").read_text()
            for name in re.findall(r"(--[a-z][a-z0-9-]*)", m.group(2)):
                shown += 1
                assert f'"{name}"' in source, f"{_name(page)}: `{line}`: benchmarks/{m.group(1)}.py has no {name}"
    assert shown


# ------------------------------------------------------------------------ options


def test_the_methods_page_names_every_option_of_every_method():
    text = (REPO / "docs" / "methods.md").read_text()
    missing = sorted({f"{method}: {flag(f.name)}" for method, cls in METHOD_CONFIGS.items()
                      for f in dataclasses.fields(cls) if f.name != "method" and f"`{flag(f.name)}`" not in text})
    assert not missing, f"docs/methods.md does not document: {', '.join(missing)}"
