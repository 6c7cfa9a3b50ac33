"""Regression: a finding of fuzz_arm64.py.

Replays arm64-75ec53cf72410688938118ba567a1ab050a05acd.bin and fails while any rule is still broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression


def test_arm64_75ec53cf72410688938118ba567a1ab050a05acd() -> None:
    broken = check_regression(Path(__file__).with_name("arm64-75ec53cf72410688938118ba567a1ab050a05acd.bin"))
    assert not broken, "\n".join(broken)
