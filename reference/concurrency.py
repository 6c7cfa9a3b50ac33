"""Explicit concurrency: kernel paths that can race are generators.

A racy kernel operation is written as a generator that yields at every point where another CPU
may run: a lock release, a sleep, an SRCU grace period, a wait. Run to completion, it behaves
like the kernel's sequential code; a scheduler (the harness) can instead advance several
operations one step at a time and explore their interleavings.

Two things can be yielded:

* :class:`Preempt`: "another CPU may run here". The operation can always continue.
* :class:`WaitUntil`: "this CPU sleeps until ``ready()``". The step is not runnable until the
  condition holds; if nothing else can run, that is a deadlock, and a finding.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Preempt:
    """Another CPU may run at this point of the operation."""

    point: str


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """The operation sleeps until ``ready()`` is true."""

    point: str
    ready: Callable[[], bool]


Yielded = Preempt | WaitUntil
KernelOp = Generator[Yielded, None, T]
"""A kernel operation: yields where others may run, returns its result (often an errno)."""


class Deadlock(Exception):
    """A waiting operation can never continue because nothing else is running."""


def run_to_completion(op: KernelOp[T]) -> T:
    """Run one operation alone, as if no other CPU existed, and return its result.

    With no other actor, a :class:`WaitUntil` whose condition is false can never become true.
    """
    try:
        step = next(op)
        while True:
            if isinstance(step, WaitUntil) and not step.ready():
                raise Deadlock(f"blocked forever at {step.point!r}")
            step = op.send(None)
    except StopIteration as done:
        result: T = done.value
        return result


class Mutex:
    """A sleeping lock (struct mutex). Taking it is a step that blocks while another holds it."""

    __slots__ = ("name", "owner")

    def __init__(self, name: str) -> None:
        self.name = name
        self.owner: object | None = None

    def lock(self, owner: object) -> KernelOp[None]:
        if self.owner is not None:
            yield WaitUntil(f"{self.name}: wait for the holder", lambda: self.owner is None)
        self.owner = owner

    def unlock(self, owner: object) -> None:
        if self.owner is not owner:
            raise RuntimeError(f"{self.name} released by a CPU that does not hold it")
        self.owner = None

    @property
    def locked(self) -> bool:
        return self.owner is not None


class Readers:
    """The read side every RCU flavour shares: readers enter and leave without blocking, each
    with a token, and the set of readers inside is what a grace period waits out."""

    __slots__ = ("_next", "active", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active: set[int] = set()
        self._next = 0

    def read_lock(self) -> int:
        self._next += 1
        self.active.add(self._next)
        return self._next

    def read_unlock(self, token: int) -> None:
        self.active.remove(token)


class Srcu(Readers):
    """Sleepable RCU (struct srcu_struct): readers never block; a writer's synchronize
    waits for every reader that was already inside when it started (new readers do not
    hold it up). KVM's memslot readers (vCPUs faulting, walking memslots) are such readers,
    so a memslot set is never freed under one of them (M10).

    kernel: kernel/rcu/srcutree.c:srcu_read_lock, srcu_read_unlock,
    synchronize_srcu_expedited (v6.18)
    """

    __slots__ = ()

    def synchronize(self, point: str) -> KernelOp[None]:
        """Wait out the readers that are inside now (a grace period)."""
        inside = set(self.active)
        yield Preempt(point)
        # Usually nobody was inside; the intersection is then the empty set at no cost.
        if inside and inside & self.active:
            yield WaitUntil(
                f"{self.name}: grace period waits for readers",
                lambda: not inside & self.active,
            )


class RwLock:
    """A reader-writer spinlock (rwlock_t), as x86 and arm64 build kvm->mmu_lock: page-table
    changes take it for write; paths that only need the tables to stay (the TDP MMU's
    faults, arm64's shared walks) take it for read.

    A spinlock section never sleeps, so the model takes it inside one step: ``write()`` and
    ``read()`` are context managers for code that does not yield inside. If the lock cannot
    be taken at that moment, some path yielded while holding it, which a spinlock forbids:
    the model raises :class:`Deadlock`. ``held_for_write`` is what lockdep assertions ask.

    kernel: include/linux/rwlock.h; virt/kvm/kvm_mm.h:KVM_MMU_LOCK (v6.18)
    """

    __slots__ = ("_read_section", "_write_section", "name", "readers", "writer")

    def __init__(self, name: str) -> None:
        self.name = name
        self.writer = False
        self.readers = 0
        # Sections hold no state of their own, so one of each serves every ``with``.
        self._write_section = _WriteSection(self)
        self._read_section = _ReadSection(self)

    def write(self) -> _WriteSection:
        """``with lock.write():`` write_lock ... write_unlock."""
        return self._write_section

    def read(self) -> _ReadSection:
        """``with lock.read():`` read_lock ... read_unlock."""
        return self._read_section

    @property
    def held_for_write(self) -> bool:
        return self.writer


class _WriteSection:
    """The body of ``with lock.write():``. A class rather than a generator-based context
    manager: page-table code enters mmu_lock on nearly every operation, and this is cheaper."""

    __slots__ = ("lock",)

    def __init__(self, lock: RwLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        lock = self.lock
        if lock.writer or lock.readers:
            raise Deadlock(f"{lock.name}: taken for write while held (held across a yield?)")
        lock.writer = True

    def __exit__(self, *exc: object) -> None:
        self.lock.writer = False


class _ReadSection:
    """The body of ``with lock.read():`` (see :class:`_WriteSection`)."""

    __slots__ = ("lock",)

    def __init__(self, lock: RwLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        lock = self.lock
        if lock.writer:
            raise Deadlock(f"{lock.name}: taken for read while held for write")
        lock.readers += 1

    def __exit__(self, *exc: object) -> None:
        self.lock.readers -= 1


class Rcu(Readers):
    """RCU: readers never block, and an object a writer unpublished is freed only after every
    reader that might still see it has left (a grace period). Walkers of lockless page
    tables (arm64 stage-2 shared walks, seed 001's lockless aging) are readers; freeing a
    table page waits for them through ``call_rcu``.

    kernel: include/linux/rcupdate.h:rcu_read_lock, call_rcu (v6.18)
    """

    __slots__ = ("callbacks",)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.callbacks: list[tuple[frozenset[int], Callable[[], None]]] = []

    def read_unlock(self, token: int) -> None:
        super().read_unlock(token)
        self._run_callbacks()

    def call_rcu(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every reader inside now has left (at once if none is)."""
        self.callbacks.append((frozenset(self.active), callback))
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        waiting = []
        for readers, callback in self.callbacks:
            if readers & self.active:
                waiting.append((readers, callback))
            else:
                callback()
        self.callbacks = waiting
