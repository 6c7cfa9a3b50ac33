"""Bytes to generic-harness actions, for the Atheris fuzzer (``fuzz/fuzz_generic.py``).

A :class:`~kvmspec.fuzz.decoder.Chooser` (raw bytes through
:class:`~kvmspec.fuzz.decoder.BytesChooser`) answers every question. The first two answers
set the run up: the dirty-logging mode and whether slot 0 is logged. Then each action is one
answer for its kind, from the fixed table :data:`KINDS`, and one answer per argument, each
from that argument's fixed list of values: a byte means the same whatever the state, so a
mutation of one byte changes one decision.

The decoder asks the harness what the state allows, and rejects (never calls) an action it
does not allow, after reading all of its arguments:

* a kind whose precondition is false (a fourth actor, CLEAR_DIRTY_LOG without manual
  protection, a ring harvest while a reset is in flight, ...);
* an actor step (``step_actor``, ``finish_actor``) naming an actor that is not in flight, or
  one that waits: the argument is an index into the actors in flight, in the order they
  started (at most :data:`~kvmspec.fuzz.generic_harness.MAX_IN_FLIGHT`), and only the
  runnable ones may step;
* ``drop_a_page_under_a_fault`` naming no fault that has resolved its page.

So the scheduler is never asked for a step it would refuse. :data:`Rejected.why` says which
rule rejected the action, and the driver counts them.

``python -m kvmspec.fuzz.generic_decoder seeds`` rebuilds ``corpus/seeds/generic/`` from
:data:`SEED_SCENARIOS` with :func:`encode`, the decoder's inverse.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmspec.fuzz.atheris_support import seeds_command, write_seed_inputs
from kvmspec.fuzz.decoder import Chooser, pick
from kvmspec.fuzz.generic_harness import (
    DIRTY_MODES,
    MAX_IN_FLIGHT,
    PROT_NAMES,
    REGION_PAGES,
    SLOT_IDS,
    SLOT_PAGES,
    VCPUS,
    GenericHarness,
)
from kvmspec.fuzz.harness_fuzzing import Action, Rejected, Step, answer, encode_steps

Argument = int | str
Allowed = Callable[[GenericHarness], bool]
SEEDS = Path(__file__).resolve().parents[1] / "corpus" / "seeds" / "generic"

BOOLS = (False, True)
WHERE = (0, 1)
SLOT_PAGE_NUMBERS = tuple(range(SLOT_PAGES))
HOST_PAGES = tuple(range(REGION_PAGES))
INDEXES = tuple(range(MAX_IN_FLIGHT))
"""The values of an argument that names an actor in flight (or a resolved fault) by index."""


def _always(harness: GenericHarness) -> bool:
    return True


@dataclass(frozen=True)
class Kind:
    """One kind of action: the harness method it calls, when the harness allows it, and each
    argument's name and values (one choice each)."""

    method: str
    allowed: Allowed = _always
    params: tuple[tuple[str, Sequence[Argument]], ...] = ()


KINDS: tuple[Kind, ...] = (
    Kind(
        "start_memslot_update",
        GenericHarness.can_start,
        (("slot_id", SLOT_IDS), ("where", WHERE), ("action", (0, 1, 2))),
    ),
    Kind("start_toggle_logging", GenericHarness.can_start, (("slot_id", SLOT_IDS),)),
    Kind(
        "start_fault",
        GenericHarness.can_start,
        (("slot_id", SLOT_IDS), ("page", SLOT_PAGE_NUMBERS), ("write", BOOLS), ("vcpu_id", VCPUS)),
    ),
    # Stepping is what makes interleavings: it gets three entries of the table.
    Kind("step_actor", params=(("name", INDEXES),)),
    Kind("step_actor", params=(("name", INDEXES),)),
    Kind("step_actor", params=(("name", INDEXES),)),
    Kind("finish_actor", params=(("name", INDEXES),)),
    Kind("start_get_dirty_log", GenericHarness.can_get_dirty_log, (("slot_id", SLOT_IDS),)),
    Kind(
        "start_clear_dirty_log",
        GenericHarness.can_clear_dirty_log,
        (("slot_id", SLOT_IDS), ("mask", tuple(range(1 << SLOT_PAGES)))),
    ),
    Kind("harvest_ring", GenericHarness.can_harvest_ring, (("vcpu_id", VCPUS),)),
    Kind("start_reset_dirty_rings", GenericHarness.can_reset_dirty_rings),
    Kind(
        "save_its_tables",
        GenericHarness.can_save_its_tables,
        (("slot_id", SLOT_IDS), ("page", SLOT_PAGE_NUMBERS)),
    ),
    Kind("host_write", params=(("page", HOST_PAGES), ("value", tuple(range(1, 256))))),
    Kind("start_madvise_dontneed", GenericHarness.can_start, (("page", HOST_PAGES),)),
    Kind("drop_a_page_under_a_fault", params=(("hva", INDEXES),)),
    Kind(
        "mprotect",
        GenericHarness.can_remap,
        (("page", HOST_PAGES), ("prot", tuple(sorted(PROT_NAMES)))),
    ),
    Kind("munmap", GenericHarness.can_remap, (("page", HOST_PAGES),)),
    Kind("migrate", params=(("page", HOST_PAGES),)),
    Kind("age", params=(("page", HOST_PAGES), ("flush", BOOLS))),
    Kind(
        "guest_access",
        params=(
            ("slot_id", SLOT_IDS),
            ("where", WHERE),
            ("page", SLOT_PAGE_NUMBERS),
            ("value", tuple(range(256))),
            ("vcpu_id", VCPUS),
        ),
    ),
    # Added last, so that the seeds written before it decode as they did.
    Kind("reclaim", params=(("page", HOST_PAGES),)),
)
"""What one answer chooses between. An action's arguments follow its kind's answer."""

_ACTOR_STEPS = ("step_actor", "finish_actor")


@dataclass(frozen=True)
class SetUp:
    """The arguments of :meth:`GenericHarness.set_up`."""

    mode: str
    logged: bool

    def __str__(self) -> str:
        return f"set_up(mode={self.mode!r}, logged={self.logged})"


def decode_set_up(chooser: Chooser) -> SetUp:
    """The run's set-up: the first two answers."""
    return SetUp(pick(chooser, DIRTY_MODES), pick(chooser, BOOLS))


def _actor(harness: GenericHarness, method: str, index: int) -> Action | Rejected:
    """An actor step naming the ``index``-th actor in flight, if it may run."""
    in_flight = list(harness.scheduler.actors)
    if index >= len(in_flight):
        return Rejected(method, "not in flight", f"actor {index} of {in_flight}")
    name = in_flight[index]
    if name not in harness.scheduler.runnable():
        point = getattr(harness.scheduler.actors[name].pending, "point", "?")
        return Rejected(method, "waiting", f"{name} waits: {point}")
    return Action(method, (("name", name),))


def decode_action(chooser: Chooser, harness: GenericHarness) -> Action | Rejected:
    """The next action, as the chooser's answers describe it, or why it is rejected."""
    kind = pick(chooser, KINDS)
    args = tuple((name, pick(chooser, values)) for name, values in kind.params)
    if not kind.allowed(harness):
        return Rejected(kind.method, "not allowed", f"{kind.allowed.__name__} is false")
    if kind.method in _ACTOR_STEPS:
        index = args[0][1]
        assert isinstance(index, int)
        return _actor(harness, kind.method, index)
    if kind.method == "drop_a_page_under_a_fault":
        index = args[0][1]
        assert isinstance(index, int)
        resolved = harness.resolved()
        if index >= len(resolved):
            return Rejected(kind.method, "nothing resolved", f"fault {index} of {len(resolved)}")
        return Action(kind.method, (("hva", resolved[index]),))
    return Action(kind.method, args)


# ---------------------------------------------------------------------------------------------
# The inverse, for seeds
# ---------------------------------------------------------------------------------------------


def encode(set_up: SetUp, steps: Iterable[Step]) -> bytes:
    """The bytes that :func:`decode_set_up` then :func:`decode_action` read as ``set_up``
    and ``steps`` (a method and its argument values each, in the table's order; an argument
    that names an actor or a resolved fault is its index)."""
    set_up_bytes = answer(DIRTY_MODES, set_up.mode) + answer(BOOLS, set_up.logged)
    return set_up_bytes + encode_steps(KINDS, steps)


READ, WRITE = False, True  # a fault's kind, in the scenarios

SEED_SCENARIOS: dict[str, tuple[SetUp, tuple[tuple[str, tuple[Argument, ...]], ...]]] = {
    "fault-resolved-page-dropped": (
        SetUp("bitmap", False),
        (
            ("start_fault", (0, 0, WRITE, 0)),
            ("step_actor", (0,)),
            ("step_actor", (0,)),
            ("drop_a_page_under_a_fault", (0,)),
            ("finish_actor", (0,)),
            ("guest_access", (0, 0, 0, 0, 0)),
        ),
    ),
    "fault-under-madvise": (
        SetUp("bitmap", False),
        (
            ("host_write", (1, 7)),
            ("start_fault", (0, 1, READ, 1)),
            ("step_actor", (0,)),
            ("start_madvise_dontneed", (1,)),
            ("step_actor", (1,)),
            ("step_actor", (0,)),
            ("finish_actor", (1,)),
            ("finish_actor", (0,)),
            ("guest_access", (0, 0, 1, 0, 1)),
        ),
    ),
    "move-under-fault": (
        SetUp("bitmap", True),
        (
            ("guest_access", (0, 0, 2, 9, 0)),
            ("start_fault", (0, 2, WRITE, 1)),
            ("start_memslot_update", (0, 1, 0)),
            ("step_actor", (1,)),
            ("step_actor", (0,)),
            ("finish_actor", (0,)),
            ("guest_access", (0, 1, 2, 0, 0)),
        ),
    ),
    "dirty-log-get-under-writes": (
        SetUp("bitmap", True),
        (
            ("guest_access", (0, 0, 0, 1, 0)),
            ("start_get_dirty_log", (0,)),
            ("guest_access", (0, 0, 1, 2, 1)),
            ("finish_actor", (0,)),
            ("guest_access", (0, 0, 0, 3, 0)),
            ("start_get_dirty_log", (0,)),
            ("finish_actor", (0,)),
        ),
    ),
    "manual-protect-clear": (
        SetUp("manual", True),
        (
            ("guest_access", (0, 0, 0, 1, 0)),
            ("guest_access", (0, 0, 3, 1, 1)),
            ("start_get_dirty_log", (0,)),
            ("start_clear_dirty_log", (0, 0b1001)),
            ("guest_access", (0, 0, 3, 2, 0)),
            ("start_get_dirty_log", (0,)),
        ),
    ),
    "ring-harvest-reset": (
        SetUp("ring", True),
        (
            ("guest_access", (0, 0, 0, 1, 0)),
            ("guest_access", (0, 0, 1, 1, 1)),
            ("harvest_ring", (0,)),
            ("harvest_ring", (1,)),
            ("start_reset_dirty_rings", ()),
            ("guest_access", (0, 0, 0, 2, 0)),
            ("harvest_ring", (0,)),
        ),
    ),
    "toggle-logging-under-writes": (
        SetUp("bitmap", False),
        (
            ("guest_access", (0, 0, 0, 1, 0)),
            ("start_toggle_logging", (0,)),
            ("step_actor", (0,)),
            ("guest_access", (0, 0, 1, 5, 1)),
            ("guest_access", (0, 0, 0, 6, 0)),
            ("start_get_dirty_log", (0,)),
            ("finish_actor", (0,)),
        ),
    ),
    "host-mappings": (
        SetUp("bitmap", False),
        (
            ("host_write", (2, 3)),
            ("guest_access", (0, 0, 2, 0, 0)),
            ("mprotect", (2, 1)),
            ("guest_access", (0, 0, 2, 4, 1)),
            ("age", (2, True)),
            ("migrate", (2,)),
            ("munmap", (3,)),
            ("guest_access", (0, 0, 3, 0, 0)),
        ),
    ),
    "create-alias-delete": (
        SetUp("manual-initially-set", False),
        (
            ("start_memslot_update", (2, 0, 2)),
            ("finish_actor", (0,)),
            ("guest_access", (2, 0, 0, 8, 1)),
            ("guest_access", (0, 0, 0, 0, 0)),
            ("start_memslot_update", (2, 0, 1)),
            ("start_fault", (2, 0, READ, 0)),
            ("finish_actor", (0,)),
            ("finish_actor", (1,)),
            ("finish_actor", (0,)),
        ),
    ),
}
"""Seed inputs: each becomes ``corpus/seeds/generic/<name>.bin``."""


def write_seeds(folder: Path = SEEDS) -> list[Path]:
    """(Re)write the seed corpus from :data:`SEED_SCENARIOS`."""
    inputs = {name: encode(set_up, steps) for name, (set_up, steps) in SEED_SCENARIOS.items()}
    return write_seed_inputs(folder, inputs)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmspec.fuzz.generic_decoder seeds``: rebuild the seed corpus."""
    return seeds_command("kvmspec.fuzz.generic_decoder", write_seeds, argv)


if __name__ == "__main__":
    sys.exit(main())
