"""The reference model: how KVM manages guest memory, readable next to the kernel.

Start with :mod:`kvmspec.reference.kvm_main` (the memslot update path), then
:mod:`~kvmspec.reference.memslots` (the sets and their lookups) and
:mod:`~kvmspec.reference.dirty_log`. Every function cites the kernel function it models.
"""
