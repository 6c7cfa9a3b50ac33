"""The state machines: every profile's reference model satisfies every rule, and the real
kernel behaves exactly like the reference (differential, where /dev/kvm exists)."""

from __future__ import annotations

import pytest
from hypothesis import settings

from kvmspec.fuzz.machines import differential_machine, memslot_machine
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
def test_reference_satisfies_every_rule(profile_name: str) -> None:
    machine = memslot_machine(PROFILES[profile_name])
    machine.TestCase.settings = settings(settings.default, max_examples=25)
    machine.TestCase().runTest()


def _require_kvm() -> None:
    try:
        make_target("linux-kvm", DEFAULT_PROFILE).close()
    except (TargetUnavailable, ImportError) as reason:
        pytest.skip(f"linux-kvm target unavailable: {reason}")


@pytest.mark.kvm
def test_linux_kvm_satisfies_the_contracts() -> None:
    _require_kvm()
    machine = memslot_machine(DEFAULT_PROFILE, "linux-kvm")
    machine.TestCase.settings = settings(settings.default, max_examples=25)
    machine.TestCase().runTest()


@pytest.mark.kvm
def test_reference_and_linux_kvm_agree_on_every_operation() -> None:
    _require_kvm()
    machine = differential_machine(DEFAULT_PROFILE)
    machine.TestCase.settings = settings(settings.default, max_examples=40)
    machine.TestCase().runTest()
