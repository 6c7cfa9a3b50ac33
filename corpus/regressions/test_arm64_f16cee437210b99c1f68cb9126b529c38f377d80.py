"""Regression: fuzz_arm64.py: C-AGING: host page used by a guest, aged idle (the lockless ager
cleared access flags without a TLB flush; fixed in the aging contract).

Replays arm64-f16cee437210b99c1f68cb9126b529c38f377d80.bin and fails while any rule is still
broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("arm64-f16cee437210b99c1f68cb9126b529c38f377d80.bin")


def test_arm64_f16cee437210b99c1f68cb9126b529c38f377d80() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
