"""KVM reading and writing guest memory itself, through the VMM's mapping.

Besides the guest's own accesses (which go through the MMU and fault), KVM touches guest
memory from the kernel: the instruction emulator, paravirtual clocks and steal time, and on
arm64 the vgic saving its ITS tables into guest RAM. These accesses use the slot's host
virtual address like any user copy, so they fail with EFAULT where the VMM's mapping does,
and a write is recorded for dirty logging like a guest write (D1): a live-migrating VMM must
see it, or the destination gets a stale page.

kernel: virt/kvm/kvm_main.c:kvm_read_guest_page, kvm_write_guest_page,
__kvm_write_guest_page; arch/x86/kvm/x86.c:emulator_read_write_onepage;
arch/arm64/kvm/vgic/vgic-its.c:vgic_its_ctrl (v6.18)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from errno import EFAULT

from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.vcpu import KvmVcpu


def kvm_write_guest_page(
    kvm: Kvm,
    host: HostMm,
    as_id: int,
    gfn: int,
    offset: int,
    data: bytes,
    vcpu: KvmVcpu | None,
) -> int:
    """Write ``data`` at ``offset`` in page ``gfn``: 0, or EFAULT when the gfn has no usable
    slot (none, INVALID, or READONLY) or the host refuses the store. ``vcpu`` is the vCPU
    running on this CPU, if any: its ring logs the write.

    kernel: virt/kvm/kvm_main.c:__kvm_write_guest_page (v6.18)
    """
    slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
    hva, _ = gfn_to_hva_many(slot, gfn, write=True, page_shift=kvm.profile.page_shift)
    if kvm_is_error_hva(hva):
        return EFAULT
    if host.host_write(hva + offset, data):
        return EFAULT
    mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
    return 0


def kvm_read_guest_page(
    kvm: Kvm, host: HostMm, as_id: int, gfn: int, offset: int, size: int
) -> tuple[int, bytes]:
    """Read ``size`` bytes at ``offset`` in page ``gfn``: (0, bytes) or (EFAULT, b"").
    A READONLY slot reads normally; an INVALID one does not.

    kernel: virt/kvm/kvm_main.c:kvm_read_guest_page (v6.18)
    """
    slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
    hva, _ = gfn_to_hva_many(slot, gfn, write=False, page_shift=kvm.profile.page_shift)
    if kvm_is_error_hva(hva):
        return EFAULT, b""
    errno, data = host.host_read(hva + offset, size)
    return (EFAULT, b"") if errno else (0, data)


def kvm_read_guest_atomic(
    kvm: Kvm, host: HostMm, as_id: int, gpa: int, size: int
) -> tuple[int, bytes]:
    """Read ``size`` bytes at ``gpa`` (within one page) without sleeping, as code holding
    a spinlock must: page faults are disabled, so a page the host does not map right now
    (never touched, swapped out, being migrated) is EFAULT rather than faulted in.

    kernel: virt/kvm/kvm_main.c:kvm_vcpu_read_guest_atomic, __kvm_read_guest_atomic (v6.18)
    """
    shift = kvm.profile.page_shift
    gfn, offset = gpa >> shift, gpa % (1 << shift)
    slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
    hva, _ = gfn_to_hva_many(slot, gfn, write=False, page_shift=shift)
    if kvm_is_error_hva(hva):
        return EFAULT, b""
    pte = host.lookup(hva)
    if pte is None:
        return EFAULT, b""
    return 0, host.memory.read(pte.pfn, offset, size)


def vgic_its_save_tables(kvm: Kvm, host: HostMm, writes: list[tuple[int, bytes]]) -> int:
    """KVM_DEV_ARM_ITS_SAVE_TABLES: the arm64 vgic writes its ITS tables (``writes``: gpa and
    bytes, each within a page) into guest RAM from an ioctl, with no vCPU running. The
    in-progress flag is what lets mark_page_dirty_in_slot accept that (into the backup
    bitmap when the VM uses rings, D10). Returns the first errno, or 0.

    kernel: arch/arm64/kvm/vgic/vgic-its.c:vgic_its_ctrl, vgic_its_save_tables_v0 (v6.18)
    """
    shift = kvm.profile.page_shift
    kvm.save_its_tables_in_progress = True
    try:
        for gpa, data in writes:
            offset = gpa % (1 << shift)
            errno = kvm_write_guest_page(kvm, host, 0, gpa >> shift, offset, data, None)
            if errno:
                return errno
        return 0
    finally:
        kvm.save_its_tables_in_progress = False


Part = tuple[int, int, int]
"""One page's share of an access: (gpa, offset into the access, length)."""


@dataclass(frozen=True, slots=True)
class MmioExit:
    """KVM_EXIT_MMIO: the part of an access that went to the VMM, [gpa, gpa + length), with
    a store's bytes (``data`` None for a load, which the VMM answers with zeroes)."""

    gpa: int
    length: int
    data: bytes | None


def emulator_read_write(
    kvm: Kvm,
    host: HostMm,
    vcpu: KvmVcpu | None,
    parts: list[Part],
    data: bytes | None,
    written: Callable[[int, int], None] | None = None,
) -> tuple[bytes, MmioExit | None]:
    """The emulator moving an instruction's access itself, page by page (``parts``, already
    translated to guest-physical): through KVM's own copy to or from guest memory where that
    works (a store is logged as dirty, as any KVM write, and reported to ``written`` with its
    gpa and length), otherwise as an MMIO fragment for the VMM: no slot, a store to a
    READONLY slot, or a host address that faults. The fragments of one access are
    contiguous, so they form one exit here (the kernel exits once per fragment). Returns a
    load's bytes (zeroes where it went to the VMM) and the exit, if any part needed one.

    kernel: arch/x86/kvm/x86.c:emulator_read_write, emulator_read_write_onepage,
    emulator_write_phys (v6.18)
    """
    shift = kvm.profile.page_shift
    mmio: list[Part] = []
    loaded = b""
    for gpa, start, length in parts:
        gfn, offset = gpa >> shift, gpa % (1 << shift)
        if data is not None:
            errno = kvm_write_guest_page(
                kvm, host, 0, gfn, offset, data[start : start + length], vcpu
            )
            if not errno and written is not None:
                written(gpa, length)
        else:
            errno, chunk = kvm_read_guest_page(kvm, host, 0, gfn, offset, length)
            loaded += chunk if not errno else bytes(length)
        if errno:
            mmio.append((gpa, start, length))
    if not mmio:
        return loaded, None
    mmio_gpa, first, _ = mmio[0]
    length = sum(part[2] for part in mmio)
    stored = data[first : first + length] if data is not None else None
    return loaded, MmioExit(mmio_gpa, length, stored)
