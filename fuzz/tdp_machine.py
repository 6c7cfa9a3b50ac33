"""The x86 TDP MMU under test: a small VM (:class:`TdpVm`) and a Hypothesis state machine
(:class:`TdpMachine`) that interleaves its kernel operations.

The VM has the VMM's memory, one slot of guest RAM that can be moved, deleted and dirty
logged, and two vCPUs whose guest reads and writes go through the TDP MMU (gpa = gva).
The machine starts faults (each tries the lockless fast path first), aging walks, dirty-log
walks and fast zaps as generators and advances any of them one step at a time, in between
memslot updates (with the slot-zap-all quirk, or once it is disabled without), host munmaps
and madvises (MMU-notifier invalidations), host aging through the notifier, GET_DIRTY_LOG and
plain guest accesses; after every step it runs ``check_tdp_mmu`` (X13, X14, X15, X16, X5,
N4), with the quiescent checks only when nothing is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, Preempt, WaitUntil, run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmGfnRange, KvmMmuNotifier
from kvmspec.reference.page_fault import GuestAccess
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.reference.x86.spte import (
    EPT_MASKS,
    SpteMasks,
    kvm_mmu_reset_all_pte_masks,
    kvm_mmu_set_ept_masks,
)
from kvmspec.reference.x86.tdp_arch import TdpMmu, kvm_mmu_zap_all_fast
from kvmspec.reference.x86.tdp_fault import (
    kvm_tdp_page_fault,
    tdp_guest_access,
    tdp_hardware_walk,
)
from kvmspec.reference.x86.tdp_iter import TdpMmuPage
from kvmspec.reference.x86.tdp_mmu import (
    kvm_recover_nx_huge_pages,
    kvm_tdp_mmu_age_gfn_range,
    kvm_tdp_mmu_wrprot_slot,
)
from kvmspec.reference.x86.tdp_mmu_roots import kvm_mmu_load
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.x86_tdp import check_tdp_mmu
from kvmspec.spec.platforms import X86_64
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_X86_QUIRK_SLOT_ZAP_ALL
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
RW = PROT_READ | PROT_WRITE
SLOT = 1
DATA_GFN = 0x200 - 3
"""The slot starts 3 pages below a 2M boundary, so its range straddles two page tables."""
DATA_PAGES = 8
VCPUS = (0, 1)


class TdpVm:
    """One VM on the TDP MMU (EPT masks unless given) with one data slot and two vCPUs."""

    def __init__(
        self, masks: SpteMasks = EPT_MASKS, pml: bool = False, zap_all_quirk: bool = True
    ) -> None:
        self.mmu = self.make_mmu(masks, pml)
        self.kvm = Kvm(X86_64, self.mmu)
        if not zap_all_quirk:
            self.kvm.disabled_quirks |= KVM_X86_QUIRK_SLOT_ZAP_ALL
        self.host = HostMm(PAGE, X86_64.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.hva = self.host.mmap(DATA_PAGES * PAGE, RW)
        self.base: int | None = DATA_GFN
        self.flags = 0
        assert self.set_region(DATA_GFN, 0) == 0
        for vcpu_id in VCPUS:
            assert kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id) == 0

    def make_mmu(self, masks: SpteMasks, pml: bool) -> TdpMmu:
        """The MMU under test (tests plant bugs by overriding this)."""
        return TdpMmu(masks, pml)

    # -- what the VMM and the guest do ---------------------------------------------------------

    def set_region(self, gfn: int | None, flags: int) -> int:
        """Create, move or change flags of the data slot (gfn None: delete it)."""
        size = 0 if gfn is None else DATA_PAGES * PAGE
        region = MemoryRegion(SLOT, flags, (gfn or 0) * PAGE, size, self.hva)
        ret = run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))
        if ret == 0:
            self.base, self.flags = gfn, flags
        return ret

    def log_dirty(self, on: bool) -> int:
        if self.base is None:
            return 0
        return self.set_region(self.base, KVM_MEM_LOG_DIRTY_PAGES if on else 0)

    def get_dirty_log(self) -> list[int]:
        errno, words = run_to_completion(kvm_get_dirty_log_protect(self.kvm, SLOT))
        assert errno == 0
        return words

    def access(self, page: int, data: bytes | None, vcpu_id: int = 0) -> GuestAccess:
        """A guest load (8 bytes) or store at the start of data page ``page``."""
        base = DATA_GFN if self.base is None else self.base
        gpa = (base + page) * PAGE
        return tdp_guest_access(self.kvm, self.host, self.mmu, vcpu_id, gpa, data)

    def gfn(self, page: int) -> int:
        assert self.base is not None
        return self.base + page

    def slot_range(self, page: int, npages: int = 1) -> KvmGfnRange:
        slot = self.kvm.memslots(0).id_to_memslot(SLOT)
        assert slot is not None
        return KvmGfnRange(slot, self.gfn(page), self.gfn(page) + npages)

    # -- kernel operations that can be interleaved -----------------------------------------------

    def fault(self, page: int, write: bool, vcpu_id: int = 0) -> KernelOp[object]:
        """An EPT violation on data page ``page`` (the vCPU's root loaded first), reported
        as the CPU would now: a permission fault if its walk finds a usable leaf. (If that
        leaf allows the access, the fault is a stale one: another vCPU fixed the SPTE
        between the exit and its handling.)"""
        vcpu_mmu = self.mmu.vcpu_mmu(vcpu_id)
        kvm_mmu_load(self.kvm, self.mmu, vcpu_mmu, 0)
        assert vcpu_mmu.root is not None
        gfn = self.gfn(page)
        present = tdp_hardware_walk(self.mmu, vcpu_mmu.root, gfn) is not None
        vcpu = self.kvm.vcpus[vcpu_id]
        return kvm_tdp_page_fault(
            self.kvm, self.host, self.mmu, vcpu_mmu, vcpu, gfn * PAGE, write, present
        )

    def age(self, page: int, npages: int, test_only: bool = False) -> KernelOp[bool]:
        return kvm_tdp_mmu_age_gfn_range(
            self.kvm, self.mmu, self.slot_range(page, npages), test_only
        )

    def wrprot(self) -> KernelOp[bool]:
        """Write-protect the slot as enabling dirty logging does: the walk under the read
        side of mmu_lock, then the caller's flush (kvm_mmu_slot_apply_flags flushes
        unconditionally, so no TLB keeps a W the tables no longer give)."""
        slot = self.slot_range(0).slot  # the slot of now, before the first step

        def protect_and_flush() -> KernelOp[bool]:
            flush = yield from kvm_tdp_mmu_wrprot_slot(self.kvm, self.mmu, slot, 1)
            self.mmu.kvm_flush_remote_tlbs_memslot(self.kvm, slot)
            return flush

        return protect_and_flush()

    def tables(self, level: int) -> list[TdpMmuPage]:
        """The tables of ``level`` linked in a tree now, oldest first (the NX recovery
        list holds only those: a table leaves it when it is unlinked)."""
        linked = []
        for sp in self.mmu.tables.pages.values():
            if sp.level != level or sp.ptep is None or sp.unlinked or sp.freed:
                continue
            link = sp.ptep.sp.spt.get(sp.ptep.index, 0)
            if self.mmu.tables.spte_to_child_pt(link, level + 1) is sp:
                linked.append(sp)
        return linked

    def zap_tables(self, tables: list[TdpMmuPage]) -> KernelOp[int]:
        return kvm_recover_nx_huge_pages(self.kvm, self.mmu, tables)

    def zap_all_fast(self) -> KernelOp[None]:
        return kvm_mmu_zap_all_fast(self.kvm, self.mmu)

    # -- checking ---------------------------------------------------------------------------------

    def violations(self, quiescent: bool = True) -> list[Violation]:
        return check_tdp_mmu(self.kvm, self.mmu, self.host, quiescent)

    def check(self, quiescent: bool = True) -> None:
        found = self.violations(quiescent)
        if found:
            raise RulesBroken([str(v) for v in found])


def step(op: KernelOp[object]) -> tuple[bool, object]:
    """Advance ``op`` by one step: (True, its result) when it finished, else (False, what
    it yielded)."""
    try:
        return False, next(op)
    except StopIteration as done:
        return True, done.value


@dataclass
class InFlight:
    name: str
    op: KernelOp[object]
    waiting: WaitUntil | None = None


class TdpMachine(RuleBasedStateMachine):
    """Random interleavings of TDP MMU operations, checked after every step, on EPT with
    A/D bits and dirty logging by write-protection unless a subclass says otherwise
    (:func:`tdp_machine`)."""

    masks: SpteMasks = EPT_MASKS
    pml = False

    def __init__(self) -> None:
        super().__init__()
        self.vm = TdpVm(self.masks, self.pml)
        self.ops: list[InFlight] = []
        # The interleaving so far: which operation started, and which one took a step.
        self.schedule: list[str] = []

    def _start(self, name: str, op: KernelOp[object]) -> None:
        self.ops.append(InFlight(name, op))
        self.schedule.append(f"start {name}")

    def _lock_free(self) -> bool:
        """Writers (notifiers, harvests, the fast zap's first step) run in one step: only
        when no operation in flight holds the read side of mmu_lock (they would spin)."""
        return self.vm.kvm.mmu_lock.readers == 0

    def _no_readers(self) -> bool:
        """A memslot update also waits out the SRCU readers (faults in flight)."""
        return self._lock_free() and not self.vm.kvm.srcu.active

    @precondition(lambda self: len(self.ops) < 4)
    @rule(page=st.integers(0, DATA_PAGES - 1), write=st.booleans(), vcpu=st.sampled_from(VCPUS))
    def start_fault(self, page: int, write: bool, vcpu: int) -> None:
        if self.vm.base is not None:
            self._start(f"fault {page}", self.vm.fault(page, write, vcpu))

    @precondition(lambda self: len(self.ops) < 4)
    @rule(page=st.integers(0, DATA_PAGES - 1), npages=st.integers(1, 4))
    def start_age(self, page: int, npages: int) -> None:
        if self.vm.base is not None:
            self._start("age", self.vm.age(page, min(npages, DATA_PAGES - page)))

    @precondition(lambda self: len(self.ops) < 4)
    @rule()
    def start_wrprot(self) -> None:
        if self.vm.base is not None:
            self._start("wrprot", self.vm.wrprot())

    @precondition(lambda self: len(self.ops) < 4)
    @rule(level=st.integers(1, 3), which=st.integers(0, 3))
    def start_zap_table(self, level: int, which: int) -> None:
        tables = self.vm.tables(level)
        if tables:
            self._start("zap table", self.vm.zap_tables([tables[which % len(tables)]]))

    @precondition(lambda self: len(self.ops) < 4 and self._lock_free())
    @rule()
    def start_zap_all_fast(self) -> None:
        self._start("zap_all_fast", self.vm.zap_all_fast())

    @precondition(lambda self: bool(self.ops))
    @rule(which=st.integers(0, 3))
    def advance(self, which: int) -> None:
        runnable = [op for op in self.ops if op.waiting is None or op.waiting.ready()]
        if not runnable:
            raise AssertionError(f"deadlock: {[op.name for op in self.ops]}")
        chosen = runnable[which % len(runnable)]
        self.schedule.append(f"step {chosen.name}")
        done, value = step(chosen.op)
        if done:
            self.ops.remove(chosen)
        else:
            chosen.waiting = value if isinstance(value, WaitUntil) else None
            assert isinstance(value, Preempt | WaitUntil)

    @precondition(lambda self: not self.ops)
    @rule(page=st.integers(0, DATA_PAGES - 1), value=st.binary(min_size=8, max_size=8))
    def guest_write(self, page: int, value: bytes) -> None:
        self.vm.access(page, value)

    @precondition(lambda self: not self.ops)
    @rule(page=st.integers(0, DATA_PAGES - 1), vcpu=st.sampled_from(VCPUS))
    def guest_read(self, page: int, vcpu: int) -> None:
        self.vm.access(page, None, vcpu)

    @precondition(lambda self: self._no_readers())
    @rule(place=st.sampled_from([DATA_GFN, 0x400, None]))
    def set_region(self, place: int | None) -> None:
        """CREATE, MOVE (same size and flags) or DELETE the data slot (a DELETE of no
        slot is refused, EINVAL)."""
        self.vm.set_region(place, self.vm.flags)

    @precondition(lambda self: self._no_readers())
    @rule(on=st.booleans())
    def log_dirty(self, on: bool) -> None:
        self.vm.log_dirty(on)

    @precondition(lambda self: self._lock_free() and bool(self.vm.flags))
    @rule()
    def get_dirty_log(self) -> None:
        if self.vm.base is not None:
            self.vm.get_dirty_log()

    @precondition(lambda self: self._lock_free())
    @rule(page=st.integers(0, DATA_PAGES - 1), prot=st.sampled_from([None, PROT_READ, RW]))
    def host_change(self, page: int, prot: int | None) -> None:
        """madvise(DONTNEED) (``prot`` None) or mprotect of one page: an MMU-notifier
        invalidation either way."""
        hva = self.vm.hva + page * PAGE
        if prot is None:
            self.vm.host.madvise_dontneed(hva, PAGE)
        else:
            self.vm.host.mprotect(hva, PAGE, prot)

    @rule(page=st.integers(0, DATA_PAGES - 1), flush=st.booleans())
    def host_age(self, page: int, flush: bool) -> None:
        """The host's reclaim ages one page through the MMU notifier (clear_flush_young or,
        for the multi-gen LRU's walk, clear_young): KVM's lockless aging, in one step, even
        while operations hold the read side of mmu_lock."""
        self.vm.host.age(self.vm.hva + page * PAGE, flush)

    @precondition(lambda self: self._no_readers() and self.vm.kvm.quirk_slot_zap_all())
    @rule()
    def disable_slot_zap_all_quirk(self) -> None:
        """KVM_CAP_DISABLE_QUIRKS2 with KVM_X86_QUIRK_SLOT_ZAP_ALL (quirks are only ever
        disabled): from now on a DELETE or MOVE zaps only the slot's own leaves."""
        self.vm.kvm.disabled_quirks |= KVM_X86_QUIRK_SLOT_ZAP_ALL

    @invariant()
    def checked(self) -> None:
        # The campaign's counters, and the interleaving as the failing run's trace.
        machines.STATS["steps"] += 1
        machines.STATS["invariant_checks"] += 1
        machines.LAST_RUN["trace"] = "\n".join(self.schedule) + "\n"
        machines.LAST_RUN["suffix"] = ".schedule.txt"
        machines.LAST_RUN.pop("reproducer", None)
        self.vm.check(quiescent=not self.ops)


EPT_WITHOUT_AD_BITS = kvm_mmu_set_ept_masks(
    kvm_mmu_reset_all_pte_masks(46), has_ad_bits=False, has_exec_only=True
)
"""EPT without A/D bits: aging access-tracks leaves, dirty logging write-protects."""


def tdp_machine(ad_bits: bool = True, pml: bool = False) -> type[TdpMachine]:
    """The machine on EPT with or without A/D bits, logging dirty pages by write
    protection or (with A/D bits only) by PML."""
    if pml and not ad_bits:
        raise ValueError("PML needs A/D bits")
    masks = EPT_MASKS if ad_bits else EPT_WITHOUT_AD_BITS
    name = f"TdpMachine[{'ad' if ad_bits else 'no-ad'}{', pml' if pml else ''}]"
    return type(name, (TdpMachine,), {"masks": masks, "pml": pml})


__all__ = ["TdpMachine", "TdpVm", "step", "tdp_machine"]
