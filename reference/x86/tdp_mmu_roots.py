"""The TDP MMU's state and the life of its roots.

Every vCPU of an address space runs on one shared root (there are no guest page tables to
shadow: a TDP root translates gpa to hpa for the whole VM). A root lives on
``kvm->arch.tdp_mmu_roots`` with a reference count (X14):

* it is born with two references, the vCPU's that asked for it and the TDP MMU's own;
* a valid root keeps the MMU's reference: a vCPU that drops its root never frees it, and
  the next vCPU finds it again by role;
* a memslot DELETE or MOVE (the fast zap) *invalidates* every root: marked invalid and
  scheduled to zap. vCPUs are asked to drop their invalid roots before entering the guest;
  the updater zaps the scheduled roots under the read side of mmu_lock and only then puts
  the MMU's reference, so a root stays reachable by MMU notifiers for as long as it maps
  anything;
* the last put (only legal on an invalid root) unlists the root and frees it through
  ``call_rcu``: lockless walkers (aging, the fault path) may still be inside it.

Walks over the roots take a reference on the root they visit (tdp_mmu_next_root), so they
may yield in the middle of one.

kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_alloc_root, kvm_tdp_mmu_get_root,
kvm_tdp_mmu_put_root, tdp_mmu_next_root, kvm_tdp_mmu_invalidate_roots;
arch/x86/kvm/mmu/mmu.c:kvm_mmu_free_obsolete_roots, kvm_mmu_load (v6.18)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmspec.reference.x86.mmu_page import MmuPageCounts
from kvmspec.reference.x86.paging import PT64_ROOT_4LEVEL
from kvmspec.reference.x86.spte import SpteMasks
from kvmspec.reference.x86.tdp_iter import TdpMmuPage, TdpTables
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH, TlbEntry

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm


@dataclass(slots=True)
class TdpVcpu:
    """One vCPU's side of the TDP MMU: its root (vcpu->arch.mmu->root), its pending
    requests, and its TLB, which caches gfn -> (pfn, writable) as the hardware walks."""

    vcpu_id: int
    root: TdpMmuPage | None = None
    requests: set[str] = field(default_factory=set)
    tlb: dict[int, TlbEntry] = field(default_factory=dict)

    def flush_tlb(self) -> None:
        self.tlb.clear()


class TdpMmuState(MmuPageCounts):
    """kvm->arch for a VM on the TDP MMU: the SPTE format, the tables, the root list
    (newest first, as list_add_rcu puts them), the page statistics (leaf SPTEs per level,
    kvm->stat.pages), the count of non-root page tables in use (tdp_mmu_pages), and the
    per-vCPU state. ``pml``: the CPU logs the gpa of every write that sets a D bit (Intel
    PML, kvm_x86_ops.cpu_dirty_log_size), so dirty logging clears D bits instead of
    write-protecting."""

    def __init__(self, masks: SpteMasks, pml: bool = False) -> None:
        super().__init__()
        self.masks = masks
        self.pml = pml
        self.tables = TdpTables()
        self.roots: list[TdpMmuPage] = []
        self.page_stats: Counter[int] = Counter()
        self.tdp_mmu_pages = 0
        self.vcpus: dict[int, TdpVcpu] = {}
        self.root_level = PT64_ROOT_4LEVEL
        self._next_actor = 0

    def vcpu_mmu(self, vcpu_id: int) -> TdpVcpu:
        return self.vcpus.setdefault(vcpu_id, TdpVcpu(vcpu_id))

    def new_actor(self, what: str) -> str:
        """A name for one operation, so the history tells who wrote what."""
        self._next_actor += 1
        return f"{what}#{self._next_actor}"


def kvm_tdp_mmu_get_root(root: TdpMmuPage) -> bool:
    """refcount_inc_not_zero: a root whose count already reached zero is being freed and
    cannot be revived.

    kernel: arch/x86/kvm/mmu/tdp_mmu.h:kvm_tdp_mmu_get_root (v6.18)
    """
    if root.root_count == 0:
        return False
    root.root_count += 1
    return True


def kvm_tdp_mmu_put_root(kvm: Kvm, mmu: TdpMmuState, root: TdpMmuPage) -> None:
    """Drop a reference. The last one must be on an invalid root (the MMU holds one on
    every valid root; KVM_BUG_ON otherwise): the root leaves the list and is freed after an
    RCU grace period, since lockless walkers may still be reading it.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_put_root (v6.18)
    """
    root.root_count -= 1
    if root.root_count:
        return
    kvm.warn_on(not root.invalid, "X14", f"last reference to valid root {root!r} put")
    mmu.roots.remove(root)
    mmu.tables.unlink(root, kvm.rcu)
    mmu.tables.free_page_rcu(root, kvm.rcu)


def tdp_mmu_next_root(
    kvm: Kvm, mmu: TdpMmuState, prev: TdpMmuPage | None, only_valid: bool
) -> TdpMmuPage | None:
    """The root after ``prev`` (the first if None) that a reference could be taken on,
    skipping invalid ones if asked; the reference on ``prev`` is dropped.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_next_root (v6.18)
    """
    start = 0
    if prev is not None:
        # A root being zapped may have been unlisted meanwhile only by its own last put,
        # which the walker's reference prevents: prev is still listed.
        start = mmu.roots.index(prev) + 1
    found = None
    for root in mmu.roots[start:]:
        if (not only_valid or not root.invalid) and kvm_tdp_mmu_get_root(root):
            found = root
            break
    if prev is not None:
        kvm_tdp_mmu_put_root(kvm, mmu, prev)
    return found


def for_each_tdp_mmu_root_yield_safe(
    kvm: Kvm, mmu: TdpMmuState, as_id: int, only_valid: bool
) -> Iterator[TdpMmuPage]:
    """Every root of ``as_id`` (-1: of all address spaces), each held by a reference while
    the loop body runs, so the body may yield.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:__for_each_tdp_mmu_root_yield_safe (v6.18)
    """
    root = tdp_mmu_next_root(kvm, mmu, None, only_valid)
    while root is not None:
        if as_id < 0 or root.as_id == as_id:
            yield root
        root = tdp_mmu_next_root(kvm, mmu, root, only_valid)


def kvm_tdp_mmu_alloc_root(kvm: Kvm, mmu: TdpMmuState, vcpu_mmu: TdpVcpu, as_id: int) -> None:
    """Give the vCPU a root: a valid one of its address space if any (one more
    reference), else a new one with two references, the vCPU's and the TDP MMU's own,
    which it keeps until the root is invalidated. Runs under the read side of mmu_lock
    (the kernel rechecks under tdp_mmu_pages_lock; the model does it in one step).

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_alloc_root (v6.18)
    """
    with kvm.mmu_lock.read():
        for root in mmu.roots:
            if root.as_id == as_id and not root.invalid and kvm_tdp_mmu_get_root(root):
                vcpu_mmu.root = root
                return
        root = mmu.tables.alloc_page(mmu.root_level, 0, as_id, None)
        root.root_count = 2
        mmu.roots.insert(0, root)
        vcpu_mmu.root = root


def kvm_tdp_mmu_invalidate_roots(kvm: Kvm, mmu: TdpMmuState) -> None:
    """Mark every valid root invalid and scheduled to zap, under mmu_lock held for write.
    No vCPU can install a new SPTE in an invalid root (is_page_fault_stale), and the
    caller asks every vCPU to drop it; the MMU's reference stays until the root is zapped.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_invalidate_roots (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("invalidating TDP MMU roots")
    for root in mmu.roots:
        if not root.invalid:
            root.scheduled_root_to_zap = True
            root.invalid = True


def kvm_make_all_cpus_request(mmu: TdpMmuState, request: str) -> None:
    """kernel: virt/kvm/kvm_main.c:kvm_make_all_cpus_request (v6.18)"""
    for vcpu_mmu in mmu.vcpus.values():
        vcpu_mmu.requests.add(request)


def kvm_mmu_free_obsolete_roots(kvm: Kvm, mmu: TdpMmuState, vcpu_mmu: TdpVcpu) -> None:
    """The vCPU drops its root if it was invalidated (the put runs under the read side of
    mmu_lock for TDP MMU roots).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_free_obsolete_roots, kvm_mmu_free_roots,
    mmu_free_root_page (v6.18)
    """
    root = vcpu_mmu.root
    if root is not None and root.invalid:
        with kvm.mmu_lock.read():
            vcpu_mmu.root = None
            kvm_tdp_mmu_put_root(kvm, mmu, root)


def kvm_mmu_load(kvm: Kvm, mmu: TdpMmuState, vcpu_mmu: TdpVcpu, as_id: int) -> None:
    """Before entering the guest: handle the requests (drop an obsolete root, flush the
    TLB), and load a root if the vCPU has none. A new root gets a local TLB flush.

    kernel: arch/x86/kvm/x86.c:vcpu_enter_guest; arch/x86/kvm/mmu/mmu.c:kvm_mmu_load
    (v6.18)
    """
    if KVM_REQ_MMU_FREE_OBSOLETE_ROOTS in vcpu_mmu.requests:
        vcpu_mmu.requests.discard(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        kvm_mmu_free_obsolete_roots(kvm, mmu, vcpu_mmu)
    if KVM_REQ_TLB_FLUSH in vcpu_mmu.requests:
        vcpu_mmu.requests.discard(KVM_REQ_TLB_FLUSH)
        vcpu_mmu.flush_tlb()
    if vcpu_mmu.root is None:
        kvm_tdp_mmu_alloc_root(kvm, mmu, vcpu_mmu, as_id)
        vcpu_mmu.flush_tlb()
