#!/usr/bin/env python3
"""Atheris fuzz target: bytes -> x86 shadow-MMU actions (guest loads and stores through
shadow pages, guest page-table rewrites, CR3 switches, host writes, MADV_DONTNEED, THP and
page migration (the APIC-access page's included), memslot changes, dirty logging and the VMM
exiting), with every check of the x86 state machine.

Each input is decoded by :mod:`kvmspec.fuzz.x86_decoder` into a layout and at most
:data:`MAX_ACTIONS` actions, which a fresh harness of that layout
(:mod:`kvmspec.fuzz.x86_harness`) applies on the default profile (the only x86 profile on
the shadow MMU), checking every rule after each one; the known kernel findings pass
(:data:`~kvmspec.fuzz.x86_known_findings.KNOWN_KERNEL_FINDINGS`). Actions the state does not
allow are rejected by the decoder and skipped. A broken rule is a finding: the input is
replayed with its log on, the report (the broken rules and each action with what the harness saw) is
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
    from kvmspec.fuzz import harness_fuzzing
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.generic_harness import Log
    from kvmspec.fuzz.x86_decoder import decode_action, decode_layout
    from kvmspec.fuzz.x86_layouts import make_harness
    from kvmspec.spec.platforms import DEFAULT_PROFILE

MAX_ACTIONS = 60
"""Actions per input at most (rejected ones included): enough to build shadow pages, zap and
rebuild them, and a bound on the time one input can take."""


Run = harness_fuzzing.Run


def run_input(data: bytes, log: Log | None = None, max_actions: int = MAX_ACTIONS) -> Run[str]:
    """Set a VM up in the layout ``data`` names and apply the actions it decodes to, checking
    every rule after each (:func:`~kvmspec.fuzz.harness_fuzzing.drive`)."""
    chooser = BytesChooser(data)
    layout = decode_layout(chooser)
    return harness_fuzzing.drive(
        Run(layout),
        chooser,
        lambda harness_log: make_harness(layout, DEFAULT_PROFILE, harness_log),
        lambda harness: decode_action(chooser, layout),
        log,
        max_actions,
    )


TARGET = harness_fuzzing.HarnessFuzzTarget(
    "x86",
    run_input,
    lambda run, data: f"x86 shadow MMU, layout {run.setup}, profile {DEFAULT_PROFILE.name}",
)
report = TARGET.report
TestOneInput = TARGET.test_one_input

if __name__ == "__main__":
    TARGET.main()
