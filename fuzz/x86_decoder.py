"""Bytes to x86 shadow-MMU harness actions, for the Atheris fuzzer (``fuzz/fuzz_x86.py``).

A :class:`~kvmspec.fuzz.decoder.Chooser` (raw bytes through
:class:`~kvmspec.fuzz.decoder.BytesChooser`) answers every question. The first answer picks
the VM's layout (:data:`~kvmspec.fuzz.x86_layouts.LAYOUTS`); then each action is one answer
for its kind, from the layout's fixed table (:data:`KINDS`), and one answer per argument,
each from that argument's fixed tuple of values in :mod:`kvmspec.fuzz.x86_harness` (or
:mod:`kvmspec.fuzz.x86_huge_harness`): a byte means the same whatever the state, so a
mutation of one byte changes one decision.

New kinds of action go at the end of their table (and new values at the end of their
tuple): an answer is taken modulo the number of choices, so older inputs, the seeds
included, keep their meaning.

The decoder rejects (never calls) an action the state does not allow, after reading all of
its arguments: in the ``huge`` layout, a data access or MADV_DONTNEED naming a page that is a
guest page table (:meth:`~kvmspec.fuzz.x86_huge_harness.HugeHarness.is_data_page`).
:attr:`Rejected.why` says which rule rejected it, and the driver counts them.

``python -m kvmspec.fuzz.x86_decoder seeds`` rebuilds ``corpus/seeds/x86/`` from
:data:`SEED_SCENARIOS` with :func:`encode`, the decoder's inverse.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmspec.fuzz.atheris_support import seeds_command, write_seed_inputs
from kvmspec.fuzz.decoder import Chooser, pick
from kvmspec.fuzz.harness_fuzzing import Action, Rejected, Step, answer, encode_steps
from kvmspec.fuzz.x86_harness import (
    BOOLS,
    BYTES,
    DATA_GFN,
    DATA_PAGE_INDEXES,
    DATA_SLOT_PLACES,
    DONTNEED_PAGES,
    HOST_WRITE_SIZES,
    MMU_PAGE_LIMITS,
    NO_SLOT_GFN,
    NX,
    OFFSETS,
    PD,
    PDPT,
    PML4,
    PML4_2,
    PML4S,
    REMAP_TARGETS,
    RESTRICTIONS,
    STRADDLED_PAGES,
    UNUSED_ENTRIES,
    UPPER_TABLES,
    VCPUS,
    U,
    W,
)
from kvmspec.fuzz.x86_huge_harness import (
    HUGE_PAGES,
    HUGE_PML4S,
    PD_B,
    PD_C,
    PML4_B,
    PML4_C,
    TABLES_IN_THE_HUGE_PAGE,
    HugeHarness,
)
from kvmspec.fuzz.x86_layouts import LAYOUTS, SHADOW_LAYOUTS

Argument = int | None
SEEDS = Path(__file__).resolve().parents[1] / "corpus" / "seeds" / "x86"


@dataclass(frozen=True)
class Kind:
    """One kind of action: the harness method it calls, each argument's name and values
    (one choice each), and whether an argument named ``i`` must be a data page."""

    method: str
    params: tuple[tuple[str, Sequence[Argument]], ...] = ()
    data_page: bool = False


SHADOW_KINDS: tuple[Kind, ...] = (
    Kind("set_quirk", (("quirk", BOOLS),)),
    # Guest accesses and table writes are what reach the shadow MMU: two entries each.
    Kind("guest_read", (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("offset", OFFSETS))),
    Kind("guest_read", (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("offset", OFFSETS))),
    Kind("guest_write", (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("byte", BYTES))),
    Kind("guest_write", (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("byte", BYTES))),
    Kind(
        "guest_remap",
        (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("to", REMAP_TARGETS), ("clean", BOOLS)),
    ),
    Kind(
        "guest_remap",
        (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("to", REMAP_TARGETS), ("clean", BOOLS)),
    ),
    Kind(
        "guest_clear_unused_upper_entries",
        (("vcpu", VCPUS), ("table", UPPER_TABLES), ("index", UNUSED_ENTRIES)),
    ),
    Kind("switch_cr3", (("vcpu", VCPUS), ("pml4", PML4S))),
    Kind("host_write", (("i", DATA_PAGE_INDEXES), ("value", BYTES), ("size", HOST_WRITE_SIZES))),
    Kind("madvise_dontneed", (("i", DATA_PAGE_INDEXES), ("n", DONTNEED_PAGES))),
    Kind("change_data_slot", (("where", DATA_SLOT_PLACES),)),
    Kind("invlpg", (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES))),
    # Seed 004: host page migration, of a data page and of KVM's APIC-access page, and guest
    # accesses to the APIC-access page. Appended, so that older inputs keep their meaning.
    Kind("migrate_page", (("i", DATA_PAGE_INDEXES),)),
    Kind("migrate_apic_page"),
    Kind("guest_read_apic", (("vcpu", VCPUS), ("offset", OFFSETS))),
    Kind("guest_write_apic", (("vcpu", VCPUS), ("byte", BYTES))),
    Kind(
        "guest_read_alias",
        (("vcpu", VCPUS), ("entry", UNUSED_ENTRIES), ("i", DATA_PAGE_INDEXES), ("offset", OFFSETS)),
    ),
    Kind(
        "guest_read_pt_as_pd",
        (("vcpu", VCPUS), ("entry", UNUSED_ENTRIES), ("i", DATA_PAGE_INDEXES), ("offset", OFFSETS)),
    ),
    Kind(
        "guest_remap_misaligned",
        (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("to", REMAP_TARGETS)),
    ),
    Kind("guest_restrict", (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("bit", RESTRICTIONS))),
    Kind("release"),
    Kind("set_mmu_page_limit", (("pages", MMU_PAGE_LIMITS),)),
    Kind(
        "guest_remap_straddling",
        (("vcpu", VCPUS), ("i", STRADDLED_PAGES), ("to", DATA_PAGE_INDEXES)),
    ),
    Kind("guest_context_switch", (("vcpu", VCPUS), ("pml4", PML4S), ("i", DATA_PAGE_INDEXES))),
    Kind(
        "guest_remap_off_by_one",
        (("vcpu", VCPUS), ("i", DATA_PAGE_INDEXES), ("to", REMAP_TARGETS)),
    ),
)
"""The ``shadow`` layout's actions (:class:`~kvmspec.fuzz.x86_harness.ShadowHarness`)."""

HUGE_KINDS: tuple[Kind, ...] = (
    Kind("switch_cr3", (("vcpu", VCPUS), ("pml4", HUGE_PML4S))),
    Kind("guest_read", (("vcpu", VCPUS), ("i", HUGE_PAGES), ("offset", OFFSETS)), True),
    Kind("guest_read", (("vcpu", VCPUS), ("i", HUGE_PAGES), ("offset", OFFSETS)), True),
    Kind("guest_write", (("vcpu", VCPUS), ("i", HUGE_PAGES), ("byte", BYTES)), True),
    Kind("guest_write", (("vcpu", VCPUS), ("i", HUGE_PAGES), ("byte", BYTES)), True),
    Kind(
        "guest_write_table_in_the_huge_page",
        (
            ("vcpu", VCPUS),
            ("table", TABLES_IN_THE_HUGE_PAGE),
            ("entry", UNUSED_ENTRIES),
            ("emulatable", BOOLS),
        ),
    ),
    Kind("guest_remap_2m", (("vcpu", VCPUS), ("huge", BOOLS))),
    Kind("host_thp", (("collapse", BOOLS),)),
    Kind("host_khugepaged_or_dontneed", (("i", HUGE_PAGES),), True),
    Kind("toggle_log", (("log", BOOLS),)),
    Kind("harvest"),
    Kind("migrate_page", (("i", HUGE_PAGES),)),
    # Appended, so that older inputs keep their meaning.
    Kind("reclaim", (("i", HUGE_PAGES),), True),
    Kind("manual_protect_initially_set"),
    Kind("clear_dirty_log", (("i", HUGE_PAGES),)),
)
"""The ``huge`` layout's actions (:class:`~kvmspec.fuzz.x86_huge_harness.HugeHarness`)."""

KINDS = {"shadow": SHADOW_KINDS, "huge": HUGE_KINDS}
"""What one answer chooses between, by harness class. An action's arguments follow its kind's
answer."""


def layout_kinds(layout: str) -> tuple[Kind, ...]:
    """The actions of ``layout``: the ``mmio`` layout is the ``shadow`` VM with MMIO caching
    on, and has its actions."""
    return KINDS["shadow" if layout in SHADOW_LAYOUTS else layout]


def decode_layout(chooser: Chooser) -> str:
    """The run's layout: the first answer."""
    return pick(chooser, LAYOUTS)


def decode_action(chooser: Chooser, layout: str) -> Action | Rejected:
    """The next action of a ``layout`` run, as the chooser's answers describe it, or why it
    is rejected."""
    kind = pick(chooser, layout_kinds(layout))
    args = tuple((name, pick(chooser, values)) for name, values in kind.params)
    if kind.data_page:
        page = dict(args)["i"]
        assert page is not None
        if not HugeHarness.is_data_page(page):
            return Rejected(kind.method, "a table page", f"page {page} is a guest page table")
    return Action(kind.method, args)


# ---------------------------------------------------------------------------------------------
# The inverse, for seeds
# ---------------------------------------------------------------------------------------------


def encode(layout: str, steps: Iterable[Step]) -> bytes:
    """The bytes that :func:`decode_layout` then :func:`decode_action` read as ``layout``
    and ``steps`` (a method and its argument values each, in the table's order)."""
    return answer(LAYOUTS, layout) + encode_steps(layout_kinds(layout), steps)


WRITE_PROTECT_FAILS = False  # guest_write_table_in_the_huge_page's emulatable argument

SEED_SCENARIOS: dict[str, tuple[str, tuple[Step, ...]]] = {
    "shadow-pte-rewrite": (
        "shadow",
        (
            ("host_write", (0, 0x11, 8)),
            ("host_write", (1, 0x22, 8)),
            ("guest_read", (0, 0, 0)),
            ("guest_remap", (0, 0, DATA_GFN + 1, False)),
            ("guest_read", (1, 0, 0)),
            ("guest_remap", (0, 0, NO_SLOT_GFN, True)),
            ("guest_read", (0, 0, 0)),
            ("guest_remap", (1, 0, None, False)),
            ("guest_read", (0, 0, 0)),
        ),
    ),
    "shadow-page-limit": (
        "shadow",
        (
            ("guest_read", (0, 0, 0)),
            ("switch_cr3", (1, PML4_2)),
            ("guest_read", (1, 1, 0)),
            ("set_mmu_page_limit", (MMU_PAGE_LIMITS[0],)),  # the oldest non-roots go now
            ("guest_write", (0, 2, 5)),  # each fault recycles: fewer than 5 pages are left
            ("guest_read", (1, 2, 5)),
            ("guest_read_apic", (0, 0)),
            ("set_mmu_page_limit", (MMU_PAGE_LIMITS[1],)),
            ("guest_write", (1, 3, 7)),
            ("change_data_slot", (None,)),  # a DELETE sets the memslot default again
            ("guest_read", (0, 3, 0)),
        ),
    ),
    "shadow-five-processes": (
        "shadow",
        (
            ("guest_read", (0, 0, 0)),
            *(("guest_context_switch", (0, pml4, i)) for i, pml4 in enumerate(PML4S[1:])),
            ("guest_context_switch", (0, PML4, 4)),  # no cached root fits: one is put
            ("guest_context_switch", (1, PML4S[-1], 5)),
            ("guest_context_switch", (0, PML4S[-1], 6)),  # the other vCPU's root, shared
        ),
    ),
    "shadow-unsync-met-on-the-way": (
        "shadow",
        (
            ("guest_write", (0, 1, 5)),
            ("guest_restrict", (0, 1, W)),  # the PT goes unsync; W cleared
            ("invlpg", (0, 1)),  # the sync takes W from the SPTE
            ("guest_read", (0, 1, 0)),
            ("guest_remap", (0, 1, DATA_GFN + 1, False)),  # W given back
            ("invlpg", (0, 1)),  # FNAME(sync_spte) remakes a writable SPTE
            ("guest_remap", (0, 2, DATA_GFN + 3, False)),
            ("guest_read_alias", (0, 100, 0, 0)),  # a lookup meets the unsync PT: synced
            ("guest_read_pt_as_pd", (0, 101, 0, 0)),  # as a directory: zapped in the lookup
            ("guest_read", (0, 1, 0)),
            ("guest_remap_off_by_one", (0, 0, DATA_GFN + 5)),  # emulated: the PT is tracked
            ("guest_read", (0, 1, 0)),
        ),
    ),
    "shadow-fast-zap": (
        "shadow",
        (
            ("guest_write", (0, 2, 7)),
            ("guest_read", (1, 2, 0)),
            ("change_data_slot", (None,)),
            ("guest_read", (0, 2, 0)),
            ("change_data_slot", (DATA_GFN,)),
            ("guest_read", (1, 2, 0)),
            ("set_quirk", (False,)),
            ("change_data_slot", (64,)),
            ("guest_read", (0, 2, 0)),
        ),
    ),
    "shadow-cr3-and-flooding": (
        "shadow",
        (
            ("guest_read", (0, 3, 16)),
            ("switch_cr3", (0, PML4_2)),
            ("guest_write", (0, 3, 9)),
            ("guest_clear_unused_upper_entries", (1, PDPT, 100)),
            ("switch_cr3", (0, PML4)),
            ("guest_clear_unused_upper_entries", (0, PD, 101)),
            ("guest_read", (1, 3, 9)),
            ("guest_clear_unused_upper_entries", (0, PML4, 100)),
            ("guest_write", (1, 4, 1)),
        ),
    ),
    "shadow-notifier-zaps": (
        "shadow",
        (
            ("guest_write", (0, 5, 5)),
            ("guest_read", (1, 6, 0)),
            ("madvise_dontneed", (5, 3)),
            ("guest_read", (0, 5, 0)),
            ("host_write", (6, 0x66, 4)),
            ("guest_read", (1, 6, 0)),
        ),
    ),
    "shadow-unsync-invlpg": (
        "shadow",
        (
            ("host_write", (0, 0x11, 8)),
            ("host_write", (1, 0x22, 8)),
            ("guest_read", (0, 0, 0)),
            ("guest_read", (1, 0, 0)),
            ("guest_remap", (0, 0, DATA_GFN + 1, False)),
            ("guest_read", (0, 0, 0)),
            ("invlpg", (0, 0)),
            ("guest_read", (0, 0, 0)),
            ("guest_read", (1, 0, 0)),
            ("guest_remap", (1, 1, NO_SLOT_GFN, True)),
            ("switch_cr3", (1, PML4_2)),
            ("guest_read", (1, 1, 0)),
            ("guest_write", (0, 0, 5)),
            ("switch_cr3", (0, PML4)),
            ("guest_read", (1, 0, 0)),
        ),
    ),
    "shadow-unsync-alias": (
        "shadow",
        (
            ("host_write", (0, 0x11, 8)),
            ("host_write", (1, 0x22, 8)),
            ("guest_read", (0, 0, 0)),
            ("guest_remap", (0, 0, DATA_GFN + 1, False)),  # the PT goes unsync
            ("guest_read_alias", (0, 100, 7, 0)),  # a new path to it syncs it first
            ("guest_remap", (1, 2, NO_SLOT_GFN, True)),
            ("guest_read_alias", (0, 101, 2, 8)),
            ("guest_read", (0, 0, 0)),
            ("guest_remap", (0, 1, DATA_GFN + 3, False)),
            ("guest_read_pt_as_pd", (0, 102, 1, 16)),  # the PT as a PD: its unsync page goes
            ("guest_read", (1, 1, 0)),
            ("guest_remap_misaligned", (1, 0, DATA_GFN + 4)),  # emulated: zaps the PT's pages
            ("invlpg", (0, 1)),
            ("guest_read", (0, 1, 0)),
            ("guest_restrict", (0, 2, W)),
            ("guest_write", (0, 2, 9)),  # the guest's own page fault (kept: no flush yet)
            ("guest_restrict", (1, 3, U)),
            ("switch_cr3", (1, PML4)),
            ("guest_read", (1, 3, 0)),
            ("guest_restrict", (0, 4, NX)),
            ("guest_read", (0, 4, 8)),
        ),
    ),
    "huge-seed-002": (
        "huge",
        (
            ("guest_write", (0, 0, 1)),
            ("switch_cr3", (1, PML4_B)),
            ("guest_read", (1, 0, 0)),
            ("guest_read", (0, 5, 0)),
            ("guest_write_table_in_the_huge_page", (0, PD_B, 100, WRITE_PROTECT_FAILS)),
            ("switch_cr3", (0, PML4_C)),
            ("guest_write_table_in_the_huge_page", (0, PD_C, 101, WRITE_PROTECT_FAILS)),
            ("guest_write_table_in_the_huge_page", (1, PD_C, 102, True)),
        ),
    ),
    "huge-logging-and-thp": (
        "huge",
        (
            ("guest_read", (0, 20, 8)),
            ("toggle_log", (True,)),
            ("guest_write", (0, 21, 3)),
            ("guest_write", (1, 40, 4)),
            ("harvest", ()),
            ("toggle_log", (False,)),
            ("host_thp", (False,)),
            ("guest_read", (0, 21, 0)),
            ("host_khugepaged_or_dontneed", (33,)),
            ("host_khugepaged_or_dontneed", (64,)),
            ("host_thp", (True,)),
            ("guest_remap_2m", (0, False)),
            ("guest_write", (0, 64, 2)),
            ("guest_remap_2m", (1, True)),
            ("guest_read", (1, 64, 0)),
        ),
    ),
    "shadow-seed-004-migration": (
        "shadow",
        (
            ("guest_write", (0, 3, 7)),
            ("guest_read_apic", (0, 0)),
            ("guest_write_apic", (1, 9)),
            ("migrate_apic_page", ()),
            ("guest_read_apic", (1, 8)),
            ("guest_read_apic", (0, 9)),
            ("migrate_page", (3,)),
            ("guest_read", (1, 3, 0)),
            ("migrate_page", (4,)),
            ("migrate_apic_page", ()),
            ("guest_write_apic", (0, 3)),
            ("guest_read", (0, 3, 7)),
        ),
    ),
    "huge-migration": (
        "huge",
        (
            ("guest_write", (0, 20, 5)),
            ("migrate_page", (20,)),
            ("guest_read", (1, 20, 0)),
            ("host_thp", (False,)),
            ("guest_read", (0, 21, 0)),
            ("migrate_page", (21,)),
            ("guest_write", (1, 21, 6)),
            ("migrate_page", (PD_B,)),
            ("switch_cr3", (0, PML4_B)),
            ("guest_read", (0, 21, 6)),
        ),
    ),
    "mmio-caching-and-release": (
        "mmio",
        (
            ("guest_remap", (0, 0, NO_SLOT_GFN, False)),
            ("guest_read", (0, 0, 0)),  # an MMIO SPTE for the gfn without a slot
            ("guest_read", (0, 0, 8)),  # the fast path: handle_mmio_page_fault
            ("guest_write", (1, 0, 5)),
            ("change_data_slot", (None,)),  # the fast zap drops the MMIO SPTE with its page
            ("guest_read", (0, 1, 0)),
            ("guest_write", (1, 1, 3)),
            ("change_data_slot", (DATA_GFN,)),  # CREATE: the MMIO SPTE is stale
            ("guest_read", (0, 1, 0)),  # faulted into the slot
            ("guest_read", (1, 0, 16)),
            ("release", ()),  # kvm_mmu_zap_all, then a new VM
            ("guest_read", (0, 0, 0)),
        ),
    ),
    "mmio-sync-finding-let-pass": (
        "mmio",
        (
            ("change_data_slot", (None,)),
            ("guest_write", (0, 0, 9)),  # an MMIO SPTE for the data gfn
            ("change_data_slot", (DATA_GFN,)),  # stale now
            ("guest_remap_misaligned", (1, 0, DATA_GFN)),  # the PT goes unsync
            ("invlpg", (0, 0)),  # FNAME(sync_spte) remakes it current: the known finding
            ("guest_read", (0, 0, 0)),  # the VMM gets the load, let pass
            ("guest_write", (1, 0, 7)),
            ("switch_cr3", (1, PML4_2)),
            ("guest_read", (1, 0, 8)),
            ("change_data_slot", (64,)),  # MOVE: the zap ends it
            ("guest_read", (0, 0, 0)),
        ),
    ),
}
"""Seed inputs: each becomes ``corpus/seeds/x86/<name>.bin``."""


def write_seeds(folder: Path = SEEDS) -> list[Path]:
    """(Re)write the seed corpus from :data:`SEED_SCENARIOS`."""
    inputs = {name: encode(layout, steps) for name, (layout, steps) in SEED_SCENARIOS.items()}
    return write_seed_inputs(folder, inputs)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmspec.fuzz.x86_decoder seeds``: rebuild the seed corpus."""
    return seeds_command("kvmspec.fuzz.x86_decoder", write_seeds, argv)


if __name__ == "__main__":
    sys.exit(main())
