"""The VMM's address space, as KVM sees it: anonymous mappings at host virtual addresses.

This is the part of the host the memslot layer needs: places in the VMM's address space
(``mmap``) whose addresses a memslot's ``userspace_addr`` can point at. Pages, reference
counts, host PTEs and MMU-notifier events belong to the generic-machinery layer.

kernel: mm/mmap.c:do_mmap (the errno rules of mmap(2))
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EINVAL, ENOMEM

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
PROTECTIONS = {"none": PROT_NONE, "r": PROT_READ, "rw": PROT_READ | PROT_WRITE}

# Where the model places mappings: top-down below the usual mmap base, 2 MiB aligned so that
# huge pages are possible, with a guard gap between regions.
MMAP_TOP = 0x7F00_0000_0000
MMAP_ALIGN = 2 << 20


@dataclass(slots=True)
class Vma:
    start: int
    end: int
    prot: int


class HostMm:
    """struct mm_struct of the VMM, reduced to its VMAs."""

    __slots__ = ("_next_top", "page_size", "task_size", "vmas")

    def __init__(self, page_size: int, task_size: int) -> None:
        self.page_size = page_size
        self.task_size = task_size
        self.vmas: list[Vma] = []
        self._next_top = min(MMAP_TOP, task_size)

    def mmap(self, size: int, prot: int) -> tuple[int, int]:
        """mmap(NULL, size, prot, MAP_PRIVATE | MAP_ANONYMOUS): (errno, address)."""
        if size <= 0:
            return EINVAL, 0
        length = -(-size // self.page_size) * self.page_size
        start = (self._next_top - length) // MMAP_ALIGN * MMAP_ALIGN
        if start < MMAP_ALIGN:
            return ENOMEM, 0
        self._next_top = start - MMAP_ALIGN
        self.vmas.append(Vma(start, start + length, prot))
        return 0, start
