"""struct kvm_memory_slot: one guest-physical range backed by host memory.

kernel: include/linux/kvm_host.h:struct kvm_memory_slot; virt/kvm/kvm_main.c:kvm_copy_memslot
(v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.dirty_bitmap import DirtyBitmap
from kvmspec.spec.uapi.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
)

if TYPE_CHECKING:
    from kvmspec.reference.guest_memfd import GmemFile


class KvmMemorySlot:
    """A memslot. Objects are never changed while they are in an active set (seed 003).

    ``freed`` marks an object the kernel would have kfree()d; a freed slot must never be
    reachable from any set again (checked by invariant M10).
    """

    __slots__ = (
        "arch",
        "as_id",
        "base_gfn",
        "dirty_bitmap",
        "flags",
        "freed",
        "gmem_file",
        "gmem_pgoff",
        "id",
        "npages",
        "userspace_addr",
    )

    def __init__(
        self,
        *,
        as_id: int,
        id: int,
        base_gfn: int,
        npages: int,
        flags: int,
        userspace_addr: int,
    ) -> None:
        self.as_id = as_id
        self.id = id
        self.base_gfn = base_gfn
        self.npages = npages
        self.flags = flags
        self.userspace_addr = userspace_addr
        self.dirty_bitmap: DirtyBitmap | None = None
        self.arch: dict[str, object] = {}
        self.gmem_file: GmemFile | None = None
        self.gmem_pgoff = 0
        self.freed = False

    def __repr__(self) -> str:
        return (
            f"<slot {self.as_id}:{self.id} gfn {self.base_gfn:#x}+{self.npages} "
            f"flags {self.flags:#x} hva {self.userspace_addr:#x}>"
        )

    @property
    def end_gfn(self) -> int:
        """One past the last gfn of the slot."""
        return self.base_gfn + self.npages

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def is_gmem(self) -> bool:
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def identity(self) -> tuple[int, int, int, int, int, int, object, object, int]:
        """The fields a reader can see; used to prove a slot was not changed in place."""
        return (
            self.as_id,
            self.id,
            self.base_gfn,
            self.npages,
            self.flags,
            self.userspace_addr,
            self.dirty_bitmap,
            self.gmem_file,
            self.gmem_pgoff,
        )


def kvm_copy_memslot(dest: KvmMemorySlot, src: KvmMemorySlot) -> None:
    """Copy the slot's identity, range, flags, bitmap and arch data into ``dest`` (not the
    tree nodes: ``dest`` is in no set yet; and not the guest_memfd binding, which stays with
    the slot that was bound, so an INVALID copy of a guest_memfd slot has no file).

    kernel: virt/kvm/kvm_main.c:kvm_copy_memslot (v6.18)
    """
    dest.as_id = src.as_id
    dest.id = src.id
    dest.base_gfn = src.base_gfn
    dest.npages = src.npages
    dest.flags = src.flags
    dest.userspace_addr = src.userspace_addr
    dest.dirty_bitmap = src.dirty_bitmap
    dest.arch = dict(src.arch)
