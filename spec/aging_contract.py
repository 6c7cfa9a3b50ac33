"""The black-box aging contract: reclaim sees every use of a page, where the kernel promises.

The host's reclaim asks, page by page, "was this used since I last looked?" and clears the
answer. For a page a guest uses, KVM answers for the guest through the MMU notifier (the
accessed bits of its own page tables). Soundness (C-AGING): a page accessed, by the guest or
by the VMM, since the last aging of that page is reported young. A young answer for an idle
page is allowed: it only keeps a page in memory a little longer.

The kernel is best-effort in two documented places, and the contract is loose exactly there:

* clear_young (the multi-gen LRU's walk) clears accessed bits without flushing TLBs, so a
  translation still cached in a TLB can be used again without setting any bit. After such an
  aging, the page's guest accesses are not judged until the host invalidates the page
  (MADV_DONTNEED, mprotect, migration, munmap), which removes every translation of it. The
  same holds after clear_flush_young found a page old: it flushes only what it found young,
  so a TLB entry left by an earlier clear without a flush survives it too;
* when KVM zaps translations (for an invalidation, or a memslot DELETE or MOVE), their
  accessed bits are dropped, not handed to the host (since v6.13 KVM no longer marks pages
  accessed on zap), so guest uses before such a zap are not judged. A memslot update zaps
  at one of its steps (kvm_invalidate_memslot), before it returns, and a VMM that ages while
  one is under way cannot tell whether that step has run: guest uses are not judged while
  any update is in flight.

Stated over operations and observations only, by host page address.

kernel: mm/rmap.c:folio_referenced_one; mm/mmu_notifier.c:__mmu_notifier_clear_flush_young,
__mmu_notifier_clear_young; virt/kvm/kvm_main.c:kvm_mmu_notifier_clear_young (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.spec.contracts import ContractViolation


@dataclass
class AgingContract:
    """Per host page: used since its last aging? Judged strictly?"""

    page_size: int
    used: set[int] = field(default_factory=set)
    """Pages the VMM used since their last aging."""
    guest_used: set[int] = field(default_factory=set)
    """Pages a guest used since their last aging."""
    loose: set[int] = field(default_factory=set)
    """Pages aged without a TLB flush since the host last took them away."""
    updates_in_flight: int = 0
    """Memslot updates started and not yet returned: any may zap translations meanwhile."""

    def _page(self, hva: int) -> int:
        return hva - hva % self.page_size

    @staticmethod
    def _forget(start: int, end: int, *sets: set[int]) -> None:
        """Take the pages in [start, end) out of each of ``sets``."""
        for pages in sets:
            pages.difference_update([page for page in pages if start <= page < end])

    def on_host_access(self, hva: int) -> None:
        self.used.add(self._page(hva))

    def on_guest_access(self, hva: int) -> None:
        """A guest access that completed through the page at ``hva``."""
        self.guest_used.add(self._page(hva))

    def on_host_drop(self, start: int, end: int) -> None:
        """MADV_DONTNEED or munmap: the pages are gone, and so is what they were used for."""
        self._forget(start, end, self.loose, self.used, self.guest_used)

    def on_invalidate(self, start: int, end: int) -> None:
        """The host invalidated [start, end) (MADV_DONTNEED, mprotect, migration, munmap):
        KVM dropped every translation of it, and their accessed bits with them; no TLB
        holds a stale one any more."""
        self._forget(start, end, self.loose, self.guest_used)

    def on_host_remap(self, start: int, end: int) -> None:
        """The host collapsed [start, end) into a huge page or split one (MADV_COLLAPSE, a
        PMD split). The host's own accessed bits of a remapped page are not stated
        precisely, so the uses so far are forgotten. KVM's translations are another matter:
        a remap that took them away invalidated the range (:meth:`on_invalidate`), and one
        that did not (collapsing a page that is huge already) left every TLB entry, so
        loose pages stay loose."""
        self._forget(start, end, self.used, self.guest_used)

    def on_translations_dropped(self) -> None:
        """A memslot DELETE or MOVE returned: KVM may have zapped any translation."""
        self.guest_used.clear()

    def on_memslot_update_start(self) -> None:
        """A KVM_SET_USER_MEMORY_REGION started, among actors stepped in turn (the generic
        harness); until it returns, it may zap."""
        self.updates_in_flight += 1

    def on_memslot_update_end(self, zapped: bool) -> None:
        """It returned; ``zapped``: it was a DELETE or MOVE (or failed, perhaps after its
        INVALID step had zapped), so KVM may have zapped any translation."""
        self.updates_in_flight -= 1
        if zapped:
            self.on_translations_dropped()

    def on_racing_clear(self, start: int, end: int) -> None:
        """An ager cleared the accessed bits of [start, end) without a TLB flush, racing
        the guest's accesses (seed 001's lockless ager stepped between them): its answer is
        not judged, since the accesses it raced may land on either side of it, but the
        pages are loose from now on, as after clear_young."""
        self.loose.update(range(self._page(start), end, self.page_size))

    def on_test_young(self, hva: int, young: bool) -> list[ContractViolation]:
        """KVM's test_young for the page at ``hva`` answered ``young``. It clears nothing, so
        nothing is forgotten; a page a guest used since its last aging is young (loose where
        :meth:`on_age` is). Only KVM's answer is judged: the VMM's own uses show in the
        host's page tables, which test_young through the notifier does not read."""
        page = self._page(hva)
        strict = page not in self.loose and not self.updates_in_flight
        if young or page not in self.guest_used or not strict:
            return []
        return [ContractViolation("C-AGING", f"host page {page:#x} used by the guest, tested idle")]

    def on_age(self, hva: int, flush: bool, young: bool) -> list[ContractViolation]:
        """Reclaim aged the page at ``hva`` (with a TLB flush or not) and got ``young``."""
        page = self._page(hva)
        violations = []
        if not young and page in self.used:
            violations.append(
                ContractViolation("C-AGING", f"host page {page:#x} used by the VMM, aged idle")
            )
        elif (
            not young
            and page in self.guest_used
            and page not in self.loose
            and not self.updates_in_flight
        ):
            violations.append(
                ContractViolation("C-AGING", f"host page {page:#x} used by a guest, aged idle")
            )
        self.used.discard(page)
        self.guest_used.discard(page)
        if not flush:
            self.loose.add(page)
        return violations
