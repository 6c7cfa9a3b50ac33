"""Peak memory of the model for one 1 TiB slot plus a full set of one-page slots.

Run as a subprocess (``python -m bench.memory``) so that nothing else has raised the peak: it
reads the resident set size (VmRSS) after building an empty model VM, builds a 1 TiB
dirty-logged slot and one-page slots up to the user-slot limit (32763 more on the x86
profiles), reads the peak again and prints one JSON object. The kernel would need 32 MiB for
the 1 TiB slot's dirty bitmap alone; the model stores only the words that differ from their
fill value (:class:`~kvmspec.reference.dirty_bitmap.DirtyBitmap`). The growth is the peak
(VmHWM) after, minus the resident size before.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import REPO

TIB = 1 << 40


def _status_kib(field: str) -> int | None:
    """A size field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB, None if unreadable."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_kib() -> int:
    """The current resident set size in KiB (the peak so far where /proc is missing)."""
    current = _status_kib("VmRSS")
    return current if current is not None else peak_rss_kib()


def peak_rss_kib() -> int:
    """The process's peak resident set size so far, in KiB (VmHWM, else ru_maxrss)."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def probe() -> dict[str, int]:
    """Build the VM in this process and report the peak RSS before and after."""
    from bench.memslots import HOST, HOST_PAGES, PAGE, phase_requests
    from kvmspec.fuzz.ops import Mmap, RegionAddr, SetUserMemoryRegion
    from kvmspec.fuzz.targets.reference import ReferenceTarget
    from kvmspec.spec.platforms import DEFAULT_PROFILE
    from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES

    profile = DEFAULT_PROFILE
    small_slots = profile.user_mem_slots - 1
    target = ReferenceTarget(profile)
    target.apply(Mmap(HOST, HOST_PAGES * PAGE))
    target.apply(Mmap("big", TIB))
    requests = phase_requests(small_slots)["create"]  # slots 0.., below 16 MiB + 256 MiB
    big = SetUserMemoryRegion(small_slots, KVM_MEM_LOG_DIRTY_PAGES, TIB, TIB, RegionAddr("big"))
    before = rss_kib()  # not the peak: imports may have peaked higher and been freed

    for request in [big, *requests]:
        if target.apply(request)["errno"]:
            raise RuntimeError(f"cannot create {request}")

    after = peak_rss_kib()
    slot = target.kvm.memslots(0).id_to_memslot(small_slots)
    assert slot is not None and slot.dirty_bitmap is not None
    return {
        "slots": len(target.kvm.memslots(0)),
        "small_slots": small_slots,
        "before_kib": before,
        "after_kib": after,
        "bitmap_stored_words": slot.dirty_bitmap.stored_words(),
        "bitmap_words": slot.dirty_bitmap.nr_words,
    }


@dataclass(frozen=True)
class MemoryCost:
    slots: int
    small_slots: int
    growth_mib: float
    bitmap_stored_words: int
    bitmap_words: int


def measure() -> MemoryCost:
    """Run :func:`probe` in a fresh Python and read its answer."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    answer = json.loads(result.stdout)
    return MemoryCost(
        slots=answer["slots"],
        small_slots=answer["small_slots"],
        growth_mib=(answer["after_kib"] - answer["before_kib"]) / 1024,
        bitmap_stored_words=answer["bitmap_stored_words"],
        bitmap_words=answer["bitmap_words"],
    )


if __name__ == "__main__":
    print(json.dumps(probe()))
