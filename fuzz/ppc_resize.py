"""HPT resizing in the POWER harness: the bodies of the resize actions of
:class:`~kvmspec.fuzz.ppc_harness.PpcHarness` (which keeps a thin method for each, so that
the decoders' action names keep their meaning), and the checks of a commit.

The VMM prepares a table of a new order (KVM_PPC_RESIZE_HPT_PREPARE), its work item
allocates it, and the commit (KVM_PPC_RESIZE_HPT_COMMIT) stops the vCPUs, rehashes every
bolted entry into the new table, swaps the tables and lets the vCPUs run again. After a
commit, :func:`~kvmspec.spec.invariants.ppc.check_hpt_resize` judges the tables, and the
harness keeps only the bolted entries the guest entered, each found again where its hash
leads in the new table (P10); the guest must re-enter the others.

kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_vm_ioctl_resize_hpt_prepare,
resize_hpt_prepare_work, kvm_vm_ioctl_resize_hpt_commit, resize_hpt_rehash_hpte (v6.18)
"""

from __future__ import annotations

from errno import EBUSY
from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import KernelOp
from kvmspec.reference.ppc.hpt import HPTES_PER_GROUP, hpt_hash
from kvmspec.reference.ppc.hpte import (
    HPTE_V_ABSENT,
    HPTE_V_BOLTED,
    HPTE_V_SECONDARY,
    HPTE_V_VALID,
)
from kvmspec.reference.ppc.resize import (
    kvm_vm_ioctl_resize_hpt_commit,
    kvm_vm_ioctl_resize_hpt_prepare,
    resize_hpt_prepare_work,
)
from kvmspec.spec.invariants.ppc import check_hpt_resize, hpt_guest_entries

if TYPE_CHECKING:
    from kvmspec.fuzz.ppc_harness import Entered, PpcHarness


def prepare(harness: PpcHarness, order: int) -> None:
    """KVM_PPC_RESIZE_HPT_PREPARE to ``order``."""
    ret = kvm_vm_ioctl_resize_hpt_prepare(harness.kvm, 0, order)
    harness.log(f"RESIZE_HPT_PREPARE {order}: {ret}")


def work(harness: PpcHarness) -> None:
    """The prepare work item runs (allocates the new table)."""
    resize = harness.mmu.resize_hpt
    if resize is not None and resize.error == -EBUSY and resize.hpt is None:
        resize_hpt_prepare_work(harness.kvm, resize)


def commit_op(harness: PpcHarness, order: int) -> KernelOp[int]:
    """KVM_PPC_RESIZE_HPT_COMMIT to ``order`` as an operation, for a caller that interleaves
    it with others; when it ends, the tables are checked and the guest's entries rehashed."""
    mmu = harness.mmu
    before = hpt_guest_entries(mmu)
    before_order = mmu.hpt.order
    commit = kvm_vm_ioctl_resize_hpt_commit(harness.kvm, 0, order)

    def checked() -> KernelOp[int]:
        ret = yield from commit
        harness.log(f"RESIZE_HPT_COMMIT {order}: {ret}")
        harness.found += [
            str(v) for v in check_hpt_resize(before, before_order, order, ret, harness.kvm, mmu)
        ]
        if ret == 0:
            rehashed(harness)
        return ret

    return checked()


def rehashed(harness: PpcHarness) -> None:
    """After a resize: only the bolted entries remain, each where its hash leads (P10)."""
    kept = {}
    for entry in harness.entered.values():
        if not entry.v & HPTE_V_BOLTED:
            continue
        index = find(harness, entry)
        if index is None:
            harness.found.append(f"P10: bolted entry for ea {entry.ea:#x} not at its hash")
        else:
            kept[index] = entry
    harness.entered = kept


def find(harness: PpcHarness, entry: Entered) -> int | None:
    """Where the table holds ``entry`` (its group, primary or secondary as it says)."""
    hpt = harness.mmu.hpt
    group = hpt_hash(hpt, harness.segment, entry.ea)
    if entry.v & HPTE_V_SECONDARY:
        group ^= hpt.mask
    for index in range(group * HPTES_PER_GROUP, (group + 1) * HPTES_PER_GROUP):
        v = hpt.v(index)
        if v & (HPTE_V_VALID | HPTE_V_ABSENT) and v & ~(HPTE_V_ABSENT | HPTE_V_VALID) == entry.v:
            return index
    return None
