"""White-box invariants of the memslot layer and the dirty ring, checked on reference state.

:class:`InvariantMonitor` is attached to one model VM. It checks the state predicates after
every step (``check()``), and it instruments two arch hooks so that the rules about the
*moment* of an event (M12, S000, M6's step size) are checked when the event happens. Each
violation names its rule from :mod:`kvmspec.spec.rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.memslots import KvmMemslots
from kvmspec.reference.ordered import floor_value
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.notifiers import NotifierCounters
from kvmspec.spec.invariants.warnings import check_no_warnings
from kvmspec.spec.uapi.constants import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
)

Sets = list[tuple[int, KvmMemslots, KvmMemslots]]
"""(as_id, active set, inactive set) for every address space, gathered once per check."""


def _sets(kvm: Kvm) -> Sets:
    return [
        (as_id, kvm.memslots(as_id), kvm.inactive_memslots(as_id))
        for as_id in range(kvm.profile.nr_address_spaces)
    ]


def check_m1_no_overlap(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    for as_id, active, _ in sets:
        previous: KvmMemorySlot | None = None
        for slot in active:
            if previous is not None and slot.base_gfn < previous.end_gfn:
                yield Violation("M1", f"as {as_id}: {previous} overlaps {slot}")
            previous = slot


def check_m2_ids(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    internal = set(kvm.profile.internal_slot_ids())
    for as_id, active, _ in sets:
        for slot_id, slot in active.id_hash.items():
            if slot.id != slot_id or slot.as_id != as_id:
                yield Violation("M2", f"id index {as_id}:{slot_id} holds {slot}")
            elif slot_id >= KVM_MEM_SLOTS_NUM or (
                slot_id >= kvm.profile.user_mem_slots and slot_id not in internal
            ):
                yield Violation("M2", f"slot id {slot_id} is neither a user nor internal id")


def hva_covers(slots: KvmMemslots, page_shift: int) -> list[tuple[int, tuple[int, ...]]]:
    """The hva index a set's slots determine: a boundary wherever the set of slot ids that
    cover an address changes (and nowhere else), each with those ids in order. One sweep
    over the slots' ends, sorted."""
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for slot in slots.id_hash.values():
        start = slot.userspace_addr
        starts.setdefault(start, []).append(slot.id)
        ends.setdefault(start + (slot.npages << page_shift), []).append(slot.id)
    covering: set[int] = set()
    covers: list[tuple[int, tuple[int, ...]]] = []
    previous: tuple[int, ...] = ()
    for point in sorted(starts.keys() | ends.keys()):
        covering.difference_update(ends.get(point, ()))
        covering.update(starts.get(point, ()))
        cover = tuple(sorted(covering))
        if cover != previous:
            covers.append((point, cover))
            previous = cover
    return covers


def check_m3_m4_indexes(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    shift = kvm.profile.page_shift
    for as_id, active, inactive in sets:
        expected_by_active = hva_covers(active, shift)
        for slots in (active, inactive):
            by_id = set(map(id, slots.id_hash.values()))
            by_gfn = set(map(id, slots.gfn_tree))
            if by_id != by_gfn:
                yield Violation("M4", f"as {as_id}: id index and gfn tree disagree")
            for slot in slots.gfn_tree:
                if slot.npages <= 0:
                    yield Violation("M3", f"{slot} has no pages")
                # The tree files each slot under the base gfn it had when it went in: a slot
                # changed in place since then is no longer found by its own base gfn.
                if floor_value(slots.gfn_tree, slot.base_gfn) is not slot:
                    yield Violation("M4", f"{slot} is not found by its base gfn")
            # The hva index must be exactly the one the slots determine: no id missing, none
            # left over (a stale id), no extra boundary.
            stored = [(start, tuple(sorted(cover))) for start, cover in slots.hva_tree.covers()]
            # Between updates both sets hold the same slots (M5), so usually one sweep serves.
            same_slots = slots is active or slots.id_hash == active.id_hash
            expected = expected_by_active if same_slots else hva_covers(slots, shift)
            if stored != expected:
                # The first boundary where they part (or where the shorter one ends).
                at = 0
                while at < min(len(stored), len(expected)) and stored[at] == expected[at]:
                    at += 1
                held = stored[at] if at < len(stored) else "nothing more"
                given = expected[at] if at < len(expected) else "nothing more"
                yield Violation("M4", f"as {as_id}: hva index holds {held}, the slots give {given}")


def check_m5_sets_agree(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    for as_id, active, inactive in sets:
        if active.id_hash != inactive.id_hash:
            yield Violation("M5", f"as {as_id}: active and inactive sets differ between updates")


def check_m7_m8_counters(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    pages = logging = 0
    for _as_id, active, _ in sets:
        for slot in active:
            pages += slot.npages
            logging += slot.dirty_logging
    if kvm.nr_memslot_pages != pages:
        yield Violation("M7", f"nr_memslot_pages {kvm.nr_memslot_pages}, slots hold {pages}")
    if kvm.nr_memslots_dirty_logging != logging:
        yield Violation("M8", f"nr_memslots_dirty_logging {kvm.nr_memslots_dirty_logging}")


def check_m9_bitmaps(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    uses_bitmap = kvm.use_dirty_bitmap()
    for _as_id, active, _ in sets:
        for slot in active:
            has_bitmap = slot.dirty_bitmap is not None
            # A slot logged before the ring was enabled keeps its (now unused) bitmap.
            if (not slot.dirty_logging and has_bitmap) or (
                slot.dirty_logging and uses_bitmap and not has_bitmap
            ):
                yield Violation("M9", f"{slot}: bitmap present={has_bitmap}")
            if slot.is_gmem and (slot.dirty_logging or slot.readonly):
                yield Violation("M9", f"{slot}: guest_memfd slot logged or read-only")
            bitmap = slot.dirty_bitmap
            if bitmap is not None and bitmap.npages != slot.npages:
                yield Violation("D6", f"{slot}: bitmap sized for {bitmap.npages} pages")
            tail_bits = slot.npages % 64
            if bitmap is not None and tail_bits and bitmap.word(bitmap.nr_words - 1) >> tail_bits:
                yield Violation("D6", f"{slot}: a dirty bit beyond npages")


def check_m10_no_freed_slot(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    for _as_id, active, inactive in sets:
        for slots in (active, inactive):
            for slot in slots.id_hash.values():
                if slot.freed:
                    yield Violation("M10", f"freed {slot} still reachable")
            if slots.last_used_slot is not None and slots.last_used_slot.freed:
                yield Violation("M10", "last_used_slot points at a freed slot")


def check_d7_rings(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    for vcpu in kvm.vcpus.values():
        ring = vcpu.dirty_ring
        if ring is None:
            continue
        used = ring.used()
        if not 0 <= used <= ring.size:
            yield Violation("D7", f"vcpu {vcpu.vcpu_id}: {used} entries used of {ring.size}")
        live = set(ring.places_in_use())  # the u32 indexes may have wrapped
        for position, entry in ring.entries.items():
            if position not in live:
                yield Violation("D7", f"vcpu {vcpu.vcpu_id}: stale entry at {position}")
            # KVM writes DIRTY; userspace may then write RESET, with or without DIRTY.
            elif not entry.flags or entry.flags & ~(KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET):
                yield Violation("D7", f"vcpu {vcpu.vcpu_id}: entry flags {entry.flags:#x}")


def check_g1_gmem_bindings(kvm: Kvm, sets: Sets) -> Iterator[Violation]:
    """Every bound guest_memfd range belongs to the active slot of that id, and every active
    guest_memfd slot holds its binding (nothing leaked by a failed create or a delete)."""
    for file in kvm.gmem_files:
        for pgoff, (npages, slot) in file.bindings.items():
            active = kvm.memslots(slot.as_id).id_to_memslot(slot.id)
            if slot.freed or active is not slot:
                yield Violation("G1", f"pages {pgoff}+{npages} bound to a dead slot {slot}")
            elif (
                slot.gmem_pgoff != pgoff
                or slot.npages != npages
                or pgoff + npages > (file.size >> kvm.profile.page_shift)
            ):
                yield Violation("G1", f"{slot}: binding {pgoff}+{npages} does not match")
    for _as_id, active_set, _ in sets:
        for slot in active_set.id_hash.values():
            if slot.is_gmem and (
                slot.gmem_file is None or slot.gmem_file.bindings.get(slot.gmem_pgoff) is None
            ):
                yield Violation("G1", f"{slot} is a guest_memfd slot without its binding")


STATE_CHECKS: dict[str, Callable[[Kvm, Sets], Iterator[Violation]]] = {
    "M1": check_m1_no_overlap,
    "M2": check_m2_ids,
    "M3/M4": check_m3_m4_indexes,
    "M5": check_m5_sets_agree,
    "M7/M8": check_m7_m8_counters,
    "M9/D6": check_m9_bitmaps,
    "M10": check_m10_no_freed_slot,
    "D7": check_d7_rings,
    "G1": check_g1_gmem_bindings,
}
# What a step that is not a memslot update can change: bitmaps, the ring, the log mode.
CONTENT_CHECKS = {name: STATE_CHECKS[name] for name in ("M9/D6", "D7", "G1")}
# A failing DELETE or MOVE swapped twice: both sets must agree again, and the INVALID copy it
# swapped out must be gone from both.
AFTER_FAILURE_CHECKS = {name: STATE_CHECKS[name] for name in ("M5", "M10")}


class InvariantMonitor:
    """Checks every memslot-layer invariant of one model VM.

    Call :meth:`check` between operations (no update in flight). Violations observed at the
    moment of an arch hook are collected as they happen and returned by the next ``check``.
    """

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.generations = [kvm.memslots(a).generation for a in range(len(kvm.memslot_sets))]
        self.active_identity: dict[int, tuple[KvmMemorySlot, tuple[object, ...]]] = {}
        self.pending: list[Violation] = []
        self.notifiers = NotifierCounters(kvm)
        self.checks_run = 0
        self._check_active_unmodified(_sets(kvm))
        self._instrument()

    def _instrument(self) -> None:
        """Wrap two hooks of this VM's arch object (any architecture) to check event rules."""
        arch = self.kvm.arch
        flush = arch.kvm_arch_flush_shadow_memslot
        updated = arch.kvm_arch_memslots_updated

        def checked_flush(kvm: Kvm, slot: KvmMemorySlot) -> None:
            self._check_flush_moment(kvm, slot)
            flush(kvm, slot)

        def checked_updated(kvm: Kvm, generation: int) -> None:
            self._check_generation_step(kvm, generation)
            updated(kvm, generation)

        arch.kvm_arch_flush_shadow_memslot = checked_flush  # type: ignore[method-assign]
        arch.kvm_arch_memslots_updated = checked_updated  # type: ignore[method-assign]

    def _check_flush_moment(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        active = kvm.memslots(slot.as_id)
        copy = active.id_to_memslot(slot.id)
        if copy is None or copy is slot or not copy.invalid:
            self.pending.append(
                Violation("M12", f"flush of {slot} while the active set holds {copy}")
            )
            return
        # Seed 000: the INVALID slot must still be found, by gfn and by hva.
        if active.search_memslots(slot.base_gfn) is not copy:
            self.pending.append(Violation("S000-INVALID-FINDABLE", f"{copy} not found by gfn"))
        if copy not in active.hva_to_memslots(copy.userspace_addr, copy.userspace_addr + 1):
            self.pending.append(Violation("S000-INVALID-FINDABLE", f"{copy} not found by hva"))

    def _check_generation_step(self, kvm: Kvm, generation: int) -> None:
        nr_as = kvm.profile.nr_address_spaces
        as_id = generation % nr_as
        expected = self.generations[as_id] + nr_as
        if generation != expected:
            self.pending.append(
                Violation("M6", f"as {as_id}: generation {generation:#x}, expected {expected:#x}")
            )
        self.generations[as_id] = generation

    def _check_active_unmodified(self, sets: Sets) -> list[Violation]:
        """Seed 003: objects that stayed in the active set must not have changed. Takes the
        snapshot the next check compares against."""
        violations = []
        snapshot: dict[int, tuple[KvmMemorySlot, tuple[object, ...]]] = {}
        for _as_id, active, _ in sets:
            for slot in active.id_hash.values():
                identity = slot.identity()
                before = self.active_identity.get(id(slot))
                if before is not None and before[0] is slot and before[1] != identity:
                    violations.append(
                        Violation("S003-ACTIVE-IMMUTABLE", f"{slot} was modified while active")
                    )
                snapshot[id(slot)] = (slot, identity)
        self.active_identity = snapshot
        return violations

    def _check_generations(self, sets: Sets) -> Iterator[Violation]:
        for as_id, active, _ in sets:
            generation = active.generation
            if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
                yield Violation("M6", f"as {as_id}: update still marked in progress")
            if generation % self.kvm.profile.nr_address_spaces != as_id:
                yield Violation("M6", f"as {as_id}: generation {generation} not ≡ as_id")
            if generation != self.generations[as_id]:
                yield Violation("M6", f"as {as_id}: generation moved without a swap")

    def check(self, failed: bool = False, memslots_changed: bool = True) -> list[Violation]:
        """All violations since the last call; empty when the model is sound.

        ``failed`` says the step was an ioctl that returned an error. Such a step must leave
        the memslots as they were (only a failing DELETE or MOVE moves the generation, by its
        two swaps), so the monitor checks that the active slots are the same objects with the
        same contents (ERR-NO-CHANGE) instead of re-deriving every index.
        ``memslots_changed`` False says the step was not a memslot update (a dirty-log ioctl,
        a capability): the indexes are then only re-derived after the next update, while the
        slots' contents, bitmaps and rings are checked now. An index broken by such a step
        stays broken, so the next full check finds it; after a failed update the two sets are
        compared at once (M5, M10), since the next update could otherwise repair the damage.
        """
        self.checks_run += 1
        violations = self.pending
        self.pending = []
        sets = _sets(self.kvm)
        before = self.active_identity
        violations.extend(self._check_active_unmodified(sets))
        violations.extend(self._check_generations(sets))
        violations.extend(self.notifiers.check())
        violations.extend(check_no_warnings(self.kvm))
        if failed:
            if self.active_identity.keys() != before.keys():
                violations.append(
                    Violation("ERR-NO-CHANGE", "a failed ioctl added or removed a memslot")
                )
            checks = AFTER_FAILURE_CHECKS
        elif memslots_changed:
            checks = STATE_CHECKS
        else:
            checks = CONTENT_CHECKS
        for checker in checks.values():
            violations.extend(checker(self.kvm, sets))
        return violations


# Which rules this module checks (the docs' catalogue lists the checker of each rule).
CHECKED_RULES = (
    "M1",
    "M2",
    "M3",
    "M4",
    "M5",
    "M6",
    "M7",
    "M8",
    "M9",
    "M10",
    "M12",
    "S003-ACTIVE-IMMUTABLE",
    "S000-INVALID-FINDABLE",
    "ERR-NO-CHANGE",
    "G1",
    "N1",
    "N2",
    "N3",
    "N6",
    "D6",
    "D7",
    "LOCKING",
)

# Rules that need a particular interleaving or a planted fault are checked by named scenario
# tests instead of the per-step monitor.
SCENARIO_TESTS = {
    "M11": "tests/test_reference_memslots.py::test_memslot_swap_waits_for_notifier_invalidations",
    "M14": "tests/test_reference_memslots.py::"
    "test_failed_move_keeps_the_old_slot_but_still_swapped_twice",
    "D9": "tests/test_reference_memslots.py::test_ring_reset_consumes_only_the_harvested_prefix",
}
