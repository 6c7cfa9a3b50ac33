"""White-box invariants of the arm64 stage-2 page tables (INVENTORY C.5, seed 001).

Two kinds of check. Over the tables as they are now: every table page's reference count
(A3), no freed table still linked (A3), and every leaf's size and alignment (A4) and, for
device memory, its execute permission (A6). Over the reference's record of what happened
(:class:`~kvmspec.reference.arm64.history.Stage2History`, every descriptor write, TLBI and
cache maintenance operation in order): break-before-make (A1), no hardware access-flag or
dirty update lost to a software write built from an older snapshot (seed 001), no table
page read after it was freed (seed 001's RCU half), no entry of an unlinked table written
by a walker that entered it after the unlink (A3, :class:`UnlinkedTables`), and the
library's WARN_ONs.

The record is the reference's own state, so these checks take it as an argument; the
reference never imports this module. ``check_stage2`` runs them all.

A third kind needs the VM around the tables: :func:`check_stage2_translations` holds the
leaves against the memslots and the host's page tables (M13, A4's memslot half, N4, D1)
and the vCPUs' TLBs against the leaves (A1, A7), between actions of the arm64 harness;
:func:`device_block_size` says which leaf a fault on device memory must install (A4).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from kvmspec.reference.arm64.descriptors import (
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_TYPE,
    MT_S2_DEVICE_nGnRE,
    field_get,
    genmask,
    kvm_pte_table,
    kvm_pte_to_phys,
    kvm_pte_valid,
    stage2_pte_is_counted,
    stage2_pte_is_locked,
)
from kvmspec.reference.arm64.history import Event, PteWrite, Slot, Stage2History, Tlbi
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.arm64.pgtable import KvmPgtable, TablePage
from kvmspec.reference.host import Device, HostMm, Vma
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.spec.invariants import Violation
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET

NO_LOST_UPDATE = "S001-NO-LOST-UPDATE"
RCU_TABLES = "S001-RCU-TABLES"

HARDWARE_MANAGED = KVM_PTE_LEAF_ATTR_LO_S2_AF | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
"""The bits the hardware walker sets: AF (with VTCR_EL2.HA) and W of a DBM descriptor
(with VTCR_EL2.HD)."""

BREAK_BITS = genmask(47, 12) | KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR | KVM_PTE_TYPE
"""What may not change in place: the output address (descriptor bits 47:12 with every
granule; with 64K they include PA bits 51:48), the memory type, and the kind (table or
block). Permissions, AF and the software bits may change in place."""


def _needs_break(old: int, new: int) -> bool:
    return bool((old ^ new) & BREAK_BITS)


def _where(slot: Slot) -> str:
    return f"entry {slot[0]:#x}[{slot[1]}]"


# -- the history ------------------------------------------------------------------------------


class RecordReader:
    """A check that reads the stage-2 record incrementally: each :meth:`_unread` hands out
    the events added since the last one, so a caller checking the same tables after every
    step reads each event once. ``found`` keeps every violation seen so far."""

    def __init__(self) -> None:
        self.read = 0
        self.found: list[Violation] = []

    def _unread(self, history: Stage2History) -> Iterator[tuple[int, Event]]:
        """(index, event) for each event of the record not read yet."""
        events = history.events
        start, self.read = self.read, len(events)
        return enumerate(events[start:], start)


class BreakBeforeMake(RecordReader):
    """A1: for each entry, a valid value is replaced by a valid one that needs a break only
    if, in between, the entry was made invalid and then a TLBI covering it completed.
    The record is read incrementally (:class:`RecordReader`).

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_try_break_pte, stage2_make_pte (v6.18)
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_valid: dict[Slot, int] = {}
        # Entries made invalid after being valid, not yet covered by a TLBI since.
        self.pending: dict[Slot, PteWrite] = {}
        self.broken: set[Slot] = set()

    def check(self, history: Stage2History) -> list[Violation]:
        for _, event in self._unread(history):
            if isinstance(event, Tlbi):
                self._tlbi(event)
            elif isinstance(event, PteWrite):
                self._write(event)
        return list(self.found)

    def _tlbi(self, event: Tlbi) -> None:
        for slot, write in list(self.pending.items()):
            if event.covers(write.ipa, write.size):
                self.broken.add(slot)
                del self.pending[slot]

    def _write(self, event: PteWrite) -> None:
        slot = event.slot
        if not kvm_pte_valid(event.after):
            if slot in self.last_valid and slot not in self.broken:
                self.pending.setdefault(slot, event)
            return
        old = self.last_valid.get(slot)
        if old is not None and slot not in self.broken and _needs_break(old, event.after):
            why = (
                "no invalid entry"
                if slot not in self.pending
                else "no TLBI after the invalid entry"
            )
            self.found.append(
                Violation(
                    "A1",
                    f"{_where(slot)} (IPA {event.ipa:#x}) went from {old:#x} to "
                    f"{event.after:#x} with {why} in between",
                )
            )
        self.last_valid[slot] = event.after
        self.pending.pop(slot, None)
        self.broken.discard(slot)


def check_break_before_make(history: Stage2History) -> list[Violation]:
    """A1 over the whole record (:class:`BreakBeforeMake`, read once)."""
    return BreakBeforeMake().check(history)


class LostHardwareUpdates(RecordReader):
    """Seed 001: a software write computed from a snapshot of the entry must not undo what
    the hardware set after the snapshot. Losing the dirty state of a DBM descriptor is
    always a bug (a write would go unlogged). Losing an access flag is what the kernel
    accepts from walkers that hold mmu_lock for write (stage2_attr_walker's comment: the
    worst case is a lost access flag update); a shared walker must not, which is why it
    uses cmpxchg (seed 001: RCU and cmpxchg make the lockless test-and-clear safe "against
    both the hardware and other software page table walkers"). The record is read
    incrementally (:class:`RecordReader`).

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_try_set_pte, stage2_attr_walker (v6.18)
    """

    def check(self, history: Stage2History) -> list[Violation]:
        for _, event in self._unread(history):
            if isinstance(event, PteWrite) and event.actor == "software":
                self._write(event)
        return list(self.found)

    def _write(self, event: PteWrite) -> None:
        if not kvm_pte_valid(event.before) or event.before == event.based_on:
            return
        set_since = event.before & ~event.based_on & HARDWARE_MANAGED
        lost = set_since & ~event.after
        if not event.shared:
            lost &= ~KVM_PTE_LEAF_ATTR_LO_S2_AF
        if not lost:
            return
        names = []
        if lost & KVM_PTE_LEAF_ATTR_LO_S2_AF:
            names.append("AF")
        if lost & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
            names.append("dirty (S2AP W of a DBM descriptor)")
        self.found.append(
            Violation(
                NO_LOST_UPDATE,
                f"a software write to {_where(event.slot)} (IPA {event.ipa:#x}) built "
                f"from {event.based_on:#x} overwrote {event.before:#x} with "
                f"{event.after:#x}, dropping {' and '.join(names)}",
            )
        )


def check_no_lost_hardware_updates(history: Stage2History) -> list[Violation]:
    """Seed 001's rule over the whole record (:class:`LostHardwareUpdates`, read once)."""
    return LostHardwareUpdates().check(history)


def check_no_reads_after_free(history: Stage2History) -> list[Violation]:
    """Seed 001's other half: a table page unlinked while walkers may be inside is freed
    only after an RCU grace period, so no walker (software or hardware) reads a freed page.

    kernel: arch/arm64/kvm/mmu.c:stage2_free_unlinked_table (v6.18)
    """
    return [Violation(RCU_TABLES, message) for message in history.reads_after_free]


Window = tuple[int, int]
"""A stretch of the record, [first event, end), during which several walkers ran at once."""


class UnlinkedTables(RecordReader):
    """A3's walker half: once an entry pointing at a table is overwritten, that table (and
    every table below it) is out of the tree, waiting for RCU to free it. A walker that
    replaced a table by a block steps over the new block; it never goes on into the table
    it unlinked, so nothing writes to an unlinked table. The one exception is a shared
    walker that was already inside the table when another walker unlinked it: its writes
    land in the dead table, harmlessly. So a write to an unlinked table is allowed only
    when the unlink and the write both fall in one of the ``concurrent`` windows of the
    record, where several walkers were interleaved; everywhere else walkers ran one at a
    time. The record is read incrementally (:class:`RecordReader`).

    kernel: arch/arm64/kvm/hyp/pgtable.c:__kvm_pgtable_visit, stage2_map_walk_table_pre
    (v6.18)
    """

    def __init__(self, pgt: KvmPgtable) -> None:
        super().__init__()
        geometry = pgt.geometry
        self.page_shift = geometry.page_shift
        self.levels = {
            geometry.kvm_granule_size(level): level
            for level in range(geometry.start_level, KVM_PGTABLE_LAST_LEVEL)
        }
        self.children: dict[int, set[int]] = {}
        self.unlinked: dict[int, int] = {}  # table page -> the event that took it out

    def _linked(self, pte: int, size: int) -> int | None:
        level = self.levels.get(size)
        if level is None or not kvm_pte_table(pte, level):
            return None
        return kvm_pte_to_phys(pte, self.page_shift)

    def check(self, history: Stage2History, concurrent: Sequence[Window]) -> list[Violation]:
        for index, event in self._unread(history):
            if isinstance(event, PteWrite):
                self._write(index, event, concurrent)
        return list(self.found)

    def _write(self, index: int, event: PteWrite, concurrent: Sequence[Window]) -> None:
        table = event.slot[0]
        when = self.unlinked.get(table)
        if when is not None and not any(start <= when < index < end for start, end in concurrent):
            self.found.append(
                Violation(
                    "A3",
                    f"{_where(event.slot)} (IPA {event.ipa:#x}) was written ({event.before:#x}"
                    f" -> {event.after:#x}) after its table was unlinked",
                )
            )
        old = self._linked(event.before, event.size)
        new = self._linked(event.after, event.size)
        if old == new:
            return
        if new is not None:
            self.children.setdefault(table, set()).add(new)
        if old is not None:
            self.children.get(table, set()).discard(old)
            todo = [old]
            while todo:
                gone = todo.pop()
                self.unlinked.setdefault(gone, index)
                todo += self.children.get(gone, ())


_UNNUMBERED_WARNINGS = {
    "map: no leaf fits a page": "A4",
    "test_clear_young: walk returned": NO_LOST_UPDATE,
}
"""The library's WARN_ONs whose message does not start with a rule id, and the rule each
one guards."""


def check_warnings(history: Stage2History) -> list[Violation]:
    """Every WARN_ON the library hit, under the rule it guards: a message starting with a
    rule id (``A2: ...``) is that rule's, the others are looked up in
    ``_UNNUMBERED_WARNINGS``; one in neither keeps its own tag."""
    found = []
    for message in history.warnings:
        head, sep, rest = message.partition(": ")
        if sep and head.startswith("A") and head[1:].isdigit():
            found.append(Violation(head, f"WARN: {rest}"))
            continue
        rule = next(
            (rule for prefix, rule in _UNNUMBERED_WARNINGS.items() if message.startswith(prefix)),
            head if sep else "WARN",
        )
        found.append(Violation(rule, f"WARN: {message}"))
    return found


# -- the tables -------------------------------------------------------------------------------


Tables = list[tuple[TablePage, int, int]]
"""Table pages reachable from the PGD: (page, level, IPA of its first entry)."""


def _reachable(pgt: KvmPgtable) -> Tables:
    """Every table page reachable from the PGD, with its level and the IPA its first entry
    translates, read without recording."""
    geometry = pgt.geometry
    pgd_span = geometry.ptrs_per_pte * geometry.kvm_granule_size(geometry.start_level)
    found: Tables = []
    todo = [(page, geometry.start_level, n * pgd_span) for n, page in enumerate(pgt.pgd or [])]
    while todo:
        page, level, base = todo.pop()
        found.append((page, level, base))
        granule = geometry.kvm_granule_size(level)
        for index, pte in page.entries.items():
            if kvm_pte_table(pte, level):
                pa = kvm_pte_to_phys(pte, geometry.page_shift)
                todo.append((pgt.mm_ops.pages[pa], level + 1, base + index * granule))
    return found


def check_table_refcounts(pgt: KvmPgtable, tables: Tables | None = None) -> list[Violation]:
    """A3: every live table page's count is 1 + its counted entries (a LOCKED entry is
    not counted: its old value's reference was dropped when it was locked).

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_pte_is_counted, stage2_try_break_pte,
    stage2_make_pte (v6.18)
    """
    found = []
    for page, level, _ in _reachable(pgt) if tables is None else tables:
        counted = sum(
            1
            for pte in page.entries.values()
            if stage2_pte_is_counted(pte) and not stage2_pte_is_locked(pte)
        )
        if page.refcount != 1 + counted:
            found.append(
                Violation(
                    "A3",
                    f"table {page.pa:#x} (level {level}) has refcount {page.refcount}, "
                    f"expected 1 + {counted}",
                )
            )
    return found


def check_no_freed_table_reachable(
    pgt: KvmPgtable, tables: Tables | None = None
) -> list[Violation]:
    """A3's consequence: a table is freed only once its count fell to 1 and it was
    unlinked, so a freed table page is never linked from the tree.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_unmap_walker (v6.18)
    """
    return [
        Violation("A3", f"table {page.pa:#x} (level {level}) is reachable but freed")
        for page, level, _ in (_reachable(pgt) if tables is None else tables)
        if page.freed
    ]


def check_leaves(pgt: KvmPgtable, leaves: Iterable[Leaf] | None = None) -> list[Violation]:
    """A4 and A6 for every valid leaf: a block sits only at a level that allows blocks,
    with its IPA and its output address aligned to its size; a leaf of device memory is
    never executable. ``leaves``: :func:`stage2_leaves` of the tables now, when the caller
    has them.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_block_mapping_supported,
    stage2_set_prot_attr (v6.18)
    """
    geometry = pgt.geometry
    found = []
    for ipa, size, pa, pte, level in stage2_leaves(pgt) if leaves is None else leaves:
        if not geometry.kvm_level_supports_block_mapping(level):
            found.append(Violation("A4", f"a block at level {level} (IPA {ipa:#x})"))
        if ipa % size or pa % size:
            found.append(
                Violation(
                    "A4",
                    f"level {level} leaf IPA {ipa:#x} -> PA {pa:#x} is not aligned to {size:#x}",
                )
            )
        device = field_get(KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR, pte) == MT_S2_DEVICE_nGnRE
        if device and not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN:
            found.append(Violation("A6", f"device memory at IPA {ipa:#x} is executable"))
    return found


# -- the tables against the memslots and the host ---------------------------------------------


class Leaf(NamedTuple):
    """A valid stage-2 leaf: [ipa, ipa + size) -> pa, with its descriptor and the level of
    its table. (A named tuple: the checks list every leaf after every step.)"""

    ipa: int
    size: int
    pa: int
    pte: int
    level: int


def stage2_leaves(pgt: KvmPgtable, tables: Tables | None = None) -> Iterator[Leaf]:
    """Every valid leaf reachable from the PGD, read without recording (``tables``: the
    reachable tables, when the caller has them)."""
    geometry = pgt.geometry
    for page, level, base in _reachable(pgt) if tables is None else tables:
        granule = geometry.kvm_granule_size(level)
        for index, pte in page.entries.items():
            if kvm_pte_valid(pte) and not kvm_pte_table(pte, level):
                pa = kvm_pte_to_phys(pte, geometry.page_shift)
                yield Leaf(base + index * granule, granule, pa, pte, level)


def writable(pte: int) -> bool:
    """Does the leaf grant write permission (S2AP W)?"""
    return bool(pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)


def check_stage2_translations(
    kvm: Kvm, mmu: Arm64Mmu, host: HostMm, leaves: Sequence[Leaf] | None = None
) -> list[Violation]:
    """The stage 2 against the memslots and the host, between actions (no fault, update or
    invalidation in flight):

    * M13: every leaf lies in a usable slot;
    * A4, the memslot half: a block lies wholly inside its slot, with gpa and hva congruent
      modulo its size, and is not writable in a dirty-logged slot (a logged slot is mapped
      with pages; a block from before logging started is write-protected, unless the
      bitmap started all set, when CLEAR protects it later);
    * N4: each page of a leaf is the page the host maps at the slot's hva, writable only
      if the host's PTE is and the slot is not READONLY;
    * D1: a writable leaf of a logged slot has its pages marked dirty;
    * A1: every vCPU TLB entry is a leaf of the tables (a TLB entry outliving its
      descriptor means a change without its TLBI), and writable only if the leaf is (A7:
      the write-protecting caller flushed).

    ``leaves``: :func:`stage2_leaves` of the tables now, when the caller has them.

    kernel: arch/arm64/kvm/mmu.c:user_mem_abort, kvm_arch_flush_shadow_memslot,
    kvm_mmu_wp_memory_region; virt/kvm/kvm_main.c:mark_page_dirty_in_slot (v6.18)
    """
    pgt = mmu.pgt
    if pgt is None:
        return []
    shift = kvm.profile.page_shift
    found = []
    by_ipa = {leaf.ipa: leaf for leaf in (stage2_leaves(pgt) if leaves is None else leaves)}
    initially_set = bool(kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)
    memslots = kvm.memslots(0)
    slot: KvmMemorySlot | None = None
    # A table's leaves come one after another: most lie in the slot and the VMA of the leaf
    # before.
    vma: Vma | None = None
    for leaf in by_ipa.values():
        gfn = leaf.ipa >> shift
        if slot is None or not slot.base_gfn <= gfn < slot.end_gfn:
            slot = memslots.gfn_to_memslot(gfn)
        if slot is None or slot.invalid:
            found.append(Violation("M13", f"{_named(leaf)} is mapped without a usable slot"))
            continue
        hva = slot.userspace_addr + ((gfn - slot.base_gfn) << shift)
        if leaf.size > kvm.profile.page_size:
            if leaf.ipa + leaf.size > slot.end_gfn << shift:
                found.append(Violation("A4", f"block {_named(leaf)} reaches beyond {slot}"))
            if hva % leaf.size:
                found.append(
                    Violation("A4", f"block {_named(leaf)} is not congruent with hva {hva:#x}")
                )
            if slot.dirty_logging and writable(leaf.pte) and not initially_set:
                found.append(Violation("A4", f"writable block {_named(leaf)} in logged {slot}"))
        if writable(leaf.pte) and slot.readonly:
            found.append(Violation("C-MMIO", f"{_named(leaf)} is writable in READONLY {slot}"))
        if vma is None or not vma.start <= hva < vma.end:
            vma = host.find_vma(hva)
        _against_host(kvm, host, leaf, slot, hva, vma, found)
    for vcpu_id, tlb in pgt.mmu.tlbs.items():
        for entry in tlb.values():
            cached = by_ipa.get(entry.ipa)
            if cached is None or cached.pa != entry.pa or cached.size != entry.size:
                found.append(
                    Violation(
                        "A1",
                        f"vcpu {vcpu_id} TLB holds IPA {entry.ipa:#x} -> "
                        f"{entry.pa:#x}, which no descriptor maps",
                    )
                )
            elif writable(entry.pte) and not writable(cached.pte):
                found.append(
                    Violation(
                        "A7",
                        f"vcpu {vcpu_id} TLB holds IPA {entry.ipa:#x} writable "
                        "after it was write-protected and flushed",
                    )
                )
    return found


def _named(leaf: Leaf) -> str:
    """How a violation names a leaf (built only when there is one to report)."""
    return f"IPA {leaf.ipa:#x} (size {leaf.size:#x})"


def _against_host(
    kvm: Kvm,
    host: HostMm,
    leaf: Leaf,
    slot: KvmMemorySlot,
    hva: int,
    vma: Vma | None,
    found: list[Violation],
) -> None:
    """N4 and D1 for each page of one leaf (``vma``: the VMA holding ``hva``, or None),
    appended to ``found``."""
    page_size = kvm.profile.page_size
    bitmap = slot.dirty_bitmap
    if writable(leaf.pte) and slot.dirty_logging and bitmap is not None:
        first = (leaf.ipa >> kvm.profile.page_shift) - slot.base_gfn
        clean = [n for n in range(leaf.size // page_size) if not bitmap.test_bit(first + n)]
        if clean:
            found.append(
                Violation("D1", f"{_named(leaf)} is writable, page {first + clean[0]} clean")
            )
    if kvm.mmu_invalidate_in_progress:
        return
    if vma is not None and isinstance(vma.backing, Device) and hva + leaf.size <= vma.end:
        # Device memory is mapped linearly across its VMA, whether or not the model's host
        # has filled a PTE for each page yet (it does so on first touch).
        pfn = vma.backing.first_pfn + vma.index(hva, page_size)
        if leaf.pa // page_size != pfn:
            found.append(
                Violation("N4", f"{_named(leaf)} maps {leaf.pa:#x}, the VMA maps pfn {pfn:#x}")
            )
        elif writable(leaf.pte) and not host.writable(vma, pfn):
            found.append(Violation("N4", f"{_named(leaf)} is writable over a read-only device VMA"))
        return
    # A block exactly over a host huge page that no small page of the host shadows: the
    # PMD maps the pages in order, so its first page answers for all of them.
    huge = leaf.size == host.hpage_size and hva % host.hpage_size == 0
    whole = huge and hva in host.pmds and not host.keys_in(host.ptes, hva, hva + leaf.size)
    for offset in range(0, page_size if whole else leaf.size, page_size):
        host_pte = host.translate(hva + offset)
        pfn = (leaf.pa + offset) // page_size
        if host_pte is None or host_pte[0] != pfn:
            held = host_pte[0] if host_pte is not None else None
            found.append(Violation("N4", f"{_named(leaf)} maps pfn {pfn:#x}, the host maps {held}"))
            break
        if writable(leaf.pte) and not host_pte[1]:
            found.append(Violation("N4", f"{_named(leaf)} is writable over a read-only host page"))
            break


def device_block_size(host: HostMm, slot: KvmMemorySlot, gpa: int) -> int:
    """A4 for device memory (a VM_PFNMAP VMA) in a slot that does not log dirty pages: the
    size of the leaf a fault at ``gpa`` installs. It is the largest block (a PUD's 1 GiB,
    else a PMD's 2 MiB) whose aligned range around the address lies wholly inside the slot
    and inside the VMA, with the gpa, the hva and the physical address agreeing modulo its
    size; else a page. (The kernel checks the VMA's end against the address rounded up to
    the block, which says the same whenever, as here, the slot lies inside the VMA.)

    kernel: arch/arm64/kvm/mmu.c:get_vma_page_shift, fault_supports_stage2_huge_mapping,
    user_mem_abort (v6.18)
    """
    page_size = host.page_size
    shift = page_size.bit_length() - 1
    gpa -= gpa % page_size
    hva = slot.userspace_addr + gpa - (slot.base_gfn << shift)
    vma = host.find_vma(hva)
    assert vma is not None and isinstance(vma.backing, Device), f"no device at {hva:#x}"
    pa = (vma.backing.first_pfn + vma.index(hva, page_size)) * page_size
    slot_start = slot.base_gfn << shift
    slot_end = slot.end_gfn << shift
    for size in (host.hpage_size * host.hpage_nr, host.hpage_size):
        block, block_hva = gpa - gpa % size, hva - hva % size
        if (gpa - hva) % size or (hva - pa) % size:
            continue
        in_slot = slot_start <= block and block + size <= slot_end
        if in_slot and vma.start <= block_hva and block_hva + size <= vma.end:
            return size
    return page_size


def installed_leaves(pgt: KvmPgtable, since: int, ipa: int) -> list[int]:
    """The sizes of the leaves covering ``ipa`` that were installed (written valid over an
    invalid entry) from event ``since`` of the record on, oldest first."""
    geometry = pgt.geometry
    sizes = []
    for event in pgt.mm_ops.history.events[since:]:
        if not isinstance(event, PteWrite) or not event.ipa <= ipa < event.ipa + event.size:
            continue
        if kvm_pte_valid(event.before) or not kvm_pte_valid(event.after):
            continue
        level = KVM_PGTABLE_LAST_LEVEL
        while geometry.kvm_granule_size(level) < event.size:
            level -= 1
        if not kvm_pte_table(event.after, level):
            sizes.append(event.size)
    return sizes


class Stage2Readers:
    """The checks that read the record incrementally (A1, seed 001's lost updates, A3's
    unlinked tables), kept by a caller that checks the same tables after every step so that
    each event is read once, not once per step."""

    def __init__(self, pgt: KvmPgtable) -> None:
        self.break_before_make = BreakBeforeMake()
        self.lost_updates = LostHardwareUpdates()
        self.unlinked = UnlinkedTables(pgt)

    def check(self, history: Stage2History, concurrent: Sequence[Window]) -> list[Violation]:
        return [
            *self.break_before_make.check(history),
            *self.lost_updates.check(history),
            *self.unlinked.check(history, concurrent),
        ]


def check_stage2(
    pgt: KvmPgtable,
    concurrent: Sequence[Window] = (),
    readers: Stage2Readers | None = None,
    leaves: Sequence[Leaf] | None = None,
) -> list[Violation]:
    """Every stage-2 invariant above, over the tables and their history (``concurrent``:
    the windows of the record where walkers were interleaved; ``readers``: the incremental
    checks a caller checking the same tables again and again keeps; ``leaves``: the
    tables' leaves now, when the caller has listed them)."""
    history = pgt.mm_ops.history
    readers = readers if readers is not None else Stage2Readers(pgt)
    tables = _reachable(pgt)
    return [
        *readers.check(history, concurrent),
        *check_no_reads_after_free(history),
        *check_warnings(history),
        *check_table_refcounts(pgt, tables),
        *check_no_freed_table_reachable(pgt, tables),
        *check_leaves(pgt, stage2_leaves(pgt, tables) if leaves is None else leaves),
    ]
