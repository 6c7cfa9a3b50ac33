"""KVM's shadow page-table entries (SPTEs): their bits, and the functions that build and read them.

An SPTE is an entry of a page table that KVM builds and the hardware walks: a shadow page
table (shadow paging: the hardware walks KVM's copy of the guest's tables) or a TDP table
(EPT on Intel, NPT on AMD). Besides the hardware bits, KVM keeps its own state in bits the
hardware ignores:

* bit 11, "MMU-present": the entry maps memory (non-present, MMIO and frozen entries lack it);
* Host-writable and MMU-writable: why a leaf is not writable (check_spte_writable_invariants);
* the A/D type (bits 53:52): whether the hardware keeps A/D bits in this entry;
* the saved R and X bits of an access-tracked entry (bits 54 and 56);
* in an MMIO SPTE: the gfn, the access, and 19 bits of the memslot generation (those live
  in :mod:`~kvmspec.reference.x86.mmio_spte`).

Two encodings exist. The legacy one (the 64-bit paging format: P, W, U, A, D, PS, NX) serves
shadow paging and AMD NPT; the EPT one (R, W, X, memory type, A in bit 8, D in bit 9) serves
Intel's TDP. The kernel keeps the differences in global masks, which kvm_mmu_reset_all_pte_masks
sets for the legacy format and kvm_mmu_set_ept_masks overrides for EPT. The model keeps them
in one frozen :class:`SpteMasks` value that the functions take as their first argument.

This machine's KVM (profile ``x86_64-linux-6.18-pvm``) runs the shadow MMU, hence the legacy
format, with MMIO caching off (the kvm module's ``mmio_caching`` parameter reads N):
:data:`LEGACY_MASKS_HERE`.

kernel: arch/x86/kvm/mmu/spte.h, arch/x86/kvm/mmu/spte.c (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

from kvmspec.reference.x86.paging import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    KVM_MAX_HUGEPAGE_LEVEL,
    PG_LEVEL_4K,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    rsvd_bits,
)
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import PAGE_SHIFT

# -- KVM's software bits ----------------------------------------------------------------------

SPTE_MMU_PRESENT_MASK = 1 << 11
"""Set in every SPTE that maps memory. Bit 11 is ignored by every hardware format."""

SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
"""Zero on purpose: the legacy format always has A/D bits and never sets these two bits."""
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
"""An EPT entry whose hardware A/D bits are off: accesses are tracked by clearing RWX."""
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT
"""An EPT entry of a nested guest under PML: writes are tracked by write-protection. The
model does not build these (nested virtualization is not modelled)."""

SPTE_BASE_ADDR_MASK = PT64_BASE_ADDR_MASK
"""Where the pfn lives: bits 51:12 (memory encryption would take bits away; not modelled)."""

SPTE_EPT_READABLE_MASK = 1 << 0
SPTE_EPT_EXECUTABLE_MASK = 1 << 2
SHADOW_ACC_TRACK_SAVED_BITS_MASK = SPTE_EPT_READABLE_MASK | SPTE_EPT_EXECUTABLE_MASK
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
"""An access-tracked SPTE keeps its R and X bits at 54 and 56. W is not saved: the fast page
fault path grants W again from MMU-writable, so a write is noticed (and logged) first."""

DEFAULT_SPTE_HOST_WRITABLE = 1 << 9
DEFAULT_SPTE_MMU_WRITABLE = 1 << 10
"""Legacy format: bits 9 and 10 are ignored by the hardware."""
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
"""EPT uses bits 9 and 10 itself (D and user-exec), so KVM moves its bits high, clear of the
A/D type and the saved access bits."""

SHADOW_NONPRESENT_VALUE = 1 << 63
"""The value of an empty SPTE on 64-bit hosts. Bit 63 is EPT's "suppress #VE" (TDX needs it);
the other formats ignore every bit of a non-present entry."""
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0
"""A placeholder the TDP MMU writes while it changes an SPTE in several steps without the
write lock: not present (no RWX, no bit 11), no pfn bits. Other writers back off."""

SPTE_MMIO_ALLOWED_MASK = (1 << 63) | rsvd_bits(12, 51) | rsvd_bits(0, 2)
"""The bits an MMIO mask may use: clear of bit 11 and of the generation bits (10:3, 62:52)."""

SHADOW_NONPRESENT_OR_RSVD_MASK_LEN = 5
"""How many high physical-address bits the L1TF mitigation sets in non-present SPTEs."""

# -- EPT hardware bits (arch/x86/include/asm/vmx.h) -------------------------------------------

VMX_EPT_READABLE_MASK = 1 << 0
VMX_EPT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2
VMX_EPT_RWX_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_IPAT_BIT = 1 << 6
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
"""Write and execute without read: an EPT misconfiguration, which is how MMIO SPTEs trap."""
MTRR_TYPE_WRBACK = 6


class KvmMmuWarn(AssertionError):
    """A condition the kernel WARNs about. In the model it means a broken caller: a finding."""


@dataclass(frozen=True, slots=True)
class SpteMasks:
    """The kernel's ``shadow_*_mask`` globals (and ``kvm_ad_enabled``, ``enable_mmio_caching``)
    for one host: everything that differs between the legacy and the EPT format.

    kernel: arch/x86/kvm/mmu/spte.c (the __read_mostly globals) (v6.18)
    """

    ept: bool
    maxphyaddr: int
    """The host's physical-address width (kvm_host.maxphyaddr): no pfn reaches 2^(it - 12)."""
    ad_enabled: bool
    """kvm_ad_enabled: the hardware keeps A/D bits (always, except EPT without them)."""
    present_mask: int
    user_mask: int
    """The legacy U bit; in EPT, R (ACC_USER stands for "readable" there)."""
    accessed_mask: int
    dirty_mask: int
    nx_mask: int
    x_mask: int
    """Exactly one of nx_mask (legacy: bit 63 forbids fetches) and x_mask (EPT: bit 2
    allows them) is non-zero."""
    acc_track_mask: int
    """The bits an access-tracked SPTE loses: EPT's RWX; nothing in the legacy format, whose
    A bit suffices."""
    host_writable_mask: int
    mmu_writable_mask: int
    mt_mask: int
    """What kvm_x86_ops.get_mt_mask adds to a leaf for ordinary RAM: EPT write-back with
    guest PAT ignored; nothing in the legacy format. Host MMIO pfns and non-coherent DMA,
    which get other memory types, are not modelled."""
    nonpresent_or_rsvd_mask: int
    """L1TF mitigation: high address bits set in every MMIO SPTE (zero on unaffected CPUs)."""
    nonpresent_or_rsvd_lower_gfn_mask: int
    """The gfn bits an MMIO SPTE keeps in place; higher ones are moved above the L1TF bits."""
    mmio_value: int
    mmio_mask: int
    mmio_access_mask: int
    enable_mmio_caching: bool
    """MMIO caching: a guest access to a gfn without memslot installs an MMIO SPTE, so the
    next access faults straight into the MMIO path. Off, every such access walks the slow
    path."""


def kvm_mmu_set_mmio_spte_mask(
    masks: SpteMasks,
    mmio_value: int,
    mmio_mask: int,
    access_mask: int,
    *,
    allow_mmio_caching: bool = True,
) -> SpteMasks:
    """Choose how MMIO SPTEs are recognised: ``spte & mmio_mask == mmio_value``. A zero value
    turns MMIO caching off, as does the module parameter (``allow_mmio_caching``).

    kernel: arch/x86/kvm/mmu/spte.c:kvm_mmu_set_mmio_spte_mask (v6.18)
    """
    # The kernel WARNs and falls back to no caching on these; our callers never pass them.
    if mmio_mask & ~SPTE_MMIO_ALLOWED_MASK or (mmio_value & mmio_mask) != mmio_value:
        raise KvmMmuWarn(f"bad MMIO mask {mmio_mask:#x} or value {mmio_value:#x}")
    if not allow_mmio_caching:
        mmio_value = 0
    return replace(
        masks,
        mmio_value=mmio_value,
        mmio_mask=mmio_mask,
        mmio_access_mask=access_mask,
        enable_mmio_caching=mmio_value != 0,
    )


def kvm_mmu_reset_all_pte_masks(
    maxphyaddr: int, *, l1tf_cache_bits: int | None = None, allow_mmio_caching: bool = True
) -> SpteMasks:
    """The legacy format, as set when the kvm module loads (shadow paging and NPT keep it).

    ``maxphyaddr`` is the host's physical-address width (the kernel reads it twice, as
    x86_phys_bits and from CPUID; they differ only with memory encryption, not modelled).
    MMIO SPTEs set a reserved address bit (51) with P, so a guest access takes a page fault
    with PFERR_RSVD; that needs a host with fewer than 52 address bits. ``l1tf_cache_bits``
    is given on CPUs with the L1TF bug: MMIO SPTEs then also set the 5 address bits below
    that width, so a speculative load through them cannot reach cached host data.

    kernel: arch/x86/kvm/mmu/spte.c:kvm_mmu_reset_all_pte_masks (v6.18)
    """
    low_phys_bits = maxphyaddr
    nonpresent_or_rsvd_mask = 0
    if l1tf_cache_bits is not None:
        low_phys_bits = l1tf_cache_bits - SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
        nonpresent_or_rsvd_mask = rsvd_bits(low_phys_bits, l1tf_cache_bits - 1)
    masks = SpteMasks(
        ept=False,
        maxphyaddr=maxphyaddr,
        ad_enabled=True,
        present_mask=PT_PRESENT_MASK,
        user_mask=PT_USER_MASK,
        accessed_mask=PT_ACCESSED_MASK,
        dirty_mask=PT_DIRTY_MASK,
        nx_mask=PT64_NX_MASK,
        x_mask=0,
        acc_track_mask=0,
        host_writable_mask=DEFAULT_SPTE_HOST_WRITABLE,
        mmu_writable_mask=DEFAULT_SPTE_MMU_WRITABLE,
        mt_mask=0,
        nonpresent_or_rsvd_mask=nonpresent_or_rsvd_mask,
        nonpresent_or_rsvd_lower_gfn_mask=rsvd_bits(PAGE_SHIFT, low_phys_bits - 1),
        mmio_value=0,
        mmio_mask=0,
        mmio_access_mask=0,
        enable_mmio_caching=False,
    )
    mmio = (1 << 51) | PT_PRESENT_MASK if maxphyaddr < 52 else 0
    return kvm_mmu_set_mmio_spte_mask(
        masks, mmio, mmio, ACC_WRITE_MASK | ACC_USER_MASK, allow_mmio_caching=allow_mmio_caching
    )


def kvm_mmu_set_ept_masks(
    masks: SpteMasks, *, has_ad_bits: bool, has_exec_only: bool, allow_mmio_caching: bool = True
) -> SpteMasks:
    """Switch ``masks`` (from kvm_mmu_reset_all_pte_masks) to the EPT format, as VMX does
    when EPT is enabled. Without exec-only support every present SPTE must be readable; MMIO
    SPTEs are the W+X misconfiguration, which carries no access bits.

    kernel: arch/x86/kvm/mmu/spte.c:kvm_mmu_set_ept_masks; arch/x86/kvm/vmx/vmx.c:
    vmx_get_mt_mask (v6.18)
    """
    ept = replace(
        masks,
        ept=True,
        ad_enabled=has_ad_bits,
        user_mask=VMX_EPT_READABLE_MASK,
        # Bit 8 is the Accessed bit even without hardware A/D: KVM then uses it in software.
        accessed_mask=VMX_EPT_ACCESS_BIT,
        dirty_mask=VMX_EPT_DIRTY_BIT,
        nx_mask=0,
        x_mask=VMX_EPT_EXECUTABLE_MASK,
        present_mask=(0 if has_exec_only else VMX_EPT_READABLE_MASK) | VMX_EPT_SUPPRESS_VE_BIT,
        acc_track_mask=VMX_EPT_RWX_MASK,
        host_writable_mask=EPT_SPTE_HOST_WRITABLE,
        mmu_writable_mask=EPT_SPTE_MMU_WRITABLE,
        mt_mask=(MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT,
    )
    return kvm_mmu_set_mmio_spte_mask(
        ept,
        VMX_EPT_MISCONFIG_WX_VALUE,
        VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT,
        0,
        allow_mmio_caching=allow_mmio_caching,
    )


LEGACY_MASKS_HERE = kvm_mmu_reset_all_pte_masks(48, allow_mmio_caching=False)
"""This machine: shadow paging (legacy format), 48-bit physical addresses, an AMD CPU (no
L1TF), and MMIO caching off."""

EPT_MASKS = kvm_mmu_set_ept_masks(
    kvm_mmu_reset_all_pte_masks(46), has_ad_bits=True, has_exec_only=True
)
"""An Intel host with EPT, A/D bits and exec-only pages, 46 address bits and no L1TF (the
TDP profiles' default until profiles name a CPU)."""


def spte_masks_for_profile(profile: PlatformProfile) -> SpteMasks:
    """The masks of a profile's x86 MMU. The shadow MMU always uses the legacy format; the
    one shadow profile is this machine's, so it gets LEGACY_MASKS_HERE. TDP is taken to be
    Intel's EPT (NPT would keep the legacy format: the profiles do not name a CPU vendor, a
    MAXPHYADDR or MMIO caching yet)."""
    if profile.arch != "x86_64":
        raise ValueError(f"{profile.name} is not an x86 profile")
    return LEGACY_MASKS_HERE if profile.mmu == "shadow" else EPT_MASKS


# -- Reading SPTEs ----------------------------------------------------------------------------


def is_shadow_present_pte(spte: int) -> bool:
    """Does the SPTE map memory? True for leaves and links to lower tables, including
    write-protected and access-tracked ones; false for empty, MMIO and frozen SPTEs.

    kernel: arch/x86/kvm/mmu/spte.h:is_shadow_present_pte (v6.18)
    """
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_frozen_spte(spte: int) -> bool:
    """kernel: arch/x86/kvm/mmu/spte.h:is_frozen_spte (v6.18)"""
    return spte == FROZEN_SPTE


def spte_ad_enabled(spte: int) -> bool:
    """Does the hardware keep A/D bits in this (present) SPTE?

    kernel: arch/x86/kvm/mmu/spte.h:spte_ad_enabled (v6.18)
    """
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


def spte_ad_need_write_protect(spte: int) -> bool:
    """Must writes to this (present) SPTE be caught by write-protection rather than the D
    bit? Always false in the legacy format, whose A/D type bits are zero.

    kernel: arch/x86/kvm/mmu/spte.h:spte_ad_need_write_protect (v6.18)
    """
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED


def is_access_track_spte(masks: SpteMasks, spte: int) -> bool:
    """Has aging made this A/D-less SPTE inaccessible, to notice the next access?

    kernel: arch/x86/kvm/mmu/spte.h:is_access_track_spte (v6.18)
    """
    return not spte_ad_enabled(spte) and (spte & masks.acc_track_mask) == 0


def is_large_pte(spte: int) -> bool:
    """kernel: arch/x86/kvm/mmu/spte.h:is_large_pte (v6.18)"""
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    """Is this SPTE, found at ``level``, a leaf (a 4K entry, or a huge page)?

    kernel: arch/x86/kvm/mmu/spte.h:is_last_spte (v6.18)
    """
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_executable_pte(masks: SpteMasks, spte: int) -> bool:
    """kernel: arch/x86/kvm/mmu/spte.h:is_executable_pte (v6.18)"""
    return (spte & (masks.x_mask | masks.nx_mask)) == masks.x_mask


def spte_to_pfn(spte: int) -> int:
    """kernel: arch/x86/kvm/mmu/spte.h:spte_to_pfn (v6.18)"""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def is_accessed_spte(masks: SpteMasks, spte: int) -> bool:
    """kernel: arch/x86/kvm/mmu/spte.h:is_accessed_spte (v6.18)"""
    return bool(spte & masks.accessed_mask)


def is_writable_pte(spte: int) -> bool:
    """The hardware W bit (the same bit 1 in both formats).

    kernel: arch/x86/kvm/mmu/spte.h:is_writable_pte (v6.18)
    """
    return bool(spte & PT_WRITABLE_MASK)


def is_mmu_writable_spte(masks: SpteMasks, spte: int) -> bool:
    """May KVM make this SPTE writable without mmu_lock (the fast page fault)? Cleared only
    when the gfn holds a guest page table KVM shadows, or the host forbids writes.

    kernel: arch/x86/kvm/mmu/spte.h:is_mmu_writable_spte (v6.18)
    """
    return bool(spte & masks.mmu_writable_mask)


def check_spte_writable_invariants(masks: SpteMasks, spte: int) -> str | None:
    """Invariant X3 for one shadow-present leaf: W implies MMU-writable implies
    Host-writable. The four legal states (H M W) are 111 writable, 110 write-protected for
    dirty logging (the fast path may set W), 100 write-protected because the gfn is a
    shadowed guest page table, 000 the host maps the page read-only. Returns what is wrong,
    or None (the kernel WARNs instead).

    kernel: arch/x86/kvm/mmu/spte.h:check_spte_writable_invariants (v6.18)
    """
    if spte & masks.mmu_writable_mask:
        if not spte & masks.host_writable_mask:
            return f"X3: MMU-writable SPTE is not Host-writable: {spte:#x}"
    elif is_writable_pte(spte):
        return f"X3: writable SPTE is not MMU-writable: {spte:#x}"
    return None


def check_spte_change(masks: SpteMasks, old_spte: int, new_spte: int, level: int) -> str | None:
    """Judge one write of the SPTE at ``level`` from ``old_spte`` to ``new_spte``; returns the
    rule it breaks, or None.

    * X3: a new shadow-present leaf satisfies check_spte_writable_invariants, and a leaf
      that stays present keeps its Host-writable bit (it is decided when the SPTE is made).
    * X4: a leaf that stays present keeps its pfn. Pointing a gfn at other memory takes a
      zap, a TLB flush and a new SPTE, or vCPUs could keep using the old page through
      their TLBs (the shadow MMU WARNs, the TDP MMU BUGs: "a missing notifier").

    A huge leaf may become a link to a lower table and back (splitting and collapsing):
    neither side is then a present leaf, so X4 does not apply.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_spte_update; arch/x86/kvm/mmu/tdp_mmu.c:
    handle_changed_spte (v6.18)
    """
    new_leaf = is_shadow_present_pte(new_spte) and is_last_spte(new_spte, level)
    if new_leaf:
        problem = check_spte_writable_invariants(masks, new_spte)
        if problem is not None:
            return problem
    if new_leaf and is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level):
        if spte_to_pfn(old_spte) != spte_to_pfn(new_spte):
            return (
                f"X4: present leaf changed pfn in place: {spte_to_pfn(old_spte):#x} -> "
                f"{spte_to_pfn(new_spte):#x}"
            )
        if (old_spte ^ new_spte) & masks.host_writable_mask:
            return f"X3: Host-writable changed on a present leaf: {old_spte:#x} -> {new_spte:#x}"
    return None


def leaf_spte_change_needs_tlb_flush(masks: SpteMasks, old_spte: int, new_spte: int) -> bool:
    """Losing MMU-writable needs a TLB flush before mmu_lock is dropped: a vCPU may still
    hold a writable translation, and the gfn is about to be shadowed. Clearing W for dirty
    logging, or A or D, does not (those flushes come later, or are not needed).

    kernel: arch/x86/kvm/mmu/spte.h:leaf_spte_change_needs_tlb_flush (v6.18)
    """
    return is_mmu_writable_spte(masks, old_spte) and not is_mmu_writable_spte(masks, new_spte)


def is_access_allowed(masks: SpteMasks, spte: int, *, write: bool, fetch: bool) -> bool:
    """Would the hardware allow this access through ``spte``? The fast page fault path asks
    this to tell a spurious fault (another vCPU fixed the SPTE already) from a real one.

    kernel: arch/x86/kvm/mmu/mmu.c:is_access_allowed (v6.18)
    """
    if fetch:
        return is_executable_pte(masks, spte)
    if write:
        return is_writable_pte(spte)
    # A read needs bit 0: P in the legacy format, R in EPT.
    return bool(spte & PT_PRESENT_MASK)


# -- Building SPTEs ---------------------------------------------------------------------------


class UnsyncHook(Protocol):
    """mmu_try_to_unsync_pages for the gfn being mapped: True when the gfn must stay
    write-protected (it is write-tracked, or holds a guest page table that may not be made
    unsync now), False when any shadow pages of the gfn were made unsync and writing is fine.
    """

    def __call__(self, *, synchronizing: bool, prefetch: bool) -> bool: ...


def no_shadow_pages(*, synchronizing: bool, prefetch: bool) -> bool:
    """The hook when no shadow page maps the gfn as a guest page table: never write-protect."""
    return False


class MadeSpte(NamedTuple):
    spte: int
    wrprot: bool
    """A write was allowed by the guest but the gfn is write-protected (see UnsyncHook)."""


def make_spte(
    masks: SpteMasks,
    *,
    level: int,
    ad_disabled: bool,
    pte_access: int,
    pfn: int,
    old_spte: int,
    prefetch: bool,
    synchronizing: bool,
    host_writable: bool,
    nx_huge_page_enabled: bool = False,
    mmu_try_to_unsync_pages: UnsyncHook = no_shadow_pages,
) -> MadeSpte:
    """Build the leaf SPTE that maps ``pfn`` at ``level`` with the rights ``pte_access``
    (ACC_*), replacing ``old_spte``.

    * A/D: the SPTE is born accessed, unless it is prefetched (mapped ahead of the guest's
      access): then it is born old (A clear, or access-tracked without A/D bits), so that
      aging does not count an access that never happened.
    * Exec: the NX huge page mitigation forbids fetches through huge pages when enabled.
    * Write: only if the host allows it (Host-writable); then only if no shadowed guest page
      table lives in the gfn, which mmu_try_to_unsync_pages decides (and may unsync shadow
      pages to allow it). A writable SPTE is born dirty, MMU-writable and Host-writable.
      Replacing a writable leaf skips the question: its gfn was settled when it was made.

    ``level`` and ``ad_disabled`` come from the shadow page's role; ``synchronizing`` is true
    when the shadow MMU re-syncs an unsync page (older kernels passed the inverse, can_unsync).

    Left out: the gfn and memslot (kernel make_spte marks the gfn dirty in the slot when the
    new SPTE is writable and the slot logs dirty pages; here the caller does); memory types
    other than mt_mask (host MMIO pfns, non-coherent DMA); memory encryption (shadow_me_value);
    SPTE_TDP_AD_WRPROT_ONLY (nested PML); tracking host MMIO mappings for the MMIO stale data
    mitigation. Of the WARN on reserved bits, only the pfn's width is checked.

    kernel: arch/x86/kvm/mmu/spte.c:make_spte (v6.18)
    """
    if not PG_LEVEL_4K <= level <= KVM_MAX_HUGEPAGE_LEVEL:
        raise ValueError(f"no leaf SPTE at level {level}")
    if pte_access & ~ACC_ALL:
        raise ValueError(f"bad access {pte_access:#x}")
    if not 0 <= pfn < 1 << (masks.maxphyaddr - PAGE_SHIFT):
        raise KvmMmuWarn(f"pfn {pfn:#x} sets reserved bits above MAXPHYADDR {masks.maxphyaddr}")
    if ad_disabled and not masks.acc_track_mask:
        raise ValueError("only EPT SPTEs can be without A/D bits")
    # Exec-only EPT has no "present" bit of its own: an SPTE without rights would look empty.
    if (pte_access | masks.present_mask) == SHADOW_NONPRESENT_VALUE:
        raise KvmMmuWarn("an SPTE without any access right")
    wrprot = False
    spte = SPTE_MMU_PRESENT_MASK
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    spte |= masks.present_mask
    if not prefetch or synchronizing:
        spte |= masks.accessed_mask

    # iTLB multihit: never let the guest execute from a huge page when the mitigation is on.
    if level > PG_LEVEL_4K and pte_access & ACC_EXEC_MASK and nx_huge_page_enabled:
        pte_access &= ~ACC_EXEC_MASK
    spte |= masks.x_mask if pte_access & ACC_EXEC_MASK else masks.nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= masks.user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    spte |= masks.mt_mask
    if host_writable:
        spte |= masks.host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << PAGE_SHIFT

    if pte_access & ACC_WRITE_MASK:
        # The kernel relies here on X4: a writable leaf for the same gfn already passed
        # this check, since a present leaf never changes pfn (or gfn) in place.
        replacing_writable_leaf = is_last_spte(old_spte, level) and is_writable_pte(old_spte)
        if not replacing_writable_leaf and mmu_try_to_unsync_pages(
            synchronizing=synchronizing, prefetch=prefetch
        ):
            wrprot = True
        else:
            spte |= PT_WRITABLE_MASK | masks.mmu_writable_mask | masks.dirty_mask

    if prefetch and not synchronizing:
        spte = mark_spte_for_access_track(masks, spte)
    return MadeSpte(spte, wrprot)


def make_nonleaf_spte(masks: SpteMasks, child_pfn: int, *, ad_disabled: bool) -> int:
    """The SPTE that links to a lower shadow page table. It grants every right: the leaves
    below decide.

    kernel: arch/x86/kvm/mmu/spte.c:make_nonleaf_spte (v6.18)
    """
    spte = SPTE_MMU_PRESENT_MASK
    spte |= child_pfn << PAGE_SHIFT | masks.present_mask | PT_WRITABLE_MASK
    spte |= masks.user_mask | masks.x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= masks.accessed_mask
    return spte


def mark_spte_for_access_track(masks: SpteMasks, spte: int) -> int:
    """Age an SPTE so that the next access is noticed. With A/D bits that is clearing A.
    Without them (EPT only), the SPTE is made inaccessible: R and X are saved in bits 54 and
    56, RWX and the software A bit cleared; the fast page fault path restores them.

    kernel: arch/x86/kvm/mmu/spte.c:mark_spte_for_access_track (v6.18)
    """
    if spte_ad_enabled(spte):
        return spte & ~masks.accessed_mask
    if is_access_track_spte(masks, spte):
        return spte
    problem = check_spte_writable_invariants(masks, spte)
    if problem is not None:
        raise KvmMmuWarn(problem)
    saved_at = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    if spte & saved_at:
        raise KvmMmuWarn(f"access-tracking save bits are not zero: {spte:#x}")
    spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    return spte & ~(masks.acc_track_mask | masks.accessed_mask)


def restore_acc_track_spte(masks: SpteMasks, spte: int) -> int:
    """Undo mark_spte_for_access_track: put the saved R and X back (W and A stay clear;
    the caller adds them as the access requires).

    kernel: arch/x86/kvm/mmu/spte.h:restore_acc_track_spte (v6.18)
    """
    saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte &= ~masks.acc_track_mask
    spte &= ~(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved
