"""A floor lookup on a sorted container: the greatest key at or below a bound.

The memslot gfn tree, the hva index and the host's tables ask one question far more than any
other: which entry starts at or below this address? :func:`floor_item_plain` and
:func:`floor_value_plain` are the definitions, written with the public ``irange`` API.
:func:`floor_item` and :func:`floor_value` answer the same questions with two C-speed
bisections over the container's two-level list (sortedcontainers keeps its keys as a list of
sorted sublists with their maxima in ``_maxes``; see its implementation notes). The public API
would build an iterator over slices per call, which costs more than the lookup itself at 32764
slots. tests/test_reference_memslots.py proves each fast form equal to its definition.

Two containers are used. A ``SortedDict`` maps keys to values. A ``SortedKeyList`` holds the
values themselves, ordered by a key computed from each (a slot's base gfn): it keeps the values
in sublists parallel to the keys, so a floor lookup reaches the value without the extra hash
lookup a ``SortedDict`` needs, which is where a cold cache hurts most at 32764 slots.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

from sortedcontainers import SortedDict, SortedKeyList


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


def floor_value_plain(tree: SortedKeyList, key: int) -> Any | None:
    """The value with the greatest key <= ``key``, or None: the definition."""
    for found in tree.irange_key(max_key=key, reverse=True):
        return found
    return None


def floor_value(tree: SortedKeyList, key: int) -> Any | None:
    """The same answer as :func:`floor_value_plain`, in O(log n) bisections."""
    maxes: list[int] = tree._maxes
    position = bisect_right(maxes, key)
    if position == len(maxes):
        # key is at or above the largest key (or the list is empty).
        return tree._lists[-1][-1] if maxes else None
    index = bisect_right(tree._keys[position], key)
    if index:
        return tree._lists[position][index - 1]
    if position:
        return tree._lists[position - 1][-1]
    return None


def replace_value(tree: SortedKeyList, old: Any, new: Any) -> None:
    """Put ``new`` in the place of ``old``, which has the same key; keys must be unique.

    An in-place swap keeps the order without the remove and add, each O(log n) with a list
    shift, that the public API would need.
    """
    key = tree.key(new)
    if tree.key(old) != key:
        raise ValueError("replace_value: the two values have different keys")
    position = bisect_left(tree._maxes, key)
    if position == len(tree._maxes):
        raise ValueError(f"replace_value: {old!r} is not in the list")
    index = bisect_left(tree._keys[position], key)
    values: list[Any] = tree._lists[position]
    if index == len(values) or values[index] is not old:
        raise ValueError(f"replace_value: {old!r} is not in the list")
    values[index] = new
