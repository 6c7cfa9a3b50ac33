"""The documentation cannot go stale: generated pages, citations and examples are checked.

* docs/rules.md is exactly what docs/make_rules.py generates from the rule catalogue.
* Every rule cites a source; seed quotes are found in their threads; kernel citations name a
  source file and a function.
* docs/trace-schema.json is the schema the trace parser is built from.
* Every ```python block in docs/*.md runs, and prints exactly the ```output block that follows
  it (if any); every ```jsonl block is a trace that replays on the reference with every
  expectation matched; every ```json block is valid JSON.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from kvmspec.fuzz.schema import trace_schema
from kvmspec.fuzz.targets import make_target
from kvmspec.fuzz.trace import parse_lines
from kvmspec.spec.checked_by import CHECKED_BY
from kvmspec.spec.platforms import PROFILES
from kvmspec.spec.rules import RULES, KernelCitation, SeedCitation, normalize_thread_text

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SEEDS = ROOT.parent / "shared" / "seeds"
REGENERATE = "run `.venv/bin/python docs/make_rules.py` and commit docs/rules.md"


def _load_make_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvmspec_docs_make_rules", DOCS / "make_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- (a) the generated rule catalogue --------------------------------------------------------


def test_rules_md_is_generated_from_the_catalogue() -> None:
    generated = _load_make_rules().render()
    assert isinstance(generated, str)
    current = (DOCS / "rules.md").read_text(encoding="utf-8")
    assert current == generated, f"docs/rules.md is stale: {REGENERATE}"


def test_rules_md_lists_every_rule() -> None:
    current = (DOCS / "rules.md").read_text(encoding="utf-8")
    missing = [rule_id for rule_id in RULES if f"\n| {rule_id} |" not in current]
    assert not missing, f"docs/rules.md lacks {missing}: {REGENERATE}"


def test_every_rule_says_what_checks_it() -> None:
    assert set(CHECKED_BY) == set(RULES), (
        f"rules without a checker entry: {sorted(set(RULES) - set(CHECKED_BY))}; "
        f"checker entries without a rule: {sorted(set(CHECKED_BY) - set(RULES))}"
    )


def test_named_scenario_tests_exist() -> None:
    named = [
        checker.split("`")[1]
        for checkers in CHECKED_BY.values()
        for checker in checkers
        if checker.startswith("scenario test `")
    ]
    for test in named:
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        assert f"def {name}(" in source, f"{test} is named as a checker but does not exist"


# --- (b) citations -------------------------------------------------------------------------


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_every_rule_has_a_citation(rule_id: str) -> None:
    assert RULES[rule_id].citations, f"rule {rule_id} cites no source"


SEED_QUOTES = [
    (rule.id, citation)
    for rule in RULES.values()
    for citation in rule.citations
    if isinstance(citation, SeedCitation)
]


@pytest.mark.parametrize(
    ("rule_id", "citation"),
    SEED_QUOTES,
    ids=[f"{rule_id}-{citation.file}" for rule_id, citation in SEED_QUOTES],
)
def test_seed_quotes_are_in_their_threads(rule_id: str, citation: SeedCitation) -> None:
    if not SEEDS.is_dir():
        pytest.skip(f"the seed threads are not here ({SEEDS} is absent)")
    thread = SEEDS / citation.file
    assert thread.is_file(), f"rule {rule_id} cites {citation.file}, which is not in {SEEDS}"
    text = normalize_thread_text(thread.read_text(encoding="utf-8", errors="replace"))
    quote = normalize_thread_text(citation.quote)
    assert quote in text, f"rule {rule_id}: {citation.quote!r} is not in {citation.file}"


KERNEL_CITATIONS = [
    (rule.id, citation)
    for rule in RULES.values()
    for citation in rule.citations
    if isinstance(citation, KernelCitation)
]


@pytest.mark.parametrize(
    ("rule_id", "citation"),
    KERNEL_CITATIONS,
    ids=[f"{rule_id}-{citation.function}" for rule_id, citation in KERNEL_CITATIONS],
)
def test_kernel_citations_name_a_file_and_a_function(
    rule_id: str, citation: KernelCitation
) -> None:
    assert citation.path.endswith((".c", ".h")), f"rule {rule_id}: {citation.path}"
    assert citation.function.isidentifier(), f"rule {rule_id}: {citation.function!r}"
    assert citation.version, f"rule {rule_id}: {citation} has no version"


# --- (c) the trace schema ------------------------------------------------------------------


def test_trace_schema_json_is_the_parsers_schema() -> None:
    on_disk = json.loads((DOCS / "trace-schema.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(trace_schema())), (
        "docs/trace-schema.json is stale: run `.venv/bin/kvmspec schema > docs/trace-schema.json`"
    )


# --- (d) the examples in the docs ----------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    opened: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if opened is None:
            if line.startswith("```"):
                opened = (number, line[3:].strip())
                body = []
        elif line.strip() == "```":
            blocks.append(Block(path, opened[0], opened[1], "\n".join(body) + "\n"))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"{path.name}:{opened[0]}: a code block is never closed"
    return blocks


@dataclass(frozen=True)
class Example:
    code: Block
    output: Block | None


def examples() -> list[Example]:
    """Every python block, with the output block that follows it before the next python one."""
    found: list[Example] = []
    for path in sorted(DOCS.glob("*.md")):
        pending: Block | None = None
        for block in code_blocks(path):
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


def blocks_in(language: str) -> list[Block]:
    return [
        block
        for path in sorted(DOCS.glob("*.md"))
        for block in code_blocks(path)
        if block.language == language
    ]


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


EXAMPLES = examples()


def test_the_docs_have_runnable_examples() -> None:
    assert EXAMPLES, "no ```python block found in docs/*.md"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.code.where for e in EXAMPLES])
def test_python_examples_run_and_print_what_the_docs_say(example: Example) -> None:
    printed = io.StringIO()
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    code = compile(example.code.text, example.code.where, "exec")
    with contextlib.redirect_stdout(printed):
        exec(code, namespace)
    if example.output is not None:
        assert _normalise(printed.getvalue()) == _normalise(example.output.text), (
            f"{example.code.where}: the example no longer prints the output block at "
            f"{example.output.where}"
        )


TRACES = blocks_in("jsonl")


@pytest.mark.parametrize("block", TRACES, ids=[b.where for b in TRACES])
def test_trace_examples_replay_on_the_reference(block: Block) -> None:
    trace = parse_lines(block.text.splitlines(), block.where)
    target = make_target("reference", PROFILES[trace.platform])
    try:
        for step in trace.steps:
            observed = target.apply(step.op)
            if step.expect is not None:
                assert observed == step.expect, (
                    f"{block.where} line {step.line}: expected {step.expect}, observed {observed}"
                )
    finally:
        target.close()


JSON_BLOCKS = blocks_in("json")


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=[b.where for b in JSON_BLOCKS])
def test_json_examples_are_valid(block: Block) -> None:
    json.loads(block.text)
