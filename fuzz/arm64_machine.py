"""The arm64 state machine: Hypothesis drives the harness of :mod:`kvmspec.fuzz.arm64_harness`.

A run first picks the VM's configuration: v6.18's aging under mmu_lock or seed 001's
lockless ager, hardware access-flag updates (FEAT_HAFDBS) or access-flag faults, eager
splitting off or in 2 MiB chunks, and dirty logging get-and-clear or with manual protection
(the bitmap starting clear or all set). Each rule then draws the arguments of one harness action
from the tuples the Atheris decoder (:mod:`kvmspec.fuzz.arm64_decoder`) reads too, most of
them exported by the harness, and calls it; after every rule the harness checks every
stage-2 invariant, the memslot invariants, the stage 2 against the slots and the host, and
what the VMM observes. The harness's log lines become Hypothesis ``note`` lines. A failing
run keeps its actions as a trace for the campaign and, beside them, the whole run as an
input of ``fuzz/fuzz_arm64.py`` (when its MMU is one the decoder can name), which
``./fuzz/fuzz_arm64.py FILE`` replays with its report.
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.arm64_decoder import (
    AGING,
    MMU_CLASSES,
    ORDER_LENGTH,
    SPLIT_CHUNKS,
    THP_SLOTS,
    Argument,
    Setup,
    encode,
)
from kvmspec.fuzz.arm64_harness import (
    BLOCK_DEVICE_PAGES,
    BOOLS,
    BYTES,
    CLEAR_MASKS,
    CLEAR_WORDS,
    DIRTY_MODES,
    DONTNEED_PAGES,
    FRAMES,
    HPAGE,
    KINDS,
    OFFSETS,
    ORDER_STEPS,
    PAGES,
    PROTS,
    READ_KINDS,
    SHIFTED_PLACES,
    SLOT_IDS,
    THP_SLOT,
    UNBACKED,
    VCPUS,
    Arm64Harness,
)
from kvmspec.fuzz.arm64_harness import PAGE as PAGE_SIZE
from kvmspec.fuzz.harness_fuzzing import Step
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.spec.platforms import ARM64, PlatformProfile

VCPU = st.sampled_from(VCPUS)
SLOT = st.sampled_from(SLOT_IDS)
PAGE = st.sampled_from(PAGES)
BYTE = st.sampled_from(BYTES)


class Arm64Machine(RuleBasedStateMachine):
    profile: PlatformProfile
    mmu_classes: tuple[type[Arm64Mmu], ...]

    def __init__(self) -> None:
        super().__init__()
        self.harness: Arm64Harness | None = None
        self.setup = Setup()
        self.calls: list[Step] = []

    @property
    def vm(self) -> Arm64Harness:
        assert self.harness is not None, "the run has not been set up"
        return self.harness

    def _do(self, method: str, *args: Argument) -> None:
        self.calls.append((method, args))
        getattr(self.vm, method)(*args)

    @initialize(data=st.data())
    def set_up(self, data: st.DataObject) -> None:
        cls = data.draw(st.sampled_from(self.mmu_classes), label="mmu")
        hardware_af = data.draw(st.booleans(), label="hardware AF")
        split = data.draw(st.sampled_from(SPLIT_CHUNKS), label="split chunk")
        mode = data.draw(st.sampled_from(DIRTY_MODES), label="dirty logging")
        self.setup = Setup(cls, hardware_af, split, mode)
        note(str(self.setup))
        self.harness = self.setup.harness(self.profile, note)

    # -- the guest ------------------------------------------------------------------------------

    @rule(
        vcpu=VCPU,
        slot=SLOT,
        page=PAGE,
        offset=st.sampled_from(OFFSETS),
        kind=st.sampled_from(READ_KINDS),
    )
    def guest_read(self, vcpu: int, slot: int, page: int, offset: int, kind: str) -> None:
        self._do("guest_read", vcpu, slot, page, offset, kind)

    @rule(vcpu=VCPU, slot=SLOT, page=PAGE, byte=BYTE)
    def guest_store(self, vcpu: int, slot: int, page: int, byte: int) -> None:
        self._do("guest_store", vcpu, slot, page, byte)

    @rule(vcpu=VCPU, where=st.sampled_from(sorted(UNBACKED)), kind=st.sampled_from(KINDS))
    def guest_unbacked(self, vcpu: int, where: str, kind: str) -> None:
        self._do("guest_unbacked", vcpu, where, kind)

    @rule(
        order=st.lists(st.sampled_from(ORDER_STEPS), max_size=ORDER_LENGTH).map(tuple),
        page=PAGE,
        other=PAGE,
        store=st.booleans(),
    )
    def interleave(self, order: tuple[int, ...], page: int, other: int, store: bool) -> None:
        self._do("interleave", order, page, other, store)

    @rule(vcpu=VCPU, slot=SLOT, page=PAGE, value=BYTE)
    def race_fault_with_dontneed(self, vcpu: int, slot: int, page: int, value: int) -> None:
        self._do("race_fault_with_dontneed", vcpu, slot, page, value)

    # -- the host -------------------------------------------------------------------------------

    @rule(slot=SLOT, page=PAGE, value=BYTE)
    def host_write(self, slot: int, page: int, value: int) -> None:
        self._do("host_write", slot, page, value)

    @rule(slot=SLOT, page=PAGE, n=st.sampled_from(DONTNEED_PAGES))
    def madvise_dontneed(self, slot: int, page: int, n: int) -> None:
        self._do("madvise_dontneed", slot, page, n)

    @rule(slot=SLOT, page=PAGE, prot=st.sampled_from(PROTS))
    def mprotect(self, slot: int, page: int, prot: int) -> None:
        self._do("mprotect", slot, page, prot)

    @rule(slot=SLOT, page=PAGE)
    def munmap(self, slot: int, page: int) -> None:
        self._do("munmap", slot, page)

    @rule(
        slot=st.sampled_from(THP_SLOTS),
        frame=st.sampled_from(FRAMES),
        collapse=st.sampled_from(BOOLS),
    )
    def thp(self, slot: int, frame: int, collapse: bool) -> None:
        self._do("thp", slot, frame, collapse)

    @rule(vcpu=VCPU, frame=st.sampled_from(FRAMES), byte=BYTE)
    def block_then_toggle_log(self, vcpu: int, frame: int, byte: int) -> None:
        """Four actions in a row that the rules above rarely line up by chance: the guest
        stores to a 2 MiB frame of slot 0, the host collapses the frame into a THP, the
        guest loads from it (a stage-2 block maps it now), and dirty logging is switched
        (on: the block is write-protected and, with a split chunk, split eagerly; off: the
        next fault may map a block again). Every rule is checked after each of them."""
        # The first and the last page of the frame that the decoder can name (PAGES).
        pages = [p for p in PAGES if p * PAGE_SIZE // HPAGE == frame]
        stored, loaded = pages[0], pages[-1]
        steps: tuple[tuple[str, tuple[Argument, ...]], ...] = (
            ("guest_store", (vcpu, THP_SLOT, stored, byte)),
            ("thp", (THP_SLOT, frame, True)),
            ("guest_read", (vcpu, THP_SLOT, loaded, 0, "load")),
            ("toggle_log", (THP_SLOT,)),
        )
        for method, args in steps:
            self._do(method, *args)
            self.vm.check()

    @rule(vcpu=VCPU, frame=st.sampled_from(FRAMES), byte=BYTE)
    def collapse_after_logging(self, vcpu: int, frame: int, byte: int) -> None:
        self._do("collapse_after_logging", vcpu, frame, byte)

    @rule(vcpu=VCPU, page=st.sampled_from(BLOCK_DEVICE_PAGES), kind=st.sampled_from(KINDS))
    def device_block_access(self, vcpu: int, page: int, kind: str) -> None:
        self._do("device_block_access", vcpu, page, kind)

    @rule(slot=SLOT, page=PAGE, how=st.sampled_from(AGING))
    def age(self, slot: int, page: int, how: str) -> None:
        self._do("age", slot, page, how)

    @rule()
    def release(self) -> None:
        self._do("release")

    # -- memslots and dirty logging -------------------------------------------------------------

    @rule(place=st.sampled_from(SHIFTED_PLACES), readonly=st.sampled_from(BOOLS))
    def place_shifted_slot(self, place: int | None, readonly: bool) -> None:
        self._do("place_shifted_slot", place, readonly)

    @rule(slot=SLOT)
    def toggle_log(self, slot: int) -> None:
        self._do("toggle_log", slot)

    @rule(slot=SLOT)
    def get_dirty_log(self, slot: int) -> None:
        self._do("get_dirty_log", slot)

    @rule(slot=SLOT, word=st.sampled_from(CLEAR_WORDS), mask=st.sampled_from(CLEAR_MASKS))
    def clear_dirty_log(self, slot: int, word: int, mask: int) -> None:
        self._do("clear_dirty_log", slot, word, mask)

    # -- the rules, after every step ------------------------------------------------------------

    @invariant()
    def rules_hold(self) -> None:
        if self.harness is not None:
            self.harness.check()

    def teardown(self) -> None:
        if self.harness is None:
            return  # the run stopped before its set-up
        # A test's planted MMU class has no byte in fuzz_arm64's input: no input replays it.
        actions = (f"{method}{args!r}" for method, args in self.calls)
        replayable = self.setup.mmu_class in MMU_CLASSES
        machines.record_run(
            self.harness.checks,
            [str(self.setup), *actions],
            ".actions.txt",
            encode(self.setup, self.calls) if replayable else None,
        )


def arm64_machine(
    profile: PlatformProfile = ARM64,
    mmu_classes: tuple[type[Arm64Mmu], ...] = MMU_CLASSES,
) -> type[Arm64Machine]:
    """The machine on ``profile`` (arm64), each run on one of ``mmu_classes`` (the kernel's
    MMU and seed 001's lockless ager by default; a test passes a planted bug)."""
    names = "+".join(cls.__name__ for cls in mmu_classes)
    name = f"Arm64Machine[{profile.name}, {names}]"
    return type(name, (Arm64Machine,), {"profile": profile, "mmu_classes": tuple(mmu_classes)})
