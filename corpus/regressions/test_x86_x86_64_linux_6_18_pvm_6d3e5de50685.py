"""Regression: x86/x86_64-linux-6.18-pvm: COHERENCE: table 2 entry 100:
ShadowAccess(outcome=<Outcome.ENOSPC: 'enospc'>, data=b'', mmio=None, exception=None).

Replays x86-x86_64-linux-6.18-pvm-6d3e5de50685.bin and fails while any rule is still broken
(kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("x86-x86_64-linux-6.18-pvm-6d3e5de50685.bin")


def test_x86_x86_64_linux_6_18_pvm_6d3e5de50685() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
