"""The x86 shadow-MMU harnesses: one VM on the shadow MMU with guest page tables in guest
memory, its host, and every check, driven one action at a time by whoever picks the actions.

Three layouts (:mod:`kvmspec.fuzz.x86_layouts`), plain classes
with one method per action and :meth:`check` after every one. This module holds the shared
values and checks and the ``shadow`` layout (and ``mmio``); :mod:`kvmspec.fuzz.x86_huge_harness`
holds ``huge``:

* :class:`ShadowHarness` (``shadow``): two slots (the guest's 4-level tables, and its data
  pages), five processes (PML4s) sharing one PDPT, PD and PT, two vCPUs. Guest loads and
  stores, guest PTE rewrites (straight to memory once the PT is unsync) and writes to
  upper-level tables (emulated writes to write-protected tables, flooding), INVLPG and CR3
  switches (the guest's TLB flushes, which sync unsync pages), host writes and
  MADV_DONTNEED (notifier invalidations), DELETE, re-CREATE and MOVE of the data slot,
  with or without the zap-all quirk. The VM also has KVM's APIC-access page (a private slot
  at 0xfee00000, which the PT maps at gva page 32): guest loads and stores to it, and host
  migration of it and of the data pages (seed 004), and the VMM exiting (the MMU
  notifier's release zaps every shadow page: nothing may be left that maps the memory the
  host frees, X5), after which a new VM starts. The ``mmio`` layout is the same VM
  with MMIO caching on (this machine has it off): an access to a gfn without a slot
  installs an MMIO SPTE, which must never be trusted once a slot covers the gfn (X11).
* :class:`~kvmspec.fuzz.x86_huge_harness.HugeHarness` (``huge``): one THP-capable slot of two
  2 MiB frames, three processes whose PDs map frame 0 with one 2M page (B's and C's PDs live
  inside that page: seed 002), two vCPUs. Guest loads and stores in the 2M page, emulated
  and failing stores to the shadowed tables inside it, the guest switching its PD entry
  between the 2M page and a 4K table, THP collapse and split, khugepaged, MADV_DONTNEED,
  LOG toggles and harvests, and host migration of a page (the whole THP when frame 0 is
  one).

Two drivers choose the actions and their arguments: the Hypothesis state machine
(:mod:`kvmspec.fuzz.x86_machine`) and the byte decoder of the Atheris fuzzer
(:mod:`kvmspec.fuzz.x86_decoder`); the values each argument may take are the tuples below,
and an action on a page that
:meth:`~kvmspec.fuzz.x86_huge_harness.HugeHarness.is_data_page` refuses must not be called.
:meth:`check` raises :class:`~kvmspec.fuzz.generic_harness.RulesBroken` with what it found:
every shadow invariant (:func:`~kvmspec.spec.invariants.x86.check_shadow_mmu`: X1-X12,
X17, X18, D1, D4, seed 004's unpinned private pages and reloaded APIC-access address, the
WARNs), the vCPUs' MMIO caches against the guest's entries (X5), that a migration
succeeds (nothing pins the page), and ``COHERENCE``: every guest load returns what the
host holds at the gfn the guest's page tables name, a store reaches it, and an access
ends as those tables and the slots say (done, MMIO, or the guest's own #PF). After
a PTE rewrite, the vCPU may also use the entry's older values until it flushes that page
(INVLPG) or its whole TLB (a CR3 load), as a real TLB may. A guest access that faults
without end fails the model's own assertion (S002-LARGE-SPTE-PROGRESS), which drivers
report as a finding. The fuzzers' harnesses let the known kernel findings pass
(:data:`~kvmspec.fuzz.x86_known_findings.KNOWN_KERNEL_FINDINGS`: exactly what each covers is
:class:`~kvmspec.fuzz.x86_known_findings.KnownFindings`, which the harness holds for each VM
it starts); a harness built by a test reports everything.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmspec.fuzz.generic_harness import Log, RulesBroken
from kvmspec.fuzz.x86_known_findings import KnownFindings
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.guest_memory import MmioExit, kvm_read_guest_atomic
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.reference.x86.apic_access import (
    APIC_DEFAULT_PHYS_BASE,
    apic_access_page_slot,
    vmx_vcpu_create,
)
from kvmspec.reference.x86.guest_access import (
    Outcome,
    ShadowAccess,
    guest_instruction,
    guest_invlpg,
)
from kvmspec.reference.x86.guest_walk import gpte_access, protect_clean_gpte
from kvmspec.reference.x86.lpage import kvm_pages_per_hpage
from kvmspec.reference.x86.mmu_page import (
    SptePtr,
    is_obsolete_sp,
    kvm_mmu_page_get_gfn,
    sp_has_gptes,
)
from kvmspec.reference.x86.mmu_pages import kvm_mmu_change_mmu_pages
from kvmspec.reference.x86.paging import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PT64_BASE_ADDR_MASK,
)
from kvmspec.reference.x86.roots import kvm_set_cr3
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import (
    LEGACY_MASKS_HERE,
    is_executable_pte,
    is_last_spte,
    is_shadow_present_pte,
    is_writable_pte,
    kvm_mmu_reset_all_pte_masks,
)
from kvmspec.reference.x86.unsync import KVM_REQ_MMU_SYNC
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.x86 import (
    check_released,
    check_shadow_mmu,
)
from kvmspec.spec.invariants.x86_page_limit import check_enospc
from kvmspec.spec.platforms import DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.constants import (
    KVM_X86_QUIRK_SLOT_ZAP_ALL,
    PAGE_SHIFT,
)
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
HPAGE = 512 * PAGE
PDPT_SPAN = 512 * HPAGE
"""What one PDPT entry maps: 1 GiB."""
RW = PROT_READ | PROT_WRITE
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
RESTRICTIONS = (W, U, NX)
"""The PTE bits :meth:`ShadowHarness.guest_restrict` may change to take a right away: W or U
cleared, NX set."""


class GuestMapping(NamedTuple):
    """What a guest PTE of a data page says: the gfn (None: not present), and whether user
    code may write the page and use it at all."""

    gfn: int | None
    writable: bool
    user: bool


PTE = P | W | U | A | D
MMIO_CACHING_MASKS = kvm_mmu_reset_all_pte_masks(48)
"""This machine's legacy SPTE format with the kvm module's mmio_caching on."""
APIC_RELOAD = "S004-APIC-ACCESS-RELOAD"
"""The one rule that no longer applies once the VMM has exited (:meth:`ShadowHarness.release`)."""

VCPUS = (0, 1)
BOOLS = (False, True)
OFFSETS = tuple(range(PAGE - 7))
"""Where an 8-byte guest load may start in a page."""
BYTES = tuple(range(256))


def _ignore(line: str) -> None:
    """The default log: say nothing."""


def _x86_shadow(profile: PlatformProfile) -> PlatformProfile:
    """``profile``, which must be an x86 profile on the shadow MMU (what these VMs model)."""
    if profile.arch != "x86_64" or profile.mmu != "shadow":
        raise ValueError(f"profile {profile.name}: the x86 harness needs x86_64 on the shadow MMU")
    return profile


# ---------------------------------------------------------------------------------------------
# The shadow layout: page tables in one slot, data in another
# ---------------------------------------------------------------------------------------------

PML4, PML4_2, PDPT, PD, PT = 1, 5, 2, 3, 4
"""Table gfns in slot 0: two processes' PML4s, their one PDPT, PD and PT."""
PML4S = (PML4, PML4_2, 6, 7, 8)
"""Every process's PML4, each linking the one PDPT. Five: one more than the roots a vCPU
keeps (its current root and KVM_MMU_NUM_PREV_ROOTS cached ones), so that switching among
them makes KVM drop a root for good, not only rotate its cache (X17). Gfns 9 to 11 are
spare table pages for tests."""
TABLE_PAGES = 12
DATA_GFN, DATA_PAGES = 16, 8
"""Slot 1: the data pages. The PT maps gva page i to gfn i for i < 12 (the tables
themselves, so the guest can write them) and gva page 16 + i to gfn 16 + i."""
NO_SLOT_GFN = 40
DATA_GVA = DATA_GFN * PAGE
APIC_GFN = APIC_DEFAULT_PHYS_BASE // PAGE
APIC_PT_INDEX = 32
"""The PT maps gva page 32 to the APIC-access page's gfn (KVM's private slot, seed 004)."""
APIC_GVA = APIC_PT_INDEX * PAGE

DATA_PAGE_INDEXES = tuple(range(DATA_PAGES))
REMAP_TARGETS: tuple[int | None, ...] = (*range(DATA_GFN, DATA_GFN + DATA_PAGES), NO_SLOT_GFN, None)
"""Where the guest may point a data PTE: a data gfn, a gfn no slot holds, or nowhere."""
UPPER_TABLES = (PML4, PDPT, PD)
UNUSED_ENTRIES = (100, 101, 102, 103)
HOST_WRITE_SIZES = tuple(range(1, 9))
DONTNEED_PAGES = (1, 2, 3)
STRADDLED_PAGES = tuple(range(DATA_PAGES - 1))
"""Data pages whose PTE a store may straddle into the next one's."""
DATA_SLOT_PLACES: tuple[int | None, ...] = (DATA_GFN, 64, None)
"""Where the data slot may be: its first place, a second (MOVE), or deleted."""
MMU_PAGE_LIMITS = (len(VCPUS) + 1, 6, 64)
"""Shadow-page limits for :meth:`ShadowHarness.set_mmu_page_limit`: one page more than the
vCPUs' current roots, one that some faults must recycle for, and the default. Recycling
usually finds a page to take even under the smallest, but not always: the limit can end
below the one asked for (zapping a page takes its unsync children along, and the limit
becomes the count left), and the roots in use include the vCPUs' cached previous roots and
roots a zap made obsolete. KVM_RUN then fails with ENOSPC (see :meth:`ShadowHarness.run`)."""


def leaves_follow_guest_ptes(kvm: Kvm, mmu: ShadowMmu, host: HostMm) -> list[Violation]:
    """What X6 is for, checked leaf by leaf: every leaf of a valid, synced shadow page of a
    guest table maps the gfn its guest entry names now, and grants no right the guest's
    entries deny (W also needs the entry's D: protect_clean_gpte). KVM sees every guest
    write to such a table (it is write-protected: X6), so it can keep its shadow exact. An
    unsync page may lag until the guest flushes; a VMM write to a guest table is not seen
    at all (FINDINGS 5.6), which is why this is a check of these harnesses, whose VMM never
    writes a table once the guest runs, and not an invariant of every VM."""
    problems = []
    for sp in mmu.sp_by_pfn.values():
        if not sp_has_gptes(sp) or sp.unsync or is_obsolete_sp(mmu, sp):
            continue
        errno, table = kvm_read_guest_atomic(kvm, host, 0, sp.gfn << PAGE_SHIFT, PAGE)
        if errno:
            continue  # swapped out, or its slot going away: nothing to compare with now
        frame = kvm_pages_per_hpage(sp.role.level)
        for index, spte in sorted(sp.spt.items()):
            if not is_shadow_present_pte(spte) or not is_last_spte(spte, sp.role.level):
                continue
            gpte = int.from_bytes(table[8 * index : 8 * index + 8], "little")
            gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
            where = f"{SptePtr(sp, index)}"
            if not gpte & P or kvm_mmu_page_get_gfn(sp, index) != gfn - gfn % frame:
                problems.append(
                    Violation(
                        "X6",
                        f"{where} maps gfn {kvm_mmu_page_get_gfn(sp, index):#x}, "
                        f"the guest entry is {gpte:#x}",
                    )
                )
                continue
            allowed = protect_clean_gpte(sp.role.access & gpte_access(gpte), gpte)
            granted = (
                (ACC_WRITE_MASK if is_writable_pte(spte) else 0)
                | (ACC_USER_MASK if spte & mmu.masks.user_mask else 0)
                | (ACC_EXEC_MASK if is_executable_pte(mmu.masks, spte) else 0)
            )
            if granted & ~allowed:
                problems.append(
                    Violation("X6", f"{where} grants {granted:#x}, the guest allows {allowed:#x}")
                )
    return problems


class ShadowHarness:
    """One VM on the shadow MMU with the VMM's memory, two slots and two vCPUs (the
    ``shadow`` layout, or ``mmio`` with ``mmio_caching``); ``log`` receives one line per
    access worth reading in a report. The known kernel findings named in ``tolerated`` (of
    :data:`~kvmspec.fuzz.x86_known_findings.KNOWN_KERNEL_FINDINGS`) pass :meth:`check`, as
    :attr:`known_findings` says; a harness built by a test reports everything."""

    def __init__(
        self,
        profile: PlatformProfile = DEFAULT_PROFILE,
        zap_all_quirk: bool = True,
        log: Log = _ignore,
        mmio_caching: bool = False,
        tolerated: tuple[str, ...] = (),
    ) -> None:
        self.profile = _x86_shadow(profile)
        self.zap_all_quirk = zap_all_quirk
        self.log = log
        self.mmio_caching = mmio_caching
        self.tolerated = tolerated
        self.found: list[str] = []
        self.checks = 0
        self._start_vm()

    def _start_vm(self) -> None:
        """A fresh VMM process: its address space, the VM with its two slots and two vCPUs,
        and the guest's page tables."""
        self.mmu = ShadowMmu(
            MMIO_CACHING_MASKS if self.mmio_caching else LEGACY_MASKS_HERE,
            pvm_top_level_copy=self.profile.pvm_top_level_copy,
        )
        self.kvm = Kvm(self.profile, self.mmu)
        if not self.zap_all_quirk:
            self.kvm.disabled_quirks |= KVM_X86_QUIRK_SLOT_ZAP_ALL
        self.host = HostMm(PAGE, self.profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.tables_hva = self.host.mmap(TABLE_PAGES * PAGE, RW)
        _, self.data_hva = self.host.mmap(DATA_PAGES * PAGE, RW)
        assert self.set_region(0, 0, 0, TABLE_PAGES, self.tables_hva) == 0
        assert self.set_region(1, 0, DATA_GFN, DATA_PAGES, self.data_hva) == 0
        self.data_base: int | None = DATA_GFN
        for pml4 in PML4S:
            self.write_table(pml4, 0, PDPT * PAGE | PTE)
        self.write_table(PDPT, 0, PD * PAGE | PTE)
        self.write_table(PD, 0, PT * PAGE | PTE)
        for i in range(TABLE_PAGES):
            self.write_table(PT, i, i * PAGE | PTE)
        for i in range(DATA_PAGES):
            self.write_table(PT, DATA_GFN + i, (DATA_GFN + i) * PAGE | PTE)
        self.write_table(PT, APIC_PT_INDEX, APIC_GFN * PAGE | PTE)
        for vcpu_id in VCPUS:
            assert kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id) == 0
            assert vmx_vcpu_create(self.kvm, self.host, self.mmu, vcpu_id) == 0
            self.set_cr3(vcpu_id, PML4)
        apic_slot = self.kvm.memslots(0).id_to_memslot(apic_access_page_slot(self.kvm))
        assert apic_slot is not None
        self.apic_hva = apic_slot.userspace_addr
        # vCPU -> data page -> the gfns (None: not present) its PTE held since the vCPU
        # last flushed that page: translations the vCPU may still use.
        self.stale: dict[int, dict[int, set[GuestMapping]]] = {vcpu: {} for vcpu in VCPUS}
        self.known_findings = KnownFindings(self.kvm, self.mmu, self.tolerated)

    # -- the VMM and the guest, as scenarios use them --------------------------------------------

    def set_region(self, slot: int, flags: int, gfn: int, npages: int, hva: int) -> int:
        region = MemoryRegion(slot, flags, gfn * PAGE, npages * PAGE, hva)
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def write_table(self, gfn: int, index: int, value: int) -> None:
        """The VMM writes a guest page-table entry (before the guest runs)."""
        data = value.to_bytes(8, "little")
        assert self.host.host_write(self.tables_hva + gfn * PAGE + 8 * index, data) == 0

    def set_cr3(self, vcpu_id: int, pml4: int) -> None:
        kvm_set_cr3(self.kvm, self.mmu, self.mmu.vcpu_mmu(vcpu_id), pml4 * PAGE)

    def read(self, gva: int, size: int = 4, vcpu_id: int = 0) -> ShadowAccess:
        """vCPU ``vcpu_id`` loads ``size`` bytes at ``gva``; see :meth:`run`."""
        return self.run(vcpu_id, gva, None, size)

    def write(self, gva: int, data: bytes, vcpu_id: int = 0) -> ShadowAccess:
        """vCPU ``vcpu_id`` stores ``data`` at ``gva``; see :meth:`run`."""
        return self.run(vcpu_id, gva, data, len(data))

    def run(self, vcpu_id: int, gva: int, data: bytes | None, size: int) -> ShadowAccess:
        """One guest instruction. When KVM_RUN fails with ENOSPC, every page the VM holds
        must be a root in use (X12: :func:`check_enospc`); the VMM then does what it can,
        raises the limit to the default, and runs the vCPU again."""
        access = guest_instruction(self.kvm, self.host, vcpu_id, gva, data, size)
        if access.outcome is Outcome.ENOSPC:
            self.found += [str(v) for v in check_enospc(self.mmu)]
            self.log(f"vcpu {vcpu_id}: KVM_RUN failed with ENOSPC; the VMM raises the limit")
            self.set_mmu_page_limit(MMU_PAGE_LIMITS[-1])
            access = guest_instruction(self.kvm, self.host, vcpu_id, gva, data, size)
        return access

    def guest_set_pte(self, index: int, value: int, vcpu_id: int = 0) -> ShadowAccess:
        """The guest rewrites entry ``index`` of its PT through its own mapping of it."""
        return self.write(PT * PAGE + 8 * index, value.to_bytes(8, "little"), vcpu_id)

    def violations(self) -> list[str]:
        """Every rule the VM breaks now, as report lines."""
        return [str(v) for v in self.rule_violations()]

    def rule_violations(self) -> list[Violation]:
        """Every rule the VM breaks now (the known kernel findings included)."""
        return [
            *check_shadow_mmu(self.kvm, self.mmu, self.host),
            *leaves_follow_guest_ptes(self.kvm, self.mmu, self.host),
            *self.mmio_caches_follow_guest_ptes(),
        ]

    def mmio_caches_follow_guest_ptes(self) -> list[Violation]:
        """X5 for the vCPUs' caches of their last MMIO translation (vcpu->arch.mmio_gva and
        mmio_gfn, which the emulator uses instead of walking the guest's tables): like a TLB
        entry, a data page's cached translation is one the vCPU may still use, what the
        page's entry says now or an entry the vCPU has not flushed since. An INVLPG that
        left the cache alone would send a later emulated access to the VMM as MMIO after
        the guest had mapped RAM there. A vCPU with a sync of its roots pending, or no
        root, is exempt: the sync (kvm_mmu_sync_roots, also part of loading a root) drops
        the whole cache before the vCPU runs guest code again; every CR3 load asks for
        one."""
        if self.host.host_read(self.tables_hva + PT * PAGE, 8)[0]:
            return []  # the VMM has exited: no guest tables left to compare with
        problems = []
        generation = self.kvm.memslots(0).generation
        for vcpu in VCPUS:
            info = self.mmu.mmio_info.get(vcpu)
            if info is None or info.generation != generation:
                continue  # nothing cached, or an entry no lookup matches any more
            vcpu_mmu = self.mmu.vcpu_mmu(vcpu)
            if KVM_REQ_MMU_SYNC in vcpu_mmu.requests or vcpu_mmu.root.sp is None:
                continue  # dropped before the vCPU runs guest code again
            i = (info.gva - DATA_GVA) // PAGE
            if i not in DATA_PAGE_INDEXES:
                continue  # not a data page: the APIC page, or an alias through an upper table
            allowed = [mapping.gfn for mapping in self.allowed_mappings(vcpu, i)]
            if info.gfn not in allowed:
                problems.append(
                    Violation(
                        "X5",
                        f"vcpu {vcpu} caches MMIO gfn {info.gfn:#x} for data page {i}; "
                        f"its entries since the last flush map {allowed}",
                    )
                )
        return problems

    # -- what the guest's tables and the slots say an access must do ----------------------------

    def expected_gfn(self, i: int) -> int | None:
        """The gfn the guest's PT maps gva page 16 + i to (None: not present)."""
        return self.expected_mapping(i).gfn

    def expected_mapping(self, i: int) -> GuestMapping:
        """What the guest's PT says of gva page 16 + i: its gfn (None: not present) and
        whether user code may write it and use it at all."""
        pte = int.from_bytes(self._data_pte_bytes(i), "little")
        if not pte & P:
            return GuestMapping(None, False, False)
        return GuestMapping((pte >> 12) & ((1 << 40) - 1), bool(pte & W), bool(pte & U))

    def _data_pte_bytes(self, i: int) -> bytes:
        """The 8 bytes of data page ``i``'s PTE in the guest's PT, as the VMM reads them."""
        return self.host.host_read(self.tables_hva + PT * PAGE + 8 * (DATA_GFN + i), 8)[1]

    def _unflushed(self, i: int, old: GuestMapping) -> None:
        """Data page ``i``'s PTE changed from ``old``: every vCPU may go on using the old
        entry until it flushes the page."""
        for pages in self.stale.values():
            pages.setdefault(i, set()).add(old)

    def _rewrite_data_pte(self, vcpu: int, i: int, value: int) -> None:
        """The guest writes ``value`` to data page ``i``'s PTE through its own mapping of the
        PT: an emulated write while the PT is shadowed and synced, else straight to memory."""
        old = self.expected_mapping(i)
        access = self.guest_set_pte(DATA_GFN + i, value, vcpu)
        self._expect(access.outcome is Outcome.DONE, f"PT write for data page {i}: {access}")
        self._unflushed(i, old)

    def expected_hva(self, gfn: int) -> int | None:
        """Where the host holds ``gfn`` (None: no slot holds it)."""
        base = self.data_base
        if base is None or not base <= gfn < base + DATA_PAGES:
            return None
        return self.data_hva + (gfn - base) * PAGE

    def _expect(self, holds: bool, what: str) -> None:
        if not holds:
            self.found.append(f"COHERENCE: {what}")

    def allowed_mappings(self, vcpu: int, i: int) -> list[GuestMapping]:
        """What vCPU ``vcpu`` may translate data page ``i`` with: what the PT says now, or
        an older entry it has not flushed yet."""
        current = self.expected_mapping(i)
        older = sorted(self.stale[vcpu].get(i, set()) - {current}, key=lambda m: m.gfn or 0)
        return [current, *older]

    # -- the actions --------------------------------------------------------------------------

    def set_quirk(self, quirk: bool) -> None:
        """KVM_X86_QUIRK_SLOT_ZAP_ALL on (a DELETE or MOVE zaps everything) or off."""
        if quirk:
            self.kvm.disabled_quirks &= ~KVM_X86_QUIRK_SLOT_ZAP_ALL
        else:
            self.kvm.disabled_quirks |= KVM_X86_QUIRK_SLOT_ZAP_ALL

    def guest_read(self, vcpu: int, i: int, offset: int) -> None:
        """An 8-byte load at ``offset`` of data page ``i``."""
        gva = DATA_GVA + i * PAGE + offset
        access = self.read(gva, 8, vcpu)
        self.log(f"vcpu {vcpu} load data page {i} + {offset:#x} -> {access}")
        self._expect_load(access, vcpu, gva, self.allowed_mappings(vcpu, i))

    def guest_read_alias(self, vcpu: int, entry: int, i: int, offset: int) -> None:
        """The guest points the unused PD entry ``entry`` at its PT as well (an emulated
        write: the PD is shadowed), flushes the addresses of data pages ``i`` and ``i + 1``
        through that alias (INVLPG), and loads 8 bytes from each. The first load reaches a
        guest table that already has a shadow page: KVM links that same page
        (kvm_mmu_find_shadow_page), syncing it first if it is unsync, so the second load,
        which may not fault at all, sees the PT's current entry too. Since the guest
        flushed both, only what the PT holds now may be seen: no older entry."""
        self._point_entry_at_pt(vcpu, PD, entry)
        pages = (i, (i + 1) % DATA_PAGES)
        for page in pages:
            guest_invlpg(self.kvm, self.host, vcpu, entry * HPAGE + DATA_GVA + page * PAGE)
        for page in pages:
            gva = entry * HPAGE + DATA_GVA + page * PAGE + offset
            access = self.read(gva, 8, vcpu)
            self.log(f"vcpu {vcpu} load data page {page} + {offset:#x} via PD {entry}: {access}")
            self._expect_load(access, vcpu, gva, [self.expected_mapping(page)])

    def guest_read_pt_as_pd(self, vcpu: int, entry: int, i: int, offset: int) -> None:
        """The guest points the unused PDPT entry ``entry`` at its PT, which is thereby
        also a page directory, flushes and loads data page ``i`` through it: the PT, as a
        PD, maps gva 2M * PT with its own entry PT, that is, with the PT again as a page
        table. Making the PD-level shadow page of the PT's gfn zaps the PT's unsync shadow
        page (kvm_mmu_find_shadow_page): the gfn is now write-tracked, so an unsync page of
        it would never be synced again. The load must see what the PT holds now."""
        self._point_entry_at_pt(vcpu, PDPT, entry)
        gva = entry * PDPT_SPAN + PT * HPAGE + DATA_GVA + i * PAGE
        guest_invlpg(self.kvm, self.host, vcpu, gva)
        access = self.read(gva + offset, 8, vcpu)
        self.log(f"vcpu {vcpu} load data page {i} + {offset:#x} via PDPT {entry}: {access}")
        self._expect_load(access, vcpu, gva + offset, [self.expected_mapping(i)])

    def _point_entry_at_pt(self, vcpu: int, table: int, entry: int) -> None:
        """The guest points ``entry`` of its upper-level ``table`` at its PT: an emulated
        write, since KVM shadows (and write-protects) every upper-level table."""
        value = (PT * PAGE | PTE).to_bytes(8, "little")
        written = self.write(table * PAGE + 8 * entry, value, vcpu)
        self._expect(written.outcome is Outcome.DONE, f"table {table} entry {entry}: {written}")

    def _expect_load(
        self, access: ShadowAccess, vcpu: int, gva: int, mappings: list[GuestMapping]
    ) -> None:
        """vCPU ``vcpu``'s load at ``gva`` must have gone through one of ``mappings``: the
        guest's own page fault (no handler: a shutdown) where the entry is not present or
        not a user page, else the page's bytes, or an MMIO exit for a gfn without a slot (or
        one the walk's SPTE shows :data:`~kvmspec.fuzz.x86_known_findings.SYNCED_STALE_MMIO`
        for, if this harness lets it pass)."""
        offset = gva % PAGE
        synced_mmio = self.known_findings.synced_stale_mmio_gfn(vcpu, gva)
        expected = []
        for gfn, _writable, user in mappings:
            hva = self.expected_hva(gfn) if gfn is not None else None
            if gfn is None or not user:
                expected.append(ShadowAccess(Outcome.SHUTDOWN))
            elif hva is None:
                expected.append(ShadowAccess(Outcome.MMIO))
            else:
                expected.append(ShadowAccess(Outcome.DONE, self.host.host_read(hva + offset, 8)[1]))
                if gfn == synced_mmio:  # SYNCED_STALE_MMIO: the VMM gets the load
                    vmm_exit = MmioExit(gfn * PAGE + offset, 8, None)
                    expected.append(ShadowAccess(Outcome.MMIO, mmio=vmm_exit))
        self._expect(
            any(
                access.outcome is want.outcome
                and access.data == want.data
                and want.mmio in (None, access.mmio)
                for want in expected
            ),
            f"{access}: expected one of {[(w.outcome.value, w.data) for w in expected]}",
        )

    def guest_write(self, vcpu: int, i: int, byte: int) -> None:
        """A one-byte store of ``byte`` at offset ``byte`` of data page ``i``."""
        gva = DATA_GVA + i * PAGE + byte
        access = self.write(gva, bytes([byte]), vcpu)
        self.log(f"vcpu {vcpu} store {byte} to data page {i} -> {access}")
        landed = []  # where the store may have gone, and how it would end
        synced_mmio = self.known_findings.synced_stale_mmio_gfn(vcpu, gva)
        for gfn, writable, user in self.allowed_mappings(vcpu, i):
            hva = self.expected_hva(gfn) if gfn is not None else None
            if gfn is None or not user or not writable:
                landed.append(access.outcome is Outcome.SHUTDOWN)
            elif hva is None:
                landed.append(access.outcome is Outcome.MMIO)
            else:
                held = self.host.host_read(hva + byte, 1)[1]
                landed.append(access.outcome is Outcome.DONE and held == bytes([byte]))
                if gfn == synced_mmio:  # SYNCED_STALE_MMIO: the VMM gets the store
                    vmm_exit = MmioExit(gfn * PAGE + byte, 1, bytes([byte]))
                    landed.append(access == ShadowAccess(Outcome.MMIO, mmio=vmm_exit))
        self._expect(any(landed), f"{access}: store of {byte} to data page {i}")

    def guest_remap(self, vcpu: int, i: int, to: int | None, clean: bool) -> None:
        """The guest points data page ``i`` at gfn ``to`` (None: not present), with the
        accessed and dirty bits clear if ``clean``: an emulated write to its shadowed PT."""
        flags = PTE & ~(A | D) if clean else PTE
        self._rewrite_data_pte(vcpu, i, 0 if to is None else to * PAGE | flags)

    def guest_remap_straddling(self, vcpu: int, i: int, to: int) -> None:
        """The guest points data page ``i + 1`` at data gfn ``DATA_GFN + to`` with a 4-byte
        store that starts 6 bytes into page ``i``'s PTE (code that writes PTEs in pieces):
        its first two bytes are the top of page ``i``'s PTE, written back unchanged, and the
        last two are the low bits of page ``i + 1``'s (flags and the gfn's lowest 4 bits).
        KVM emulates it when the PT is write-tracked (also shadowed as a directory, after
        :meth:`guest_read_pt_as_pd`; an unsync PT takes the store directly): a write across
        two guest PTEs makes it zap the whole shadow page (detect_write_misaligned), since
        dropping one SPTE would leave the other stale (X6). Page ``i + 1``'s PTE is first
        made a data mapping (an aligned rewrite) if the store alone cannot make it one."""
        nxt = i + 1
        assert nxt < DATA_PAGES, f"data page {i} has no next page (STRADDLED_PAGES)"
        target = (DATA_GFN + to) * PAGE | PTE
        current = int.from_bytes(self._data_pte_bytes(nxt), "little")
        if current >> 16 != target >> 16:
            self._rewrite_data_pte(vcpu, nxt, (DATA_GFN + (to ^ 1)) * PAGE | PTE)
        old = self.expected_mapping(nxt)
        data = self._data_pte_bytes(i)[6:] + target.to_bytes(8, "little")[:2]
        access = self.write(PT * PAGE + 8 * (DATA_GFN + i) + 6, data, vcpu)
        self.log(f"vcpu {vcpu} store across the PTEs of data pages {i} and {nxt}: {access}")
        self._expect(access.outcome is Outcome.DONE, f"PT write across pages {i}, {nxt}: {access}")
        self._unflushed(nxt, old)

    def guest_restrict(self, vcpu: int, i: int, bit: int) -> None:
        """The guest takes a right away from data page ``i`` (same gfn): it clears W (the
        page is read-only) or U (a supervisor page), or sets NX (no execution), with an
        emulated or unsync write to its PT like :meth:`guest_remap`. The old entry may live
        on until the guest flushes it; KVM's shadow must never grant more than either."""
        current = self.expected_mapping(i)
        if current.gfn is None:
            return
        value = current.gfn * PAGE | PTE
        self._rewrite_data_pte(vcpu, i, value | NX if bit == NX else value & ~bit)

    def guest_remap_misaligned(self, vcpu: int, i: int, to: int | None) -> None:
        """The guest points data page ``i + 1`` at gfn ``to`` (None: not present) with one
        8-byte store that straddles two PTEs: the upper half of page ``i``'s PTE (rewritten
        as it is) and the lower half of page ``i + 1``'s (every gfn here fits below 4 GiB,
        so the upper halves are 0). The store is emulated when the PT's gfn is write-tracked
        (the PT is also an upper-level table, after :meth:`guest_read_pt_as_pd`); KVM then
        cannot tell which PTEs it changed and zaps the gfn's whole shadow pages
        (detect_write_misaligned). Otherwise the PT goes unsync and the store lands as it
        is. Either way the old entry may live on only until the guest flushes it."""
        self._store_across_ptes(vcpu, i, to, 4)

    def guest_remap_off_by_one(self, vcpu: int, i: int, to: int | None) -> None:
        """As :meth:`guest_remap_misaligned`, but the 8-byte store starts one byte before
        page ``i + 1``'s PTE: the top byte of page ``i``'s (rewritten as it is) and the low
        seven of page ``i + 1``'s. Its first and last bytes (offsets 7 and 14 of the pair)
        differ in bit 3 and in no lower bit: the straddle detect_write_misaligned's mask
        must see without any help from the low bits."""
        self._store_across_ptes(vcpu, i, to, 7)

    def _store_across_ptes(self, vcpu: int, i: int, to: int | None, start: int) -> None:
        """One 8-byte guest store from byte ``start`` of data page ``i``'s PTE: the rest of
        that PTE as it is, then the first bytes of page ``i + 1``'s new PTE (to ``to``)."""
        if i + 1 >= DATA_PAGES:
            return
        new = 0 if to is None else to * PAGE | PTE
        old = self.expected_mapping(i + 1)
        data = self._data_pte_bytes(i)[start:] + new.to_bytes(8, "little")[:start]
        access = self.write(PT * PAGE + 8 * (DATA_GFN + i) + start, data, vcpu)
        self._expect(access.outcome is Outcome.DONE, f"PT store for data page {i + 1}: {access}")
        self._unflushed(i + 1, old)

    def invlpg(self, vcpu: int, i: int) -> None:
        """The guest flushes data page ``i`` from the vCPU's TLB (INVLPG)."""
        guest_invlpg(self.kvm, self.host, vcpu, DATA_GVA + i * PAGE)
        self.stale[vcpu].pop(i, None)

    def guest_clear_unused_upper_entries(self, vcpu: int, table: int, index: int) -> None:
        """The guest clears three unused entries of an upper-level table: emulated
        writes, and the third in a row without a fault through the page is flooding, which
        zaps the whole shadow page (and unlinks everything below it)."""
        for entry in range(index, index + 3):
            access = self.write(table * PAGE + 8 * entry, bytes(8), vcpu)
            self._expect(access.outcome is Outcome.DONE, f"table {table} entry {entry}: {access}")

    def switch_cr3(self, vcpu: int, pml4: int) -> None:
        """A CR3 load: a new (or the same) process, and a flush of the vCPU's whole TLB."""
        self.set_cr3(vcpu, pml4)
        self.stale[vcpu].clear()

    def guest_context_switch(self, vcpu: int, pml4: int, i: int) -> None:
        """The guest loads CR3 and goes on at once, loading from data page ``i`` under the
        new process's tables: KVM handles the CR3 write and enters the guest again, which
        loads the process's root first (a cached one, or a new one)."""
        self.switch_cr3(vcpu, pml4)
        self.guest_read(vcpu, i, 0)

    def host_write(self, i: int, value: int, size: int) -> None:
        """The VMM writes ``size`` bytes of ``value`` at the start of data page ``i``."""
        assert self.host.host_write(self.data_hva + i * PAGE, bytes([value]) * size) == 0

    def madvise_dontneed(self, i: int, n: int) -> None:
        """MADV_DONTNEED of ``n`` data pages from page ``i`` (as many as there are)."""
        n = min(n, DATA_PAGES - i)
        assert self.host.madvise_dontneed(self.data_hva + i * PAGE, n * PAGE) == 0

    def guest_read_apic(self, vcpu: int, offset: int) -> None:
        """An 8-byte load at ``offset`` of the APIC-access page: a memory access through the
        shadow MMU like any other (the APIC virtualization is not modelled)."""
        access = self.read(APIC_GVA + offset, 8, vcpu)
        self.log(f"vcpu {vcpu} load APIC page + {offset:#x} -> {access}")
        held = self.host.host_read(self.apic_hva + offset, 8)[1]
        self._expect(
            access.outcome is Outcome.DONE and access.data == held,
            f"{access}: the APIC-access page holds {held!r}",
        )

    def guest_write_apic(self, vcpu: int, byte: int) -> None:
        """A one-byte store of ``byte`` at offset ``byte`` of the APIC-access page."""
        access = self.write(APIC_GVA + byte, bytes([byte]), vcpu)
        self.log(f"vcpu {vcpu} store {byte} to the APIC page -> {access}")
        held = self.host.host_read(self.apic_hva + byte, 1)[1]
        self._expect(
            access.outcome is Outcome.DONE and held == bytes([byte]),
            f"{access}: the APIC-access page holds {held!r} at {byte:#x}",
        )

    def migrate_page(self, i: int) -> None:
        """The host migrates data page ``i`` (compaction, hot-remove): nothing pins it, so
        it moves (or there is nothing to move yet)."""
        errno = self.host.migrate_page(self.data_hva + i * PAGE)
        self.log(f"migrate data page {i} -> errno {errno}")
        self._expect(errno == 0, f"migrating data page {i}: errno {errno}")

    def migrate_apic_page(self) -> None:
        """The host migrates the APIC-access page (seed 004): it must move, and every vCPU
        must reload its address before it next enters the guest."""
        errno = self.host.migrate_page(self.apic_hva)
        self.log(f"migrate the APIC-access page -> errno {errno}")
        self._expect(errno == 0, f"migrating the APIC-access page: errno {errno}")

    def change_data_slot(self, where: int | None) -> None:
        """CREATE, DELETE or MOVE the data slot (same host memory throughout)."""
        npages = 0 if where is None else DATA_PAGES
        gfn = where if where is not None else self.data_base or DATA_GFN
        errno = self.set_region(1, 0, gfn, npages, self.data_hva)
        self.log(f"data slot to {where} -> errno {errno}")
        if errno == 0:
            self.data_base = where

    def set_mmu_page_limit(self, pages: int) -> None:
        """The VM's shadow-page limit becomes ``pages`` (kvm_mmu_change_mmu_pages): the
        oldest pages above it are zapped now, and later faults recycle old pages whenever
        fewer than 5 are left. This VM holds a dozen shadow pages at most, far below the
        smallest limit KVM_SET_NR_MMU_PAGES accepts (64), so the harness sets the limit
        through the kernel function the ioctl and the memslot default both call. The next
        memslot CREATE or DELETE sets the default again, as no VMM asked for a limit."""
        kvm_mmu_change_mmu_pages(self.kvm, self.mmu, pages)
        self.log(f"shadow-page limit {pages}: {self.mmu.n_used_mmu_pages} pages held")

    def release(self) -> None:
        """The VMM exits: the host tears its address space down, and the MMU notifier's
        release zaps every shadow page first (kvm_mmu_zap_all). Nothing may be left that
        maps the memory the host frees next (:func:`check_released`: X5), and the VM's
        other rules still hold but one: no vCPU can enter the guest again (KVM refuses the
        ioctls of any other process), so its APIC-access address no longer matters
        (S004-APIC-ACCESS-RELOAD). Then a new VMM starts a new VM, as at the start."""
        self.host.exit_mmap()
        self.log("the VMM exits")
        self.found += [str(v) for v in check_released(self.mmu)]
        self.found += [
            str(v)
            for v in self.known_findings.unexplained(self.rule_violations())
            if v.rule != APIC_RELOAD
        ]
        self._start_vm()

    def check(self) -> None:
        """Raise :class:`RulesBroken` if the actions so far broke a rule (but for the known
        kernel findings this harness lets pass)."""
        self.checks += 1
        remade = self.known_findings.announce(self.log)
        unexplained = self.known_findings.unexplained(self.rule_violations())
        found = self.found + [str(v) for v in unexplained]
        self.known_findings.remember(remade)
        if found:
            raise RulesBroken(found)
