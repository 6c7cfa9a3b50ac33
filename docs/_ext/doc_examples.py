"""The executed examples of the docs: one implementation for the site build and the tests.

A page of docs/ may hold three kinds of live code block, and none may go stale:

* a ```python block runs in a fresh namespace; the ```output block that follows it (before the
  next python block) must equal what it printed, trailing spaces ignored;
* a ```jsonl block is a kvmspec trace: it must replay on the reference with every "expect"
  matched;
* a ```json block must parse.

The site extension (kvmspec_docs.py) runs :func:`check_page` on every page it reads and turns
each :class:`Problem` into a build error at FILE:LINE; tests/test_docs.py runs the same
functions, one test per block. Blocks are found with markdown-it, the parser MyST is built on,
so a fence inside a list item or a directive (an admonition) is found where the site shows it.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

from kvmspec.fuzz.targets import make_target
from kvmspec.fuzz.trace import TraceError, parse_lines
from kvmspec.spec.platforms import PROFILES

LIVE_LANGUAGES = frozenset({"python", "output", "jsonl", "json"})


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file; ``line`` is the line of its opening fence
    (1-based), so the block's first line of code is ``line + 1``."""

    path: Path
    line: int
    language: str
    text: str

    def where(self, root: Path) -> str:
        return f"{_shown(self.path, root)}:{self.line}"


@dataclass(frozen=True)
class Example:
    """A python block and the output block that follows it, if any."""

    code: Block
    output: Block | None


@dataclass(frozen=True)
class Problem:
    """Something a page says that is not so: where (file and line) and what."""

    path: Path
    line: int
    message: str

    def where(self, root: Path) -> str:
        return f"{_shown(self.path, root)}:{self.line}"


def _shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


_PARSER = MarkdownIt("commonmark")


def _fences(tokens: list[Token], first_line: int, path: Path) -> Iterator[Block]:
    """The fenced blocks of a token stream whose line 0 is ``first_line`` of the file. A
    MyST directive (```{name}) holds Markdown, which is searched too."""
    for token in tokens:
        if token.type != "fence" or token.map is None:
            continue
        line = first_line + token.map[0]
        language = token.info.strip().split(" ")[0] if token.info.strip() else ""
        if language.startswith("{"):
            yield from _fences(_PARSER.parse(token.content), line + 1, path)
        yield Block(path, line, language, token.content)


def code_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, in the order of the file."""
    return code_blocks_in(path.read_text(encoding="utf-8"), path)


def code_blocks_in(text: str, path: Path) -> list[Block]:
    """Every fenced code block of Markdown ``text`` read from ``path``."""
    return list(_fences(_PARSER.parse(text), 1, path))


def examples(blocks: list[Block]) -> list[Example]:
    """Every python block, with the output block that follows it before the next python one."""
    found: list[Example] = []
    pending: Block | None = None
    for block in blocks:
        if block.language == "python":
            if pending is not None:
                found.append(Example(pending, None))
            pending = block
        elif block.language == "output" and pending is not None:
            found.append(Example(pending, block))
            pending = None
    if pending is not None:
        found.append(Example(pending, None))
    return found


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _padded(block: Block) -> str:
    """The block's text preceded by blank lines, so that line numbers in a traceback or an
    error message are line numbers of the Markdown file."""
    return "\n" * block.line + block.text


def run_example(example: Example) -> Problem | None:
    """Run one python example in a fresh namespace; a problem if it raises or prints anything
    but its output block."""
    code_block = example.code
    printed = io.StringIO()
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    try:
        code = compile(_padded(code_block), str(code_block.path), "exec")
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
    except Exception as error:  # any exception of an example is the page's fault
        return Problem(code_block.path, _failing_line(error, code_block), _describe(error))
    if example.output is None:
        return None
    if _normalise(printed.getvalue()) == _normalise(example.output.text):
        return None
    difference = difflib.unified_diff(
        _normalise(example.output.text).splitlines(),
        _normalise(printed.getvalue()).splitlines(),
        f"the output block (line {example.output.line})",
        "what the example printed",
        lineterm="",
    )
    return Problem(
        code_block.path,
        code_block.line,
        "the example no longer prints its output block:\n" + "\n".join(difference),
    )


def _failing_line(error: BaseException, block: Block) -> int:
    """The line of the Markdown file where ``error`` was raised (the innermost frame of the
    example itself), or the block's first line."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return error.lineno
    line = block.line
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == str(block.path) and frame.lineno is not None:
            line = frame.lineno
    return line


def _describe(error: BaseException) -> str:
    return f"the example raised {type(error).__name__}: {error}"


def replay_trace(block: Block) -> Problem | None:
    """Replay a jsonl trace on the reference; a problem at the first line whose expectation is
    not met (or that does not parse)."""
    source = str(block.path)
    try:
        trace = parse_lines(_padded(block).splitlines(), source)
    except TraceError as error:
        return Problem(block.path, error.line or block.line, f"not a valid trace: {error.message}")
    target = make_target("reference", PROFILES[trace.platform])
    try:
        for step in trace.steps:
            observed = target.apply(step.op)
            if step.expect is not None and observed != step.expect:
                return Problem(
                    block.path, step.line, f"expected {step.expect}, observed {observed}"
                )
    except Exception as error:  # the reference raising is the page's problem too
        return Problem(block.path, block.line, f"replaying the trace raised {error!r}")
    finally:
        target.close()
    return None


def parse_json(block: Block) -> Problem | None:
    try:
        json.loads(block.text)
    except ValueError as error:
        return Problem(block.path, block.line, f"not valid JSON: {error}")
    return None


def check_blocks(blocks: list[Block]) -> list[Problem]:
    """Every problem of a page's live blocks: examples, traces and JSON."""
    problems = [
        problem for example in examples(blocks) if (problem := run_example(example)) is not None
    ]
    for block in blocks:
        checker = {"jsonl": replay_trace, "json": parse_json}.get(block.language)
        if checker is not None and (problem := checker(block)) is not None:
            problems.append(problem)
    return sorted(problems, key=lambda problem: problem.line)


def is_live(blocks: list[Block]) -> bool:
    """Whether a page has anything the build must run."""
    return any(block.language in LIVE_LANGUAGES for block in blocks)
