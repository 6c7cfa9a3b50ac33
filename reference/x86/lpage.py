"""Huge SPTEs: when a gfn may be mapped with a 2 MiB or 1 GiB leaf, and how big.

A huge SPTE maps a whole *frame* (512 or 512 * 512 gfns) with one entry. It is only right if
every gfn of the frame may be mapped the same way, so each slot keeps, per huge level and
per frame, a count of the reasons that forbid it: ``disallow_lpage`` in the slot's
``lpage_info`` (invariant X8). The reasons are

* the frame sticks out of the slot (the slot's first or last frame is not whole);
* the slot's gpa and hva are not congruent at that size (a huge host page could never line
  up with the frame), which disallows every frame of the slot at that level;
* a gfn of the frame is a guest page table KVM shadows at 4K level
  (page_track.account_shadowed), or is write-tracked (every upper-level shadowed table):
  a huge mapping would cover the table with the rights of the data around it.

A fault may then map a huge leaf (kvm_mmu_hugepage_adjust) only if the guest maps at least
that size (with shadow paging, the guest's own page size caps it), the slot is not dirty
logged (D4: the dirty log is kept at 4K granularity), the frame's count is 0, and the host
itself maps the hva with a page at least that large (a THP: HostMm.mapping_level).

The kernel allocates the counts as arrays when the slot is created; the model stores the
initial value as a rule (:class:`SlotLpageInfo`) and only the counts shadowing added, so a
terabyte slot costs nothing until its frames are used.

Not modelled: memory attributes (KVM_LPAGE_MIXED_FLAG, bit 31: a frame mixing private and
shared gfns), guest_memfd's private mappings, and the NX huge page mitigation (this
machine's AMD CPU has no iTLB multihit, so nx_huge_pages is off and
disallowed_hugepage_adjust never acts). The host never maps 1 GiB pages (no hugetlbfs in the
model), so huge SPTEs are 2 MiB.

kernel: arch/x86/kvm/x86.c:kvm_alloc_memslot_metadata; arch/x86/kvm/mmu/mmu.c:
lpage_info_slot, update_gfn_disallow_lpage_count, kvm_mmu_gfn_disallow_lpage,
kvm_mmu_gfn_allow_lpage, host_pfn_mapping_level, kvm_mmu_max_mapping_level,
kvm_mmu_hugepage_adjust (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import LEVEL_PMD, HostMm
from kvmspec.reference.x86.paging import (
    KVM_MAX_HUGEPAGE_LEVEL,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_LEVEL_BITS,
)
from kvmspec.reference.x86.rmap import gfn_to_index
from kvmspec.spec.uapi.constants import PAGE_SHIFT

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.x86.set_spte import KvmPageFault


def kvm_pages_per_hpage(level: int) -> int:
    """How many 4K pages a leaf at ``level`` maps (1, 512, 512 * 512).

    kernel: arch/x86/include/asm/kvm_host.h:KVM_PAGES_PER_HPAGE (v6.18)
    """
    return 1 << ((level - PG_LEVEL_4K) * PT64_LEVEL_BITS)


class SlotLpageInfo:
    """``slot->arch.lpage_info``: the disallow_lpage count of every frame at 2M and 1G.

    The count is the initial value kvm_alloc_memslot_metadata gives the frame (``initial``,
    a rule over the slot's shape) plus what shadowing added since (``added``, only where not
    zero).
    """

    __slots__ = ("added", "base_gfn", "npages", "ugfn")

    def __init__(self, base_gfn: int, npages: int, userspace_addr: int) -> None:
        self.base_gfn = base_gfn
        self.npages = npages
        self.ugfn = userspace_addr >> PAGE_SHIFT
        self.added: dict[tuple[int, int], int] = {}

    def initial(self, level: int, index: int) -> int:
        """What the kernel stores at allocation: 1 for every frame when the slot's gpa and
        hva are incongruent at this size, 1 for the first frame when the slot starts inside
        it and for the last when the slot ends inside it, else 0. It *sets* 1 (it does not
        add), so a frame that is both a misaligned end and in an incongruent slot still
        starts at 1."""
        mask = kvm_pages_per_hpage(level) - 1
        end_gfn = self.base_gfn + self.npages
        if (self.base_gfn ^ self.ugfn) & mask:
            return 1
        if index == 0 and self.base_gfn & mask:
            return 1
        last = gfn_to_index(end_gfn - 1, self.base_gfn, level)
        return int(index == last and bool(end_gfn & mask))

    def disallow_lpage(self, level: int, index: int) -> int:
        return self.initial(level, index) + self.added.get((level, index), 0)


def kvm_alloc_memslot_lpage_info(slot: KvmMemorySlot) -> None:
    """Give a new slot (CREATE, or the new copy of a MOVE) its counts.

    kernel: arch/x86/kvm/x86.c:kvm_alloc_memslot_metadata (v6.18)
    """
    slot.arch["lpage_info"] = SlotLpageInfo(slot.base_gfn, slot.npages, slot.userspace_addr)


def slot_lpage_info(slot: KvmMemorySlot) -> SlotLpageInfo:
    info = slot.arch["lpage_info"]
    assert isinstance(info, SlotLpageInfo), f"{slot} has no lpage_info"
    return info


def lpage_info_slot(gfn: int, slot: KvmMemorySlot, level: int) -> int:
    """The disallow_lpage count of the level-``level`` frame of ``gfn`` in ``slot``.

    kernel: arch/x86/kvm/mmu/mmu.c:lpage_info_slot (v6.18)
    """
    return slot_lpage_info(slot).disallow_lpage(level, gfn_to_index(gfn, slot.base_gfn, level))


def update_gfn_disallow_lpage_count(kvm: Kvm, slot: KvmMemorySlot, gfn: int, count: int) -> None:
    """Add ``count`` to the frames of ``gfn`` at every huge level.

    kernel: arch/x86/kvm/mmu/mmu.c:update_gfn_disallow_lpage_count (v6.18)
    """
    info = slot_lpage_info(slot)
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        key = (level, gfn_to_index(gfn, slot.base_gfn, level))
        value = info.added.get(key, 0) + count
        if kvm.warn_on(value < 0, "X8", f"disallow_lpage of gfn {gfn:#x} L{level} went down"):
            return
        if value:
            info.added[key] = value
        else:
            info.added.pop(key, None)


def kvm_mmu_gfn_disallow_lpage(kvm: Kvm, slot: KvmMemorySlot, gfn: int) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_gfn_disallow_lpage (v6.18)"""
    update_gfn_disallow_lpage_count(kvm, slot, gfn, 1)


def kvm_mmu_gfn_allow_lpage(kvm: Kvm, slot: KvmMemorySlot, gfn: int) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_gfn_allow_lpage (v6.18)"""
    update_gfn_disallow_lpage_count(kvm, slot, gfn, -1)


def host_pfn_mapping_level(mm: HostMm, slot: KvmMemorySlot, gfn: int) -> int:
    """How large a page the host maps at the gfn's hva: 2M for a THP's PMD, else 4K (also
    when nothing is mapped: the fault that follows maps 4K, and a PMD appearing later goes
    through an MMU-notifier invalidation first). The kernel walks the host page tables
    without mmap_lock, with interrupts off; the model's host changes only between steps.

    kernel: arch/x86/kvm/mmu/mmu.c:host_pfn_mapping_level (v6.18)
    """
    hva = __gfn_to_hva_memslot(slot, gfn, PAGE_SHIFT)
    return PG_LEVEL_2M if mm.mapping_level(hva) == LEVEL_PMD else PG_LEVEL_4K


def kvm_mmu_max_mapping_level(
    mm: HostMm, slot: KvmMemorySlot, gfn: int, max_level: int = KVM_MAX_HUGEPAGE_LEVEL
) -> int:
    """The largest level at most ``max_level`` that may map ``gfn``: walk down while the
    frame's disallow_lpage count forbids it, then stop at the host's page size. Called
    under mmu_lock, so the counts and (with the notifier sequence checked) the host's
    mapping cannot change under it.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_max_mapping_level, __kvm_mmu_max_mapping_level
    (v6.18)
    """
    level = min(max_level, KVM_MAX_HUGEPAGE_LEVEL)
    while level > PG_LEVEL_4K and lpage_info_slot(gfn, slot, level):
        level -= 1
    if level == PG_LEVEL_4K:
        return PG_LEVEL_4K
    return min(level, host_pfn_mapping_level(mm, slot, gfn))


def kvm_mmu_hugepage_adjust(kvm: Kvm, mm: HostMm, fault: KvmPageFault) -> None:
    """Choose the fault's ``goal_level``: the level of the leaf FNAME(fetch) installs. It
    stays 4K when the guest maps 4K (``max_level``), the gfn has no slot, or the slot is
    dirty-logged (D4); otherwise it is kvm_mmu_max_mapping_level, and the pfn is rounded
    down to the start of the huge page. The gfn and pfn must agree inside the frame: the
    host's huge page is aligned, and the slot's gpa and hva are congruent (or the frame is
    disallowed); the kernel BUGs otherwise.

    Called by FNAME(fetch) only after the shadow pages of the guest's tables exist: making
    them may shadow a gfn inside the frame (seed 002, step 7), which must forbid the huge
    leaf that this very fault would install.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_hugepage_adjust (v6.18)
    """
    slot = fault.slot
    if fault.max_level == PG_LEVEL_4K or slot is None or slot.dirty_logging:
        return
    fault.req_level = kvm_mmu_max_mapping_level(mm, slot, fault.gfn, fault.max_level)
    if fault.req_level == PG_LEVEL_4K:
        return
    fault.goal_level = fault.req_level
    mask = kvm_pages_per_hpage(fault.goal_level) - 1
    kvm.warn_on(
        (fault.gfn & mask) != (fault.pfn & mask),
        "X9",
        f"gfn {fault.gfn:#x} and pfn {fault.pfn:#x} disagree inside a L{fault.goal_level} frame",
    )
    fault.pfn &= ~mask
