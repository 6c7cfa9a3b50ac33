"""A floor lookup on a sorted map: the greatest key at or below a bound.

The memslot gfn tree and the hva index ask one question far more than any other: which entry
starts at or below this address? :func:`floor_item_plain` is the definition, written with the
public ``irange`` API. :func:`floor_item` answers the same question with two C-speed bisections
over the sorted map's two-level list (sortedcontainers keeps its keys as a list of sorted
sublists, ``_lists``, with their maxima in ``_maxes``; see its implementation notes). The
public API would build an iterator over slices per call, which costs more than the lookup
itself at 32764 slots. tests/test_reference_memslots.py proves the two equal.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from sortedcontainers import SortedDict


def floor_item_plain(tree: SortedDict, key: int) -> tuple[int, Any] | None:
    """(greatest key <= ``key``, its value), or None: the definition."""
    for found in tree.irange(maximum=key, reverse=True):
        return found, tree[found]
    return None


def floor_item(tree: SortedDict, key: int) -> tuple[int, Any] | None:
    """The same answer as :func:`floor_item_plain`, in O(log n) bisections."""
    keys = tree._list  # the SortedList of keys
    maxes: list[int] = keys._maxes
    position = bisect_right(maxes, key)
    if position == len(maxes):
        # key is at or above the largest key (or the map is empty).
        if not maxes:
            return None
        found = maxes[-1]
        return found, tree[found]
    sublist: list[int] = keys._lists[position]
    index = bisect_right(sublist, key)
    if index:
        found = sublist[index - 1]
    elif position:
        found = keys._lists[position - 1][-1]
    else:
        return None
    return found, tree[found]
