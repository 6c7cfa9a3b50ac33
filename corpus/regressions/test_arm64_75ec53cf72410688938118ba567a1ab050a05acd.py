"""Regression: fuzz_arm64.py: C-AGING: host page used by a guest, aged idle (the lockless ager
cleared access flags without a TLB flush; fixed in the aging contract).

Replays arm64-75ec53cf72410688938118ba567a1ab050a05acd.bin and fails while any rule is still
broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("arm64-75ec53cf72410688938118ba567a1ab050a05acd.bin")


def test_arm64_75ec53cf72410688938118ba567a1ab050a05acd() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
