"""The fast page fault (X16) on the direct pages of the x86 shadow MMU: the 4K pieces of a
guest 2 MiB page in a dirty-logged slot, write-protected by a harvest (MMU-writable kept).
The fast path grants W back with a compare-and-exchange and logs the page; a zap between
its read and its exchange makes the exchange fail, so nothing zapped comes back; a plain
store in place of the exchange is caught by the rmap and host checks, and W granted on an
SPTE that is not MMU-writable by the fast path's own WARN."""

from __future__ import annotations

import pytest

from kvmspec.fuzz.x86_harness import (
    DATA_GFN,
    DATA_GVA,
    DATA_PAGES,
    PAGE,
    PD_B,
    PML4_B,
    HugeHarness,
    ShadowHarness,
)
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86 import fast_pf
from kvmspec.reference.x86.guest_access import Outcome
from kvmspec.reference.x86.mmu_page import ShadowMmuState, SptePtr
from kvmspec.reference.x86.paging import (
    PFERR_PRESENT_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PG_LEVEL_4K,
)
from kvmspec.reference.x86.paging_tmpl import KvmPageFault, RetPf
from kvmspec.reference.x86.spte import is_mmu_writable_spte, is_writable_pte
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES

GFN = 20
"""A data page of the guest's 2 MiB page (gva = gpa there)."""
WRITE_FAULT = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK


def _logged_and_harvested() -> HugeHarness:
    """Dirty logging on, the guest wrote page GFN (a 4K leaf in a direct page), and a
    harvest reported it and write-protected the leaf for the next write."""
    vm = HugeHarness()
    vm.toggle_log(True)
    assert vm.write(GFN * PAGE, b"one").outcome is Outcome.DONE
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0))[1][0] == 1 << GFN
    leaf = vm.leaf(0, GFN * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_4K
    assert not is_writable_pte(leaf[1]) and is_mmu_writable_spte(vm.mmu.masks, leaf[1])
    assert vm.violations() == []
    return vm


def _write_fault(vm: HugeHarness) -> KvmPageFault:
    fault = KvmPageFault(GFN * PAGE, WRITE_FAULT, GFN)
    fault.slot = vm.kvm.memslots(0).gfn_to_memslot(GFN)
    return fault


def _fast_page_fault(vm: HugeHarness) -> KernelOp[RetPf]:
    return fast_pf.fast_page_fault(
        vm.kvm, vm.mmu, vm.mmu.vcpu_mmu(0), vm.kvm.vcpus[0], _write_fault(vm)
    )


def test_a_dirty_logged_write_fixed_by_the_fast_path_is_logged() -> None:
    vm = _logged_and_harvested()
    assert run_to_completion(_fast_page_fault(vm)) is RetPf.FIXED
    leaf = vm.leaf(0, GFN * PAGE)
    assert leaf is not None and is_writable_pte(leaf[1])
    assert vm.mmu.stat["pf_fast"] == 1
    assert vm.violations() == []
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0))[1][0] == 1 << GFN
    # Once fixed, the same fault is spurious: another vCPU got there first.
    assert vm.write(GFN * PAGE, b"two").outcome is Outcome.DONE
    assert run_to_completion(_fast_page_fault(vm)) is RetPf.SPURIOUS


def test_the_fast_path_leaves_indirect_pages_and_read_faults_alone() -> None:
    """A read fault is never fast with A/D bits. A write-protected leaf of an indirect page
    (a data page the guest maps with a 4K PTE, write-protected by dirty logging, so still
    MMU-writable) is left to the slow path: its gfn is only what the guest PTE said."""
    vm = _logged_and_harvested()
    read = KvmPageFault(GFN * PAGE, PFERR_PRESENT_MASK | PFERR_USER_MASK, GFN)
    op = fast_pf.fast_page_fault(vm.kvm, vm.mmu, vm.mmu.vcpu_mmu(0), None, read)
    assert run_to_completion(op) is RetPf.INVALID
    shadow = ShadowHarness()
    assert shadow.write(DATA_GVA, b"one").outcome is Outcome.DONE
    flags = KVM_MEM_LOG_DIRTY_PAGES
    assert shadow.set_region(1, flags, DATA_GFN, DATA_PAGES, shadow.data_hva) == 0
    fault = KvmPageFault(DATA_GVA, WRITE_FAULT, DATA_GFN)
    fault.slot = shadow.kvm.memslots(0).gfn_to_memslot(DATA_GFN)
    sptep, spte = fast_pf.fast_pf_get_last_sptep(shadow.mmu, shadow.mmu.vcpu_mmu(0), DATA_GVA)
    assert sptep is not None and not sptep.sp.role.direct
    assert not is_writable_pte(spte) and is_mmu_writable_spte(shadow.mmu.masks, spte)
    op = fast_pf.fast_page_fault(shadow.kvm, shadow.mmu, shadow.mmu.vcpu_mmu(0), None, fault)
    assert run_to_completion(op) is RetPf.INVALID
    assert vm.mmu.stat["pf_fast"] == shadow.mmu.stat["pf_fast"] == 0


def _race_with_a_zap(vm: HugeHarness) -> RetPf:
    """Run the fast path to its exchange, zap the page's leaf (MADV_DONTNEED: the notifier
    drops it), then let the exchange happen."""
    op = _fast_page_fault(vm)
    assert next(op) == Preempt("fast page fault: SPTE read, compare-and-exchange next")
    assert vm.host.madvise_dontneed(vm.hva + GFN * PAGE, PAGE) == 0
    try:
        while True:
            next(op)
    except StopIteration as done:
        result: RetPf = done.value
    return result


def test_a_zap_between_the_read_and_the_exchange_is_not_undone() -> None:
    """X16: the zap changed the SPTE, so the exchange fails; the retry finds no SPTE and
    hands over to the slow path. Nothing was resurrected, nothing logged."""
    vm = _logged_and_harvested()
    assert _race_with_a_zap(vm) is RetPf.INVALID
    assert vm.leaf(0, GFN * PAGE) is None
    assert vm.violations() == []
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0))[1] == [0] * 16
    assert vm.write(GFN * PAGE, b"new").outcome is Outcome.DONE  # the slow path maps again
    assert vm.violations() == []


def test_a_fast_path_that_stores_without_compare_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: a plain store in place of the compare-and-exchange. It writes the
    old SPTE, made writable, over the zap: a leaf for a page the host took away, in no
    rmap (X1), and not the page the host maps now (N4)."""

    def store(
        kvm: Kvm,
        mmu: ShadowMmuState,
        vcpu: KvmVcpu | None,
        fault: KvmPageFault,
        sptep: SptePtr,
        old_spte: int,
        new_spte: int,
    ) -> bool:
        sptep.sp.set_spte(sptep.index, new_spte)
        return True

    monkeypatch.setattr(fast_pf, "fast_pf_fix_direct_spte", store)
    vm = _logged_and_harvested()
    assert _race_with_a_zap(vm) is RetPf.FIXED
    found = vm.violations()
    assert any(line.startswith("X1") for line in found)
    assert any(line.startswith("N4") for line in found)


def test_a_fast_path_that_ignores_mmu_writable_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: W granted whatever MMU-writable says. Page 4 of the 2 MiB page holds
    process B's page directory; once B runs, its gfn is write-tracked and its direct leaf
    loses MMU-writable. The fast path making it writable breaks X16 (and X3, X6)."""
    monkeypatch.setattr(fast_pf, "is_mmu_writable_spte", lambda masks, spte: True)
    vm = HugeHarness()
    vm.toggle_log(True)
    assert vm.read(PD_B * PAGE).outcome is Outcome.DONE  # a direct 4K leaf for gfn 4
    vm.set_cr3(1, PML4_B)
    assert vm.read(0, vcpu_id=1).outcome is Outcome.DONE  # B's PD is shadowed now
    leaf = vm.leaf(0, PD_B * PAGE)
    assert leaf is not None and not is_mmu_writable_spte(vm.mmu.masks, leaf[1])
    fault = KvmPageFault(PD_B * PAGE, WRITE_FAULT, PD_B)
    fault.slot = vm.kvm.memslots(0).gfn_to_memslot(PD_B)
    op = fast_pf.fast_page_fault(vm.kvm, vm.mmu, vm.mmu.vcpu_mmu(0), None, fault)
    assert run_to_completion(op) is RetPf.FIXED
    found = vm.violations()
    assert any(line.startswith("X16: WARN") for line in found)
    assert any(line.startswith("X6") for line in found)
