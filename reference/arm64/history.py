"""What happened to the stage-2 tables, in order, and the rules over that record.

Every write to a descriptor (by software or by the hardware walker) and every TLB
invalidation is appended to one :class:`Stage2History`, in the order they happened. The
rules of INVENTORY C.5 and seed 001 are then questions about that record:

* A1, break-before-make: a valid descriptor is never replaced by a valid one with another
  output address, kind or memory type unless the entry was made invalid and a TLBI covering
  it completed in between (:func:`check_break_before_make`);
* no lost update: a software write built from a snapshot of the entry (``ctx->old``) never
  drops an access flag or dirty state the hardware set after the snapshot was taken
  (:func:`check_no_lost_hardware_updates`);
* no table page is read after it was freed (the walkers report such reads into
  ``reads_after_free``).

The table-shape rules (A3 reference counts, no freed table reachable) need the tables
themselves and live in :mod:`~kvmspec.reference.arm64.pgtable`.

These checks belong with the white-box invariants (``spec/invariants/``); they sit here
until that package has an arm64 module, because the record is the reference's own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.reference.arm64.descriptors import (
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_TYPE,
    genmask,
    kvm_pte_valid,
)

Slot = tuple[int, int]
"""A descriptor's identity: (physical address of its table page, index). Table pages are
never reused in the model, so a slot names one entry for the whole run."""

HARDWARE_MANAGED = KVM_PTE_LEAF_ATTR_LO_S2_AF | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
"""The bits the hardware walker sets: AF (with VTCR_EL2.HA) and W of a DBM descriptor
(with VTCR_EL2.HD)."""


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


_BREAK_BITS = genmask(47, 12) | KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR | KVM_PTE_TYPE
"""What may not change in place: the output address (descriptor bits 47:12 with every
granule; with 64K they include PA bits 51:48), the memory type, and the kind (table or
block). Permissions, AF and the software bits may change in place."""


def _needs_break(old: int, new: int) -> bool:
    return bool((old ^ new) & _BREAK_BITS)


def check_break_before_make(history: Stage2History) -> list[str]:
    """A1: for each entry, a valid value is replaced by a valid one that needs a break only
    if, in between, the entry was made invalid and then a TLBI covering it completed.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_try_break_pte, stage2_make_pte (v6.18)
    """
    last_valid: dict[Slot, int] = {}
    # Entries made invalid after being valid, not yet covered by a TLBI since.
    pending: dict[Slot, PteWrite] = {}
    broken: set[Slot] = set()
    found = []
    for event in history.events:
        if isinstance(event, Tlbi):
            for slot, write in list(pending.items()):
                if event.covers(write.ipa, write.size):
                    broken.add(slot)
                    del pending[slot]
            continue
        if not isinstance(event, PteWrite):
            continue
        slot = event.slot
        if not kvm_pte_valid(event.after):
            if slot in last_valid and slot not in broken:
                pending.setdefault(slot, event)
            continue
        old = last_valid.get(slot)
        if old is not None and slot not in broken and _needs_break(old, event.after):
            why = "no invalid entry" if slot not in pending else "no TLBI after the invalid entry"
            found.append(
                f"A1: entry {slot[0]:#x}[{slot[1]}] (IPA {event.ipa:#x}) went from "
                f"{old:#x} to {event.after:#x} with {why} in between"
            )
        last_valid[slot] = event.after
        pending.pop(slot, None)
        broken.discard(slot)
    return found


def check_no_lost_hardware_updates(history: Stage2History) -> list[str]:
    """Seed 001: a software write computed from a snapshot of the entry must not undo what
    the hardware set after the snapshot. Losing the dirty state of a DBM descriptor is
    always a bug (a write would go unlogged). Losing an access flag is what the kernel
    accepts from walkers that hold mmu_lock for write ("worst-case the access flag update
    gets lost", stage2_attr_walker); a shared walker must not, which is why it uses
    cmpxchg (seed 001: RCU and cmpxchg make the lockless test-and-clear safe "against both
    the hardware and other software page table walkers").

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_try_set_pte, stage2_attr_walker (v6.18)
    """
    found = []
    for event in history.events:
        if not isinstance(event, PteWrite) or event.actor != "software":
            continue
        if not kvm_pte_valid(event.before) or event.before == event.based_on:
            continue
        set_since = event.before & ~event.based_on & HARDWARE_MANAGED
        lost = set_since & ~event.after
        if not event.shared:
            lost &= ~KVM_PTE_LEAF_ATTR_LO_S2_AF
        if lost:
            names = []
            if lost & KVM_PTE_LEAF_ATTR_LO_S2_AF:
                names.append("AF")
            if lost & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
                names.append("dirty (S2AP W of a DBM descriptor)")
            found.append(
                f"lost update: a software write to {event.slot[0]:#x}[{event.slot[1]}] "
                f"(IPA {event.ipa:#x}) built from {event.based_on:#x} overwrote "
                f"{event.before:#x} with {event.after:#x}, dropping {' and '.join(names)}"
            )
    return found
