"""The arm64 stage-2 MMU, built up piece by piece (issue 5).

The page-table library first (the kernel's kvm_pgtable, arch/arm64/kvm/hyp/pgtable.c), in
reading order: :mod:`~kvmspec.reference.arm64.descriptors` (granules, levels and the bits of
a stage-2 descriptor), :mod:`~kvmspec.reference.arm64.pgtable` (table pages, their
reference counts, and the walker with its RCU protection),
:mod:`~kvmspec.reference.arm64.stage2` (map, unmap, permissions and aging, all through
break-before-make), :mod:`~kvmspec.reference.arm64.split` (eager splitting of blocks),
:mod:`~kvmspec.reference.arm64.s2_mmu` (the VMID's TLBs and the TLB invalidations) and
:mod:`~kvmspec.reference.arm64.hw_access` (the hardware: a guest access walks the tables,
fills the TLB and updates the access flag and dirty state).
:mod:`~kvmspec.reference.arm64.history` records every descriptor write and TLBI, and states
the rules over that record (break-before-make, no lost hardware update).

Then the glue of arch/arm64/kvm/mmu.c: :mod:`~kvmspec.reference.arm64.mmu` (the KvmArch
hooks the memslot layer, the MMU notifiers and dirty logging call) and
:mod:`~kvmspec.reference.arm64.fault` (kvm_handle_guest_abort and user_mem_abort, and a
guest access that walks, faults and retries).
"""
