"""The generic-layer state machine: Hypothesis drives the
:class:`~kvmspec.fuzz.generic_harness.GenericHarness`.

Each rule draws the arguments of one harness action and calls it; each precondition is the
harness's own. Starting an actor and stepping one are separate rules, so Hypothesis explores
the interleavings of memslot updates, page faults, MADV_DONTNEED and the dirty-log ioctls,
and shrinks a failure to the shortest schedule. The harness's log lines become Hypothesis
``note`` lines, so a failure prints what each actor did, step by step; after every rule the
harness checks every rule it knows (see :mod:`kvmspec.fuzz.generic_harness`).
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.generic_decoder import Argument, SetUp, encode
from kvmspec.fuzz.generic_harness import (
    DIRTY_MODES,
    PROT_NAMES,
    REGION_PAGES,
    SLOT_IDS,
    SLOT_PAGES,
    VCPUS,
    GenericHarness,
)
from kvmspec.spec.platforms import PlatformProfile

SLOTS = st.sampled_from(SLOT_IDS)
SLOT_PAGE = st.integers(0, SLOT_PAGES - 1)
HOST_PAGE = st.integers(0, REGION_PAGES - 1)
VCPU = st.sampled_from(VCPUS)


class GenericMachine(RuleBasedStateMachine):
    profile: PlatformProfile

    def __init__(self) -> None:
        super().__init__()
        self.harness = GenericHarness(self.profile, log=note)
        # Every harness call, as fuzz_generic's decoder would read it, so that a failure can
        # be written out as an input that ./fuzz/fuzz_generic.py replays.
        self.set_up_args = SetUp(DIRTY_MODES[0], False)
        self.calls: list[tuple[str, tuple[Argument, ...]]] = []

    def _do(self, method: str, *args: Argument) -> None:
        self.calls.append((method, args))
        getattr(self.harness, method)(*args)

    def _step(self, method: str, name: str) -> None:
        """An actor step; the decoder names the actor by its place among those in flight."""
        self.calls.append((method, (list(self.harness.scheduler.actors).index(name),)))
        getattr(self.harness, method)(name)

    @initialize(mode=st.sampled_from(DIRTY_MODES), logged=st.booleans())
    def set_up(self, mode: str, logged: bool) -> None:
        self.set_up_args = SetUp(mode, logged)
        self.harness.set_up(mode, logged)

    # -- memslot updates and faults as actors ---------------------------------------------------

    @precondition(lambda self: self.harness.can_start())
    @rule(slot_id=SLOTS, where=st.integers(0, 1), action=st.integers(0, 2))
    def start_memslot_update(self, slot_id: int, where: int, action: int) -> None:
        self._do("start_memslot_update", slot_id, where, action)

    @precondition(lambda self: self.harness.can_start())
    @rule(slot_id=SLOTS)
    def start_toggle_logging(self, slot_id: int) -> None:
        self._do("start_toggle_logging", slot_id)

    @precondition(lambda self: self.harness.can_start())
    @rule(slot_id=SLOTS, page=SLOT_PAGE, write=st.booleans(), vcpu_id=VCPU)
    def start_fault(self, slot_id: int, page: int, write: bool, vcpu_id: int) -> None:
        self._do("start_fault", slot_id, page, write, vcpu_id)

    @precondition(lambda self: self.harness.can_step())
    @rule(data=st.data())
    def step_an_actor(self, data: st.DataObject) -> None:
        self._step("step_actor", data.draw(st.sampled_from(self.harness.scheduler.runnable())))

    @precondition(lambda self: self.harness.can_step())
    @rule(data=st.data())
    def finish_an_actor(self, data: st.DataObject) -> None:
        self._step("finish_actor", data.draw(st.sampled_from(self.harness.scheduler.runnable())))

    # -- dirty logging ------------------------------------------------------------------------

    @precondition(lambda self: self.harness.can_get_dirty_log())
    @rule(slot_id=SLOTS)
    def start_get_dirty_log(self, slot_id: int) -> None:
        self._do("start_get_dirty_log", slot_id)

    @precondition(lambda self: self.harness.can_clear_dirty_log())
    @rule(slot_id=SLOTS, mask=st.integers(0, (1 << SLOT_PAGES) - 1))
    def start_clear_dirty_log(self, slot_id: int, mask: int) -> None:
        self._do("start_clear_dirty_log", slot_id, mask)

    @precondition(lambda self: self.harness.can_harvest_ring())
    @rule(vcpu_id=VCPU)
    def harvest_ring(self, vcpu_id: int) -> None:
        self._do("harvest_ring", vcpu_id)

    @precondition(lambda self: self.harness.can_reset_dirty_rings())
    @rule()
    def start_reset_dirty_rings(self) -> None:
        self._do("start_reset_dirty_rings")

    @precondition(lambda self: self.harness.can_save_its_tables())
    @rule(slot_id=SLOTS, page=SLOT_PAGE)
    def save_its_tables(self, slot_id: int, page: int) -> None:
        self._do("save_its_tables", slot_id, page)

    # -- the host -----------------------------------------------------------------------------

    @rule(page=HOST_PAGE, value=st.integers(1, 255))
    def host_write(self, page: int, value: int) -> None:
        self._do("host_write", page, value)

    @precondition(lambda self: self.harness.can_start())
    @rule(page=HOST_PAGE)
    def start_madvise_dontneed(self, page: int) -> None:
        self._do("start_madvise_dontneed", page)

    @precondition(lambda self: bool(self.harness.resolved()))
    @rule(data=st.data())
    def drop_a_page_under_a_fault(self, data: st.DataObject) -> None:
        hva = data.draw(st.sampled_from(self.harness.resolved()))
        self.calls.append(("drop_a_page_under_a_fault", (self.harness.resolved().index(hva),)))
        self.harness.drop_a_page_under_a_fault(hva)

    @precondition(lambda self: self.harness.can_remap())
    @rule(page=HOST_PAGE, prot=st.sampled_from(sorted(PROT_NAMES)))
    def mprotect(self, page: int, prot: int) -> None:
        self._do("mprotect", page, prot)

    @precondition(lambda self: self.harness.can_remap())
    @rule(page=HOST_PAGE)
    def munmap(self, page: int) -> None:
        self._do("munmap", page)

    @rule(page=HOST_PAGE)
    def migrate(self, page: int) -> None:
        self._do("migrate", page)

    @rule(page=HOST_PAGE, flush=st.booleans())
    def age(self, page: int, flush: bool) -> None:
        self._do("age", page, flush)

    @rule(page=HOST_PAGE)
    def reclaim(self, page: int) -> None:
        self._do("reclaim", page)

    # -- the guest ----------------------------------------------------------------------------

    @rule(
        slot_id=SLOTS,
        where=st.integers(0, 1),
        page=SLOT_PAGE,
        value=st.integers(0, 255),
        vcpu_id=VCPU,
    )
    def guest_access(self, slot_id: int, where: int, page: int, value: int, vcpu_id: int) -> None:
        self._do("guest_access", slot_id, where, page, value, vcpu_id)

    # -- the rules, after every step ------------------------------------------------------------

    def teardown(self) -> None:
        # A failure keeps the schedule (which actor ran which step) and, beside it, the
        # whole run as an input of fuzz/fuzz_generic.py, which replays it with its report.
        machines.record_run(
            self.harness.checks,
            self.harness.scheduler.schedule,
            ".schedule.txt",
            encode(self.set_up_args, self.calls),
        )

    @invariant()
    def rules_hold(self) -> None:
        self.harness.check()


def generic_machine(profile: PlatformProfile) -> type[GenericMachine]:
    return type(f"GenericMachine[{profile.name}]", (GenericMachine,), {"profile": profile})
