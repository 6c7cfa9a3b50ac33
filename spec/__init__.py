"""The rules: what KVM's memory management must do, each rule with its source.

``kvmspec.spec.uapi`` holds the pure decision functions of the uAPI (which errno an ioctl
returns for a request, and what it changes). The reference model executes those same
functions, so the rules exist once. ``kvmspec.spec.rules`` is the catalogue of every contract
and invariant with its citation; ``kvmspec.spec.invariants`` checks the white-box ones against
the reference's state.
"""
