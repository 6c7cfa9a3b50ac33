"""Memslot updates: KVM_SET_USER_MEMORY_REGION(2) from the ioctl down to the swap.

The rule that shapes this file (seed 003): *KVM never modifies a slot that is in the active
memslot set.* Every change is made on the inactive set, which is then published by swapping
the two sets, and finally replayed on the set that just became inactive. DELETE and MOVE go
through an extra step first: an INVALID copy of the slot is published, so that no new mapping
of its pages can be created, and the architecture removes the existing ones while vCPUs keep
running.

Each handler follows the same phases, marked by comments: *validate* (the pure rules of
``kvmspec.spec.uapi``; an error leaves the state untouched), *invalidate* (DELETE and MOVE
only), *prepare*, *install*, *commit*.

Operations that may race with other CPUs are generators (see concurrency.py): they yield
where the kernel can sleep or another CPU can observe the memslots.

kernel: virt/kvm/kvm_main.c (v6.18)
"""

from __future__ import annotations

from errno import EINVAL

from kvmspec.reference.concurrency import KernelOp, Preempt, WaitUntil
from kvmspec.reference.dirty_bitmap import DirtyBitmap
from kvmspec.reference.guest_memfd import GmemFile, kvm_gmem_bind, kvm_gmem_unbind
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot, kvm_copy_memslot
from kvmspec.reference.ordered import floor_value, replace_value
from kvmspec.spec.uapi.constants import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
)
from kvmspec.spec.uapi.memslot_rules import (
    MemoryRegion,
    MrChange,
    SlotView,
    decide_ioctl_set_memory_region,
    decide_kvm_set_memory_region,
)

# ---------------------------------------------------------------------------------------
# The three indexes of a set, and publishing a set
# ---------------------------------------------------------------------------------------


def kvm_replace_memslot(kvm: Kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None) -> None:
    """Replace ``old`` by ``new`` in the *inactive* set of their address space (either may be
    None, for a create or a delete). The id index, the gfn tree and the hva index all change.

    kernel: virt/kvm/kvm_main.c:kvm_replace_memslot (v6.18)
    """
    present = new if new is not None else old
    assert present is not None
    slots = kvm.inactive_memslots(present.as_id)
    page_shift = kvm.profile.page_shift

    # A lookup cache must never point at a slot that is leaving the set.
    if old is not None and slots.last_used_slot is old:
        slots.last_used_slot = new

    if old is not None:
        del slots.id_hash[old.id]
        # The hva index holds ids, and a slot's host range never changes (userspace_addr and
        # npages are fixed for its id), so a copy with the same id needs no hva update.
        if new is None or new.id != old.id:
            start = old.userspace_addr
            slots.hva_tree.remove(start, start + (old.npages << page_shift), old.id)
        # The gfn tree is keyed by base_gfn; a FLAGS_ONLY or INVALID copy keeps the key and
        # is swapped in place, anything else is an erase and an insert.
        if new is None or new.base_gfn != old.base_gfn:
            slots.gfn_tree.remove(old)

    if new is not None:
        slots.id_hash[new.id] = new
        if old is None or old.id != new.id:
            start = new.userspace_addr
            slots.hva_tree.insert(start, start + (new.npages << page_shift), new.id)
        if old is not None and old.base_gfn == new.base_gfn:
            replace_value(slots.gfn_tree, old, new)
        else:
            below = floor_value(slots.gfn_tree, new.base_gfn)
            if below is not None and below.base_gfn == new.base_gfn:
                raise AssertionError("two slots with one base_gfn: overlap check missed (M1)")
            slots.gfn_tree.add(new)


def kvm_swap_active_memslots(kvm: Kvm, as_id: int, owner: object) -> KernelOp[None]:
    """Publish the inactive set of ``as_id``, then wait for readers of the old one.

    The new set first carries the old generation with the in-progress bit, so that a reader
    who caches by generation never trusts a half-published update. Publishing waits until no
    MMU-notifier invalidation is running (M11). slots_arch_lock is dropped before the SRCU
    grace period. The final generation adds the number of address spaces, keeping
    generations unique across address spaces (M6).

    kernel: virt/kvm/kvm_main.c:kvm_swap_active_memslots (v6.18)
    """
    slots = kvm.inactive_memslots(as_id)
    generation = kvm.memslots(as_id).generation
    assert not generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    slots.generation = generation | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS

    # Invalidations in flight must end before readers can see the new memslots.
    if kvm.mn_active_invalidate_count:
        yield WaitUntil(
            "swap waits for MMU-notifier invalidations to end",
            lambda: kvm.mn_active_invalidate_count == 0,
        )
    kvm.active_index[as_id] ^= 1  # rcu_assign_pointer
    kvm.slots_arch_lock.unlock(owner)

    # synchronize_srcu_expedited: every reader that could see the old set finishes here.
    yield from kvm.srcu.synchronize("memslot swap: SRCU grace period")

    generation = slots.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    generation += kvm.profile.nr_address_spaces
    kvm.arch.kvm_arch_memslots_updated(kvm, generation)
    slots.generation = generation


def kvm_activate_memslot(
    kvm: Kvm,
    old: KvmMemorySlot | None,
    new: KvmMemorySlot | None,
    owner: object,
) -> KernelOp[None]:
    """Swap the sets, then replay the same replacement on the set that became inactive, so
    that both sets agree again (M5).

    kernel: virt/kvm/kvm_main.c:kvm_activate_memslot (v6.18)
    """
    present = new if new is not None else old
    assert present is not None
    yield from kvm_swap_active_memslots(kvm, present.as_id, owner)
    kvm_replace_memslot(kvm, old, new)


# ---------------------------------------------------------------------------------------
# The four kinds of change
# ---------------------------------------------------------------------------------------


def kvm_invalidate_memslot(
    kvm: Kvm, old: KvmMemorySlot, invalid_slot: KvmMemorySlot, owner: object
) -> KernelOp[None]:
    """Publish an INVALID copy of ``old`` and remove every mapping through it.

    From the swap on, no new mapping of the slot's pages can be created (x86 faults retry,
    arm64 and POWER see MMIO), but the slot can still be found, so that existing references
    can be torn down (seed 000). The set that becomes inactive keeps ``old`` itself: the slot
    is about to be deleted or moved, and a failing prepare swaps ``old`` back.

    kernel: virt/kvm/kvm_main.c:kvm_invalidate_memslot (v6.18)
    """
    kvm_copy_memslot(invalid_slot, old)
    invalid_slot.flags |= KVM_MEMSLOT_INVALID
    kvm_replace_memslot(kvm, old, invalid_slot)
    yield from kvm_swap_active_memslots(kvm, old.as_id, owner)

    kvm.arch.kvm_arch_flush_shadow_memslot(kvm, old)
    kvm.arch.kvm_arch_guest_memory_reclaimed(kvm)

    # The swap released slots_arch_lock; take it again (a sleep: vCPUs keep running and
    # find the INVALID slot) before touching the inactive set.
    yield Preempt("invalidate: mappings dropped, re-taking slots_arch_lock")
    yield from kvm.slots_arch_lock.lock(owner)
    # Arch data may have changed while the lock was dropped; the active copy is the fresh one.
    old.arch = dict(invalid_slot.arch)


def kvm_create_memslot(kvm: Kvm, new: KvmMemorySlot, owner: object) -> KernelOp[None]:
    """kernel: virt/kvm/kvm_main.c:kvm_create_memslot (v6.18)"""
    kvm_replace_memslot(kvm, None, new)
    yield from kvm_activate_memslot(kvm, None, new, owner)


def kvm_delete_memslot(
    kvm: Kvm, old: KvmMemorySlot, invalid_slot: KvmMemorySlot, owner: object
) -> KernelOp[None]:
    """Remove ``old`` from the inactive set, then swap out the INVALID copy.

    kernel: virt/kvm/kvm_main.c:kvm_delete_memslot (v6.18)
    """
    kvm_replace_memslot(kvm, old, None)
    yield from kvm_activate_memslot(kvm, invalid_slot, None, owner)


def kvm_move_memslot(
    kvm: Kvm,
    old: KvmMemorySlot,
    new: KvmMemorySlot,
    invalid_slot: KvmMemorySlot,
    owner: object,
) -> KernelOp[None]:
    """Replace ``old`` by ``new`` (at its new gfn) in the inactive set, then swap the INVALID
    copy out for ``new``.

    kernel: virt/kvm/kvm_main.c:kvm_move_memslot (v6.18)
    """
    kvm_replace_memslot(kvm, old, new)
    yield from kvm_activate_memslot(kvm, invalid_slot, new, owner)


def kvm_update_flags_memslot(
    kvm: Kvm, old: KvmMemorySlot, new: KvmMemorySlot, owner: object
) -> KernelOp[None]:
    """Replace ``old`` by an updated copy in both sets; no INVALID step is needed because the
    slot keeps its gfn range.

    kernel: virt/kvm/kvm_main.c:kvm_update_flags_memslot (v6.18)
    """
    kvm_replace_memslot(kvm, old, new)
    yield from kvm_activate_memslot(kvm, old, new, owner)


# ---------------------------------------------------------------------------------------
# prepare and commit
# ---------------------------------------------------------------------------------------


def kvm_prepare_memory_region(
    kvm: Kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None, change: MrChange
) -> int:
    """Give ``new`` its dirty bitmap, then let the architecture check and prepare.

    A slot keeps the bitmap it had when it stays dirty-logged (so a MOVE keeps its dirty bits,
    indexed by page offset); it gets a fresh one when logging is switched on, all ones when
    userspace asked for KVM_DIRTY_LOG_INITIALLY_SET; it has none when the VM logs to rings
    only. A failing architecture check frees a bitmap allocated here.

    kernel: virt/kvm/kvm_main.c:kvm_prepare_memory_region (v6.18)
    """
    allocated = False
    if new is not None:
        if not new.dirty_logging:
            new.dirty_bitmap = None
        elif old is not None and old.dirty_bitmap is not None:
            new.dirty_bitmap = old.dirty_bitmap
        elif kvm.use_dirty_bitmap():
            # kvm_dirty_log_manual_protect_and_init_set(): INITIALLY_SET is only accepted
            # together with manual protection, so its bit alone decides.
            initially_set = bool(kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)
            new.dirty_bitmap = DirtyBitmap(new.npages, initially_set=initially_set)
            allocated = True

    errno = kvm.arch.kvm_arch_prepare_memory_region(kvm, old, new, change)
    if errno and allocated and new is not None:
        new.dirty_bitmap = None
    return errno


def kvm_commit_memory_region(
    kvm: Kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None, change: MrChange
) -> None:
    """Account the change, let the architecture react, and free what the change detached.

    kernel: virt/kvm/kvm_main.c:kvm_commit_memory_region (v6.18)
    """
    old_logging = old.dirty_logging if old is not None else False
    new_logging = new.dirty_logging if new is not None else False

    # Only CREATE and DELETE change the total; MOVE and FLAGS_ONLY keep the page count.
    if change is MrChange.DELETE and old is not None:
        kvm.nr_memslot_pages -= old.npages
    elif change is MrChange.CREATE and new is not None:
        kvm.nr_memslot_pages += new.npages
    if old_logging != new_logging:
        kvm.nr_memslots_dirty_logging += 1 if new_logging else -1

    kvm.arch.kvm_arch_commit_memory_region(kvm, old, new, change)

    # The swaps already waited for SRCU readers, so the detached slot can be freed.
    if change is MrChange.DELETE and old is not None:
        kvm_free_memslot(kvm, old)
    elif change in (MrChange.MOVE, MrChange.FLAGS_ONLY) and old is not None:
        if old.dirty_bitmap is not None and new is not None and new.dirty_bitmap is None:
            old.dirty_bitmap = None
        old.freed = True


def kvm_free_memslot(kvm: Kvm, slot: KvmMemorySlot) -> None:
    """Free a deleted slot with its guest_memfd binding, arch metadata and bitmap.

    kernel: virt/kvm/kvm_main.c:kvm_free_memslot (v6.18)
    """
    if slot.is_gmem:
        kvm_gmem_unbind(slot)
    kvm.arch.kvm_arch_free_memslot(kvm, slot)
    slot.dirty_bitmap = None
    slot.freed = True


# ---------------------------------------------------------------------------------------
# The update, end to end
# ---------------------------------------------------------------------------------------


def kvm_set_memslot(
    kvm: Kvm,
    old: KvmMemorySlot | None,
    new: KvmMemorySlot | None,
    change: MrChange,
    owner: object,
) -> KernelOp[int]:
    """Carry out a validated change: invalidate, prepare, install, commit.

    A prepare failure after the INVALID step swaps ``old`` back in. That is a second swap,
    so a failed DELETE or MOVE still advances the generation twice, and the slot's mappings
    are gone (M14).

    kernel: virt/kvm/kvm_main.c:kvm_set_memslot (v6.18)
    """
    yield from kvm.slots_arch_lock.lock(owner)

    # invalidate: DELETE and MOVE first publish an INVALID copy and drop the slot's mappings.
    invalid_slot: KvmMemorySlot | None = None
    if change in (MrChange.DELETE, MrChange.MOVE):
        assert old is not None
        invalid_slot = KvmMemorySlot(
            as_id=old.as_id, id=old.id, base_gfn=0, npages=0, flags=0, userspace_addr=0
        )
        yield from kvm_invalidate_memslot(kvm, old, invalid_slot, owner)

    # prepare
    errno = kvm_prepare_memory_region(kvm, old, new, change)
    if errno:
        if invalid_slot is not None:
            assert old is not None
            yield from kvm_activate_memslot(kvm, invalid_slot, old, owner)
            invalid_slot.freed = True
        else:
            kvm.slots_arch_lock.unlock(owner)
        return errno

    # install
    if change is MrChange.CREATE:
        assert new is not None
        yield from kvm_create_memslot(kvm, new, owner)
    elif change is MrChange.DELETE:
        assert old is not None and invalid_slot is not None
        yield from kvm_delete_memslot(kvm, old, invalid_slot, owner)
    elif change is MrChange.MOVE:
        assert old is not None and new is not None and invalid_slot is not None
        yield from kvm_move_memslot(kvm, old, new, invalid_slot, owner)
    else:
        assert old is not None and new is not None
        yield from kvm_update_flags_memslot(kvm, old, new, owner)
    if invalid_slot is not None:
        invalid_slot.freed = True

    # commit
    kvm_commit_memory_region(kvm, old, new, change)
    return 0


def kvm_set_memory_region(
    kvm: Kvm, region: MemoryRegion, gmem_file: GmemFile | None, owner: object
) -> KernelOp[int]:
    """Validate a memslot request, build the new slot, bind its guest_memfd, and set it.

    The caller holds slots_lock. ``gmem_file`` is the file behind the request's guest_memfd
    descriptor (None when that descriptor is not open).

    kernel: virt/kvm/kvm_main.c:kvm_set_memory_region (v6.18)
    """

    def lookup(as_id: int, slot_id: int) -> SlotView | None:
        return kvm.memslots(as_id).id_to_memslot(slot_id)

    def overlaps(as_id: int, slot_id: int, start: int, end: int) -> bool:
        return kvm.memslots(as_id).kvm_check_memslot_overlap(slot_id, start, end)

    # validate: the pure rules decide the errno or the kind of change (or that an identical
    # re-submit changes nothing).
    verdict = decide_kvm_set_memory_region(
        kvm.profile, region, lookup, overlaps, kvm.nr_memslot_pages
    )
    change = verdict.change
    if change is None:
        return verdict.errno
    old = kvm.memslots(region.as_id).id_to_memslot(region.id)

    if change is MrChange.DELETE:
        assert old is not None
        return (yield from kvm_set_memslot(kvm, old, None, change, owner))

    new = KvmMemorySlot(
        as_id=region.as_id,
        id=region.id,
        base_gfn=verdict.base_gfn,
        npages=verdict.npages,
        flags=region.flags,
        userspace_addr=region.userspace_addr,
    )
    if region.flags & KVM_MEM_GUEST_MEMFD:
        errno = kvm_gmem_bind(kvm, new, gmem_file, region.guest_memfd_offset)
        if errno:
            return errno

    errno = yield from kvm_set_memslot(kvm, old, new, change, owner)
    if errno and region.flags & KVM_MEM_GUEST_MEMFD:
        kvm_gmem_unbind(new)
    return errno


def kvm_vm_ioctl_set_memory_region(
    kvm: Kvm, region: MemoryRegion, version: int, gmem_file: GmemFile | None = None
) -> KernelOp[int]:
    """KVM_SET_USER_MEMORY_REGION (``version`` 1) and ..._REGION2 (``version`` 2).

    ``gmem_file`` is the file behind the request's guest_memfd descriptor (None when that
    descriptor is not open). Returns 0 or an errno; on an error nothing changed, except the
    documented case of a DELETE or MOVE that fails in arch prepare.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl, kvm_vm_ioctl_set_memory_region (v6.18)
    """
    # validate: the entry point's own checks come before the lock.
    rejected = decide_ioctl_set_memory_region(kvm.profile, region, version)
    if rejected is not None:
        return rejected.errno

    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        return (yield from kvm_set_memory_region(kvm, region, gmem_file, owner))
    finally:
        kvm.slots_lock.unlock(owner)


def kvm_set_internal_memslot(
    kvm: Kvm, slot_id: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
) -> KernelOp[int]:
    """Create or delete one of the architecture's private slots (x86: TSS, APIC access page,
    EPT identity map). Only ids at or above KVM_USER_MEM_SLOTS, only flags 0: userspace can
    never reach these ids through the ioctl.

    kernel: virt/kvm/kvm_main.c:kvm_set_internal_memslot (v6.18)
    """
    if slot_id < kvm.profile.user_mem_slots:
        return EINVAL
    region = MemoryRegion(slot_id, 0, guest_phys_addr, memory_size, userspace_addr)
    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        return (yield from kvm_set_memory_region(kvm, region, None, owner))
    finally:
        kvm.slots_lock.unlock(owner)
