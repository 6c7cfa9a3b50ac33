"""Keep freed memory in the process instead of handing it back to the kernel at once.

Every fuzz input and every state-machine example builds a fresh model VM and host, whose
page contents are bytearrays of one page each (64 KiB on the POWER profile), and drops them
all when it ends. glibc's allocator returns the top of its heap to the kernel as soon as more
than ``M_TRIM_THRESHOLD`` (128 KiB by default) is free there, so the next input faults the
same memory back in page by page: allocating a 64 KiB page then costs about 30 µs instead of
under 1 µs, which was most of fuzz_ppc.py's per-input set-up. Raising the threshold keeps up
to :data:`KEEP_BYTES` of free heap for the next input. This changes no behaviour of the model,
only where the process gets its memory. Where the C library has no ``mallopt`` (not glibc),
nothing changes.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
"""mallopt's parameter number for the trim threshold (glibc malloc.h)."""

KEEP_BYTES = 64 << 20
"""Free heap a process may keep: far above one input's needs, small next to the machine."""


def keep_freed_memory() -> bool:
    """Raise glibc's trim threshold for this process; True if the C library took it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
