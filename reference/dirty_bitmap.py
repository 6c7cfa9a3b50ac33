"""A slot's dirty bitmap, stored sparsely.

The kernel allocates one bit per page of a dirty-logged slot (2.5 MiB of metadata per GiB
including the arch arrays). The model keeps only the 64-bit words that differ from a fill
value: all zeroes normally, all ones after KVM_DIRTY_LOG_INITIALLY_SET. A 1 TiB slot with
dirty logging therefore costs O(1) until pages are touched.

kernel: virt/kvm/kvm_main.c:kvm_alloc_dirty_bitmap; include/linux/kvm_host.h:
kvm_dirty_bitmap_bytes (v6.18)
"""

from __future__ import annotations

WORD_BITS = 64
WORD_MASK = (1 << WORD_BITS) - 1


class DirtyBitmap:
    """One bit per page of a slot; bit i of word w is page w*64 + i."""

    __slots__ = ("_fill", "_words", "npages")

    def __init__(self, npages: int, initially_set: bool = False) -> None:
        self.npages = npages
        self._fill = initially_set
        self._words: dict[int, int] = {}

    @property
    def nr_words(self) -> int:
        return (self.npages + WORD_BITS - 1) // WORD_BITS

    def _valid_mask(self, index: int) -> int:
        """Bits of word ``index`` that stand for real pages (the last word may be partial)."""
        pages_left = self.npages - index * WORD_BITS
        return WORD_MASK if pages_left >= WORD_BITS else (1 << pages_left) - 1

    def _default(self, index: int) -> int:
        return self._valid_mask(index) if self._fill else 0

    def word(self, index: int) -> int:
        return self._words.get(index, self._default(index))

    def _store(self, index: int, value: int) -> None:
        if value == self._default(index):
            self._words.pop(index, None)
        else:
            self._words[index] = value

    def words(self) -> list[int]:
        """Every word, as KVM_GET_DIRTY_LOG copies it to userspace."""
        return [self.word(index) for index in range(self.nr_words)]

    def set_bit(self, page: int) -> None:
        """Mark one page dirty (set_bit_le in mark_page_dirty_in_slot)."""
        index = page // WORD_BITS
        self._store(index, self.word(index) | 1 << (page % WORD_BITS))

    def test_bit(self, page: int) -> bool:
        return bool(self.word(page // WORD_BITS) >> (page % WORD_BITS) & 1)

    def xchg_word(self, index: int) -> int:
        """Atomically take a word and leave zero behind (GET_DIRTY_LOG without manual protect)."""
        value = self.word(index)
        self._store(index, 0)
        return value

    def fetch_andnot_word(self, index: int, mask: int) -> int:
        """Clear ``mask`` in a word; return the bits that were set and are now cleared."""
        value = self.word(index)
        self._store(index, value & ~mask & WORD_MASK)
        return value & mask

    def stored_words(self) -> int:
        """How many words the sparse representation holds (the memory it costs)."""
        return len(self._words)
