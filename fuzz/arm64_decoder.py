"""Bytes to arm64 stage-2 harness actions, for the Atheris fuzzer (``fuzz/fuzz_arm64.py``).

A :class:`~kvmspec.fuzz.decoder.Chooser` (raw bytes through
:class:`~kvmspec.fuzz.decoder.BytesChooser`) answers every question. The first four answers
set the VM up as the Hypothesis machine of :mod:`kvmspec.fuzz.arm64_machine` draws it
(:class:`Setup`: the MMU, hardware access-flag updates, the eager-split chunk, the dirty-log
mode); then each action is one answer for its kind, from the fixed table :data:`KINDS`, and
one answer per argument, each from that argument's fixed tuple of values (those of
:mod:`kvmspec.fuzz.arm64_harness`, and the few defined here that the machine draws from
too): a byte means the same whatever the state, so a mutation of one byte changes one
decision. The interleaving's order is a list: one answer for its length, then one per step.

New kinds of action go at the end of the table (and new values at the end of their tuple):
an answer is taken modulo the number of choices, so older inputs, the seeds included, keep
their meaning.

The decoder rejects (never calls) an action the state does not allow, after reading all of
its arguments; these are the actions the harness would take as nothing to do:

* ``device memory``: an MADV_DONTNEED, or a fault raced by one, on the device slot;
* ``no slot``: an action on slot 1 while it is deleted (deleting it, racing a fault on it,
  its dirty log);
* ``not logged``: a harvest or a clear of a slot that is not dirty-logged; ``not manual``:
  a KVM_CLEAR_DIRTY_LOG without manual protection;
* ``not writable``: a raced fault or an interleaving on a page a store could not complete
  on (a READONLY slot, a page the VMM mprotect()ed or munmap()ed).

:attr:`Rejected.why` says which rule rejected it, and the driver counts them.

``python -m kvmspec.fuzz.arm64_decoder seeds`` rebuilds ``corpus/seeds/arm64/`` from
:data:`SEED_SCENARIOS` with :func:`encode`, the decoder's inverse.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmspec.fuzz.arm64_harness import (
    BLOCK_DEVICE_PAGES,
    BOOLS,
    BYTES,
    CLEAR_MASKS,
    CLEAR_WORDS,
    DEVICE_SLOT,
    DIRTY_MODES,
    DONTNEED_PAGES,
    FRAMES,
    HPAGE,
    KNOWN_KERNEL_FINDINGS,
    OFFSETS,
    ORDER_STEPS,
    PAGES,
    PROTS,
    READ_KINDS,
    SHIFTED_PLACES,
    SHIFTED_SLOT,
    SLOT_IDS,
    THP_SLOT,
    UNBACKED,
    VCPUS,
    Arm64Harness,
)
from kvmspec.fuzz.arm64_harness import (
    KINDS as ACCESS_KINDS,
)
from kvmspec.fuzz.atheris_support import seeds_command, write_seed_inputs
from kvmspec.fuzz.decoder import Chooser, pick
from kvmspec.fuzz.generic_harness import Log
from kvmspec.fuzz.harness_fuzzing import Action, Rejected, Step, answer, encode_steps
from kvmspec.reference.arm64.mmu import Arm64Mmu, Arm64MmuLocklessAging
from kvmspec.reference.arm64.s2_mmu import Stage2Features
from kvmspec.reference.host import PROT_READ
from kvmspec.spec.platforms import PlatformProfile

Argument = int | bool | str | None | tuple[int, ...]
SEEDS = Path(__file__).resolve().parents[1] / "corpus" / "seeds" / "arm64"

MMU_CLASSES: tuple[type[Arm64Mmu], ...] = (Arm64Mmu, Arm64MmuLocklessAging)
"""The MMUs a run can be on: v6.18's, with aging under mmu_lock, and seed 001's lockless
ager. A test plants a bug by putting its own class here."""
SPLIT_CHUNKS = (0, HPAGE)
"""The eager-split chunk: none, or 2 MiB."""
AGING = ("clear_flush_young", "clear_young", "test_young")
"""How the host ages a page through the notifier."""
THP_SLOTS = (THP_SLOT, SHIFTED_SLOT)
"""The slots backed by THP-capable memory."""
ORDER_LENGTH = 40
"""The interleaving's order has at most this many steps."""


@dataclass(frozen=True)
class ListOf:
    """An argument that is a tuple of at most ``most`` values, each from ``values``: one
    answer for its length, then one per value."""

    values: Sequence[int]
    most: int


Domain = Sequence[Argument] | ListOf
Args = dict[str, Argument]
Allowed = Callable[[Arm64Harness, Args], str | None]
"""Why the state does not allow an action with these arguments (a rule and its particulars,
as ``"rule: detail"``), or None when it does."""


def _int(value: Argument) -> int:
    assert isinstance(value, int)
    return value


def _always(harness: Arm64Harness, args: Args) -> str | None:
    return None


def _slot_exists(harness: Arm64Harness, slot_id: int) -> str | None:
    return f"no slot: slot {slot_id} is deleted" if slot_id not in harness.views else None


def _host_memory(harness: Arm64Harness, args: Args) -> str | None:
    if args["slot_id"] == DEVICE_SLOT:
        return "device memory: the VMM cannot drop device pages"
    return None


def _store_completes(harness: Arm64Harness, slot_id: int, page: int) -> str | None:
    """None if a store to the page would complete (the slot exists, is not READONLY, and the
    VMM's page is writable)."""
    _, hva = harness.address(slot_id, page)
    if hva is None:
        return _slot_exists(harness, slot_id)
    outcome = harness.expected(slot_id, hva, "store")
    return None if outcome is None else f"not writable: slot {slot_id} page {page}: {outcome}"


def _racing(harness: Arm64Harness, args: Args) -> str | None:
    slot_id, page = _int(args["slot_id"]), _int(args["page"])
    return _host_memory(harness, args) or _store_completes(harness, slot_id, page)


def _interleaving(harness: Arm64Harness, args: Args) -> str | None:
    page, other = _int(args["page"]), _int(args["other"])
    return _store_completes(harness, THP_SLOT, page) or _store_completes(harness, THP_SLOT, other)


def _slot1_to_delete(harness: Arm64Harness, args: Args) -> str | None:
    return _slot_exists(harness, SHIFTED_SLOT) if args["place"] is None else None


def _slot(harness: Arm64Harness, args: Args) -> str | None:
    return _slot_exists(harness, _int(args["slot_id"]))


def _logged(harness: Arm64Harness, args: Args) -> str | None:
    slot_id = _int(args["slot_id"])
    view = harness.views.get(slot_id)
    if view is None:
        return _slot_exists(harness, slot_id)
    return None if view.logging else f"not logged: slot {slot_id}"


def _clearable(harness: Arm64Harness, args: Args) -> str | None:
    if harness.dirty_mode == "bitmap":
        return "not manual: the VM harvests with KVM_GET_DIRTY_LOG's get-and-clear"
    return _logged(harness, args)


@dataclass(frozen=True)
class Kind:
    """One kind of action: the harness method it calls, each argument's name and values
    (one choice each, or a list), and when the state allows it."""

    method: str
    params: tuple[tuple[str, Domain], ...] = ()
    allowed: Allowed = _always


GUEST_READ = Kind(
    "guest_read",
    (
        ("vcpu", VCPUS),
        ("slot_id", SLOT_IDS),
        ("page", PAGES),
        ("offset", OFFSETS),
        ("kind", READ_KINDS),
    ),
)
GUEST_STORE = Kind(
    "guest_store", (("vcpu", VCPUS), ("slot_id", SLOT_IDS), ("page", PAGES), ("byte", BYTES))
)
INTERLEAVE = Kind(
    "interleave",
    (
        ("order", ListOf(ORDER_STEPS, ORDER_LENGTH)),
        ("page", PAGES),
        ("other", PAGES),
        ("store", BOOLS),
    ),
    _interleaving,
)

KINDS: tuple[Kind, ...] = (
    # Guest accesses are what reach the stage 2: several entries each.
    GUEST_READ,
    GUEST_READ,
    GUEST_READ,
    GUEST_STORE,
    GUEST_STORE,
    GUEST_STORE,
    Kind("guest_unbacked", (("vcpu", VCPUS), ("where", sorted(UNBACKED)), ("kind", ACCESS_KINDS))),
    INTERLEAVE,
    INTERLEAVE,
    Kind(
        "race_fault_with_dontneed",
        (("vcpu", VCPUS), ("slot_id", SLOT_IDS), ("page", PAGES), ("value", BYTES)),
        _racing,
    ),
    Kind("host_write", (("slot_id", SLOT_IDS), ("page", PAGES), ("value", BYTES))),
    Kind(
        "madvise_dontneed",
        (("slot_id", SLOT_IDS), ("page", PAGES), ("n", DONTNEED_PAGES)),
        _host_memory,
    ),
    Kind("mprotect", (("slot_id", SLOT_IDS), ("page", PAGES), ("prot", PROTS))),
    Kind("munmap", (("slot_id", SLOT_IDS), ("page", PAGES))),
    Kind("thp", (("slot_id", THP_SLOTS), ("frame", FRAMES), ("collapse", BOOLS))),
    Kind("age", (("slot_id", SLOT_IDS), ("page", PAGES), ("how", AGING))),
    Kind("release"),
    Kind(
        "place_shifted_slot",
        (("place", SHIFTED_PLACES), ("readonly", BOOLS)),
        _slot1_to_delete,
    ),
    Kind("toggle_log", (("slot_id", SLOT_IDS),), _slot),
    Kind("get_dirty_log", (("slot_id", SLOT_IDS),), _logged),
    Kind(
        "clear_dirty_log",
        (("slot_id", SLOT_IDS), ("word", CLEAR_WORDS), ("mask", CLEAR_MASKS)),
        _clearable,
    ),
    Kind("collapse_after_logging", (("vcpu", VCPUS), ("frame", FRAMES), ("byte", BYTES))),
    Kind(
        "device_block_access",
        (("vcpu", VCPUS), ("page", BLOCK_DEVICE_PAGES), ("kind", ACCESS_KINDS)),
    ),
)
"""What one answer chooses between. An action's arguments follow its kind's answer."""


@dataclass(frozen=True)
class Setup:
    """The VM's configuration, as the machine draws it."""

    mmu_class: type[Arm64Mmu] = Arm64Mmu
    hardware_af: bool = True
    split_chunk_size: int = 0
    dirty_mode: str = "bitmap"

    def __str__(self) -> str:
        return (
            f"set_up(mmu={self.mmu_class.__name__}, hardware_af={self.hardware_af}, "
            f"split_chunk_size={self.split_chunk_size:#x}, dirty_mode={self.dirty_mode!r})"
        )

    def harness(self, profile: PlatformProfile, log: Log) -> Arm64Harness:
        """A fresh VM so configured."""
        features = Stage2Features(ha=self.hardware_af)
        return Arm64Harness(
            profile,
            self.mmu_class,
            features,
            self.split_chunk_size,
            self.dirty_mode,
            log,
            KNOWN_KERNEL_FINDINGS,
        )


def decode_setup(chooser: Chooser) -> Setup:
    """The run's configuration: the first four answers."""
    return Setup(
        pick(chooser, MMU_CLASSES),
        pick(chooser, BOOLS),
        pick(chooser, SPLIT_CHUNKS),
        pick(chooser, DIRTY_MODES),
    )


def _read(chooser: Chooser, domain: Domain) -> Argument:
    if isinstance(domain, ListOf):
        length = chooser.below(domain.most + 1)
        return tuple(pick(chooser, domain.values) for _ in range(length))
    return pick(chooser, domain)


def decode_action(chooser: Chooser, harness: Arm64Harness) -> Action | Rejected:
    """The next action, as the chooser's answers describe it, or why it is rejected."""
    kind = pick(chooser, KINDS)
    args = tuple((name, _read(chooser, domain)) for name, domain in kind.params)
    why = kind.allowed(harness, dict(args))
    if why is not None:
        rule, detail = why.split(": ", 1)
        return Rejected(kind.method, rule, detail)
    return Action(kind.method, args)


# ---------------------------------------------------------------------------------------------
# The inverse, for seeds and the machine's reproducers
# ---------------------------------------------------------------------------------------------


def _encode_argument(domain: Domain, value: object) -> bytes:
    """An argument's answer; a list is its length, then each item's answer."""
    if isinstance(domain, ListOf):
        assert isinstance(value, tuple) and len(value) <= domain.most, value
        items = b"".join(answer(domain.values, item) for item in value)
        return answer(range(domain.most + 1), len(value)) + items
    return answer(domain, value)


def encode(setup: Setup, steps: Iterable[Step]) -> bytes:
    """The bytes that :func:`decode_setup` then :func:`decode_action` read as ``setup`` and
    ``steps`` (a method and its argument values each, in the table's order). Raises
    ValueError for an MMU class that is not in :data:`MMU_CLASSES`."""
    set_up_bytes = (
        answer(MMU_CLASSES, setup.mmu_class)
        + answer(BOOLS, setup.hardware_af)
        + answer(SPLIT_CHUNKS, setup.split_chunk_size)
        + answer(DIRTY_MODES, setup.dirty_mode)
    )
    return set_up_bytes + encode_steps(KINDS, steps, _encode_argument)


LOCKLESS = Arm64MmuLocklessAging
NO_SPLIT = 0
WITH_SPLIT = HPAGE

SEED_SCENARIOS: dict[str, tuple[Setup, tuple[Step, ...]]] = {
    "faults-and-the-hardware": (
        Setup(Arm64Mmu, hardware_af=False),
        (
            ("guest_read", (0, THP_SLOT, 0, 0, "load")),
            ("guest_store", (1, THP_SLOT, 0, 9)),
            ("guest_read", (1, THP_SLOT, 0, 8, "fetch")),
            ("guest_read", (0, SHIFTED_SLOT, 2, 0, "s1ptw")),
            ("guest_store", (0, SHIFTED_SLOT, 511, 3)),
            ("guest_read", (0, DEVICE_SLOT, 1, 0, "load")),
            ("guest_store", (1, DEVICE_SLOT, 1, 4)),
            ("guest_read", (1, DEVICE_SLOT, 1, 0, "fetch")),
            ("guest_unbacked", (0, "hole", "load")),
            ("guest_unbacked", (1, "hole", "fetch")),
            ("guest_unbacked", (0, "beyond_ipa", "store")),
            ("guest_unbacked", (1, "beyond_pa", "load")),
            ("age", (THP_SLOT, 0, "clear_young")),
            ("guest_read", (0, THP_SLOT, 0, 0, "load")),
            ("age", (THP_SLOT, 0, "test_young")),
        ),
    ),
    "dirty-logging-and-harvests": (
        Setup(Arm64Mmu, hardware_af=True, split_chunk_size=WITH_SPLIT, dirty_mode="manual"),
        (
            ("thp", (THP_SLOT, 0, True)),
            ("guest_read", (0, THP_SLOT, 1, 0, "load")),
            ("toggle_log", (THP_SLOT,)),
            ("guest_store", (0, THP_SLOT, 1, 5)),
            ("guest_store", (1, THP_SLOT, 510, 6)),
            ("get_dirty_log", (THP_SLOT,)),
            ("clear_dirty_log", (THP_SLOT, 0, 1 << 63)),
            ("clear_dirty_log", (THP_SLOT, 0, (1 << 64) - 1)),
            ("guest_store", (1, THP_SLOT, 1, 7)),
            ("get_dirty_log", (THP_SLOT,)),
            ("toggle_log", (DEVICE_SLOT,)),
            ("toggle_log", (SHIFTED_SLOT,)),
            ("guest_store", (0, SHIFTED_SLOT, 2, 8)),
            ("get_dirty_log", (SHIFTED_SLOT,)),
            ("toggle_log", (THP_SLOT,)),
            ("guest_store", (0, THP_SLOT, 2, 9)),
        ),
    ),
    "dirty-logging-initially-set": (
        Setup(LOCKLESS, hardware_af=False, dirty_mode="manual-initially-set"),
        (
            ("guest_store", (0, THP_SLOT, 0, 1)),
            ("toggle_log", (THP_SLOT,)),
            ("get_dirty_log", (THP_SLOT,)),
            ("clear_dirty_log", (THP_SLOT, 0, 0b1110_0000)),
            ("guest_store", (1, THP_SLOT, 2, 2)),
            ("clear_dirty_log", (THP_SLOT, 15, 1)),
            ("get_dirty_log", (THP_SLOT,)),
            ("age", (THP_SLOT, 2, "clear_flush_young")),
        ),
    ),
    "notifier-invalidations-and-thp": (
        Setup(Arm64Mmu, hardware_af=True),
        (
            ("host_write", (THP_SLOT, 0, 0x11)),
            ("thp", (THP_SLOT, 0, True)),
            ("guest_read", (0, THP_SLOT, 0, 0, "load")),
            ("guest_store", (1, THP_SLOT, 2, 0x22)),
            ("madvise_dontneed", (THP_SLOT, 1, 2)),
            ("guest_read", (1, THP_SLOT, 1, 0, "load")),
            ("thp", (THP_SLOT, 0, False)),
            ("guest_read", (0, THP_SLOT, 2, 0, "load")),
            ("mprotect", (THP_SLOT, 2, PROT_READ)),
            ("guest_store", (0, THP_SLOT, 2, 3)),
            ("mprotect", (THP_SLOT, 2, 0)),
            ("guest_read", (0, THP_SLOT, 2, 0, "load")),
            ("munmap", (THP_SLOT, 512)),
            ("guest_read", (1, THP_SLOT, 512, 0, "load")),
            ("race_fault_with_dontneed", (0, THP_SLOT, 510, 0x33)),
            ("age", (THP_SLOT, 510, "clear_flush_young")),
            ("thp", (SHIFTED_SLOT, 1, True)),
            ("guest_read", (1, SHIFTED_SLOT, 510, 0, "load")),
        ),
    ),
    "memslot-moves": (
        Setup(Arm64Mmu, hardware_af=True, split_chunk_size=WITH_SPLIT),
        (
            ("guest_store", (0, SHIFTED_SLOT, 1, 4)),
            ("place_shifted_slot", (1, False)),
            ("guest_read", (0, SHIFTED_SLOT, 1, 0, "load")),
            ("thp", (SHIFTED_SLOT, 0, True)),
            ("guest_read", (1, SHIFTED_SLOT, 2, 0, "load")),
            ("place_shifted_slot", (None, False)),
            ("guest_read", (0, SHIFTED_SLOT, 1, 0, "load")),
            ("guest_read", (0, SHIFTED_SLOT, 1, 0, "fetch")),
            ("place_shifted_slot", (0, True)),
            ("guest_store", (1, SHIFTED_SLOT, 1, 5)),
            ("guest_read", (1, SHIFTED_SLOT, 1, 0, "load")),
            ("place_shifted_slot", (1, False)),
            ("guest_store", (1, SHIFTED_SLOT, 1, 6)),
        ),
    ),
    "seed-001-lockless-aging-interleaved": (
        Setup(LOCKLESS, hardware_af=True),
        (
            ("host_write", (THP_SLOT, 1, 0x55)),
            ("thp", (THP_SLOT, 0, True)),
            ("guest_read", (0, THP_SLOT, 1, 0, "load")),
            ("interleave", ((), 1, 2, True)),
            ("interleave", ((0, 0, 0, 0, 1, 1, 1, 1), 510, 1, False)),
            ("age", (THP_SLOT, 1, "clear_young")),
            ("interleave", ((1, 0) * 20, 1, 2, True)),
            ("toggle_log", (THP_SLOT,)),
            ("interleave", ((2, 1, 0, 3) * 10, 1, 2, True)),
            ("interleave", ((3, 3, 3, 0, 1, 2) * 6, 510, 1, False)),
            ("get_dirty_log", (THP_SLOT,)),
            ("age", (THP_SLOT, 2, "clear_flush_young")),
        ),
    ),
    "blocks-over-tables-and-device-blocks": (
        Setup(Arm64Mmu, hardware_af=True, split_chunk_size=WITH_SPLIT),
        (
            ("collapse_after_logging", (0, 0, 0x41)),
            ("guest_store", (1, THP_SLOT, 2, 0x42)),
            ("collapse_after_logging", (1, 1, 0x43)),
            ("device_block_access", (0, 1, "load")),
            ("device_block_access", (1, 512, "store")),
            ("device_block_access", (0, BLOCK_DEVICE_PAGES[-1], "store")),
            ("device_block_access", (1, BLOCK_DEVICE_PAGES[-1], "fetch")),
            ("release", ()),
            ("device_block_access", (0, BLOCK_DEVICE_PAGES[4], "s1ptw")),
        ),
    ),
    "seed-001-release": (
        Setup(LOCKLESS, hardware_af=False),
        (
            ("guest_store", (0, THP_SLOT, 2, 7)),
            ("guest_store", (1, SHIFTED_SLOT, 2, 8)),
            ("guest_read", (0, DEVICE_SLOT, 0, 0, "load")),
            ("release", ()),
            ("guest_read", (0, THP_SLOT, 2, 0, "load")),
            ("guest_store", (1, THP_SLOT, 511, 9)),
            ("release", ()),
            ("guest_read", (1, THP_SLOT, 511, 0, "load")),
        ),
    ),
}
"""Seed inputs: each becomes ``corpus/seeds/arm64/<name>.bin``."""


def write_seeds(folder: Path = SEEDS) -> list[Path]:
    """(Re)write the seed corpus from :data:`SEED_SCENARIOS`."""
    inputs = {name: encode(setup, steps) for name, (setup, steps) in SEED_SCENARIOS.items()}
    return write_seed_inputs(folder, inputs)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmspec.fuzz.arm64_decoder seeds``: rebuild the seed corpus."""
    return seeds_command("kvmspec.fuzz.arm64_decoder", write_seeds, argv)


if __name__ == "__main__":
    sys.exit(main())
