#!/usr/bin/env python3
"""Atheris fuzz target: bytes -> generic-layer actions (memslot updates, page faults,
MADV_DONTNEED and dirty-log ioctls as interleaved actors; host actions; guest accesses) on the
flat MMU, with every check of the Hypothesis generic machine.

Each input is decoded by :mod:`kvmspec.fuzz.generic_decoder` into a set-up and at most
:data:`MAX_ACTIONS` actions, which a fresh :class:`~kvmspec.fuzz.generic_harness.GenericHarness`
applies on the platform profile ``KVMSPEC_PROFILE`` (default ``DEFAULT_PROFILE``), checking
every rule after each one. Actions the state does not allow (an actor step naming an actor
that is not in flight or waits, a precondition that is false) are rejected by the decoder and
skipped. A broken rule is a finding: the input is replayed with its log on, the report (the
broken rules, each action, what each actor did step by step, and the schedule) is printed and
written to ``corpus/regressions/generic-<sha1 of the input>.txt`` next to the input itself
(``.bin``, which ``./fuzz/fuzz_generic.py FILE`` replays), and a
:class:`~kvmspec.fuzz.atheris_support.SpecViolation` naming the rules is raised for libFuzzer
to report. A deadlock, a runtime contract (a PEP 316 condition) or a model self-check failing
inside an action is a finding too. Any other exception is a bug in the harness or the model
and propagates as it is.

    ./fuzz/fuzz_generic.py -max_total_time=60 -max_len=512 corpus/seeds/generic

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
except ImportError:  # started as ./fuzz/fuzz_generic.py by a Python without the project
    _VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if __name__ != "__main__" or not _VENV_PYTHON.exists() or sys.executable == str(_VENV_PYTHON):
        raise
    os.execv(_VENV_PYTHON, [str(_VENV_PYTHON), __file__, *sys.argv[1:]])

with support.instrumentation(enabled=__name__ == "__main__"):
    from kvmspec.fuzz import harness_fuzzing
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.generic_decoder import SetUp, decode_action, decode_set_up
    from kvmspec.fuzz.generic_harness import GenericHarness, Log
    from kvmspec.spec.platforms import PlatformProfile

MAX_ACTIONS = 100
"""Actions per input at most (rejected ones included): enough for several interleaved
actors to start and finish, and for a campaign's generic-machine run (80 rules at most) to
replay whole, and a bound on the time one input can take."""

PROFILE = support.profile_from_env()


Run = harness_fuzzing.Run


def run_input(
    data: bytes,
    profile: PlatformProfile,
    log: Log | None = None,
    max_actions: int = MAX_ACTIONS,
) -> Run[SetUp]:
    """Set a harness up and apply the actions ``data`` decodes to, checking every rule after
    each (:func:`~kvmspec.fuzz.harness_fuzzing.drive`); the run keeps the schedule (which
    actor ran which step)."""
    chooser = BytesChooser(data)
    run = Run(decode_set_up(chooser))

    def start(harness_log: Log) -> GenericHarness:
        harness = GenericHarness(profile, harness_log)
        run.schedule = harness.scheduler.schedule
        harness.set_up(run.setup.mode, run.setup.logged)
        return harness

    return harness_fuzzing.drive(
        run, chooser, start, lambda harness: decode_action(chooser, harness), log, max_actions
    )


TARGET = harness_fuzzing.HarnessFuzzTarget(
    "generic",
    lambda data, log: run_input(data, PROFILE, log),
    lambda run, data: f"generic layer, profile {PROFILE.name}",
)
report = TARGET.report
TestOneInput = TARGET.test_one_input

if __name__ == "__main__":
    TARGET.main()
