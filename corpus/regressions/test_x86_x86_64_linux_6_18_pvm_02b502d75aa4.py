"""Regression: x86/x86_64-linux-6.18-pvm: X5: vcpu 0 caches MMIO gfn 0x13 for data page 3; its
entries since the last flush map [16].

Replays x86-x86_64-linux-6.18-pvm-02b502d75aa4.bin and fails while any rule is still broken
(kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("x86-x86_64-linux-6.18-pvm-02b502d75aa4.bin")


def test_x86_x86_64_linux_6_18_pvm_02b502d75aa4() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
