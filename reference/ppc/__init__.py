"""POWER Book3S HV: the hashed page table (HPT) and the radix MMU, built piece by piece
(issue 6).

The HPT, in reading order: :mod:`~kvmspec.reference.ppc.hpte` (the two words of a hashed page-table
entry, the guest's view of one, page sizes and protections), :mod:`~kvmspec.reference.ppc.hpt`
(the table itself: groups, the hash, HPTE locks, the reverse map entries and the per-slot
rmap words that chain them), :mod:`~kvmspec.reference.ppc.tlb` (the hardware: TLBs, the
R and C bits it sets, tlbie), :mod:`~kvmspec.reference.ppc.hcalls` (the guest's hypercalls
H_ENTER, H_REMOVE, H_BULK_REMOVE, H_PROTECT, H_READ, H_CLEAR_REF, H_CLEAR_MOD),
:mod:`~kvmspec.reference.ppc.rmap_walk` (what the host does through the rmaps: unmap for
notifiers and slot flushes, aging, dirty harvest), :mod:`~kvmspec.reference.ppc.hpt_mmu`
(the KvmArch hooks, start here for how the generic layer reaches all of it),
:mod:`~kvmspec.reference.ppc.fault` (the guest's faults: real mode, virtual mode, MMIO and
its per-vCPU cache) and :mod:`~kvmspec.reference.ppc.resize` (KVM_PPC_RESIZE_HPT_PREPARE and
COMMIT: only bolted entries move).

The radix MMU of POWER9 and later (profile ``ppc64-hv-radix``), in reading order:
:mod:`~kvmspec.reference.ppc.radix_pgtable` (the partition-scoped tree, its TLB and the
tlbie), :mod:`~kvmspec.reference.ppc.radix_fault` (the page fault and the leaf size it may
use) and :mod:`~kvmspec.reference.ppc.radix_mmu` (the KvmArch hooks and the dirty harvest).
"""
