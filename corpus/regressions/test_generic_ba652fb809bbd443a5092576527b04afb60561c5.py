"""Regression: a finding of fuzz_generic.py.

Replays generic-ba652fb809bbd443a5092576527b04afb60561c5.bin and fails while any rule is still
broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("generic-ba652fb809bbd443a5092576527b04afb60561c5.bin")


def test_generic_ba652fb809bbd443a5092576527b04afb60561c5() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
