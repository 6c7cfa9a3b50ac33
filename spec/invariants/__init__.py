"""White-box invariants: predicates over the reference model's state, checked after every
step of the harness. Only this package reads reference state; the contracts do not."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: the rule's id and what was found. ``about``, where a check
    sets it, names what the violation is about as an object (a known kernel finding is let
    pass by what it is about, not by the wording of its message)."""

    rule: str
    message: str
    about: Hashable = None

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"
