"""This machine's PVM backend: a vCPU's own copy of its shadow root's top-level entries.

The kernel on these machines runs KVM with a private PVM backend (FINDINGS.md section 1;
its source is not public). Its guests run on the shadow MMU like any other, with one
difference the model can see: a vCPU does not always walk the top level of its shadow
root itself. This module models what was measured on /dev/kvm with two vCPUs on one root
(tests/test_pvm_top_level.py replays each measurement; the trace
corpus/conformance/x86_64-linux-6.18-pvm/s4-dirty-ring-second-vcpu-store-logged-again.jsonl
is the first one found):

- A vCPU that enters the guest while it is the VM's only vCPU walks the root itself.
- The first time a vCPU enters while the VM has two or more vCPUs, it takes a copy of
  the root's present top-level (PML4) entries, and from then on the hardware reads the
  top level from that copy. The levels below are the root's own shadow pages, shared.
- An entry added to the root afterwards (by another vCPU's fault) is missing from the
  copy. An access through it takes a not-present fault, which KVM handles as usual: the
  SPTEs below are present, so nothing needs fixing (a spurious fault), but the fault path
  has made the leaf again, and making a writable leaf in a dirty-logged slot logs the page
  (make_spte), a second time and in this vCPU's dirty ring. After the fault the copy holds
  that one entry; the other missing entries stay missing.
- A TLB flush of the vCPU (a remote flush, a new root) marks the copy stale; it is taken
  again in full when the vCPU next enters the guest.

Why the copy exists is a guess the measurements allow (a per-vCPU top-level page, so that
each vCPU's page table can also hold per-vCPU host entries); what it does is measured.

kernel: arch/x86/kvm/x86.c:vcpu_enter_guest, kvm_vcpu_flush_tlb_all; the PVM backend's page
fault exit and TLB flush (not public; behaviour measured)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.x86.paging import PT_PRESENT_MASK, pt_index

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.x86.mmu_page import ShadowMmuState
    from kvmspec.reference.x86.tlb import VcpuMmu


def _root_top_level(vcpu_mmu: VcpuMmu) -> dict[int, int]:
    """The root's present top-level entries (index -> SPTE); none without a root."""
    root = vcpu_mmu.root.sp
    if root is None:
        return {}
    return {index: spte for index, spte in root.spt.items() if spte & PT_PRESENT_MASK}


def pvm_enter_guest(kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu) -> None:
    """The last step before the vCPU enters the guest, after its requests are served and
    its root loaded: take the copy of the top level when the vCPU first runs beside another
    vCPU, or take it again when a flush made it stale."""
    if not mmu.pvm_top_level_copy:
        return
    if vcpu_mmu.top_level is None:
        if len(kvm.vcpus) < 2:
            return  # alone in the VM: the vCPU walks the root itself
    elif not vcpu_mmu.top_level_stale:
        return
    vcpu_mmu.top_level = _root_top_level(vcpu_mmu)
    vcpu_mmu.top_level_stale = False


def pvm_sync_faulting_entry(vcpu_mmu: VcpuMmu, gva: int) -> None:
    """After KVM handled a page fault at ``gva`` (whatever it decided, MMIO emulation
    included): the copy takes the root's top-level entry for ``gva``, and only that one."""
    if vcpu_mmu.top_level is None or vcpu_mmu.root.sp is None:
        return
    index = pt_index(gva, vcpu_mmu.root.sp.role.level)
    spte = vcpu_mmu.root.sp.spt.get(index, 0)
    if spte & PT_PRESENT_MASK:
        vcpu_mmu.top_level[index] = spte
    else:
        vcpu_mmu.top_level.pop(index, None)
