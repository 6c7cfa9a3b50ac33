"""The x86 shadow-MMU harness's VM layouts, and a fresh VM in any of them.

kvmspec.fuzz.x86_harness holds the ``shadow`` layout (and ``mmio``, the same VM with MMIO
caching on), kvmspec.fuzz.x86_huge_harness the ``huge`` one; the state machine and the
Atheris decoder start every run from one of :data:`LAYOUTS`.
"""

from __future__ import annotations

from kvmspec.fuzz.generic_harness import Log
from kvmspec.fuzz.x86_harness import ShadowHarness, _ignore
from kvmspec.fuzz.x86_huge_harness import HugeHarness
from kvmspec.fuzz.x86_known_findings import KNOWN_KERNEL_FINDINGS
from kvmspec.spec.platforms import PlatformProfile

LAYOUTS = ("shadow", "huge", "mmio")
"""The VM layouts a run may start from: :class:`ShadowHarness`, :class:`HugeHarness`, and
``mmio``, :class:`ShadowHarness` with MMIO caching on. New layouts go at the end (the
decoder's first answer picks one, modulo their number), so older inputs keep their meaning.
Fuzzing the mmio layout finds a known kernel finding within seconds (FNAME(sync_spte) gives
a stale MMIO SPTE the current generation: tests/test_x86_shadow_mmu.py), which
:func:`make_harness` lets pass (:data:`~kvmspec.fuzz.x86_known_findings.KNOWN_KERNEL_FINDINGS`)."""
SHADOW_LAYOUTS = ("shadow", "mmio")

X86Harness = ShadowHarness | HugeHarness


def make_harness(layout: str, profile: PlatformProfile, log: Log = _ignore) -> X86Harness:
    """A fresh VM in ``layout`` (one of :data:`LAYOUTS`), for the fuzzers: the known kernel
    findings pass its checks."""
    if layout in SHADOW_LAYOUTS:
        return ShadowHarness(
            profile, log=log, mmio_caching=layout == "mmio", tolerated=KNOWN_KERNEL_FINDINGS
        )
    return HugeHarness(profile, log=log)
