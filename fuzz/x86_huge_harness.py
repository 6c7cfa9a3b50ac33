"""The ``huge`` layout of the x86 shadow-MMU harness: one VM on the shadow MMU with a
THP-capable slot of two 2 MiB frames, three guest processes whose page directories map frame 0
with one 2M page (B's and C's directories live inside that page: seed 002), and two vCPUs.

The actions: guest loads and stores in the 2M page, emulated and failing stores to the
shadowed tables inside it, the guest switching its PD entry between the 2M page and a 4K
table, THP collapse and split, khugepaged, MADV_DONTNEED, reclaim, LOG toggles, harvests and
clears (with INITIALLY_SET or without), and host migration of a page (the whole THP when
frame 0 is one). The checks and the drivers are those of :mod:`kvmspec.fuzz.x86_harness`,
which holds the ``shadow`` layout.
"""

from __future__ import annotations

from kvmspec.fuzz.generic_harness import Log, RulesBroken
from kvmspec.fuzz.x86_harness import (
    HPAGE,
    PAGE,
    PS,
    PTE,
    RW,
    VCPUS,
    _ignore,
    _x86_shadow,
    leaves_follow_guest_ptes,
)
from kvmspec.reference import kvm_main
from kvmspec.reference.capabilities import kvm_vm_ioctl_enable_cap
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import kvm_clear_dirty_log_protect, kvm_get_dirty_log_protect
from kvmspec.reference.host import HostMm
from kvmspec.reference.host_reclaim import Reclaim
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.reference.x86.guest_access import (
    Outcome,
    ShadowAccess,
    guest_instruction,
)
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
)
from kvmspec.reference.x86.paging import (
    PG_LEVEL_4K,
)
from kvmspec.reference.x86.roots import kvm_set_cr3
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import (
    LEGACY_MASKS_HERE,
    is_large_pte,
    is_shadow_present_pte,
)
from kvmspec.spec.invariants.x86 import check_shadow_mmu
from kvmspec.spec.platforms import DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_MEM_LOG_DIRTY_PAGES,
    U64_MAX,
)
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

HUGE_SLOT_PAGES = 1024
"""Slot 0: gpa 0, two 2M frames. Frame 0 is data; frame 1 holds most of the tables."""
PML4_A, PDPT_A, PD_A, PT_A, PT_SPLIT = 512, 513, 514, 515, 520
"""Process A: its PD maps gva [0, 2M) with one 2M page (gfn 0..511) and gva [2M, 4M)
with the PT, 4K by 4K onto frame 1 (so the guest can write its own tables)."""
PML4_B, PDPT_B, PD_B = 516, 517, 4
"""Process B maps the same, but its PD lives at gfn 4, inside A's 2M page (seed 002)."""
PML4_C, PDPT_C, PD_C = 518, 519, 8
"""Process C too, with its PD at gfn 8: writing gfn 8 writes the table on its own path
(seed 002, step 7)."""

HUGE_PAGES = tuple(range(512))
"""The 4K pages of the 2M guest page; :meth:`HugeHarness.is_data_page` says which hold data."""
HUGE_PML4S = (PML4_A, PML4_B, PML4_C)
TABLES_IN_THE_HUGE_PAGE = (PD_B, PD_C)
RECLAIMED = (Reclaim.REFERENCED, Reclaim.SWAPPED_OUT, Reclaim.SKIPPED)
"""What reclaim may do with a page of the 2M guest page: keep it because it was used, swap
it out, or skip it (never faulted in). Kept busy or in the swap cache would mean someone,
KVM say, still holds a reference between guest accesses."""


def table_gva(gfn: int) -> int:
    """Where every process sees a table page: frame 1 through the PT, frame 0 directly."""
    return (gfn - 512) * PAGE + HPAGE if gfn >= 512 else gfn * PAGE


class HugeHarness:
    """One VM on the shadow MMU, with a THP-capable slot and three guest processes (the
    ``huge`` layout); ``log`` receives one line per access worth reading in a report."""

    def __init__(self, profile: PlatformProfile = DEFAULT_PROFILE, log: Log = _ignore) -> None:
        self.profile = _x86_shadow(profile)
        self.log = log
        self.host = HostMm(PAGE, profile.user_address_limit)
        self.mmu = ShadowMmu(LEGACY_MASKS_HERE, self.host)
        self.kvm = Kvm(profile, self.mmu)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.hva = self.host.mmap(HUGE_SLOT_PAGES * PAGE, RW)
        assert self.hva % HPAGE == 0
        assert self.host.madvise_hugepage(self.hva, HUGE_SLOT_PAGES * PAGE) == 0
        assert self.set_flags(0) == 0
        for pml4, pdpt, pd in (
            (PML4_A, PDPT_A, PD_A),
            (PML4_B, PDPT_B, PD_B),
            (PML4_C, PDPT_C, PD_C),
        ):
            self.write_table(pml4, 0, pdpt * PAGE | PTE)
            self.write_table(pdpt, 0, pd * PAGE | PTE)
            self.write_table(pd, 0, PTE | PS)  # gva [0, 2M) -> gfn 0..511, one 2M page
            self.write_table(pd, 1, PT_A * PAGE | PTE)
        # Whole tables in one write each: every run of the fuzzer starts here.
        self.write_whole_table(PT_A, [(512 + i) * PAGE | PTE for i in range(512)])
        self.write_whole_table(PT_SPLIT, [i * PAGE | PTE for i in range(512)])
        assert self.host.madvise_collapse(self.hva, HPAGE) == 0  # frame 0 becomes a THP
        for vcpu_id in VCPUS:
            assert kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id) == 0
            self.set_cr3(vcpu_id, PML4_A)
        self.found: list[str] = []
        self.checks = 0

    # -- the VMM and the guest, as scenarios use them --------------------------------------------

    def set_flags(self, flags: int) -> int:
        region = MemoryRegion(0, flags, 0, HUGE_SLOT_PAGES * PAGE, self.hva)
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def write_table(self, gfn: int, index: int, value: int) -> None:
        data = value.to_bytes(8, "little")
        assert self.host.host_write(self.hva + gfn * PAGE + 8 * index, data) == 0

    def write_whole_table(self, gfn: int, entries: list[int]) -> None:
        """The VMM writes all 512 entries of a guest page table."""
        data = b"".join(entry.to_bytes(8, "little") for entry in entries)
        assert self.host.host_write(self.hva + gfn * PAGE, data) == 0

    def set_cr3(self, vcpu_id: int, pml4: int) -> None:
        kvm_set_cr3(self.kvm, self.mmu, self.mmu.vcpu_mmu(vcpu_id), pml4 * PAGE)

    def read(self, gva: int, vcpu_id: int = 0) -> ShadowAccess:
        return guest_instruction(self.kvm, self.host, vcpu_id, gva, None, 8)

    def write(
        self, gva: int, data: bytes, vcpu_id: int = 0, emulatable: bool = True
    ) -> ShadowAccess:
        return guest_instruction(
            self.kvm, self.host, vcpu_id, gva, data, rip=0x1000, emulatable=emulatable
        )

    def leaf(self, vcpu_id: int, gva: int) -> tuple[int, int] | None:
        """(level, SPTE) of the leaf the vCPU's shadow tables hold for ``gva``."""
        sp: KvmMmuPage | None = self.mmu.vcpu_mmu(vcpu_id).root.sp
        while sp is not None:
            spte = sp.spt.get((gva >> (12 + 9 * (sp.role.level - 1))) & 511, 0)
            if not is_shadow_present_pte(spte):
                return None
            if sp.role.level == PG_LEVEL_4K or is_large_pte(spte):
                return sp.role.level, spte
            sp = self.mmu.spte_to_child_sp(spte)
        return None

    def violations(self) -> list[str]:
        return [
            *(str(v) for v in check_shadow_mmu(self.kvm, self.mmu, self.host)),
            *(str(v) for v in leaves_follow_guest_ptes(self.kvm, self.mmu, self.host)),
        ]

    def _expect(self, holds: bool, what: str) -> None:
        if not holds:
            self.found.append(f"COHERENCE: {what}")

    @staticmethod
    def is_data_page(i: int) -> bool:
        """Whether page ``i`` of the 2M page holds data, not B's or C's page directory
        (which only :meth:`guest_write_table_in_the_huge_page` writes)."""
        return i not in TABLES_IN_THE_HUGE_PAGE

    # -- the actions --------------------------------------------------------------------------

    def switch_cr3(self, vcpu: int, pml4: int) -> None:
        self.set_cr3(vcpu, pml4)

    def guest_read(self, vcpu: int, i: int, offset: int) -> None:
        """An 8-byte load at ``offset`` of data page ``i`` of the 2M page."""
        access = self.read(i * PAGE + offset, vcpu)
        self.log(f"vcpu {vcpu} load page {i} + {offset:#x} -> {access}")
        held = self.host.host_read(self.hva + i * PAGE + offset, 8)[1]
        self._expect(
            access.outcome is Outcome.DONE and access.data == held,
            f"{access}: the host holds {held!r} at gfn {i:#x}",
        )

    def guest_write(self, vcpu: int, i: int, byte: int) -> None:
        """A one-byte store of ``byte`` at offset ``byte`` of data page ``i``."""
        access = self.write(i * PAGE + byte, bytes([byte]), vcpu)
        self.log(f"vcpu {vcpu} store {byte} to page {i} -> {access}")
        held = self.host.host_read(self.hva + i * PAGE + byte, 1)[1]
        self._expect(
            access.outcome is Outcome.DONE and held == bytes([byte]),
            f"{access}: the host holds {held!r} at gfn {i:#x}",
        )

    def guest_write_table_in_the_huge_page(
        self, vcpu: int, table: int, entry: int, emulatable: bool
    ) -> None:
        """A store to an unused entry of B's or C's PD: emulated, or the emulator fails
        and KVM unprotects and retries (seed 002); it ends either way."""
        access = self.write(table * PAGE + 8 * entry, bytes(8), vcpu, emulatable)
        self.log(f"vcpu {vcpu} store to table {table} entry {entry} -> {access}")
        self._expect(
            access.outcome in (Outcome.DONE, Outcome.EMULATION_FAILED),
            f"table {table} entry {entry}: {access}",
        )

    def guest_remap_2m(self, vcpu: int, huge: bool) -> None:
        """Process A's PD entry 0: the 2M page, or a 4K table mapping the same gfns."""
        value = PTE | PS if huge else PT_SPLIT * PAGE | PTE
        access = self.write(table_gva(PD_A), value.to_bytes(8, "little"), vcpu)
        self._expect(access.outcome is Outcome.DONE, f"PD entry 0 of process A: {access}")

    def host_thp(self, collapse: bool) -> None:
        """MADV_COLLAPSE of frame 0, or a split of its huge PMD."""
        if collapse:
            self.host.madvise_collapse(self.hva, HPAGE)
        else:
            self.host.split_huge_pmd(self.hva)

    def host_khugepaged_or_dontneed(self, i: int) -> None:
        """khugepaged scans frame 0 (odd ``i``), or MADV_DONTNEED of data page ``i``
        (even, past the tables inside the page)."""
        if i % 2:
            self.host.khugepaged_scan(self.hva)
        elif i not in range(0, 16):  # keep the tables inside the page
            assert self.host.madvise_dontneed(self.hva + i * PAGE, PAGE) == 0

    def migrate_page(self, i: int) -> None:
        """The host migrates page ``i`` of the 2M guest page, with its whole folio (the THP,
        when frame 0 is one): nothing pins it, so it moves."""
        errno = self.host.migrate_page(self.hva + i * PAGE)
        self.log(f"migrate page {i} -> errno {errno}")
        self._expect(errno == 0, f"migrating page {i}: errno {errno}")

    def reclaim(self, i: int) -> None:
        """Reclaim picks data page ``i`` of the 2M guest page: kept if it was used since the
        last look (the guest's use as KVM reports it through aging), else swapped out under
        a CLEAR invalidation, the whole THP when frame 0 is one, or split first when PTEs
        map it. Nothing pins the page and no fault holds it, so nothing else may happen;
        the next access brings the contents back."""
        outcome = self.host.reclaim(self.hva + i * PAGE)
        self.log(f"reclaim page {i} -> {outcome.value}")
        self._expect(outcome in RECLAIMED, f"reclaiming page {i}: {outcome.value}")

    def toggle_log(self, log: bool) -> None:
        assert self.set_flags(KVM_MEM_LOG_DIRTY_PAGES if log else 0) == 0

    def harvest(self) -> None:
        """KVM_GET_DIRTY_LOG of the slot."""
        run_to_completion(kvm_get_dirty_log_protect(self.kvm, 0))

    def manual_protect_initially_set(self) -> None:
        """The VMM turns on manual protection with KVM_DIRTY_LOG_INITIALLY_SET: logging
        started from now on reports every page until the VMM clears it, and protects
        nothing when it starts, so the 2M leaf may stay writable while the slot is logged
        (D1, D5). The VMM never turns it off again: a GET without manual protection would
        clear bits and write-protect only 4K leaves, and the 2M one could keep writing
        unreported (a kernel corner this harness does not explore)."""
        cap = CAPABILITIES["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"]
        assert kvm_vm_ioctl_enable_cap(self.kvm, cap, 0, (KVM_DIRTY_LOG_MANUAL_CAPS,)) == 0

    def clear_dirty_log(self, i: int) -> None:
        """KVM_CLEAR_DIRTY_LOG of the 64 pages around page ``i``: their bits cleared and
        their leaves write-protected, the huge ones over them too under INITIALLY_SET.
        Refused while the slot is not logged."""
        first = i - i % 64
        errno = run_to_completion(kvm_clear_dirty_log_protect(self.kvm, 0, first, 64, [U64_MAX]))
        self.log(f"clear dirty log of pages {first}..{first + 63} -> errno {errno}")

    def check(self) -> None:
        """Raise :class:`RulesBroken` if the actions so far broke a rule."""
        self.checks += 1
        found = self.found + self.violations()
        if found:
            raise RulesBroken(found)
