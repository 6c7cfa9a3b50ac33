"""The memslot layer of the reference model: named scenarios from the seed threads, the
rules that need a particular interleaving, and the sparse data structures against plain
definitions."""

from __future__ import annotations

import tracemalloc
from errno import EEXIST, EINVAL

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.fuzz.seed_bugs import SEED_BUGS
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import (
    Deadlock,
    KernelOp,
    Preempt,
    WaitUntil,
    run_to_completion,
)
from kvmspec.reference.dirty_bitmap import DirtyBitmap
from kvmspec.reference.dirty_ring import KvmDirtyGfn, KvmDirtyRing, kvm_dirty_ring_slot
from kvmspec.reference.hva_index import HvaIndex
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot, kvm_copy_memslot
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.spec.invariants.memslots import InvariantMonitor
from kvmspec.spec.platforms import DEFAULT_PROFILE, X86_64
from kvmspec.spec.uapi.constants import (
    KVM_DIRTY_GFN_ENTRY_SIZE,
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    KVM_MEM_LOG_DIRTY_PAGES,
)
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

HVA = 0x7F00_0000_0000
PAGE = 4096


def set_region(kvm: Kvm, slot: int, gpa: int, size: int, flags: int = 0, hva: int = HVA) -> int:
    region = MemoryRegion(slot, flags, gpa, size, hva)
    return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1))


def monitored_vm() -> tuple[Kvm, InvariantMonitor]:
    kvm = Kvm(DEFAULT_PROFILE)
    return kvm, InvariantMonitor(kvm)


def test_failed_move_keeps_the_old_slot_but_still_swapped_twice() -> None:
    """M14: a MOVE beyond the 52-bit gfn limit fails in arch prepare, after the INVALID copy
    was published and the slot's mappings flushed; the old slot comes back unchanged."""
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 2 * PAGE) == 0
    old = kvm.memslots(0).id_to_memslot(0)
    generation = kvm.memslots(0).generation
    kvm.arch.events.clear()

    assert set_region(kvm, 0, (1 << 52) - PAGE, 2 * PAGE) == EINVAL

    assert kvm.memslots(0).id_to_memslot(0) is old
    assert old is not None and old.base_gfn == (1 << 20) >> 12 and not old.invalid
    assert kvm.memslots(0).generation == generation + 2
    assert ("flush_shadow_memslot", old) in kvm.arch.events
    assert monitor.check() == []


def test_identical_resubmit_changes_nothing() -> None:
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE, KVM_MEM_LOG_DIRTY_PAGES) == 0
    generation = kvm.memslots(0).generation
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE, KVM_MEM_LOG_DIRTY_PAGES) == 0
    assert kvm.memslots(0).generation == generation
    assert monitor.check() == []


def test_memslot_swap_waits_for_notifier_invalidations() -> None:
    """M11: with an invalidation in flight, the swap is not runnable until it ends."""
    kvm, monitor = monitored_vm()
    kvm.mn_active_invalidate_count = 1
    op = kvm_main.kvm_vm_ioctl_set_memory_region(kvm, MemoryRegion(0, 0, 0, PAGE, HVA), 1)
    step = next(op)
    assert isinstance(step, WaitUntil) and not step.ready()
    assert kvm.memslots(0).id_to_memslot(0) is None  # nothing published yet

    kvm.mn_active_invalidate_count = 0  # invalidate_range_end
    assert step.ready()
    steps = [op.send(None)]
    with pytest.raises(StopIteration) as done:
        while True:
            steps.append(op.send(None))
    assert done.value.value == 0
    assert any(isinstance(s, Preempt) for s in steps)
    assert kvm.memslots(0).id_to_memslot(0) is not None
    assert monitor.check() == []


def test_run_to_completion_reports_a_deadlock() -> None:
    kvm = Kvm(DEFAULT_PROFILE)
    kvm.mn_active_invalidate_count = 1
    with pytest.raises(Deadlock, match="MMU-notifier"):
        set_region(kvm, 0, 0, PAGE)


def test_seed_003_modifying_an_active_slot_is_caught() -> None:
    """A variant that updates flags in place on the active slot (the bug seed 003's invariant
    forbids, planted from kvmspec.fuzz.seed_bugs) must be reported."""
    (bug,) = [bug for bug in SEED_BUGS if bug.seed == "003"]
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE) == 0
    assert monitor.check() == []
    with bug.plant():
        assert set_region(kvm, 0, 1 << 20, 16 * PAGE, KVM_MEM_LOG_DIRTY_PAGES) == 0
    rules = {violation.rule for violation in monitor.check()}
    assert "S003-ACTIVE-IMMUTABLE" in rules


@pytest.mark.parametrize("damage", ["stale id", "missing id", "extra boundary"])
def test_a_damaged_hva_index_is_caught(damage: str) -> None:
    """M4: the hva index must be exactly what the slots give. A stale id (a slot that is
    gone), a missing id, or a boundary between equal covers in either set is reported."""
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE) == 0
    assert set_region(kvm, 1, 2 << 20, 16 * PAGE, hva=HVA + 8 * PAGE) == 0  # aliases slot 0
    assert monitor.check() == []
    index = kvm.inactive_memslots(0).hva_tree
    if damage == "stale id":
        index.insert(HVA + 64 * PAGE, HVA + 65 * PAGE, 7)
    elif damage == "missing id":
        index.remove(HVA, HVA + 16 * PAGE, 0)
    else:
        index._segments[HVA + 2 * PAGE] = index.ids_at(HVA + 2 * PAGE)
    messages = [str(violation) for violation in monitor.check()]
    assert any(message.startswith("M4") and "hva index" in message for message in messages)


@pytest.mark.parametrize("damage", ["moved in place", "missing from the tree"])
def test_a_damaged_gfn_tree_is_caught(damage: str) -> None:
    """M4: every slot of the id index is in the gfn tree, filed under its own base gfn. A slot
    whose base gfn changes in place (the tree still files it under the old one), or a slot
    missing from the tree, is reported."""
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE) == 0
    assert set_region(kvm, 1, 2 << 20, 16 * PAGE) == 0
    assert monitor.check() == []
    slots = kvm.inactive_memslots(0)
    slot = slots.id_to_memslot(1)
    assert slot is not None
    if damage == "moved in place":
        slot.base_gfn = 0x80  # below slot 0, so the tree's order no longer finds it
        expected = "not found by its base gfn"
    else:
        slots.gfn_tree.remove(slot)
        expected = "id index and gfn tree disagree"
    messages = [str(violation) for violation in monitor.check()]
    assert any(message.startswith("M4") and expected in message for message in messages)


def test_flushing_before_the_invalid_copy_is_published_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """M12 (seed 003): a variant that asks the architecture to drop the slot's mappings
    before the INVALID copy is visible leaves a window in which a vCPU can map the slot
    again; the monitor must report it."""
    original = kvm_main.kvm_invalidate_memslot

    def flush_first(
        kvm: Kvm, old: KvmMemorySlot, invalid_slot: KvmMemorySlot, owner: object
    ) -> KernelOp[None]:
        kvm.arch.kvm_arch_flush_shadow_memslot(kvm, old)
        yield from original(kvm, old, invalid_slot, owner)

    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE) == 0
    monkeypatch.setattr(kvm_main, "kvm_invalidate_memslot", flush_first)
    assert set_region(kvm, 0, 0, 0) == 0
    assert "M12" in {violation.rule for violation in monitor.check()}


def test_internal_slots_are_out_of_userspace_reach() -> None:
    kvm, monitor = monitored_vm()
    apic_access_page = 32765
    assert set_region(kvm, apic_access_page, 0xFEE00000, PAGE) == EINVAL
    created = kvm_main.kvm_set_internal_memslot(kvm, apic_access_page, 0xFEE00000, PAGE, HVA)
    assert run_to_completion(created) == 0
    assert kvm.memslots(0).id_to_memslot(apic_access_page) is not None
    # The internal slot still occupies guest-physical space.
    assert set_region(kvm, 0, 0xFEE00000, PAGE) == EEXIST
    assert run_to_completion(kvm_main.kvm_set_internal_memslot(kvm, 7, 0, PAGE, HVA)) == EINVAL
    assert monitor.check() == []


def test_smm_address_space_has_its_own_generations() -> None:
    kvm = Kvm(X86_64)
    monitor = InvariantMonitor(kvm)
    assert set_region(kvm, 1 << 16, 0, PAGE) == 0  # as_id 1
    assert set_region(kvm, 0, 0, PAGE) == 0  # no overlap across address spaces
    assert kvm.memslots(0).generation % 2 == 0 and kvm.memslots(1).generation % 2 == 1
    assert monitor.check() == []


def test_aliased_hva_finds_every_slot() -> None:
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE) == 0
    assert set_region(kvm, 1, 1 << 30, 16 * PAGE) == 0
    found = kvm.memslots(0).hva_to_memslots(HVA + PAGE, HVA + 2 * PAGE)
    assert sorted(slot.id for slot in found) == [0, 1]
    assert monitor.check() == []


def test_a_terabyte_dirty_logged_slot_costs_constant_memory() -> None:
    """Nothing is sized by guest memory: a 1 TiB dirty-logged slot stores no bitmap words."""
    kvm = Kvm(DEFAULT_PROFILE)
    tracemalloc.start()
    hva = 0x1000_0000_0000
    assert set_region(kvm, 0, 1 << 40, 1 << 40, KVM_MEM_LOG_DIRTY_PAGES, hva) == 0
    size, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    slot = kvm.memslots(0).id_to_memslot(0)
    assert slot is not None and slot.dirty_bitmap is not None
    assert slot.dirty_bitmap.stored_words() == 0
    assert size < 64 * 1024


def test_get_dirty_log_reprotects_then_flushes_before_copying() -> None:
    """D2: swap each word with zero and re-protect, flush, and only then copy out."""
    kvm, monitor = monitored_vm()
    assert set_region(kvm, 0, 1 << 20, 100 * PAGE, KVM_MEM_LOG_DIRTY_PAGES) == 0
    slot = kvm.memslots(0).id_to_memslot(0)
    assert slot is not None and slot.dirty_bitmap is not None
    slot.dirty_bitmap.set_bit(3)
    slot.dirty_bitmap.set_bit(70)
    kvm.arch.events.clear()
    op = kvm_main_get(kvm)
    step = next(op)
    assert isinstance(step, Preempt) and "copy_to_user" in step.point
    names = [name for name, _ in kvm.arch.events]
    assert names == ["reprotect", "reprotect", "flush_tlbs_memslot"]
    with pytest.raises(StopIteration) as done:
        op.send(None)
    assert done.value.value == (0, [1 << 3, 1 << 6])
    assert not any(slot.dirty_bitmap.words())
    assert monitor.check() == []


def kvm_main_get(kvm: Kvm) -> KernelOp[tuple[int, list[int]]]:
    from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect

    return kvm_get_dirty_log_protect(kvm, 0)


def test_ring_reset_consumes_only_the_harvested_prefix() -> None:
    """D9: entries are consumed in order, up to the first one userspace did not harvest."""
    ring = KvmDirtyRing(size=8, reserved=2)
    for offset in range(5):
        ring.push(0, offset)
    for position in (0, 1, 3):
        ring.entries[position].flags |= KVM_DIRTY_GFN_F_RESET
    consumed = ring.reset()
    assert [entry.offset for entry in consumed] == [0, 1]
    assert ring.used() == 3 and ring.reset_index == 2
    assert not ring.soft_full()


def test_the_ring_checks_follow_the_u32_wrap() -> None:
    """D7 across the wrap of the u32 indexes: entries pushed on both sides of 2^32 are live
    (not "stale"), and a stale one is still caught there."""
    kvm, monitor = monitored_vm()
    kvm.dirty_ring_size = 8 * KVM_DIRTY_GFN_ENTRY_SIZE
    assert kvm_vm_ioctl_create_vcpu(kvm, 0) == 0
    ring = kvm.vcpus[0].dirty_ring
    assert ring is not None
    ring.dirty_index = ring.reset_index = (1 << 32) - 2
    for offset in range(4):
        ring.push(0, offset)
    assert ring.dirty_index == 2 and ring.used() == 4
    assert not [v for v in monitor.check() if v.rule == "D7"]
    ring.entries[kvm_dirty_ring_slot(5, ring.size)] = KvmDirtyGfn(KVM_DIRTY_GFN_F_DIRTY, 0, 9)
    assert [v.rule for v in monitor.check() if v.rule == "D7"] == ["D7"]


@given(
    npages=st.integers(1, 300),
    initially_set=st.booleans(),
    actions=st.lists(
        st.tuples(st.sampled_from(["set", "xchg", "andnot"]), st.integers(0, 299), st.integers()),
        max_size=40,
    ),
)
def test_sparse_bitmap_matches_a_plain_bitmap(
    npages: int, initially_set: bool, actions: list[tuple[str, int, int]]
) -> None:
    bitmap = DirtyBitmap(npages, initially_set)
    plain = [initially_set] * npages
    words = bitmap.nr_words
    for action, position, mask in actions:
        if action == "set" and position < npages:
            bitmap.set_bit(position)
            plain[position] = True
        elif action in ("xchg", "andnot"):
            index = position % words
            mask &= (1 << 64) - 1
            if action == "xchg":
                bitmap.xchg_word(index)
                mask = (1 << 64) - 1
            else:
                bitmap.fetch_andnot_word(index, mask)
            for bit in range(64):
                page = index * 64 + bit
                if page < npages and mask >> bit & 1:
                    plain[page] = False
    assert [bitmap.test_bit(page) for page in range(npages)] == plain


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 20), st.integers(1, 8), st.integers(0, 5)),
        max_size=30,
    )
)
def test_hva_index_matches_brute_force(actions: list[tuple[bool, int, int, int]]) -> None:
    index = HvaIndex()
    live: dict[int, tuple[int, int]] = {}
    for insert, start, length, key in actions:
        if insert and key not in live:
            live[key] = (start, start + length)
            index.insert(start, start + length, key)
        elif not insert and key in live:
            index.remove(*live.pop(key), key)
    for point in range(0, 30):
        assert set(index.ids_at(point)) == {k for k, (s, e) in live.items() if s <= point < e}
        expected = {k for k, (s, e) in live.items() if s < point + 3 and point < e}
        assert index.ids_overlapping(point, point + 3) == expected

    # The index is canonical: a boundary exactly where the covering set changes, no other.
    def cover(point: int) -> set[int]:
        return {k for k, (s, e) in live.items() if s <= point < e}

    changes = [point for point in range(0, 30) if cover(point) != cover(point - 1)]
    assert [start for start, _ in index.covers()] == changes


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=20), st.data())
def test_gfn_lookup_matches_brute_force(ranges: list[tuple[int, int]], data: st.DataObject) -> None:
    kvm = Kvm(DEFAULT_PROFILE)
    for slot_id, (base, npages) in enumerate(ranges):
        set_region(kvm, slot_id, base * PAGE, npages * PAGE)
    slots = kvm.memslots(0)
    for _ in range(10):
        gfn = data.draw(st.integers(0, 230))
        expected = [slot for slot in slots if slot.base_gfn <= gfn < slot.end_gfn]
        found = slots.gfn_to_memslot(gfn)
        assert (found is None) == (not expected)
        assert found is None or found is expected[0]


def test_gfn_to_hva_follows_the_invalid_and_readonly_rules() -> None:
    from kvmspec.reference.gfn_to_hva import (
        KVM_HVA_ERR_BAD,
        KVM_HVA_ERR_RO_BAD,
        gfn_to_hva_many,
        gfn_to_hva_memslot_prot,
        hva_to_gfn_memslot,
        kvm_is_visible_memslot,
    )
    from kvmspec.spec.uapi.constants import KVM_MEM_READONLY, KVM_MEMSLOT_INVALID

    kvm = Kvm(DEFAULT_PROFILE)
    assert set_region(kvm, 0, 1 << 20, 16 * PAGE, KVM_MEM_READONLY) == 0
    slot = kvm.memslots(0).gfn_to_memslot(0x105)
    assert slot is not None
    assert gfn_to_hva_many(slot, 0x105, write=False, page_shift=12) == (HVA + 5 * PAGE, 11)
    assert gfn_to_hva_many(slot, 0x105, write=True, page_shift=12) == (KVM_HVA_ERR_RO_BAD, 0)
    assert gfn_to_hva_memslot_prot(slot, 0x105, 12) == (HVA + 5 * PAGE, False)
    assert hva_to_gfn_memslot(HVA + 5 * PAGE + 17, slot, 12) == 0x105
    assert gfn_to_hva_many(None, 0x105, write=False, page_shift=12) == (KVM_HVA_ERR_BAD, 0)
    assert kvm_is_visible_memslot(slot, DEFAULT_PROFILE.user_mem_slots)

    invalid = KvmMemorySlot(as_id=0, id=0, base_gfn=0, npages=1, flags=0, userspace_addr=0)
    kvm_copy_memslot(invalid, slot)
    invalid.flags |= KVM_MEMSLOT_INVALID
    assert gfn_to_hva_many(invalid, 0x105, write=False, page_shift=12) == (KVM_HVA_ERR_BAD, 0)
    assert not kvm_is_visible_memslot(invalid, DEFAULT_PROFILE.user_mem_slots)


@given(st.lists(st.integers(-50, 5000), max_size=3000), st.lists(st.integers(-60, 5100)))
def test_fast_floor_lookup_equals_its_definition(keys: list[int], probes: list[int]) -> None:
    from sortedcontainers import SortedDict

    from kvmspec.reference.ordered import floor_item, floor_item_plain

    tree = SortedDict((key, key * 2) for key in keys)
    for key in keys[::3]:  # deletions leave sublists of uneven sizes
        tree.pop(key, None)
    for probe in [*probes, *keys]:
        assert floor_item(tree, probe) == floor_item_plain(tree, probe)


@given(
    st.lists(st.integers(-50, 5000), max_size=3000, unique=True), st.lists(st.integers(-60, 5100))
)
def test_fast_floor_value_equals_its_definition(keys: list[int], probes: list[int]) -> None:
    from sortedcontainers import SortedKeyList

    from kvmspec.reference.ordered import floor_value, floor_value_plain, replace_value

    tree = SortedKeyList((KeyedBox(key) for key in keys), key=KeyedBox.key_of)
    for key in keys[::3]:  # deletions leave sublists of uneven sizes
        tree.remove(floor_value(tree, key))
    for key in keys[1::3]:  # a replaced value is found in the old one's place
        old = floor_value(tree, key)
        replace_value(tree, old, KeyedBox(key))
        assert floor_value(tree, key) is not old
    for probe in [*probes, *keys]:
        assert floor_value(tree, probe) is floor_value_plain(tree, probe)


def test_replace_value_refuses_a_value_that_is_not_there() -> None:
    from sortedcontainers import SortedKeyList

    from kvmspec.reference.ordered import replace_value

    tree = SortedKeyList([KeyedBox(1), KeyedBox(5)], key=KeyedBox.key_of)
    with pytest.raises(ValueError, match="not in the list"):
        replace_value(tree, KeyedBox(5), KeyedBox(5))  # an equal key, another object
    with pytest.raises(ValueError, match="not in the list"):
        replace_value(tree, KeyedBox(9), KeyedBox(9))
    with pytest.raises(ValueError, match="different keys"):
        replace_value(tree, tree[0], KeyedBox(2))


class KeyedBox:
    """A value kept by identity, ordered by its key (as slots are by base gfn)."""

    def __init__(self, key: int) -> None:
        self.key = key

    @staticmethod
    def key_of(box: KeyedBox) -> int:
        return box.key
