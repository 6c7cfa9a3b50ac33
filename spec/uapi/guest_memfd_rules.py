"""guest_memfd creation and binding as pure decisions.

A guest_memfd is a file whose pages only the VM that created it can map. A memslot with
KVM_MEM_GUEST_MEMFD binds a page range of such a file; each file page can be bound to at most
one slot at a time, and a slot stays bound until it is deleted.

kernel: virt/kvm/guest_memfd.c:kvm_gmem_create, kvm_gmem_bind (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EBADF, EINVAL

from kvmspec.spec.platforms import PlatformProfile


@dataclass(frozen=True, slots=True)
class GmemFileView:
    """What binding needs to know about the file behind a descriptor."""

    is_guest_memfd: bool
    owned_by_this_vm: bool
    size: int


def kvm_gmem_create_errno(profile: PlatformProfile, size: int, flags: int) -> int:
    """KVM_CREATE_GUEST_MEMFD: unsupported flags, then a size that is not positive or not
    page-aligned, are EINVAL.

    kernel: virt/kvm/guest_memfd.c:kvm_gmem_create (v6.18)
    """
    if not profile.supports_guest_memfd:
        return EINVAL
    if flags & ~profile.guest_memfd_flags:
        return EINVAL
    if size <= 0 or size % profile.page_size:
        return EINVAL
    return 0


def kvm_gmem_bind_errno(
    profile: PlatformProfile,
    file: GmemFileView | None,
    offset: int,
    npages: int,
    range_already_bound: bool,
) -> int:
    """Binding a slot to ``npages`` file pages from ``offset``: 0, EBADF or EINVAL.

    ``file`` is None when the descriptor is not open. Any other file must be a guest_memfd of
    this VM, the range must lie inside it, and no page of the range may be bound already.

    kernel: virt/kvm/guest_memfd.c:kvm_gmem_bind (v6.18)
    """
    if file is None:
        return EBADF
    if not file.is_guest_memfd or not file.owned_by_this_vm:
        return EINVAL
    size = npages << profile.page_shift
    if offset < 0 or offset % profile.page_size or offset + size > file.size:
        return EINVAL
    if range_already_bound:
        return EINVAL
    return 0
