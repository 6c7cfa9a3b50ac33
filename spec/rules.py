"""The rule catalogue: every contract and invariant, in plain words, with where it comes from.

A rule is either a *contract* (black-box: stated over operations and observations, so it can
judge any implementation) or an *invariant* (white-box: a predicate over the reference's state,
checked after every step). Every rule cites at least one source: a seed thread (file name and
the quoted sentence, which a test finds in the file), a kernel function with its version, a
Documentation section, or a measurement on the real kernel. The docs list the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class SeedCitation:
    """A sentence from one of the five mailing-list threads in shared/seeds/."""

    file: str
    quote: str


@dataclass(frozen=True, slots=True)
class KernelCitation:
    """A kernel function: ``path`` relative to the tree root."""

    path: str
    function: str
    version: str = "v6.18"


@dataclass(frozen=True, slots=True)
class DocCitation:
    """A section of the kernel's Documentation/ (e.g. virt/kvm/api.rst 4.35)."""

    document: str
    section: str


@dataclass(frozen=True, slots=True)
class MeasuredCitation:
    """Behaviour measured on the real KVM of the development machines."""

    document: str
    section: str


Citation = SeedCitation | KernelCitation | DocCitation | MeasuredCitation
Kind = Literal["contract", "invariant"]

SEED_003 = "003_eb6627a3517d9845.txt"
SEED_000 = "000_0a8749d2b21054bb.txt"
SEED_001 = "001_54ba1c77039f4a98.txt"
FINDINGS = "shared/kvm-reference/linux-kvm-here/FINDINGS.md"
KVM_MAIN = "virt/kvm/kvm_main.c"
DIRTY_RING = "virt/kvm/dirty_ring.c"


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    kind: Kind
    area: str
    statement: str
    citations: tuple[Citation, ...]


RULES: dict[str, Rule] = {}


def rule(id: str, kind: Kind, area: str, statement: str, *citations: Citation) -> Rule:
    """Register a rule. Ids are unique; a rule without a citation is refused at import."""
    if id in RULES:
        raise ValueError(f"rule {id} registered twice")
    if not citations:
        raise ValueError(f"rule {id} has no citation")
    registered = Rule(id, kind, area, " ".join(statement.split()), citations)
    RULES[id] = registered
    return registered


# --- Contracts: the memslot uAPI -------------------------------------------------------------

rule(
    "C-MEMSLOT-ORDER",
    "contract",
    "memslots",
    """KVM_SET_USER_MEMORY_REGION(2) answers with the errno of the first failing check, in the
    order of kvmspec.spec.uapi.memslot_rules.decide_set_memory_region; an identical re-submit
    of an existing slot returns 0 and changes nothing.""",
    KernelCitation(KVM_MAIN, "kvm_set_memory_region"),
    KernelCitation(KVM_MAIN, "kvm_vm_ioctl_set_memory_region"),
    MeasuredCitation(FINDINGS, "3. KVM_SET_USER_MEMORY_REGION"),
)
rule(
    "C-MEMSLOT-EEXIST",
    "contract",
    "memslots",
    """EEXIST means the new range of a CREATE or MOVE overlaps a slot with another id in the
    same address space; it is never returned for any other reason, and a MOVE may overlap its
    own old range.""",
    KernelCitation(KVM_MAIN, "kvm_check_memslot_overlap"),
    MeasuredCitation(FINDINGS, "3. Which errno wins when an input has two faults"),
)
rule(
    "C-GMEM-IMMUTABLE",
    "contract",
    "memslots",
    """A guest_memfd slot can only be deleted: any other request for its id, even an identical
    re-submit, is EINVAL; a plain slot cannot become a guest_memfd slot (G5).""",
    KernelCitation(KVM_MAIN, "kvm_set_memory_region"),
    MeasuredCitation(FINDINGS, "6. guest_memfd, KVM_SET_USER_MEMORY_REGION2"),
)
rule(
    "C-DIRTY-API",
    "contract",
    "dirty-log",
    """KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG answer ENXIO when the VM logs to rings only,
    EINVAL for a bad slot number or range, ENOENT for a missing or unlogged slot; the bitmap
    has ALIGN(npages, 64)/64 words and never a bit at or beyond npages; CLEAR works without
    manual protection.""",
    KernelCitation(KVM_MAIN, "kvm_get_dirty_log_protect"),
    KernelCitation(KVM_MAIN, "kvm_clear_dirty_log_protect"),
    MeasuredCitation(FINDINGS, "4. Dirty logging"),
)
rule(
    "C-DIRTY-RING-ENABLE",
    "contract",
    "dirty-log",
    """The dirty ring size is a power of two of at least one page and the reserved entries, at
    most 65536 entries (E2BIG), set once and only before the first vCPU.""",
    KernelCitation(KVM_MAIN, "kvm_vm_ioctl_enable_dirty_log_ring"),
    MeasuredCitation(FINDINGS, "4. Dirty ring"),
)

# --- Contracts: guest memory -----------------------------------------------------------------

rule(
    "C-COHERENCE",
    "contract",
    "memory",
    """A guest load returns the last value stored at that guest-physical address, by the guest
    or through the host mapping behind it (aliases included), or zero after the host dropped
    the page with MADV_DONTNEED.""",
    MeasuredCitation(FINDINGS, "5.5 Host mm operations on the hva"),
    KernelCitation("include/linux/kvm_host.h", "mmu_invalidate_retry_gfn"),
)
rule(
    "C-MMIO",
    "contract",
    "memory",
    """An access with no memslot, or a store to a READONLY slot, exits as MMIO and changes no
    memory; an access to a slot backed by readable and writable host memory completes.""",
    MeasuredCitation(FINDINGS, "5.3 MMIO and read-only slots"),
    KernelCitation(KVM_MAIN, "__gfn_to_hva_many"),
)

rule(
    "C-EFAULT",
    "contract",
    "memory",
    """A guest access to a slot whose host address has no mapping, or a mapping without the
    permission the access needs (a store into PROT_READ memory), fails with EFAULT: KVM_RUN
    returns it, with no exit reason.""",
    KernelCitation(KVM_MAIN, "hva_to_pfn"),
    KernelCitation("arch/x86/kvm/mmu/mmu.c", "kvm_handle_error_pfn"),
    MeasuredCitation(FINDINGS, "5.5 Host mm operations on the hva"),
)
rule(
    "C-NOTIFIER-EXCLUSION",
    "contract",
    "memory",
    """While the host is invalidating the page behind a gfn (between the MMU notifier's start
    and end), no guest access to that gfn completes: the vCPU faults and retries until the
    end, so no access can use a page the host is taking away. While any invalidation is open,
    any access may retry (KVM records only the union of the open ranges).""",
    KernelCitation("include/linux/kvm_host.h", "mmu_invalidate_retry_gfn"),
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_invalidate_range_start"),
)
rule(
    "C-AGING",
    "contract",
    "memory",
    """Aging is sound: a host page used by the VMM or by a guest since its last aging is
    reported young. Loose where the kernel is best-effort: after clear_young (no TLB flush)
    a page's guest uses are not judged until the host invalidates the page, and the accessed
    bits of translations KVM zaps (an invalidation, a memslot DELETE or MOVE) may be
    dropped.""",
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_clear_flush_young"),
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_clear_young"),
    SeedCitation(
        SEED_001,
        "Regardless of whether software or hardware is responsible for updating the PTE that "
        "information is available in the page tables.",
    ),
)
rule(
    "C-DIRTY-COMPLETE",
    "contract",
    "dirty-log",
    """Dirty-log completeness, seen from outside (D1): a store to a dirty-logged slot is
    reported by the next KVM_GET_DIRTY_LOG (by every GET until a CLEAR covers it, with manual
    protection), or, for a vCPU's store in a VM with rings, by the rings harvested before the
    next KVM_RESET_DIRTY_RINGS once every ring was harvested after the store. Reporting pages
    that were not written is allowed.""",
    KernelCitation(KVM_MAIN, "mark_page_dirty_in_slot"),
    KernelCitation(KVM_MAIN, "kvm_get_dirty_log_protect"),
    DocCitation("virt/kvm/api.rst", "8.29 KVM_CAP_DIRTY_LOG_RING"),
)
rule(
    "D5",
    "contract",
    "dirty-log",
    """INITIALLY_SET: with manual protection and KVM_DIRTY_LOG_INITIALLY_SET, a bitmap
    allocated when logging starts is all ones, so GET reports every page until userspace
    clears it (and enabling logging need not write-protect anything).""",
    KernelCitation(KVM_MAIN, "kvm_prepare_memory_region"),
    KernelCitation(KVM_MAIN, "kvm_alloc_dirty_bitmap"),
    DocCitation("virt/kvm/api.rst", "7.18 KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"),
)
rule(
    "D11",
    "contract",
    "dirty-log",
    """A dirty-ring entry names its slot as (as_id << 16) | id and its page as an offset from
    the slot's base_gfn, so every harvested entry decodes to a slot that was dirty-logged,
    at an offset inside it.""",
    KernelCitation(KVM_MAIN, "mark_page_dirty_in_slot"),
    KernelCitation(DIRTY_RING, "kvm_reset_dirty_gfn"),
)

# --- Invariants: memslots and generations (INVENTORY C.1) -----------------------------------

rule(
    "M1",
    "invariant",
    "memslots",
    """Within one address space, slots never overlap in gfn space, so gfn to slot is a
    function, and base_gfn is unique in the gfn tree.""",
    KernelCitation(KVM_MAIN, "kvm_check_memslot_overlap"),
    KernelCitation(KVM_MAIN, "kvm_replace_memslot"),
)
rule(
    "M2",
    "invariant",
    "memslots",
    """Slot ids are unique per address space; user slots have ids below KVM_USER_MEM_SLOTS and
    internal slots ids at or above it, below KVM_MEM_SLOTS_NUM.""",
    KernelCitation(KVM_MAIN, "kvm_vm_ioctl_set_memory_region"),
    KernelCitation(KVM_MAIN, "kvm_set_internal_memslot"),
)
rule(
    "M3",
    "invariant",
    "memslots",
    "Every slot in a set has at least one page.",
    KernelCitation(KVM_MAIN, "kvm_set_memory_region"),
)
rule(
    "M4",
    "invariant",
    "memslots",
    """The id index, the gfn tree and the hva index of a set describe the same slots, and a
    slot's hva range is [userspace_addr, userspace_addr + npages pages).""",
    KernelCitation(KVM_MAIN, "kvm_replace_memslot"),
)
rule(
    "M5",
    "invariant",
    "memslots",
    """When no update is in flight, the active and inactive sets of an address space hold the
    same slots.""",
    KernelCitation(KVM_MAIN, "kvm_activate_memslot"),
)
rule(
    "M6",
    "invariant",
    "memslots",
    """The generation of an address space's active set is congruent to its as_id modulo the
    number of address spaces, only grows, advances by nr_as per swap, and has bit 63 clear
    once the update returned.""",
    KernelCitation(KVM_MAIN, "kvm_swap_active_memslots"),
    KernelCitation(KVM_MAIN, "kvm_create_vm"),
)
rule(
    "M7",
    "invariant",
    "memslots",
    "nr_memslot_pages is the sum of npages over every slot of every address space.",
    KernelCitation(KVM_MAIN, "kvm_commit_memory_region"),
)
rule(
    "M8",
    "invariant",
    "memslots",
    "nr_memslots_dirty_logging is the number of slots with KVM_MEM_LOG_DIRTY_PAGES.",
    KernelCitation(KVM_MAIN, "kvm_commit_memory_region"),
)
rule(
    "M9",
    "invariant",
    "memslots",
    """A slot without LOG_DIRTY_PAGES has no dirty bitmap; a logged slot has one whenever the
    VM uses bitmaps (a slot logged before the dirty ring was enabled keeps its unused bitmap,
    since enabling the ring does not look at memslots); a guest_memfd slot is never
    dirty-logged or read-only.""",
    KernelCitation(KVM_MAIN, "kvm_prepare_memory_region"),
    KernelCitation(KVM_MAIN, "kvm_vm_ioctl_enable_dirty_log_ring"),
    KernelCitation(KVM_MAIN, "check_memory_region_flags"),
)
rule(
    "M10",
    "invariant",
    "memslots",
    "A slot object that was freed is never reachable from any memslot set.",
    KernelCitation(KVM_MAIN, "kvm_swap_active_memslots"),
    KernelCitation(KVM_MAIN, "kvm_commit_memory_region"),
)
rule(
    "M11",
    "invariant",
    "memslots",
    """A memslot swap never completes while an MMU-notifier invalidation is running
    (mn_active_invalidate_count > 0).""",
    KernelCitation(KVM_MAIN, "kvm_swap_active_memslots"),
    DocCitation("Documentation/virt/kvm/locking.rst", "mn_active_invalidate_count"),
)
rule(
    "M12",
    "invariant",
    "memslots",
    """When the architecture is asked to drop a slot's mappings for DELETE or MOVE, the active
    set already holds the INVALID copy, so no new mapping can be created through it.""",
    KernelCitation(KVM_MAIN, "kvm_invalidate_memslot"),
    SeedCitation(
        SEED_003,
        "From this point no new shadow pages pointing to a deleted, or moved, "
        "memslot will be created.",
    ),
)
rule(
    "M14",
    "invariant",
    "memslots",
    """A DELETE or MOVE that fails in arch prepare leaves the old slot active and unchanged,
    with the generation advanced by two swaps.""",
    KernelCitation(KVM_MAIN, "kvm_set_memslot"),
    SeedCitation(
        SEED_003,
        "For DELETE/MOVE, revert the above INVALID change. No modifications required since "
        "the original slot was preserved in the inactive slots.",
    ),
)
rule(
    "ERR-NO-CHANGE",
    "invariant",
    "memslots",
    """An ioctl that fails changes nothing: every check runs before the first change, so the
    same slots stay active with the same contents. The one documented exception is a DELETE
    or MOVE that fails in arch prepare: it has already swapped twice (the generation moved),
    but the slot it swaps back is the untouched original.""",
    KernelCitation(KVM_MAIN, "kvm_set_memory_region"),
    KernelCitation(KVM_MAIN, "kvm_set_memslot"),
    SeedCitation(
        SEED_003,
        "No modifications required since the original slot was preserved in the inactive slots.",
    ),
)
rule(
    "S003-ACTIVE-IMMUTABLE",
    "invariant",
    "memslots",
    """KVM never modifies a slot object while it is in an active memslot set: a change is a
    new object swapped in.""",
    SeedCitation(
        SEED_003,
        "KVM can never directly modify a slot that is in the active memslots tree(s).",
    ),
    KernelCitation(KVM_MAIN, "kvm_set_memslot"),
)
rule(
    "S000-INVALID-FINDABLE",
    "invariant",
    "memslots",
    """An INVALID slot gives no new references, but stays findable by gfn and by hva, so that
    references to its pages can still be removed while it goes away.""",
    SeedCitation(
        SEED_000,
        "the KVM_MEMSLOT_INVALID flag indicates that we should not create any more "
        "references to pages in the memslot, but we do still need to be able to "
        "handle references going away",
    ),
    SeedCitation(SEED_000, "kvm_arch_flush_shadow requires functional memslot lookup"),
)

rule(
    "G1",
    "invariant",
    "memslots",
    """Each guest_memfd page is bound to at most one memslot, the binding lies within the
    file, and a binding exists exactly while its live slot points at the file.""",
    KernelCitation("virt/kvm/guest_memfd.c", "kvm_gmem_bind"),
    KernelCitation("virt/kvm/guest_memfd.c", "kvm_gmem_unbind"),
    MeasuredCitation(FINDINGS, "6. guest_memfd, KVM_SET_USER_MEMORY_REGION2"),
)

# --- Invariants: MMU-notifier exclusion (INVENTORY C.2) --------------------------------------

rule(
    "N1",
    "invariant",
    "notifiers",
    """mmu_invalidate_in_progress is never negative: every invalidate_begin is matched by
    exactly one invalidate_end.""",
    KernelCitation(KVM_MAIN, "kvm_mmu_invalidate_end"),
)
rule(
    "N2",
    "invariant",
    "notifiers",
    """mmu_invalidate_seq never decreases, and it moves before in_progress drops, so a fault
    that saw the old sequence retries after any end.""",
    KernelCitation(KVM_MAIN, "kvm_mmu_invalidate_end"),
    KernelCitation("include/linux/kvm_host.h", "mmu_invalidate_retry_gfn"),
)
rule(
    "N3",
    "invariant",
    "notifiers",
    """While an invalidation is open, the recorded range is either not set yet (which forces
    every fault to retry) or a non-empty gfn range covering every range added since it
    opened.""",
    KernelCitation(KVM_MAIN, "kvm_mmu_invalidate_range_add"),
    KernelCitation("include/linux/kvm_host.h", "mmu_invalidate_retry_gfn"),
)
rule(
    "N4",
    "invariant",
    "notifiers",
    """Fault exclusion: a translation for gfn g is installed only if, at install time under
    mmu_lock, no open invalidation covers g and the sequence count still equals the value read
    before the pfn was resolved; so once invalidations are closed, every translation points at
    the page the host maps at g's address, never at one the host took away.""",
    KernelCitation("include/linux/kvm_host.h", "mmu_invalidate_retry_gfn"),
    KernelCitation("arch/x86/kvm/mmu/mmu.c", "is_page_fault_stale"),
    SeedCitation(
        "004_70af8c61b2875192.txt",
        "have to be unmap from process address space during migration. At this point mmu "
        "notifiers will be called.",
    ),
)
rule(
    "N5",
    "invariant",
    "notifiers",
    """When invalidate_range_start returns, no translation and no TLB entry maps a gfn whose
    host address lies in the range, until the matching end: the start dropped them and flushed,
    and the retry check refuses new ones.""",
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_invalidate_range_start"),
    KernelCitation("include/linux/kvm_host.h", "mmu_invalidate_retry_gfn"),
)
rule(
    "M13",
    "invariant",
    "memslots",
    """After DELETE or MOVE completes, no translation refers to the old slot's gfns: every
    translation goes through a usable (present, not INVALID) slot.""",
    KernelCitation(KVM_MAIN, "kvm_invalidate_memslot"),
    SeedCitation(SEED_000, "It removes all translations mapped via memslots."),
)
rule(
    "N6",
    "invariant",
    "notifiers",
    """mn_active_invalidate_count is never negative and returns to zero; a memslot writer
    waits while it is not zero.""",
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_invalidate_range_start"),
    KernelCitation(KVM_MAIN, "kvm_swap_active_memslots"),
)

# --- Invariants: the dirty ring (INVENTORY C.3) -----------------------------------------------

rule(
    "D6",
    "invariant",
    "dirty-log",
    """Bitmap bits at or beyond npages are never set; ring offsets are below the slot's npages
    (an out-of-range entry is ignored at reset).""",
    KernelCitation(KVM_MAIN, "mark_page_dirty_in_slot"),
    KernelCitation(DIRTY_RING, "kvm_reset_dirty_gfn"),
)
rule(
    "D7",
    "invariant",
    "dirty-log",
    """0 <= dirty_index - reset_index <= size; the entries in [reset_index, dirty_index) carry
    DIRTY (as KVM wrote them) or RESET (as userspace harvested them), and every other entry is
    invalid.""",
    KernelCitation(DIRTY_RING, "kvm_dirty_ring_push"),
    KernelCitation(DIRTY_RING, "kvm_dirty_ring_used"),
)
rule(
    "D9",
    "invariant",
    "dirty-log",
    """A ring reset consumes only the contiguous prefix of RESET-flagged entries from
    reset_index, in order.""",
    KernelCitation(DIRTY_RING, "kvm_dirty_ring_reset"),
)


rule(
    "N7",
    "invariant",
    "notifiers",
    """Aging never changes a translation or its permissions: it only reads or clears accessed
    state (a flush may drop TLB entries, never change one).""",
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_clear_flush_young"),
    KernelCitation("arch/x86/kvm/mmu/mmu.c", "kvm_age_gfn"),
)
rule(
    "N8",
    "invariant",
    "notifiers",
    """Dirty state is not lost: the host page behind a writable translation is marked dirty
    (KVM marks it when it creates the writable mapping, since the guest then writes without
    KVM seeing it), so a zap or an unmap never discards guest writes.""",
    KernelCitation("include/linux/kvm_host.h", "kvm_release_faultin_page"),
    KernelCitation("arch/x86/kvm/mmu/mmu.c", "mmu_spte_clear_track_bits"),
)

# --- Invariants: dirty logging (INVENTORY C.3) ------------------------------------------------

rule(
    "D1",
    "invariant",
    "dirty-log",
    """In a dirty-logged slot, every gfn with a writable translation (in the table or in any
    vCPU's TLB) is recorded as dirty: its bitmap bit is set or a ring entry for it has not been
    reset. A guest writes without KVM noticing only through such a translation, so this is
    what makes every write reach a report.""",
    KernelCitation(KVM_MAIN, "mark_page_dirty_in_slot"),
    KernelCitation(KVM_MAIN, "kvm_get_dirty_log_protect"),
)
rule(
    "D2",
    "invariant",
    "dirty-log",
    """Without manual protection, GET_DIRTY_LOG swaps each bitmap word with zero, write-protects
    those pages and flushes the TLBs, all before userspace sees the snapshot: a write after the
    report faults and is logged again.""",
    KernelCitation(KVM_MAIN, "kvm_get_dirty_log_protect"),
)
rule(
    "D3",
    "invariant",
    "dirty-log",
    """With manual protection, GET neither clears nor re-protects; CLEAR clears and
    write-protects exactly the pages set both in the user's mask and in the bitmap.""",
    KernelCitation(KVM_MAIN, "kvm_clear_dirty_log_protect"),
)
rule(
    "D4",
    "invariant",
    "dirty-log",
    """While a slot is dirty-logged, new mappings in it are base-page sized and existing huge
    ones are write-protected or split, so reports have base-page granularity (x86, arm64).""",
    KernelCitation("arch/x86/kvm/mmu/mmu.c", "kvm_mmu_hugepage_adjust"),
    KernelCitation("arch/x86/kvm/x86.c", "kvm_mmu_slot_apply_flags"),
)
rule(
    "D8",
    "invariant",
    "dirty-log",
    """Soft-full: a vCPU whose ring has reached size minus the reserved entries does not enter
    the guest (KVM_RUN exits with KVM_EXIT_DIRTY_RING_FULL) until a reset frees entries, so
    the ring never overflows.""",
    KernelCitation(DIRTY_RING, "kvm_dirty_ring_check_request"),
    KernelCitation(DIRTY_RING, "kvm_dirty_ring_soft_full"),
)
rule(
    "D10",
    "invariant",
    "dirty-log",
    """A VM with rings and no backup bitmap has no bitmaps; KVM dirties guest memory with no
    running vCPU only where the architecture allows it (arm64 saving ITS tables), and then into
    the backup bitmap. Anywhere else the kernel WARNs, and with rings the write is lost.""",
    KernelCitation(DIRTY_RING, "kvm_use_dirty_bitmap"),
    KernelCitation(KVM_MAIN, "mark_page_dirty_in_slot"),
)


# --- Invariants: locking ------------------------------------------------------------------------

rule(
    "LOCKING",
    "invariant",
    "notifiers",
    """Translations change only under mmu_lock held for write: faults install, notifiers
    unmap, harvests write-protect and aging clears accessed bits with the lock held, so each
    of them sees the others' changes whole. Only an architecture that ages locklessly (RCU
    and compare-and-exchange, seed 001) may age without it.""",
    KernelCitation("virt/kvm/kvm_mm.h", "KVM_MMU_LOCK"),
    KernelCitation(KVM_MAIN, "kvm_handle_hva_range"),
    SeedCitation(
        SEED_001,
        "techniques, RCU and cmpxchg, to safely test and clear the accessed",
    ),
)


def normalize_thread_text(text: str) -> str:
    """Thread text as one line of words: quote markers (``>``) and comment stars (``*``) at
    the start of lines are dropped, so a quote can span wrapped lines."""
    words = []
    for line in text.splitlines():
        words.append(line.strip().lstrip(">* \t"))
    return " ".join(" ".join(words).split())
