"""POWER Book3S HV with a hashed page table: the hypercalls' return codes, table by table;
the guest's view through H_READ (P4); R and C read after the tlbie (P3); the H_ENTER race
with an MMU notifier (P5); seed 000 (a deleted or moved slot leaves no translation); and a
state machine (kvmspec.fuzz.ppc_machine) that checks the chains and the P-invariants after every
step.

The white-box check of the HPT (P1, P2, P4-P7, P9, seed 000) is
``kvmspec.spec.invariants.ppc.check_hpt``.
"""

from __future__ import annotations

import errno

from kvmspec.fuzz.ppc_machine import ppc_machine
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import KvmMmuNotifier, kvm_mmu_notifier_clear_young
from kvmspec.reference.ppc.hcalls import (
    H_ANDCOND,
    H_AVPN,
    H_BULK_REMOVE_AVPN,
    H_BULK_REMOVE_END,
    H_BULK_REMOVE_REQUEST,
    H_EXACT,
    H_NOT_FOUND,
    H_PARAMETER,
    H_PTEG_FULL,
    H_READ_4,
    H_SUCCESS,
    kvmppc_do_h_enter,
    kvmppc_do_h_remove,
    kvmppc_h_bulk_remove,
    kvmppc_h_clear_mod,
    kvmppc_h_clear_ref,
    kvmppc_h_protect,
    kvmppc_h_read,
)
from kvmspec.reference.ppc.hpt import (
    KVMPPC_RMAP_PRESENT,
    Segment,
    chain_members,
    hpt_hash,
    hpte_encode_v,
    kvmppc_hv_find_lock_hpte,
    slot_rmap,
    unlock_hpte,
)
from kvmspec.reference.ppc.hpt_mmu import HptMmu, kvm_vm_ioctl_get_dirty_log_hv
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_I,
    HPTE_R_KEY,
    HPTE_R_M,
    HPTE_R_R,
    HPTE_R_RPN,
    HPTE_V_ABSENT,
    HPTE_V_HVLOCK,
    HPTE_V_LARGE,
    HPTE_V_VALID,
    PP_RWXX,
    PP_RXRX,
    PP_RXXX,
    hpte_is_writable,
    is_mmio_hpte,
)
from kvmspec.spec.invariants.ppc import check_hpt
from kvmspec.spec.platforms import PPC64_HV
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = PPC64_HV.page_size  # 64 KiB host pages: a gfn is 64 KiB
RW = PROT_READ | PROT_WRITE
SLOT_PAGES = 4
RAM0_GFN, RAM1_GFN, MMIO_GFN = 0, 8, 4
"""Slot 0 at gfn 0, slot 1 at gfn 8 (dirty-logged), nothing at gfn 4..7 (emulated MMIO)."""
ORDER = 18
"""The smallest table: 2048 groups, 16384 entries."""


def ram_r(gfn: int, pp: int = PP_RWXX, offset: int = 0) -> int:
    """The guest's "r" word for a 4 KiB page at ``offset`` in ``gfn``: M only, as RAM."""
    return (gfn * PAGE + offset) | HPTE_R_M | pp


def avpn_v(n: int) -> int:
    """A "v" word with AVPN ``n`` (H_ENTER does not check that it hashes to the group)."""
    return n << 7


class PpcVm:
    """An HPT guest with the VMM's memory behind two slots, its pages faulted in."""

    def __init__(self, mmu: HptMmu | None = None) -> None:
        self.mmu = mmu if mmu is not None else HptMmu(ORDER)
        self.kvm = Kvm(PPC64_HV, self.mmu)
        self.host = HostMm(PAGE, PPC64_HV.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        self.hvas = {}
        for slot, gfn, flags in ((0, RAM0_GFN, 0), (1, RAM1_GFN, KVM_MEM_LOG_DIRTY_PAGES)):
            _, hva = self.host.mmap(SLOT_PAGES * PAGE, RW)
            for page in range(SLOT_PAGES):
                assert self.host.host_write(hva + page * PAGE, b"x") == 0
            self.hvas[slot] = hva
            assert self.set_region(slot, flags, gfn, hva) == 0

    def set_region(self, slot: int, flags: int, gfn: int, hva: int, pages: int = SLOT_PAGES) -> int:
        region = MemoryRegion(slot, flags, gfn * PAGE, pages * PAGE, hva)
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def enter(self, pte_index: int, v: int, r: int, flags: int = 0) -> tuple[int, int]:
        return run_to_completion(kvmppc_do_h_enter(self.kvm, self.host, flags, pte_index, v, r))

    def violations(self) -> list[str]:
        return [str(v) for v in check_hpt(self.kvm, self.mmu, self.host)]


def test_the_check_sees_a_broken_chain_and_a_leaked_lock() -> None:
    vm = PpcVm()
    assert vm.enter(0, avpn_v(1), ram_r(RAM0_GFN)) == (H_SUCCESS, 0)
    assert vm.enter(8, avpn_v(2), ram_r(RAM0_GFN)) == (H_SUCCESS, 8)
    assert vm.violations() == []
    vm.mmu.hpt.rev_entry(8).back = 5
    vm.mmu.hpt.store(16, HPTE_V_HVLOCK, 0)
    assert vm.violations() == [
        "P2: chain 0:0 broken after 0x0",
        "P1: HPTE 0x10 left locked",
    ]


# -- hypercall return codes, one table per call ---------------------------------------------


def test_h_enter_return_codes() -> None:
    vm = PpcVm()
    large_bad_lp = (HPTE_V_LARGE, 2 << 12)
    cases = [
        # (index, v, r, flags, status, index used)
        (0, avpn_v(1), ram_r(RAM0_GFN), 0, H_SUCCESS, 0),
        (3, avpn_v(2), ram_r(RAM0_GFN, offset=0x1000), 0, H_SUCCESS, 1),  # first free slot
        (5, avpn_v(3), ram_r(RAM0_GFN), H_EXACT, H_SUCCESS, 5),
        (5, avpn_v(4), ram_r(RAM0_GFN), H_EXACT, H_PTEG_FULL, 0),
        (0, large_bad_lp[0], large_bad_lp[1], 0, H_PARAMETER, 0),  # no such page size
        (1 << 14, avpn_v(5), ram_r(RAM0_GFN), 0, H_PARAMETER, 0),  # past the table
        (0, avpn_v(6) | HPTE_V_LARGE, RAM0_GFN * PAGE, 0, H_PARAMETER, 0),  # 16M in 4 pages
        (8, avpn_v(7), ram_r(MMIO_GFN), 0, H_SUCCESS, 8),  # emulated MMIO
    ]
    for index, v, r, flags, status, used in cases:
        assert vm.enter(index, v, r, flags) == (status, used), (index, v, r, flags)
    for i in range(8):
        assert vm.enter(16, avpn_v(10 + i), ram_r(RAM1_GFN))[0] == H_SUCCESS
    assert vm.enter(16, avpn_v(20), ram_r(RAM1_GFN)) == (H_PTEG_FULL, 0)
    assert vm.violations() == []


def test_h_enter_entries_are_only_as_good_as_the_host_page() -> None:
    vm = PpcVm()
    hpt = vm.mmu.hpt
    # RAM: valid, with the host's address, on the chain of its gfn.
    assert vm.enter(0, avpn_v(1), ram_r(RAM1_GFN + 1, offset=0x3000))[0] == H_SUCCESS
    host_pfn = vm.host.lookup(vm.hvas[1] + PAGE)
    assert host_pfn is not None
    assert hpt.v(0) & HPTE_V_VALID and (hpt.r(0) & HPTE_R_RPN) == host_pfn.pfn * PAGE | 0x3000
    slot1 = vm.kvm.memslots(0).id_to_memslot(1)
    assert slot1 is not None and chain_members(hpt, slot_rmap(slot1).get(1)) == [0]
    # MMIO: absent, key 31, on no chain (P7).
    assert vm.enter(8, avpn_v(2), ram_r(MMIO_GFN))[0] == H_SUCCESS
    assert is_mmio_hpte(hpt.v(8), hpt.r(8))
    # A page the host has not faulted in: absent, no key, H_READ still shows it valid.
    assert vm.host.madvise_dontneed(vm.hvas[0], PAGE) == 0
    assert vm.enter(16, avpn_v(3), ram_r(RAM0_GFN))[0] == H_SUCCESS
    assert hpt.v(16) & HPTE_V_ABSENT and not hpt.r(16) & HPTE_R_KEY
    assert kvmppc_h_read(vm.kvm, 0, 16) == (H_SUCCESS, [(avpn_v(3) | HPTE_V_VALID, ram_r(0))])
    # A read-only host page (P9): the guest asked for RW, the hardware gets RO.
    assert vm.host.mprotect(vm.hvas[1] + 2 * PAGE, PAGE, PROT_READ) == 0
    assert vm.enter(24, avpn_v(4), ram_r(RAM1_GFN + 2))[0] == H_SUCCESS
    assert hpt.v(24) & HPTE_V_VALID and not hpte_is_writable(hpt.r(24))
    assert kvmppc_h_read(vm.kvm, 0, 24)[1][0][1] == ram_r(RAM1_GFN + 2)  # the guest's RW
    # Cache-inhibited device memory mapped as RAM is refused; mapped I, accepted.
    device = vm.host.memory.add_device("bar", PAGE)
    _, bar = vm.host.mmap(PAGE, RW, device)
    assert vm.set_region(2, 0, 32, bar, pages=1) == 0
    assert vm.host.lookup(bar) is None and vm.host.fault_in(bar, write=True)[0] == 0
    assert vm.enter(32, avpn_v(5), ram_r(32)) == (H_PARAMETER, 0)
    assert vm.enter(32, avpn_v(5), 32 * PAGE | HPTE_R_I)[0] == H_SUCCESS
    assert vm.violations() == []


def test_h_remove_return_codes() -> None:
    vm = PpcVm()
    vm.enter(0, avpn_v(1) | 0x10, ram_r(RAM0_GFN))
    cases = [
        # (flags, index, avpn, status)
        (0, 1 << 14, 0, H_PARAMETER),
        (0, 1, 0, H_NOT_FOUND),  # free
        (H_AVPN, 0, avpn_v(2), H_NOT_FOUND),
        (H_ANDCOND, 0, 0x10, H_NOT_FOUND),  # the entry has the bit
        (H_AVPN, 0, avpn_v(1) | 0x10, H_NOT_FOUND),  # the low 7 bits are not compared
        (H_ANDCOND, 0, 0x08, H_SUCCESS),
        (0, 0, 0, H_NOT_FOUND),  # removed already
    ]
    for flags, index, avpn, status in cases:
        assert kvmppc_do_h_remove(vm.kvm, flags, index, avpn)[0] == status, (flags, index)
    vm.enter(0, avpn_v(1), ram_r(RAM0_GFN))
    assert kvmppc_do_h_remove(vm.kvm, H_AVPN, 0, avpn_v(1)) == (
        H_SUCCESS,
        avpn_v(1) | HPTE_V_VALID,
        ram_r(RAM0_GFN),
    )
    assert vm.violations() == []


def bulk(kind: int, condition: int, index: int) -> int:
    return kind | condition | index


def test_h_bulk_remove_answers_each_request() -> None:
    vm = PpcVm()
    vm.enter(0, avpn_v(1), ram_r(RAM0_GFN))
    vm.enter(8, avpn_v(2), ram_r(MMIO_GFN))
    assert vm.mmu.guest_access(0, 0, write=True)  # R and C set in the hardware entry
    request = H_BULK_REMOVE_REQUEST
    args = [
        bulk(request, 0, 0), 0,
        bulk(request, H_BULK_REMOVE_AVPN, 8), avpn_v(9),  # wrong AVPN
        bulk(request, 0, 16), 0,  # free
        bulk(H_BULK_REMOVE_END, 0, 0), 0,
    ]  # fmt: skip
    status, out = kvmppc_h_bulk_remove(vm.kvm, args)
    assert status == H_SUCCESS
    assert out[0] == 0x80 << 56 | 3 << 58  # removed, with R and C
    assert out[2] == 0x92 << 56 | 8
    assert out[4] == 0x90 << 56 | 16
    assert out[6] == H_BULK_REMOVE_END
    # A bad request type or condition stops the call with a parameter error.
    args = [bulk(request, 0, 8), 0, bulk(2 << 62, 0, 1), 0, bulk(request, 0, 1), 0, 0, 0]
    status, out = kvmppc_h_bulk_remove(vm.kvm, args)
    assert status == H_PARAMETER
    assert out[0] == 0x80 << 56 | 8 and out[2] == 0xA0 << 56 | 1 and out[4] == args[4]
    assert kvmppc_h_bulk_remove(vm.kvm, [bulk(request, 3 << 56, 0), 0] + [0] * 6)[0] == (
        H_PARAMETER
    )
    assert vm.violations() == []


def test_h_protect_return_codes_and_no_upgrade() -> None:
    vm = PpcVm()
    vm.enter(0, avpn_v(1), ram_r(RAM0_GFN, pp=PP_RXRX))
    cases = [
        (0, 1 << 14, 0, H_PARAMETER),
        (0, 1, 0, H_NOT_FOUND),
        (H_AVPN, 0, avpn_v(2), H_NOT_FOUND),
        (H_AVPN, 0, avpn_v(1), H_SUCCESS),
    ]
    for flags, index, avpn, status in cases:
        assert kvmppc_h_protect(vm.kvm, flags | PP_RWXX, index, avpn) == status
    # The guest sees RW; the hardware keeps the valid entry read-only (P8): a store traps.
    assert kvmppc_h_read(vm.kvm, 0, 0)[1][0][1] & 3 == PP_RWXX
    assert not hpte_is_writable(vm.mmu.hpt.r(0))
    assert not vm.mmu.guest_access(0, 0, write=True)
    # Downgrades reach the hardware, after a tlbie, keeping the R the hardware set.
    vm.enter(8, avpn_v(3), ram_r(RAM0_GFN))
    assert vm.mmu.guest_access(0, 8, write=False)
    assert kvmppc_h_protect(vm.kvm, PP_RXXX & 3 | 1 << 8, 8, 0) == H_SUCCESS  # PP0 via bit 8
    assert vm.mmu.hpt.r(8) & HPTE_R_R and not hpte_is_writable(vm.mmu.hpt.r(8))
    assert vm.violations() == []


def test_h_read_return_codes_and_the_quad() -> None:
    vm = PpcVm()
    vm.enter(4, avpn_v(1), ram_r(RAM0_GFN), H_EXACT)
    vm.enter(6, avpn_v(2), ram_r(MMIO_GFN), H_EXACT)
    assert kvmppc_h_read(vm.kvm, 0, 1 << 14) == (H_PARAMETER, [])
    status, quad = kvmppc_h_read(vm.kvm, H_READ_4, 7)
    assert status == H_SUCCESS
    assert quad == [
        (avpn_v(1) | HPTE_V_VALID, ram_r(RAM0_GFN)),
        (0, 0),
        (avpn_v(2) | HPTE_V_VALID, ram_r(MMIO_GFN)),  # absent MMIO reads as entered
        (0, 0),
    ]


def test_h_clear_ref_and_h_clear_mod() -> None:
    vm = PpcVm()
    hpt = vm.mmu.hpt
    vm.enter(0, avpn_v(1), ram_r(RAM1_GFN))
    assert kvmppc_h_clear_ref(vm.kvm, 0, 1 << 14) == (H_PARAMETER, 0)
    assert kvmppc_h_clear_mod(vm.kvm, 0, 1) == (H_NOT_FOUND, 0)
    assert vm.mmu.guest_access(0, 0, write=True)
    assert kvmppc_h_clear_ref(vm.kvm, 0, 0) == (H_SUCCESS, ram_r(RAM1_GFN) | HPTE_R_R | HPTE_R_C)
    assert not hpt.r(0) & HPTE_R_R  # cleared in the hardware entry, with a tlbie
    assert kvmppc_h_clear_mod(vm.kvm, 0, 0) == (H_SUCCESS, ram_r(RAM1_GFN) | HPTE_R_C)
    assert not hpt.r(0) & HPTE_R_C and hpt.v(0) & HPTE_V_VALID
    # The guest cleared C, but the host's dirty log still has the page (P3).
    assert run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(vm.kvm, 1)) == (0, [1])
    assert vm.violations() == []


def test_rc_are_read_after_the_tlbie() -> None:
    """P3/P6: a store through a TLB entry owes the HPTE its C until a tlbie completes.
    H_REMOVE reads C after its tlbie, so the guest's view and the dirty log both get it."""
    vm = PpcVm()
    vm.enter(0, avpn_v(1), ram_r(RAM1_GFN + 2))
    assert vm.mmu.guest_access(0, 0, write=False)  # TLB filled, R set
    assert vm.mmu.guest_access(0, 0, write=True)  # C still pending in the TLB
    assert not vm.mmu.hpt.r(0) & HPTE_R_C
    status, _, r = kvmppc_do_h_remove(vm.kvm, 0, 0, 0)
    assert status == H_SUCCESS and r & HPTE_R_C
    assert run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(vm.kvm, 1)) == (0, [1 << 2])
    assert vm.violations() == []


def test_dirty_harvest_collects_a_pending_c_and_leaves_the_entry_valid() -> None:
    vm = PpcVm()
    vm.enter(0, avpn_v(1), ram_r(RAM1_GFN + 3))
    assert vm.mmu.guest_access(0, 0, write=False)
    assert vm.mmu.guest_access(1, 0, write=True)  # vCPU 1 fills with C set at once
    assert vm.mmu.guest_access(0, 0, write=True)  # vCPU 0 already had it: nothing owed
    assert run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(vm.kvm, 1)) == (0, [1 << 3])
    assert run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(vm.kvm, 1)) == (0, [0])
    assert vm.mmu.hpt.v(0) & HPTE_V_VALID
    assert vm.mmu.guest_access(0, 0, write=True)  # refills: the tlbie dropped it
    assert run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(vm.kvm, 1)) == (0, [1 << 3])
    assert vm.violations() == []


def test_the_hash_finds_an_entry_the_guest_entered_in_its_group() -> None:
    vm = PpcVm()
    hpt = vm.mmu.hpt
    segment = Segment(vsid=0x1234)
    for ea in (0x5000, 0x0FFF_F000):
        group = hpt_hash(hpt, segment, ea)
        status, index = vm.enter(group * 8, hpte_encode_v(segment, ea), ram_r(RAM0_GFN))
        assert status == H_SUCCESS
        found = kvmppc_hv_find_lock_hpte(vm.kvm, hpt, segment, ea, HPTE_V_VALID | HPTE_V_ABSENT)
        assert found == index
        unlock_hpte(vm.kvm, hpt, found, hpt.v(found))
    assert kvmppc_hv_find_lock_hpte(vm.kvm, hpt, segment, 0x7000, HPTE_V_VALID) == -1
    assert vm.violations() == []


def test_aging_reads_and_clears_r() -> None:
    vm = PpcVm()
    vm.enter(0, avpn_v(1), ram_r(RAM0_GFN))
    hva = vm.hvas[0]
    assert not kvm_mmu_notifier_clear_young(vm.kvm, hva, hva + PAGE)  # no access yet
    assert vm.mmu.guest_access(0, 0, write=False)
    assert vm.host.notifier is not None and vm.host.notifier.test_young(hva)
    assert kvm_mmu_notifier_clear_young(vm.kvm, hva, hva + PAGE)
    assert not vm.host.notifier.test_young(hva)
    # R moved into the guest's view, which H_READ still shows.
    assert kvmppc_h_read(vm.kvm, 0, 0)[1][0][1] & HPTE_R_R
    assert vm.violations() == []


# -- P5: H_ENTER racing an invalidation ---------------------------------------------------------


def h_enter_racing_dontneed(vm: PpcVm, h_enter: KernelOp[tuple[int, int]]) -> tuple[int, int]:
    """H_ENTER reads the host PTE; the VMM drops the page before H_ENTER takes the rmap
    lock; H_ENTER finishes."""
    assert isinstance(next(h_enter), Preempt)
    assert vm.host.madvise_dontneed(vm.hvas[0], PAGE) == 0
    return run_to_completion(h_enter)


def test_h_enter_racing_an_invalidation_enters_the_entry_absent() -> None:
    vm = PpcVm()
    h_enter = kvmppc_do_h_enter(vm.kvm, vm.host, 0, 0, avpn_v(1), ram_r(RAM0_GFN))
    assert h_enter_racing_dontneed(vm, h_enter) == (H_SUCCESS, 0)
    assert vm.mmu.hpt.v(0) & HPTE_V_ABSENT
    assert vm.violations() == []


def test_without_the_retry_check_the_race_leaves_a_stale_translation() -> None:
    """The planted bug: skip the sequence check (pretend no invalidation ever ran)."""
    vm = PpcVm()
    h_enter = kvmppc_do_h_enter(vm.kvm, vm.host, 0, 0, avpn_v(1), ram_r(RAM0_GFN))
    assert isinstance(next(h_enter), Preempt)
    assert vm.host.madvise_dontneed(vm.hvas[0], PAGE) == 0
    vm.kvm.mmu_invalidate_seq -= 1  # as if the snapshot had been taken after the invalidation
    assert run_to_completion(h_enter) == (H_SUCCESS, 0)
    assert vm.violations() == [
        "P5: valid HPTE 0x0 maps a page the host no longer maps there",
    ]


# -- seed 000: deleting or moving a slot removes every translation through it -------------------


def enter_everywhere(vm: PpcVm) -> list[int]:
    """Two entries for each page of both slots (two chains' worth), and one MMIO entry."""
    used = []
    for n, gfn in enumerate([RAM0_GFN + i for i in range(SLOT_PAGES)] * 2):
        used.append(vm.enter(8 * n, avpn_v(n), ram_r(gfn, offset=0x1000 * n))[1])
    for n, gfn in enumerate([RAM1_GFN + i for i in range(SLOT_PAGES)] * 2, start=16):
        used.append(vm.enter(8 * n, avpn_v(n), ram_r(gfn))[1])
    used.append(vm.enter(8 * 40, avpn_v(40), ram_r(MMIO_GFN))[1])
    assert vm.violations() == []
    return used


def test_seed_000_delete_removes_every_translation() -> None:
    """Seed 000: kvm_arch_flush_shadow "removes all translations mapped via memslots";
    on POWER that is every hardware entry found through the slot's rmaps, made ABSENT, and
    the rmaps emptied. The guest's entries stay (it still reads them as valid); an access
    traps and finds no memory there. Slot 0 is not touched."""
    vm = PpcVm()
    used = enter_everywhere(vm)
    slot1 = vm.kvm.memslots(0).id_to_memslot(1)
    assert slot1 is not None
    rmap = slot_rmap(slot1)
    assert vm.mmu.guest_access(0, used[8], write=True)
    assert vm.set_region(1, 0, RAM1_GFN, vm.hvas[1], pages=0) == 0  # DELETE
    hpt = vm.mmu.hpt
    for index in used[8:16]:
        assert hpt.v(index) & HPTE_V_ABSENT and not hpt.v(index) & HPTE_V_VALID
        assert kvmppc_h_read(vm.kvm, 0, index)[1][0][0] & HPTE_V_VALID
        assert not vm.mmu.guest_access(0, index, write=False)
    for index in used[:8]:
        assert hpt.v(index) & HPTE_V_VALID
    assert not any(word & KVMPPC_RMAP_PRESENT for word in rmap.words.values())
    assert rmap.freed
    # The store made before the deletion was harvested into the entry's guest view.
    assert kvmppc_h_read(vm.kvm, 0, used[8])[1][0][1] & HPTE_R_C
    assert vm.violations() == []


def test_seed_000_move_removes_every_translation_and_keeps_the_rmap() -> None:
    vm = PpcVm()
    used = enter_everywhere(vm)
    slot1 = vm.kvm.memslots(0).id_to_memslot(1)
    assert slot1 is not None
    rmap = slot_rmap(slot1)
    assert vm.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, 16, vm.hvas[1]) == 0  # MOVE to gfn 16
    moved = vm.kvm.memslots(0).id_to_memslot(1)
    assert moved is not None and moved.base_gfn == 16 and slot_rmap(moved) is rmap
    assert not any(word & KVMPPC_RMAP_PRESENT for word in rmap.words.values())
    assert all(vm.mmu.hpt.v(index) & HPTE_V_ABSENT for index in used[8:16])
    # New entries at the new place chain into the same array.
    assert vm.enter(8 * 50, avpn_v(50), ram_r(16))[0] == H_SUCCESS
    assert chain_members(vm.mmu.hpt, rmap.get(0)) == [8 * 50]
    assert vm.violations() == []


class SkipsTheSlotFlush(HptMmu):
    """A planted bug: DELETE and MOVE do not flush the slot."""

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        self.events.append(("flush_shadow_memslot", slot))


def test_seed_000_a_missing_flush_is_caught() -> None:
    vm = PpcVm(SkipsTheSlotFlush(ORDER))
    used = enter_everywhere(vm)
    assert vm.set_region(1, 0, RAM1_GFN, vm.hvas[1], pages=0) == 0
    problems = vm.violations()
    assert len(problems) == 8
    assert (
        problems[0]
        == f"S000-NO-HPTE-OUTSIDE-SLOTS: valid HPTE {used[8]:#x} maps gfn {RAM1_GFN:#x}, "
        "in no usable slot"
    )
    assert vm.mmu.guest_access(0, used[8], write=True)  # the guest writes freed memory


# -- the state machine (kvmspec.fuzz.ppc_machine) -------------------------------------------------

HptMachine = ppc_machine(PPC64_HV)
"""Hypercalls, guest accesses through the fault path, host invalidations, aging, dirty
harvests, memslot changes, HPT resizes and races, in any order; every invariant after each
step, and the guest's view of every entry against what the guest entered (P4)."""
TestHptMachine = HptMachine.TestCase


def test_read_only_slots_do_not_exist_on_book3s_hv() -> None:
    """P9's slot half is vacuous here: Book3S HV refuses KVM_MEM_READONLY (no
    KVM_CAP_READONLY_MEM), so host writability is the one limit on an HPTE's rights."""
    vm = PpcVm()
    _, hva = vm.host.mmap(PAGE, RW)
    assert vm.set_region(2, KVM_MEM_READONLY, 32, hva, pages=1) == errno.EINVAL
    assert vm.violations() == []
