"""The POWER Book3S HV harness: one HPT guest, its host, and every check, driven one action
at a time by whoever picks the actions (the Hypothesis machine of
:mod:`kvmspec.fuzz.ppc_machine`, or a test).

The VM (:class:`PpcHarness`): a hashed page table of order 19, two vCPUs, the VMM's memory
behind two slots of four 64 KiB pages (slot 0 at gfn 0; slot 1, dirty-logged, at gfn 8,
and it may be deleted, re-created or moved to gfn 16), nothing at gfn 4..7 (emulated MMIO).
The guest translates the effective addresses of :data:`EAS` through one 256 MiB segment
of 4 KiB pages; it enters one translation at most per address, at the group the hash
gives, and the last two addresses share groups with the first two at order 18 (a shrink
makes bolted entries collide).

The actions are the guest's hypercalls (H_ENTER with H_EXACT and BOLTED, H_REMOVE with its
conditions, H_BULK_REMOVE, H_PROTECT, H_READ, H_CLEAR_REF/MOD), guest loads and stores
through the fault path, the host's MADV_DONTNEED, munmap, mprotect and writes (MMU
notifiers), aging (of a whole slot, or of one page as reclaim's clear_young,
clear_flush_young or test_young), memslot changes, dirty-log harvests, HPT resize prepare
and commit, and
races: a hypercall or an access paused where another CPU may run while a host
invalidation, a hypercall, a slot deletion or a resize commit runs; hypercalls made while
slot 1 is INVALID, between a DELETE or MOVE's first step and its flush (seed 000).

:meth:`PpcHarness.check` raises :class:`~kvmspec.fuzz.generic_harness.RulesBroken` with
every broken rule: the HPT invariants (:func:`~kvmspec.spec.invariants.ppc.check_hpt`: P1,
P2, P4-P7, P9, seed 000, the WARNs), the MMIO cache (P7, and no cached translation of an
MMIO entry the guest removed or changed), the guest's view of each entry against what it
entered (P4: R and C only where the guest accessed and stored through it), each access
ending as the guest's entries, the slots and the host say, and each hypercall answering as
PAPR says, H_BULK_REMOVE's response words included (``COHERENCE``), every page the guest
stored to reported by the next harvest (P3), every page the guest used since its last aging
reported young (C-AGING), and after a resize commit exactly the bolted entries, found again
by their hash (P10).

The class keeps one method per action (the decoders call them by name); three modules hold
the bodies of those that are concepts of their own: :mod:`kvmspec.fuzz.ppc_hcalls` the
hypercalls and what PAPR says each answers (the R and C the guest sees, H_BULK_REMOVE's
response words, the MMIO cache after a removal), :mod:`kvmspec.fuzz.ppc_aging` the aging
and its answers, :mod:`kvmspec.fuzz.ppc_resize` the HPT resize and P10. The races step
their operations with :func:`~kvmspec.fuzz.scheduler.race`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmspec.fuzz import ppc_aging, ppc_hcalls, ppc_resize
from kvmspec.fuzz.generic_harness import Log, RulesBroken
from kvmspec.fuzz.ppc_hcalls import STALE_ABSENT_RC
from kvmspec.fuzz.scheduler import SteppedOp, race
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, run_to_completion
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.ppc.fault import (
    DSISR_NOHPTE,
    DSISR_PROTFAULT,
    Access,
    HptAccess,
    kvmppc_hpt_guest_access,
    kvmppc_hv_vcpu,
    mmio_cache_search,
)
from kvmspec.reference.ppc.hcalls import (
    H_ANDCOND,
    H_AVPN,
    H_EXACT,
    H_SUCCESS,
    kvmppc_do_h_enter,
    kvmppc_do_h_remove,
    kvmppc_h_read,
)
from kvmspec.reference.ppc.hpt import HPTES_PER_GROUP, Segment, hpt_hash, hpte_encode_v
from kvmspec.reference.ppc.hpt_mmu import HptMmu, kvm_vm_ioctl_get_dirty_log_hv
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_M,
    HPTE_R_R,
    HPTE_V_BOLTED,
    HPTE_V_SECONDARY,
    HPTE_V_VALID,
    PP_RWXX,
    PP_RXRX,
    hpte_is_writable,
)
from kvmspec.spec.aging_contract import AgingContract
from kvmspec.spec.invariants.ppc import (
    STALE_MMIO_CACHE,
    check_hpt,
    check_mmio_cache,
    hpt_guest_entries,
)
from kvmspec.spec.platforms import PPC64_HV, PlatformProfile
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.dirty_log_rules import BITS_PER_LONG
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = PPC64_HV.page_size
"""64 KiB host pages: one gfn is 64 KiB, and holds sixteen of the guest's 4 KiB pages."""
RW = PROT_READ | PROT_WRITE
SLOT_PAGES = 4
RAM0_GFN, RAM1_GFN, MMIO_GFN, MOVED_GFN = 0, 8, 4, 16
ORDER = 19
SEGMENT = Segment(vsid=0x123)
EAS = (*(0x1000 * i for i in range(8)), 0x80_0000, 0x80_1000)
"""The guest's effective addresses: eight pages, and two 8 MiB above the first two (the
same group at order 18, another at 19 and 20)."""
EA_INDEXES = tuple(range(len(EAS)))
GFNS = (RAM0_GFN, RAM0_GFN + 1, RAM0_GFN + 3, MMIO_GFN, RAM1_GFN, RAM1_GFN + 2, MOVED_GFN)
"""Where the guest may point an entry: slot 0, the MMIO hole, slot 1 at either place."""
GFN_INDEXES = tuple(range(len(GFNS)))
VCPUS = (0, 1)
BOOLS = (False, True)
REMOVE_HOWS = (0, H_AVPN, H_ANDCOND)
SLOT_PAGE_INDEXES = tuple(range(SLOT_PAGES))
SLOT1_PLACES: tuple[int | None, ...] = (None, RAM1_GFN, MOVED_GFN)
"""Where slot 1 may be: deleted, its first place, its second (MOVE)."""
ORDERS = (18, 19, 20)
RACE_STEPS = (0, 1, 2, 3)
KNOWN_KERNEL_FINDINGS = (f"P7: {STALE_MMIO_CACHE}", STALE_ABSENT_RC)
"""Kernel behaviour the checks report and a fuzzing run may be told to let pass: the MMIO
cache keeps entries the HPT no longer holds (tests/test_ppc_fault.py shows how), and H_READ
shows an absent entry's R and C from a hardware word the kernel no longer keeps up to date,
so a removal can report others (tests/test_ppc_fault.py)."""
RACERS = ("dontneed", "h_remove", "delete_slot1", "resize")
INVALID_HCALLS = (
    "enter_index",
    "enter_page_size",
    "enter_16m_page",
    "remove_index",
    "bulk_request",
    "bulk_index",
    "protect_index",
    "read_index",
    "clear_ref_index",
    "clear_mod_index",
)
"""Hypercalls with an argument out of range: an entry index past the HPT, a page size
encoding KVM does not support, a 16 MiB page that no slot (of four 64 KiB pages) can back,
an H_BULK_REMOVE request of an unknown type or past the HPT."""
"""What runs while an access is paused: a host invalidation of its page, the guest
removing the entry, a DELETE of slot 1 or an HPT resize commit (to order 20)."""
AGINGS = ("clear", "clear_flush", "test")
"""How reclaim asks about one page: clear_young (the multi-gen LRU), clear_flush_young
(classic reclaim), or test_young, which clears nothing."""


def _ignore(line: str) -> None:
    """The default log: say nothing."""


@dataclass(frozen=True, slots=True)
class Entered:
    """A translation the guest entered: for ``ea``, its "v" and "r" as the guest wrote them
    (the guest view H_READ must give back, R and C aside)."""

    ea: int
    v: int
    r: int


def ram_r(gfn: int, pp: int, ea: int) -> int:
    """The guest's "r" word for the 4 KiB page of ``ea``'s slot in the 64 KiB ``gfn``."""
    return (gfn * PAGE + (ea // 0x1000 % 16) * 0x1000) | HPTE_R_M | pp


class PpcHarness:
    """One HPT guest and its host (see the module); ``log`` receives one line per event
    worth reading in a report."""

    def __init__(
        self,
        profile: PlatformProfile = PPC64_HV,
        log: Log = _ignore,
        tolerated: tuple[str, ...] = (),
    ) -> None:
        if profile.arch != "ppc64":
            raise ValueError(f"profile {profile.name}: the POWER harness needs ppc64")
        self.profile = profile
        self.log = log
        self.mmu = HptMmu(ORDER)
        self.kvm = Kvm(profile, self.mmu)
        self.host = HostMm(PAGE, profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        self.hvas: dict[int, int] = {}
        for slot, gfn, flags in ((0, RAM0_GFN, 0), (1, RAM1_GFN, KVM_MEM_LOG_DIRTY_PAGES)):
            _, hva = self.host.mmap(SLOT_PAGES * PAGE, RW)
            for page in range(SLOT_PAGES):
                assert self.host.host_write(hva + page * PAGE, b"x") == 0
            self.hvas[slot] = hva
            assert self.set_region(slot, flags, gfn, hva) == 0
        self.slot1_gfn: int | None = RAM1_GFN
        self.slot1_logged = True
        self.entered: dict[int, Entered] = {}  # HPT index -> what the guest entered there
        self.unmapped: set[int] = set()  # hvas of slot 0 pages the VMM munmap()ed
        self.readonly: set[int] = set()  # hvas the VMM mprotect()ed read-only
        self.written: set[int] = set()  # slot 1 pages stored to since the last harvest
        # The eas the guest accessed (stored to) since entering their entry: where the
        # hardware may have set R (C) in it.
        self.referenced: set[int] = set()
        self.stored: set[int] = set()
        self.aging = AgingContract(PAGE)  # host pages the guest used since their last aging
        self.found: list[str] = []
        self.tolerated = tolerated
        self.checks = 0

    # -- helpers -----------------------------------------------------------------------------

    def set_region_op(self, slot: int, flags: int, gfn: int, hva: int, pages: int) -> KernelOp[int]:
        region = MemoryRegion(slot, flags, gfn * PAGE, pages * PAGE, hva)
        return kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1)

    def set_region(self, slot: int, flags: int, gfn: int, hva: int, pages: int = SLOT_PAGES) -> int:
        return run_to_completion(self.set_region_op(slot, flags, gfn, hva, pages))

    def index_of(self, ea: int) -> int | None:
        """The index of the guest's entry for ``ea``, if it has one."""
        for index, entry in self.entered.items():
            if entry.ea == ea:
                return index
        return None

    def slot_of(self, gfn: int) -> tuple[int, int] | None:
        """(slot id, page offset) of ``gfn`` in the slots as the VMM set them, or None."""
        if RAM0_GFN <= gfn < RAM0_GFN + SLOT_PAGES:
            return 0, gfn - RAM0_GFN
        base = self.slot1_gfn
        if base is not None and base <= gfn < base + SLOT_PAGES:
            return 1, gfn - base
        return None

    def _group(self, ea: int) -> int:
        return hpt_hash(self.mmu.hpt, SEGMENT, ea)

    @property
    def segment(self) -> Segment:
        """The segment the guest translates its addresses through (:data:`SEGMENT`)."""
        return SEGMENT

    def _expect(self, holds: bool, what: str) -> None:
        if not holds:
            self.found.append(f"COHERENCE: {what}")

    def _slot1_flags(self) -> int:
        return KVM_MEM_LOG_DIRTY_PAGES if self.slot1_logged else 0

    # -- the guest's hypercalls --------------------------------------------------------------

    def h_enter_op(
        self, ea: int, gfn: int, writable: bool, bolted: bool, secondary: bool, exact: int
    ) -> tuple[KernelOp[tuple[int, int]], Entered, int]:
        """The H_ENTER of a translation for ``ea`` (its group, or the secondary one; slot
        ``exact`` of it with H_EXACT, or the first free one for -1)."""
        v = hpte_encode_v(SEGMENT, ea) | (HPTE_V_BOLTED if bolted else 0)
        group = hpt_hash(self.mmu.hpt, SEGMENT, ea)
        if secondary:
            v |= HPTE_V_SECONDARY
            group ^= self.mmu.hpt.mask
        r = ram_r(gfn, PP_RWXX if writable else PP_RXRX, ea)
        index = group * HPTES_PER_GROUP + max(exact, 0)
        flags = H_EXACT if exact >= 0 else 0
        return kvmppc_do_h_enter(self.kvm, self.host, flags, index, v, r), Entered(ea, v, r), index

    def _record(self, index: int, entry: Entered) -> None:
        """The guest entered ``entry`` at ``index``: a new entry, R and C clear."""
        self.entered[index] = entry
        self.referenced.discard(entry.ea)
        self.stored.discard(entry.ea)

    def h_enter(
        self, ea_i: int, gfn_i: int, writable: bool, bolted: bool, secondary: bool, exact: int
    ) -> None:
        """H_ENTER of a translation for EAS[ea_i] to GFNS[gfn_i] (nothing if the guest has
        one for that address already: a Linux guest never enters two)."""
        ea = EAS[ea_i]
        if self.index_of(ea) is not None:
            return
        op, entry, asked = self.h_enter_op(ea, GFNS[gfn_i], writable, bolted, secondary, exact)
        status, index = run_to_completion(op)
        self.log(f"H_ENTER ea {ea:#x} -> gfn {GFNS[gfn_i]} at {asked:#x}: {status}, {index:#x}")
        ppc_hcalls.check_entered(self, status, index, entry, asked, exact >= 0)

    def h_enter_racing_dontneed(self, ea_i: int, gfn_i: int) -> None:
        """H_ENTER paused after reading the host PTE while the VMM drops the page (P5)."""
        ea, gfn = EAS[ea_i], GFNS[gfn_i]
        if self.index_of(ea) is not None:
            return
        op, entry, asked = self.h_enter_op(ea, gfn, True, False, False, -1)
        status, index = race(op, 1, lambda: self._dontneed_op(gfn))
        ppc_hcalls.check_entered(self, status, index, entry, asked, False)

    def _dontneed_op(self, gfn: int) -> KernelOp[int] | None:
        place = self.slot_of(gfn)
        if place is None or self.hvas[place[0]] + place[1] * PAGE in self.unmapped:
            return None
        hva = self.hvas[place[0]] + place[1] * PAGE
        self.aging.on_host_drop(hva, hva + PAGE)
        return self.host.madvise_dontneed_op(hva, PAGE)

    def h_remove(self, ea_i: int, how: int) -> None:
        """H_REMOVE of the guest's entry for EAS[ea_i], with condition ``how`` (see
        :func:`~kvmspec.fuzz.ppc_hcalls.h_remove`)."""
        ppc_hcalls.h_remove(self, EAS[ea_i], how)

    def h_bulk_remove(self, ea_is: tuple[int, ...]) -> None:
        """H_BULK_REMOVE of up to four of the guest's entries (absolute requests: see
        :func:`~kvmspec.fuzz.ppc_hcalls.h_bulk_remove`)."""
        ppc_hcalls.h_bulk_remove(self, tuple(EAS[ea_i] for ea_i in ea_is[:4]))

    def h_bulk_remove_cond(self, ea_i: int, how: int) -> None:
        """H_BULK_REMOVE of one request, for the guest's entry for EAS[ea_i], with H_REMOVE's
        condition ``how`` (see :func:`~kvmspec.fuzz.ppc_hcalls.h_bulk_remove_cond`)."""
        ppc_hcalls.h_bulk_remove_cond(self, EAS[ea_i], how)

    def h_protect(self, ea_i: int, writable: bool) -> None:
        """H_PROTECT of the guest's entry for EAS[ea_i] to read-write or read-only (see
        :func:`~kvmspec.fuzz.ppc_hcalls.h_protect`)."""
        ppc_hcalls.h_protect(self, EAS[ea_i], writable)

    def h_read(self, ea_i: int, four: bool) -> None:
        """H_READ of the guest's entry for EAS[ea_i] (of its quad with H_READ_4)."""
        ppc_hcalls.h_read(self, EAS[ea_i], four)

    def h_clear_ref_or_mod(self, ea_i: int, mod: bool) -> None:
        """H_CLEAR_MOD or H_CLEAR_REF of the guest's entry for EAS[ea_i]."""
        ppc_hcalls.h_clear_ref_or_mod(self, EAS[ea_i], mod)

    def h_invalid(self, call: str) -> None:
        """One of :data:`INVALID_HCALLS`, its words those of a valid entry for EAS[0] to
        GFNS[0] (see :func:`~kvmspec.fuzz.ppc_hcalls.h_invalid`)."""
        ea = EAS[0]
        v, r = hpte_encode_v(SEGMENT, ea), ram_r(GFNS[0], PP_RWXX, ea)
        ppc_hcalls.h_invalid(self, call, v, r, self._group(ea) * HPTES_PER_GROUP)

    # -- guest accesses -----------------------------------------------------------------------

    def guest_access_op(self, vcpu: int, ea_i: int, write: bool) -> KernelOp[HptAccess]:
        """A guest load or store at EAS[ea_i] as an operation, for a caller that interleaves
        it with others. The guest tries it now: the hardware may set R (and C for a store)
        in the guest's entry for the address even if the access then traps."""
        ea = EAS[ea_i]
        self.referenced.add(ea)
        if write:
            self.stored.add(ea)
        return kvmppc_hpt_guest_access(self.kvm, self.host, vcpu, SEGMENT, ea, write)

    def guest_access(self, vcpu: int, ea_i: int, write: bool) -> None:
        """A guest load or store at EAS[ea_i], through the hardware and the fault path."""
        ea = EAS[ea_i]
        cached = mmio_cache_search(
            kvmppc_hv_vcpu(self.kvm, vcpu), ea, SEGMENT, self.mmu.mmio_update
        )
        access = run_to_completion(self.guest_access_op(vcpu, ea_i, write))
        self.log(f"vcpu {vcpu} {'store' if write else 'load'} {ea:#x} -> {access}")
        wrong = self._judge(ea, write, access)
        if wrong is not None:
            # A current MMIO cache entry decides before the table does: a wrong outcome
            # then is the stale cache's (a known kernel finding), not the table's. The entry
            # may be one this access's own first fault made: a retry after an invalidation
            # (a copy-on-write in fault-in) hits it.
            made_here = access.outcome is Access.MMIO and (
                mmio_cache_search(kvmppc_hv_vcpu(self.kvm, vcpu), ea, SEGMENT, self.mmu.mmio_update)
                is not None
            )
            stale = cached is not None or made_here
            prefix = f"P7: {STALE_MMIO_CACHE}: a hit for ea {ea:#x}" if stale else "COHERENCE"
            self.found.append(f"{prefix}: {wrong}")

    def _judge(self, ea: int, write: bool, access: HptAccess) -> str | None:
        """What is wrong with how the access ended, given the guest's entries, the slots and
        the host (None: nothing)."""
        index = self.index_of(ea)
        if index is None:
            if access.outcome is Access.GUEST_INTERRUPT and access.dsisr & DSISR_NOHPTE:
                return None
            return f"{access}: the guest has no entry for {ea:#x}"
        entry = self.entered[index]
        if write and not hpte_is_writable(entry.r):
            if access.outcome is Access.GUEST_INTERRUPT and access.dsisr & DSISR_PROTFAULT:
                return None
            return f"{access}: the guest's entry for {ea:#x} is read-only"
        gpa = (entry.r & 0x0FFF_FFFF_FFFF_F000) | (ea & 0xFFF)
        place = self.slot_of(gpa // PAGE)
        if place is None:
            if access.outcome is Access.MMIO and access.gpa == gpa:
                return None
            return f"{access}: gpa {gpa:#x} is in no slot"
        hva = self.hvas[place[0]] + place[1] * PAGE
        if hva in self.unmapped or (write and hva in self.readonly):
            return None if access.outcome is Access.EFAULT else f"{access}: the host refuses it"
        if access.outcome is not Access.DONE or access.index != index:
            return f"{access}: gpa {gpa:#x} is RAM, through entry {index:#x}"
        if write and place[0] == 1 and self.slot1_logged:
            self.written.add(place[1])
        self.aging.on_guest_access(hva)
        return None

    def guest_access_racing(
        self, vcpu: int, ea_i: int, write: bool, steps: int, racer: str
    ) -> None:
        """A guest access paused after ``steps`` steps while ``racer`` runs (see RACERS);
        any outcome the interleaving allows is fine, the checks judge the state."""
        ea = EAS[ea_i]
        access_op = self.guest_access_op(vcpu, ea_i, write)
        index = self.index_of(ea)
        entry = self.entered.get(index) if index is not None else None

        def start() -> KernelOp[Any] | None:
            if racer == "dontneed":
                gfn = (entry.r // PAGE) if entry is not None else RAM0_GFN
                return self._dontneed_op(gfn)
            if racer == "h_remove":
                if index is not None:
                    kvmppc_do_h_remove(self.kvm, 0, index, 0)
                    del self.entered[index]
                return None
            if racer == "delete_slot1":
                return self._slot1_op(None)
            self.resize_prepare(20)
            self.resize_work()
            return ppc_resize.commit_op(self, 20)

        access = race(access_op, steps, start)
        self.log(f"racing {racer} after {steps} steps: {access}")
        if access.outcome is Access.DONE and write and entry is not None:
            place = self.slot_of(entry.r // PAGE)
            if place is not None and place[0] == 1 and self.slot1_logged:
                self.written.add(place[1])

    # -- the host -------------------------------------------------------------------------------

    def host_dontneed(self, slot: int, page: int) -> None:
        hva = self.hvas[slot] + page * PAGE
        if hva not in self.unmapped:
            assert self.host.madvise_dontneed(hva, PAGE) == 0
            self.aging.on_host_drop(hva, hva + PAGE)

    def host_write(self, slot: int, page: int) -> None:
        hva = self.hvas[slot] + page * PAGE
        if hva not in self.unmapped and hva not in self.readonly:
            assert self.host.host_write(hva, b"h") == 0

    def host_mprotect(self, slot: int, page: int, writable: bool) -> None:
        """mprotect of one page to read-only or back to read-write (a notifier when
        something is mapped; P9 for what is mapped after)."""
        hva = self.hvas[slot] + page * PAGE
        if hva in self.unmapped:
            return
        assert self.host.mprotect(hva, PAGE, RW if writable else PROT_READ) == 0
        self.aging.on_invalidate(hva, hva + PAGE)
        if writable:
            self.readonly.discard(hva)
        else:
            self.readonly.add(hva)

    def host_munmap(self, page: int) -> None:
        """munmap of one page of slot 0, for good: accesses to it fail with EFAULT."""
        hva = self.hvas[0] + page * PAGE
        assert self.host.munmap(hva, PAGE) == 0
        self.aging.on_host_drop(hva, hva + PAGE)
        self.unmapped.add(hva)
        self.readonly.discard(hva)

    def host_ages(self, slot: int) -> None:
        """The host ages the whole of one slot's memory with clear_young, then tests its first
        page (see :func:`~kvmspec.fuzz.ppc_aging.host_ages`)."""
        ppc_aging.host_ages(self, self.hvas[slot], SLOT_PAGES)

    def host_ages_page(self, slot: int, page: int, how: str) -> None:
        """Reclaim asks about one page of a slot, as ``how`` (one of :data:`AGINGS`) says
        (see :func:`~kvmspec.fuzz.ppc_aging.host_ages_page`)."""
        ppc_aging.host_ages_page(self, self.hvas[slot] + page * PAGE, how)

    # -- the VMM: memslots, dirty log, resize ---------------------------------------------------

    def _slot1_op(self, where: int | None) -> KernelOp[int] | None:
        if where is None and self.slot1_gfn is None:
            return None
        gfn = where if where is not None else self.slot1_gfn
        assert gfn is not None
        pages = 0 if where is None else SLOT_PAGES
        op = self.set_region_op(1, self._slot1_flags(), gfn, self.hvas[1], pages)

        def tracked() -> KernelOp[int]:
            errno = yield from op
            if errno == 0:
                self._slot1_moved(where)
            return errno

        return tracked()

    def _slot1_moved(self, where: int | None) -> None:
        if where is None or self.slot1_gfn is None:
            self.written.clear()  # a new slot starts a new log
        if self.slot1_gfn is not None:
            self.aging.on_translations_dropped()  # DELETE or MOVE: its entries were flushed
        self.slot1_gfn = where

    def change_slot1(self, where: int | None) -> None:
        """CREATE, DELETE or MOVE slot 1 (same host memory throughout)."""
        op = self._slot1_op(where)
        if op is not None:
            self.log(f"slot 1 to {where}: errno {run_to_completion(op)}")

    def toggle_slot1_log(self, logged: bool) -> None:
        """KVM_MEM_LOG_DIRTY_PAGES on or off for slot 1 (FLAGS_ONLY)."""
        if self.slot1_gfn is None or logged == self.slot1_logged:
            return
        self.slot1_logged = logged
        assert self.set_region(1, self._slot1_flags(), self.slot1_gfn, self.hvas[1]) == 0
        self.written.clear()

    def get_dirty_log(self) -> None:
        """KVM_GET_DIRTY_LOG of slot 1: every page the guest stored to since the last one
        must be reported (P3: a C bit is never lost)."""
        if self.slot1_gfn is None or not self.slot1_logged:
            return
        errno, words = run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(self.kvm, 1))
        self._expect(errno == 0, f"GET_DIRTY_LOG: errno {errno}")
        reported = {
            n * BITS_PER_LONG + bit
            for n, word in enumerate(words)
            for bit in range(BITS_PER_LONG)
            if word >> bit & 1
        }
        for offset in sorted(self.written - reported):
            self.found.append(f"P3: slot 1 page {offset} was stored to but not reported dirty")
        self.written.clear()

    def resize_prepare(self, order: int) -> None:
        """KVM_PPC_RESIZE_HPT_PREPARE (see :mod:`kvmspec.fuzz.ppc_resize`)."""
        ppc_resize.prepare(self, order)

    def resize_work(self) -> None:
        """The prepare work item runs (allocates the new table)."""
        ppc_resize.work(self)

    def resize_commit(self, order: int) -> None:
        """KVM_PPC_RESIZE_HPT_COMMIT, then P10 (see :func:`~kvmspec.fuzz.ppc_resize.commit_op`)."""
        run_to_completion(ppc_resize.commit_op(self, order))

    # -- seed 000 -------------------------------------------------------------------------------

    def hcalls_while_slot1_invalid(self, move: bool, ea_i: int, reenter_gfn_i: int) -> None:
        """DELETE or MOVE slot 1, and while it is INVALID (published, not yet flushed) the
        guest removes its entry for EAS[ea_i] and enters a new one at the same index for
        GFNS[reenter_gfn_i]. A removal must still find the INVALID slot (seed 000)."""
        if self.slot1_gfn is None:
            return
        where = None if not move else (MOVED_GFN if self.slot1_gfn == RAM1_GFN else RAM1_GFN)
        op = self._slot1_op(where)
        assert op is not None
        update = SteppedOp(op)
        while not update.done:
            slot = self.kvm.memslots(0).id_to_memslot(1)
            if slot is not None and slot.invalid:
                break
            update.step()
        ea = EAS[ea_i]
        index = self.index_of(ea)
        if not update.done and index is not None:
            entry = self.entered.pop(index)
            status, _, _ = kvmppc_do_h_remove(self.kvm, 0, index, 0)
            self._expect(status == H_SUCCESS, f"H_REMOVE {index:#x} in the window: {status}")
            r = ram_r(GFNS[reenter_gfn_i], PP_RWXX, ea)
            enter = kvmppc_do_h_enter(self.kvm, self.host, H_EXACT, index, entry.v, r)
            status, used = run_to_completion(enter)
            self._expect(status == H_SUCCESS, f"H_ENTER {index:#x} in the window: {status}")
            if status == H_SUCCESS:
                self._record(used, Entered(ea, entry.v, r))
        self.log(f"slot 1 {'MOVE' if move else 'DELETE'} with hcalls inside: {update.run()}")

    # -- the rules ------------------------------------------------------------------------------

    def _tolerated(self, line: str) -> bool:
        """Is ``line`` a known kernel finding this run was told to let pass?"""
        return any(line.startswith(prefix) for prefix in self.tolerated)

    def violations(self) -> list[str]:
        # One H_READ of every entry in use serves both the table's checks and the guest's.
        views = hpt_guest_entries(self.mmu)
        found = [str(v) for v in check_hpt(self.kvm, self.mmu, self.host, views)]
        found += [str(v) for v in check_mmio_cache(self.kvm, self.mmu)]
        for index, entry in sorted(self.entered.items()):
            view = views.get(index)
            v, r = view if view is not None else kvmppc_h_read(self.kvm, 0, index)[1][0]
            if v != entry.v | HPTE_V_VALID or r & ~(HPTE_R_R | HPTE_R_C) != entry.r:
                found.append(f"P4: H_READ {index:#x} gives ({v:#x}, {r:#x}), entered {entry}")
            unearned = ppc_hcalls.unearned_rc(self, "H_READ", index, r & (HPTE_R_R | HPTE_R_C))
            found += [unearned] if unearned is not None else []
        return found

    def check(self) -> None:
        """Raise :class:`RulesBroken` if the actions so far broke a rule."""
        self.checks += 1
        found = [line for line in self.found + self.violations() if not self._tolerated(line)]
        self.found = []
        if found:
            raise RulesBroken(found)
