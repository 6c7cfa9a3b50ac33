"""The POWER Book3S HV state machine: Hypothesis drives the harness of
:mod:`kvmspec.fuzz.ppc_harness`.

Each rule draws the arguments of one harness action from the tuples of values the Atheris
decoder (:mod:`kvmspec.fuzz.ppc_decoder`) reads too, most of them defined by the harness,
and calls it; after every rule the harness checks the HPT invariants, the MMIO cache, the
guest's view, what accesses and harvests observed, and the resize rule. The harness's log
lines become Hypothesis ``note`` lines. A failing run keeps its actions as a trace for the
campaign and, beside them, the whole run as an input of ``fuzz/fuzz_ppc.py`` (every call
encodes, since its values are the decoder's), which ``./fuzz/fuzz_ppc.py FILE`` replays
with its report.
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.harness_fuzzing import Step
from kvmspec.fuzz.ppc_decoder import EXACTS, SLOTS, Argument, encode
from kvmspec.fuzz.ppc_harness import (
    AGINGS,
    BOOLS,
    EA_INDEXES,
    GFN_INDEXES,
    INVALID_HCALLS,
    KNOWN_KERNEL_FINDINGS,
    ORDERS,
    RACE_STEPS,
    RACERS,
    REMOVE_HOWS,
    SLOT1_PLACES,
    SLOT_PAGE_INDEXES,
    VCPUS,
    PpcHarness,
)
from kvmspec.spec.platforms import PPC64_HV, PlatformProfile

EA = st.sampled_from(EA_INDEXES)
GFN = st.sampled_from(GFN_INDEXES)
VCPU = st.sampled_from(VCPUS)
BOOL = st.sampled_from(BOOLS)
SLOT = st.sampled_from(SLOTS)
PAGE_INDEX = st.sampled_from(SLOT_PAGE_INDEXES)


class PpcMachine(RuleBasedStateMachine):
    profile: PlatformProfile = PPC64_HV
    tolerated: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.harness: PpcHarness | None = None
        self.calls: list[Step] = []

    def _do(self, method: str, *args: Argument) -> None:
        self.calls.append((method, args))
        assert self.harness is not None
        getattr(self.harness, method)(*args)

    @initialize()
    def set_up(self) -> None:
        self.harness = PpcHarness(self.profile, log=note, tolerated=self.tolerated)

    # -- the guest's hypercalls -----------------------------------------------------------------

    @rule(
        ea=EA,
        gfn=GFN,
        writable=BOOL,
        bolted=BOOL,
        secondary=BOOL,
        exact=st.sampled_from(EXACTS),
    )
    def h_enter(
        self, ea: int, gfn: int, writable: bool, bolted: bool, secondary: bool, exact: int
    ) -> None:
        self._do("h_enter", ea, gfn, writable, bolted, secondary, exact)

    @rule(ea=EA, gfn=GFN)
    def h_enter_racing_dontneed(self, ea: int, gfn: int) -> None:
        self._do("h_enter_racing_dontneed", ea, gfn)

    @rule(ea=EA, how=st.sampled_from(REMOVE_HOWS))
    def h_remove(self, ea: int, how: int) -> None:
        self._do("h_remove", ea, how)

    @rule(eas=st.lists(EA, max_size=4).map(tuple))
    def h_bulk_remove(self, eas: tuple[int, ...]) -> None:
        self._do("h_bulk_remove", eas)

    @rule(ea=EA, writable=BOOL)
    def h_protect(self, ea: int, writable: bool) -> None:
        self._do("h_protect", ea, writable)

    @rule(ea=EA, four=BOOL)
    def h_read(self, ea: int, four: bool) -> None:
        self._do("h_read", ea, four)

    @rule(ea=EA, mod=BOOL)
    def h_clear_ref_or_mod(self, ea: int, mod: bool) -> None:
        self._do("h_clear_ref_or_mod", ea, mod)

    # -- guest accesses -----------------------------------------------------------------------

    @rule(ea=EA, how=st.sampled_from(REMOVE_HOWS))
    def h_bulk_remove_cond(self, ea: int, how: int) -> None:
        self._do("h_bulk_remove_cond", ea, how)

    @rule(call=st.sampled_from(INVALID_HCALLS))
    def h_invalid(self, call: str) -> None:
        self._do("h_invalid", call)

    @rule(vcpu=VCPU, ea=EA, write=BOOL)
    def guest_access(self, vcpu: int, ea: int, write: bool) -> None:
        self._do("guest_access", vcpu, ea, write)

    @rule(
        vcpu=VCPU,
        ea=EA,
        write=BOOL,
        steps=st.sampled_from(RACE_STEPS),
        racer=st.sampled_from(RACERS),
    )
    def guest_access_racing(self, vcpu: int, ea: int, write: bool, steps: int, racer: str) -> None:
        self._do("guest_access_racing", vcpu, ea, write, steps, racer)

    # -- the host -------------------------------------------------------------------------------

    @rule(slot=SLOT, page=PAGE_INDEX)
    def host_dontneed(self, slot: int, page: int) -> None:
        self._do("host_dontneed", slot, page)

    @rule(slot=SLOT, page=PAGE_INDEX)
    def host_write(self, slot: int, page: int) -> None:
        self._do("host_write", slot, page)

    @rule(slot=SLOT, page=PAGE_INDEX, writable=BOOL)
    def host_mprotect(self, slot: int, page: int, writable: bool) -> None:
        self._do("host_mprotect", slot, page, writable)

    @rule(page=PAGE_INDEX)
    def host_munmap(self, page: int) -> None:
        self._do("host_munmap", page)

    @rule(slot=SLOT)
    def host_ages(self, slot: int) -> None:
        self._do("host_ages", slot)

    @rule(slot=SLOT, page=PAGE_INDEX, how=st.sampled_from(AGINGS))
    def host_ages_page(self, slot: int, page: int, how: str) -> None:
        self._do("host_ages_page", slot, page, how)

    # -- the VMM ----------------------------------------------------------------------------------

    @rule(where=st.sampled_from(SLOT1_PLACES))
    def change_slot1(self, where: int | None) -> None:
        self._do("change_slot1", where)

    @rule(logged=BOOL)
    def toggle_slot1_log(self, logged: bool) -> None:
        self._do("toggle_slot1_log", logged)

    @rule()
    def get_dirty_log(self) -> None:
        self._do("get_dirty_log")

    @rule(order=st.sampled_from(ORDERS))
    def resize_prepare(self, order: int) -> None:
        self._do("resize_prepare", order)

    @rule()
    def resize_work(self) -> None:
        self._do("resize_work")

    @rule(order=st.sampled_from(ORDERS))
    def resize_commit(self, order: int) -> None:
        self._do("resize_commit", order)

    @rule(move=BOOL, ea=EA, gfn=GFN)
    def hcalls_while_slot1_invalid(self, move: bool, ea: int, gfn: int) -> None:
        self._do("hcalls_while_slot1_invalid", move, ea, gfn)

    # -- the rules, after every step ------------------------------------------------------------

    @invariant()
    def rules_hold(self) -> None:
        if self.harness is not None:
            self.harness.check()

    def teardown(self) -> None:
        if self.harness is None:
            return  # the run stopped before its set-up
        # fuzz_ppc judges ppc64-hv letting the known findings pass: only such a run replays.
        replayable = self.profile == PPC64_HV and self.tolerated == KNOWN_KERNEL_FINDINGS
        machines.record_run(
            self.harness.checks,
            [f"{method}{args!r}" for method, args in self.calls],
            ".actions.txt",
            encode(self.calls) if replayable else None,
        )


def ppc_machine(
    profile: PlatformProfile = PPC64_HV, tolerated: tuple[str, ...] = KNOWN_KERNEL_FINDINGS
) -> type[PpcMachine]:
    """The machine on ``profile`` (a ppc64 HPT profile), letting the ``tolerated`` known
    kernel findings pass (by default the stale MMIO cache, which it finds within a few
    hundred steps)."""
    name = f"PpcMachine[{profile.name}]"
    return type(name, (PpcMachine,), {"profile": profile, "tolerated": tolerated})
