"""The guest page-table walker: 4K, 2M and 1G leaves, 4 and 5 levels, the #PF error codes
(not present at each level, U/S, R/W with CR0.WP, NX with EFER.NXE, reserved bits and
MAXPHYADDR), A/D bits written exactly where the CPU writes them, the cmpxchg race with a
guest rewriting its tables, and a property against an independent dictionary model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.x86.guest_walk import (
    GuestWalker,
    PagingMode,
    WalkResult,
    X86Exception,
    walk_addr_generic,
)
from kvmspec.reference.x86.paging import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    pt_index,
    pt_level_shift,
)

P, W, U, A, D, NX = (
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    PT_USER_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT64_NX_MASK,
)
READ, WRITE, USER, FETCH = 0, PFERR_WRITE_MASK, PFERR_USER_MASK, PFERR_FETCH_MASK
GVA = 0x7F12_3456_7000  # indexes 254, 72, 179, 103 at levels 4..1
MODE = PagingMode()


@dataclass
class DictMemory:
    """Guest memory as a dictionary of 8-byte words (absent words read as zero), with gfns
    that no memslot covers and gfns in read-only memslots."""

    words: dict[int, int] = field(default_factory=dict)
    no_slot: set[int] = field(default_factory=set)
    readonly: set[int] = field(default_factory=set)
    writes: list[int] = field(default_factory=list)

    def read_u64(self, gpa: int) -> int | None:
        if gpa >> 12 in self.no_slot:
            return None
        return self.words.get(gpa, 0)

    def writable(self, gpa: int) -> bool:
        return gpa >> 12 not in self.readonly

    def cmpxchg_u64(self, gpa: int, old: int, new: int) -> bool | None:
        if gpa >> 12 in self.no_slot:
            return None
        if self.words.get(gpa, 0) != old:
            return False
        self.words[gpa] = new
        self.writes.append(gpa)
        return True


class PageTables:
    """Builds a guest's page tables in a DictMemory, one table page per new gfn from 0x100."""

    def __init__(self, mem: DictMemory, levels: int = 4) -> None:
        self.mem = mem
        self.levels = levels
        self.next_gfn = 0x100
        self.cr3 = self.alloc() << 12

    def alloc(self) -> int:
        self.next_gfn += 1
        return self.next_gfn - 1

    def entry_gpa(self, gva: int, level: int, table_flags: int = P | W | U) -> int:
        """Where the entry for ``gva`` at ``level`` lives, creating tables down to it."""
        table = self.cr3 >> 12
        for upper in range(self.levels, level, -1):
            gpa = table << 12 | pt_index(gva, upper) * 8
            if not self.mem.words.get(gpa, 0) & P:
                self.mem.words[gpa] = self.alloc() << 12 | table_flags
            table = (self.mem.words[gpa] & PT64_BASE_ADDR_MASK) >> 12
        return table << 12 | pt_index(gva, level) * 8

    def map(self, gva: int, gpa: int, level: int = PG_LEVEL_4K, flags: int = P | W | U) -> int:
        """Map the page of ``gva`` at ``level`` to ``gpa``; returns the leaf entry's gpa."""
        where = self.entry_gpa(gva, level)
        self.mem.words[where] = gpa | flags | (PT_PAGE_SIZE_MASK if level > PG_LEVEL_4K else 0)
        return where

    def entry(self, gva: int, level: int) -> int:
        return self.mem.words[self.entry_gpa(gva, level)]

    def update(self, gva: int, level: int, set_bits: int = 0, clear_bits: int = 0) -> None:
        where = self.entry_gpa(gva, level)
        self.mem.words[where] = (self.mem.words[where] | set_bits) & ~clear_bits


def walk(pt: PageTables, gva: int, access: int, mode: PagingMode = MODE) -> WalkResult:
    return run_to_completion(walk_addr_generic(pt.mem, mode, pt.cr3, gva, access))


def translation(result: WalkResult) -> GuestWalker:
    assert isinstance(result, GuestWalker), result
    return result


def page_fault(result: WalkResult) -> X86Exception:
    assert isinstance(result, X86Exception), result
    return result


def four_k() -> PageTables:
    pt = PageTables(DictMemory())
    pt.map(GVA, 0x5000)
    return pt


# -- Translations -------------------------------------------------------------------------------


def test_4k_read_sets_accessed_on_every_level_and_no_dirty() -> None:
    pt = four_k()
    result = translation(walk(pt, GVA | 0x123, READ))
    assert (result.gpa, result.level) == (0x5123, PG_LEVEL_4K)
    assert result.table_gfns == (0x100, 0x101, 0x102, 0x103)
    assert [step.level for step in result.steps] == [4, 3, 2, 1]
    # The leaf is clean, so the rights leave out W: the first write must fault (and set D).
    assert result.pte_access == ACC_USER_MASK | ACC_EXEC_MASK
    for level in (4, 3, 2, 1):
        assert pt.entry(GVA, level) & (A | D) == A
    assert result.dirtied_gfns == (0x100, 0x101, 0x102, 0x103)
    assert [step.pte for step in result.steps] == [pt.entry(GVA, lv) for lv in (4, 3, 2, 1)]


def test_write_sets_dirty_on_the_leaf_only_and_a_second_walk_writes_nothing() -> None:
    pt = four_k()
    result = translation(walk(pt, GVA, WRITE | USER))
    assert result.pte_access == ACC_USER_MASK | ACC_EXEC_MASK | ACC_WRITE_MASK
    assert [pt.entry(GVA, level) & (A | D) for level in (4, 3, 2, 1)] == [A, A, A, A | D]
    writes = len(pt.mem.writes)
    for access in (READ, WRITE, USER, FETCH):
        again = translation(walk(pt, GVA, access))
        assert again.dirtied_gfns == ()
    assert len(pt.mem.writes) == writes
    # The leaf is dirty now: a read may map it writable at once.
    assert translation(walk(pt, GVA, READ)).pte_access & ACC_WRITE_MASK


def test_a_walk_that_only_lacks_dirty_writes_only_the_leaf() -> None:
    pt = four_k()
    translation(walk(pt, GVA, READ))
    result = translation(walk(pt, GVA, WRITE))
    assert result.dirtied_gfns == (0x103,)


@pytest.mark.parametrize(
    ("level", "size", "walked"), [(PG_LEVEL_2M, 1 << 21, 3), (PG_LEVEL_1G, 1 << 30, 2)]
)
def test_huge_leaves(level: int, size: int, walked: int) -> None:
    pt = PageTables(DictMemory())
    base = 0x40000000
    pt.map(GVA, base, level)
    result = translation(walk(pt, GVA | 0xABC, WRITE))
    assert result.level == level and len(result.steps) == walked
    assert result.gpa == base + ((GVA | 0xABC) & (size - 1))
    assert pt.entry(GVA, level) & (A | D) == A | D


def test_five_levels() -> None:
    gva = 0x00AB_CDEF_1234_5000  # needs bits above 47: only 5-level paging reaches it
    mode = PagingMode(root_level=5)
    pt = PageTables(DictMemory(), levels=5)
    pt.map(gva, 0x9000)
    result = translation(walk(pt, gva, READ, mode))
    assert result.gpa == 0x9000 and len(result.steps) == 5
    with pytest.raises(ValueError, match="canonical"):
        walk(pt, gva, READ)  # with 4 levels the address is not canonical


def test_a_non_canonical_address_is_not_walked() -> None:
    with pytest.raises(ValueError, match="canonical"):
        walk(four_k(), 0x8000_0000_0000, READ)
    pt = PageTables(DictMemory())
    pt.map(0xFFFF_8000_0000_0000, 0x7000)
    assert translation(walk(pt, 0xFFFF_8000_0000_0000, READ)).gpa == 0x7000


# -- Page faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize(
    ("access", "error_code"),
    [(READ, 0), (WRITE | USER, WRITE | USER), (FETCH, PFERR_FETCH_MASK)],
)
def test_not_present_at_each_level(level: int, access: int, error_code: int) -> None:
    pt = four_k()
    pt.update(GVA, level, clear_bits=P)
    fault = page_fault(walk(pt, GVA, access))
    assert (fault.error_code, fault.level, fault.address) == (error_code, level, GVA)
    assert pt.mem.writes == []  # a failed walk sets no A bit


def test_a_table_page_without_memory_is_not_present() -> None:
    pt = four_k()
    pt.mem.no_slot.add(0x102)  # the level-2 table
    fault = page_fault(walk(pt, GVA, WRITE))
    assert (fault.error_code, fault.level) == (WRITE, 2)


@pytest.mark.parametrize(
    ("leaf_flags", "access", "mode", "error_code"),
    [
        # U/S: a user access to a supervisor page; supervisor accesses to user pages pass
        # (SMEP and SMAP are not modelled).
        (P | W, USER, MODE, PFERR_PRESENT_MASK | USER),
        (P | W, WRITE | USER, MODE, PFERR_PRESENT_MASK | WRITE | USER),
        (P | W | U, READ, MODE, None),
        # R/W: users always honour it, the supervisor only with CR0.WP.
        (P | U, WRITE | USER, MODE, PFERR_PRESENT_MASK | WRITE | USER),
        (P | U, WRITE, MODE, PFERR_PRESENT_MASK | WRITE),
        (P | U, WRITE, PagingMode(cr0_wp=False), None),
        (P | U, WRITE | USER, PagingMode(cr0_wp=False), PFERR_PRESENT_MASK | WRITE | USER),
        # NX: fetches fail with EFER.NXE; without it, bit 63 is reserved.
        (P | W | U | NX, FETCH, MODE, PFERR_PRESENT_MASK | PFERR_FETCH_MASK),
        (P | W | U | NX, READ, MODE, None),
        (P | W | U | NX, FETCH, PagingMode(efer_nx=False), PFERR_RSVD_MASK | PFERR_PRESENT_MASK),
        (P | W | U, FETCH, PagingMode(efer_nx=False), None),
    ],
)
def test_access_rights(
    leaf_flags: int, access: int, mode: PagingMode, error_code: int | None
) -> None:
    pt = PageTables(DictMemory())
    pt.map(GVA, 0x5000, flags=leaf_flags)
    result = walk(pt, GVA, access, mode)
    if error_code is None:
        assert translation(result).gpa == 0x5000
    else:
        assert page_fault(result).error_code == error_code


def test_rights_are_the_and_of_every_level() -> None:
    pt = four_k()
    pt.update(GVA, 3, clear_bits=W)
    pt.update(GVA, 2, set_bits=NX)
    assert page_fault(walk(pt, GVA, WRITE)).error_code == PFERR_PRESENT_MASK | WRITE
    assert page_fault(walk(pt, GVA, FETCH)).error_code == PFERR_PRESENT_MASK | FETCH
    assert translation(walk(pt, GVA, USER)).pte_access == ACC_USER_MASK
    pt.update(GVA, 4, clear_bits=U)
    assert page_fault(walk(pt, GVA, USER)).error_code == PFERR_PRESENT_MASK | USER


def test_supervisor_write_without_wp_sets_dirty_but_grants_no_w() -> None:
    pt = PageTables(DictMemory())
    pt.map(GVA, 0x5000, flags=P)
    result = translation(walk(pt, GVA, WRITE, PagingMode(cr0_wp=False)))
    assert pt.entry(GVA, 1) & D
    # The guest's tables do not grant W; the shadow MMU makes a supervisor-only writable
    # SPTE for this case itself.
    assert not result.pte_access & ACC_WRITE_MASK


RSVD = PFERR_RSVD_MASK | PFERR_PRESENT_MASK


@pytest.mark.parametrize(
    ("level", "bad_bits", "mode", "reserved"),
    [
        (1, 1 << 51, MODE, True),  # beyond MAXPHYADDR 48
        (1, 1 << 48, MODE, True),
        (1, 1 << 47, MODE, False),  # the highest address bit of a 48-bit machine
        (1, 1 << 51, PagingMode(maxphyaddr=52), False),
        (2, 1 << 40, PagingMode(maxphyaddr=40), True),  # a table pointer, too
        (4, PT_PAGE_SIZE_MASK, MODE, True),  # no huge pages at level 4
        (4, 1 << 8, MODE, False),
        (4, 1 << 8, PagingMode(amd=True), True),  # AMD reserves bit 8 of a PML4E...
        (3, 1 << 8, PagingMode(amd=True), False),  # ...but not of a PDPE (fixed in 2020)
        (1, 1 << 55, MODE, False),  # bits 62:52 are ignored (or protection keys)
    ],
)
def test_reserved_bits(level: int, bad_bits: int, mode: PagingMode, reserved: bool) -> None:
    pt = four_k()
    pt.update(GVA, level, set_bits=bad_bits)
    result = walk(pt, GVA, READ, mode)
    if reserved:
        fault = page_fault(result)
        assert (fault.error_code, fault.level) == (RSVD, level)
        assert pt.mem.writes == []
    else:
        translation(result)


@pytest.mark.parametrize(
    ("level", "bad_bits", "mode", "reserved"),
    [
        (PG_LEVEL_2M, 1 << 13, MODE, True),  # 20:13 are reserved in a 2M leaf
        (PG_LEVEL_2M, 1 << 20, MODE, True),
        (PG_LEVEL_2M, 1 << 12, MODE, False),  # its PAT bit
        (PG_LEVEL_1G, 1 << 29, MODE, True),
        (PG_LEVEL_1G, 1 << 12, MODE, False),
        (PG_LEVEL_1G, 0, PagingMode(gbpages=False), True),  # no 1G pages without pdpe1gb
    ],
)
def test_reserved_bits_of_huge_leaves(
    level: int, bad_bits: int, mode: PagingMode, reserved: bool
) -> None:
    pt = PageTables(DictMemory())
    pt.map(GVA, 0x4000_0000 | bad_bits, level)
    result = walk(pt, GVA, READ, mode)
    if reserved:
        assert page_fault(result).error_code == RSVD
    else:
        assert translation(result).gpa == 0x4000_0000 + (GVA & ((1 << pt_level_shift(level)) - 1))


# -- A/D updates against a concurrent guest --------------------------------------------------------


def test_read_only_memslot_tables_keep_their_bits() -> None:
    pt = four_k()
    pt.mem.readonly.add(0x102)  # the level-2 table is in ROM
    result = translation(walk(pt, GVA, WRITE))
    assert pt.entry(GVA, 2) & A == 0
    assert result.dirtied_gfns == (0x100, 0x101, 0x103)


def test_a_guest_write_between_read_and_update_restarts_the_walk() -> None:
    """The leaf is read, then (while the walker may sleep) another vCPU unmaps it: the
    compare-and-exchange that sets its A bit fails, the walk starts again and sees the
    entry gone. The upper levels' A bits were already set, and stay set."""
    pt = four_k()
    op = walk_addr_generic(pt.mem, MODE, pt.cr3, GVA, READ)
    points = []
    step = next(op)
    try:
        while True:
            points.append(step.point)
            if step.point.endswith("level 1 entry") and points.count(step.point) == 1:
                pt.update(GVA, 1, clear_bits=P)
            step = op.send(None)
    except StopIteration as done:
        result = done.value
    fault = page_fault(result)
    assert (fault.error_code, fault.level) == (0, 1)
    assert fault.dirtied_gfns == (0x100, 0x101, 0x102)
    assert points.count("guest walk: read the level 4 entry") == 2


def test_an_update_that_faults_fails_the_walk() -> None:
    pt = four_k()

    class FaultingWrites(DictMemory):
        def cmpxchg_u64(self, gpa: int, old: int, new: int) -> bool | None:
            return None

    mem = FaultingWrites(words=pt.mem.words)
    fault = page_fault(run_to_completion(walk_addr_generic(mem, MODE, pt.cr3, GVA, WRITE)))
    assert (fault.error_code, fault.dirtied_gfns) == (WRITE, ())


# -- Property: the walker against a dictionary of mappings --------------------------------------


@dataclass
class Mapping:
    """One page mapped in its own 1 GiB region: the leaf's rights and the rights of the
    region's level-3 entry (a table entry, unless the page is 1 GiB itself)."""

    region: int
    level: int
    offset: int  # of the page inside the region, in units of the page size
    gpa: int
    leaf: int  # W, U, NX bits
    upper: int

    @property
    def size(self) -> int:
        return 1 << pt_level_shift(self.level)

    @property
    def gva(self) -> int:
        return self.region << 30 | self.offset * self.size


RIGHTS = st.sampled_from([0, W, U, NX, W | U, W | NX, U | NX, W | U | NX])


@st.composite
def mappings(draw: st.DrawFn) -> list[Mapping]:
    regions = draw(st.lists(st.integers(0, 2047), min_size=1, max_size=6, unique=True))
    result = []
    for region in regions:
        level = draw(st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G]))
        pages_per_region = 1 << (30 - pt_level_shift(level))
        offset = draw(st.integers(0, pages_per_region - 1))
        frame = draw(st.integers(0, (1 << (40 - pt_level_shift(level))) - 1))
        upper = draw(RIGHTS) if level < PG_LEVEL_1G else W | U
        result.append(
            Mapping(region, level, offset, frame << pt_level_shift(level), draw(RIGHTS), upper)
        )
    return result


def expected_outcome(
    maps: list[Mapping], mode: PagingMode, gva: int, access: int
) -> tuple[int | None, Mapping | None]:
    """(error code or None, the mapping that translates gva), from first principles."""
    write, user, fetch = access & WRITE, access & USER, access & FETCH
    fetch_bit = FETCH if fetch and mode.efer_nx else 0
    hit = next((m for m in maps if m.gva <= gva < m.gva + m.size), None)
    region = next((m for m in maps if m.region == gva >> 30), None)
    if region is None:
        return write | user | fetch_bit, None  # nothing at level 3: not present
    # Level 3 is read first: NX there is a reserved bit when EFER.NXE is off.
    if not mode.efer_nx and region.upper & NX:
        return RSVD | write | user, None
    if hit is None:
        return write | user | fetch_bit, None
    if not mode.efer_nx and hit.leaf & NX:
        return RSVD | write | user, None
    rights = hit.leaf & hit.upper & (W | U)
    no_exec = (hit.leaf | hit.upper) & NX
    refused = (
        (user and not rights & U)
        or (write and not rights & W and (user or mode.cr0_wp))
        or (fetch and mode.efer_nx and no_exec)
    )
    if refused:
        return PFERR_PRESENT_MASK | write | user | fetch_bit, None
    return None, hit


@given(
    maps=mappings(),
    cr0_wp=st.booleans(),
    efer_nx=st.booleans(),
    accesses=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(0, (1 << 30) - 1),
            st.sampled_from([READ, WRITE, FETCH]),
            st.booleans(),
        ),
        max_size=20,
    ),
)
def test_walks_agree_with_a_dictionary_of_mappings(
    maps: list[Mapping],
    cr0_wp: bool,
    efer_nx: bool,
    accesses: list[tuple[int, int, int, bool]],
) -> None:
    mode = PagingMode(cr0_wp=cr0_wp, efer_nx=efer_nx)
    pt = PageTables(DictMemory())
    for m in maps:
        if m.level < PG_LEVEL_1G:
            level3 = pt.entry_gpa(m.gva, PG_LEVEL_1G)
            pt.mem.words[level3] = pt.alloc() << 12 | P | m.upper
        pt.map(m.gva, m.gpa, m.level, P | m.leaf)
    accessed: set[int] = set()
    dirty: set[int] = set()

    for which, offset, kind, user in accesses:
        # Half the accesses go near a mapped page, the rest anywhere in the low half.
        gva = maps[which].gva + offset % (1 << 22) if which < len(maps) else offset << 17
        access = kind | (USER if user else 0)
        error_code, hit = expected_outcome(maps, mode, gva, access)
        result = walk(pt, gva, access, mode)
        if error_code is not None:
            assert page_fault(result).error_code == error_code
            continue
        assert hit is not None
        done = translation(result)
        assert done.gpa == hit.gpa + (gva - hit.gva)
        accessed.add(hit.gva)
        if kind == WRITE:
            dirty.add(hit.gva)
        writable = bool(hit.leaf & hit.upper & W) and hit.gva in dirty
        assert bool(done.pte_access & ACC_WRITE_MASK) == writable

    # The CPU's bookkeeping, as the guest sees it in its own tables.
    for m in maps:
        leaf = pt.entry(m.gva, m.level)
        assert bool(leaf & A) == (m.gva in accessed)
        assert bool(leaf & D) == (m.gva in dirty)
        if m.level < PG_LEVEL_1G:
            assert bool(pt.entry(m.gva, PG_LEVEL_1G) & A) == (m.gva in accessed)
