"""Software walkers and the hardware on stage 2 at once, one step at a time: the body of the
``interleave`` action of :class:`~kvmspec.fuzz.arm64_harness.Arm64Harness` (which keeps a
thin method for it, so that the decoders' action names keep their meaning).

Two vCPUs fault on pages of a THP slot, one vCPU's hardware stores to one of them (the
hardware walker sets the access flag and, for a store, the dirty state of the leaf), and,
with seed 001's lockless ager, the whole slot is aged without mmu_lock; a drawn order says
who runs next. Faults hold the read side of mmu_lock, a spinlock: each actor may only be
preempted, never wait, so nothing that needs mmu_lock for write runs among them. The
harness notes the stretch of the record the walkers ran in at once, where
:func:`~kvmspec.spec.invariants.arm64.check_stage2` judges each write against every walker
(S001-NO-LOST-UPDATE, A3's walker half), and checks what the hardware store reached
(C-COHERENCE, C-DIRTY-COMPLETE).

kernel: arch/arm64/kvm/mmu.c:user_mem_abort, kvm_age_gfn;
arch/arm64/kvm/hyp/pgtable.c:stage2_age_walker, kvm_pgtable_stage2_test_clear_young (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.arm64.fault import GuestAbort, kvm_handle_guest_abort
from kvmspec.reference.arm64.hw_access import GuestAccessResult
from kvmspec.reference.arm64.hw_access import guest_access as hw_guest_access
from kvmspec.reference.arm64.pgtable import KvmPgtableWalkFlags
from kvmspec.reference.arm64.stage2 import kvm_pgtable_stage2_test_clear_young
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion

if TYPE_CHECKING:
    from kvmspec.fuzz.arm64_harness import Arm64Harness

SHARED = KvmPgtableWalkFlags.SHARED


def _advance(name: str, op: KernelOp[object]) -> tuple[bool, object]:
    """One step of an actor of :func:`interleave`: (True, its result) when it
    finished, else (False, None). It may only be preempted, never wait: the faults hold
    the read side of mmu_lock, a spinlock."""
    try:
        step = next(op)
    except StopIteration as done:
        return True, done.value
    assert isinstance(step, Preempt), f"{name} waits in a spinlock section"
    return False, None


def interleave(
    harness: Arm64Harness,
    slot_id: int,
    order: tuple[int, ...],
    page: int,
    other: int,
    store: bool,
) -> None:
    """Software walkers and the hardware on a THP slot at once, one step at a time:
    vCPU 0 faults on ``page`` (a store or a load), vCPU 1 faults storing to ``other``,
    vCPU 1's hardware stores to ``page`` + 8, and, with seed 001's lockless ager, the
    whole slot is aged without mmu_lock. ``order`` names who runs next at each step
    (modulo the actors left); when it runs out, the rest finish in turn. Faults hold
    the read side of mmu_lock, so nothing that needs it for write runs among them."""
    gpa, hva = harness.address(slot_id, page)
    other_gpa, other_hva = harness.address(slot_id, other)
    pgt = harness.mmu.pgt
    page_size = harness.host.page_size
    if hva is None or other_hva is None or pgt is None:
        return
    if harness.expected(slot_id, hva, "store") or harness.expected(slot_id, other_hva, "store"):
        return
    # The VMM touched both pages first: resolving them then needs no host invalidation,
    # which would wait for mmu_lock while a fault holds its read side (the model's
    # spinlock cannot wait, it reports a deadlock).
    for touched in (hva, other_hva):
        assert harness.host.fault_in(touched, write=True)[0] == 0
    actors: dict[str, KernelOp[object]] = {}
    for name, vcpu, ipa, write in (("fault0", 0, gpa, store), ("fault1", 1, other_gpa, True)):
        walk = run_to_completion(hw_guest_access(pgt, vcpu, ipa, write))
        if walk.fault is not None:
            abort = GuestAbort(ipa, walk.fault, walk.level, write)
            vcpu_ = harness.kvm.vcpus[vcpu]
            actors[name] = kvm_handle_guest_abort(
                harness.kvm, harness.mmu, harness.host, vcpu_, abort
            )
    actors["hardware"] = hw_guest_access(pgt, 1, gpa + 8, True)
    if harness.mmu.lockless_aging:
        view = harness.views[slot_id]
        start, size = view.base_gfn * page_size, view.npages * page_size
        actors["age"] = kvm_pgtable_stage2_test_clear_young(pgt, start, size, True, SHARED)
        # It clears access flags and flushes nothing (A7): a TLB entry may outlive it.
        harness.aging.on_racing_clear(view.hva, view.hva + size)
    results: dict[str, object] = {}
    first = len(pgt.mm_ops.history.events)
    for step in order:
        if not actors:
            break
        names = sorted(actors)
        name = names[step % len(names)]
        finished, result = _advance(name, actors[name])
        if finished:
            results[name] = result
            del actors[name]
    for name in sorted(actors):  # the order ran out: each of the rest to its end
        finished = False
        while not finished:
            finished, result = _advance(name, actors[name])
        results[name] = result
    harness.concurrent.append((first, len(pgt.mm_ops.history.events)))
    harness.log(f"interleaved {order}: {results}")
    hardware = results["hardware"]
    assert isinstance(hardware, GuestAccessResult)
    if hardware.pa is not None:
        harness.host.memory.write(hardware.pa // page_size, hardware.pa % page_size, b"\x77")
        harness.aging.on_guest_access(hva)
        held = harness.host_holds(hva + 8, 1)
        harness._expect("C-COHERENCE", held == b"\x77", f"hardware store at {gpa + 8:#x}: {held!r}")
        if harness.views[slot_id].logging:
            harness.dirtied[slot_id].add(page % harness.views[slot_id].npages)
