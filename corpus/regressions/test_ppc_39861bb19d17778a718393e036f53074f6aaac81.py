"""Regression: a finding of fuzz_ppc.py.

Replays ppc-39861bb19d17778a718393e036f53074f6aaac81.bin and fails while any rule is still
broken (kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("ppc-39861bb19d17778a718393e036f53074f6aaac81.bin")


def test_ppc_39861bb19d17778a718393e036f53074f6aaac81() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
