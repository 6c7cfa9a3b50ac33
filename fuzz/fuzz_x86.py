#!/usr/bin/env python3
"""Atheris fuzz target: bytes -> x86 shadow-MMU actions (guest loads and stores through
shadow pages, guest page-table rewrites, CR3 switches, host writes, MADV_DONTNEED, THP and
page migration (the APIC-access page's included), memslot changes and dirty logging), with
every check of the x86 state machine.

Each input is decoded by :mod:`kvmspec.fuzz.x86_decoder` into a layout and at most
:data:`MAX_ACTIONS` actions, which a fresh harness of that layout
(:mod:`kvmspec.fuzz.x86_harness`) applies on the default profile (the only x86 profile on
the shadow MMU), checking every rule after each one. Actions the state does not allow are
rejected by the decoder and skipped. A broken rule is a finding: the input is replayed with
its log on, the report (the broken rules and each action with what the harness saw) is
printed and written to ``corpus/regressions/x86-<sha1 of the input>.txt`` next to the input
itself (``.bin``, which ``./fuzz/fuzz_x86.py FILE`` replays), and a
:class:`~kvmspec.fuzz.atheris_support.SpecViolation` naming the rules is raised for libFuzzer
to report. A runtime contract or a model self-check failing inside an action (a guest access
that faults without end, S002-LARGE-SPTE-PROGRESS) is a finding too. Any other exception is
a bug in the harness or the model and propagates as it is.

    ./fuzz/fuzz_x86.py -max_total_time=60 -max_len=256 corpus/seeds/x86

The runtime contracts stay as ``KVMSPEC_CONTRACTS`` says (on unless set off). Coverage is
collected from the model (``KVMSPEC_INSTRUMENT``, see
:func:`~kvmspec.fuzz.atheris_support.instrumentation`). ``KVMSPEC_FUZZ_STATS=FILE`` makes
the target write its counters there (executions, actions applied, actions rejected by rule),
as JSON: libFuzzer only counts executions.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # This folder is the kvmspec.fuzz package; as a script folder its trace.py would shadow
    # the standard library's trace module.
    del sys.path[0]

try:
    from kvmspec.fuzz import atheris_support as support
except ImportError:  # started as ./fuzz/fuzz_x86.py by a Python without the project
    _VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if __name__ != "__main__" or not _VENV_PYTHON.exists() or sys.executable == str(_VENV_PYTHON):
        raise
    os.execv(_VENV_PYTHON, [str(_VENV_PYTHON), __file__, *sys.argv[1:]])

with support.instrumentation(enabled=__name__ == "__main__"):
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.generic_harness import Log
    from kvmspec.fuzz.x86_decoder import Action, Rejected, decode_action, decode_layout
    from kvmspec.fuzz.x86_harness import make_harness
    from kvmspec.spec.platforms import DEFAULT_PROFILE

MAX_ACTIONS = 60
"""Actions per input at most (rejected ones included): enough to build shadow pages, zap and
rebuild them, and a bound on the time one input can take."""


@dataclass
class Run:
    """What one input did: its layout, how many actions it applied, how many the decoder
    rejected (by rule), and the broken rules if a check failed (else an empty list)."""

    layout: str
    actions: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


def run_input(data: bytes, log: Log | None = None, max_actions: int = MAX_ACTIONS) -> Run:
    """Set a VM up in the layout ``data`` names and apply the actions it decodes to,
    checking every rule after each; stop at the first check that fails. ``log``, if given,
    receives each action (or why it was rejected), followed by the harness's lines about it,
    indented."""
    chooser = BytesChooser(data)
    run = Run(decode_layout(chooser))
    step: Action | Rejected | str = f"set_up(layout={run.layout!r})"
    try:
        if log is None:
            harness = make_harness(run.layout, DEFAULT_PROFILE)
        else:
            harness = make_harness(run.layout, DEFAULT_PROFILE, lambda line: log(f"  {line}"))
            log(str(step))
        harness.check()
        while run.actions + run.rejected.total() < max_actions and not chooser.exhausted:
            step = decode_action(chooser, run.layout)
            if log:
                log(str(step))
            if isinstance(step, Rejected):
                run.rejected[step.why] += 1
                continue
            run.actions += 1
            step.apply(harness)
            harness.check()
    except AssertionError as error:
        run.violations = support.failure_lines(error, str(step))
    return run


def report(data: bytes) -> tuple[Run, str]:
    """Replay an input with its log on: the run, and its report (the broken rules, then each
    action with what the harness saw it do)."""
    lines: list[str] = []
    run = run_input(data, lines.append)
    text = "\n".join(
        [
            f"x86 shadow MMU, layout {run.layout}, profile {DEFAULT_PROFILE.name}, "
            f"{len(data)} bytes: broken rules",
            *(f"  {violation}" for violation in run.violations),
            "actions, each followed by what the harness saw:",
            *(f"  {line}" for line in lines),
            "",
        ]
    )
    return run, text


STATS = support.ActionStats(os.environ.get(support.STATS_ENV))


def TestOneInput(data: bytes) -> None:
    """libFuzzer's entry point: one input, one fresh VM; raise SpecViolation on a finding."""
    run = run_input(data)
    STATS.add(run.actions, run.rejected)
    if run.violations:
        replayed, text = report(data)
        print(text, file=sys.stderr)
        path = support.write_reproducer("x86", data, text)
        raise support.SpecViolation(replayed.violations or run.violations, path)


def main() -> None:
    """Run libFuzzer (its flags come from the command line)."""
    import atheris

    support.warn_if_contracts_off()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
