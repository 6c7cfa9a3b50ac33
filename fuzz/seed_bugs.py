"""The bugs of the five seed threads, re-injected, and how long the campaign takes to find each.

Each seed thread is about a bug, fixed or avoided in the kernel. Here every one is a named
variant of the reference model: a patch applied from outside ``reference/`` (a replaced
function or method, never a flag inside the model), the campaign area whose state machine
should catch it, and the rule the failure must name. :func:`time_to_detect` runs that
machine the way the campaign does (slices of the ``kvmspec-thorough`` profile, fresh random
seeds each slice, on one core) until the failure appears, and ``python -m
kvmspec.fuzz.seed_bugs`` (``make power``) prints the median time over a few trials against
the goal of issue 7: under 60 seconds each.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from kvmspec.fuzz import machines
from kvmspec.fuzz.profiles import THOROUGH, register_profiles
from kvmspec.reference import kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.arm64.mmu import Arm64Mmu, Arm64MmuLocklessAging
from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import KvmGfnRange
from kvmspec.reference.ppc import hpt
from kvmspec.reference.x86 import apic_access, guest_access
from kvmspec.reference.x86.mmu_spte import kvm_rmap_zap_gfn_range
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE

GOAL_SECONDS = 60.0
SLICE_EXAMPLES = 10


@dataclass(frozen=True)
class SeedBug:
    """One seed thread's bug: what it is, how it is planted, which machine must catch it,
    and what the failure must say."""

    name: str
    seed: str
    what: str
    area: str
    machine: Callable[[], type[RuleBasedStateMachine]] | None
    plant: Callable[[], contextlib.AbstractContextManager[None]]
    expected: str
    """A regular expression the failure's message must match (the rule it breaks)."""
    fuzzer: Callable[[bytes], list[str]] | None = None
    """For an area that is an Atheris target: its decoder and harness on one input (the
    broken rules), fed random inputs here as libFuzzer's first ones are."""


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


# -- seed 000: POWER, the removal path must still find an INVALID slot ------------------------


RevmapLookup = Callable[[Kvm, int, int], tuple[KvmMemorySlot | None, int]]


def revmap_for_usable_slots_only(original: RevmapLookup) -> RevmapLookup:
    """Seed 000's bug: the lookup behind the HPTE removal path (``original`` is
    hpt.revmap_for_hpte) does not find a slot that is INVALID."""

    def usable_slots_only(kvm: Kvm, hpte_v: int, guest_r: int) -> tuple[KvmMemorySlot | None, int]:
        slot, gfn = original(kvm, hpte_v, guest_r)
        return (None, gfn) if slot is not None and slot.invalid else (slot, gfn)

    return usable_slots_only


def _plant_000() -> contextlib.AbstractContextManager[None]:
    return _patched(hpt, "revmap_for_hpte", revmap_for_usable_slots_only(hpt.revmap_for_hpte))


def _fuzz_ppc(data: bytes) -> list[str]:
    from kvmspec.fuzz import fuzz_ppc

    return fuzz_ppc.run_input(data).violations


# -- seed 001: arm64, kvm_arch_flush_shadow_all emptied ----------------------------------------


class EmptiedFlushShadowAll(Arm64Mmu):
    """Seed 001's patch: kvm_arch_flush_shadow_all does nothing."""

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        KvmArch.kvm_arch_flush_shadow_all(self, kvm)


class EmptiedLocklessFlushShadowAll(Arm64MmuLocklessAging):
    """The same patch on the MMU with seed 001's lockless ager."""

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        KvmArch.kvm_arch_flush_shadow_all(self, kvm)


def _plant_001() -> contextlib.AbstractContextManager[None]:
    # The arm64 harness takes its MMU from the decoder's table: swap each MMU for its
    # emptied twin, one for one, so that an input decodes to the same actions as before.
    from kvmspec.fuzz import arm64_decoder

    emptied = {
        Arm64Mmu: EmptiedFlushShadowAll,
        Arm64MmuLocklessAging: EmptiedLocklessFlushShadowAll,
    }
    classes = tuple(emptied.get(cls, cls) for cls in arm64_decoder.MMU_CLASSES)
    return _patched(arm64_decoder, "MMU_CLASSES", classes)


def _arm64_machine_emptied() -> type[RuleBasedStateMachine]:
    from kvmspec.fuzz.arm64_machine import arm64_machine

    return arm64_machine(ARM64, mmu_classes=(EmptiedFlushShadowAll,))


# -- seed 002: x86, the large-SPTE refault loop ---------------------------------------------------


def _plant_002() -> contextlib.AbstractContextManager[None]:
    # Every failed emulation unprotects and retries: no guard against refaulting for ever.
    return _patched(guest_access, "kvm_mmu_write_protect_fault", lambda *args: True)


def _x86_machine() -> type[RuleBasedStateMachine]:
    from kvmspec.fuzz.x86_machine import x86_machine

    return x86_machine(DEFAULT_PROFILE)


# -- seed 003: the memslot layer modifies a slot in the active set ------------------------------


def _plant_003() -> contextlib.AbstractContextManager[None]:
    def in_place_update(
        kvm: Kvm, old: KvmMemorySlot, new: KvmMemorySlot, owner: object
    ) -> KernelOp[None]:
        old.flags = new.flags
        old.dirty_bitmap = new.dirty_bitmap
        kvm.slots_arch_lock.unlock(owner)
        yield Preempt("seed 003 variant: flags changed in place, no swap")

    return _patched(kvm_main, "kvm_update_flags_memslot", in_place_update)


def _memslot_machine() -> type[RuleBasedStateMachine]:
    return machines.memslot_machine(DEFAULT_PROFILE)


# -- seed 004: x86, the APIC-access page pinned, or its address left stale ----------------------


def _plant_004_pinned() -> contextlib.AbstractContextManager[None]:
    original = apic_access.vmx_set_apic_access_page_addr

    def load_and_pin(kvm: Kvm, host: Any, vcpu_mmu: Any) -> KernelOp[None]:
        yield from original(kvm, host, vcpu_mmu)
        # The thread's old code: the page reference taken to load the address is kept.
        slot = kvm.memslots(0).id_to_memslot(apic_access.apic_access_page_slot(kvm))
        if slot is not None:
            hva, _ = gfn_to_hva_many(slot, slot.base_gfn, True, 12)
            host.pin_user_page(hva)

    return _patched(apic_access, "vmx_set_apic_access_page_addr", load_and_pin)


def unmap_without_reload(self: ShadowMmu, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
    """Seed 004's stale-address bug, as ShadowMmu.kvm_unmap_gfn_range: the SPTEs are
    zapped, but no vCPU is asked to reload the APIC-access address."""
    return kvm_rmap_zap_gfn_range(kvm, self, gfn_range.slot, gfn_range.start, gfn_range.end)


def _plant_004_stale() -> contextlib.AbstractContextManager[None]:
    return _patched(ShadowMmu, "kvm_unmap_gfn_range", unmap_without_reload)


SEED_BUGS: tuple[SeedBug, ...] = (
    SeedBug(
        "seed-000-invalid-slot-ignored-on-removal",
        "000",
        "removing an HPTE looks up only usable slots, so an entry removed while its slot is"
        " INVALID stays on the slot's rmap chain, and its C never reaches the dirty log",
        "atheris/ppc",
        None,
        _plant_000,
        # The chain left behind (P2, S000), or the change lost with the skipped fold (P3).
        r"S000-NO-HPTE-OUTSIDE-SLOTS|P2|P3",
        fuzzer=_fuzz_ppc,
    ),
    SeedBug(
        "seed-001-flush-shadow-all-emptied",
        "001",
        "kvm_arch_flush_shadow_all does nothing",
        "arm64/arm64",
        _arm64_machine_emptied,
        _plant_001,
        r"S001-FLUSH-ALL",
    ),
    SeedBug(
        "seed-002-large-spte-refault-loop",
        "002",
        "a failed emulation always unprotects and retries, so a write into a huge page that"
        " maps its own page table refaults for ever",
        "x86/x86_64-linux-6.18-pvm",
        _x86_machine,
        _plant_002,
        r"no progress|S002-LARGE-SPTE-PROGRESS",
    ),
    SeedBug(
        "seed-003-active-slot-modified",
        "003",
        "a flags-only update changes the slot in the active set instead of swapping",
        "memslots/x86_64-linux-6.18-pvm",
        _memslot_machine,
        _plant_003,
        r"S003-ACTIVE-IMMUTABLE",
    ),
    SeedBug(
        "seed-004-apic-page-pinned",
        "004",
        "loading the APIC-access address keeps the page pinned, so it cannot migrate",
        "x86/x86_64-linux-6.18-pvm",
        _x86_machine,
        _plant_004_pinned,
        r"S004-NOT-PINNED|migrating the APIC-access page: errno",
    ),
    SeedBug(
        "seed-004-apic-address-stale",
        "004",
        "the notifier zaps the APIC-access page's SPTEs but asks no vCPU to reload its"
        " address after a migration",
        "x86/x86_64-linux-6.18-pvm",
        _x86_machine,
        _plant_004_stale,
        r"S004-APIC-ACCESS-RELOAD",
    ),
)


def _fuzz_until_found(
    bug: SeedBug, fuzzer: Callable[[bytes], list[str]], limit: float
) -> Detection:
    rng = random.Random()
    began = time.monotonic()
    with bug.plant():
        while (elapsed := time.monotonic() - began) < limit:
            broken = fuzzer(rng.randbytes(rng.randrange(1, 257)))
            if broken:
                message = " ".join(" ".join(broken).split())
                if re.search(bug.expected, message):
                    return Detection(time.monotonic() - began, message[:160])
                return Detection(None, f"wrong failure: {message[:160]}")
    return Detection(None, f"not found in {elapsed:.0f} s")


@dataclass(frozen=True)
class Detection:
    """How long one trial took to find the bug (None: not within the limit), and the first
    line of what it reported."""

    seconds: float | None
    report: str


def time_to_detect(bug: SeedBug, limit: float = 4 * GOAL_SECONDS) -> Detection:
    """Run the bug's machine, planted, in campaign slices (or its fuzzer on random inputs)
    until a failure matches ``bug.expected`` (or ``limit`` seconds pass). A failure that does
    not match is a wrong report, returned as such."""
    if bug.fuzzer is not None:
        return _fuzz_until_found(bug, bug.fuzzer, limit)
    assert bug.machine is not None
    register_profiles()
    machine = bug.machine()
    slice_settings = settings(
        settings.get_profile(THOROUGH),
        max_examples=SLICE_EXAMPLES,
        database=None,
        derandomize=False,
        phases=[Phase.generate],  # finding it is what is timed; shrinking is not
    )
    began = time.monotonic()
    with bug.plant():
        while (elapsed := time.monotonic() - began) < limit:
            try:
                run_state_machine_as_test(machine, settings=slice_settings)
            except Exception as error:  # a failure: the planted bug, or a wrong report
                message = " ".join(str(error).split())
                if re.search(bug.expected, message):
                    return Detection(time.monotonic() - began, message[:160])
                return Detection(None, f"wrong failure: {message[:160]}")
    return Detection(None, f"not found in {elapsed:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmspec.fuzz.seed_bugs", description=__doc__)
    parser.add_argument("--trials", type=int, default=3, help="trials per bug (median)")
    parser.add_argument("bugs", nargs="*", help="names of bugs to time (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.bugs if name not in {bug.name for bug in SEED_BUGS}]
    if unknown or args.trials < 1:
        print(
            f"kvmspec: error: unknown bug {unknown[0]!r}"
            if unknown
            else "kvmspec: error: --trials must be at least 1",
            file=sys.stderr,
        )
        return 2
    chosen = [bug for bug in SEED_BUGS if not args.bugs or bug.name in args.bugs]
    print(f"Seed bugs re-injected: time to detect, median of {args.trials}, one core")
    missed = 0
    for bug in chosen:
        trials = [time_to_detect(bug) for _ in range(args.trials)]
        times = [trial.seconds for trial in trials if trial.seconds is not None]
        found_all = len(times) == len(trials)
        median = statistics.median(times) if found_all else None
        ok = median is not None and median < GOAL_SECONDS
        missed += not ok
        shown = f"{median:6.1f} s" if median is not None else "   not always found"
        verdict = "PASS" if ok else "MISS"
        print(f"  {bug.name:<42} {bug.area:<32} {shown}  (goal < {GOAL_SECONDS:.0f} s) {verdict}")
        print(f"      trials: {', '.join(_trial(trial) for trial in trials)}")
        print(f"      found: {trials[0].report}")
    return 1 if missed else 0


def _trial(trial: Detection) -> str:
    return f"{trial.seconds:.1f} s" if trial.seconds is not None else trial.report


if __name__ == "__main__":
    sys.exit(main())
