"""The documentation cannot go stale: generated pages, citations and examples are checked.

The site build (`make docs`, docs/_ext/kvmspec_docs.py) runs the same checks with the same
code; these tests run them without building the site, one test per block or rule.

* docs/rules.md and docs/kernel-index.md are exactly what docs/make_rules.py and
  docs/make_kernel_index.py generate; every rule has its anchor.
* Every rule cites a source that is there: seed quotes are found in their threads, kernel
  citations name a source file and a function, measured citations a section of FINDINGS.md
  (make_rules.citation_problems); planted bad citations are reported.
* docs/trace-schema.json is the schema the trace parser is built from.
* Every ```python block in docs/**/*.md runs and prints exactly the ```output block that
  follows it (if any); every ```jsonl block is a trace that replays on the reference with
  every expectation matched; every ```json block is valid JSON (docs/_ext/doc_examples.py).
  Planted broken examples are reported at their line, and fail the site build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmspec.fuzz.schema import trace_schema
from kvmspec.spec.checked_by import CHECKED_BY
from kvmspec.spec.rules import (
    RULES,
    KernelCitation,
    MeasuredCitation,
    Rule,
    SeedCitation,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The page generators (docs/) and the example runner (docs/_ext) are plain modules, imported
# the way the site build imports them (docs/conf.py puts the same folders on sys.path).
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS)]

import doc_examples  # noqa: E402
import kvmspec_docs  # noqa: E402
import make_kernel_index  # noqa: E402
import make_rules  # noqa: E402

SHARED = make_rules.SHARED
NOT_PAGES = ("_build", "_ext", "examples")
REGENERATE_RULES = "run `.venv/bin/python docs/make_rules.py` and commit docs/rules.md"
REGENERATE_INDEX = (
    "run `.venv/bin/python docs/make_kernel_index.py` and commit docs/kernel-index.md"
)


def pages() -> list[Path]:
    """Every Markdown page of the site."""
    return [
        path
        for path in sorted(DOCS.rglob("*.md"))
        if path.relative_to(DOCS).parts[0] not in NOT_PAGES
    ]


# --- (a) the generated pages ----------------------------------------------------------------


def test_rules_md_is_generated_from_the_catalogue() -> None:
    current = (DOCS / "rules.md").read_text(encoding="utf-8")
    assert current == make_rules.render(), f"docs/rules.md is stale: {REGENERATE_RULES}"


def test_every_rule_has_its_anchor_in_rules_md() -> None:
    current = (DOCS / "rules.md").read_text(encoding="utf-8")
    missing = [
        rule_id
        for rule_id in RULES
        if f"\n| [{rule_id}]{{#{make_rules.rule_anchor(rule_id)}}} |" not in current
    ]
    assert not missing, f"docs/rules.md lacks {missing}: {REGENERATE_RULES}"
    assert make_rules.rule_anchor("M7") == "rule-m7"
    assert make_rules.rule_anchor("S001-FLUSH-ALL") == "rule-s001-flush-all"


def test_kernel_index_is_generated_from_the_model_and_the_rules() -> None:
    current = (DOCS / "kernel-index.md").read_text(encoding="utf-8")
    assert current == make_kernel_index.render(), (
        f"docs/kernel-index.md is stale: {REGENERATE_INDEX}"
    )


def test_kernel_index_has_every_kernel_citation_of_the_rules() -> None:
    index = make_kernel_index.collect()
    for rule in RULES.values():
        for citation in rule.citations:
            if isinstance(citation, KernelCitation):
                name = make_kernel_index.KernelName(citation.path, citation.function)
                assert rule.id in index[name].rules, f"{rule.id} {citation}"


def test_kernel_index_maps_kernel_functions_to_the_model() -> None:
    index = make_kernel_index.collect()
    memory_region = index[
        make_kernel_index.KernelName("virt/kvm/kvm_main.c", "kvm_set_memory_region")
    ]
    assert "kvm_main.kvm_set_memory_region" in {m.dotted for m in memory_region.models}
    assert "C-MEMSLOT-ORDER" in memory_region.rules
    functions = {name for name in index if " " not in name.name}
    assert len(functions) > 300, "the index lost most of the model's kernel citations"


def test_kernel_index_links_to_definitions_that_exist() -> None:
    """Each model link's anchor is a class or function of its file (the site's source pages
    have an anchor per definition, and the build fails on a link to a missing one)."""
    for entry in make_kernel_index.collect().values():
        for model in entry.models:
            source = kvmspec_docs.SourceFile(f"reference/{model.path}")
            assert not model.qualname or source.line_of(model.qualname), model
    assert kvmspec_docs.SourceFile("reference/memslots.py").line_of("KvmMemslots") is not None
    assert kvmspec_docs.SourceFile("reference/memslots.py").line_of("NoSuchThing") is None
    assert kvmspec_docs.SourceFile("reference/memslots.py").line_of("L1") == 1


def test_kernel_citations_are_parsed_from_docstrings() -> None:
    """The forms the model's docstrings use: several files separated by ``;``, files without
    a function, remarks in parentheses, structures, and words that name nothing."""
    text = (
        "arch/x86/kvm/mmu/spte.h, arch/x86/kvm/mmu/spte.c:make_mmio_spte; "
        "arch/x86/kvm/x86.c: kvm_vm_ioctl_enable_cap (KVM_CAP_DISABLE_QUIRKS2), "
        "vcpu_enter_guest; include/linux/kvm_host.h:struct kvm_memory_slot; "
        "the hardware page walk (SDM vol. 3, 4.10)"
    )
    parsed = [(name.path, name.name) for name in make_kernel_index.parse_citation(text)]
    assert parsed == [
        ("arch/x86/kvm/mmu/spte.c", "make_mmio_spte"),
        ("arch/x86/kvm/x86.c", "kvm_vm_ioctl_enable_cap"),
        ("arch/x86/kvm/x86.c", "vcpu_enter_guest"),
        ("include/linux/kvm_host.h", "struct kvm_memory_slot"),
    ]
    source = textwrap.dedent('''
        """A module.

        kernel: virt/kvm/kvm_main.c:kvm_set_memory_region,
        kvm_check_memslot_overlap (v6.18)
        """

        class Kvm:
            def flush(self) -> None:
                """Flush.

                kernel: virt/kvm/kvm_main.c:kvm_flush_remote_tlbs (v6.18)
                """
    ''')
    cited = [(q, n.name) for q, n in make_kernel_index.docstring_citations(source)]
    assert cited == [
        ("", "kvm_set_memory_region"),
        ("", "kvm_check_memslot_overlap"),
        ("Kvm.flush", "kvm_flush_remote_tlbs"),
    ]


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


# --- (b) citations --------------------------------------------------------------------------


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_every_rule_cites_something_that_is_there(rule_id: str) -> None:
    if not make_rules.shared_documents_present(SHARED):
        pytest.skip(f"the seed threads and FINDINGS.md are not here (under {SHARED})")
    problems = make_rules.citation_problems({rule_id: RULES[rule_id]}, SHARED)
    assert not problems, f"spec/rules.py:{make_rules.rule_line(rule_id)}: {problems}"


def test_bad_citations_are_reported() -> None:
    """Each kind of citation to nothing is caught (the check above cannot pass vacuously)."""
    if not make_rules.shared_documents_present(SHARED):
        pytest.skip(f"the seed threads and FINDINGS.md are not here (under {SHARED})")
    findings = "shared/kvm-reference/linux-kvm-here/FINDINGS.md"
    planted = {
        "NONE": Rule("NONE", "invariant", "x", "cites nothing", ()),
        "QUOTE": Rule(
            "QUOTE",
            "invariant",
            "x",
            "misquotes",
            (SeedCitation("001_54ba1c77039f4a98.txt", "Nobody ever said this."),),
        ),
        "THREAD": Rule(
            "THREAD", "invariant", "x", "no thread", (SeedCitation("999_none.txt", "a"),)
        ),
        "PATH": Rule("PATH", "invariant", "x", "no C file", (KernelCitation("kvm_main", "kvm"),)),
        "FUNCTION": Rule(
            "FUNCTION",
            "invariant",
            "x",
            "no function",
            (KernelCitation("virt/kvm/kvm_main.c", "kvm set"),),
        ),
        "SECTION": Rule(
            "SECTION",
            "invariant",
            "x",
            "no section",
            (MeasuredCitation(findings, "4. Dirty pages of the moon"),),
        ),
    }
    reported = {rule_id for rule_id, _ in make_rules.citation_problems(planted, SHARED)}
    assert reported == set(planted)
    good = Rule(
        "GOOD", "invariant", "x", "fine", (MeasuredCitation(findings, "3. Which errno wins"),)
    )
    assert make_rules.citation_problems({"GOOD": good}, SHARED) == []


def test_rule_lines_point_into_spec_rules() -> None:
    assert all(make_rules.rule_line(rule_id) > 0 for rule_id in RULES)


# --- (c) the trace schema -------------------------------------------------------------------


def test_trace_schema_json_is_the_parsers_schema() -> None:
    on_disk = json.loads((DOCS / "trace-schema.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(trace_schema())), (
        "docs/trace-schema.json is stale: run `.venv/bin/kvmspec schema > docs/trace-schema.json`"
    )


# --- (d) the examples in the docs -----------------------------------------------------------

BLOCKS = {path: doc_examples.code_blocks(path) for path in pages()}
EXAMPLES = [example for blocks in BLOCKS.values() for example in doc_examples.examples(blocks)]
TRACES = [block for blocks in BLOCKS.values() for block in blocks if block.language == "jsonl"]
JSON_BLOCKS = [block for blocks in BLOCKS.values() for block in blocks if block.language == "json"]


def _failure(problem: doc_examples.Problem | None) -> str:
    return "" if problem is None else f"{problem.where(ROOT)}: {problem.message}"


def test_the_docs_have_runnable_examples() -> None:
    assert EXAMPLES, "no ```python block found in docs/**/*.md"
    assert any(path.parent.name == "tour" for path in BLOCKS), "no tour chapter found"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.code.where(ROOT) for e in EXAMPLES])
def test_python_examples_run_and_print_what_the_docs_say(
    example: doc_examples.Example,
) -> None:
    problem = doc_examples.run_example(example)
    assert problem is None, _failure(problem)


@pytest.mark.parametrize("block", TRACES, ids=[b.where(ROOT) for b in TRACES])
def test_trace_examples_replay_on_the_reference(block: doc_examples.Block) -> None:
    problem = doc_examples.replay_trace(block)
    assert problem is None, _failure(problem)


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=[b.where(ROOT) for b in JSON_BLOCKS])
def test_json_examples_are_valid(block: doc_examples.Block) -> None:
    problem = doc_examples.parse_json(block)
    assert problem is None, _failure(problem)


TRACE_HEADER = '{"format": "kvmspec-trace/1", "platform": "x86_64"}'
DELETE_NOTHING = (
    '{"op": "set_user_memory_region", "slot": 0, "flags": 0, "guest_phys_addr": 0, '
    '"memory_size": 0, "userspace_addr": 0, "expect": {"errno": 0}}'
)
BROKEN_PAGE = f"""\
# A broken page

```python
print("one")
```

```output
two
```

- a list item with an example that raises:

  ```python
  numbers = [1, 2]
  print(numbers[5])
  ```

````{{note}}
Inside a directive:

```json
{{"not": json}}
```
````

```jsonl
{TRACE_HEADER}
{DELETE_NOTHING}
```
"""


def test_broken_examples_are_reported_at_their_line(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text(BROKEN_PAGE, encoding="utf-8")
    problems = doc_examples.check_blocks(doc_examples.code_blocks(page))
    expected = [
        (3, "the example no longer prints its output block"),
        (15, "the example raised IndexError"),
        (21, "not valid JSON"),
        (28, "expected {'errno': 0}, observed {'errno': 'EINVAL'}"),
    ]
    assert len(problems) == len(expected), problems
    for problem, (line, says) in zip(problems, expected, strict=True):
        assert problem.line == line and problem.message.startswith(says), problem


def _sphinx_project(source: Path, page: str) -> None:
    source.mkdir()
    (source / "conf.py").write_text(
        f"import sys\nsys.path[:0] = [{str(DOCS / '_ext')!r}, {str(DOCS)!r}]\n"
        'extensions = ["myst_parser", "kvmspec_docs"]\n'
        'myst_enable_extensions = ["attrs_inline"]\n'
    )
    (source / "index.md").write_text(page, encoding="utf-8")


def test_the_site_build_fails_at_the_line_of_each_problem(tmp_path: Path) -> None:
    """The same checks fail `make docs`: a stale example, one that raises, bad JSON, a trace
    whose expectation is not met, a picture of a missing input or that the show API refuses,
    and a link to a missing repository file each give a warning at FILE:LINE, and the build's
    status is not 0."""
    source = tmp_path / "src"
    up = os.path.relpath(ROOT, source)
    page = (
        BROKEN_PAGE
        + "\n```{kvmspec-show} examples/nothing.jsonl\n```\n"
        + f"\nSee [the model]({up}/reference/no_such_module.py).\n"
        + "\n```{kvmspec-show} memslots.jsonl\n:step: 999\n```\n"
    )
    _sphinx_project(source, page)
    shutil.copy(DOCS / "examples" / "memslots.jsonl", source)
    html = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", source, html],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode != 0
    index = source / "index.md"
    for line, says in [
        (3, "no longer prints its output block"),
        (15, "IndexError"),
        (21, "not valid JSON"),
        (28, "expected {'errno': 0}, observed {'errno': 'EINVAL'}"),
        (31, "kvmspec-show: no input docs/examples/nothing.jsonl"),
        (34, "link to reference/no_such_module.py, which does not exist"),
        (36, "kvmspec-show docs/memslots.jsonl: --step 999 is out of range"),
    ]:
        assert f"{index}:{line}:" in build.stderr and says in build.stderr, (
            f"line {line}: {says!r} not reported:\n{build.stderr}"
        )


def test_two_pictures_on_a_page_keep_their_own_ids() -> None:
    svg = (
        '<svg class="kvmspec-show" data-as-id="0"><defs><pattern id="hatch"/></defs>'
        '<rect fill="url(#hatch)"/><use href="#hatch"/></svg>'
    )
    scoped = kvmspec_docs.scoped_ids(svg, "kvmspec-show-1")
    assert 'id="kvmspec-show-1-hatch"' in scoped
    assert "url(#kvmspec-show-1-hatch)" in scoped and 'href="#kvmspec-show-1-hatch"' in scoped
    assert 'data-as-id="0"' in scoped
