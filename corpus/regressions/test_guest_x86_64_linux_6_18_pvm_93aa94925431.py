"""Regression: guest/x86_64-linux-6.18-pvm: D1: gfn 0x110 of logged slot 3 writable, not recorded.

Replays guest-x86_64-linux-6.18-pvm-93aa94925431.jsonl and fails while any rule is still broken
(kvmspec.fuzz.regressions).
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

FINDING = Path(__file__).with_name("guest-x86_64-linux-6.18-pvm-93aa94925431.jsonl")


def test_guest_x86_64_linux_6_18_pvm_93aa94925431() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\n".join(broken)
