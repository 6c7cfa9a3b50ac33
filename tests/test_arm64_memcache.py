"""A8: a stage-2 walk under mmu_lock takes its table pages from the vCPU's memory cache, which
the fault path fills first; and the kernel finding where v6.18 does not fill it.

user_mem_abort fills the cache for translation faults, and for write faults while the slot
is dirty-logged (a write may have to split a block). An execution permission fault on a
write-protected block of a dirty-logged slot maps a page in place of the block too (pages
only while logging), so it needs a table, yet it fills nothing: a vCPU whose cache is empty
(it never faulted before, or its last fault used the cache up) allocates from the empty
cache, which kvm_mmu_memory_cache_alloc WARNs about before allocating atomically."""

from __future__ import annotations

import pytest

from kvmspec.fuzz.arm64_decoder import Setup
from kvmspec.fuzz.arm64_harness import HPAGE, KNOWN_KERNEL_FINDINGS, PAGE, THP_SLOT, Arm64Harness
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.reference.arm64 import fault
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.arm64.pgtable import KvmMmuMemoryCache
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.spec.invariants.arm64 import stage2_leaves
from kvmspec.spec.platforms import ARM64


def logged_block(vm: Arm64Harness) -> None:
    """vCPU 0 maps the THP slot's first 2 MiB as one block by a load, then dirty logging
    starts and write-protects it (blocks are not split without an eager split chunk)."""
    vm.host_write(THP_SLOT, 7, 0x77)
    assert vm.host.madvise_collapse(vm.thp_hva, HPAGE) == 0
    vm.guest_read(0, THP_SLOT, 5, 0, "load")
    assert vm.mmu.pgt is not None
    assert [leaf.size for leaf in stage2_leaves(vm.mmu.pgt)] == [HPAGE]
    vm.toggle_log(THP_SLOT)
    vm.check()


def test_an_exec_fault_on_a_logged_block_takes_a_table_from_an_empty_cache() -> None:
    vm = Arm64Harness()
    logged_block(vm)
    vm.guest_read(1, THP_SLOT, 7, 0, "fetch")  # vCPU 1 never faulted: its cache is empty

    # The fetch completed (the harness checks the bytes) with the block replaced by a table
    # holding just the fetched page, but the table came from vCPU 1's empty cache.
    assert vm.mmu.pgt is not None
    leaves = stage2_leaves(vm.mmu.pgt)
    assert [(leaf.ipa - vm.address(THP_SLOT, 0)[0], leaf.size) for leaf in leaves] == [
        (7 * PAGE, PAGE)
    ]
    assert vm.mmu.vcpu_memcaches[1].nobjs == 0
    with pytest.raises(RulesBroken) as broken:
        vm.check()
    assert broken.value.violations == [
        "A8: WARN: kvm_mmu_memory_cache_alloc: a table page taken from an empty cache"
    ]


def test_a_write_fault_there_fills_the_cache_first() -> None:
    vm = Arm64Harness()
    logged_block(vm)
    vm.guest_store(1, THP_SLOT, 7, 0x42)
    assert vm.mmu.vcpu_memcaches[1].nobjs > 0
    vm.check()


def test_the_machine_and_the_fuzzer_let_the_known_finding_pass() -> None:
    """The decoder's harness (the machine's and fuzz_arm64.py's) tolerates the finding, so
    that fuzzing looks for new problems; the same run is reported by a strict harness."""
    vm = Setup().harness(ARM64, lambda line: None)
    assert vm.tolerated == KNOWN_KERNEL_FINDINGS
    logged_block(vm)
    vm.guest_read(1, THP_SLOT, 7, 0, "fetch")
    vm.check()


def test_a_fault_path_that_never_fills_the_cache_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A planted bug: user_mem_abort skips the top-up for every fault. The first
    translation fault that needs tables already breaks A8."""

    def no_topup(mmu: Arm64Mmu, vcpu: KvmVcpu) -> KvmMmuMemoryCache:
        return mmu.vcpu_memcaches.setdefault(vcpu.vcpu_id, KvmMmuMemoryCache(0))

    monkeypatch.setattr(fault, "kvm_mmu_topup_memory_cache", no_topup)
    vm = Arm64Harness()
    vm.guest_read(0, THP_SLOT, 3, 0, "load")
    with pytest.raises(RulesBroken) as broken:
        vm.check()
    assert broken.value.violations[0].startswith("A8: WARN: kvm_mmu_memory_cache_alloc")
