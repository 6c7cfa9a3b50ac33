"""The modelled locks: mmu_lock as a reader-writer spinlock, RCU grace periods holding back
frees, aging with or without the lock, and the harness catching a path that forgets it."""

from __future__ import annotations

import pytest

from kvmspec.fuzz.generic_machine import generic_machine
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.reference import kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import Deadlock, Rcu, RwLock, run_to_completion
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmGfnRange, kvm_mmu_notifier_clear_young
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

HVA = 0x7F00_0000_0000


def test_rwlock_readers_share_and_writers_exclude() -> None:
    lock = RwLock("mmu_lock")
    with lock.read(), lock.read():
        assert not lock.held_for_write
        with pytest.raises(Deadlock, match="taken for write while held"), lock.write():
            pass
    assert lock.readers == 0
    writer = RwLock("mmu_lock")
    with writer.write():
        assert writer.held_for_write
        with pytest.raises(Deadlock, match="taken for read while held for write"), writer.read():
            pass
    assert writer.readers == 0


def test_rcu_frees_after_the_readers_that_could_see_it() -> None:
    rcu = Rcu("rcu")
    freed: list[str] = []
    early = rcu.read_lock()
    rcu.call_rcu(lambda: freed.append("table"))
    late = rcu.read_lock()  # started after the unpublish: cannot see the table
    assert freed == []
    rcu.read_unlock(early)
    assert freed == ["table"]  # the late reader does not hold the grace period
    rcu.read_unlock(late)
    rcu.call_rcu(lambda: freed.append("now"))
    assert freed == ["table", "now"]  # no reader inside: at once


class RecordingArch(KvmArch):
    """Records whether mmu_lock was held for write when aging ran."""

    def __init__(self, lockless: bool) -> None:
        super().__init__()
        self.lockless_aging = lockless
        self.locked: list[bool] = []

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        self.locked.append(kvm.mmu_lock.held_for_write)
        return False


@pytest.mark.parametrize("lockless", [False, True])
def test_aging_takes_mmu_lock_unless_the_arch_ages_locklessly(lockless: bool) -> None:
    arch = RecordingArch(lockless)
    kvm = Kvm(DEFAULT_PROFILE, arch)
    region = MemoryRegion(0, 0, 0x100000, 4 * 4096, HVA)
    assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1)) == 0
    assert not kvm_mmu_notifier_clear_young(kvm, HVA, HVA + 4096)
    assert arch.locked == [not lockless]


def test_the_machine_catches_a_missing_mmu_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model in which mmu_lock is never really taken: the lockdep assertions fire."""
    from contextlib import nullcontext

    monkeypatch.setattr(RwLock, "write", lambda self: nullcontext())
    machine = generic_machine(DEFAULT_PROFILE)
    machine.TestCase.settings = bug_hunt(500)
    with pytest.raises(AssertionError, match="LOCKING"):
        machine.TestCase().runTest()
