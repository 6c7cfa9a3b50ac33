"""The x86 shadow-MMU state machine: Hypothesis drives the harnesses of
:mod:`kvmspec.fuzz.x86_harness` and :mod:`kvmspec.fuzz.x86_huge_harness`.

The machine first picks a layout (``shadow``, ``mmio`` or ``huge``, of those it was built for), then
each rule draws the arguments of one of that layout's harness actions, from the same tuples
of values the Atheris decoder reads, and calls it; after every rule the harness checks every
shadow invariant and that guest accesses see what the host holds. The harness's log lines
become Hypothesis ``note`` lines. Every call is also recorded as fuzz_x86's decoder would
read it, so that a campaign failure is kept as an input that ``./fuzz/fuzz_x86.py FILE``
replays with its report.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.harness_fuzzing import Step
from kvmspec.fuzz.x86_decoder import Argument, encode
from kvmspec.fuzz.x86_harness import (
    BYTES,
    DATA_PAGE_INDEXES,
    DATA_SLOT_PLACES,
    DONTNEED_PAGES,
    HOST_WRITE_SIZES,
    MMU_PAGE_LIMITS,
    OFFSETS,
    PML4S,
    REMAP_TARGETS,
    RESTRICTIONS,
    STRADDLED_PAGES,
    UNUSED_ENTRIES,
    UPPER_TABLES,
    VCPUS,
)
from kvmspec.fuzz.x86_huge_harness import (
    HUGE_PAGES,
    HUGE_PML4S,
    TABLES_IN_THE_HUGE_PAGE,
    HugeHarness,
)
from kvmspec.fuzz.x86_layouts import LAYOUTS, SHADOW_LAYOUTS, X86Harness, make_harness
from kvmspec.spec.platforms import PlatformProfile

VCPU = st.sampled_from(VCPUS)
OFFSET = st.sampled_from(OFFSETS)
BYTE = st.sampled_from(BYTES)
DATA_PAGE = st.sampled_from(DATA_PAGE_INDEXES)
HUGE_DATA_PAGE = st.sampled_from(HUGE_PAGES).filter(HugeHarness.is_data_page)


def _shadow(machine: X86Machine) -> bool:
    return machine.layout in SHADOW_LAYOUTS


def _huge(machine: X86Machine) -> bool:
    return machine.layout == "huge"


class X86Machine(RuleBasedStateMachine):
    profile: PlatformProfile
    layouts: Sequence[str]

    def __init__(self) -> None:
        super().__init__()
        self.layout = ""
        self.harness: X86Harness
        self.calls: list[Step] = []

    def _do(self, method: str, *args: Argument) -> None:
        self.calls.append((method, args))
        getattr(self.harness, method)(*args)

    @initialize(data=st.data())
    def set_up(self, data: st.DataObject) -> None:
        self.layout = data.draw(st.sampled_from(self.layouts), label="layout")
        self.harness = make_harness(self.layout, self.profile, log=note)

    # -- the shadow layout --------------------------------------------------------------------

    @precondition(_shadow)
    @rule(quirk=st.booleans())
    def set_quirk(self, quirk: bool) -> None:
        self._do("set_quirk", quirk)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE, offset=OFFSET)
    def guest_read(self, vcpu: int, i: int, offset: int) -> None:
        self._do("guest_read", vcpu, i, offset)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE, byte=BYTE)
    def guest_write(self, vcpu: int, i: int, byte: int) -> None:
        self._do("guest_write", vcpu, i, byte)

    @precondition(_shadow)
    @rule(vcpu=VCPU, entry=st.sampled_from(UNUSED_ENTRIES), i=DATA_PAGE, offset=OFFSET)
    def guest_read_alias(self, vcpu: int, entry: int, i: int, offset: int) -> None:
        self._do("guest_read_alias", vcpu, entry, i, offset)

    @precondition(_shadow)
    @rule(vcpu=VCPU, entry=st.sampled_from(UNUSED_ENTRIES), i=DATA_PAGE, offset=OFFSET)
    def guest_read_pt_as_pd(self, vcpu: int, entry: int, i: int, offset: int) -> None:
        self._do("guest_read_pt_as_pd", vcpu, entry, i, offset)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE, to=st.sampled_from(REMAP_TARGETS), clean=st.booleans())
    def guest_remap(self, vcpu: int, i: int, to: int | None, clean: bool) -> None:
        self._do("guest_remap", vcpu, i, to, clean)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE, bit=st.sampled_from(RESTRICTIONS))
    def guest_restrict(self, vcpu: int, i: int, bit: int) -> None:
        self._do("guest_restrict", vcpu, i, bit)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE, to=st.sampled_from(REMAP_TARGETS))
    def guest_remap_misaligned(self, vcpu: int, i: int, to: int | None) -> None:
        self._do("guest_remap_misaligned", vcpu, i, to)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE, to=st.sampled_from(REMAP_TARGETS))
    def guest_remap_off_by_one(self, vcpu: int, i: int, to: int | None) -> None:
        self._do("guest_remap_off_by_one", vcpu, i, to)

    @precondition(_shadow)
    @rule(vcpu=VCPU, table=st.sampled_from(UPPER_TABLES), index=st.sampled_from(UNUSED_ENTRIES))
    def guest_clear_unused_upper_entries(self, vcpu: int, table: int, index: int) -> None:
        self._do("guest_clear_unused_upper_entries", vcpu, table, index)

    @precondition(_shadow)
    @rule(vcpu=VCPU, pml4=st.sampled_from(PML4S))
    def switch_cr3(self, vcpu: int, pml4: int) -> None:
        self._do("switch_cr3", vcpu, pml4)

    @precondition(_shadow)
    @rule(vcpu=VCPU, pml4=st.sampled_from(PML4S), i=DATA_PAGE)
    def guest_context_switch(self, vcpu: int, pml4: int, i: int) -> None:
        self._do("guest_context_switch", vcpu, pml4, i)

    @precondition(_shadow)
    @rule(i=DATA_PAGE, value=BYTE, size=st.sampled_from(HOST_WRITE_SIZES))
    def host_write(self, i: int, value: int, size: int) -> None:
        self._do("host_write", i, value, size)

    @precondition(_shadow)
    @rule(i=DATA_PAGE, n=st.sampled_from(DONTNEED_PAGES))
    def madvise_dontneed(self, i: int, n: int) -> None:
        self._do("madvise_dontneed", i, n)

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=DATA_PAGE)
    def invlpg(self, vcpu: int, i: int) -> None:
        self._do("invlpg", vcpu, i)

    @precondition(_shadow)
    @rule(where=st.sampled_from(DATA_SLOT_PLACES))
    def change_data_slot(self, where: int | None) -> None:
        self._do("change_data_slot", where)

    @precondition(_shadow)
    @rule(i=DATA_PAGE)
    def migrate_page(self, i: int) -> None:
        self._do("migrate_page", i)

    @precondition(_shadow)
    @rule()
    def migrate_apic_page(self) -> None:
        self._do("migrate_apic_page")

    @precondition(_shadow)
    @rule(vcpu=VCPU, offset=OFFSET)
    def guest_read_apic(self, vcpu: int, offset: int) -> None:
        self._do("guest_read_apic", vcpu, offset)

    @precondition(_shadow)
    @rule(vcpu=VCPU, byte=BYTE)
    def guest_write_apic(self, vcpu: int, byte: int) -> None:
        self._do("guest_write_apic", vcpu, byte)

    @precondition(_shadow)
    @rule()
    def release(self) -> None:
        self._do("release")

    @precondition(_shadow)
    @rule(vcpu=VCPU, i=st.sampled_from(STRADDLED_PAGES), to=DATA_PAGE)
    def guest_remap_straddling(self, vcpu: int, i: int, to: int) -> None:
        self._do("guest_remap_straddling", vcpu, i, to)

    @precondition(_shadow)
    @rule(pages=st.sampled_from(MMU_PAGE_LIMITS))
    def set_mmu_page_limit(self, pages: int) -> None:
        self._do("set_mmu_page_limit", pages)

    # -- the huge layout ----------------------------------------------------------------------

    @precondition(_huge)
    @rule(vcpu=VCPU, pml4=st.sampled_from(HUGE_PML4S))
    def huge_switch_cr3(self, vcpu: int, pml4: int) -> None:
        self._do("switch_cr3", vcpu, pml4)

    @precondition(_huge)
    @rule(vcpu=VCPU, i=HUGE_DATA_PAGE, offset=OFFSET)
    def huge_guest_read(self, vcpu: int, i: int, offset: int) -> None:
        self._do("guest_read", vcpu, i, offset)

    @precondition(_huge)
    @rule(vcpu=VCPU, i=HUGE_DATA_PAGE, byte=BYTE)
    def huge_guest_write(self, vcpu: int, i: int, byte: int) -> None:
        self._do("guest_write", vcpu, i, byte)

    @precondition(_huge)
    @rule(
        vcpu=VCPU,
        table=st.sampled_from(TABLES_IN_THE_HUGE_PAGE),
        entry=st.sampled_from(UNUSED_ENTRIES),
        emulatable=st.booleans(),
    )
    def guest_write_table_in_the_huge_page(
        self, vcpu: int, table: int, entry: int, emulatable: bool
    ) -> None:
        self._do("guest_write_table_in_the_huge_page", vcpu, table, entry, emulatable)

    @precondition(_huge)
    @rule(vcpu=VCPU, huge=st.booleans())
    def guest_remap_2m(self, vcpu: int, huge: bool) -> None:
        self._do("guest_remap_2m", vcpu, huge)

    @precondition(_huge)
    @rule(collapse=st.booleans())
    def host_thp(self, collapse: bool) -> None:
        self._do("host_thp", collapse)

    @precondition(_huge)
    @rule(i=HUGE_DATA_PAGE)
    def host_khugepaged_or_dontneed(self, i: int) -> None:
        self._do("host_khugepaged_or_dontneed", i)

    @precondition(_huge)
    @rule(log=st.booleans())
    def toggle_log(self, log: bool) -> None:
        self._do("toggle_log", log)

    @precondition(_huge)
    @rule()
    def harvest(self) -> None:
        self._do("harvest")

    @precondition(_huge)
    @rule()
    def manual_protect_initially_set(self) -> None:
        self._do("manual_protect_initially_set")

    @precondition(_huge)
    @rule(i=st.sampled_from(HUGE_PAGES))
    def clear_dirty_log(self, i: int) -> None:
        self._do("clear_dirty_log", i)

    @precondition(_huge)
    @rule(i=st.sampled_from(HUGE_PAGES))
    def huge_migrate_page(self, i: int) -> None:
        self._do("migrate_page", i)

    @precondition(_huge)
    @rule(i=HUGE_DATA_PAGE)
    def huge_reclaim(self, i: int) -> None:
        self._do("reclaim", i)

    # -- the rules, after every step ------------------------------------------------------------

    @invariant()
    def rules_hold(self) -> None:
        self.harness.check()

    def teardown(self) -> None:
        if not self.layout:
            return  # the run stopped before its set-up
        # A failure keeps the actions and, beside them, the whole run as an input of
        # fuzz/fuzz_x86.py, which replays it with its report.
        actions = (f"{method}{args!r}" for method, args in self.calls)
        machines.record_run(
            self.harness.checks,
            [f"layout {self.layout}", *actions],
            ".actions.txt",
            encode(self.layout, self.calls),
        )


def x86_machine(profile: PlatformProfile, layouts: Sequence[str] = LAYOUTS) -> type[X86Machine]:
    """The machine on ``profile`` (x86 on the shadow MMU), starting from one of ``layouts``."""
    name = f"X86Machine[{profile.name}, {'+'.join(layouts)}]"
    return type(name, (X86Machine,), {"profile": profile, "layouts": tuple(layouts)})
