"""Write docs/kernel-index.md: from each kernel function to the model code that mirrors it.

Someone reading kvm_main.c, mmu.c, pgtable.c or book3s_64_mmu_hv.c should be able to jump
from a kernel function to the model and back. The model says which kernel code each of its
functions mirrors in the last line of its docstring (``kernel: path/file.c:function, other
(v6.18)``, several files separated by ``;``), and every rule names the kernel functions it is
read from (``KernelCitation``). This script walks the docstrings of reference/ with ``ast``
(nothing is imported or run), collects both, and writes one table per kernel source file,
sorted by function: the kernel function, the model functions that cite it, and the rules that
cite it. Structures (``struct kvm_memory_slot``) are listed too.

Like rules.md, the page is generated so that it cannot drift: the site build and
tests/test_docs.py fail when it differs from what this script writes. Run it after changing
a docstring's kernel line, a rule's citations, or the name of a cited model function:

    .venv/bin/python docs/make_kernel_index.py
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from make_rules import kernel_anchor, rule_anchor

from kvmspec.spec.rules import RULES, KernelCitation, Rule

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
REFERENCE = ROOT / "reference"
OUTPUT = DOCS / "kernel-index.md"

# A citation runs from "kernel:" to its version, "(v6.18)", or to the end of its paragraph.
CITATION = re.compile(r"\bkernel:\s*(.*?)\s*(?:\(v\d+\.\d+[^)]*\)|\n\s*\n|\Z)", re.DOTALL)
FILE_AND_REST = re.compile(r"((?:[\w.+-]+/)*[\w+-]+\.[chS])(?::\s*(.*))?")
NAME = re.compile(r"(?:(?:struct|enum|union) )?[A-Za-z_]\w*")
PARENTHESES = re.compile(r"\([^()]*\)")


@dataclass(frozen=True, order=True)
class KernelName:
    """A function (or structure) of the kernel: its source file and its name."""

    path: str
    name: str


@dataclass(frozen=True, order=True)
class ModelName:
    """A model function, class or module: its file under reference/ and qualified name
    (empty for the module itself)."""

    path: str
    qualname: str

    @property
    def dotted(self) -> str:
        """``x86.zap.kvm_zap_obsolete_pages``: the module under kvmspec.reference, then the
        qualified name."""
        module = self.path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        return f"{module}.{self.qualname}" if self.qualname else f"{module} (module)"


def parse_citation(text: str) -> Iterator[KernelName]:
    """The kernel names of one citation's text (what follows ``kernel:``): files separated
    by ``;`` (or ``,``), each with ``:`` and a list of names; parenthesised remarks and
    words that are not names (``the hardware page walk``) are left out."""
    text = " ".join(text.split())
    while PARENTHESES.search(text):
        text = PARENTHESES.sub("", text)
    for group in text.split(";"):
        path: str | None = None
        for item in group.split(","):
            item = item.strip()
            located = FILE_AND_REST.fullmatch(item)
            if located is not None:
                path, item = located.group(1), (located.group(2) or "").strip()
            if path is not None and item and NAME.fullmatch(item):
                yield KernelName(path, item)


def docstring_citations(source: str) -> Iterator[tuple[str, KernelName]]:
    """(qualified name, kernel name) for every kernel name that a docstring of one module
    cites; the module's own docstring has the qualified name ""."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, KernelName]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = f"{prefix}{child.name}"
                yield from cited(child, qualname)
                yield from walk(child, qualname + ".")

    def cited(
        node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef, qualname: str
    ) -> Iterator[tuple[str, KernelName]]:
        for match in CITATION.finditer(ast.get_docstring(node) or ""):
            for name in parse_citation(match.group(1)):
                yield qualname, name

    tree = ast.parse(source)
    yield from cited(tree, "")
    yield from walk(tree, "")


@dataclass
class Entry:
    """One row of the index: the model code and the rules that cite a kernel name."""

    models: set[ModelName]
    rules: list[str]


def collect(rules: dict[str, Rule] = RULES) -> dict[KernelName, Entry]:
    """Every kernel name cited by a docstring of reference/ or by a rule."""
    index: dict[KernelName, Entry] = defaultdict(lambda: Entry(set(), []))
    for path in sorted(REFERENCE.rglob("*.py")):
        relative = path.relative_to(REFERENCE).as_posix()
        for qualname, name in docstring_citations(path.read_text(encoding="utf-8")):
            index[name].models.add(ModelName(relative, qualname))
    for rule in rules.values():
        for citation in rule.citations:
            if isinstance(citation, KernelCitation):
                entry = index[KernelName(citation.path, citation.function)]
                if rule.id not in entry.rules:
                    entry.rules.append(rule.id)
    return dict(index)


def _model_link(model: ModelName) -> str:
    fragment = f"#{model.qualname}" if model.qualname else ""
    return f"[`{model.dotted}`](../reference/{model.path}{fragment})"


def render(index: dict[KernelName, Entry] | None = None) -> str:
    """The whole of docs/kernel-index.md."""
    index = collect() if index is None else index
    by_file: dict[str, list[KernelName]] = defaultdict(list)
    for name in index:
        by_file[name.path].append(name)
    functions = sum(1 for name in index if " " not in name.name)
    lines = [
        "<!-- Generated by docs/make_kernel_index.py: do not edit by hand. -->",
        "# Kernel index",
        "",
        "For readers who arrive from the kernel source: each kernel function that the model",
        "mirrors or a rule cites, grouped by kernel source file (Linux v6.18), with the model",
        "code that mirrors it (its docstring ends with a `kernel:` line naming the function)",
        "and the rules of the [catalogue](rules.md) read from it. Model names are relative to",
        "`kvmspec.reference` and link to the source; a rule links to its row in the catalogue.",
        "A function with no model code is one that only a rule cites.",
        "",
        f"{functions} kernel functions and {len(index) - functions} structures, in "
        f"{len(by_file)} source files.",
        "",
    ]
    lines += [
        f"* [{path}](#{_file_anchor(path)}) ({len(by_file[path])})" for path in sorted(by_file)
    ]
    anchors = [kernel_anchor(name.path, name.name) for name in index]
    if len(set(anchors)) != len(anchors):
        twice = sorted({anchor for anchor in anchors if anchors.count(anchor) > 1})
        raise ValueError(f"two kernel names have one anchor: {twice}")
    for path in sorted(by_file):
        lines += [
            "",
            f"({_file_anchor(path)})=",
            f"## {path}",
            "",
            "| kernel | model | rules |",
            "|---|---|---|",
        ]
        for name in sorted(by_file[path], key=_sort_key):
            entry = index[name]
            anchor = kernel_anchor(name.path, name.name)
            models = "<br>".join(_model_link(model) for model in sorted(entry.models)) or "—"
            rules = ", ".join(f"[{rule}](rules.md#{rule_anchor(rule)})" for rule in entry.rules)
            lines.append(f"| [`{name.name}`]{{#{anchor}}} | {models} | {rules or '—'} |")
    return "\n".join(lines) + "\n"


def _sort_key(name: KernelName) -> tuple[bool, str, str]:
    """Functions by name (``__kvm_handle_hva_range`` beside ``kvm_handle_hva_range``), then
    structures."""
    return " " in name.name, name.name.lstrip("_").lower(), name.name


def _file_anchor(path: str) -> str:
    return "kfile-" + re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def main() -> int:
    index = collect()
    OUTPUT.write_text(render(index), encoding="utf-8")
    functions = sum(1 for name in index if " " not in name.name)
    print(f"wrote {OUTPUT}: {functions} kernel functions and {len(index) - functions} structures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
