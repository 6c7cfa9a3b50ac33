"""The black-box dirty-log contract: every write is reported, from outside.

Stated over operations and observations only (it imports nothing from the reference), so it
judges any implementation that reports guest writes and dirty-log harvests:

* **completeness** (C-DIRTY-COMPLETE, D1): a store to a dirty-logged slot is reported by a
  later harvest: by the next KVM_GET_DIRTY_LOG (every GET until a CLEAR covers it, with
  manual protection), or, in a VM with dirty rings, by the rings harvested before the next
  KVM_RESET_DIRTY_RINGS. Reporting a page that was not written is allowed, as the kernel's
  own dirty_log_test allows it: the contract only asks for a superset.
* **initially set** (D5): with manual protection and
  KVM_DIRTY_LOG_INITIALLY_SET, a new bitmap reports every page until userspace clears it.
* **ring entries** (D11): an entry names its slot as (as_id << 16) | id
  and its page as an offset from the slot's base, so it decodes to a slot that was
  dirty-logged, at an offset inside it.

Where a write is recorded depends on who made it: a vCPU's writes go to its ring when the VM
uses rings; writes with no vCPU (arm64 saving ITS tables) go to the bitmap.

A ring write is only required once every vCPU's ring has been harvested after it: until then
the entry may sit in a ring nobody has read yet. Not required at all (a known kernel finding,
corpus/conformance/x86_64-linux-6.18-pvm/s4-dirty-ring-initially-set-loses-a-write.jsonl):
a vCPU's store to a slot whose logging started while a ring VM held
KVM_DIRTY_LOG_INITIALLY_SET. Turning logging on then write-protects nothing (x86
kvm_mmu_slot_apply_flags, arm64 kvm_arch_commit_memory_region: the "initially all set"
bitmap is trusted, and a ring VM has none), so a page mapped writable before logging is
written without an entry, on this machine's kernel too. A write that lands between a harvest that
already reported its page and the reset is covered by that report: the reset re-protects the
page, and userspace copies harvested pages after the reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.spec.contracts import ContractViolation, MemslotUapiContract
from kvmspec.spec.uapi.constants import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
)
from kvmspec.spec.uapi.dirty_log_rules import BITS_PER_LONG, uses_dirty_bitmap

SlotKey = tuple[int, int]
"""(as_id, slot id)."""


def _first_unreported(bitmap: list[int], npages: int, cleared: set[int]) -> int | None:
    """The first page of ``npages`` that ``bitmap`` leaves clean although it is not in
    ``cleared``, or None. Word by word: an all-ones word settles 64 pages at once, and only
    clean bits are looked at one by one, so a terabyte slot costs its bitmap's length (what
    the ioctl copied out anyway), not a step per page."""
    for index in range(-(-npages // BITS_PER_LONG)):
        first = index * BITS_PER_LONG
        valid = (1 << min(BITS_PER_LONG, npages - first)) - 1
        clean = ~(bitmap[index] if index < len(bitmap) else 0) & valid
        while clean:
            bit = (clean & -clean).bit_length() - 1
            if first + bit not in cleared:
                return first + bit
            clean &= clean - 1
    return None


@dataclass
class DirtyLogContract:
    """What must be reported, by slot and page offset."""

    memslots: MemslotUapiContract
    clock: int = 0
    bitmap_pending: dict[SlotKey, dict[int, int]] = field(default_factory=dict)
    """Offsets written since they were last reported (or cleared), with the time of the
    first such write: what the next GET must report."""
    ring_pending: dict[SlotKey, dict[int, int]] = field(default_factory=dict)
    """The same for writes made by vCPUs in a VM with rings."""
    ring_harvested: dict[SlotKey, set[int]] = field(default_factory=dict)
    """Offsets reported by ring harvests since the last reset."""
    last_harvest: dict[int, int] = field(default_factory=dict)
    """vCPU id -> time of its last ring harvest."""
    logged: dict[SlotKey, int] = field(default_factory=dict)
    """Slots with LOG_DIRTY_PAGES now, and their npages."""
    ring_valid: dict[SlotKey, int] = field(default_factory=dict)
    """Slots ever dirty-logged, and their largest npages. (An entry a reset did not consume
    stays in the ring, however long ago its slot changed.)"""
    not_cleared: dict[SlotKey, set[int]] = field(default_factory=dict)
    """For bitmaps allocated all ones (INITIALLY_SET): the offsets cleared since."""
    ring_unreset: int = 0
    """Ring entries harvested (flagged RESET by userspace) and not consumed by a reset yet."""
    ring_unprotected: set[SlotKey] = field(default_factory=set)
    """Logged slots whose logging started in a ring VM under INITIALLY_SET: KVM protected
    nothing, so their ring stores are not owed (the known kernel finding above)."""

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _slot_of(self, gpa: int) -> tuple[SlotKey, int, int] | None:
        """(key, page offset, flags) of the slot of ``gpa`` in address space 0."""
        gfn = gpa >> self.memslots.profile.page_shift
        for key, view in self.memslots.slots.items():
            if key[0] == 0 and view.base_gfn <= gfn < view.base_gfn + view.npages:
                return key, gfn - view.base_gfn, view.flags
        return None

    # -- writes -------------------------------------------------------------------------------

    def on_guest_store(self, gpa: int, vcpu: int | None, completed: bool) -> None:
        """A store by vCPU ``vcpu`` (None: KVM itself with no vCPU running) that completed
        (it reached memory; an MMIO exit or a refused access did not)."""
        found = self._slot_of(gpa)
        if not completed or found is None:
            return
        key, offset, flags = found
        if not flags & KVM_MEM_LOG_DIRTY_PAGES or flags & KVM_MEM_READONLY:
            return
        to_ring = bool(self.memslots.ring_size) and vcpu is not None
        if to_ring and key in self.ring_unprotected:
            return
        if not to_ring and not self._uses_bitmap():
            return  # a ring VM without a backup bitmap has nowhere to put it (D10)
        pending = self.ring_pending if to_ring else self.bitmap_pending
        pending.setdefault(key, {}).setdefault(offset, self._tick())

    def _uses_bitmap(self) -> bool:
        return uses_dirty_bitmap(bool(self.memslots.ring_size), self.memslots.ring_with_bitmap)

    # -- memslot changes ----------------------------------------------------------------------

    def on_memslot_update_start(self, key: SlotKey, npages: int, flags: int) -> None:
        """A KVM_SET_USER_MEMORY_REGION(2) asking for ``flags`` has started: a logged slot
        takes effect before the ioctl returns, so ring entries for it are valid from now."""
        if flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.ring_valid[key] = max(self.ring_valid.get(key, 0), npages)

    def on_memslots_changed(self) -> None:
        """After a successful KVM_SET_USER_MEMORY_REGION(2): a slot that stopped logging (or
        is gone) loses its bitmap and what it owed; a slot that started gets a new bitmap,
        all ones under INITIALLY_SET. MOVE and flags changes that keep logging keep it."""
        now = {
            key: view.npages
            for key, view in self.memslots.slots.items()
            if view.flags & KVM_MEM_LOG_DIRTY_PAGES
        }
        for key in set(self.logged) - set(now):
            self.bitmap_pending.pop(key, None)
            self.not_cleared.pop(key, None)
            self.ring_unprotected.discard(key)
        initially_set = self.memslots.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET
        for key in set(now) - set(self.logged):
            if initially_set and self._uses_bitmap():
                self.not_cleared[key] = set()
            if initially_set and self.memslots.ring_size:
                self.ring_unprotected.add(key)
        for key, npages in now.items():
            self.ring_valid[key] = max(self.ring_valid.get(key, 0), npages)
        self.logged = now

    # -- harvests -----------------------------------------------------------------------------

    def now(self) -> int:
        """The contract's clock: pass it as ``since`` when a harvest starts."""
        return self._tick()

    def on_get_dirty_log(
        self, slot: int, bitmap: list[int], since: int | None = None
    ) -> list[ContractViolation]:
        """A KVM_GET_DIRTY_LOG that succeeded with ``bitmap`` (64-bit words). ``since`` is
        :meth:`now` when the ioctl started, if stores ran while it was in flight: only
        stores before it are owed by this report (a later one may land either side of the
        harvest; if this report missed it, the next one owes it)."""
        started = self._tick() if since is None else since
        key = (slot >> 16, slot & 0xFFFF)

        def reported(offset: int) -> bool:
            word = offset // BITS_PER_LONG
            return word < len(bitmap) and bool(bitmap[word] >> offset % BITS_PER_LONG & 1)

        violations = [
            ContractViolation(
                "C-DIRTY-COMPLETE", f"slot {slot:#x} page {offset} written, not reported"
            )
            for offset, when in sorted(self.bitmap_pending.get(key, {}).items())
            if when < started and not reported(offset)
        ]
        cleared = self.not_cleared.get(key)
        if cleared is not None:
            missing = _first_unreported(bitmap, self.logged.get(key, 0), cleared)
            if missing is not None:
                violations.append(
                    ContractViolation(
                        "D5",
                        f"slot {slot:#x} page {missing} never cleared, but reported clean",
                    )
                )
        if not self.memslots.manual_protect:
            # Get-and-clear: what was reported is owed again only if written again, and an
            # all-ones bitmap (manual protection was switched off since) is all zeroes now.
            self.not_cleared.pop(key, None)
            pending = self.bitmap_pending.get(key, {})
            for offset in [offset for offset in pending if reported(offset)]:
                del pending[offset]
        return violations

    def on_clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, user_bitmap: list[int]
    ) -> None:
        """A KVM_CLEAR_DIRTY_LOG that succeeded: the selected pages are owed no more."""
        self._tick()
        key = (slot >> 16, slot & 0xFFFF)
        pending = self.bitmap_pending.get(key, {})
        cleared = self.not_cleared.get(key)
        for index, word in enumerate(user_bitmap):
            bit = 0
            while word >> bit:
                offset = first_page + index * BITS_PER_LONG + bit
                if word >> bit & 1 and offset < first_page + num_pages:
                    pending.pop(offset, None)
                    if cleared is not None:
                        cleared.add(offset)
                bit += 1

    def on_harvest_ring(self, vcpu: int, entries: list[tuple[int, int]]) -> list[ContractViolation]:
        """Userspace read vCPU ``vcpu``'s ring: ``entries`` are (slot, offset) pairs."""
        self.last_harvest[vcpu] = self._tick()
        self.ring_unreset += len(entries)
        violations = []
        for slot, offset in entries:
            key = (slot >> 16, slot & 0xFFFF)
            npages = self.ring_valid.get(key)
            if npages is None or offset >= npages:
                violations.append(
                    ContractViolation(
                        "D11",
                        f"entry slot {slot:#x} offset {offset} names no page of a logged slot",
                    )
                )
                continue
            self.ring_harvested.setdefault(key, set()).add(offset)
        return violations

    def on_reset_dirty_rings(self, cleared: int, settled: bool = True) -> list[ContractViolation]:
        """A KVM_RESET_DIRTY_RINGS that succeeded and returned ``cleared``: every write older
        than the oldest harvest must have been harvested by now; what was harvested is owed no
        more. The count is the entries the reset consumed, which are the harvested ones (D9):
        never more than were harvested, and all of them once no other reset is in flight
        (``settled``; overlapping resets share them, and nothing harvests meanwhile)."""
        self._tick()
        self.ring_unreset -= cleared
        counted = []
        if self.ring_unreset < 0 or (settled and self.ring_unreset):
            counted.append(
                ContractViolation(
                    "D9",
                    f"KVM_RESET_DIRTY_RINGS returned {cleared}; harvested and not reset before "
                    f"it: {self.ring_unreset + cleared}",
                )
            )
            self.ring_unreset = 0
        vcpus = self.memslots.vcpus
        horizon = min((self.last_harvest.get(v, 0) for v in vcpus), default=0)
        violations = [
            ContractViolation(
                "C-DIRTY-COMPLETE",
                f"slot {key[0] << 16 | key[1]:#x} page {offset} written, no ring reported it",
            )
            for key, pending in sorted(self.ring_pending.items())
            for offset, when in sorted(pending.items())
            if when < horizon and offset not in self.ring_harvested.get(key, set())
        ]
        for key, offsets in self.ring_harvested.items():
            pending = self.ring_pending.get(key, {})
            for offset in offsets:
                pending.pop(offset, None)
        self.ring_harvested.clear()
        return counted + violations
