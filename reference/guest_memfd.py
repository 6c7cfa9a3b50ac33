"""guest_memfd: memory that only its VM maps, bound to memslots by page range.

A guest_memfd is a file created by one VM. A memslot with KVM_MEM_GUEST_MEMFD binds a range of
its pages; each page is bound to at most one slot (invariant G1). Deleting the slot unbinds it,
and the same range can be bound again.

kernel: virt/kvm/guest_memfd.c:kvm_gmem_create, kvm_gmem_bind, kvm_gmem_unbind (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.spec.uapi.constants import GUEST_MEMFD_FLAG_MMAP, KVM_MEMSLOT_GMEM_ONLY
from kvmspec.spec.uapi.guest_memfd_rules import (
    GmemFileView,
    kvm_gmem_bind_errno,
    kvm_gmem_create_errno,
)

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot


class GmemFile:
    """One guest_memfd file: its size, creation flags, and which slot holds each page.

    ``bindings`` maps a first page offset to (number of pages, slot): the kernel keeps an
    xarray indexed by page; the model keeps one entry per bound range.
    """

    __slots__ = ("bindings", "flags", "owner", "size")

    def __init__(self, owner: Kvm, size: int, flags: int) -> None:
        self.owner = owner
        self.size = size
        self.flags = flags
        self.bindings: dict[int, tuple[int, KvmMemorySlot]] = {}

    def range_is_bound(self, pgoff: int, npages: int) -> bool:
        end = pgoff + npages
        return any(
            start < end and pgoff < start + count for start, (count, _) in self.bindings.items()
        )

    def view_for(self, kvm: Kvm) -> GmemFileView:
        return GmemFileView(is_guest_memfd=True, owned_by_this_vm=self.owner is kvm, size=self.size)


def kvm_gmem_bind(kvm: Kvm, slot: KvmMemorySlot, file: GmemFile | None, offset: int) -> int:
    """Bind ``slot`` to ``file`` pages from byte ``offset``: 0, EBADF or EINVAL.

    A file created with GUEST_MEMFD_FLAG_MMAP backs the slot for shared accesses too, which
    the kernel records as the internal KVM_MEMSLOT_GMEM_ONLY flag.

    kernel: virt/kvm/guest_memfd.c:kvm_gmem_bind (v6.18)
    """
    page_shift = kvm.profile.page_shift
    pgoff = offset >> page_shift
    view = file.view_for(kvm) if file is not None else None
    already = file is not None and file.range_is_bound(pgoff, slot.npages)
    errno = kvm_gmem_bind_errno(kvm.profile, view, offset, slot.npages, already)
    if errno:
        return errno
    assert file is not None
    file.bindings[pgoff] = (slot.npages, slot)
    slot.gmem_file = file
    slot.gmem_pgoff = pgoff
    if file.flags & GUEST_MEMFD_FLAG_MMAP:
        slot.flags |= KVM_MEMSLOT_GMEM_ONLY
    return 0


def kvm_gmem_unbind(slot: KvmMemorySlot) -> None:
    """Release the slot's page range, so it can be bound again.

    kernel: virt/kvm/guest_memfd.c:kvm_gmem_unbind (v6.18)
    """
    file = slot.gmem_file
    if file is None:
        return
    file.bindings.pop(slot.gmem_pgoff, None)
    slot.gmem_file = None


def kvm_gmem_create(kvm: Kvm, size: int, flags: int) -> tuple[int, GmemFile | None]:
    """KVM_CREATE_GUEST_MEMFD: (0, the new file) or (EINVAL, None).

    kernel: virt/kvm/guest_memfd.c:kvm_gmem_create (v6.18)
    """
    errno = kvm_gmem_create_errno(kvm.profile, size, flags)
    if errno:
        return errno, None
    file = GmemFile(kvm, size, flags)
    kvm.gmem_files.append(file)
    return 0, file
