"""A scheduler for in-flight kernel operations: one step of one actor at a time.

Each racy kernel path in the reference is a generator that yields where another CPU may run
(``Preempt``) or where it sleeps until a condition holds (``WaitUntil``). The scheduler keeps
the operations that have started and not finished, runs the step a state machine chooses,
and records the schedule so a failure prints which actor ran which step. No runnable actor
while some are in flight is a deadlock, and a finding.

For a race inside one action, :func:`race` steps two operations in a fixed pattern: the
first paused after some steps, the second run while it is (the POWER harness's races of a
hypercall or an access with a host invalidation, a hypercall, a slot deletion or a resize).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmspec.reference.concurrency import Deadlock, KernelOp, Preempt, WaitUntil, Yielded


class DeadlockFound(AssertionError):
    """Operations are in flight and none can run."""


@dataclass
class Actor:
    name: str
    op: KernelOp[Any]
    on_done: Callable[[Any], None]
    pending: Yielded | None = None


@dataclass
class Scheduler:
    actors: dict[str, Actor] = field(default_factory=dict)
    schedule: list[str] = field(default_factory=list)

    def start(self, name: str, op: KernelOp[Any], on_done: Callable[[Any], None]) -> None:
        """Run ``op`` up to its first yield (or to its end)."""
        actor = Actor(name, op, on_done)
        self.actors[name] = actor
        self._advance(actor, first=True)

    def runnable(self) -> list[str]:
        return sorted(
            name
            for name, actor in self.actors.items()
            if not isinstance(actor.pending, WaitUntil) or actor.pending.ready()
        )

    def step(self, name: str) -> None:
        """Let actor ``name`` run to its next yield. It must be in flight and runnable."""
        actor = self.actors.get(name)
        if actor is None:
            raise ValueError(f"no actor {name!r} is in flight (in flight: {sorted(self.actors)})")
        if name not in self.runnable():
            raise ValueError(f"actor {name!r} is waiting: {getattr(actor.pending, 'point', '?')}")
        self._advance(actor, first=False)

    def check_progress(self) -> None:
        if self.actors and not self.runnable():
            waits = {n: a.pending.point for n, a in self.actors.items() if a.pending}
            raise DeadlockFound(f"no actor can run: {waits}")

    def _advance(self, actor: Actor, first: bool) -> None:
        try:
            actor.pending = next(actor.op) if first else actor.op.send(None)
        except StopIteration as done:
            del self.actors[actor.name]
            self.schedule.append(f"{actor.name}: done -> {done.value!r}")
            actor.on_done(done.value)
            return
        point = actor.pending.point if isinstance(actor.pending, Preempt | WaitUntil) else "?"
        self.schedule.append(f"{actor.name}: {point}")


class SteppedOp:
    """A kernel operation advanced one step at a time, for a race inside one action (the
    POWER harness's: see :func:`race`)."""

    def __init__(self, op: KernelOp[Any]) -> None:
        self.op = op
        self.done = False
        self.result: Any = None
        self.waiting: WaitUntil | None = None

    def step(self) -> bool:
        """Advance to the next yield; False if finished or asleep on a false condition."""
        if self.done or (self.waiting is not None and not self.waiting.ready()):
            return False
        try:
            point = self.op.send(None)
        except StopIteration as finished:
            self.done, self.result = True, finished.value
            return True
        self.waiting = point if isinstance(point, WaitUntil) else None
        return True

    def run(self) -> Any:
        while not self.done:
            if not self.step():
                raise Deadlock(f"blocked forever at {self.waiting}")
        return self.result


def race(first: KernelOp[Any], steps: int, second: Callable[[], KernelOp[Any] | None]) -> Any:
    """Run ``first`` for ``steps`` yields, then start ``second()`` and run both to their
    ends, ``second`` until it ends or sleeps, then ``first`` whenever it can step, ``second``
    whenever ``first`` sleeps. Returns ``first``'s result."""
    a = SteppedOp(first)
    for _ in range(steps):
        a.step()
    started = second()
    b = SteppedOp(started) if started is not None else None
    while b is not None and b.step():
        pass
    while not a.done or (b is not None and not b.done):
        if a.step() or (b is not None and b.step()):
            continue
        raise Deadlock(f"both blocked: {a.waiting}, {b.waiting if b else None}")
    return a.result
