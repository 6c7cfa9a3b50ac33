"""A Hypothesis state machine over the POWER radix MMU: guest accesses (the hardware setting R
and C and faulting), faults interleaved with host events, memslot changes, aging and dirty
harvests, with ``check_radix``, dirty-log completeness and the aging contract checked after
every step.

``RadixHarness`` is the model and its actors, one method per action; ``RadixMachine`` draws
the actions. The layout keeps every slot aligned to 2 MiB and a whole number of 2 MiB long:
the kernel does not keep a huge leaf inside its slot (see radix_fault.py), and the machine
is about everything else.

Dirty-log completeness (C-DIRTY-COMPLETE): every page the guest stored to in a logged slot
since the last harvest is reported by the next one, unless the slot stopped logging or was
deleted in between; a MOVE keeps the slot's bitmap, and with it what the slot owes.

Aging (C-AGING, :class:`~kvmspec.spec.aging_contract.AgingContract`): a page the guest used
since its last aging is reported young, loose after an aging without a TLB flush (radix
aging flushes nothing itself) and across the zaps of host invalidations and slot flushes.
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, run_to_completion
from kvmspec.reference.host import PROT_READ, PROT_WRITE
from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import (
    KvmMmuNotifier,
    kvm_mmu_notifier_clear_flush_young,
    kvm_mmu_notifier_clear_young,
    kvm_mmu_notifier_test_young,
)
from kvmspec.reference.page_fault import Fault
from kvmspec.reference.ppc.radix_fault import kvmppc_book3s_radix_page_fault, radix_guest_access
from kvmspec.reference.ppc.radix_mmu import RadixMmu, kvm_vm_ioctl_get_dirty_log_hv
from kvmspec.reference.ppc.radix_pgtable import PMD_SHIFT, radix_host_mm
from kvmspec.spec.aging_contract import AgingContract
from kvmspec.spec.invariants.ppc_radix import check_radix
from kvmspec.spec.platforms import PPC64_HV_RADIX as PPC64_RADIX
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = PPC64_RADIX.page_size
HUGE = 1 << PMD_SHIFT
SLOT_BLOCKS = (2, 1)
"""Slot 0 is two huge blocks long, slot 1 one."""
SLOT_PLACES = ((0, 8 * HUGE), (16 * HUGE, 24 * HUGE))
"""Where each slot may sit (gpa); a MOVE goes to the other place."""
PAGES = (0, 1, 17, 31)
"""Pages of a 2 MiB block (32 pages of 64 KiB) the actions touch."""
HOST_EVENTS = ("dontneed", "migrate", "collapse", "split", "mprotect_ro", "mprotect_rw")


class AgingNotifier(KvmMmuNotifier):
    """KVM's MMU notifier, which also tells the aging contract of every range the host
    invalidates: KVM zaps the leaves there, their accessed bits and their TLB entries with
    them (the contract's looseness)."""

    def __init__(self, kvm: Kvm, aging: AgingContract) -> None:
        super().__init__(kvm)
        self.aging = aging

    def invalidate_range_start(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        self.aging.on_invalidate(start, end)
        super().invalidate_range_start(start, end, event)


class RadixHarness:
    """A radix guest, the VMM's memory behind two slots, and the actions on them."""

    def __init__(self, mmu: RadixMmu | None = None) -> None:
        self.mmu = mmu if mmu is not None else RadixMmu(PPC64_RADIX.page_shift)
        self.kvm = Kvm(PPC64_RADIX, self.mmu)
        self.host = radix_host_mm(PAGE, PPC64_RADIX.user_address_limit)
        self.aging = AgingContract(PAGE)
        self.host.notifier = AgingNotifier(self.kvm, self.aging)
        self.hvas: list[int] = []
        self.places = [0, 0]
        self.flags = [0, KVM_MEM_LOG_DIRTY_PAGES]
        self.present = [True, True]
        self.written: list[set[int]] = [set(), set()]
        for slot, blocks in enumerate(SLOT_BLOCKS):
            errno, hva = self.host.mmap(blocks * HUGE, PROT_READ | PROT_WRITE, hugepage=True)
            assert errno == 0
            for block in range(blocks):
                assert self.host.host_write(hva + block * HUGE, b"v") == 0
            assert self.host.madvise_collapse(hva, blocks * HUGE) == 0
            self.hvas.append(hva)
            self._set_region(slot)

    # -- helpers ----------------------------------------------------------------------------------

    def _set_region(self, slot: int) -> None:
        """Create, delete, move or change the flags of ``slot`` as ``present``, ``places``
        and ``flags`` say. Every such change except a creation flushes the slot, dropping
        the accessed bits of its leaves (C-AGING's looseness)."""
        size = SLOT_BLOCKS[slot] * HUGE if self.present[slot] else 0
        gpa = SLOT_PLACES[slot][self.places[slot]]
        region = MemoryRegion(slot, self.flags[slot], gpa, size, self.hvas[slot])
        op = kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1)
        assert run_to_completion(op) == 0
        self.aging.on_translations_dropped()

    def gpa(self, slot: int, block: int, page: int) -> int:
        return (
            SLOT_PLACES[slot][self.places[slot]] + (block % SLOT_BLOCKS[slot]) * HUGE + page * PAGE
        )

    def hva(self, slot: int, block: int, page: int) -> int:
        return self.hvas[slot] + (block % SLOT_BLOCKS[slot]) * HUGE + page * PAGE

    # -- actions ----------------------------------------------------------------------------------

    def guest_access(self, slot: int, block: int, page: int, write: bool) -> Fault:
        gpa = self.gpa(slot, block, page)
        outcome, _ = radix_guest_access(self.kvm, self.host, gpa, b"g" if write else None)
        expected = {Fault.RETRY, Fault.MAPPED if self.present[slot] else Fault.MMIO}
        vma = self.host.find_vma(self.hva(slot, block, page))
        if write and vma is not None and not vma.prot & PROT_WRITE:
            expected.add(Fault.EFAULT)  # a store to memory the host mapped read-only
        if outcome not in expected:
            raise RulesBroken([f"C-COHERENCE: access to {gpa:#x} ended {outcome}"])
        if write and outcome is Fault.MAPPED and self.flags[slot]:
            self.written[slot].add(gpa // PAGE - SLOT_PLACES[slot][self.places[slot]] // PAGE)
        if outcome is Fault.MAPPED:
            self.aging.on_guest_access(self.hva(slot, block, page))
        return outcome

    def racing_fault(self, slot: int, block: int, page: int, steps: int, event: str) -> Fault:
        """A fault stopped after ``steps`` of its preemption points, a host event on its
        page, then the rest of the fault. A fault that maps the page is the guest's use of
        it: the access that raised it runs again through the new leaf, which the kernel
        creates referenced (C-AGING)."""
        gpa = self.gpa(slot, block, page)
        fault: KernelOp[Fault] = kvmppc_book3s_radix_page_fault(self.kvm, self.host, gpa, True)
        try:
            for _ in range(steps):
                next(fault)
            self.host_event(slot, block, page, event)
            outcome = run_to_completion(fault)
        except StopIteration as done:
            outcome = done.value
        if outcome is Fault.MAPPED:
            self.aging.on_guest_access(self.hva(slot, block, page))
        return outcome

    def host_event(self, slot: int, block: int, page: int, event: str) -> None:
        hva = self.hva(slot, block, page)
        block_hva = hva - hva % HUGE
        if event == "dontneed":
            self.host.madvise_dontneed(hva, PAGE)
        elif event == "migrate":
            self.host.migrate_page(hva)
        elif event == "collapse":
            self.host.madvise_collapse(block_hva, HUGE)
        elif event == "split":
            self.host.split_huge_pmd(hva)
        elif event == "mprotect_ro":
            self.host.mprotect(block_hva, HUGE, PROT_READ)
        else:
            self.host.mprotect(block_hva, HUGE, PROT_READ | PROT_WRITE)

    def toggle_logging(self, slot: int) -> None:
        """Dirty logging on or off: the slot gets a new bitmap, or loses it, and owes
        nothing from before (C-DIRTY-COMPLETE is promised from the change on)."""
        if self.present[slot]:
            self.flags[slot] ^= KVM_MEM_LOG_DIRTY_PAGES
            self._set_region(slot)
            self.written[slot].clear()

    def delete_or_recreate(self, slot: int) -> None:
        self.present[slot] = not self.present[slot]
        self._set_region(slot)
        self.written[slot].clear()  # a deleted slot's bitmap is gone; a new one owes nothing

    def move(self, slot: int) -> None:
        """MOVE the slot to its other place. Its dirty bitmap moves with it, so the next
        harvest still owes every page stored to before, C bits that the slot's flush
        folded into the bitmap included.

        kernel: virt/kvm/kvm_main.c:kvm_prepare_memory_region;
        arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_radix_flush_memslot (v6.18)
        """
        if self.present[slot]:
            self.places[slot] ^= 1
            self._set_region(slot)

    def age(self, slot: int, block: int, page: int, how: str) -> None:
        """Reclaim asks about the host page behind a guest page: clear_young or
        clear_flush_young of the whole host page (its 2 MiB block while the host maps it
        huge, as reclaim ages a huge page whole), or test_young. C-AGING judges the
        answer."""
        hva = self.hva(slot, block, page)
        if how == "test":
            tested = self.aging.on_test_young(hva, kvm_mmu_notifier_test_young(self.kvm, hva))
            if tested:
                raise RulesBroken([str(violation) for violation in tested])
            return
        start, size = hva, PAGE
        if hva - hva % HUGE in self.host.pmds:
            start, size = hva - hva % HUGE, HUGE
        flush = how == "clear_flush"
        age = kvm_mmu_notifier_clear_flush_young if flush else kvm_mmu_notifier_clear_young
        young = age(self.kvm, start, start + size)
        violations = [
            str(violation)
            for each in range(start, start + size, PAGE)
            for violation in self.aging.on_age(each, flush, young)
        ]
        if violations:
            raise RulesBroken(violations)

    def logged_slots(self) -> list[int]:
        return [slot for slot in (0, 1) if self.present[slot] and self.flags[slot]]

    def harvest(self, slot: int) -> None:
        """KVM_GET_DIRTY_LOG of a logged slot: every page written since the last one must
        be reported."""
        errno, words = run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(self.kvm, slot))
        assert errno == 0
        reported = {i for i in range(len(words) * 64) if words[i // 64] >> (i % 64) & 1}
        missed = self.written[slot] - reported
        self.written[slot].clear()
        if missed:
            raise RulesBroken([f"C-DIRTY-COMPLETE: slot {slot} pages {sorted(missed)} lost"])

    # -- the check --------------------------------------------------------------------------------

    def check(self) -> None:
        violations = [str(v) for v in check_radix(self.kvm, self.mmu, self.host)]
        if violations:
            raise RulesBroken(violations)


SLOT = st.sampled_from((0, 1))
BLOCK = st.sampled_from((0, 1))
PAGE_INDEX = st.sampled_from(PAGES)


class RadixMachine(RuleBasedStateMachine):
    """Draws the harness's actions; ``check`` runs after every one. Subclasses may set
    ``mmu_factory`` to run the machine against a modified model."""

    mmu_factory: type[RadixMmu] = RadixMmu

    def __init__(self) -> None:
        super().__init__()
        self.harness = RadixHarness(self.mmu_factory(PPC64_RADIX.page_shift))
        self.lines: list[str] = []

    def _after(self, line: str) -> None:
        note(line)
        self.lines.append(line)
        self.harness.check()
        # The campaign's counters, and the run so far as its trace if this step failed.
        machines.STATS["steps"] += 1
        machines.STATS["invariant_checks"] += 1
        machines.LAST_RUN["trace"] = "\n".join(self.lines) + "\n"
        machines.LAST_RUN["suffix"] = ".actions.txt"
        machines.LAST_RUN.pop("reproducer", None)

    @rule(slot=SLOT, block=BLOCK, page=PAGE_INDEX, write=st.booleans())
    def guest_access(self, slot: int, block: int, page: int, write: bool) -> None:
        outcome = self.harness.guest_access(slot, block, page, write)
        self._after(f"guest {'store' if write else 'load'} {slot}/{block}/{page}: {outcome}")

    @rule(
        slot=SLOT,
        block=BLOCK,
        page=PAGE_INDEX,
        steps=st.integers(1, 3),
        event=st.sampled_from(HOST_EVENTS),
    )
    def racing_fault(self, slot: int, block: int, page: int, steps: int, event: str) -> None:
        outcome = self.harness.racing_fault(slot, block, page, steps, event)
        self._after(f"fault {slot}/{block}/{page} racing {event} after {steps}: {outcome}")

    @rule(slot=SLOT, block=BLOCK, page=PAGE_INDEX, event=st.sampled_from(HOST_EVENTS))
    def host_event(self, slot: int, block: int, page: int, event: str) -> None:
        self.harness.host_event(slot, block, page, event)
        self._after(f"host {event} {slot}/{block}/{page}")

    @rule(slot=SLOT)
    def toggle_logging(self, slot: int) -> None:
        self.harness.toggle_logging(slot)
        self._after(f"slot {slot} logging {bool(self.harness.flags[slot])}")

    @rule(slot=SLOT)
    def delete_or_recreate(self, slot: int) -> None:
        self.harness.delete_or_recreate(slot)
        self._after(f"slot {slot} present {self.harness.present[slot]}")

    @precondition(lambda self: any(self.harness.present))
    @rule(slot=SLOT)
    def move(self, slot: int) -> None:
        self.harness.move(slot)
        self._after(f"slot {slot} at place {self.harness.places[slot]}")

    @rule(
        slot=SLOT,
        block=BLOCK,
        page=PAGE_INDEX,
        how=st.sampled_from(("clear", "clear_flush", "test")),
    )
    def age(self, slot: int, block: int, page: int, how: str) -> None:
        self.harness.age(slot, block, page, how)
        self._after(f"age ({how}) {slot}/{block}/{page}")

    @precondition(lambda self: self.harness.logged_slots())
    @rule(pick=st.integers(0, 1))
    def harvest(self, pick: int) -> None:
        logged = self.harness.logged_slots()
        slot = logged[pick % len(logged)]
        self.harness.harvest(slot)
        self._after(f"harvest slot {slot}")
