"""CrossHair over the pure contracts, in the bounded form CI runs (``make crosshair`` is the
long form of the same check).

Every entry of :data:`ENTRIES` is explored with short timeouts, and no postcondition may have
a counterexample (nor preconditions no input satisfies, which would make it vacuous). So
that a pass means something, each contract also meets planted wrong variants of the model
(:data:`PLANTED`): a one-line change to the model's source, such as a hash that forgets the
mask or a range check off by one, which must be caught as a counterexample to the
postcondition the change breaks. The model's files are never edited: the changed source is
executed into the module object, and the module is put back afterwards.

CrossHair solves for inputs through arithmetic, comparisons and masks of low bits, but it
turns the operands of ``^``, ``|`` and other masks into plain numbers first, and so only
samples a few of them. The HPT hash is made of XORs and the stage-2 index of a mask, so two
of their planted bugs escape it in the bound; those are caught by Hypothesis instead, running
the same contracts (enforced at run time by spec/dbc.py) over inputs drawn from the same
preconditions. Hypothesis also runs every entry of the four areas on drawn inputs.

CrossHair runs in child processes (this file run as a script) because it patches the
interpreter while it explores, and because the model must be imported with the runtime
contract wrappers off (``KVMSPEC_CONTRACTS=off``), as ``make crosshair`` does. The entries'
child and the planted bugs' child run side by side.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

ENTRIES = (
    "kvmspec.spec.uapi.memslot_rules.decide_for_crosshair",
    "kvmspec.spec.uapi.dirty_log_rules.clear_dirty_log_errno",
    "kvmspec.spec.uapi.dirty_log_rules.clear_dirty_log_for_crosshair",
    "kvmspec.reference.dirty_ring.kvm_dirty_ring_used",
    "kvmspec.reference.dirty_ring.kvm_dirty_ring_slot",
    "kvmspec.spec.crosshair_entries.dirty_ring_reset_for_crosshair",
    "kvmspec.spec.crosshair_entries.hpt_placement_for_crosshair",
    "kvmspec.spec.crosshair_entries.stage2_walk_for_crosshair",
)
"""The functions ``make crosshair`` checks, by their import names."""

CONDITION_SECONDS = 0.25
"""CPU seconds CrossHair may spend on one postcondition of an entry here (the Makefile
gives each 10): enough for the few branches of these functions, and to find each planted
bug it is given."""

PLANT_SECONDS = 10.0
"""The limit for finding one planted bug. Each is found in well under a second: the limit
only ends a run that has gone wrong."""


class Planted(NamedTuple):
    """A wrong variant of the model, ``name``, described by ``what``: ``find`` (one place in
    ``module``'s source) becomes ``replace``; then ``entry``'s postcondition containing
    ``breaks`` must fail, found by ``caught_by`` ("crosshair" or "hypothesis")."""

    name: str
    what: str
    module: str
    find: str
    replace: str
    entry: str
    breaks: str
    caught_by: str = "crosshair"


_ENTRIES = "kvmspec.spec.crosshair_entries"
_MEMSLOT = "kvmspec.spec.uapi.memslot_rules"
_DIRTY_LOG = "kvmspec.spec.uapi.dirty_log_rules"
_RING = "kvmspec.reference.dirty_ring"
_HPT = "kvmspec.reference.ppc.hpt"
_STAGE2 = "kvmspec.reference.arm64.descriptors"

PLANTED = (
    Planted(
        "memslot-eexist-for-a-forbidden-change",
        "memslot: a forbidden change to an existing slot answered with EEXIST",
        _MEMSLOT,
        'return _reject(EINVAL, "19 forbidden-change")',
        'return _reject(EEXIST, "19 forbidden-change")',
        f"{_MEMSLOT}.decide_for_crosshair",
        "__return__.errno != 17 or overlap",
    ),
    Planted(
        "clear-lookup-before-alignment",
        "CLEAR_DIRTY_LOG: the slot lookup before the alignment check",
        _DIRTY_LOG,
        "    if first_page % BITS_PER_LONG:\n        return EINVAL\n"
        "    if slot_npages is None:\n        return ENOENT\n",
        "    if slot_npages is None:\n        return ENOENT\n"
        "    if first_page % BITS_PER_LONG:\n        return EINVAL\n",
        f"{_DIRTY_LOG}.clear_dirty_log_for_crosshair",
        "first_page % 64 == 0 or __return__ == EINVAL",
    ),
    Planted(
        "clear-one-page-past-the-slot",
        "CLEAR_DIRTY_LOG: a range one page past the slot's end",
        _DIRTY_LOG,
        "num_pages > slot_npages - first_page:",
        "num_pages > slot_npages - first_page + 1:",
        f"{_DIRTY_LOG}.clear_dirty_log_errno",
        "first_page + num_pages <= slot_npages",
    ),
    Planted(
        "ring-used-without-the-wrap",
        "dirty ring: the used count forgets the u32 wrap",
        _RING,
        "return (dirty_index - reset_index) & U32_MAX",
        "return dirty_index - reset_index",
        f"{_RING}.kvm_dirty_ring_used",
        "0 <= __return__",
    ),
    Planted(
        "ring-place-masked-with-size",
        "dirty ring: the place in the ring masks with the size, not size - 1",
        _RING,
        "return index & (size - 1)",
        "return index & size",
        f"{_RING}.kvm_dirty_ring_slot",
        "0 <= __return__ < size",
    ),
    Planted(
        "ring-index-stops-at-the-wrap",
        "dirty ring: an index that stops at 2^32 instead of wrapping",
        _RING,
        "self.dirty_index = (self.dirty_index + 1) & U32_MAX",
        "self.dirty_index = min(self.dirty_index + 1, U32_MAX)",
        f"{_ENTRIES}.dirty_ring_reset_for_crosshair",
        "__return__.dirty_index == (start + pushes) % 2**32",
    ),
    Planted(
        "ring-reset-ignores-the-flag",
        "dirty ring: reset consumes entries userspace did not harvest",
        _RING,
        "if entry is None or not entry.flags & KVM_DIRTY_GFN_F_RESET:",
        "if entry is None:",
        f"{_ENTRIES}.dirty_ring_reset_for_crosshair",
        "harvested % 2**__return__.reset == 2**__return__.reset - 1",
    ),
    Planted(
        "hpt-secondary-one-bit-short",
        "HPT: the secondary hash flips one bit too few",
        _HPT,
        "return group ^ hpt.mask",
        "return group ^ (hpt.mask >> 1)",
        f"{_ENTRIES}.hpt_placement_for_crosshair",
        "__return__.secondary == ~__return__.primary",
    ),
    Planted(
        "hpt-hash-without-the-mask",
        "HPT: the hash forgets the table mask",
        _HPT,
        "return (vsid ^ ((ea & segment.somask) >> segment.base_shift)) & hpt.mask",
        "return vsid ^ ((ea & segment.somask) >> segment.base_shift)",
        f"{_ENTRIES}.hpt_placement_for_crosshair",
        "0 <= __return__.primary < 2 ** (order - 7)",
        caught_by="hypothesis",
    ),
    Planted(
        "hpt-avpn-without-segment-size",
        "HPT: the AVPN leaves out the segment size, so resize rehashes wrongly",
        _HPT,
        "v = (avpn & HPTE_V_AVPN) | (HPTE_V_1TB_SEG if segment.segment_1t else 0)",
        "v = avpn & HPTE_V_AVPN",
        f"{_ENTRIES}.hpt_placement_for_crosshair",
        "__return__.rehashed_same_order == __return__.hpte_index",
        caught_by="hypothesis",
    ),
    Planted(
        "stage2-levels-without-concatenation",
        "stage 2: the levels ignore the 16-page PGD concatenation",
        _STAGE2,
        "return (ia_bits - 4 - 4) // (page_shift - 3)",
        "return (ia_bits - 4) // (page_shift - 3)",
        f"{_ENTRIES}.stage2_walk_for_crosshair",
        "_most_bits(page_shift, __return__.levels - 1) < ia_bits",
    ),
    Planted(
        "stage2-index-mask-off-by-one",
        "stage 2: the table index masks with ptrs_per_pte, not ptrs_per_pte - 1",
        _STAGE2,
        "return (addr >> self.kvm_granule_shift(level)) & (self.ptrs_per_pte - 1)",
        "return (addr >> self.kvm_granule_shift(level)) & self.ptrs_per_pte",
        f"{_ENTRIES}.stage2_walk_for_crosshair",
        "max(__return__.indexes) < 2 ** (page_shift - 3)",
        caught_by="hypothesis",
    ),
)


def _resolve(name: str) -> Callable[..., Any]:
    module_name, _, function = name.rpartition(".")
    return getattr(importlib.import_module(module_name), function)  # type: ignore[no-any-return]


def _plant(planted: Planted) -> Callable[[], None]:
    """Execute ``planted``'s variant of its module into the module object; returns the
    function that puts the module back. The variant keeps every line where it was, so that
    CrossHair, which reads the conditions from the file, reads the right ones."""
    module = importlib.import_module(planted.module)
    source = inspect.getsource(module)
    assert source.count(planted.find) == 1, f"{planted.name}: the text to change is not unique"
    variant = source.replace(planted.find, planted.replace)
    assert variant.count("\n") == source.count("\n"), f"{planted.name}: lines moved"
    saved = dict(module.__dict__)
    exec(compile(variant, inspect.getfile(module), "exec"), module.__dict__)

    def restore() -> None:
        module.__dict__.clear()
        module.__dict__.update(saved)

    return restore


# -- the child processes: CrossHair itself -------------------------------------------------


def _explore(entry: str, seconds: float, only: str = "") -> list[dict[str, Any]]:
    """CrossHair's verdict on each postcondition of ``entry`` (those containing ``only``)."""
    from crosshair.core_and_libs import analyze_function
    from crosshair.options import AnalysisOptionSet

    options = AnalysisOptionSet(per_condition_timeout=seconds, per_path_timeout=seconds / 2)
    verdicts = []
    for checkable in analyze_function(_resolve(entry), options):
        conditions = getattr(checkable, "conditions", None)
        condition = conditions.post[0].expr_source if conditions is not None else "(syntax)"
        if only not in condition:
            continue
        started = time.process_time()
        messages = list(checkable.analyze())
        worst = max(messages, key=lambda message: message.state)
        verdicts.append(
            {
                "entry": entry,
                "condition": condition,
                "state": worst.state.value,
                "message": worst.message,
                "seconds": round(time.process_time() - started, 2),
            }
        )
    return verdicts


def _child(mode: str) -> None:
    """Print one JSON line per verdict: for every postcondition of every entry, or for the
    postcondition each planted bug CrossHair is to catch must break."""
    if mode == "entries":
        for entry in ENTRIES:
            for verdict in _explore(entry, CONDITION_SECONDS):
                print(json.dumps(verdict), flush=True)
        return
    for planted in PLANTED:
        if planted.caught_by != "crosshair":
            continue
        restore = _plant(planted)
        try:
            for verdict in _explore(planted.entry, PLANT_SECONDS, only=planted.breaks):
                print(json.dumps({"planted": planted.name, **verdict}), flush=True)
        finally:
            restore()


def _package_tree(folder: Path) -> Path:
    """kvmspec as a regular package made of symlinks, as ``make crosshair`` makes it:
    CrossHair reads options from every parent package's ``__init__.py``, which the editable
    install's namespace package does not have."""
    root = Path(__file__).resolve().parent.parent
    package = folder / "kvmspec"
    package.mkdir()
    (package / "__init__.py").write_text('"""kvmspec as a regular package, for CrossHair."""\n')
    for part in ("spec", "reference", "fuzz"):
        (package / part).symlink_to(root / part)
    return folder


# -- the tests ------------------------------------------------------------------------------

needs_crosshair = pytest.mark.skipif(
    importlib.util.find_spec("crosshair") is None,
    reason="crosshair-tool is not installed (it is in the dev extra: pip install -e '.[dev]')",
)


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Both children's verdicts, by mode; the two run at the same time."""
    tree = _package_tree(tmp_path_factory.mktemp("crosshair"))
    env = {**os.environ, "KVMSPEC_CONTRACTS": "off", "PYTHONPATH": str(tree)}
    children = {
        mode: subprocess.Popen(
            [sys.executable, __file__, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )
        for mode in ("entries", "planted")
    }
    results = {}
    for mode, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, f"the {mode} child failed:\n{err[-3000:]}"
        results[mode] = [json.loads(line) for line in out.splitlines()]
    return results


@needs_crosshair
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.rpartition(".")[2])
def test_no_postcondition_has_a_counterexample(
    verdicts: dict[str, list[dict[str, Any]]], entry: str
) -> None:
    """Each postcondition is confirmed over all paths, or no counterexample turned up in the
    time allowed; a failing or erroring condition, or preconditions no input satisfies,
    fail the test."""
    found = [verdict for verdict in verdicts["entries"] if verdict["entry"] == entry]
    assert found, f"{entry} has no postconditions CrossHair can read"
    bad = [v for v in found if v["state"] not in ("confirmed", "cannot_confirm")]
    assert not bad, "\n".join(f"{v['condition']}: {v['state']}: {v['message']}" for v in bad)


@needs_crosshair
@pytest.mark.parametrize(
    "planted",
    [planted for planted in PLANTED if planted.caught_by == "crosshair"],
    ids=lambda planted: planted.name,
)
def test_crosshair_catches_the_planted_bug(
    verdicts: dict[str, list[dict[str, Any]]], planted: Planted
) -> None:
    """The postcondition the planted bug breaks gets a counterexample."""
    found = [verdict for verdict in verdicts["planted"] if verdict["planted"] == planted.name]
    assert len(found) == 1, f"no single postcondition of {planted.entry} has {planted.breaks!r}"
    assert found[0]["state"] == "post_fail", found[0]


def test_make_crosshair_checks_these_entries() -> None:
    """The Makefile's list (CROSSHAIR_ENTRIES) is this file's: the long form checks what the
    bounded form checks."""
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    _, found, rest = makefile.partition("CROSSHAIR_ENTRIES := \\\n")
    if not found:
        pytest.skip("the Makefile's crosshair target does not list CROSSHAIR_ENTRIES yet")
    listed = []
    for line in rest.splitlines():
        listed.append(line.strip().rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    assert listed == list(ENTRIES)


def test_every_entry_meets_a_bug_crosshair_must_catch() -> None:
    """No entry's check passes only because CrossHair never reaches its postconditions:
    each has a planted bug that CrossHair itself must find."""
    caught = {planted.entry for planted in PLANTED if planted.caught_by == "crosshair"}
    assert set(ENTRIES) <= caught, set(ENTRIES) - caught


# -- the same contracts on drawn inputs (Hypothesis) ----------------------------------------


def _u32() -> st.SearchStrategy[int]:
    """Any u32, with the values around the wrap drawn often."""
    return st.integers(0, 2**32 - 1) | st.integers(2**32 - 4, 2**32 - 1)


@st.composite
def _clear_dirty_log_args(draw: st.DrawFn) -> tuple[Any, ...]:
    """Requests near the edges that matter: slot numbers around the internal slots, ranges
    around a small slot's end and 64-page words."""
    as_id = draw(st.integers(0, 2) | st.integers(0, 0xFFFF))
    slot_id = draw(st.integers(0, 4) | st.integers(32760, 32770) | st.integers(0, 0xFFFF))
    npages = draw(st.integers(0, 300) | st.integers(0, 2**31 - 1))
    first_page = draw(st.sampled_from([0, 64, 128, 256]) | st.integers(0, 2**64 - 1))
    num_pages = draw(st.integers(0, 320) | st.integers(0, 2**32 - 1))
    x86, uses_bitmap = draw(st.booleans()), draw(st.booleans())
    return x86, uses_bitmap, as_id << 16 | slot_id, npages, first_page, num_pages


@st.composite
def _ring_args(draw: st.DrawFn) -> tuple[Any, ...]:
    pushes = draw(st.integers(0, 3))
    return draw(st.integers(8, 16)), draw(_u32()), pushes, draw(st.integers(0, 2**pushes - 1))


@st.composite
def _hpt_args(draw: st.DrawFn) -> tuple[Any, ...]:
    segment_1t = draw(st.booleans())
    return (
        draw(st.integers(18, 46)),
        draw(st.integers(18, 46)),
        draw(st.integers(0, 2 ** (38 if segment_1t else 50) - 1)),
        segment_1t,
        draw(st.sampled_from([12, 16, 24, 34] if segment_1t else [12, 16, 24])),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.booleans()),
        draw(st.integers(0, 7)),
    )


@st.composite
def _stage2_args(draw: st.DrawFn) -> tuple[Any, ...]:
    page_shift = draw(st.sampled_from([12, 14, 16]))
    ia_bits = draw(st.integers(32, 52 if page_shift == 16 else 48))
    return page_shift, ia_bits, draw(st.integers(0, 2**ia_bits - 1))


DRAWN: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "kvmspec.spec.uapi.dirty_log_rules.clear_dirty_log_for_crosshair": _clear_dirty_log_args(),
    "kvmspec.reference.dirty_ring.kvm_dirty_ring_used": st.tuples(_u32(), _u32()),
    "kvmspec.reference.dirty_ring.kvm_dirty_ring_slot": st.tuples(
        _u32(), st.integers(0, 16).map(lambda shift: 1 << shift)
    ),
    f"{_ENTRIES}.dirty_ring_reset_for_crosshair": _ring_args(),
    f"{_ENTRIES}.hpt_placement_for_crosshair": _hpt_args(),
    f"{_ENTRIES}.stage2_walk_for_crosshair": _stage2_args(),
}
"""Inputs inside each entry's preconditions (tests/test_dbc.py draws the memslot entry's)."""


def _conditions_of(entry: str) -> Callable[[tuple[Any, ...]], None]:
    """Call ``entry`` with its contract enforced, checking the pure ring functions' lines
    too (the model calls those unwrapped, for speed)."""
    from kvmspec.spec import dbc

    function = _resolve(entry)
    checked = dbc.checked(function) if not hasattr(function, "__wrapped__") else function
    return lambda args: checked(*args)


@pytest.fixture
def enforced() -> None:
    from kvmspec.spec import dbc

    if not dbc.ENABLED:
        pytest.skip("KVMSPEC_CONTRACTS=off: the contracts are not enforced at run time")


@pytest.mark.usefixtures("enforced")
@pytest.mark.parametrize("entry", list(DRAWN), ids=lambda entry: entry.rpartition(".")[2])
def test_the_contracts_hold_on_drawn_inputs(entry: str) -> None:
    """The model keeps every contract on inputs Hypothesis draws from the preconditions:
    where CrossHair only samples (the HPT hash's XORs), this is the check that searches."""
    call = _conditions_of(entry)

    @settings(max_examples=300)
    @given(args=DRAWN[entry])
    def holds(args: tuple[Any, ...]) -> None:
        call(args)

    holds()


@pytest.fixture
def planted_in_process(request: pytest.FixtureRequest) -> Iterator[Planted]:
    restore = _plant(request.param)
    try:
        yield request.param
    finally:
        restore()


@pytest.mark.usefixtures("enforced")
@pytest.mark.parametrize(
    "planted_in_process",
    [planted for planted in PLANTED if planted.caught_by == "hypothesis"],
    ids=lambda planted: planted.name,
    indirect=True,
)
def test_hypothesis_catches_the_planted_bug(planted_in_process: Planted) -> None:
    """Drawing from the entry's preconditions soon finds inputs on which the planted bug
    breaks the postcondition it is expected to break."""
    from kvmspec.spec.dbc import ContractViolation

    planted = planted_in_process
    call = _conditions_of(planted.entry)

    def breaks(args: tuple[Any, ...]) -> bool:
        try:
            call(args)
        except ContractViolation as violation:
            return planted.breaks in str(violation)
        return False

    find(DRAWN[planted.entry], breaks, settings=settings(max_examples=2000, database=None))


if __name__ == "__main__":
    os.environ["KVMSPEC_CONTRACTS"] = "off"  # before the model is imported
    _child(sys.argv[1])
