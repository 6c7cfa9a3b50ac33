"""POWER Book3S HV: the HPT fault path (P5, P7, P9, seed 000) and HPT resizing (P10), on the
harness of kvmspec.fuzz.ppc_harness.

The faults: an ABSENT entry becomes valid only if no invalidation ran since the fault's
sequence snapshot; an MMIO entry never becomes valid, and its per-vCPU cache follows
``mmio_update``; a deleted slot's page is MMIO; a read-only host page gives a read-only
entry. The resize: exactly the bolted entries move, rehashed; a resize that keeps another
is caught. Seed 000: a removal path that ignores INVALID slots is caught. And findings: the
kernel's MMIO cache can keep an entry the HPT no longer holds, and H_READ and the removals
disagree on an absent entry's R and C (after H_CLEAR_REF, or after a resize). Then what the
guest and the host are told, each with a planted bug the harness reports: R and C only where
the guest accessed and stored (P4), H_BULK_REMOVE's response words, no MMIO cache entry
surviving the removal of its entry (P7), and aging answers (C-AGING).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from errno import EBUSY, EINVAL, ENOSPC, ENXIO
from pathlib import Path

import pytest

from kvmspec.fuzz import fuzz_ppc, harness_fuzzing, ppc_hcalls, ppc_resize
from kvmspec.fuzz.decoder import BytesChooser
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.ppc_decoder import decode_action
from kvmspec.fuzz.ppc_harness import (
    EAS,
    GFNS,
    KNOWN_KERNEL_FINDINGS,
    MMIO_GFN,
    PAGE,
    RAM0_GFN,
    RAM1_GFN,
    PpcHarness,
)
from kvmspec.fuzz.ppc_hcalls import STALE_ABSENT_RC
from kvmspec.fuzz.scheduler import race
from kvmspec.fuzz.seed_bugs import revmap_for_usable_slots_only
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import KvmGfnRange
from kvmspec.reference.ppc import fault, hcalls, hpt, hpt_mmu, resize, rmap_walk
from kvmspec.reference.ppc.fault import (
    DSISR_NOHPTE,
    Access,
    HptAccess,
    kvmppc_hv_vcpu,
)
from kvmspec.reference.ppc.hcalls import (
    H_ANDCOND,
    H_BULK_REMOVE_PTEX,
    H_BULK_REMOVE_RC,
    H_BULK_REMOVE_REQUEST,
    kvmppc_do_h_remove,
    kvmppc_h_read,
)
from kvmspec.reference.ppc.hpt import KvmHptInfo, chain_members, slot_rmap
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_KEY,
    HPTE_R_R,
    HPTE_V_ABSENT,
    HPTE_V_VALID,
    hpte_is_writable,
    is_mmio_hpte,
)
from kvmspec.reference.ppc.resize import (
    RESIZE_HPT_ESTIMATE_MS,
    kvm_vm_ioctl_resize_hpt_commit,
    kvm_vm_ioctl_resize_hpt_prepare,
)
from kvmspec.spec.invariants.ppc import STALE_MMIO_CACHE, check_hpt, check_mmio_cache
from kvmspec.spec.platforms import PPC64_HV

EA0, EA1, EA2, EA_HIGH0 = 0, 1, 2, 8
"""Indexes into EAS: 0x0, 0x1000, 0x2000, and 0x80_0000 (EA0's group at order 18)."""
SLOT0_PAGE, SLOT0_PAGE3, MMIO, SLOT1_PAGE, SLOT1_PAGE2 = 0, 2, 3, 4, 5
"""Indexes into GFNS."""


def harness(tolerated: tuple[str, ...] = ()) -> PpcHarness:
    return PpcHarness(tolerated=tolerated)


def access(h: PpcHarness, ea_i: int, write: bool, vcpu: int = 0) -> HptAccess:
    return run_to_completion(h.guest_access_op(vcpu, ea_i, write))


def index_of(h: PpcHarness, ea_i: int) -> int:
    index = h.index_of(EAS[ea_i])
    assert index is not None
    return index


def cache_used(h: PpcHarness) -> int | None:
    """The HPT index of the MMIO cache entry vCPU 0's last fault used, if it used one."""
    cache = kvmppc_hv_vcpu(h.kvm, 0).pgfault_cache
    return cache.pte_index if cache is not None else None


def steps(op: KernelOp[HptAccess], n: int) -> None:
    for _ in range(n):
        assert isinstance(next(op), Preempt)


# -- P5: an absent entry becomes valid only after the retry check ------------------------------


def test_an_absent_hpte_becomes_valid_only_after_the_retry_check() -> None:
    """The host dropped the page: H_ENTER makes the entry ABSENT. The guest's access
    traps; the fault resolves the page, and just before it takes the locks the host drops
    the page again. The sequence check sends the guest back without installing anything;
    the re-executed access faults again and maps the page the host now has."""
    h = harness()
    h.host_dontneed(0, 0)
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    index = index_of(h, EA0)
    assert h.mmu.hpt.v(index) & HPTE_V_ABSENT
    op = h.guest_access_op(0, EA0, True)
    steps(op, 4)  # real mode, snapshot, page resolved, host PTE read: about to install
    seq = h.kvm.mmu_invalidate_seq
    h.host_dontneed(0, 0)
    assert h.kvm.mmu_invalidate_seq != seq
    assert isinstance(next(op), Preempt)  # the install retried: a new round of faults
    assert h.mmu.hpt.v(index) & HPTE_V_ABSENT
    done = run_to_completion(op)
    assert done == HptAccess(Access.DONE, index=index)
    assert h.mmu.hpt.v(index) & HPTE_V_VALID
    h.check()


def test_without_the_retry_check_the_fault_installs_a_page_the_host_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: the fault path never retries. The page it resolved is gone by the
    time it installs it, and the check sees a valid entry the host does not back (P5)."""
    monkeypatch.setattr(fault, "mmu_invalidate_retry", lambda kvm, seq: False)
    h = harness()
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    h.host_dontneed(0, 0)
    op = h.guest_access_op(0, EA0, False)
    steps(op, 4)
    h.host_dontneed(0, 0)
    assert run_to_completion(op).outcome is Access.DONE
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert broken.value.violations == [
        f"P5: valid HPTE {index_of(h, EA0):#x} maps a page the host no longer maps there"
    ]


# -- P7: MMIO entries and the MMIO cache ---------------------------------------------------------


def test_an_mmio_hpte_never_becomes_valid_and_its_cache_follows_mmio_update() -> None:
    """An entry for a gpa in no slot is ABSENT with key 31. Every access is emulated: the
    first one finds the entry by its hash and caches it, the next ones use the cache. A
    memslot change bumps ``mmio_update``: the cache entry no longer counts, and the access
    looks at the table again. The entry itself is never made valid."""
    h = harness()
    h.h_enter(EA1, MMIO, True, False, False, -1)
    index = index_of(h, EA1)
    gpa = GFNS[MMIO] * PAGE + 0x1000
    assert is_mmio_hpte(h.mmu.hpt.v(index), h.mmu.hpt.r(index))
    assert access(h, EA1, False) == HptAccess(Access.MMIO, gpa=gpa)
    assert cache_used(h) is None  # found by the hash search, cached for next time
    assert access(h, EA1, True) == HptAccess(Access.MMIO, gpa=gpa)
    assert cache_used(h) == index
    stamp = h.mmu.mmio_update
    _, spare = h.host.mmap(PAGE, 3)
    assert h.set_region(2, 0, 32, spare, pages=1) == 0  # another slot: the cache is void
    assert h.mmu.mmio_update == stamp + 1
    assert access(h, EA1, False) == HptAccess(Access.MMIO, gpa=gpa)
    assert cache_used(h) is None
    assert not h.mmu.hpt.v(index) & HPTE_V_VALID
    h.check()


def test_an_mmio_cache_entry_the_hpt_no_longer_holds_is_caught() -> None:
    """The planted bug: the guest removes the MMIO entry and ``mmio_update`` does not move
    (as if H_REMOVE forgot its bump). vCPU 0's cache still vouches for the entry."""
    h = harness()
    h.h_enter(EA1, MMIO, True, False, False, -1)
    assert access(h, EA1, False).outcome is Access.MMIO
    stamp = h.mmu.mmio_update
    assert kvmppc_do_h_remove(h.kvm, 0, index_of(h, EA1), 0)[0] == 0
    h.mmu.mmio_update = stamp
    assert [str(v) for v in check_mmio_cache(h.kvm, h.mmu)] == [
        "P7: stale MMIO cache: vCPU 0's entry for ea 0x1000 (stamp 2) is current, "
        "the HPT no longer holds it"
    ]


def test_kernel_finding_a_stale_mmio_cache_entry_emulates_ram_as_mmio() -> None:
    """A finding about v6.18, reported by the checks (the fuzzing runs let it pass, see
    KNOWN_KERNEL_FINDINGS). The guest's MMIO entry for a gpa that a new slot now covers: the
    first access misses the cache, caches the MMIO entry with the *current* stamp, and
    virtual mode (which was not handed that cache entry) maps the RAM, making the entry
    valid. The cache now vouches for an MMIO entry that is gone. Once the host takes the
    page away (no ``mmio_update`` bump for that), the next access hits the cache and is
    emulated as MMIO although the gpa is RAM."""
    h = harness()
    h.change_slot1(None)
    h.h_enter(EA2, SLOT1_PAGE, True, False, False, -1)
    index = index_of(h, EA2)
    assert is_mmio_hpte(h.mmu.hpt.v(index), h.mmu.hpt.r(index))
    h.change_slot1(RAM1_GFN)  # a slot under the MMIO entry
    assert access(h, EA2, False) == HptAccess(Access.DONE, index=index)
    assert not h.mmu.hpt.r(index) & HPTE_R_KEY  # RAM now, with the guest's key
    with pytest.raises(RulesBroken, match="stale MMIO cache: vCPU 0's entry for ea 0x2000"):
        h.check()
    h.host_dontneed(1, 0)
    h.guest_access(0, EA2, False)
    with pytest.raises(RulesBroken) as broken:
        h.check()
    gpa = RAM1_GFN * PAGE + 0x2000
    mmio = HptAccess(Access.MMIO, gpa=gpa)
    assert broken.value.violations[0] == (
        f"P7: stale MMIO cache: a hit for ea 0x2000: {mmio}: gpa {gpa:#x} is RAM, "
        f"through entry {index:#x}"
    )
    tolerant = harness(tolerated=KNOWN_KERNEL_FINDINGS)
    tolerant.change_slot1(None)
    tolerant.h_enter(EA2, SLOT1_PAGE, True, False, False, -1)
    tolerant.change_slot1(RAM1_GFN)
    tolerant.guest_access(0, EA2, False)
    tolerant.check()


def _r_and_c(h: PpcHarness, index: int) -> int:
    """The R and C the guest reads for entry ``index`` (H_READ)."""
    return kvmppc_h_read(h.kvm, 0, index)[1][0][1] & (HPTE_R_R | HPTE_R_C)


def test_kernel_finding_a_resize_drops_the_r_and_c_of_a_moved_entry() -> None:
    """A finding about v6.18, reported by the checks (the fuzzing runs let it pass, see
    KNOWN_KERNEL_FINDINGS). The guest stores through a bolted entry: the hardware sets R and
    C. A resize moves the entry: resize_hpt_rehash_hpte copies the entry's guest_rpte, then
    unmaps it (kvmppc_unmap_hpte folds R and C into the *old* guest_rpte), and gives the new
    entry the copy taken before. The new entry is absent; its hardware word still has R and C,
    so H_READ shows them, but H_REMOVE reports the guest_rpte without them: a change the
    guest never cleared is gone from its view (the host's rmap and dirty log did get it)."""
    h = harness()
    h.h_enter(EA0, SLOT0_PAGE, True, True, False, -1)  # bolted, so the resize keeps it
    h.guest_access(0, EA0, True)
    h.check()
    h.resize_prepare(19)
    h.resize_work()
    h.resize_commit(19)
    h.check()
    index = index_of(h, EA0)
    assert h.mmu.hpt.v(index) & HPTE_V_ABSENT
    assert _r_and_c(h, index) == HPTE_R_R | HPTE_R_C
    assert h.mmu.hpt.rev_entry(index).guest_rpte & (HPTE_R_R | HPTE_R_C) == 0
    h.h_remove(EA0, 0)
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert broken.value.violations == [
        f"{STALE_ABSENT_RC} {index:#x}: H_READ showed 0x180, H_REMOVE reported 0x0"
    ]


def test_kernel_finding_h_read_shows_the_r_that_h_clear_ref_cleared_on_an_absent_entry() -> None:
    """The same root, without a resize: the host takes the page of a referenced entry away
    (kvmppc_unmap_hpte harvests R into guest_rpte but leaves it in the hardware word), the
    guest clears R with H_CLEAR_REF (in guest_rpte only: the entry is absent, so the kernel
    leaves the hardware word alone), and H_READ still shows R, from that word. The removal
    then reports no R: the two calls disagree. A strict harness reports it; a tolerant one
    (KNOWN_KERNEL_FINDINGS) lets it pass."""
    for tolerated in ((), KNOWN_KERNEL_FINDINGS):
        h = harness(tolerated)
        h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
        h.guest_access(0, EA0, False)  # R, no C
        h.host_dontneed(0, 0)
        index = index_of(h, EA0)
        assert h.mmu.hpt.v(index) & HPTE_V_ABSENT
        h.h_clear_ref_or_mod(EA0, False)
        assert _r_and_c(h, index) == HPTE_R_R  # still R, from the stale hardware word
        h.h_remove(EA0, 0)
        if tolerated:
            h.check()
            continue
        with pytest.raises(RulesBroken, match=f"{STALE_ABSENT_RC} {index:#x}: H_READ showed 0x100"):
            h.check()


# -- seed 000 and P9 --------------------------------------------------------------------------


def test_a_fault_on_a_deleted_slots_page_is_mmio() -> None:
    """Slot 1 is deleted: its entries become ABSENT (the flush), the next access traps and
    finds no slot: MMIO. While the slot is INVALID (deleted, not yet flushed) the fault
    path must not map it either: it emulates MMIO too."""
    h = harness()
    h.h_enter(EA0, SLOT1_PAGE, True, False, False, -1)
    h.h_enter(EA1, SLOT1_PAGE2, True, False, False, -1)
    assert access(h, EA0, True).outcome is Access.DONE
    h.change_slot1(None)
    assert h.mmu.hpt.v(index_of(h, EA0)) & HPTE_V_ABSENT
    gpa = RAM1_GFN * PAGE
    assert access(h, EA0, False) == HptAccess(Access.MMIO, gpa=gpa)
    h.check()
    h.change_slot1(RAM1_GFN)
    # A fault that reaches virtual mode while a DELETE has published the INVALID slot.
    update = h._slot1_op(None)
    assert update is not None
    while (slot := h.kvm.memslots(0).id_to_memslot(1)) is None or not slot.invalid:
        next(update)
    outcome = access(h, EA1, False)
    assert outcome == HptAccess(Access.MMIO, gpa=(RAM1_GFN + 2) * PAGE + 0x1000)
    run_to_completion(update)
    h.check()


def test_a_read_only_host_page_gets_a_read_only_hpte() -> None:
    """P9. The VMM makes a page read-only: a load maps it read-only although the guest's
    entry is read-write, and a store is refused by the host (EFAULT), the entry staying
    read-only. A page the host maps read-only only until written (the zero page) is
    mapped read-only by a load, and a store breaks copy-on-write and maps it writable."""
    h = harness()
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    index = index_of(h, EA0)
    assert access(h, EA0, True).outcome is Access.DONE
    h.host_mprotect(0, 0, False)
    assert h.mmu.hpt.v(index) & HPTE_V_ABSENT  # the mprotect invalidated it
    assert access(h, EA0, False) == HptAccess(Access.DONE, index=index)
    assert not hpte_is_writable(h.mmu.hpt.r(index))
    assert hpte_is_writable(kvmppc_h_read(h.kvm, 0, index)[1][0][1])  # the guest's view: RW
    assert access(h, EA0, True).outcome is Access.EFAULT
    assert not hpte_is_writable(h.mmu.hpt.r(index))
    h.check()
    # The zero page: read-only after a load, writable after a store.
    h.h_enter(EA1, SLOT0_PAGE3, True, False, False, -1)
    other = index_of(h, EA1)
    h.host_dontneed(0, 3)
    assert access(h, EA1, False).outcome is Access.DONE
    assert not hpte_is_writable(h.mmu.hpt.r(other))
    assert access(h, EA1, True) == HptAccess(Access.DONE, index=other)
    assert hpte_is_writable(h.mmu.hpt.r(other))
    h.check()


def test_seed_000_a_removal_path_that_ignores_invalid_slots_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seed 000: "we do still need to be able to handle references going away" while a
    slot is INVALID. The guest removes one of two entries for a slot-1 page while slot 1
    is being deleted (INVALID, not yet flushed), and reuses the index for a slot-0 page.
    The kernel's removal finds the INVALID slot and unlinks the entry; the planted
    version, which looks up only usable slots, leaves it on slot 1's chain, where the
    flush follows it into slot 0's chain and misses the other entry of slot 1."""

    def play(h: PpcHarness) -> None:
        h.h_enter(EA0, SLOT1_PAGE, True, False, False, -1)
        h.h_enter(EA1, SLOT1_PAGE, True, False, False, -1)
        assert access(h, EA0, True).outcome is Access.DONE
        h.hcalls_while_slot1_invalid(False, EA0, SLOT0_PAGE)

    kernel = harness()
    play(kernel)
    kernel.check()

    usable_only = revmap_for_usable_slots_only(hpt.revmap_for_hpte)
    monkeypatch.setattr(hpt, "revmap_for_hpte", usable_only)
    planted = harness()
    play(planted)
    with pytest.raises(RulesBroken) as broken:
        planted.check()
    assert any(line.startswith("S000-NO-HPTE-OUTSIDE-SLOTS") for line in broken.value.violations)


# -- P10: HPT resize -----------------------------------------------------------------------------


def resized(h: PpcHarness, order: int) -> int:
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 0, order) == RESIZE_HPT_ESTIMATE_MS
    h.resize_work()
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 0, order) == 0
    commit: int = run_to_completion(ppc_resize.commit_op(h, order))
    return commit


def enter_mixed(h: PpcHarness) -> None:
    """Bolted and non-bolted entries, RAM and MMIO, used by the guest."""
    h.h_enter(EA0, SLOT0_PAGE, True, True, False, -1)
    h.h_enter(EA1, SLOT1_PAGE, True, False, False, -1)
    h.h_enter(EA2, SLOT1_PAGE2, True, True, True, -1)
    h.h_enter(3, MMIO, True, True, False, -1)
    h.h_enter(4, SLOT0_PAGE3, False, False, False, -1)
    for ea_i in (EA0, EA1, EA2, 3, 4):
        h.guest_access(0, ea_i, ea_i != 4)
    h.check()


def test_resize_keeps_exactly_the_bolted_entries() -> None:
    """P10: after a commit to a larger table, the guest's table holds its three bolted
    entries (one in a secondary group, one MMIO), each where the new hash puts it, ABSENT;
    the others are gone, and every rmap chain is empty. The bolted ones fault back in."""
    h = harness()
    enter_mixed(h)
    assert resized(h, 20) == 0
    h.check()  # check_hpt_resize found exactly the bolted entries; the harness found them
    assert h.mmu.hpt.order == 20
    assert sorted(entry.ea for entry in h.entered.values()) == [EAS[EA0], EAS[EA2], EAS[3]]
    assert all(v & HPTE_V_ABSENT for v, _ in h.mmu.hpt.hptes.values())
    for slot in h.kvm.memslots(0):
        assert not any(hpt.slot_rmap(slot).words.get(o, 0) & (1 << 32) for o in range(4))
    for ea_i in (EA0, EA2, 3, EA1):
        h.guest_access(1, ea_i, True)
    h.check()


def test_a_resize_that_keeps_a_non_bolted_entry_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the rehash tests ABSENT where it should test BOLTED, and every entry
    is ABSENT after its unmap, so every entry moves."""
    monkeypatch.setattr(resize, "HPTE_V_BOLTED", HPTE_V_ABSENT)
    h = harness()
    enter_mixed(h)
    assert resized(h, 20) == 0
    with pytest.raises(RulesBroken) as broken:
        h.check()
    kept = [line for line in broken.value.violations if line.startswith("P10: resize kept")]
    assert len(kept) == 2  # EA1's and EA 4's entries


def test_a_resize_that_drops_a_bolted_entry_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the rehash knows no bolted entry, and copies nothing."""
    monkeypatch.setattr(resize, "HPTE_V_BOLTED", 0)
    h = harness()
    enter_mixed(h)
    assert resized(h, 20) == 0
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert sum(line.startswith("P10: resize lost") for line in broken.value.violations) == 3
    assert sum("not at its hash" in line for line in broken.value.violations) == 3


def test_resize_return_codes() -> None:
    """The ioctls' answers, in the kernel's order of checks: arguments, then the pending
    request (none or another order: ENXIO; still allocating: EBUSY), then the rehash
    (ENOSPC when two bolted entries meet in a smaller table, the old table staying, its
    entries unmapped but the guest's view intact)."""
    h = harness()
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 1, 20) == -EINVAL
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 0, 17) == -EINVAL
    assert run_to_completion(kvm_vm_ioctl_resize_hpt_commit(h.kvm, 0, 47)) == -EINVAL
    assert run_to_completion(kvm_vm_ioctl_resize_hpt_commit(h.kvm, 0, 20)) == -ENXIO
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 0, 20) == RESIZE_HPT_ESTIMATE_MS
    assert run_to_completion(kvm_vm_ioctl_resize_hpt_commit(h.kvm, 0, 20)) == -EBUSY
    assert h.mmu.resize_hpt is None  # the commit dropped the request
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 0, 20) == RESIZE_HPT_ESTIMATE_MS
    assert kvm_vm_ioctl_resize_hpt_prepare(h.kvm, 0, 0) == 0  # cancelled
    assert h.mmu.resize_hpt is None
    # Two bolted entries in slot 0 of groups that become one at order 18.
    h.h_enter(EA0, SLOT0_PAGE, True, True, False, -1)
    h.h_enter(EA_HIGH0, SLOT0_PAGE, True, True, False, -1)
    assert index_of(h, EA0) % 8 == index_of(h, EA_HIGH0) % 8 == 0
    assert h.mmu.hpt.hptes and access(h, EA0, True).outcome is Access.DONE
    assert resized(h, 18) == -ENOSPC
    assert h.mmu.hpt.order == 19 and h.mmu.mmu_ready
    h.check()  # the old table, the guest's entries unchanged
    assert access(h, EA_HIGH0, False).outcome is Access.DONE


def test_a_fault_racing_a_resize_commit_retries_on_the_new_table() -> None:
    """A vCPU's fault is about to install an entry when the resize commits: the commit
    stops the vCPUs, rehashes and swaps, then waits for the fault (an SRCU reader of the
    old table). The fault sees the MMU not ready and retries; the vCPU waits for the
    commit to end and faults the entry in again, in the new table."""
    h = harness()
    h.h_enter(EA0, SLOT0_PAGE, True, True, False, -1)
    h.host_dontneed(0, 0)
    h.resize_prepare(20)
    h.resize_work()
    op = h.guest_access_op(0, EA0, True)
    outcome = race(op, 4, lambda: ppc_resize.commit_op(h, 20))
    assert h.mmu.hpt.order == 20
    assert outcome == HptAccess(Access.DONE, index=index_of(h, EA0))
    h.check()


def test_a_missing_hpte_reaches_the_guest() -> None:
    """No entry for the address: the guest gets its DSI with NOHPTE, KVM maps nothing."""
    h = harness()
    outcome = access(h, EA0, False)
    assert outcome.outcome is Access.GUEST_INTERRUPT and outcome.dsisr & DSISR_NOHPTE
    assert not h.mmu.hpt.hptes
    assert check_hpt(h.kvm, h.mmu, h.host) == []
    assert GFNS[SLOT0_PAGE] == RAM0_GFN and GFNS[MMIO] == MMIO_GFN


# -- what the guest and the host are told: R and C, H_BULK_REMOVE's answers, the MMIO cache
# after a removal, aging (C-AGING); each with a planted bug the harness reports -------------------


def test_r_and_c_are_only_the_guests_own() -> None:
    """The guest loads through one entry and stores through another; a third it never
    uses. The host takes all three pages away, so KVM harvests the hardware's R and C into
    the guest's view: each entry shows exactly what the guest did through it."""
    h = harness()
    for ea_i, gfn_i in ((EA0, SLOT0_PAGE), (EA1, SLOT0_PAGE3), (EA2, SLOT1_PAGE)):
        h.h_enter(ea_i, gfn_i, True, False, False, -1)
    h.guest_access(0, EA0, False)
    h.guest_access(0, EA1, True)
    for slot, page in ((0, 0), (0, 3), (1, 0)):
        h.host_dontneed(slot, page)
    assert [_r_and_c(h, index_of(h, ea_i)) for ea_i in (EA0, EA1, EA2)] == [
        HPTE_R_R,
        HPTE_R_R | HPTE_R_C,
        0,
    ]
    h.check()


def test_an_invalidation_that_makes_up_r_and_c_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the unmap of an entry writes garbage into its hardware word before
    it harvests R and C, so the guest reads R and C it never set (P4)."""
    unmap = rmap_walk.kvmppc_unmap_hpte

    def garbling(kvm, hpt, tlbs, index, slot, rmap, gfn):  # type: ignore[no-untyped-def]
        hpt.store(index, hpt.v(index), hpt.r(index) | HPTE_R_R | HPTE_R_C)
        unmap(kvm, hpt, tlbs, index, slot, rmap, gfn)

    monkeypatch.setattr(rmap_walk, "kvmppc_unmap_hpte", garbling)
    h = harness(KNOWN_KERNEL_FINDINGS)
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    h.guest_access(0, EA0, False)
    h.host_dontneed(0, 0)
    index = index_of(h, EA0)
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert broken.value.violations == [
        f"P4: H_READ of HPTE {index:#x} shows R/C 0x180, the guest only loaded from ea 0x0"
    ]


def _bulk_remove_answering(monkeypatch: pytest.MonkeyPatch, answer: Callable[[int], int]) -> None:
    """Plant a bug in H_BULK_REMOVE: each response word becomes ``answer`` of it."""
    bulk_remove = hcalls.kvmppc_h_bulk_remove

    def planted(kvm: Kvm, args: list[int]) -> tuple[int, list[int]]:
        status, out = bulk_remove(kvm, args)
        return status, [answer(word) if n % 2 == 0 else word for n, word in enumerate(out)]

    monkeypatch.setattr(ppc_hcalls, "kvmppc_h_bulk_remove", planted)


def test_a_bulk_remove_response_without_its_index_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """H_BULK_REMOVE answers each request with its index and condition echoed; the
    planted bug drops the index of every answer."""
    h = harness(KNOWN_KERNEL_FINDINGS)
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    h.h_enter(EA1, SLOT0_PAGE3, True, True, False, -1)
    h.h_bulk_remove_cond(EA1, H_ANDCOND)  # BOLTED: not found
    h.h_bulk_remove((EA0,))
    h.check()
    _bulk_remove_answering(monkeypatch, lambda word: word & ~H_BULK_REMOVE_PTEX)
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    request = H_BULK_REMOVE_REQUEST | index_of(h, EA0)
    h.h_bulk_remove((EA0,))
    with pytest.raises(RulesBroken, match=f"H_BULK_REMOVE answered request {request:#x} with"):
        h.check()


def test_a_bulk_remove_that_misplaces_an_absent_entrys_r_and_c_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The entry is absent (the host took its page) with R in the guest's view. The planted
    bug shifts R and C out of their field in the response: that is caught by the response's
    format, even where the tolerated finding about absent entries' R and C
    (STALE_ABSENT_RC) lets a mere disagreement with H_READ pass."""

    def misplaced(word: int) -> int:
        return word & ~H_BULK_REMOVE_RC | (word & H_BULK_REMOVE_RC) << 10

    _bulk_remove_answering(monkeypatch, misplaced)
    h = harness(KNOWN_KERNEL_FINDINGS)
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    h.guest_access(0, EA0, False)
    h.host_dontneed(0, 0)
    request = H_BULK_REMOVE_REQUEST | index_of(h, EA0)
    h.h_bulk_remove((EA0,))
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert broken.value.violations == [
        f"COHERENCE: H_BULK_REMOVE answered request {request:#x} with "
        f"{0x8000 << 48 | HPTE_R_R << 61 | request & H_BULK_REMOVE_PTEX:#x}, "
        f"not {0x8000 << 48 | request & H_BULK_REMOVE_PTEX:#x} and R/C"
    ]


def test_a_bulk_remove_of_an_mmio_entry_that_keeps_its_cache_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vCPU 0 caches the guest's MMIO entry; the guest removes it with H_BULK_REMOVE. The
    planted bug leaves ``mmio_update`` where it was, so the cache still answers for the
    address (P7). The tolerated stale-cache finding does not cover it: this removal
    promised to void the cache."""
    bulk_remove = hcalls.kvmppc_h_bulk_remove

    def without_bump(kvm: Kvm, args: list[int]) -> tuple[int, list[int]]:
        mmu = kvm.arch
        assert isinstance(mmu, HptMmu)
        stamp = mmu.mmio_update
        answer = bulk_remove(kvm, args)
        mmu.mmio_update = stamp
        return answer

    h = harness(KNOWN_KERNEL_FINDINGS)
    h.h_enter(EA1, MMIO, True, False, False, -1)
    assert access(h, EA1, False).outcome is Access.MMIO
    index = index_of(h, EA1)
    h.h_bulk_remove((EA1,))
    h.check()  # the unplanted removal voids the cache
    monkeypatch.setattr(ppc_hcalls, "kvmppc_h_bulk_remove", without_bump)
    h.h_enter(EA1, MMIO, True, False, False, -1)
    assert access(h, EA1, False).outcome is Access.MMIO
    h.h_bulk_remove((EA1,))
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert broken.value.violations == [
        f"P7: H_BULK_REMOVE of MMIO HPTE {index:#x} left vCPU 0's MMIO cache entry for ea "
        "0x1000 current"
    ]


def test_aging_answers_for_the_pages_the_guest_used() -> None:
    """The guest loads from slot 0's page 0 and stores to its page 3. Aging page 3 finds it
    young and leaves page 0 alone; after H_CLEAR_REF the page's R lives on in the rmap word,
    and test_young and clear_young both still report it; then every page is idle."""
    h = harness()
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    h.h_enter(EA1, SLOT0_PAGE3, True, False, False, -1)
    h.guest_access(0, EA0, False)
    h.guest_access(1, EA1, True)
    h.host_ages_page(0, 3, "clear")
    h.h_clear_ref_or_mod(EA0, False)
    for how in ("test", "clear_flush", "test"):
        h.host_ages_page(0, 0, how)
    h.host_ages(0)
    h.check()
    assert h.aging.guest_used == set()


def _never_young(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: clear_young ages the range but never answers young."""
    age_gfn = HptMmu.kvm_age_gfn

    def planted(mmu: HptMmu, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        age_gfn(mmu, kvm, gfn_range)
        return False

    monkeypatch.setattr(HptMmu, "kvm_age_gfn", planted)


def _ages_from_the_slot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: clear_young ages every page from the slot's start, not only the range."""
    age_gfn = HptMmu.kvm_age_gfn

    def planted(mmu: HptMmu, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        return age_gfn(mmu, kvm, replace(gfn_range, start=gfn_range.slot.base_gfn))

    monkeypatch.setattr(HptMmu, "kvm_age_gfn", planted)


def _tests_the_chain_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: test_young ignores the REFERENCED bit the page's rmap word keeps."""

    def planted(kvm: Kvm, hpt: KvmHptInfo, slot: KvmMemorySlot, gfn: int) -> bool:
        word = slot_rmap(slot).get(gfn - slot.base_gfn)
        return any(hpt.r(index) & HPTE_R_R for index in chain_members(hpt, word))

    monkeypatch.setattr(hpt_mmu, "kvm_test_age_rmapp", planted)


@pytest.mark.parametrize(
    ("plant", "how", "page", "why"),
    [
        (_never_young, "clear", 0, "used by a guest, aged idle"),
        (_ages_from_the_slot_start, "clear", 2, "used by the guest, tested idle"),
        (_tests_the_chain_only, "test", 0, "used by the guest, tested idle"),
    ],
)
def test_wrong_aging_answers_are_caught(
    monkeypatch: pytest.MonkeyPatch,
    plant: Callable[[pytest.MonkeyPatch], None],
    how: str,
    page: int,
    why: str,
) -> None:
    """The guest loads from slot 0's page 0 and clears its R with H_CLEAR_REF (the rmap
    word keeps it as REFERENCED); the host asks about one page of slot 0 as ``how``. Each
    planted bug in aging an HPT guest gives a wrong answer about page 0 (C-AGING)."""
    plant(monkeypatch)
    h = harness()
    h.h_enter(EA0, SLOT0_PAGE, True, False, False, -1)
    h.guest_access(0, EA0, False)
    h.h_clear_ref_or_mod(EA0, False)
    h.host_ages_page(0, page, how)
    with pytest.raises(RulesBroken) as broken:
        h.check()
    assert broken.value.violations == [f"C-AGING: host page {h.hvas[0]:#x} {why}"]


REVIVED_BY_RESIZE = (
    Path(__file__).parents[1]
    / "corpus/regressions/ppc-39861bb19d17778a718393e036f53074f6aaac81.bin"
)


def test_a_cache_entry_revived_by_a_resize_is_the_known_finding_not_a_missed_void() -> None:
    """fuzz_ppc's finding: an HPT resize started mmio_update's count again, so a vCPU's
    MMIO cache entry stamped before it became current again when H_REMOVE moved the count
    on. The entry the vCPU answered with before the H_REMOVE was voided, as P7 requires;
    the one answering after is the stale cache the kernel is known to leave. A harness
    that lets that pass finds nothing; a strict one reports only that."""
    data = REVIVED_BY_RESIZE.read_bytes()
    assert fuzz_ppc.run_input(data).violations == []
    chooser = BytesChooser(data)
    strict = harness_fuzzing.drive(
        harness_fuzzing.Run("set_up()"),
        chooser,
        lambda log: PpcHarness(PPC64_HV, log),
        lambda harness: decode_action(chooser, harness),
        None,
        fuzz_ppc.MAX_ACTIONS,
    )
    assert strict.violations
    assert all(line.startswith(f"P7: {STALE_MMIO_CACHE}") for line in strict.violations)
