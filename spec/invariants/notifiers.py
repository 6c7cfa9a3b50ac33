"""White-box invariants of the MMU-notifier bookkeeping (INVENTORY C.2: N1, N2, N3, N6).

:class:`NotifierCounters` remembers the sequence count between checks (it must never go
back) and checks the counters' ranges after every step.
"""

from __future__ import annotations

from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import INVALID_GPA
from kvmspec.spec.invariants import Violation


class NotifierCounters:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.last_seq = kvm.mmu_invalidate_seq

    def check(self) -> list[Violation]:
        kvm = self.kvm
        violations = []
        if kvm.mmu_invalidate_in_progress < 0:
            violations.append(Violation("N1", "mmu_invalidate_in_progress is negative"))
        if kvm.mmu_invalidate_seq < self.last_seq:
            violations.append(Violation("N2", "mmu_invalidate_seq went back"))
        self.last_seq = kvm.mmu_invalidate_seq
        start, end = kvm.mmu_invalidate_range_start, kvm.mmu_invalidate_range_end
        if kvm.mmu_invalidate_in_progress and start != INVALID_GPA and not start < end:
            violations.append(Violation("N3", f"open invalidation range [{start}, {end})"))
        if kvm.mn_active_invalidate_count < 0:
            violations.append(Violation("N6", "mn_active_invalidate_count is negative"))
        return violations
