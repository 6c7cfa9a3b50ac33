"""The cost of finding the memslot of a gfn, with few slots and with every slot.

The model keeps a set's slots in an ordered map by base gfn (the kernel's gfn rbtree), so a
lookup should cost O(log n): 32764 slots may cost more than 10, but not much more. The lookups
go to random one-page slots, never the same slot twice in a row, so the last-used-slot cache
of ``gfn_to_memslot`` never answers; ``search_memslots`` is the uncached search itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench import median_seconds
from bench.memslots import HOST, HOST_PAGES, PAGE, phase_requests
from kvmspec.fuzz.ops import Mmap
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.reference.memslots import KvmMemslots
from kvmspec.spec.platforms import PlatformProfile

LOOKUPS = 200_000


def memslots_with(profile: PlatformProfile, nslots: int) -> KvmMemslots:
    """The active memslot set of a model VM holding ``nslots`` one-page slots."""
    target = ReferenceTarget(profile)
    target.apply(Mmap(HOST, HOST_PAGES * PAGE))
    for request in phase_requests(nslots)["create"]:
        if target.apply(request)["errno"]:
            raise RuntimeError(f"cannot create {request}")
    return target.kvm.memslots(0)


def random_gfns(slots: KvmMemslots, count: int, rng: random.Random) -> list[int]:
    """Gfns inside the slots, each in a different slot from the one before."""
    bases = [slot.base_gfn for slot in slots]
    gfns: list[int] = []
    previous = -1
    while len(gfns) < count:
        index = rng.randrange(len(bases))
        if index != previous:
            gfns.append(bases[index])
            previous = index
    return gfns


@dataclass(frozen=True)
class LookupCost:
    """Nanoseconds per lookup, by slot count."""

    search_memslots: dict[int, float]
    gfn_to_memslot: dict[int, float]


def measure(profile: PlatformProfile, sizes: tuple[int, int] = (10, 32764)) -> LookupCost:
    """Median time per lookup (5 passes of LOOKUPS lookups) at each size."""
    search: dict[int, float] = {}
    cached: dict[int, float] = {}
    for nslots in sizes:
        slots = memslots_with(profile, nslots)
        gfns = random_gfns(slots, LOOKUPS, random.Random(nslots))

        def search_all(slots: KvmMemslots = slots, gfns: list[int] = gfns) -> None:
            find = slots.search_memslots
            for gfn in gfns:
                if find(gfn) is None:
                    raise AssertionError(f"gfn {gfn:#x} has no slot")

        def lookup_all(slots: KvmMemslots = slots, gfns: list[int] = gfns) -> None:
            find = slots.gfn_to_memslot
            for gfn in gfns:
                if find(gfn) is None:
                    raise AssertionError(f"gfn {gfn:#x} has no slot")

        search[nslots] = median_seconds(search_all, 5) / LOOKUPS * 1e9
        cached[nslots] = median_seconds(lookup_all, 5) / LOOKUPS * 1e9
    return LookupCost(search, cached)
