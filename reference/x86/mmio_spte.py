"""MMIO SPTEs: remembering that a gfn has no memslot, tagged with the memslot generation.

When the guest touches a gfn that no memslot covers, KVM must exit to userspace (or emulate)
for MMIO. Finding that out takes a memslot lookup on every access. With MMIO caching on, the
first fault instead installs an MMIO SPTE: an entry the hardware rejects (a reserved address
bit in the legacy format, the W+X misconfiguration in EPT) and that stores the gfn, the
access, and the memslot generation. The next access faults with an error the fault path
recognises, and KVM goes straight to MMIO handling, as long as the generation still matches:
creating a memslot over the gfn publishes a new generation, which makes every older MMIO SPTE
stale (invariant X11).

The generation has 19 bits, split across the SPTE: bits 7:0 in SPTE bits 10:3 and bits 18:8
in SPTE bits 62:52. After 2^19 generations old SPTEs would match again, so KVM zaps every
shadow page when the MMIO generation wraps.

In the running MMU (with MMIO caching on): the fault path installs the SPTE
(kvm_handle_noslot_fault lets the fault continue with the "no slot" pfn, mark_mmio_spte
writes it), the hardware then faults on it with PFERR_RSVD, and handle_mmio_page_fault (in
guest_access.py) trusts it or sends the fault down the normal path. Each vCPU also caches
its last MMIO translation (vcpu_cache_mmio_info), tagged with the memslot generation: the
emulator sends an access that matches it straight to the VMM.

kernel: arch/x86/kvm/mmu/spte.h, arch/x86/kvm/mmu/spte.c:make_mmio_spte;
arch/x86/kvm/mmu/mmu.c:check_mmio_spte, kvm_mmu_invalidate_mmio_sptes, mark_mmio_spte,
get_mmio_spte, is_noslot_pfn; arch/x86/kvm/x86.h:vcpu_cache_mmio_info,
vcpu_match_mmio_gen, vcpu_match_mmio_gva, vcpu_clear_mmio_info (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmspec.reference.x86.mmu_spte import mmu_spte_set
from kvmspec.reference.x86.paging import ACC_USER_MASK, ACC_WRITE_MASK, pt_index, rsvd_bits
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_OR_RSVD_MASK_LEN,
    SHADOW_NONPRESENT_VALUE,
    KvmMmuWarn,
    SpteMasks,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)
from kvmspec.spec.uapi.constants import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, PAGE_SHIFT

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.x86.mmu_page import KvmMmuPage, ShadowMmuState, SptePtr

MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_MASK = rsvd_bits(MMIO_SPTE_GEN_LOW_START, MMIO_SPTE_GEN_LOW_END)
MMIO_SPTE_GEN_HIGH_MASK = rsvd_bits(MMIO_SPTE_GEN_HIGH_START, MMIO_SPTE_GEN_HIGH_END)
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1  # 8
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1  # 11
MMIO_SPTE_GEN_LOW_SHIFT = MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
"""The memslot generation's in-progress bit (63) is never stored: check_mmio_spte looks at it
separately, which leaves all 19 bits for counting and so makes wraps rarer."""


def is_mmio_spte(masks: SpteMasks, spte: int) -> bool:
    """kernel: arch/x86/kvm/mmu/spte.h:is_mmio_spte (v6.18)"""
    return masks.enable_mmio_caching and (spte & masks.mmio_mask) == masks.mmio_value


def generation_mmio_spte_mask(gen: int) -> int:
    """Spread a 19-bit MMIO generation over SPTE bits 10:3 and 62:52.

    kernel: arch/x86/kvm/mmu/spte.c:generation_mmio_spte_mask (v6.18)
    """
    if gen & ~MMIO_SPTE_GEN_MASK:
        raise KvmMmuWarn(f"MMIO generation {gen:#x} does not fit in 19 bits")
    mask = (gen << MMIO_SPTE_GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK
    mask |= (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


def get_mmio_spte_generation(spte: int) -> int:
    """kernel: arch/x86/kvm/mmu/spte.h:get_mmio_spte_generation (v6.18)"""
    gen = (spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_SHIFT
    gen |= (spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT
    return gen


def make_mmio_spte(masks: SpteMasks, generation: int, gfn: int, access: int) -> int:
    """The MMIO SPTE for ``gfn`` in memslot ``generation`` (the vCPU's current one; the
    in-progress bit is dropped with the bits above 19). It stores the gfn, with its high bits
    moved above the L1TF bits, and in the legacy format the W and U rights of the access.

    kernel: arch/x86/kvm/mmu/spte.c:make_mmio_spte (v6.18)
    """
    spte = generation_mmio_spte_mask(generation & MMIO_SPTE_GEN_MASK)
    gpa = gfn << PAGE_SHIFT
    spte |= masks.mmio_value | (access & masks.mmio_access_mask)
    spte |= gpa | masks.nonpresent_or_rsvd_mask
    spte |= (gpa & masks.nonpresent_or_rsvd_mask) << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
    return spte


def get_mmio_spte_gfn(masks: SpteMasks, spte: int) -> int:
    """kernel: arch/x86/kvm/mmu/mmu.c:get_mmio_spte_gfn (v6.18)"""
    gpa = spte & masks.nonpresent_or_rsvd_lower_gfn_mask
    gpa |= (spte >> SHADOW_NONPRESENT_OR_RSVD_MASK_LEN) & masks.nonpresent_or_rsvd_mask
    return gpa >> PAGE_SHIFT


def get_mmio_spte_access(masks: SpteMasks, spte: int) -> int:
    """kernel: arch/x86/kvm/mmu/mmu.c:get_mmio_spte_access (v6.18)"""
    return spte & masks.mmio_access_mask


def check_mmio_spte(generation: int, spte: int) -> bool:
    """May an MMIO SPTE be trusted? Only while no memslot update is in progress, and only if
    it was made in the current generation (modulo 2^19). Otherwise a memslot may have
    appeared under the gfn, and the fault takes the slow path (invariant X11).

    kernel: arch/x86/kvm/mmu/mmu.c:check_mmio_spte (v6.18)
    """
    if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    return (generation & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte)


def kvm_mmu_invalidate_mmio_sptes(generation: int, nr_address_spaces: int) -> bool:
    """Called with each newly published memslot generation. True when the 19-bit MMIO
    generation has wrapped, and the kernel zaps every shadow page (kvm_mmu_zap_all_fast):
    old MMIO SPTEs would otherwise start matching again. Generations step by the number of
    address spaces, so those low bits are ignored, to catch a wrap in any address space.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_invalidate_mmio_sptes (v6.18)
    """
    if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        raise KvmMmuWarn("MMIO SPTEs invalidated while a memslot update is in progress")
    gen = generation & MMIO_SPTE_GEN_MASK
    gen &= ~(nr_address_spaces - 1)
    return gen == 0


# -- MMIO SPTEs in the running shadow MMU -------------------------------------------------------

KVM_PFN_NOSLOT = 1 << 63
"""The pfn of a fault whose gfn has no memslot: the fault goes on and installs an MMIO SPTE."""


def is_noslot_pfn(pfn: int) -> bool:
    """kernel: include/linux/kvm_host.h:is_noslot_pfn (v6.18)"""
    return pfn == KVM_PFN_NOSLOT


def mark_mmio_spte(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, gfn: int, access: int) -> None:
    """Install the MMIO SPTE for ``gfn`` at ``sptep``, stamped with the generation of the
    memslots the vCPU sees now. During a memslot update that is the old generation with the
    in-progress bit, which the SPTE does not keep: the SPTE then carries the generation of
    before the update, so the update's end makes it stale (X11).

    kernel: arch/x86/kvm/mmu/mmu.c:mark_mmio_spte (v6.18)
    """
    generation = kvm.memslots(0).generation
    mmu_spte_set(kvm, mmu, sptep, make_mmio_spte(mmu.masks, generation, gfn, access))


def get_mmio_spte(mmu: ShadowMmuState, root: KvmMmuPage, addr: int) -> int:
    """The last SPTE on the shadow walk of ``addr`` from ``root`` (a leaf, an MMIO SPTE, or
    the non-present entry the walk stopped at), read without mmu_lock as the kernel does.

    kernel: arch/x86/kvm/mmu/mmu.c:get_mmio_spte, get_walk (v6.18)
    """
    sp = root
    while True:
        spte = sp.spt.get(pt_index(addr, sp.role.level), SHADOW_NONPRESENT_VALUE)
        if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.role.level):
            return spte
        sp = mmu.sp_by_pfn[spte_to_pfn(spte)]


@dataclass(frozen=True, slots=True)
class MmioInfo:
    """The vCPU's last MMIO translation (vcpu->arch.mmio_gva, mmio_gfn, mmio_access,
    mmio_gen): a guest virtual page, the gfn without a memslot it maps to, the rights, and
    the memslot generation it was true in."""

    gva: int
    gfn: int
    access: int
    generation: int


def vcpu_cache_mmio_info(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_id: int, gva: int, gfn: int, access: int
) -> None:
    """Remember that ``gva`` leads to MMIO at ``gfn``, unless a memslot update is in progress
    (its generation would match nothing once the update ends, but it must not match anything
    during the update either).

    kernel: arch/x86/kvm/x86.h:vcpu_cache_mmio_info (v6.18)
    """
    generation = kvm.memslots(0).generation
    if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return
    page = gva & ~((1 << PAGE_SHIFT) - 1)
    mmu.mmio_info[vcpu_id] = MmioInfo(page, gfn, access, generation)


def vcpu_match_mmio_gva(kvm: Kvm, mmu: ShadowMmuState, vcpu_id: int, gva: int) -> MmioInfo | None:
    """The cached MMIO translation of ``gva``'s page, if it is from the current memslot
    generation (a gva page of 0 means "nothing cached", as in the kernel).

    kernel: arch/x86/kvm/x86.h:vcpu_match_mmio_gen, vcpu_match_mmio_gva (v6.18)
    """
    info = mmu.mmio_info.get(vcpu_id)
    if info is None or info.generation != kvm.memslots(0).generation or not info.gva:
        return None
    return info if info.gva == gva & ~((1 << PAGE_SHIFT) - 1) else None


def vcpu_clear_mmio_info(mmu: ShadowMmuState, vcpu_id: int, gva: int | None) -> None:
    """Forget the cached MMIO translation: of ``gva``'s page (INVLPG), or any (None, the
    kernel's MMIO_GVA_ANY: a CR3 load or a sync of the roots).

    kernel: arch/x86/kvm/x86.h:vcpu_clear_mmio_info (v6.18)
    """
    info = mmu.mmio_info.get(vcpu_id)
    if info is None:
        return
    if gva is not None and info.gva != gva & ~((1 << PAGE_SHIFT) - 1):
        return
    del mmu.mmio_info[vcpu_id]


def mmio_access_allowed(info: MmioInfo, write: bool) -> bool:
    """The emulator's permission check against the cached rights of a user-mode access
    (permission_fault on vcpu->arch.mmio_access); refused, it translates the gva itself.

    kernel: arch/x86/kvm/x86.c:vcpu_mmio_gva_to_gpa (v6.18)
    """
    needed = ACC_USER_MASK | (ACC_WRITE_MASK if write else 0)
    return info.access & needed == needed
