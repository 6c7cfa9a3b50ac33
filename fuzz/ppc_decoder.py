"""Bytes to POWER Book3S HV harness actions, for the Atheris fuzzer (``fuzz/fuzz_ppc.py``).

A :class:`~kvmspec.fuzz.decoder.Chooser` (raw bytes through
:class:`~kvmspec.fuzz.decoder.BytesChooser`) answers every question. Each action is one
answer for its kind, from the fixed table :data:`KINDS`, and one answer per argument, each
from that argument's fixed tuple of values (those of :mod:`kvmspec.fuzz.ppc_harness`, and
the few defined here that the Hypothesis machine of :mod:`kvmspec.fuzz.ppc_machine` draws
from too): a byte means the same whatever the state, so a mutation of one byte changes one
decision. The VM has one layout (:class:`~kvmspec.fuzz.ppc_harness.PpcHarness`), so no
answer sets it up.

The decoder rejects (never calls) an action the state does not allow, after reading all of
its arguments; these are the actions the harness would take as nothing to do:

* ``entered already``: an H_ENTER for an address the guest has an entry for (a Linux guest
  never enters two);
* ``no entry``: an H_PROTECT, H_CLEAR_REF or H_CLEAR_MOD for an address it has none for;
* ``unmapped``: a host action on a page of slot 0 the VMM munmap()ed (a write also
  ``read-only`` on a page it mprotect()ed so);
* ``no slot 1``: a dirty-log action, or a DELETE with hypercalls inside it, while slot 1 is
  deleted; ``no change``: turning its logging to what it is; ``not logged``: a harvest of it
  unlogged.

:attr:`Rejected.why` says which rule rejected it, and the driver counts them.

``python -m kvmspec.fuzz.ppc_decoder seeds`` rebuilds ``corpus/seeds/ppc/`` from
:data:`SEED_SCENARIOS` with :func:`encode`, the decoder's inverse.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmspec.fuzz.atheris_support import seeds_command, write_seed_inputs
from kvmspec.fuzz.decoder import Chooser, pick
from kvmspec.fuzz.harness_fuzzing import Action, Rejected, Step, encode_steps
from kvmspec.fuzz.ppc_harness import (
    AGINGS,
    BOOLS,
    EA_INDEXES,
    EAS,
    GFN_INDEXES,
    GFNS,
    INVALID_HCALLS,
    MMIO_GFN,
    MOVED_GFN,
    ORDERS,
    PAGE,
    RACE_STEPS,
    RACERS,
    RAM1_GFN,
    REMOVE_HOWS,
    SLOT1_PLACES,
    SLOT_PAGE_INDEXES,
    VCPUS,
    PpcHarness,
)
from kvmspec.reference.ppc.hcalls import H_ANDCOND, H_AVPN

Argument = int | bool | str | None | tuple[int, ...]
SEEDS = Path(__file__).resolve().parents[1] / "corpus" / "seeds" / "ppc"

EXACTS = (-1, -1, 0, 1, 7)
"""H_ENTER's slot in the group: -1 is the first free one (half as likely again as each
H_EXACT slot), else exactly that one."""
SLOTS = (0, 1)
BULK_EA_LISTS: tuple[tuple[int, ...], ...] = tuple(
    itertools.chain.from_iterable(
        itertools.product(EA_INDEXES, repeat=length) for length in range(5)
    )
)
"""H_BULK_REMOVE's addresses: every list of up to four of them (a two-byte answer)."""

Args = dict[str, Argument]
Allowed = Callable[[PpcHarness, Args], str | None]
"""Why the state does not allow an action with these arguments (a rule and its particulars,
as ``"rule: detail"``), or None when it does."""


def _always(harness: PpcHarness, args: Args) -> str | None:
    return None


def _not_entered(harness: PpcHarness, args: Args) -> str | None:
    ea = EAS[_int(args["ea_i"])]
    index = harness.index_of(ea)
    return None if index is None else f"entered already: ea {ea:#x} at {index:#x}"


def _entered(harness: PpcHarness, args: Args) -> str | None:
    ea = EAS[_int(args["ea_i"])]
    return f"no entry: for ea {ea:#x}" if harness.index_of(ea) is None else None


def _mapped(harness: PpcHarness, args: Args) -> str | None:
    slot = _int(args.get("slot", 0))
    page = _int(args["page"])
    if harness.hvas[slot] + page * PAGE in harness.unmapped:
        return f"unmapped: slot {slot} page {page}"
    return None


def _writable(harness: PpcHarness, args: Args) -> str | None:
    why = _mapped(harness, args)
    slot, page = _int(args["slot"]), _int(args["page"])
    if why is None and harness.hvas[slot] + page * PAGE in harness.readonly:
        return f"read-only: slot {slot} page {page}"
    return why


def _slot1(harness: PpcHarness, args: Args) -> str | None:
    return "no slot 1: it is deleted" if harness.slot1_gfn is None else None


def _slot1_changes(harness: PpcHarness, args: Args) -> str | None:
    if args["where"] is None:
        return _slot1(harness, args)
    return None


def _log_changes(harness: PpcHarness, args: Args) -> str | None:
    if args["logged"] == harness.slot1_logged:
        return f"no change: slot 1 logging is {harness.slot1_logged} already"
    return _slot1(harness, args)


def _logged(harness: PpcHarness, args: Args) -> str | None:
    why = _slot1(harness, args)
    if why is None and not harness.slot1_logged:
        return "not logged: slot 1 is not dirty-logged"
    return why


def _int(value: Argument) -> int:
    assert isinstance(value, int)
    return value


@dataclass(frozen=True)
class Kind:
    """One kind of action: the harness method it calls, each argument's name and values
    (one choice each), and when the state allows it."""

    method: str
    params: tuple[tuple[str, Sequence[Argument]], ...] = ()
    allowed: Allowed = _always


H_ENTER = Kind(
    "h_enter",
    (
        ("ea_i", EA_INDEXES),
        ("gfn_i", GFN_INDEXES),
        ("writable", BOOLS),
        ("bolted", BOOLS),
        ("secondary", BOOLS),
        ("exact", EXACTS),
    ),
    _not_entered,
)
H_REMOVE = Kind("h_remove", (("ea_i", EA_INDEXES), ("how", REMOVE_HOWS)))
GUEST_ACCESS = Kind("guest_access", (("vcpu", VCPUS), ("ea_i", EA_INDEXES), ("write", BOOLS)))

KINDS: tuple[Kind, ...] = (
    # The guest's hypercalls and accesses are what the HPT is about: several entries each.
    H_ENTER,
    H_ENTER,
    H_ENTER,
    Kind("h_enter_racing_dontneed", (("ea_i", EA_INDEXES), ("gfn_i", GFN_INDEXES)), _not_entered),
    H_REMOVE,
    H_REMOVE,
    Kind("h_bulk_remove", (("ea_is", BULK_EA_LISTS),)),
    Kind("h_protect", (("ea_i", EA_INDEXES), ("writable", BOOLS)), _entered),
    Kind("h_read", (("ea_i", EA_INDEXES), ("four", BOOLS))),
    Kind("h_clear_ref_or_mod", (("ea_i", EA_INDEXES), ("mod", BOOLS)), _entered),
    GUEST_ACCESS,
    GUEST_ACCESS,
    GUEST_ACCESS,
    Kind(
        "guest_access_racing",
        (
            ("vcpu", VCPUS),
            ("ea_i", EA_INDEXES),
            ("write", BOOLS),
            ("steps", RACE_STEPS),
            ("racer", RACERS),
        ),
    ),
    Kind("host_dontneed", (("slot", SLOTS), ("page", SLOT_PAGE_INDEXES)), _mapped),
    Kind("host_write", (("slot", SLOTS), ("page", SLOT_PAGE_INDEXES)), _writable),
    Kind(
        "host_mprotect",
        (("slot", SLOTS), ("page", SLOT_PAGE_INDEXES), ("writable", BOOLS)),
        _mapped,
    ),
    Kind("host_munmap", (("page", SLOT_PAGE_INDEXES),), _mapped),
    Kind("host_ages", (("slot", SLOTS),)),
    Kind("change_slot1", (("where", SLOT1_PLACES),), _slot1_changes),
    Kind("toggle_slot1_log", (("logged", BOOLS),), _log_changes),
    Kind("get_dirty_log", (), _logged),
    Kind("resize_prepare", (("order", ORDERS),)),
    Kind("resize_work"),
    Kind("resize_commit", (("order", ORDERS),)),
    Kind(
        "hcalls_while_slot1_invalid",
        (("move", BOOLS), ("ea_i", EA_INDEXES), ("reenter_gfn_i", GFN_INDEXES)),
        _slot1,
    ),
    # Appended, so that older inputs keep their meaning.
    Kind("h_invalid", (("call", INVALID_HCALLS),)),
    Kind("h_bulk_remove_cond", (("ea_i", EA_INDEXES), ("how", REMOVE_HOWS))),
    Kind("host_ages_page", (("slot", SLOTS), ("page", SLOT_PAGE_INDEXES), ("how", AGINGS))),
)
"""What one answer chooses between. An action's arguments follow its kind's answer."""


def decode_action(chooser: Chooser, harness: PpcHarness) -> Action | Rejected:
    """The next action, as the chooser's answers describe it, or why it is rejected."""
    kind = pick(chooser, KINDS)
    args = tuple((name, pick(chooser, values)) for name, values in kind.params)
    why = kind.allowed(harness, dict(args))
    if why is not None:
        rule, detail = why.split(": ", 1)
        return Rejected(kind.method, rule, detail)
    return Action(kind.method, args)


# ---------------------------------------------------------------------------------------------
# The inverse, for seeds
# ---------------------------------------------------------------------------------------------


def encode(steps: Iterable[Step]) -> bytes:
    """The bytes that :func:`decode_action` reads as ``steps`` (a method and its argument
    values each, in the table's order)."""
    return encode_steps(KINDS, steps)


def _gfn(gfn: int) -> int:
    """The argument that names ``gfn`` (an index into GFNS)."""
    return GFNS.index(gfn)


RO, RW = False, True  # an entry's or a page's protection, in the scenarios
FIRST_FREE = -1  # H_ENTER without H_EXACT

SEED_SCENARIOS: dict[str, tuple[Step, ...]] = {
    "hcalls": (
        ("h_enter", (0, _gfn(0), RW, False, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(1), RO, True, False, 1)),
        ("h_enter", (2, _gfn(MMIO_GFN), RW, False, True, FIRST_FREE)),
        ("h_read", (0, True)),
        ("h_protect", (0, RO)),
        ("h_protect", (1, RW)),
        ("h_clear_ref_or_mod", (0, True)),
        ("h_remove", (1, H_ANDCOND)),
        ("h_remove", (0, H_AVPN)),
        ("h_remove", (3, 0)),
        ("h_bulk_remove", ((1, 2, 3),)),
        ("h_read", (1, False)),
    ),
    "accesses": (
        ("h_enter", (0, _gfn(0), RW, False, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(RAM1_GFN), RW, False, False, 0)),
        ("h_enter", (2, _gfn(MMIO_GFN), RW, False, False, FIRST_FREE)),
        ("h_enter", (3, _gfn(1), RO, False, False, FIRST_FREE)),
        ("guest_access", (0, 0, True)),
        ("guest_access", (1, 0, False)),
        ("guest_access", (0, 1, True)),
        ("guest_access", (1, 2, False)),
        ("guest_access", (0, 3, True)),
        ("guest_access", (1, 4, False)),
        ("h_clear_ref_or_mod", (0, False)),
        ("guest_access", (1, 0, True)),
        ("guest_access_racing", (0, 1, True, 1, "h_remove")),
        ("guest_access_racing", (1, 0, True, 2, "dontneed")),
    ),
    "memslot-delete-and-move": (
        ("h_enter", (0, _gfn(RAM1_GFN), RW, False, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(RAM1_GFN + 2), RW, True, False, FIRST_FREE)),
        ("guest_access", (0, 0, True)),
        ("hcalls_while_slot1_invalid", (True, 0, _gfn(RAM1_GFN))),
        ("guest_access", (1, 1, True)),
        ("change_slot1", (None,)),
        ("guest_access", (0, 0, False)),
        ("change_slot1", (RAM1_GFN,)),
        ("guest_access", (0, 0, True)),
        ("change_slot1", (MOVED_GFN,)),
        ("h_enter", (2, _gfn(MOVED_GFN), RW, False, False, FIRST_FREE)),
        ("guest_access", (1, 2, True)),
        ("hcalls_while_slot1_invalid", (False, 2, _gfn(0))),
        ("guest_access_racing", (0, 2, True, 1, "delete_slot1")),
    ),
    "dirty-harvest": (
        ("h_enter", (0, _gfn(RAM1_GFN), RW, False, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(RAM1_GFN + 2), RW, False, False, FIRST_FREE)),
        ("guest_access", (0, 0, True)),
        ("guest_access", (1, 1, True)),
        ("h_clear_ref_or_mod", (1, True)),
        ("get_dirty_log", ()),
        ("guest_access", (1, 0, True)),
        ("h_remove", (0, 0)),
        ("get_dirty_log", ()),
        ("toggle_slot1_log", (False,)),
        ("guest_access", (0, 1, True)),
        ("toggle_slot1_log", (True,)),
        ("guest_access", (0, 1, True)),
        ("get_dirty_log", ()),
    ),
    "notifier-events": (
        ("h_enter", (0, _gfn(0), RW, False, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(1), RW, False, False, FIRST_FREE)),
        ("h_enter", (2, _gfn(RAM1_GFN), RW, False, False, FIRST_FREE)),
        ("guest_access", (0, 0, True)),
        ("guest_access", (0, 1, False)),
        ("host_ages", (0,)),
        ("host_dontneed", (0, 0)),
        ("guest_access", (1, 0, True)),
        ("host_mprotect", (0, 1, RO)),
        ("guest_access", (0, 1, True)),
        ("host_write", (1, 0)),
        ("host_mprotect", (0, 1, RW)),
        ("guest_access", (0, 1, True)),
        ("host_munmap", (1,)),
        ("guest_access", (1, 1, False)),
        ("h_enter_racing_dontneed", (3, _gfn(RAM1_GFN))),
        ("guest_access", (0, 3, True)),
    ),
    "resize": (
        ("h_enter", (0, _gfn(0), RW, True, False, FIRST_FREE)),
        ("h_enter", (8, _gfn(1), RW, True, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(RAM1_GFN), RW, False, False, FIRST_FREE)),
        ("h_enter", (9, _gfn(0), RW, True, True, 7)),
        ("guest_access", (0, 0, True)),
        ("resize_prepare", (18,)),
        ("resize_work", ()),
        ("resize_commit", (18,)),
        ("h_remove", (8, 0)),
        ("h_enter", (8, _gfn(1), RW, True, False, 1)),
        ("resize_prepare", (18,)),
        ("resize_work", ()),
        ("resize_commit", (18,)),
        ("guest_access", (1, 8, True)),
        ("resize_prepare", (20,)),
        ("resize_work", ()),
        ("guest_access_racing", (0, 0, True, 1, "resize")),
        ("resize_commit", (20,)),
        ("h_read", (0, True)),
    ),
    "conditional-and-invalid-hcalls": (
        ("h_enter", (0, _gfn(0), RW, True, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(1), RW, False, False, FIRST_FREE)),
        ("guest_access", (0, 0, True)),
        ("h_bulk_remove_cond", (0, H_ANDCOND)),
        ("h_bulk_remove_cond", (1, H_AVPN)),
        ("h_bulk_remove_cond", (0, 0)),
        ("h_bulk_remove_cond", (2, 0)),
        *(("h_invalid", (call,)) for call in INVALID_HCALLS),
    ),
    "aging": (
        ("h_enter", (0, _gfn(0), RW, False, False, FIRST_FREE)),
        ("h_enter", (1, _gfn(1), RW, False, False, FIRST_FREE)),
        ("h_enter", (2, _gfn(RAM1_GFN), RW, False, False, FIRST_FREE)),
        ("guest_access", (0, 0, False)),
        ("guest_access", (1, 1, True)),
        ("host_ages_page", (0, 1, "test")),
        ("host_ages_page", (0, 1, "clear")),
        ("host_ages_page", (0, 0, "clear_flush")),
        ("guest_access", (0, 0, True)),
        ("h_clear_ref_or_mod", (0, False)),
        ("host_ages_page", (0, 0, "test")),
        ("host_ages_page", (0, 0, "clear")),
        ("guest_access", (1, 2, True)),
        # Slot 1 starts at gfn 8: H_CLEAR_REF must keep R in the rmap word of the page's
        # offset in the slot, or the host's aging finds the page idle.
        ("h_clear_ref_or_mod", (2, False)),
        ("host_ages_page", (1, 0, "clear")),
        ("guest_access", (1, 2, True)),
        ("host_mprotect", (1, 0, RO)),
        ("host_ages_page", (1, 0, "test")),
        ("host_ages", (1,)),
        ("h_bulk_remove", ((0, 1, 2),)),
    ),
}
"""Seed inputs: each becomes ``corpus/seeds/ppc/<name>.bin``."""


def write_seeds(folder: Path = SEEDS) -> list[Path]:
    """(Re)write the seed corpus from :data:`SEED_SCENARIOS`."""
    inputs = {name: encode(steps) for name, steps in SEED_SCENARIOS.items()}
    return write_seed_inputs(folder, inputs)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmspec.fuzz.ppc_decoder seeds``: rebuild the seed corpus."""
    return seeds_command("kvmspec.fuzz.ppc_decoder", write_seeds, argv)


if __name__ == "__main__":
    sys.exit(main())
