"""Regression: a finding of fuzz_x86.py.

Replays x86-2ecdebd07dd6c3d51d51968604e33997b7a0bbd1.bin and fails while any rule is still
broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("x86-2ecdebd07dd6c3d51d51968604e33997b7a0bbd1.bin")


def test_x86_2ecdebd07dd6c3d51d51968604e33997b7a0bbd1() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
