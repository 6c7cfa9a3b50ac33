"""Dirty logging: recording a written page, and the ioctls that harvest the record.

Every write KVM lets happen without a fault (a writable mapping it installs, or a write KVM
makes itself) is recorded by mark_page_dirty_in_slot: in the running vCPU's dirty ring when
the VM uses rings, otherwise in the slot's bitmap.

Without manual protection, KVM_GET_DIRTY_LOG is get-and-clear: under mmu_lock each bitmap word
is swapped with zero and its pages are write-protected again, the slot's TLB entries are
flushed, and only then is the snapshot copied to userspace (invariant D2). With
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, GET only copies, and KVM_CLEAR_DIRTY_LOG clears and
re-protects exactly the pages that were dirty and selected (D3).

kernel: virt/kvm/kvm_main.c:mark_page_dirty_in_slot, kvm_get_dirty_log_protect,
kvm_clear_dirty_log_protect, kvm_vm_ioctl_reset_dirty_pages (v6.18)
"""

from __future__ import annotations

from errno import EINVAL

from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.spec.uapi.dirty_log_rules import (
    BITS_PER_LONG,
    clear_dirty_log_errno,
    get_dirty_log_errno,
)


def kvm_arch_allow_write_without_running_vcpu(kvm: Kvm) -> bool:
    """May KVM dirty guest memory with no vCPU running? Only arm64, and only while it saves
    the vgic ITS tables (with a dirty ring, those writes go to the backup bitmap).

    kernel: arch/arm64/kvm/mmu.c:kvm_arch_allow_write_without_running_vcpu (v6.18)
    """
    return kvm.profile.arch == "arm64" and kvm.save_its_tables_in_progress


def mark_page_dirty_in_slot(
    kvm: Kvm, slot: KvmMemorySlot | None, gfn: int, vcpu: KvmVcpu | None
) -> None:
    """Record that ``gfn`` was written: an entry in the running vCPU's ring when the VM uses
    rings, else a bit in the slot's bitmap. A ring that reaches its soft limit makes the vCPU
    exit before it enters the guest again (KVM_REQ_DIRTY_RING_SOFT_FULL).

    A write with no running vCPU has no ring to go to; outside the arm64 exception it is a
    kernel bug (a WARN), and with rings and no backup bitmap the write is not logged at all,
    which is why D10 makes it a finding.

    kernel: virt/kvm/kvm_main.c:mark_page_dirty_in_slot; virt/kvm/dirty_ring.c:
    kvm_dirty_ring_push (v6.18)
    """
    kvm.warn_on(
        vcpu is None and not kvm_arch_allow_write_without_running_vcpu(kvm),
        "D10",
        "mark_page_dirty_in_slot: guest memory dirtied with no running vCPU",
    )
    if slot is None or not slot.dirty_logging:
        return
    offset = gfn - slot.base_gfn
    if kvm.dirty_ring_size and vcpu is not None and vcpu.dirty_ring is not None:
        vcpu.dirty_ring.push(slot.as_id << 16 | slot.id, offset)
    elif slot.dirty_bitmap is not None:
        slot.dirty_bitmap.set_bit(offset)


def _logged_slot(kvm: Kvm, slot: int) -> KvmMemorySlot | None:
    """The slot a dirty-log ioctl names, if it exists and has a bitmap."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id >= kvm.profile.nr_address_spaces:
        return None
    memslot = kvm.memslots(as_id).id_to_memslot(slot_id)
    if memslot is None or memslot.dirty_bitmap is None:
        return None
    return memslot


def kvm_get_dirty_log_protect(kvm: Kvm, slot: int) -> KernelOp[tuple[int, list[int]]]:
    """KVM_GET_DIRTY_LOG: (errno, the bitmap words userspace receives).

    kernel: virt/kvm/kvm_main.c:kvm_get_dirty_log_protect (v6.18)
    """
    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        # validate
        memslot = _logged_slot(kvm, slot)
        errno = get_dirty_log_errno(kvm.profile, kvm.use_dirty_bitmap(), slot, memslot is not None)
        if errno:
            return errno, []
        assert memslot is not None and memslot.dirty_bitmap is not None
        bitmap = memslot.dirty_bitmap

        # With manual protection, GET is a plain copy; CLEAR does the re-protection.
        if kvm.manual_dirty_log_protect:
            return 0, bitmap.words()

        # harvest: swap each word with zero and re-protect its pages (under mmu_lock).
        snapshot = []
        flush = False
        with kvm.mmu_lock.write():
            for index in range(bitmap.nr_words):
                word = bitmap.xchg_word(index)
                snapshot.append(word)
                if word:
                    flush = True
                    kvm.arch.kvm_arch_mmu_enable_log_dirty_pt_masked(
                        kvm, memslot, index * BITS_PER_LONG, word
                    )
        # flush before userspace sees the snapshot: a vCPU must not keep writing through a
        # stale writable TLB entry to a page reported clean.
        if flush:
            kvm.arch.kvm_flush_remote_tlbs_memslot(kvm, memslot)
        yield Preempt("GET_DIRTY_LOG: copy_to_user")
        return 0, snapshot
    finally:
        kvm.slots_lock.unlock(owner)


def kvm_clear_dirty_log_protect(
    kvm: Kvm, slot: int, first_page: int, num_pages: int, user_bitmap: list[int]
) -> KernelOp[int]:
    """KVM_CLEAR_DIRTY_LOG: clear the selected bits and re-protect exactly the pages whose
    bits were set. ``user_bitmap`` word 0 covers ``first_page``; missing words count as 0.

    kernel: virt/kvm/kvm_main.c:kvm_clear_dirty_log_protect (v6.18)
    """
    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        # validate
        memslot = _logged_slot(kvm, slot)
        errno = clear_dirty_log_errno(
            kvm.profile,
            kvm.use_dirty_bitmap(),
            slot,
            memslot.npages if memslot is not None else None,
            first_page,
            num_pages,
        )
        if errno:
            return errno
        assert memslot is not None and memslot.dirty_bitmap is not None
        bitmap = memslot.dirty_bitmap

        # clear: only bits set both in the user mask and in the bitmap are re-protected.
        flush = False
        nr_words = (num_pages + BITS_PER_LONG - 1) // BITS_PER_LONG
        with kvm.mmu_lock.write():
            for offset in range(nr_words):
                mask = user_bitmap[offset] if offset < len(user_bitmap) else 0
                if not mask:
                    continue
                index = first_page // BITS_PER_LONG + offset
                cleared = bitmap.fetch_andnot_word(index, mask)
                if cleared:
                    flush = True
                    kvm.arch.kvm_arch_mmu_enable_log_dirty_pt_masked(
                        kvm, memslot, index * BITS_PER_LONG, cleared
                    )
        if flush:
            kvm.arch.kvm_flush_remote_tlbs_memslot(kvm, memslot)
        return 0
    finally:
        kvm.slots_lock.unlock(owner)


def kvm_reset_dirty_gfn(kvm: Kvm, slot: int, offset: int) -> None:
    """Write-protect one harvested page again. The entry lives in memory userspace can write,
    so its slot and offset are checked first: a bad address space, an internal or missing
    slot, or an offset past the slot is ignored (D6).

    kernel: virt/kvm/dirty_ring.c:kvm_reset_dirty_gfn (v6.18)
    """
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id >= kvm.profile.nr_address_spaces or slot_id >= kvm.profile.user_mem_slots:
        return
    memslot = kvm.memslots(as_id).id_to_memslot(slot_id)
    if memslot is None or offset >= memslot.npages:
        return
    kvm.arch.kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, memslot, offset, 1)


def kvm_vm_ioctl_reset_dirty_pages(kvm: Kvm) -> KernelOp[tuple[int, int]]:
    """KVM_RESET_DIRTY_RINGS: consume harvested entries of every vCPU's ring and re-protect
    their pages. Returns (errno, number of entries reset); EINVAL when the VM has no ring.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_reset_dirty_pages (v6.18)
    """
    if not kvm.dirty_ring_size:
        return EINVAL, 0
    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        cleared = 0
        for vcpu in kvm.vcpus.values():
            assert vcpu.dirty_ring is not None
            with kvm.mmu_lock.write():
                for entry in vcpu.dirty_ring.reset():
                    cleared += 1
                    kvm_reset_dirty_gfn(kvm, entry.slot, entry.offset)
        # Pages were write-protected again: no vCPU may keep writing through an old entry.
        if cleared:
            kvm.arch.kvm_flush_remote_tlbs(kvm)
        return 0, cleared
    finally:
        kvm.slots_lock.unlock(owner)
