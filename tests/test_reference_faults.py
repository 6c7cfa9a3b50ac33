"""The page-fault protocol on the flat MMU: coherence with the host, MMIO and EFAULT exits,
dirty logging through faults, the N4 race, seed 004's migration, and INVALID slots."""

from __future__ import annotations

from errno import EBUSY

import pytest

from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.page_fault import Fault, guest_access, kvm_page_fault
from kvmspec.spec.invariants.translations import check_translations_match_host
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
GPA = 0x100000
RW = PROT_READ | PROT_WRITE


class Vm:
    """One model VM with the flat MMU, the VMM's host memory, and one 16-page slot."""

    def __init__(self, flags: int = 0, profile: PlatformProfile = DEFAULT_PROFILE) -> None:
        self.mmu = FlatMmu()
        self.kvm = Kvm(profile, self.mmu)
        self.host = HostMm(PAGE, profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.hva = self.host.mmap(16 * PAGE, RW)
        assert self.set_region(MemoryRegion(0, flags, GPA, 16 * PAGE, self.hva)) == 0

    def set_region(self, region: MemoryRegion) -> int:
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def write(self, gpa: int, data: bytes) -> Fault:
        return guest_access(self.kvm, self.host, 0, gpa, data)[0]

    def read(self, gpa: int, size: int = 4) -> tuple[Fault, bytes]:
        return guest_access(self.kvm, self.host, 0, gpa, None, size)

    def sound(self) -> bool:
        return check_translations_match_host(self.kvm, self.mmu, self.host) == []


def test_guest_and_host_see_the_same_memory() -> None:
    vm = Vm()
    assert vm.read(GPA) == (Fault.MAPPED, bytes(4))
    assert vm.write(GPA + 8, b"gues") == Fault.MAPPED
    assert vm.host.host_read(vm.hva + 8, 4) == (0, b"gues")
    assert vm.host.host_write(vm.hva + 16, b"host") == 0
    assert vm.read(GPA + 16) == (Fault.MAPPED, b"host")
    assert vm.host.madvise_dontneed(vm.hva, PAGE) == 0
    assert vm.read(GPA + 8) == (Fault.MAPPED, bytes(4))  # zero after MADV_DONTNEED
    assert vm.sound()


def test_breaking_copy_on_write_of_the_zero_page_tells_kvm() -> None:
    """Found by the generic machine: a guest read maps the shared zero page; a host write
    then gives the address its own page, and KVM must drop the zero-page translation first
    (the host invalidates around wp_page_copy), or the guest keeps reading zeroes."""
    vm = Vm()
    assert vm.read(GPA) == (Fault.MAPPED, bytes(4))
    assert vm.host.host_write(vm.hva, b"host") == 0
    assert vm.sound()
    assert vm.read(GPA) == (Fault.MAPPED, b"host")


def test_aging_sees_guest_accesses_and_clears_them() -> None:
    """Aging soundness on the flat MMU: an access since the last look is reported once, with
    or without the TLB flush, and aging never changes the translation (N7)."""
    vm = Vm()
    assert vm.read(GPA) == (Fault.MAPPED, bytes(4))
    pfn = vm.mmu.ptes[(0, GPA >> 12)].pfn
    assert vm.host.age(vm.hva, flush=False)  # the guest's access (and the host's fault-in)
    assert not vm.host.age(vm.hva, flush=False)
    vm.mmu.tlbs.clear()  # a TLB miss makes the walker set the accessed bit again
    assert vm.read(GPA) == (Fault.MAPPED, bytes(4))
    assert vm.host.age(vm.hva)
    assert vm.mmu.ptes[(0, GPA >> 12)].pfn == pfn and vm.sound()


def test_mmio_and_efault_exits() -> None:
    vm = Vm(flags=KVM_MEM_READONLY)
    vm.host.host_write(vm.hva, b"ro")
    assert vm.read(GPA) == (Fault.MAPPED, b"ro\x00\x00")
    assert vm.write(GPA, b"xx") == Fault.MMIO  # write to a READONLY slot
    assert vm.host.host_read(vm.hva, 2) == (0, b"ro")  # unchanged
    assert vm.read(0x4000_0000) == (Fault.MMIO, b"")  # no slot

    vm = Vm()
    assert vm.host.mprotect(vm.hva, 16 * PAGE, PROT_READ) == 0
    assert vm.write(GPA, b"x") == Fault.EFAULT  # too little protection on the hva
    assert vm.host.munmap(vm.hva, 16 * PAGE) == 0
    assert vm.read(GPA) == (Fault.EFAULT, b"")  # no VMA at all


def test_guest_writes_are_logged_and_reprotected() -> None:
    vm = Vm(flags=KVM_MEM_LOG_DIRTY_PAGES)
    vm.write(GPA + 5 * PAGE, b"a")
    vm.read(GPA + 7 * PAGE)
    errno, words = run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0))
    assert errno == 0 and words == [1 << 5]  # reads never log
    vm.write(GPA + 5 * PAGE, b"b")  # write-protected again by GET: faults and logs
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0)) == (0, [1 << 5])
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0)) == (0, [0])
    assert vm.sound()


def fault_paused_before_install(vm: Vm, gpa: int) -> KernelOp[Fault]:
    """A read fault run up to the point where it has resolved its pfn."""
    fault = kvm_page_fault(vm.kvm, vm.host, 0, gpa, write=False)
    while True:
        step = next(fault)
        if isinstance(step, Preempt) and "pfn resolved" in step.point:
            return fault


def finish(fault: KernelOp[Fault]) -> Fault:
    with pytest.raises(StopIteration) as done:
        while True:
            fault.send(None)
    result: Fault = done.value.value
    return result


def test_n4_a_fault_racing_an_invalidation_retries() -> None:
    """The central race: the fault resolves pfn P, the host drops the page and maps P', then
    the fault tries to install P. It must retry, leaving no translation to P."""
    vm = Vm()
    vm.host.host_write(vm.hva, b"old")
    old_pfn = vm.host.ptes[vm.hva].pfn
    fault = fault_paused_before_install(vm, GPA)

    vm.host.madvise_dontneed(vm.hva, PAGE)  # invalidate_range_start/end through KVM
    vm.host.host_write(vm.hva, b"new")  # the VMM now has another page there
    assert vm.host.ptes[vm.hva].pfn != old_pfn

    assert finish(fault) == Fault.RETRY
    assert all(pte.pfn != old_pfn for pte in vm.mmu.ptes.values())
    assert vm.read(GPA, 3) == (Fault.MAPPED, b"new")
    assert vm.sound()


def test_n4_without_the_retry_check_the_stale_page_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variant that skips the retry check installs the stale pfn; the invariant sees it."""
    import kvmspec.reference.page_fault as page_fault

    monkeypatch.setattr(page_fault, "mmu_invalidate_retry_gfn", lambda kvm, seq, gfn: False)
    vm = Vm()
    vm.host.host_write(vm.hva, b"old")
    fault = fault_paused_before_install(vm, GPA)
    vm.host.madvise_dontneed(vm.hva, PAGE)
    vm.host.host_write(vm.hva, b"new")
    assert finish(fault) == Fault.MAPPED
    rules = {v.rule for v in check_translations_match_host(vm.kvm, vm.mmu, vm.host)}
    assert rules == {"N4"}


def test_seed_004_an_unpinned_page_migrates_and_the_guest_refaults() -> None:
    vm = Vm()
    vm.write(GPA, b"apic")
    old_pfn = vm.mmu.ptes[(0, GPA >> 12)].pfn
    assert vm.host.migrate_page(vm.hva) == 0
    assert (0, GPA >> 12) not in vm.mmu.ptes  # the notifier dropped the translation
    assert vm.read(GPA) == (Fault.MAPPED, b"apic")  # refaulted to the new page
    assert vm.mmu.ptes[(0, GPA >> 12)].pfn not in (old_pfn,)
    assert vm.sound()

    vm.host.pages[vm.host.ptes[vm.hva].pfn].pins += 1  # pinned, as the old code did
    assert vm.host.migrate_page(vm.hva) == EBUSY


@pytest.mark.parametrize(
    ("profile", "expected"), [(DEFAULT_PROFILE, Fault.RETRY), (ARM64, Fault.MMIO)]
)
def test_a_fault_on_an_invalid_slot_follows_the_architecture(
    profile: PlatformProfile, expected: Fault
) -> None:
    """While a DELETE has published the INVALID copy, x86 retries the fault and arm64 and
    POWER treat the access as MMIO; neither maps the slot (M12)."""
    vm = Vm(profile=profile)
    vm.write(GPA, b"x")
    delete = kvm_main.kvm_vm_ioctl_set_memory_region(vm.kvm, MemoryRegion(0, 0, 0, 0, 0), 1)
    while not isinstance(step := next(delete), Preempt) or "dropped" not in step.point:
        pass  # up to the point where the INVALID copy is published and its mappings gone
    invalid = vm.kvm.memslots(0).id_to_memslot(0)
    assert invalid is not None and invalid.invalid
    assert not vm.mmu.ptes
    assert run_to_completion(kvm_page_fault(vm.kvm, vm.host, 0, GPA, write=False)) == expected
    assert not vm.mmu.ptes
    with pytest.raises(StopIteration):
        while True:
            delete.send(None)
    assert vm.read(GPA) == (Fault.MMIO, b"")


def test_the_dirty_ring_fills_exits_and_resets() -> None:
    """D7-D9 from guest writes: each first write of a page pushes one entry; at the soft limit
    (ring size minus 64 reserved) the vCPU exits with DIRTY_RING_FULL, before the write that
    reached it is done, until userspace harvests and resets, which write-protects the pages
    again so the next write is logged again."""
    from kvmspec.reference.capabilities import kvm_vm_ioctl_enable_cap
    from kvmspec.reference.dirty_log import kvm_vm_ioctl_reset_dirty_pages
    from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
    from kvmspec.spec.invariants.memslots import InvariantMonitor
    from kvmspec.spec.uapi.constants import CAPABILITIES

    mmu = FlatMmu()
    kvm = Kvm(DEFAULT_PROFILE, mmu)
    host = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
    host.notifier = KvmMmuNotifier(kvm)
    assert kvm_vm_ioctl_enable_cap(kvm, CAPABILITIES["KVM_CAP_DIRTY_LOG_RING"], 0, (4096,)) == 0
    assert kvm_vm_ioctl_create_vcpu(kvm, 0) == 0
    monitor = InvariantMonitor(kvm)
    _, hva = host.mmap(256 * PAGE, RW)
    region = MemoryRegion(0, KVM_MEM_LOG_DIRTY_PAGES, GPA, 256 * PAGE, hva)
    assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1)) == 0
    ring = kvm.vcpus[0].dirty_ring
    assert ring is not None and ring.size == 256 and ring.soft_limit == 192

    for page in range(191):
        assert guest_access(kvm, host, 0, GPA + page * PAGE, b"w")[0] == Fault.MAPPED
    # The fault of the write that publishes the 192nd entry fills the ring to its soft limit:
    # the vCPU exits before the write runs again, so it is not done (measured on the kernel).
    assert guest_access(kvm, host, 0, GPA + 191 * PAGE, b"w") == (Fault.DIRTY_RING_FULL, b"")
    assert ring.used() == 192 and ring.soft_full()
    assert guest_access(kvm, host, 0, GPA + 200 * PAGE, b"w")[0] == Fault.DIRTY_RING_FULL
    assert guest_access(kvm, host, 0, GPA, b"w")[0] == Fault.DIRTY_RING_FULL  # until reset
    assert monitor.check() == []

    assert len(ring.harvest()) == 192
    assert run_to_completion(kvm_vm_ioctl_reset_dirty_pages(kvm)) == (0, 192)
    assert ring.used() == 0 and monitor.check() == []
    assert not mmu.ptes[(0, GPA >> 12)].writable  # re-protected by the reset
    assert guest_access(kvm, host, 0, GPA, b"x")[0] == Fault.MAPPED
    assert ring.used() == 1 and ring.entries[192].offset == 0  # logged again, in order
    assert guest_access(kvm, host, 0, GPA, b"y")[0] == Fault.MAPPED
    assert ring.used() == 1  # writable now: no second entry until the next reset
