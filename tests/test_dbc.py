"""The contract mechanism: PEP 316 docstring conditions, enforced at run time and explored by
CrossHair (make crosshair)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.spec import dbc
from kvmspec.spec.uapi.memslot_rules import decide_for_crosshair

pytestmark = pytest.mark.skipif(not dbc.ENABLED, reason="KVMSPEC_CONTRACTS=off")


@dbc.checked
def halve(value: int, exact: bool = True) -> int:
    """Half of an even number.

    pre: value >= 0
    pre: not exact or value % 2 == 0
    post: __return__ * 2 <= value
    """
    return value // 2 if value != 7 else 99


def test_conditions_hold_or_raise() -> None:
    assert halve(10) == 5
    assert halve(9, exact=False) == 4
    with pytest.raises(dbc.ContractViolation, match="precondition failed: value >= 0"):
        halve(-2)
    with pytest.raises(dbc.ContractViolation, match="not exact or value % 2 == 0"):
        halve(3)
    with pytest.raises(dbc.ContractViolation, match="postcondition failed"):
        halve(7, exact=False)
    # Every argument given positionally takes the wrapper's fast path; the same conditions.
    assert halve(8, True) == 4
    with pytest.raises(dbc.ContractViolation, match="not exact or value % 2 == 0"):
        halve(5, True)
    with pytest.raises(dbc.ContractViolation, match="postcondition failed"):
        halve(7, False)
    assert isinstance(dbc.ContractViolation("x"), AssertionError)


def test_a_function_without_conditions_is_left_alone() -> None:
    def plain(value: int) -> int:
        """No contract here."""
        return value

    assert dbc.checked(plain) is plain


@given(
    slot=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 2**32 - 1),
    gpa=st.sampled_from([0, 4096, 1 << 20, (1 << 52) - 4096, 1 << 52, 2**64 - 4096]),
    size=st.sampled_from([0, 4096, 4097, 1 << 30, 1 << 43, 2**64 - 4096]),
    hva=st.sampled_from([0, 0x7F00_0000_0000, 0x7FFF_FFFF_F000, 2**64 - 4096]),
    version=st.sampled_from([1, 2]),
    old=st.booleans(),
    overlap=st.booleans(),
)
def test_the_memslot_decision_keeps_its_crosshair_contract(
    slot: int,
    flags: int,
    gpa: int,
    size: int,
    hva: int,
    version: int,
    old: bool,
    overlap: bool,
) -> None:
    """The same conditions CrossHair explores symbolically, checked on sampled inputs."""
    decide_for_crosshair(slot, flags, gpa, size, hva, version, old, 0x100, 16, 0, hva, overlap, 0)
