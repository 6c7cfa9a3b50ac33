#!/usr/bin/env python3
"""Atheris fuzz target: bytes -> POWER Book3S HV actions (the guest's hypercalls on its
hashed page table, guest loads and stores through the fault path, the host's MADV_DONTNEED,
munmap, mprotect, writes and aging, memslot changes with hypercalls inside them, dirty-log
harvests, HPT resizes, and races between them), with every check of the POWER state machine.

Each input is decoded by :mod:`kvmspec.fuzz.ppc_decoder` into at most :data:`MAX_ACTIONS`
actions, which a fresh :class:`~kvmspec.fuzz.ppc_harness.PpcHarness` applies on the
``ppc64-hv`` profile, checking every rule after each one. Actions the state does not allow
are rejected by the decoder and skipped. The known kernel finding the campaign's machine lets
pass (:data:`~kvmspec.fuzz.ppc_harness.KNOWN_KERNEL_FINDINGS`: the stale MMIO cache) passes
here too, or every run would stop at it. A broken rule is a finding: the input is replayed
with its log on, the report (the broken rules and each action with what the harness saw) is
printed and written to ``corpus/regressions/ppc-<sha1 of the input>.txt`` next to the input
itself (``.bin``, which ``./fuzz/fuzz_ppc.py FILE`` replays), and a
:class:`~kvmspec.fuzz.atheris_support.SpecViolation` naming the rules is raised for libFuzzer
to report. A runtime contract or a model self-check failing inside an action is a finding
too. Any other exception is a bug in the harness or the model and propagates as it is.

    ./fuzz/fuzz_ppc.py -max_total_time=60 -max_len=256 corpus/seeds/ppc

The runtime contracts stay as ``KVMSPEC_CONTRACTS`` says (on unless set off). Coverage is
collected from the model (``KVMSPEC_INSTRUMENT``, see
:func:`~kvmspec.fuzz.atheris_support.instrumentation`). ``KVMSPEC_FUZZ_STATS=FILE`` makes
the target write its counters there (executions, actions applied, actions rejected by rule),
as JSON: libFuzzer only counts executions.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # This folder is the kvmspec.fuzz package; as a script folder its trace.py would shadow
    # the standard library's trace module.
    del sys.path[0]

try:
    from kvmspec.fuzz import atheris_support as support
except ImportError:  # started as ./fuzz/fuzz_ppc.py by a Python without the project
    _VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if __name__ != "__main__" or not _VENV_PYTHON.exists() or sys.executable == str(_VENV_PYTHON):
        raise
    os.execv(_VENV_PYTHON, [str(_VENV_PYTHON), __file__, *sys.argv[1:]])

with support.instrumentation(enabled=__name__ == "__main__"):
    from kvmspec.fuzz import harness_fuzzing
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.generic_harness import Log
    from kvmspec.fuzz.ppc_decoder import decode_action
    from kvmspec.fuzz.ppc_harness import KNOWN_KERNEL_FINDINGS, PpcHarness
    from kvmspec.spec.platforms import PPC64_HV

MAX_ACTIONS = 100
"""Actions per input at most (rejected ones included): enough for a campaign's POWER machine
run (80 rules at most) to replay whole, and a bound on the time one input can take."""


Run = harness_fuzzing.Run


@functools.cache
def _set_up_vm() -> bytes:
    """The VM as :class:`PpcHarness`'s constructor leaves it, pickled the first time an
    input asks for it (so in a mutation run, with the mutant already in place). A test that
    plants a bug in the set-up path itself (the memslot ioctls, the host's first writes)
    must call ``_set_up_vm.cache_clear()`` first."""
    return pickle.dumps(
        PpcHarness(PPC64_HV, tolerated=KNOWN_KERNEL_FINDINGS), pickle.HIGHEST_PROTOCOL
    )


def new_harness(log: Log) -> PpcHarness:
    """A fresh VM for one input, logging to ``log``. Every input starts from the same VM,
    so it is built once and each input gets a copy: unpickling it runs no model code, and
    under Atheris's instrumentation it costs about a third of building it again (two
    memslot ioctls and eight host page faults were a third of fuzz_ppc.py's time)."""
    harness: PpcHarness = pickle.loads(_set_up_vm())
    harness.log = log
    return harness


def run_input(data: bytes, log: Log | None = None, max_actions: int = MAX_ACTIONS) -> Run[str]:
    """Set the VM up and apply the actions ``data`` decodes to, checking every rule after
    each (:func:`~kvmspec.fuzz.harness_fuzzing.drive`); the known kernel findings pass."""
    chooser = BytesChooser(data)
    return harness_fuzzing.drive(
        Run("set_up()"),
        chooser,
        new_harness,
        lambda harness: decode_action(chooser, harness),
        log,
        max_actions,
    )


TARGET = harness_fuzzing.HarnessFuzzTarget(
    "ppc", run_input, lambda run, data: f"POWER Book3S HV (HPT), profile {PPC64_HV.name}"
)
report = TARGET.report
TestOneInput = TARGET.test_one_input

if __name__ == "__main__":
    TARGET.main()
