"""The model's WARN_ONs and lockdep assertions: each one that fired is a finding.

The kernel checks some of its own rules at run time (WARN_ON_ONCE, KVM_BUG_ON, lockdep's
``lockdep_assert_held_write``) and keeps running. The model records the same checks in
``Kvm.warnings`` with the rule each one guards (D10 for a write with no running vCPU,
LOCKING for a translation changed without mmu_lock), and this check reports them.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvmspec.reference.kvm import Kvm
from kvmspec.spec.invariants import Violation


def check_no_warnings(kvm: Kvm) -> Iterator[Violation]:
    for rule, message in kvm.warnings:
        yield Violation(rule, f"WARN: {message}")
