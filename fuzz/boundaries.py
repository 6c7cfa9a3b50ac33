"""Boundary values for every field the fuzzers and state machines choose.

Bugs live at the edges: the first and last slot ids, the internal ids just above the user
range, the address-space bit, sizes of zero, one page, unaligned and just past the limits,
addresses near 2^48, 2^52 and 2^64. Every strategy and decoder draws from here.
"""

from __future__ import annotations

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096

SLOT_IDS = (0, 1, 2, 3, 4, 5, 509, 510, 511, 32763, 32764, 32765, 32766, 32767, 65535)
SLOT_AS_BITS = (0, 1 << 16, 2 << 16, 0xFFFF << 16)

# memory_size: valid small sizes first, then the edges of validity.
SMALL_SIZES = (PAGE, 2 * PAGE, 16 * PAGE, 64 * PAGE, 100 * PAGE, 2 * MiB)
EDGE_SIZES = (0, PAGE - 1, PAGE + 1, 0x800, (1 << 31) * PAGE, 1 << 47, 1 << 63)
# Accepted but expensive on a real kernel (about 2.5 MiB of metadata per GiB): model only.
LARGE_SIZES = (GiB, 64 * GiB, 1 << 40, ((1 << 31) - 1) * PAGE)

GPAS = (
    0,
    PAGE,
    MiB,
    2 * MiB,
    4 * GiB,
    1 << 48,
    (1 << 52) - PAGE,
    (1 << 52) - 2 * PAGE,
    1 << 52,
    1 << 63,
    (1 << 64) - PAGE,
    0x800,
)
RAW_HVAS = (
    0,
    0x7FFF_FFFF_E000,
    0x7FFF_FFFF_F000,
    0x8000_0000_0000,
    0xFFFF_8880_0000_0000,
    1 << 62,
    (1 << 64) - PAGE,
    0x800,
)
REGION_OFFSETS = (0, PAGE, 16 * PAGE, 0x800, 2 * MiB)
FLAGS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 1 << 16, 1 << 31)
GMEM_FLAGS = (0, 1, 2, 3, 4, 1 << 63)
GMEM_SIZES = (2 * MiB, PAGE, 0, 100, 64 * PAGE)
GMEM_OFFSETS = (0, PAGE, 2 * MiB - PAGE, 100, 4 * MiB, (1 << 64) - PAGE)
CLOSED_FDS = (9999,)
MANUAL_PROTECT_ARGS = (0, 1, 2, 3, 4, 7)
RING_SIZES = (0, 16, 2048, 4096, 4112, 65536, 1 << 20, 2 << 20)
FIRST_PAGES = (0, 1, 64, 128, 1 << 31)
NUM_PAGES = (0, 1, 16, 36, 64, 100, 101, 128)
VCPU_IDS = (0, 1, 4095, 4096)
NR_MMU_PAGES = (0, 63, 64, 65, 1 << 20, (1 << 64) - 1)
"""KVM_SET_NR_MMU_PAGES limits: around its minimum of 64, and the largest a u64 holds."""
MMAP_SIZES = (16 * MiB, 64 * MiB, PAGE, 4 * MiB)
