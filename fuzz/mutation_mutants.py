"""mutmut's mutants of ``reference/``: enumerated, named as mutmut names them, keyed stably,
and made concrete one at a time (for :mod:`kvmspec.fuzz.mutation`).

mutmut 3.3.1 changes only code inside a top-level function or a method of a top-level class
(not module constants, not decorated functions or classes, not docstrings), with its
operators (:mod:`mutmut.node_mutation`). :func:`mutmut.file_mutation.create_mutations` lists
a file's mutations in a fixed order; mutmut numbers them per function
(``<module>.x_<function>__mutmut_<n>``, ``xǁ<Class>ǁ<method>`` for a method), and so does
:class:`Mutant`. That number moves when anything earlier in the function is edited, so a
mutant's stable id (its ``key``, what a hand classification is filed under) is the module,
the function and a hash of the original and mutated code instead.

Some mutants are equivalent by construction (:func:`auto_equivalent`): the text of a label or
a message changed (a ``Preempt``/``WaitUntil`` point, a WARN's rule or message, an
exception's or an assert's message), or an argument of a WARN replaced by None (the campaign
checks that no WARN fires on the reference, so its condition is always false there and its
rule and message are never seen).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libcst as cst
from libcst.metadata import CodeRange, MetadataWrapper, PositionProvider
from mutmut.file_mutation import (  # type: ignore[import-untyped]
    create_mutations,
    deep_replace,
)
from mutmut.trampoline_templates import mangle_function_name  # type: ignore[import-untyped]

FOLDERS = ("generic", "x86", "arm64", "ppc")
LABEL_CALLS = {
    "Preempt": (0,),
    "WaitUntil": (0,),
    "synchronize": (0,),
    "warn_on": (1, 2),
    "lockdep_assert_mmu_lock_held_write": (0,),
    "Mutex": (0,),
    "RwLock": (0,),
    "Srcu": (0,),
    "Rcu": (0,),
}
"""Calls whose arguments at these positions are only labels or messages: a scheduling point's
name (an SRCU or RCU grace period's too), a lock's name (only ever shown in those), and a
WARN's rule and message (a WARN never fires on the reference, so their text is never seen;
a lockdep assertion's argument is a WARN's message)."""


def reference_dir() -> Path:
    """Where the model's sources are (found, not imported)."""
    spec = importlib.util.find_spec("kvmspec.reference")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


@dataclass(frozen=True)
class Mutant:
    """One mutant: where it is, mutmut's name for it, and its stable id."""

    module: str
    path: Path
    index: int
    """Its position in mutmut's list of the file's mutations (create_mutations' order)."""
    function: str
    """mutmut's mangled name of the function: ``x_name`` or ``xǁClassǁmethod``."""
    number: int
    key: str
    equivalent: str
    """Why the mutant is equivalent by construction (:func:`auto_equivalent`), or ""."""

    @property
    def folder(self) -> str:
        part = self.module.split(".")[2]
        return part if part in FOLDERS else "generic"

    @property
    def name(self) -> str:
        """mutmut's name for the mutant."""
        return f"{self.module}.{self.function}__mutmut_{self.number}"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(["kvmspec.reference", *(p for p in parts if p != "__init__")])


def _parents(module: cst.Module) -> dict[int, cst.CSTNode]:
    parents: dict[int, cst.CSTNode] = {}

    class Visitor(cst.CSTVisitor):
        def on_visit(self, node: cst.CSTNode) -> bool:
            for child in node.children:
                parents[id(child)] = node
            return True

    module.visit(Visitor())
    return parents


def _call_name(call: cst.Call) -> str:
    func = call.func
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return func.value if isinstance(func, cst.Name) else ""


def _is_label(node: cst.CSTNode, parents: dict[int, cst.CSTNode]) -> bool:
    """Whether a string is a label or a message: the argument of LABEL_CALLS at its
    position, of an exception raised, or an assert's message."""
    while isinstance(parents.get(id(node)), cst.ConcatenatedString):
        node = parents[id(node)]
    arg = parents.get(id(node))
    if isinstance(arg, cst.Assert):
        return arg.msg is node
    call = parents.get(id(arg)) if isinstance(arg, cst.Arg) else None
    if not isinstance(call, cst.Call):
        return False
    position = next(i for i, a in enumerate(call.args) if a is arg)
    return position in LABEL_CALLS.get(_call_name(call), ()) or isinstance(
        parents.get(id(call)), cst.Raise
    )


def _none_in_warning(original: cst.CSTNode, mutated: cst.CSTNode) -> bool:
    """Whether the mutation replaces an argument of a ``warn_on`` by None: its condition
    (the WARN is silenced), its rule or its message."""
    if not (
        isinstance(original, cst.Call)
        and isinstance(mutated, cst.Call)
        and _call_name(original) == "warn_on"
        and len(original.args) == len(mutated.args)
    ):
        return False
    changed = [
        new.value
        for old, new in zip(original.args, mutated.args, strict=True)
        if old.value is not new.value
    ]
    return len(changed) == 1 and isinstance(changed[0], cst.Name) and changed[0].value == "None"


def auto_equivalent(mutation: Any, parents: dict[int, cst.CSTNode]) -> str:
    """Why a mutant is equivalent by construction, or "" (then only running it, or a person,
    can tell)."""
    original, mutated = mutation.original_node, mutation.mutated_node
    if isinstance(original, cst.SimpleString) and _is_label(original, parents):
        return "label: changes only the text of a label or message"
    if _none_in_warning(original, mutated):
        # The campaign checks that no WARN fires on the reference: its condition is always
        # false there, so a condition of None, or no rule or message, changes nothing.
        return "self-check: weakens a WARN that never fires on the reference"
    return ""


@dataclass
class FileMutations:
    """mutmut's mutations of one file, those in a top-level function or method."""

    path: Path
    module: cst.Module
    mutations: list[Any]
    owners: dict[int, str]
    """The class of each method (by node id)."""

    @classmethod
    def parse(cls, path: Path) -> FileMutations:
        module, mutations = create_mutations(path.read_text())
        owners = {
            id(method): statement.name.value
            for statement in module.body
            if isinstance(statement, cst.ClassDef) and isinstance(statement.body, cst.IndentedBlock)
            for method in statement.body.body
        }
        # mutmut runs only the mutations inside a function (a class attribute is left alone).
        kept = [
            m for m in mutations if isinstance(m.contained_by_top_level_function, cst.FunctionDef)
        ]
        return cls(path, module, kept, owners)

    def function_name(self, mutation: Any) -> str:
        function = mutation.contained_by_top_level_function
        owner = self.owners.get(id(function))
        return str(mangle_function_name(name=function.name.value, class_name=owner))


def modules(root: Path, only: str = "") -> list[tuple[str, Path]]:
    """The modules under ``root`` (only the module or package ``only`` when given), by name."""
    found = [(_module_name(path, root), path) for path in sorted(root.rglob("*.py"))]
    return [(m, p) for m, p in found if not only or m == only or m.startswith(only + ".")]


def enumerate_mutants(root: Path, only: str = "") -> list[Mutant]:
    """Every mutant mutmut makes of the modules under ``root`` (only the module or package
    ``only`` when given), in file order."""
    mutants = []
    for module, path in modules(root, only):
        found = FileMutations.parse(path)
        parents = _parents(found.module)
        numbers: dict[str, int] = {}
        seen: dict[str, int] = {}
        for index, mutation in enumerate(found.mutations):
            function = found.function_name(mutation)
            numbers[function] = numbers.get(function, 0) + 1
            before = found.module.code_for_node(mutation.original_node)
            after = found.module.code_for_node(mutation.mutated_node)
            digest = hashlib.sha1(f"{function}\0{before}\0{after}".encode()).hexdigest()[:10]
            seen[digest] = seen.get(digest, 0) + 1
            occurrence = f"#{seen[digest]}" if seen[digest] > 1 else ""
            # mutmut 3.3.1 compares a string's new text with its old one without the prefix,
            # so it "mutates" b"" (and the like) into itself.
            equivalent = "no-op: the mutated code is the original" if before == after else ""
            equivalent = equivalent or auto_equivalent(mutation, parents)
            key = f"{module}:{function}:{digest}{occurrence}"
            mutant = Mutant(module, path, index, function, numbers[function], key, equivalent)
            mutants.append(mutant)
    return mutants


@dataclass
class Rendered:
    """A mutant made concrete: its source, the lines it changes, and the line ranges that
    decide which areas can reach it."""

    source: str
    diff: list[str]
    function_lines: tuple[int, int]
    lines: tuple[int, int]


def render(mutants: Sequence[Mutant]) -> dict[str, Rendered]:
    """The mutated sources of ``mutants`` (by key), parsing each file once."""
    rendered = {}
    by_path: dict[Path, list[Mutant]] = {}
    for mutant in mutants:
        by_path.setdefault(mutant.path, []).append(mutant)
    for path, in_file in by_path.items():
        found = FileMutations.parse(path)
        positions = MetadataWrapper(found.module, unsafe_skip_copy=True).resolve(PositionProvider)
        original = found.module.code.splitlines()
        for mutant in in_file:
            mutation = found.mutations[mutant.index]
            source = deep_replace(found.module, mutation.original_node, mutation.mutated_node).code
            diff = [
                line
                for line in difflib.unified_diff(original, source.splitlines(), n=0, lineterm="")
                if line[:1] in "-+@" and not line.startswith(("---", "+++"))
            ]
            # The body only: the def line runs at import, in every area.
            body = mutation.contained_by_top_level_function.body.body
            function: CodeRange = positions[body[0]]
            function_end: CodeRange = positions[body[-1]]
            node: CodeRange = positions[mutation.original_node]
            rendered[mutant.key] = Rendered(
                source,
                diff,
                (function.start.line, function_end.end.line),
                (node.start.line, node.end.line),
            )
    return rendered
