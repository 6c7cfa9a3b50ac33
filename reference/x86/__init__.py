"""The x86 MMU, built up piece by piece (issue 4).

So far: :mod:`~kvmspec.reference.x86.paging` (the bits of a 64-bit paging entry, levels and
index arithmetic), :mod:`~kvmspec.reference.x86.spte` (how KVM encodes its shadow PTEs, in
the legacy and the EPT format) and :mod:`~kvmspec.reference.x86.guest_walk` (the guest's own
page tables, walked as the hardware does). The shadow MMU proper (shadow pages, rmaps, the
fault path) is built on these.
"""
