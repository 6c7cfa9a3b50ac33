"""Hypothesis state machines over the memslot and dirty-log uAPI.

:class:`MemslotMachine` drives one target with operations from the shared decoder and checks,
after every step, the black-box contracts and (on the reference) every white-box invariant.
:class:`DifferentialMachine` drives the reference and a second target in lockstep and requires
identical observations. Both are parameterised by :func:`memslot_machine` /
:func:`differential_machine`, so the same machine checks the reference, a modified reference
(any factory returning a Target), or the real kernel.

A failure prints the operations as trace lines (Hypothesis ``note``), and the whole session can
be written out with ``Session.trace_text()`` for ``kvmspec replay``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmspec.fuzz.decoder import Chooser, decode_operation
from kvmspec.fuzz.guest_decoder import decode_guest_operation
from kvmspec.fuzz.ops import Operation
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import Target, make_target
from kvmspec.spec.platforms import PlatformProfile

TargetFactory = Callable[[PlatformProfile], Target]
Decoder = Callable[[Chooser, Session], Operation]
DECODERS: dict[str, Decoder] = {"memslots": decode_operation, "guest": decode_guest_operation}
"""The operation mixes a machine can draw from: the whole memslot uAPI, or a running guest
with its memslots, the VMM's memory and dirty logging (kvmspec.fuzz.guest_decoder)."""

# Counters the campaign reports, and the trace of the most recent run (a failing run is the
# last one Hypothesis executes, after shrinking); "reproducer", when present, is the run as an
# Atheris input (hex) that the area's fuzzer replays.
STATS: Counter[str] = Counter()
LAST_RUN: dict[str, str] = {}


def record_run(checks: int, trace: Iterable[str], suffix: str, reproducer: bytes | None) -> None:
    """What a harness machine leaves for the campaign when a run ends: its counters (one
    step and one check per action), the run as the failing trace (``suffix`` names its
    kind), and the run as an input of the family's fuzzer where one replays it."""
    STATS["steps"] += checks
    STATS["invariant_checks"] += checks
    LAST_RUN["trace"] = "\n".join(trace) + "\n"
    LAST_RUN["suffix"] = suffix
    if reproducer is None:
        LAST_RUN.pop("reproducer", None)
    else:
        LAST_RUN["reproducer"] = reproducer.hex()


class HypothesisChooser:
    """Answers the decoder's questions with Hypothesis draws, which Hypothesis can shrink."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        value: int = self.data.draw(st.integers(0, n - 1))
        return value


def _factory(name: str) -> TargetFactory:
    return lambda profile: make_target(name, profile)


class _SessionMachine(RuleBasedStateMachine):
    """Shared plumbing: a session per run, closed at teardown."""

    profile: PlatformProfile
    factory: TargetFactory
    decode: Decoder
    large_slots: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.session = Session(self.profile, self.factory(self.profile), self.large_slots)
        self.violations: list[str] = []

    def _step(self, op: Operation) -> None:
        note(json.dumps(op.to_json()))
        observed, violations = self.session.apply(op)
        note(f"  -> {json.dumps(observed)}")
        STATS["steps"] += 1
        if self.session.monitor is not None:
            STATS["invariant_checks"] += 1
        self.violations.extend(violations)

    def teardown(self) -> None:
        LAST_RUN["trace"] = self.session.trace_text()
        LAST_RUN["suffix"] = ".jsonl"
        LAST_RUN.pop("reproducer", None)
        self.session.close()


class MemslotMachine(_SessionMachine):
    @rule(data=st.data())
    def apply_operation(self, data: st.DataObject) -> None:
        self._step(self.decode(HypothesisChooser(data), self.session))

    @invariant()
    def rules_hold(self) -> None:
        assert not self.violations, "\n".join(self.violations)


def memslot_machine(
    profile: PlatformProfile,
    target: str | TargetFactory = "reference",
    large_slots: bool | None = None,
    mix: str = "memslots",
) -> type[MemslotMachine]:
    """A MemslotMachine class bound to a profile, a target (a name or a factory) and an
    operation mix (a key of DECODERS)."""
    factory = _factory(target) if isinstance(target, str) else target
    attributes = {
        "profile": profile,
        "factory": staticmethod(factory),
        "decode": staticmethod(DECODERS[mix]),
        # A real kernel spends ~2.5 MiB per GiB of slot: keep accepted slots small there.
        "large_slots": target == "reference" if large_slots is None else large_slots,
    }
    return type(f"MemslotMachine[{profile.name}, {mix}]", (MemslotMachine,), attributes)


class DifferentialMachine(RuleBasedStateMachine):
    """The reference and another target, in lockstep: every observation must be identical."""

    profile: PlatformProfile
    other: TargetFactory
    decode: Decoder

    def __init__(self) -> None:
        super().__init__()
        self.reference = Session(self.profile, "reference", large_slots=False)
        self.other_session = Session(self.profile, self.other(self.profile), large_slots=False)
        self.differences: list[str] = []

    @precondition(lambda self: not self.differences)
    @rule(data=st.data())
    def apply_to_both(self, data: st.DataObject) -> None:
        op = self.decode(HypothesisChooser(data), self.reference)
        note(json.dumps(op.to_json()))
        expected, violations = self.reference.apply(op)
        observed, other_violations = self.other_session.apply(op)
        STATS["steps"] += 1
        STATS["invariant_checks"] += 1
        note(f"  reference -> {json.dumps(expected)}")
        note(f"  {self.other_session.target.name} -> {json.dumps(observed)}")
        if expected != observed:
            self.differences.append(
                f"{op.NAME}: reference {json.dumps(expected)}, "
                f"{self.other_session.target.name} {json.dumps(observed)}"
            )
        self.differences.extend(f"reference broke {v}" for v in violations)
        self.differences.extend(f"other target broke {v}" for v in other_violations)

    @invariant()
    def identical(self) -> None:
        assert not self.differences, "\n".join(self.differences)

    def teardown(self) -> None:
        LAST_RUN["trace"] = self.reference.trace_text()
        LAST_RUN["suffix"] = ".jsonl"
        LAST_RUN.pop("reproducer", None)
        self.reference.close()
        self.other_session.close()


def differential_machine(
    profile: PlatformProfile, other: str | TargetFactory = "linux-kvm", mix: str = "memslots"
) -> type[DifferentialMachine]:
    """The reference against ``other`` in lockstep, on an operation mix of DECODERS."""
    factory = _factory(other) if isinstance(other, str) else other
    attributes = {
        "profile": profile,
        "other": staticmethod(factory),
        "decode": staticmethod(DECODERS[mix]),
    }
    name = f"DifferentialMachine[{profile.name}, {mix}]"
    return type(name, (DifferentialMachine,), attributes)
