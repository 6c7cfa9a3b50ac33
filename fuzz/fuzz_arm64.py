#!/usr/bin/env python3
"""Atheris fuzz target: bytes -> arm64 stage-2 actions (guest loads, stores, instruction
fetches and stage-1 walk reads through the fault path, accesses with no slot or beyond the
IPA space, the host's writes, MADV_DONTNEED, mprotect, munmap, THP collapse and split,
aging through the notifier, memslot moves, dirty logging and its harvests, faults racing an
invalidation, two faults with the hardware walker and seed 001's lockless ager stepped in
the input's order, and the VMM's exit), with every check of the arm64 state machine.

Each input is decoded by :mod:`kvmspec.fuzz.arm64_decoder` into a set-up (the MMU, hardware
access-flag updates, the eager-split chunk, the dirty-log mode) and at most
:data:`MAX_ACTIONS` actions, which a fresh :class:`~kvmspec.fuzz.arm64_harness.Arm64Harness`
so configured applies on the ``arm64`` profile, checking every rule after each one. Actions
the state does not allow are rejected by the decoder and skipped. A broken rule is a
finding: the input is replayed with its log on, the report (the broken rules and each action
with what the harness saw) is printed and written to
``corpus/regressions/arm64-<sha1 of the input>.txt`` next to the input itself (``.bin``,
which ``./fuzz/fuzz_arm64.py FILE`` replays), and a
:class:`~kvmspec.fuzz.atheris_support.SpecViolation` naming the rules is raised for libFuzzer
to report. A runtime contract or a model self-check failing inside an action is a finding
too. Any other exception is a bug in the harness or the model and propagates as it is.

    ./fuzz/fuzz_arm64.py -max_total_time=60 -max_len=256 corpus/seeds/arm64

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
except ImportError:  # started as ./fuzz/fuzz_arm64.py by a Python without the project
    _VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if __name__ != "__main__" or not _VENV_PYTHON.exists() or sys.executable == str(_VENV_PYTHON):
        raise
    os.execv(_VENV_PYTHON, [str(_VENV_PYTHON), __file__, *sys.argv[1:]])

with support.instrumentation(enabled=__name__ == "__main__"):
    from kvmspec.fuzz import harness_fuzzing
    from kvmspec.fuzz.arm64_decoder import Setup, decode_action, decode_setup
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.generic_harness import Log
    from kvmspec.spec.platforms import ARM64

MAX_ACTIONS = 80
"""Actions per input at most (rejected ones included): enough for a campaign's arm64
machine run to replay whole, and a bound on the time one input can take."""


Run = harness_fuzzing.Run


def run_input(data: bytes, log: Log | None = None, max_actions: int = MAX_ACTIONS) -> Run[Setup]:
    """Set a VM up as ``data`` says and apply the actions it decodes to, checking every rule
    after each (:func:`~kvmspec.fuzz.harness_fuzzing.drive`)."""
    chooser = BytesChooser(data)
    setup = decode_setup(chooser)
    return harness_fuzzing.drive(
        Run(setup),
        chooser,
        lambda harness_log: setup.harness(ARM64, harness_log),
        lambda harness: decode_action(chooser, harness),
        log,
        max_actions,
    )


TARGET = harness_fuzzing.HarnessFuzzTarget(
    "arm64", run_input, lambda run, data: f"arm64 stage 2, {run.setup}, profile {ARM64.name}"
)
report = TARGET.report
TestOneInput = TARGET.test_one_input

if __name__ == "__main__":
    TARGET.main()
