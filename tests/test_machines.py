"""The state machines: every profile's reference model satisfies every rule, and the real
kernel behaves exactly like the reference (differential, where /dev/kvm exists)."""

from __future__ import annotations

import pytest
from hypothesis import settings

from kvmspec.fuzz.machines import differential_machine, memslot_machine
from kvmspec.fuzz.ops import CheckExtension
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.reference import capabilities
from kvmspec.reference.kvm import Kvm
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES
from kvmspec.spec.uapi.constants import CAPABILITIES


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
def test_reference_satisfies_every_rule(profile_name: str) -> None:
    machine = memslot_machine(PROFILES[profile_name])
    machine.TestCase.settings = settings(settings.default, max_examples=25)
    machine.TestCase().runTest()


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
def test_every_capability_answer_is_the_contracts(profile_name: str) -> None:
    """The reference (the kernel's code path) and C-CAPABILITIES (the uAPI's promise) are
    written apart; they agree on every memory capability of every profile."""
    session = Session(PROFILES[profile_name], "reference")
    for cap in sorted(CAPABILITIES):
        _, violations = session.apply(CheckExtension(cap))
        assert violations == [], cap


def test_a_wrong_capability_answer_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel answering 2 for KVM_CAP_USER_MEMORY (Linux answers 1) breaks C-CAPABILITIES."""
    answer = capabilities.kvm_vm_ioctl_check_extension

    def planted(kvm: Kvm, cap: int) -> int:
        return 2 if cap == CAPABILITIES["KVM_CAP_USER_MEMORY"] else answer(kvm, cap)

    monkeypatch.setattr("kvmspec.fuzz.targets.reference.kvm_vm_ioctl_check_extension", planted)
    session = Session(DEFAULT_PROFILE, "reference")
    _, violations = session.apply(CheckExtension("KVM_CAP_USER_MEMORY"))
    assert violations == [
        "C-CAPABILITIES: check_extension KVM_CAP_USER_MEMORY: expected 1, observed 2"
    ]
    assert session.apply(CheckExtension("KVM_CAP_SYNC_MMU"))[1] == []


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


@pytest.mark.kvm
def test_linux_kvm_answers_every_capability_as_the_contract_says() -> None:
    _require_kvm()
    session = Session(DEFAULT_PROFILE, "linux-kvm")
    try:
        for cap in sorted(CAPABILITIES):
            _, violations = session.apply(CheckExtension(cap))
            assert violations == [], cap
    finally:
        session.close()
