"""The x86 MMU, built up piece by piece (issue 4).

The encodings: :mod:`~kvmspec.reference.x86.paging` (the bits of a 64-bit paging entry,
levels and index arithmetic), :mod:`~kvmspec.reference.x86.spte` (KVM's shadow PTEs, in the
legacy and the EPT format), :mod:`~kvmspec.reference.x86.mmio_spte` and
:mod:`~kvmspec.reference.x86.guest_walk` (the guest's own page tables, walked as the
hardware does). The shadow MMU on top of them, in reading order:
:mod:`~kvmspec.reference.x86.shadow_mmu` (the KvmArch hooks, start here),
:mod:`~kvmspec.reference.x86.paging_tmpl` (the page fault), ``mmu_page`` (shadow pages and
their hash), ``rmap`` and ``mmu_spte`` (reverse maps and every SPTE write), ``page_track``
(write-protecting shadowed guest tables), ``zap`` (two-phase zaps, the fast zap, emulated
guest page-table writes), ``roots`` and ``tlb`` (each vCPU's roots, requests and TLB),
``unsync`` (unsync shadow pages and their sync on CR3 loads and INVLPG) and
``guest_access`` (a guest instruction: the hardware walk, the fault, the emulator).

The TDP MMU (a profile option; this machine's KVM runs the shadow MMU), in reading order:
:mod:`~kvmspec.reference.x86.tdp_arch` (the KvmArch hooks, start here), ``tdp_iter`` (the
tables and the iterator that walks them, yielding and restarting), ``tdp_mmu_roots`` (roots
and their reference counts), ``tdp_mmu`` (atomic SPTE updates, FROZEN SPTEs, zap, aging,
write-protection and dirty clearing) and ``tdp_fault`` (the page fault, its lockless fast path,
and the hardware walk).
"""
