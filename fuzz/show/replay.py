"""Running an input to the step a picture is taken at: traces and fuzzer inputs.

Two kinds of input reach the same end, a model VM in some state plus what happened on the
way (:class:`Replay`):

* a kvmspec trace (``.jsonl``): its operations are applied to the reference target
  (:class:`~kvmspec.fuzz.targets.reference.ReferenceTarget`) in a
  :class:`~kvmspec.fuzz.session.Session`, which judges every step by the contracts and
  invariants, as ``kvmspec replay --check`` does;
* a fuzzer input (``.bin``) of a harness family (x86, arm64, ppc, generic, and the memslot
  fuzzer's memslots), decoded against the family's harness exactly as its Atheris target
  does (:mod:`kvmspec.fuzz.show.families`), every rule checked after each action.

A step is one operation, or one action the decoder applied (an action it rejected is in
the timeline, greyed, and does not count). The run stops after ``step`` steps, at the first
broken rule, or when the input runs out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmspec.fuzz.ops import (
    GUEST_OPERATIONS,
    HOST_OPERATIONS,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    Operation,
)

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm
    from kvmspec.reference.kvm import Kvm


class ShowError(Exception):
    """Input ``kvmspec show`` cannot draw: a missing file, an unknown kind of input, a bad
    trace line, a step out of range, an unknown bug. ``str()`` is one line."""


@dataclass(frozen=True)
class Step:
    """One entry of the timeline: its number (0 for the set-up), who ran it, what it was,
    and whether it ran (False: the decoder rejected the action, it did nothing)."""

    number: int
    actor: str
    what: str
    applied: bool = True


@dataclass
class Replay:
    """What a picture shows: the VM (``kvm`` and its ``host``; on the shadow MMU the guest's
    page tables are the gfns its shadow pages name), the steps that ran, and whether a rule
    broke (``failing`` is the step that broke it, ``broken`` its lines). ``schedule`` is the
    harness scheduler's record (``"<step>|<actor>: <point>"``: which actor ran which step),
    ``notes`` anything the reader should know."""

    source: str
    kind: str
    kvm: Kvm
    host: HostMm | None
    steps: list[Step] = field(default_factory=list)
    failing: int | None = None
    broken: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    private_slot: int | None = None
    """The slot id a trace's guest keeps its page tables in (traces only)."""

    @property
    def applied(self) -> int:
        """How many steps ran (the set-up not counted)."""
        return sum(1 for step in self.steps if step.applied and step.number > 0)


def operation_actor(op: Operation) -> str:
    """Who runs an operation of a trace: a vCPU for a guest access, the host for the VMM's
    memory system calls, else the VMM's ioctl."""
    if isinstance(op, GuestRead | GuestWrite | HarvestDirtyRing):
        return f"vcpu {op.vcpu}"
    if isinstance(op, GUEST_OPERATIONS):
        return "guest"
    if isinstance(op, HOST_OPERATIONS):
        return "host"
    return "vmm"


def operation_text(op: Operation) -> str:
    """An operation as a short line: its name and its fields."""
    fields = op.to_json()
    name = fields.pop("op")
    return f"{name}({', '.join(f'{key}={value}' for key, value in fields.items())})"


def check_step(step: int | None) -> None:
    if step is not None and step < 0:
        raise ShowError(f"--step {step}: must be 0 or more")


def out_of_range(step: int | None, replay: Replay, total: str) -> None:
    """Refuse a step the input does not reach (a run that failed before it shows the
    failure instead)."""
    if step is not None and replay.failing is None and replay.applied < step:
        raise ShowError(f"--step {step} is out of range: {replay.source} has {total}")


def replay_trace(path: Path, step: int | None) -> Replay:
    """Apply a kvmspec trace's operations to the reference target, judging each."""
    from kvmspec.fuzz.guest_layout import private_slot_id
    from kvmspec.fuzz.session import Session
    from kvmspec.fuzz.targets.reference import ReferenceTarget
    from kvmspec.fuzz.trace import TraceError, load
    from kvmspec.spec.platforms import PROFILES

    try:
        trace = load(path)
    except TraceError as error:
        raise ShowError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ShowError(f"{path}: cannot read: {error}") from None
    profile = PROFILES[trace.platform]
    target = ReferenceTarget(profile)
    session = Session(profile, target)
    replay = Replay(path.name, f"trace on {profile.name}", target.kvm, target.host)
    replay.private_slot = private_slot_id(profile)
    steps = trace.steps if step is None else trace.steps[:step]
    run_operations(
        replay,
        [(op.op, f"line {op.line}") for op in steps],
        session.apply,
    )
    out_of_range(step, replay, f"{len(trace.steps)} steps")
    return replay


Apply = Callable[[Operation], tuple[object, list[str]]]


def run_operations(replay: Replay, ops: Iterable[tuple[Operation, str]], apply: Apply) -> None:
    """Apply operations in a session until one breaks a rule (or a contract or the model's
    own assertion fails inside it, reported as fuzz_memslots.py does)."""
    for number, (op, where) in enumerate(ops, start=1):
        replay.steps.append(Step(number, operation_actor(op), f"{operation_text(op)} [{where}]"))
        try:
            _, violations = apply(op)
        except AssertionError as error:
            kind = type(error).__name__
            rule = "CONTRACT" if kind == "ContractViolation" else "MODEL-ASSERT"
            violations = [f"{rule}: {kind} in {op.NAME}: {' '.join(str(error).split())}"]
        if violations:
            replay.failing, replay.broken = number, list(violations)
            return
