"""Shadow pages (struct kvm_mmu_page) and the VM-wide hash that finds them by gfn.

A shadow page is one table of 512 SPTEs that the hardware walks in place of a guest page
table. It is identified by the gfn of the guest table it shadows and by its *role*: the
level, whether it is *direct* (it shadows no guest table, only a gfn range: the pieces of
a guest huge page KVM maps with smaller pages), and the access rights the guest's upper
levels grant (two guest paths to one table with different rights need two shadow pages).
Shadow pages are shared only when gfn and role are equal (roots.kvm_mmu_find_shadow_page).

A shadow page of a guest page table must see every change the guest makes to that table,
so KVM write-protects the table's gfn while the shadow page exists (page_track.py). A
child shadow page records the SPTEs that link to it (``parent_ptes``, invariant X2), so it
can be unlinked from everywhere when it is zapped (zap.py).

A last-level page of a guest table may go *unsync*: KVM lets the guest write the table
directly and resynchronizes the shadow page at the guest's next TLB flush (unsync.py). So
that the flush finds it, every parent page keeps a bitmap of its entries that lead to an
unsync page (``unsync_child_bitmap``, counted by ``unsync_children``, invariant X7); the
bookkeeping is here, the syncing in unsync.py.

Modelled role bits: level, direct, access, invalid. Not modelled: has_4_byte_gpte and
quadrant (32-bit guests), efer_nx, cr0_wp, smep/smap_andnot_wp, smm (the model's guest
has one paging mode), ad_disabled (legacy SPTEs always have A/D), guest_mode and
passthrough (nested virtualization). The SPTEs are stored sparsely: an absent index holds
SHADOW_NONPRESENT_VALUE.

kernel: arch/x86/kvm/mmu/mmu_internal.h:struct kvm_mmu_page, union kvm_mmu_page_role;
arch/x86/kvm/mmu/mmu.c:kvm_mmu_child_role, is_obsolete_sp, kvm_mmu_free_shadow_page,
mark_unsync, kvm_mmu_mark_parents_unsync, kvm_unsync_page, kvm_unlink_unsync_page,
clear_unsync_child_bit, mmu_unsync_walk, __mmu_unsync_walk, mmu_pages_clear_parents (v6.18)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kvmspec.reference.x86.paging import ACC_ALL, PT64_LEVEL_BITS, PT64_ROOT_4LEVEL
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_VALUE,
    SpteMasks,
    is_large_pte,
    is_shadow_present_pte,
    spte_to_pfn,
)
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

    def __repr__(self) -> str:
        # The dataclass's own text, without its recursion guard: WARN messages name SPTEs
        # on the fault path, whether or not the WARN fires.
        return f"SptePtr(sp={self.sp!r}, index={self.index})"


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
    """A last-level page whose guest table the guest may write directly until its next TLB
    flush (unsync.py); its gfn is then exempt from write protection (X6)."""
    unsync_children: int = 0
    """How many bits of ``unsync_child_bitmap`` are set (X7)."""
    unsync_child_bitmap: set[int] = field(default_factory=set)
    """Indexes of links that lead to an unsync page. A bit may outlive its reason (a link
    dropped, a child synced): walks clear such bits as they meet them."""
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


def kvm_mmu_page_set_access(sp: KvmMmuPage, index: int, access: int) -> None:
    """Update only the access a leaf of an indirect page remembers; its gfn stays the one the
    leaf was rmapped under. mmu_set_spte uses it for a leaf it re-sets in place (same pfn),
    whose rmap entry it keeps: should the guest PTE now name another gfn backed by the same
    page (the zero page, a KSM page), the leaf still answers for the old gfn, as its rmap
    entry does, until a sync compares the gfns and drops it.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_set_access (v6.18)
    """
    kvm_mmu_page_set_translation(sp, index, kvm_mmu_page_get_gfn(sp, index), access)


class MmuPageCounts:
    """The shadow-page limit's counters of kvm->arch (mmu_pages.py): how many shadow pages
    are accounted (allocated and not yet zapped for good), how many may be, and what the
    VMM asked for with KVM_SET_NR_MMU_PAGES (0: never, so the limit follows the memslots).
    A VM on the TDP MMU keeps them too (the ioctl works there), but accounts no page.

    kernel: arch/x86/include/asm/kvm_host.h:struct kvm_arch (n_used_mmu_pages,
    n_requested_mmu_pages, n_max_mmu_pages) (v6.18)
    """

    def __init__(self) -> None:
        self.n_used_mmu_pages = 0
        self.n_requested_mmu_pages = 0
        # No memslot yet: no page may be allocated (the first CREATE sets the default).
        self.n_max_mmu_pages = 0


class ShadowMmuState(MmuPageCounts):
    """The shadow MMU's VM-wide state (the MMU fields of struct kvm_arch), and its vCPUs.
    The KvmArch subclass (shadow_mmu.ShadowMmu) inherits it: this is ``kvm->arch``."""

    def __init__(self, masks: SpteMasks, *, pvm_top_level_copy: bool = False) -> None:
        super().__init__()
        self.masks = masks
        # This machine's PVM backend: vCPUs walk their own copy of the root's top level
        # once the VM has two vCPUs (pvm_top_level.py; the profile's field of that name).
        self.pvm_top_level_copy = pvm_top_level_copy
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


def for_each_valid_sp(mmu: ShadowMmuState, gfn: int) -> Iterator[KvmMmuPage]:
    """The pages of ``gfn`` that are not obsolete, each judged when it is reached: callers
    may zap as they go (zapping one page can zap others: its unsync children).

    kernel: arch/x86/kvm/mmu/mmu.c:for_each_valid_sp, for_each_gfn_valid_sp_with_gptes
    (v6.18)
    """
    for sp in list(mmu.mmu_page_hash.get(gfn, [])):
        if not is_obsolete_sp(mmu, sp):
            yield sp


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


# -- unsync bookkeeping --------------------------------------------------------------------------

UnsyncPath = list[tuple[KvmMmuPage, int]]
"""The (page, index) links from a walk's starting page down to an unsync page."""


def mark_unsync(sptep: SptePtr) -> None:
    """The link at ``sptep`` leads to an unsync page: set its bit. The page's first such
    link makes its own parents mark it in turn, up to the roots.

    kernel: arch/x86/kvm/mmu/mmu.c:mark_unsync (v6.18)
    """
    sp = sptep.sp
    if sptep.index in sp.unsync_child_bitmap:
        return
    sp.unsync_child_bitmap.add(sptep.index)
    sp.unsync_children += 1
    if sp.unsync_children == 1:
        kvm_mmu_mark_parents_unsync(sp)


def kvm_mmu_mark_parents_unsync(sp: KvmMmuPage) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_mark_parents_unsync (v6.18)"""
    for parent_pte in list(sp.parent_ptes):
        mark_unsync(parent_pte)


def kvm_unsync_page(mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """Let the guest write ``sp``'s table directly: mark it unsync and every path to it.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_unsync_page (v6.18)
    """
    mmu.stat["mmu_unsync"] += 1
    sp.unsync = True
    kvm_mmu_mark_parents_unsync(sp)


def kvm_unlink_unsync_page(kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """The page is being synced or zapped: no longer unsync (the parents' bits are cleared
    by the walk that found it, or lazily by a later one).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_unlink_unsync_page (v6.18)
    """
    kvm.warn_on(not sp.unsync, "X7", f"{sp} unlinked as unsync but is not")
    sp.unsync = False
    mmu.stat["mmu_unsync"] -= 1


def clear_unsync_child_bit(kvm: Kvm, sp: KvmMmuPage, index: int) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:clear_unsync_child_bit (v6.18)"""
    sp.unsync_children -= 1
    kvm.warn_on(sp.unsync_children < 0, "X7", f"{sp}: unsync_children went negative")
    sp.unsync_child_bitmap.discard(index)


def __mmu_unsync_walk(
    kvm: Kvm,
    mmu: ShadowMmuState,
    sp: KvmMmuPage,
    path: UnsyncPath,
    found: list[tuple[KvmMmuPage, UnsyncPath]],
) -> int:
    """Follow ``sp``'s set bits: collect the unsync pages below (once each) with their
    paths, and clear the bits that lead to none any more; returns how many unsync pages
    the bits led to.

    kernel: arch/x86/kvm/mmu/mmu.c:__mmu_unsync_walk, mmu_pages_add (v6.18)
    """
    nr_unsync_leaf = 0
    for index in sorted(sp.unsync_child_bitmap):
        spte = sp.spt.get(index, SHADOW_NONPRESENT_VALUE)
        if not is_shadow_present_pte(spte) or is_large_pte(spte):
            clear_unsync_child_bit(kvm, sp, index)
            continue
        child = mmu.spte_to_child_sp(spte)
        if child.unsync_children:
            ret = __mmu_unsync_walk(kvm, mmu, child, [*path, (sp, index)], found)
            if not ret:
                clear_unsync_child_bit(kvm, sp, index)
            nr_unsync_leaf += ret
        elif child.unsync:
            nr_unsync_leaf += 1
            if all(child is not other for other, _path in found):
                found.append((child, [*path, (sp, index)]))
        else:
            clear_unsync_child_bit(kvm, sp, index)
    return nr_unsync_leaf


def mmu_unsync_walk(
    kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage
) -> list[tuple[KvmMmuPage, UnsyncPath]]:
    """The unsync pages reachable from ``sp`` through set bits, each with its path. (The
    kernel collects them 16 at a time; its callers, like these, loop until none is left.)

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_unsync_walk (v6.18)
    """
    found: list[tuple[KvmMmuPage, UnsyncPath]] = []
    if sp.unsync_children:
        __mmu_unsync_walk(kvm, mmu, sp, [], found)
    return found


def mmu_pages_clear_parents(kvm: Kvm, path: UnsyncPath) -> None:
    """The unsync page at the end of ``path`` was synced or zapped: clear its bit in its
    parent, and go up while a parent is left with no unsync children.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_pages_clear_parents (v6.18)
    """
    for sp, index in reversed(path):
        clear_unsync_child_bit(kvm, sp, index)
        if sp.unsync_children:
            return
