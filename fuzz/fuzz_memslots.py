#!/usr/bin/env python3
"""Atheris fuzz target: bytes -> memslot and dirty-log operations on the reference model.

Each input is decoded by the shared decoder (:class:`~kvmspec.fuzz.decoder.BytesChooser`)
into at most :data:`MAX_OPERATIONS` operations, which a fresh
:class:`~kvmspec.fuzz.session.Session` applies to the reference target of one platform profile
(``KVMSPEC_PROFILE``, default ``DEFAULT_PROFILE``) and judges against the black-box contracts
and the white-box invariants. A broken rule is a finding: the session's trace is written to
``corpus/regressions/memslots-<sha1 of the input>.jsonl`` and a
:class:`~kvmspec.fuzz.atheris_support.SpecViolation` (an AssertionError naming the rules) is
raised for libFuzzer to report. So is a runtime contract (a PEP 316 condition, spec/dbc.py)
or a model self-check failing inside the model. Any other exception is a bug in the harness
or the model and propagates as it is.

    ./fuzz/fuzz_memslots.py -max_total_time=60 -max_len=1024 corpus/seeds/memslots

The runtime contracts stay as ``KVMSPEC_CONTRACTS`` says (on unless set off): they are part of
what a run checks. Coverage is collected from the model, kvmspec.reference and kvmspec.spec
(``KVMSPEC_INSTRUMENT``, see :func:`~kvmspec.fuzz.atheris_support.instrumentation`).
``KVMSPEC_FUZZ_DRIVER=hypothesis`` fuzzes the Hypothesis MemslotMachine instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # This folder is the kvmspec.fuzz package; as a script folder its trace.py would shadow
    # the standard library's trace module.
    del sys.path[0]

try:
    from kvmspec.fuzz import atheris_support as support
    from kvmspec.fuzz.allocator import keep_freed_memory
except ImportError:  # started as ./fuzz/fuzz_memslots.py by a Python without the project
    _VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if __name__ != "__main__" or not _VENV_PYTHON.exists() or sys.executable == str(_VENV_PYTHON):
        raise
    os.execv(_VENV_PYTHON, [str(_VENV_PYTHON), __file__, *sys.argv[1:]])

with support.instrumentation(enabled=__name__ == "__main__"):
    from kvmspec.fuzz.decoder import BytesChooser, decode_operation
    from kvmspec.fuzz.session import Session
    from kvmspec.fuzz.targets import Target
    from kvmspec.fuzz.targets.reference import ReferenceTarget
    from kvmspec.fuzz.trace import dump
    from kvmspec.spec.platforms import PlatformProfile

    # Session imports the invariant monitor when it starts: import it here, instrumented.
    importlib.import_module("kvmspec.spec.invariants.memslots")

MAX_OPERATIONS = 64
"""Operations per input at most: enough for long dependent sequences, and a bound on the time
one input can take."""

PROFILE = support.profile_from_env()


def new_target(profile: PlatformProfile) -> Target:
    """The implementation under test: the reference model. (Tests replace this function to
    show that a broken model is caught.)"""
    return ReferenceTarget(profile)


@dataclass(frozen=True)
class Finding:
    """Rules broken by a run, and the run as a replayable trace."""

    violations: list[str]
    trace: str


def apply_input(
    session: Session, chooser: BytesChooser, max_operations: int = MAX_OPERATIONS
) -> Finding | None:
    """Decode and apply operations until the chooser's bytes run out (or ``max_operations``);
    stop at the first one that breaks a rule.

    Slots stay small (``large_slots`` off): a multi-TiB dirty-logged slot makes one
    KVM_GET_DIRTY_LOG observation a list of millions of words, seconds per input.
    """
    for _ in range(max_operations):
        if chooser.exhausted:
            break
        op = decode_operation(chooser, session)
        try:
            _, violations = session.apply(op)
        except AssertionError as error:
            # A contract condition (dbc.ContractViolation is an AssertionError) or an
            # assertion of the model itself failed while the model ran the operation.
            rule = "CONTRACT" if type(error).__name__ == "ContractViolation" else "MODEL-ASSERT"
            message = " ".join(str(error).split())
            trace = dump(session.profile.name, [*session.history, (op, None)])
            return Finding([f"{rule}: {type(error).__name__} in {op.NAME}: {message}"], trace)
        if violations:
            return Finding(violations, session.trace_text())
    return None


def TestOneInput(data: bytes) -> None:
    """libFuzzer's entry point: one input, one fresh VM; raise SpecViolation on a finding."""
    session = Session(PROFILE, new_target(PROFILE))
    try:
        finding = apply_input(session, BytesChooser(data))
    finally:
        session.close()
    if finding is not None:
        path = support.write_regression("memslots", data, finding.trace)
        raise support.SpecViolation(finding.violations, path)


def main() -> None:
    """Run libFuzzer (its flags come from the command line)."""
    import atheris

    support.warn_if_contracts_off()
    keep_freed_memory()  # each input's fresh VM reuses the last one's memory
    target: Callable[[bytes], None] = TestOneInput
    if os.environ.get("KVMSPEC_FUZZ_DRIVER") == "hypothesis":
        target = support.hypothesis_fuzz_one_input(PROFILE)
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
