"""arm64 stage-2 figures: how fast its state machine and its Atheris target run, and what a
stage-2 walk costs as the mapped pages and the walked range grow.

* State-machine steps per second: the campaign's area ``arm64/arm64``
  (:func:`kvmspec.fuzz.arm64_machine.arm64_machine`, both MMUs) run in slices of ten examples
  under the ``kvmspec-thorough`` Hypothesis profile (no example database), for a time
  budget; a step is one rule, with every check after it.
* ``fuzz/fuzz_arm64.py`` under libFuzzer: executions per second (and harness actions per
  second, from its counters), measured by :func:`bench.fuzzer.measure` from
  ``corpus/seeds/arm64``.
* A stage-2 walk: a 40-bit stage 2 (1 TiB of IPA space, 4 KiB granule) with ``n`` pages
  mapped at an even stride over a range, walked whole by
  kvm_pgtable_stage2_test_clear_young without clearing (what the notifier's test_young
  does, and it changes nothing, so the walk can be repeated). The walker visits every entry
  of every table it reaches and steps over an empty entry of an upper level whole, so its
  cost follows the tables under the mapped pages, not the size of the range: 10 times the
  pages spread over 1 TiB cost about 10 times as much (:data:`WALK_RATIO_GOAL`), and the
  same pages walked as part of the whole 1 TiB cost what they cost walked over the 1 GiB
  they lie in (:data:`RANGE_RATIO_GOAL`).
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench import median_seconds
from bench.fuzzer import FuzzScript
from kvmspec.fuzz.arm64_machine import arm64_machine
from kvmspec.reference.arm64.descriptors import KVM_PGTABLE_PROT_RW
from kvmspec.reference.arm64.pgtable import KvmMmuMemoryCache, KvmPgtable
from kvmspec.reference.arm64.s2_mmu import Stage2Features
from kvmspec.reference.arm64.stage2 import (
    kvm_pgtable_stage2_init,
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_test_clear_young,
)
from kvmspec.reference.concurrency import Rcu, run_to_completion
from kvmspec.spec.platforms import ARM64, PlatformProfile

FUZZ_ARM64 = FuzzScript("fuzz/fuzz_arm64.py", "corpus/seeds/arm64", 256)
PAGE = 4096
IPA_BITS = 40
TIB = 1 << IPA_BITS
GIB = 1 << 30
WALK_PAGES = (1_000, 10_000)
WALK_RATIO_GOAL = (5.0, 20.0)
"""The time of the walk with 10 times the pages, over the time with the fewer pages: within
2x of 10."""
RANGE_RATIO_GOAL = 2.0
"""The same pages walked over 1 TiB, against over the 1 GiB they lie in: at most this."""
PA_BASE = 0x10_0000_0000


def machine_steps_per_second(profile: PlatformProfile = ARM64, seconds: float = 5.0) -> float:
    """Rules per second of the arm64 state machine, as the campaign runs it."""
    return bench.machine_steps_per_second(arm64_machine(profile), seconds)


def stage2_with_pages(pages: int, span: int) -> KvmPgtable:
    """A 1 TiB stage 2 with ``pages`` 4 KiB pages mapped at an even stride over
    [0, ``span``)."""
    pgt = kvm_pgtable_stage2_init(IPA_BITS, 12, Rcu("rcu"), Stage2Features())
    stride = span // pages // PAGE * PAGE
    for n in range(pages):
        op = kvm_pgtable_stage2_map(
            pgt, n * stride, PAGE, PA_BASE + n * PAGE, KVM_PGTABLE_PROT_RW, KvmMmuMemoryCache(8)
        )
        assert run_to_completion(op) == 0, f"mapping page {n}"
    return pgt


def walk_seconds(pgt: KvmPgtable, size: int, repeats: int) -> float:
    """The median time of a test_young walk over [0, ``size``); it finds every page young."""

    def walk() -> None:
        op = kvm_pgtable_stage2_test_clear_young(pgt, 0, size, False)
        assert run_to_completion(op) is True

    return median_seconds(walk, repeats)


@dataclass(frozen=True)
class WalkCost:
    """The walk figures: seconds per walk (median), by mapped pages, over 1 TiB (pages spread over
    it) and over 1 GiB (pages spread over it); and, for the most pages of the 1 GiB stage 2,
    the walk over the whole 1 TiB."""

    tib: dict[int, float]
    gib: dict[int, float]
    gib_pages_over_tib: float

    @property
    def page_ratio(self) -> float:
        fewer, more = sorted(self.tib)
        return more / fewer

    @property
    def tib_ratio(self) -> float:
        """The walk with more pages over the walk with fewer, over 1 TiB."""
        fewer, more = sorted(self.tib)
        return self.tib[more] / self.tib[fewer]

    @property
    def gib_ratio(self) -> float:
        fewer, more = sorted(self.gib)
        return self.gib[more] / self.gib[fewer]

    @property
    def range_ratio(self) -> float:
        """The same pages walked over 1 TiB, against over the 1 GiB they lie in."""
        return self.gib_pages_over_tib / self.gib[max(self.gib)]


def walk_cost(pages: tuple[int, int] = WALK_PAGES, repeats: int = 1) -> WalkCost:
    """Measure the walk figures (building each stage 2 is not timed). One walk each by
    default: with 10,000 pages over 1 TiB one takes seconds, and varies little."""
    tib = {n: walk_seconds(stage2_with_pages(n, TIB), TIB, repeats) for n in pages}
    gib = {}
    for n in pages:
        pgt = stage2_with_pages(n, GIB)
        gib[n] = walk_seconds(pgt, GIB, repeats)
    # ``pgt`` holds the most pages, within the first GiB: walk it over the whole 1 TiB.
    return WalkCost(tib, gib, walk_seconds(pgt, TIB, repeats))
