"""White-box invariants: predicates over the reference model's state, checked after every
step of the harness. Only this package reads reference state; the contracts do not."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: the rule's id and what was found."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"
