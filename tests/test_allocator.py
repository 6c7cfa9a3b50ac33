"""fuzz/allocator.py: a fresh VM per fuzz input must not fault its freed memory back in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kvmspec.fuzz.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt's trim threshold is glibc's",
)

# Allocate eight 64 KiB pages (one POWER input's host memory), drop them, again and again:
# the median microseconds per page, before and after keep_freed_memory().
_MEASURE = """
import statistics, time
from kvmspec.fuzz.allocator import keep_freed_memory

def per_page():
    samples = []
    for _ in range(200):
        start = time.perf_counter()
        pages = [bytearray(65536) for _ in range(8)]
        samples.append((time.perf_counter() - start) / 8)
        del pages
    return statistics.median(samples) * 1e6

before = per_page()
assert keep_freed_memory()
print(before, per_page())
"""


def test_the_c_library_takes_the_threshold() -> None:
    assert keep_freed_memory()


def test_freed_pages_come_back_without_page_faults() -> None:
    """By default glibc trims the freed pages and the next batch faults them in again (about
    30 µs a page here); with the threshold raised they are reused (under 1 µs)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True
    ).stdout
    before, after = map(float, out.split())
    assert after * 3 < before, f"{before:.1f} µs a page before, {after:.1f} µs after"
