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
from collections import Counter
from dataclasses import dataclass, field
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
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.generic_decoder import Action, Rejected, SetUp, decode_action, decode_set_up
    from kvmspec.fuzz.generic_harness import GenericHarness, Log
    from kvmspec.spec.platforms import PlatformProfile

MAX_ACTIONS = 100
"""Actions per input at most (rejected ones included): enough for several interleaved
actors to start and finish, and for a campaign's generic-machine run (80 rules at most) to
replay whole, and a bound on the time one input can take."""

PROFILE = support.profile_from_env()


@dataclass
class Run:
    """What one input did: how many actions it applied, how many the decoder rejected (by
    rule), the broken rules if a check failed (else an empty list), and the schedule (which
    actor ran which step)."""

    actions: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)


def run_input(
    data: bytes,
    profile: PlatformProfile,
    log: Log | None = None,
    max_actions: int = MAX_ACTIONS,
) -> Run:
    """Set a harness up and apply the actions ``data`` decodes to, checking every rule after
    each; stop at the first check that fails. ``log``, if given, receives each action (or why
    it was rejected), followed by the harness's lines about it, indented."""
    if log is None:
        harness = GenericHarness(profile)
    else:
        harness = GenericHarness(profile, lambda line: log(f"  {line}"))
    chooser = BytesChooser(data)
    run = Run(schedule=harness.scheduler.schedule)
    set_up = decode_set_up(chooser)
    step: Action | Rejected | SetUp = set_up
    try:
        if log:
            log(str(set_up))
        harness.set_up(set_up.mode, set_up.logged)
        harness.check()
        while run.actions + run.rejected.total() < max_actions and not chooser.exhausted:
            step = decode_action(chooser, harness)
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


def report(data: bytes, profile: PlatformProfile) -> tuple[Run, str]:
    """Replay an input with its log on: the run, and its report (the broken rules, each
    action with what the harness saw it do, and the schedule)."""
    lines: list[str] = []
    run = run_input(data, profile, lines.append)
    text = "\n".join(
        [
            f"generic layer, profile {profile.name}, {len(data)} bytes: broken rules",
            *(f"  {violation}" for violation in run.violations),
            "actions, each followed by what the harness saw:",
            *(f"  {line}" for line in lines),
            "schedule (which actor ran which step):",
            *(f"  {line}" for line in run.schedule),
            "",
        ]
    )
    return run, text


STATS = support.ActionStats(os.environ.get(support.STATS_ENV))


def TestOneInput(data: bytes) -> None:
    """libFuzzer's entry point: one input, one fresh VM; raise SpecViolation on a finding."""
    run = run_input(data, PROFILE)
    STATS.add(run.actions, run.rejected)
    if run.violations:
        replayed, text = report(data, PROFILE)
        print(text, file=sys.stderr)
        path = support.write_reproducer("generic", data, text)
        raise support.SpecViolation(replayed.violations or run.violations, path)


def main() -> None:
    """Run libFuzzer (its flags come from the command line)."""
    import atheris

    support.warn_if_contracts_off()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
