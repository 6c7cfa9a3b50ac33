"""The known kernel findings the x86 shadow harness may let pass, and exactly what each
covers: :class:`KnownFindings`, which :class:`~kvmspec.fuzz.x86_harness.ShadowHarness` holds
for each VM it starts. The fuzzers' harnesses let :data:`KNOWN_KERNEL_FINDINGS` pass (through
:func:`~kvmspec.fuzz.x86_layouts.make_harness`), so that they look for new problems; a
harness built by a test reports everything.

One finding so far, :data:`SYNCED_STALE_MMIO`, seen only in the ``mmio`` layout (MMIO
caching on): the sync of an unsync page remakes a stale MMIO SPTE in the current
generation. Letting it pass must hide nothing else, so the harness remembers, at each check,
where the stale MMIO SPTEs of unsync pages are, and lets pass only an SPTE that was one of
them (or already let pass) and is now, in the same place and for the same gfn, trusted: its
X11 report, and the guest's accesses through it, which exit to the VMM as MMIO.

kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(sync_spte);
arch/x86/kvm/mmu/mmu.c:check_mmio_spte (v6.18)
"""

from __future__ import annotations

from kvmspec.fuzz.generic_harness import Log
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.x86.mmio_spte import (
    check_mmio_spte,
    get_mmio_spte,
    get_mmio_spte_gfn,
    is_mmio_spte,
)
from kvmspec.reference.x86.mmu_page import SptePtr
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.x86 import TrustedMmioSpte, mmio_spte_name

SYNCED_STALE_MMIO = "a sync remade a stale MMIO SPTE in the current generation"
"""A kernel finding (tests/test_x86_shadow_mmu.py,
test_finding_a_sync_gives_a_stale_mmio_spte_the_current_generation): an MMIO SPTE in an
unsync page outlives the creation of a slot over its gfn, stale as it should be, but the
guest's next flush of it (INVLPG, or a CR3 load that syncs the whole page) runs
FNAME(sync_spte), which remakes the SPTE in the current generation when the guest PTE still
names that gfn. X11 then reports the SPTE as trusted over the slot, and the guest's accesses
through it exit to the VMM as MMIO instead of reaching the slot's memory (COHERENCE). Let
pass, exactly that SPTE passes both: one that was stale in an unsync page at the last check
and is now, in the same place and for the same gfn, trusted, for as long as it stays a
trusted MMIO SPTE of that gfn (a later sync may remake it with the guest PTE's new rights)."""
KNOWN_KERNEL_FINDINGS = (SYNCED_STALE_MMIO,)
"""Kernel behaviour the checks report and a fuzzing run lets pass (the x86 state machine and
fuzz_x86.py, through :func:`~kvmspec.fuzz.x86_layouts.make_harness`), so that they look for
new problems."""


class KnownFindings:
    """The known kernel findings named in ``tolerated`` (of :data:`KNOWN_KERNEL_FINDINGS`),
    let pass in one VM on the shadow MMU: what a sync may remake, and what it has remade
    (see the module)."""

    def __init__(self, kvm: Kvm, mmu: ShadowMmu, tolerated: tuple[str, ...]) -> None:
        self.kvm = kvm
        self.mmu = mmu
        self.tolerated = tolerated
        # SYNCED_STALE_MMIO: the stale MMIO SPTEs of unsync pages at the last check (what a
        # sync may remake), and the SPTEs a sync had remade then, with their gfns.
        self.unsync_stale_mmio: dict[SptePtr, int] = {}
        self.synced_stale_mmio: dict[SptePtr, int] = {}

    def _unsync_stale_mmio(self) -> dict[SptePtr, int]:
        """Where the MMIO SPTEs of unsync pages that cannot be trusted now are, with their
        gfns: the SPTEs a sync may remake (:data:`SYNCED_STALE_MMIO`), if this harness lets
        that pass (else none)."""
        if SYNCED_STALE_MMIO not in self.tolerated:
            return {}
        generation = self.kvm.memslots(0).generation
        masks = self.mmu.masks
        return {
            SptePtr(sp, index): get_mmio_spte_gfn(masks, spte)
            for sp in self.mmu.sp_by_pfn.values()
            if sp.unsync
            for index, spte in sp.spt.items()
            if is_mmio_spte(masks, spte) and not check_mmio_spte(generation, spte)
        }

    def synced_stale_mmio_sptes(self) -> dict[SptePtr, int]:
        """The MMIO SPTEs that show :data:`SYNCED_STALE_MMIO` now, if this harness lets it
        pass (else none), by where they are: each was stale in an unsync page at the last
        check, or showed the finding then, and is now, in the same place and for the same
        gfn, a trusted MMIO SPTE (the guest's flush synced it, again perhaps, with the guest
        PTE's current rights: no fault makes an MMIO SPTE for a gfn a slot holds)."""
        if SYNCED_STALE_MMIO not in self.tolerated:
            return {}
        generation = self.kvm.memslots(0).generation
        masks = self.mmu.masks
        remade = {}
        for sptep, gfn in {**self.unsync_stale_mmio, **self.synced_stale_mmio}.items():
            spte = sptep.get()
            if (
                is_mmio_spte(masks, spte)
                and get_mmio_spte_gfn(masks, spte) == gfn
                and check_mmio_spte(generation, spte)
            ):
                remade[sptep] = spte
        return remade

    def synced_stale_mmio_gfn(self, vcpu: int, gva: int) -> int | None:
        """The gfn of the SPTE that shows :data:`SYNCED_STALE_MMIO` where vCPU ``vcpu``'s
        shadow walk of ``gva`` ends, if it ends at one (else None): an access there exits
        to the VMM although a slot holds the gfn."""
        root = self.mmu.vcpu_mmu(vcpu).root.sp
        if root is None:
            return None
        spte = get_mmio_spte(self.mmu, root, gva)
        if spte not in self.synced_stale_mmio_sptes().values():
            return None
        return get_mmio_spte_gfn(self.mmu.masks, spte)

    def unexplained(self, violations: list[Violation]) -> list[Violation]:
        """``violations`` but the X11 reports of the SPTEs that show
        :data:`SYNCED_STALE_MMIO`, recognised by what they are about."""
        known = {
            TrustedMmioSpte(sptep, spte) for sptep, spte in self.synced_stale_mmio_sptes().items()
        }
        return [v for v in violations if not (v.rule == "X11" and v.about in known)]

    def announce(self, log: Log) -> dict[SptePtr, int]:
        """The SPTEs that show :data:`SYNCED_STALE_MMIO` now; each that did not at the last
        check is logged as a known finding let pass."""
        remade = self.synced_stale_mmio_sptes()
        for sptep, spte in remade.items():
            if sptep not in self.synced_stale_mmio:
                name = mmio_spte_name(self.mmu, sptep, spte)
                log(f"known kernel finding, let pass: {SYNCED_STALE_MMIO}: {name}")
        return remade

    def remember(self, remade: dict[SptePtr, int]) -> None:
        """After a check: the SPTEs ``remade`` (:meth:`announce`) with their gfns, and where
        the stale MMIO SPTEs of unsync pages are now, for the next check."""
        masks = self.mmu.masks
        self.synced_stale_mmio = {
            sptep: get_mmio_spte_gfn(masks, spte) for sptep, spte in remade.items()
        }
        self.unsync_stale_mmio = self._unsync_stale_mmio()
