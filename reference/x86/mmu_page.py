"""Shadow pages (struct kvm_mmu_page) and the VM-wide hash that finds them by gfn.

A shadow page is one table of 512 SPTEs that the hardware walks in place of a guest page
table. It is identified by the gfn of the guest table it shadows and by its *role*: the
level, whether it is *direct* (it shadows no guest table, only a gfn range: the pieces of
a guest huge page KVM maps with smaller pages), and the access rights the guest's upper
levels grant (two guest paths to one table with different rights need two shadow pages).
Shadow pages are shared only when gfn and role are equal (kvm_mmu_find_shadow_page).

A shadow page of a guest page table must see every change the guest makes to that table,
so KVM write-protects the table's gfn while the shadow page exists (page_track.py). A
child shadow page records the SPTEs that link to it (``parent_ptes``, invariant X2), so it
can be unlinked from everywhere when it is zapped (zap.py).

Modelled role bits: level, direct, access, invalid. Not modelled: has_4_byte_gpte and
quadrant (32-bit guests), efer_nx, cr0_wp, smep/smap_andnot_wp, smm (the model's guest
has one paging mode), ad_disabled (legacy SPTEs always have A/D), guest_mode and
passthrough (nested virtualization). The SPTEs are stored sparsely: an absent index holds
SHADOW_NONPRESENT_VALUE.

kernel: arch/x86/kvm/mmu/mmu_internal.h:struct kvm_mmu_page, union kvm_mmu_page_role;
arch/x86/kvm/mmu/mmu.c:kvm_mmu_find_shadow_page, kvm_mmu_child_role, is_obsolete_sp,
kvm_mmu_free_shadow_page (v6.18)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kvmspec.reference.x86.paging import ACC_ALL, PT64_LEVEL_BITS, PT64_ROOT_4LEVEL
from kvmspec.reference.x86.spte import SHADOW_NONPRESENT_VALUE, SpteMasks, spte_to_pfn
from kvmspec.reference.x86.tlb import VcpuMmu

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.x86.mmio_spte import MmioInfo

SHADOW_PAGE_PFN_BASE = 1 << 35
"""Where the model numbers the (kernel-allocated) pages that hold shadow tables: far above
any host RAM pfn the model hands out, below 2^36 so that a link SPTE can hold it."""


@dataclass(frozen=True, slots=True)
class KvmMmuPageRole:
    """union kvm_mmu_page_role, the bits the model uses (see the module docstring)."""

    level: int
    direct: bool = False
    access: int = ACC_ALL
    invalid: bool = False


@dataclass(frozen=True, slots=True)
class SptePtr:
    """``u64 *sptep``: the SPTE at ``index`` of shadow page ``sp``."""

    sp: KvmMmuPage
    index: int

    def get(self) -> int:
        return self.sp.spt.get(self.index, SHADOW_NONPRESENT_VALUE)


@dataclass(eq=False)
class KvmMmuPage:
    """struct kvm_mmu_page. Compared by identity: two pages are never "equal"."""

    gfn: int
    role: KvmMmuPageRole
    pfn: int
    """The page holding ``spt`` (what a link SPTE to this page points at)."""
    mmu_valid_gen: int
    spt: dict[int, int] = field(default_factory=dict)
    """index -> SPTE, only for SPTEs that are not SHADOW_NONPRESENT_VALUE."""
    shadowed_translation: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Indirect pages: index -> (gfn, access) the guest PTE gave that leaf (rmap_remove
    needs the gfn back; the guest PTE may have changed since)."""
    parent_ptes: list[SptePtr] = field(default_factory=list)
    root_count: int = 0
    unsync: bool = False
    """Never set by the model (unsync pages are not modelled); kept for X6 and X7."""
    write_flooding_count: int = 0
    freed: bool = False

    def __repr__(self) -> str:
        kind = "direct" if self.role.direct else "shadow"
        state = " invalid" if self.role.invalid else ""
        return f"<sp {kind} L{self.role.level} gfn {self.gfn:#x} gen {self.mmu_valid_gen}{state}>"

    def set_spte(self, index: int, spte: int) -> None:
        """Store an SPTE (the write itself; callers are the mmu_spte_* helpers)."""
        if spte == SHADOW_NONPRESENT_VALUE:
            self.spt.pop(index, None)
        else:
            self.spt[index] = spte


def sp_has_gptes(sp: KvmMmuPage) -> bool:
    """Does the page shadow a guest page table (rather than a range of a guest huge page)?

    kernel: arch/x86/kvm/mmu/mmu.c:sp_has_gptes (v6.18)
    """
    return not sp.role.direct


def kvm_mmu_page_get_gfn(sp: KvmMmuPage, index: int) -> int:
    """The gfn that the SPTE at ``index`` maps (or the gfn its child table covers).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_get_gfn (v6.18)
    """
    if sp.role.direct:
        return sp.gfn + (index << ((sp.role.level - 1) * PT64_LEVEL_BITS))
    return sp.shadowed_translation[index][0]


def kvm_mmu_page_set_translation(sp: KvmMmuPage, index: int, gfn: int, access: int) -> None:
    """Remember what the guest PTE said for a leaf of an indirect page. A direct page's
    gfns follow from its own gfn, and its access from its role; the kernel WARNs if they
    disagree.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_set_translation (v6.18)
    """
    if sp.role.direct:
        return
    sp.shadowed_translation[index] = (gfn, access)


class ShadowMmuState:
    """The shadow MMU's VM-wide state (the MMU fields of struct kvm_arch), and its vCPUs.
    The KvmArch subclass (shadow_mmu.ShadowMmu) inherits it: this is ``kvm->arch``."""

    def __init__(self, masks: SpteMasks) -> None:
        self.masks = masks
        # gfn -> the shadow pages of that gfn, newest first (the kernel hashes gfns into
        # buckets; lookups only need "the pages of this gfn"). Zapped pages stay until freed.
        self.mmu_page_hash: dict[int, list[KvmMmuPage]] = {}
        # Every page not zapped yet, newest first: a FIFO, which kvm_zap_obsolete_pages
        # relies on. A zapped root still in use leaves it, but stays in the hash.
        self.active_mmu_pages: list[KvmMmuPage] = []
        self.mmu_valid_gen = 0
        # How many pages shadow a guest page table (account_shadowed).
        self.indirect_shadow_pages = 0
        # The kernel finds a page from a link SPTE through page_private(pfn_to_page(pfn)).
        self.sp_by_pfn: dict[int, KvmMmuPage] = {}
        self.next_pfn = SHADOW_PAGE_PFN_BASE
        self.vcpus: dict[int, VcpuMmu] = {}
        # Each vCPU's last MMIO translation (vcpu->arch.mmio_gva and friends), by vCPU id.
        self.mmio_info: dict[int, MmioInfo] = {}
        # Some counters of kvm->stat that FINDINGS measured (pf_fixed, pf_emulate,
        # mmu_pte_write, mmu_flooded, mmu_shadow_zapped, mmu_cache_miss).
        self.stat: Counter[str] = Counter()
        # The root of a vCPU whose CR3 is outside every visible memslot: a table with no
        # present SPTE, so every access faults (kvm_mmu_get_dummy_root). Never hashed.
        self.dummy_root = KvmMmuPage(-1, KvmMmuPageRole(PT64_ROOT_4LEVEL), 0, -1)

    def vcpu_mmu(self, vcpu_id: int) -> VcpuMmu:
        """The MMU state of a vCPU, created the first time the vCPU is seen."""
        if vcpu_id not in self.vcpus:
            self.vcpus[vcpu_id] = VcpuMmu(vcpu_id)
        return self.vcpus[vcpu_id]

    def spte_to_child_sp(self, spte: int) -> KvmMmuPage:
        """kernel: arch/x86/kvm/mmu/mmu_internal.h:spte_to_child_sp (v6.18)"""
        return self.sp_by_pfn[spte_to_pfn(spte)]

    def shadow_pages(self, gfn: int) -> list[KvmMmuPage]:
        """Every shadow page of ``gfn`` in the hash, including invalid ones."""
        return list(self.mmu_page_hash.get(gfn, []))


def shadow_of(kvm: Kvm) -> ShadowMmuState:
    """``kvm->arch``: the VM's shadow MMU."""
    arch = kvm.arch
    assert isinstance(arch, ShadowMmuState), "this VM does not run the shadow MMU"
    return arch


def is_obsolete_sp(mmu: ShadowMmuState, sp: KvmMmuPage) -> bool:
    """Zapped, or created before the last kvm_mmu_zap_all_fast: no new translation may go
    through it (X10).

    kernel: arch/x86/kvm/mmu/mmu.c:is_obsolete_sp (v6.18)
    """
    return sp.role.invalid or sp.mmu_valid_gen != mmu.mmu_valid_gen


def for_each_valid_sp(mmu: ShadowMmuState, gfn: int) -> list[KvmMmuPage]:
    """The pages of ``gfn`` that are not obsolete (a copy: callers may zap as they go).

    kernel: arch/x86/kvm/mmu/mmu.c:for_each_valid_sp, for_each_gfn_valid_sp_with_gptes
    (v6.18)
    """
    return [sp for sp in mmu.mmu_page_hash.get(gfn, []) if not is_obsolete_sp(mmu, sp)]


def kvm_mmu_find_shadow_page(
    mmu: ShadowMmuState, gfn: int, role: KvmMmuPageRole
) -> KvmMmuPage | None:
    """The valid page of ``gfn`` with exactly ``role``, if one exists. Finding one resets
    its write-flooding count: the guest is using the table again, so it is not being
    recycled as ordinary memory.

    Left out with unsync pages: an upper-level lookup zaps unsync pages of the gfn, and
    finding an unsync page syncs it (kvm_sync_page).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_find_shadow_page (v6.18)
    """
    for sp in for_each_valid_sp(mmu, gfn):
        if sp.role == role:
            if not sp.role.direct:
                sp.write_flooding_count = 0
            return sp
    return None


def kvm_mmu_child_role(parent: KvmMmuPage, direct: bool, access: int) -> KvmMmuPageRole:
    """The role of a page linked below ``parent``: one level lower, with the given kind and
    rights, otherwise inherited.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_child_role (v6.18)
    """
    return replace(parent.role, level=parent.role.level - 1, direct=direct, access=access)


def kvm_mmu_free_shadow_page(mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """Free a zapped page: out of the hash, its pfn forgotten. Only after a TLB flush
    (kvm_mmu_commit_zap_page), since a vCPU may still walk it.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_free_shadow_page (v6.18)
    """
    mmu.mmu_page_hash[sp.gfn].remove(sp)
    if not mmu.mmu_page_hash[sp.gfn]:
        del mmu.mmu_page_hash[sp.gfn]
    del mmu.sp_by_pfn[sp.pfn]
    sp.freed = True


def gfn_round_for_level(gfn: int, level: int) -> int:
    """kernel: arch/x86/kvm/mmu/mmu_internal.h:gfn_round_for_level (v6.18)"""
    return gfn & -(1 << ((level - 1) * PT64_LEVEL_BITS))
