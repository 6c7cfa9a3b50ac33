"""The x86 shadow-MMU harness's VM layouts, and a fresh VM in any of them.

kvmspec.fuzz.x86_harness holds the ``shadow`` layout (and ``mmio``, the same VM with MMIO
caching on), kvmspec.fuzz.x86_huge_harness the ``huge`` one; the state machine and the
Atheris decoder start every run from one of :data:`LAYOUTS`.
"""

from __future__ import annotations

from kvmspec.fuzz.generic_harness import Log
from kvmspec.fuzz.x86_harness import ShadowHarness, _ignore
from kvmspec.fuzz.x86_huge_harness import HugeHarness
from kvmspec.spec.platforms import PlatformProfile

LAYOUTS = ("shadow", "huge")
"""The VM layouts a run may start from: :class:`ShadowHarness` and :class:`HugeHarness`.
The ``mmio`` layout (:class:`ShadowHarness` with MMIO caching on) is left out: fuzzing it
finds FNAME(sync_spte) giving a stale MMIO SPTE the current generation (a kernel finding,
tests/test_x86_shadow_mmu.py) within seconds; :func:`make_harness` builds it on request."""
SHADOW_LAYOUTS = ("shadow", "mmio")

X86Harness = ShadowHarness | HugeHarness


def make_harness(layout: str, profile: PlatformProfile, log: Log = _ignore) -> X86Harness:
    """A fresh VM in ``layout`` (one of :data:`LAYOUTS`)."""
    if layout in SHADOW_LAYOUTS:
        return ShadowHarness(profile, log=log, mmio_caching=layout == "mmio")
    return HugeHarness(profile, log=log)
