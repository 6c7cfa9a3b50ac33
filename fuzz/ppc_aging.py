"""Aging in the POWER harness: the host asks KVM whether the guest used its pages, and the
answers are judged by the aging contract (C-AGING). The bodies of the two aging actions of
:class:`~kvmspec.fuzz.ppc_harness.PpcHarness` (which keeps a thin method for each, so that
the decoders' action names keep their meaning): the host ages a whole slot, or reclaim asks
about one page, as clear_young (the multi-gen LRU), clear_flush_young (classic reclaim) or
test_young, which clears nothing.

On an HPT guest the aging is exact, flush or not: kvm_age_rmapp clears each R with
kvmppc_clear_ref_hpte, whose tlbie makes the next access set R again. So every page the
guest used since its last aging is young, and an aging of one page leaves every other page
the guest used young.

kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_clear_young, kvm_mmu_notifier_test_young;
arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_age_rmapp, kvm_test_age_rmapp;
arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_clear_ref_hpte (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.mmu_notifier import (
    kvm_mmu_notifier_clear_flush_young,
    kvm_mmu_notifier_clear_young,
    kvm_mmu_notifier_test_young,
)

if TYPE_CHECKING:
    from kvmspec.fuzz.ppc_harness import PpcHarness


def host_ages(harness: PpcHarness, hva: int, pages: int) -> None:
    """The host ages ``pages`` pages from ``hva`` with clear_young (C-AGING: one answer for
    the range, young if any page was used), then tests the first."""
    young = kvm_mmu_notifier_clear_young(harness.kvm, hva, hva + pages * harness.host.page_size)
    judge_aging(harness, hva, pages, young)
    assert harness.host.notifier is not None
    harness.host.notifier.test_young(hva)


def host_ages_page(harness: PpcHarness, hva: int, how: str) -> None:
    """Reclaim asks about the page at ``hva``, as ``how`` (one of
    :data:`~kvmspec.fuzz.ppc_harness.AGINGS`) says (C-AGING). An aging clears the accessed
    state of that page only: test_young, which clears nothing, still finds every other page
    the guest used young."""
    kvm = harness.kvm
    if how == "test":
        judge_test_young(harness, hva, kvm_mmu_notifier_test_young(kvm, hva))
        return
    age = kvm_mmu_notifier_clear_young if how == "clear" else kvm_mmu_notifier_clear_flush_young
    judge_aging(harness, hva, 1, age(kvm, hva, hva + harness.host.page_size))
    for other in sorted(harness.aging.guest_used):
        judge_test_young(harness, other, kvm_mmu_notifier_test_young(kvm, other))


def judge_aging(harness: PpcHarness, hva: int, pages: int, young: bool) -> None:
    """C-AGING for an aging of ``pages`` host pages from ``hva`` that answered ``young``:
    exact, flush or not (see the module).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_age_rmapp;
    arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_clear_ref_hpte (v6.18)
    """
    for page in range(pages):
        hva_page = hva + page * harness.host.page_size
        harness.found += map(str, harness.aging.on_age(hva_page, True, young))


def judge_test_young(harness: PpcHarness, hva: int, young: bool) -> None:
    """C-AGING for test_young, which clears nothing: a page the guest used since its
    last aging is young.

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_test_young;
    arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_test_age_rmapp (v6.18)
    """
    harness.found += map(str, harness.aging.on_test_young(hva, young))
