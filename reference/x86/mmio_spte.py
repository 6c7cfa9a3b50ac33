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

kernel: arch/x86/kvm/mmu/spte.h, arch/x86/kvm/mmu/spte.c:make_mmio_spte;
arch/x86/kvm/mmu/mmu.c:check_mmio_spte, kvm_mmu_invalidate_mmio_sptes (v6.18)
"""

from __future__ import annotations

from kvmspec.reference.x86.paging import rsvd_bits
from kvmspec.reference.x86.spte import SHADOW_NONPRESENT_OR_RSVD_MASK_LEN, KvmMmuWarn, SpteMasks
from kvmspec.spec.uapi.constants import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, PAGE_SHIFT

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
