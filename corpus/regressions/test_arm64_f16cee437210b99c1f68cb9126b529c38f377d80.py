"""Regression: a finding of fuzz_arm64.py.

Replays arm64-f16cee437210b99c1f68cb9126b529c38f377d80.bin and fails while any rule is still broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression


def test_arm64_f16cee437210b99c1f68cb9126b529c38f377d80() -> None:
    broken = check_regression(Path(__file__).with_name("arm64-f16cee437210b99c1f68cb9126b529c38f377d80.bin"))
    assert not broken, "\n".join(broken)
