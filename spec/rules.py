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

rule(
    "C-CAPABILITIES",
    "contract",
    "memslots",
    """KVM_CHECK_EXTENSION on the VM fd answers for each memory capability what the platform
    supports: 1 for the memslot ioctls, JOIN_MEMORY_REGIONS_WORKS and SYNC_MMU; the number of
    user slots for NR_MEMSLOTS; the largest ring in bytes for each dirty ring flavour it has;
    the accepted flags for MANUAL_DIRTY_LOG_PROTECT2 and GUEST_MEMFD_FLAGS; 0 for what it
    lacks (kvmspec.spec.uapi.capability_rules).""",
    KernelCitation(KVM_MAIN, "kvm_vm_ioctl_check_extension_generic"),
    MeasuredCitation(FINDINGS, "2. Capabilities"),
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
    that were not written is allowed. (Known kernel finding, corpus/conformance/
    x86_64-linux-6.18-pvm/s4-dirty-ring-initially-set-loses-a-write.jsonl, measured on this
    machine: in a VM with rings under KVM_DIRTY_LOG_INITIALLY_SET, turning logging on
    write-protects nothing, so a page mapped writable before logging is written without a
    ring entry; the contract does not require those stores.)""",
    KernelCitation(KVM_MAIN, "mark_page_dirty_in_slot"),
    KernelCitation(KVM_MAIN, "kvm_get_dirty_log_protect"),
    DocCitation("virt/kvm/api.rst", "8.29 KVM_CAP_DIRTY_LOG_RING"),
    KernelCitation("arch/x86/kvm/x86.c", "kvm_mmu_slot_apply_flags"),
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
    what makes every write reach a report. (Not in a VM with rings under
    KVM_DIRTY_LOG_INITIALLY_SET: the known kernel finding of C-DIRTY-COMPLETE.)""",
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


# --- Invariants: the x86 MMU (INVENTORY C.4) ---------------------------------------------------

X86_MMU = "arch/x86/kvm/mmu/mmu.c"
TDP_MMU = "arch/x86/kvm/mmu/tdp_mmu.c"
SEED_002 = "002_bf1827155fc18d76.txt"
SEED_004 = "004_70af8c61b2875192.txt"

rule(
    "X1",
    "invariant",
    "x86-mmu",
    """Shadow-MMU rmaps are a bijection: each present leaf SPTE of a shadow page, mapping gfn
    g at level L through slot S, is listed exactly once in S's rmap for (L, g), and every rmap
    entry names such a leaf. TDP-MMU SPTEs are not in rmaps.""",
    KernelCitation(X86_MMU, "rmap_add"),
    KernelCitation(X86_MMU, "rmap_remove"),
    KernelCitation(X86_MMU, "drop_spte"),
)
rule(
    "X2",
    "invariant",
    "x86-mmu",
    """A shadow page's parent_ptes are exactly the present non-leaf SPTEs that link to it; a
    root has none; root_count equals the number of vCPU roots, current or cached, that hold
    the page.""",
    KernelCitation(X86_MMU, "__link_shadow_page"),
    KernelCitation(X86_MMU, "drop_parent_pte"),
    KernelCitation(X86_MMU, "kvm_mmu_free_roots"),
)
rule(
    "X3",
    "invariant",
    "x86-mmu",
    """For every present leaf SPTE, writable implies MMU-writable, and MMU-writable implies
    host-writable; host-writable is fixed when the SPTE is made and does not change while it
    stays present.""",
    KernelCitation("arch/x86/kvm/mmu/spte.h", "check_spte_writable_invariants"),
    KernelCitation(X86_MMU, "mmu_spte_update"),
)
rule(
    "X4",
    "invariant",
    "x86-mmu",
    """A leaf SPTE that stays present keeps its pfn. Pointing a gfn at other memory (the host
    migrated the page, the APIC-access page included) takes a zap, a TLB flush and a new SPTE
    built by the next fault.""",
    KernelCitation(X86_MMU, "mmu_spte_update"),
    KernelCitation(TDP_MMU, "handle_changed_spte"),
    KernelCitation(X86_MMU, "kvm_unmap_gfn_range"),
    SeedCitation(
        SEED_004,
        "We can use mmu notifiers to track when page begins to be moved and we can find new "
        "page location on EPT violation.",
    ),
)
rule(
    "X5",
    "invariant",
    "x86-mmu",
    """TLB discipline: a leaf that loses MMU-writable or stops being present is flushed from
    every vCPU's TLB before the ioctl, notifier or fault that changed it returns, so no TLB
    entry is more permissive than the tables; a shadow page is freed only after that flush
    (TDP MMU: after an RCU grace period).""",
    KernelCitation("arch/x86/kvm/mmu/spte.h", "leaf_spte_change_needs_tlb_flush"),
    KernelCitation(X86_MMU, "kvm_mmu_commit_zap_page"),
)
rule(
    "X6",
    "invariant",
    "x86-mmu",
    """A guest page table that a valid, synced shadow page shadows is mapped writable by no
    SPTE, including a huge leaf whose frame contains it, so every guest write to it traps
    and keeps the shadow coherent. (Known kernel finding, tests/test_x86_shadow_mmu.py,
    with MMIO caching on: an MMIO SPTE keeps the guest's write right in the writable bit,
    and make_spte skips mmu_try_to_unsync_pages when it replaces a writable 4K SPTE, so a
    stale MMIO SPTE replaced after its gfn got a slot and became a shadowed guest table
    yields a writable leaf over that table.)""",
    KernelCitation(X86_MMU, "account_shadowed"),
    KernelCitation(X86_MMU, "mmu_try_to_unsync_pages"),
    KernelCitation("arch/x86/kvm/mmu/spte.c", "make_spte"),
    SeedCitation(
        SEED_002, "The spte become read-only which can ensure the shadow gfn can not be changed."
    ),
)
rule(
    "X7",
    "invariant",
    "x86-mmu",
    """Only last-level (4K) shadow pages become unsync; every unsync page, and every page
    with unsync children, has its bit set in each parent's unsync_child_bitmap, and
    unsync_children counts the set bits. No valid unsync page shares its gfn with a valid
    upper-level page of guest PTEs: making such a page zaps the gfn's unsync pages, and
    then its write-tracking keeps them from going unsync again.""",
    KernelCitation(X86_MMU, "mark_unsync"),
    KernelCitation(X86_MMU, "clear_unsync_child_bit"),
    KernelCitation(X86_MMU, "kvm_mmu_find_shadow_page"),
)
rule(
    "X8",
    "invariant",
    "x86-mmu",
    """disallow_lpage of a huge frame in a slot is its allocation value plus its shadowing
    counts. The allocation value is 1 when the frame is the slot's partial first or last
    frame, or when the slot's gpa and hva disagree modulo the frame size (set, not added:
    a frame with both reasons starts at 1), else 0. Each 4K shadow page with guest PTEs
    whose gfn lies in the frame adds 1, and each write-track reference on a gfn of the frame
    (one per upper-level shadow page with guest PTEs) adds 1. Bit 31 marks a frame whose
    memory attributes are mixed. A huge mapping needs a count of 0.""",
    KernelCitation("arch/x86/kvm/x86.c", "kvm_alloc_memslot_metadata"),
    KernelCitation(X86_MMU, "update_gfn_disallow_lpage_count"),
    SeedCitation(SEED_002, "has_wrprotected_page() can return 0 for this case"),
)
rule(
    "X9",
    "invariant",
    "x86-mmu",
    """A huge leaf SPTE maps a frame wholly inside one slot, whose gpa and hva agree modulo
    its size, over one host page at least as large. A writable huge leaf also needs a frame
    with no shadowed guest page table and no mixed attributes (disallow_lpage 0); a read-only
    huge leaf may stay over a shadowed gfn, so reads go on through it.""",
    KernelCitation(X86_MMU, "__kvm_mmu_max_mapping_level"),
    KernelCitation(X86_MMU, "kvm_mmu_hugepage_adjust"),
    SeedCitation(
        SEED_002,
        "Do not drop large spte until it can be insteaded by small pages so that the guest "
        "can happliy read memory through it",
    ),
)
rule(
    "S002-LARGE-SPTE-PROGRESS",
    "invariant",
    "x86-mmu",
    """A guest write into a frame mapped by a write-protected huge SPTE ends within a
    bounded number of faults, even when the emulator cannot handle it and the written gfn
    is itself a page table on the path that maps it: KVM unprotects and retries once per
    instruction and address, then reports the failure instead of refaulting for ever.""",
    SeedCitation(
        SEED_002,
        "What if gfn 4 is a pagetable part of the pagedirectory chain used to map gfn 4?",
    ),
    KernelCitation(X86_MMU, "kvm_mmu_write_protect_fault"),
    KernelCitation("arch/x86/kvm/x86.c", "kvm_unprotect_and_retry_on_failure"),
)
rule(
    "S004-APIC-ACCESS-RELOAD",
    "invariant",
    "x86-mmu",
    """Once no MMU-notifier invalidation is in progress, every vCPU of a VM with an APIC-access
    page either has KVM_REQ_APIC_PAGE_RELOAD pending or holds in APIC_ACCESS_ADDR the page
    the host maps at that slot's address now. An invalidation of the slot asks every vCPU to
    reload; a reload that meets an invalidation of the gfn asks again; a vCPU with the request
    pending does not enter the guest.""",
    KernelCitation(X86_MMU, "kvm_unmap_gfn_range"),
    KernelCitation("arch/x86/kvm/vmx/vmx.c", "vmx_set_apic_access_page_addr"),
    KernelCitation("arch/x86/kvm/x86.c", "kvm_vcpu_reload_apic_access_page"),
    SeedCitation(
        SEED_004,
        "APIC access page is a little bit more complicated since its physical address needs "
        "to be tracked to be updated in VMCS.",
    ),
)
rule(
    "S004-NOT-PINNED",
    "invariant",
    "x86-mmu",
    """KVM pins none of its private pages (the APIC-access page, the EPT identity map): they
    are ordinary pages of the VMM's memory, so migration moves them, the notifier zaps their
    SPTEs and the next access faults the new page in; a pinned page would make migration
    fail (EBUSY).""",
    KernelCitation("arch/x86/kvm/lapic.c", "kvm_alloc_apic_access_page"),
    KernelCitation("arch/x86/kvm/x86.c", "__x86_set_memory_region"),
    KernelCitation("arch/x86/kvm/vmx/vmx.c", "init_rmode_identity_map"),
    SeedCitation(
        SEED_004,
        "Remove pinning is preferable. In fact looks like for identity pagetable it should be "
        "trivial, just don't pin.",
    ),
    SeedCitation(
        SEED_004,
        "Both identity page and APIC access page are userspace pages which will have to be "
        "unmap from process address space during migration. At this point mmu notifiers will "
        "be called.",
    ),
)
rule(
    "X10",
    "invariant",
    "x86-mmu",
    """Obsolete shadow pages (zapped, or from an older mmu_valid_gen) are never linked from
    a current page, so no new translation goes through them; a vCPU whose root is obsolete
    has a request to drop it before it next enters the guest.""",
    KernelCitation(X86_MMU, "is_obsolete_sp"),
    KernelCitation(X86_MMU, "kvm_mmu_free_obsolete_roots"),
    KernelCitation(X86_MMU, "kvm_mmu_zap_all_fast"),
)
rule(
    "X11",
    "invariant",
    "x86-mmu",
    """An MMIO SPTE records the 19-bit memslot generation of its creation and is trusted only
    while that equals the current generation and no memslot update is in progress; when the
    generation wraps, every shadow page is zapped, so a slot created over a cached MMIO gfn
    is always faulted into.""",
    KernelCitation(X86_MMU, "check_mmio_spte"),
    KernelCitation(X86_MMU, "kvm_mmu_invalidate_mmio_sptes"),
)
rule(
    "X12",
    "invariant",
    "x86-mmu",
    """KVM counts every shadow page it holds (n_used_mmu_pages), and the count stays within
    n_max_mmu_pages but for what one fault may add after the soft check (a page per level
    below the root): before a fault or a root load allocates, the oldest pages that are no
    vCPU's root are recycled when fewer than 5 are free, and KVM_RUN fails with ENOSPC only
    when every page held is a root in use. The limit follows the memslots (a shadow page per
    50 guest pages, at least 64) until KVM_SET_NR_MMU_PAGES sets it (at least 64, else
    EINVAL).""",
    KernelCitation(X86_MMU, "make_mmu_pages_available"),
    KernelCitation(X86_MMU, "kvm_mmu_zap_oldest_mmu_pages"),
    KernelCitation(X86_MMU, "kvm_mmu_change_mmu_pages"),
    KernelCitation("arch/x86/kvm/x86.c", "kvm_vm_ioctl_set_nr_mmu_pages"),
    KernelCitation("arch/x86/kvm/x86.c", "kvm_arch_commit_memory_region"),
)
rule(
    "X13",
    "invariant",
    "x86-mmu",
    """TDP MMU frozen SPTEs: only the thread that froze an SPTE writes it next, other writers
    retry, and no frozen SPTE is left in a reachable table once the operation ends (only in a
    subtree already unlinked).""",
    KernelCitation(TDP_MMU, "tdp_mmu_set_spte_atomic"),
    KernelCitation(TDP_MMU, "tdp_mmu_set_spte"),
)
rule(
    "X14",
    "invariant",
    "x86-mmu",
    """TDP MMU roots: a valid root holds the MMU's own reference, only an invalid root's count
    reaches zero, invalidated roots are zapped before a memslot DELETE or MOVE (or a fast zap)
    returns, and a root page is freed only after an RCU grace period.""",
    KernelCitation(TDP_MMU, "kvm_tdp_mmu_put_root"),
    KernelCitation(TDP_MMU, "kvm_tdp_mmu_zap_invalidated_roots"),
)
rule(
    "X15",
    "invariant",
    "x86-mmu",
    """A failed atomic SPTE update has no side effect, and the bookkeeping of a change
    (statistics, accessed and dirty propagation, freeing a removed table) runs exactly once
    per successful change.""",
    KernelCitation(TDP_MMU, "tdp_mmu_set_spte_atomic"),
    KernelCitation(TDP_MMU, "handle_changed_spte"),
)
rule(
    "X16",
    "invariant",
    "x86-mmu",
    """The fast page fault (tried first by direct MMUs, here the TDP MMU; never by shadow
    paging) acts only on a present leaf, keeps its pfn, only restores W on an MMU-writable
    SPTE or undoes access tracking, with a compare-and-exchange, and marks the gfn dirty when
    it grants W; it never brings back an SPTE that was zapped.""",
    KernelCitation(X86_MMU, "fast_page_fault"),
    KernelCitation(X86_MMU, "fast_pf_fix_direct_spte"),
    KernelCitation(TDP_MMU, "kvm_tdp_mmu_fast_pf_get_last_sptep"),
    DocCitation("Documentation/virt/kvm/locking.rst", "Fast page fault"),
)

rule(
    "X17",
    "invariant",
    "x86-mmu",
    """On shadow paging a vCPU translates through the shadow of the CR3 it loaded: its
    current root, unless it is the dummy root of a CR3 outside every visible slot, records
    the vCPU's CR3 and is the top-level shadow page of that CR3's gfn, in the vCPU's paging
    mode; each cached previous root records the CR3 it shadows. A CR3 load reuses the
    current or a cached root only for the same CR3 and role, and otherwise puts the root
    that falls out of the cache, so the next entry loads a new one.""",
    KernelCitation(X86_MMU, "kvm_mmu_new_pgd"),
    KernelCitation(X86_MMU, "cached_root_find_and_keep_current"),
    KernelCitation(X86_MMU, "mmu_alloc_shadow_roots"),
)
rule(
    "X18",
    "invariant",
    "x86-mmu",
    """A shadow page is looked up in the hash before one is made: among the pages that are
    not obsolete, no two shadow the same gfn with the same role. The parents, the rmaps and
    the write-tracking of one guest table all refer to its one shadow, which a sync or a
    zap of the gfn then finds.""",
    KernelCitation(X86_MMU, "kvm_mmu_find_shadow_page"),
    KernelCitation(X86_MMU, "__kvm_mmu_get_shadow_page"),
)

# --- Invariants: arm64 stage 2 (INVENTORY C.5, seed 001) ---------------------------------------

ARM64_PGTABLE = "arch/arm64/kvm/hyp/pgtable.c"
ARM64_MMU = "arch/arm64/kvm/mmu.c"

rule(
    "A1",
    "invariant",
    "arm64-stage2",
    """Break-before-make: a valid stage-2 descriptor is replaced by a valid one with another
    output address, memory type or kind (table or block) only through an invalid, LOCKED
    entry and a completed TLB invalidation covering it; permissions and the access flag may
    change in place.""",
    KernelCitation(ARM64_PGTABLE, "stage2_try_break_pte"),
    KernelCitation(ARM64_PGTABLE, "stage2_make_pte"),
    KernelCitation(ARM64_PGTABLE, "stage2_pte_needs_update"),
)
rule(
    "A2",
    "invariant",
    "arm64-stage2",
    """A LOCKED invalid entry belongs to the one walker that locked it: another shared walker
    gets EAGAIN and its fault is retried, a walker holding mmu_lock for write never meets
    one, and the hardware walker treats it as invalid (a translation fault).""",
    KernelCitation(ARM64_PGTABLE, "stage2_pte_is_locked"),
    KernelCitation(ARM64_PGTABLE, "stage2_try_break_pte"),
    SeedCitation(
        SEED_001,
        "Used to indicate a pte for which a 'break-before-make' sequence is in",
    ),
)
rule(
    "A3",
    "invariant",
    "arm64-stage2",
    """A table page's reference count is 1 plus its counted entries (valid ones, and invalid
    ones carrying an owner annotation); a table is unlinked and freed only when its count is
    1, so a freed table is never linked from the tree.""",
    KernelCitation(ARM64_PGTABLE, "stage2_pte_is_counted"),
    KernelCitation(ARM64_PGTABLE, "stage2_unmap_walker"),
)
rule(
    "A4",
    "invariant",
    "arm64-stage2",
    """A block mapping sits only at a level that allows blocks, with its IPA and output
    address aligned to its size, wholly inside one memslot whose gpa and hva agree modulo
    that size; a dirty-logged slot is mapped with pages only. On device memory (a VM_PFNMAP
    VMA) a fault maps the largest block that also lies wholly inside the VMA, its physical
    address agreeing with the hva modulo the block. (Kernel finding of the model,
    tests/test_arm64_blocks.py: get_vma_page_shift tests the block's end as ALIGN(hva) <=
    vm_end, which holds for any hva on a block boundary, so a device VMA smaller than a
    block that starts on the boundary, in a slot spanning the block, gets the whole block:
    the guest reaches physical memory past what the VMM mapped.)""",
    KernelCitation(ARM64_PGTABLE, "kvm_block_mapping_supported"),
    KernelCitation(ARM64_MMU, "fault_supports_stage2_huge_mapping"),
    KernelCitation(ARM64_MMU, "get_vma_page_shift"),
    KernelCitation(ARM64_MMU, "user_mem_abort"),
)
rule(
    "A5",
    "invariant",
    "arm64-stage2",
    """A cacheable mapping is installed only after its memory was cleaned and invalidated to
    the point of coherency (unless FEAT_S2FWB), and an executable one only after the
    instruction cache was invalidated for it.""",
    KernelCitation(ARM64_PGTABLE, "stage2_map_walker_try_leaf"),
    KernelCitation(ARM64_PGTABLE, "stage2_attr_walker"),
)
rule(
    "A6",
    "invariant",
    "arm64-stage2",
    """Device memory is never mapped executable at stage 2: such a request is refused, and an
    execution fault on device memory is not resolved by mapping it.""",
    KernelCitation(ARM64_PGTABLE, "stage2_set_prot_attr"),
    KernelCitation(ARM64_MMU, "user_mem_abort"),
)
rule(
    "A7",
    "invariant",
    "arm64-stage2",
    """Write-protection and aging issue no TLB invalidation inside the page-table walk; the
    caller flushes (the memslot flush for dirty logging, the notifier's clear_flush_young)
    before relying on the change, so a stale writable or young TLB entry is allowed only
    until then.""",
    KernelCitation(ARM64_PGTABLE, "kvm_pgtable_stage2_wrprotect"),
    KernelCitation(ARM64_PGTABLE, "kvm_pgtable_stage2_test_clear_young"),
    KernelCitation(ARM64_MMU, "kvm_mmu_wp_memory_region"),
)
rule(
    "A8",
    "invariant",
    "arm64-stage2",
    """A stage-2 walk under mmu_lock never allocates: every table page it installs comes from
    the vCPU's memory cache, which the fault path fills before taking the lock whenever the
    fault may need a new table. (Known kernel finding, tests/test_arm64_memcache.py: the
    fault path fills the cache for translation faults and for write faults while dirty
    logging, but an execution permission fault on a write-protected block of a dirty-logged
    slot also maps a page in place of the block, so a vCPU whose cache is empty takes the
    table from it: a WARN in kvm_mmu_memory_cache_alloc, then an atomic allocation. It needs
    a CPU without DIC, where stage 2 grants execution only on an execution fault.)""",
    KernelCitation(ARM64_MMU, "user_mem_abort"),
    KernelCitation(KVM_MAIN, "kvm_mmu_memory_cache_alloc"),
    KernelCitation(ARM64_PGTABLE, "stage2_map_walk_leaf"),
)
rule(
    "S001-NO-LOST-UPDATE",
    "invariant",
    "arm64-stage2",
    """No software write to a stage-2 entry that was built from an earlier read of it undoes
    an update the hardware made in between: the dirty state of a DBM entry is never lost, and
    a walker that shares the tables (a lockless ager, a fault under the read lock) does not
    lose the access flag either, since it writes with compare-and-exchange. Only a walker
    holding mmu_lock for write may drop an access flag, which costs aging precision only.""",
    SeedCitation(
        SEED_001,
        "the latter clears the accessed bit atomically against both the hardware and other "
        "software page table walkers.",
    ),
    KernelCitation(ARM64_PGTABLE, "stage2_try_set_pte"),
    KernelCitation(ARM64_PGTABLE, "stage2_age_walker"),
)
rule(
    "S001-RCU-TABLES",
    "invariant",
    "arm64-stage2",
    """A table unlinked while shared walkers may be inside it is freed only after an RCU grace
    period, so no walker, software or hardware, reads a freed table page.""",
    SeedCitation(SEED_001, "The former protects KVM page tables from being freed"),
    KernelCitation(ARM64_MMU, "stage2_free_unlinked_table"),
    KernelCitation(ARM64_PGTABLE, "kvm_pgtable_stage2_free_unlinked"),
)
rule(
    "S001-FLUSH-ALL",
    "invariant",
    "arm64-stage2",
    """kvm_arch_flush_shadow_all, called when the VMM's address space is released, leaves no
    stage-2 translation behind: the host frees every page next, so a translation left in
    place would give the guest pages that belong to someone else.""",
    SeedCitation(SEED_001, "This entirely fails to uphold the exact expectations of the call."),
    KernelCitation(ARM64_MMU, "kvm_arch_flush_shadow_all"),
    KernelCitation(KVM_MAIN, "kvm_mmu_notifier_release"),
)

# --- Invariants: POWER Book3S HV (INVENTORY C.6, seed 000) -------------------------------------

PPC_RM_MMU = "arch/powerpc/kvm/book3s_hv_rm_mmu.c"
PPC_HV_MMU = "arch/powerpc/kvm/book3s_64_mmu_hv.c"
PPC_BOOK3S_64_H = "arch/powerpc/include/asm/kvm_book3s_64.h"

rule(
    "P1",
    "invariant",
    "ppc-hpt",
    """An HPTE changes only while its HVLOCK bit is held, and an rmap word only under its
    LOCK bit. A walk that holds an rmap lock only tries the HPTE lock; on failure it drops
    both and starts again, so the two orders cannot deadlock. No lock is left held when an
    operation ends.""",
    KernelCitation(PPC_BOOK3S_64_H, "try_lock_hpte"),
    KernelCitation(PPC_BOOK3S_64_H, "lock_rmap"),
    KernelCitation(PPC_HV_MMU, "kvm_unmap_rmapp"),
)
rule(
    "P2",
    "invariant",
    "ppc-hpt",
    """Reverse map: an rmap word is PRESENT exactly when its chain is not empty; chains are
    circular doubly linked lists of HPTE indices; every HPTE valid in hardware that maps RAM
    is on exactly one chain, that of its own gfn, and absent or MMIO entries are on none.""",
    KernelCitation(PPC_RM_MMU, "kvmppc_add_revmap_chain"),
    KernelCitation(PPC_RM_MMU, "remove_revmap_chain"),
    KernelCitation(PPC_HV_MMU, "kvmppc_unmap_hpte"),
    SeedCitation(SEED_000, "removing the hardware PTE from the reverse-mapping list for the page."),
)
rule(
    "P3",
    "invariant",
    "ppc-hpt",
    """Reference and change bits are never lost: when an HPTE is invalidated, its hardware R
    and C are read after the tlbie completed and folded into the guest's view of the entry,
    R into the rmap word, and C straight into the slot's dirty bitmap (v6.18 keeps no
    CHANGED bit in the rmap); a guest clearing C with H_CLEAR_MOD does not hide the write
    from the host's dirty log.""",
    KernelCitation(PPC_RM_MMU, "remove_revmap_chain"),
    KernelCitation(PPC_RM_MMU, "kvmppc_h_clear_mod"),
    KernelCitation(PPC_HV_MMU, "kvm_test_clear_dirty_npages"),
)
rule(
    "P4",
    "invariant",
    "ppc-hpt",
    """The guest's view: H_READ, H_REMOVE and H_BULK_REMOVE show an entry the guest entered
    as valid even while KVM keeps it absent, with the guest's own real address and the
    hardware's R and C; the hypervisor's software bits (HVLOCK, ABSENT, the reserved guest
    bits) and host addresses never reach the guest. A removal reports at least the R and C
    H_READ showed just before (exactly those of an absent entry). (Known kernel finding,
    tests/test_ppc_fault.py: for an absent entry H_READ merges the R and C of the hardware
    word, which kvmppc_unmap_hpte leaves behind when it harvests them into guest_rpte, while
    H_REMOVE and H_BULK_REMOVE report guest_rpte's. The two disagree after H_CLEAR_REF on an
    absent entry, and after an HPT resize, which gives a moved entry the guest_rpte it copied
    before the unmap harvested R and C: the guest loses a change it never cleared.)""",
    KernelCitation(PPC_RM_MMU, "kvmppc_h_read"),
    KernelCitation(PPC_RM_MMU, "kvmppc_do_h_remove"),
    KernelCitation(PPC_RM_MMU, "kvmppc_h_bulk_remove"),
    KernelCitation(PPC_HV_MMU, "kvmppc_unmap_hpte"),
    KernelCitation(PPC_HV_MMU, "resize_hpt_rehash_hpte"),
)
rule(
    "P5",
    "invariant",
    "ppc-hpt",
    """An HPTE valid in hardware maps a page the host has resident at the gfn's address, and
    was made valid only if no MMU-notifier invalidation raced the lookup (the sequence check
    under the rmap lock); otherwise H_ENTER or the fault stores it ABSENT and the guest's
    access traps to the hypervisor.""",
    KernelCitation(PPC_RM_MMU, "kvmppc_do_h_enter"),
    KernelCitation(PPC_HV_MMU, "kvmppc_book3s_hv_page_fault"),
    SeedCitation(
        SEED_000,
        "the hypervisor can choose whether or not to have the hardware PTE point to a real "
        "page of memory; if it doesn't, access by the guest will trap to the hypervisor.",
    ),
)
rule(
    "P6",
    "invariant",
    "ppc-hpt",
    """The tlbie for an invalidated HPTE (or, with the radix MMU, a cleared or write-protected
    leaf) completes before its page can be reused and before its R and C are harvested or
    reported: once an operation ends, no vCPU's TLB caches a translation that the tables no
    longer hold, or with more rights than they give.""",
    KernelCitation(PPC_RM_MMU, "do_tlbies"),
    KernelCitation(PPC_RM_MMU, "kvmppc_invalidate_hpte"),
    KernelCitation("arch/powerpc/kvm/book3s_64_mmu_radix.c", "kvmppc_radix_tlbie_page"),
)
rule(
    "P7",
    "invariant",
    "ppc-hpt",
    """An HPTE for emulated MMIO is kept ABSENT with key 31 and never becomes valid in
    hardware; the per-vCPU MMIO lookup cache is trusted only for the current mmio_update
    count, so a memslot created under it is mapped as RAM on the next access. (Known
    kernel finding, tests/test_ppc_fault.py: the cache can outlive the entry it describes: a
    host invalidation after the slot's first access does not bump mmio_update, and a resize
    resets it to 0, so a stale entry can match again and RAM is emulated as MMIO.)""",
    KernelCitation(PPC_RM_MMU, "is_mmio_hpte"),
    KernelCitation(PPC_RM_MMU, "mmio_cache_search"),
)
rule(
    "P8",
    "invariant",
    "ppc-hpt",
    """H_PROTECT never makes a valid read-only HPTE writable in hardware; write permission
    comes back only through the fault path, after the host PTE was checked.""",
    KernelCitation(PPC_RM_MMU, "kvmppc_h_protect"),
)
rule(
    "P9",
    "invariant",
    "ppc-hpt",
    """An HPTE is writable in hardware only if the host PTE behind it is writable and the
    slot is not READONLY (which Book3S HV does not offer); otherwise H_ENTER makes it
    read-only while the guest's view keeps the rights it asked for.""",
    KernelCitation(PPC_RM_MMU, "kvmppc_do_h_enter"),
    KernelCitation(PPC_BOOK3S_64_H, "hpte_make_readonly"),
)
rule(
    "P10",
    "invariant",
    "ppc-hpt",
    """Resizing the HPT keeps exactly the BOLTED entries, rehashed into the new table; every
    other entry is dropped and its page unmapped.""",
    KernelCitation(PPC_HV_MMU, "resize_hpt_rehash_hpte"),
)
rule(
    "R1",
    "invariant",
    "ppc-radix",
    """With the radix MMU, a huge (2M or 1G) leaf is made only when the slot is not
    dirty-logged and gpa and hva agree modulo its size; the dirty harvest clears the dirty
    bit and completes the tlbie before it reports the page.""",
    KernelCitation("arch/powerpc/kvm/book3s_64_mmu_radix.c", "kvmppc_book3s_instantiate_page"),
    KernelCitation("arch/powerpc/kvm/book3s_64_mmu_radix.c", "kvm_radix_test_clear_dirty"),
)
rule(
    "S000-NO-HPTE-OUTSIDE-SLOTS",
    "invariant",
    "ppc-hpt",
    """No HPTE valid in hardware maps a gfn outside every usable (present, not INVALID)
    memslot: deleting or moving a slot first makes every hardware entry found through the
    slot's rmaps absent, with the slot still findable so the references can be removed.""",
    SeedCitation(SEED_000, "It removes all translations mapped via memslots."),
    SeedCitation(
        SEED_000,
        "So the reason for unmapping the hardware PTEs in kvm_arch_prepare_memory_region "
        "rather than kvm_arch_flush_shadow is that that way we know which memslot is going "
        "away.",
    ),
    KernelCitation(PPC_HV_MMU, "kvmppc_core_flush_memslot_hv"),
)


def normalize_thread_text(text: str) -> str:
    """Thread text as one line of words: quote markers (``>``) and comment stars (``*``) at
    the start of lines are dropped, so a quote can span wrapped lines."""
    words = []
    for line in text.splitlines():
        words.append(line.strip().lstrip(">* \t"))
    return " ".join(" ".join(words).split())
