"""What happened to the stage-2 tables, in order.

Every write to a descriptor (by software or by the hardware walker), every TLB
invalidation and every cache maintenance operation is appended to one
:class:`Stage2History`, in the order they happened; reads of freed table pages and the
library's WARN_ONs are kept beside them. The rules of INVENTORY C.5 and seed 001 are then
questions about that record, asked by ``kvmspec.spec.invariants.arm64`` (the reference
does not import it):

* A1, break-before-make: a valid descriptor is never replaced by a valid one with another
  output address, kind or memory type unless the entry was made invalid and a TLBI covering
  it completed in between;
* no lost update: a software write built from a snapshot of the entry (``ctx->old``) never
  drops an access flag or dirty state the hardware set after the snapshot was taken;
* no table page is read after it was freed (the walkers report such reads into
  ``reads_after_free``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Slot = tuple[int, int]
"""A descriptor's identity: (physical address of its table page, index). Table pages are
never reused in the model, so a slot names one entry for the whole run."""


@dataclass(frozen=True, slots=True)
class PteWrite:
    """One store to a descriptor. ``based_on`` is what the writer believed the entry held
    (the walker's snapshot; for the hardware's atomic update, the value it updated)."""

    slot: Slot
    ipa: int
    size: int
    """The IPA range the entry translates: [ipa, ipa + size)."""
    before: int
    after: int
    based_on: int
    actor: str
    """``software`` or ``hardware``."""
    shared: bool
    """Written by a walker that shares the tables with other software walkers."""


@dataclass(frozen=True, slots=True)
class Tlbi:
    """A completed TLB invalidation of [start, start + size), or of the whole VMID when
    ``size`` is None."""

    kind: str
    start: int
    size: int | None

    def covers(self, ipa: int, size: int) -> bool:
        if self.size is None:
            return True
        return self.start < ipa + size and ipa < self.start + self.size


@dataclass(frozen=True, slots=True)
class Cmo:
    """A cache maintenance operation on host physical memory (A5)."""

    kind: str
    """``dcache_clean_inval_poc`` or ``icache_inval_pou``."""
    pa: int
    size: int


Event = PteWrite | Tlbi | Cmo


@dataclass(slots=True)
class Stage2History:
    """The record, oldest first; the reads of freed table pages seen so far; and every
    WARN_ON the library hit (each one a finding: the kernel warns and carries on)."""

    events: list[Event] = field(default_factory=list)
    reads_after_free: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def writes_to(self, slot: Slot) -> list[PteWrite]:
        return [e for e in self.events if isinstance(e, PteWrite) and e.slot == slot]
