"""Guest sessions: memslots, guest accesses, the VMM's memory and dirty logging, judged by
the black-box contracts on any target, and the reference against the real kernel.

* every conformance trace is judged by the memory, dirty-log and memslot contracts on the
  reference and (where /dev/kvm opens) on the real kernel, and breaks none of them;
* the guest machine on the reference keeps every contract, and what it runs is a trace the
  parser accepts;
* a reference that forgets to re-protect after a harvest is caught by the contracts alone;
* the differential guest machine finds the reference and the real kernel in agreement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import Phase, settings

from kvmspec.fuzz import machines
from kvmspec.fuzz import session as fuzz_session
from kvmspec.fuzz.profiles import FAST
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.fuzz.trace import load, parse_lines
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "conformance"
TRACES = sorted(CORPUS.glob("**/*.jsonl"))


def _kvm_or_skip() -> None:
    try:
        make_target("linux-kvm", DEFAULT_PROFILE).close()
    except (TargetUnavailable, ImportError) as reason:
        pytest.skip(f"linux-kvm target unavailable: {reason}")


@pytest.mark.parametrize("target", ["reference", "linux-kvm"])
def test_conformance_traces_keep_the_contracts(target: str) -> None:
    if target == "linux-kvm":
        _kvm_or_skip()
    broken = []
    for path in TRACES:
        trace = load(path)
        session = Session(PROFILES[trace.platform], target)
        try:
            for step in trace.steps:
                _observed, violations = session.apply(step.op)
                if violations:
                    broken.append(f"{path.name}:{step.line}: {violations[0]}")
                    break
        finally:
            session.close()
    assert not broken, "\n".join(broken)


def _settings(examples: int) -> settings:
    return settings(
        settings.get_profile(FAST),
        max_examples=examples,
        print_blob=False,
        phases=[Phase.explicit, Phase.generate],
        database=None,
    )


def test_the_guest_machine_keeps_every_contract() -> None:
    machine = machines.memslot_machine(DEFAULT_PROFILE, mix="guest")
    machine.TestCase.settings = _settings(60)
    machine.TestCase().runTest()
    # What it ran is a trace with guest operations that the parser accepts.
    assert parse_lines(machines.LAST_RUN["trace"].splitlines()).steps


def _forgets(self: ShadowMmu, kvm: object, slot: object, gfn_offset: int, mask: int) -> None:
    """A harvest that reports pages without write-protecting them again."""


def test_the_contracts_catch_a_harvest_that_forgets_to_reprotect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From outside: a write after the harvest goes unreported (the white-box checks of the
    shadow MMU, which would see the writable leaf first, are off)."""
    # The reference runs the default profile on the shadow MMU.
    monkeypatch.setattr(ShadowMmu, "kvm_arch_mmu_enable_log_dirty_pt_masked", _forgets)
    monkeypatch.setattr(fuzz_session, "_arch_checks", lambda kvm, host: None)
    machine = machines.memslot_machine(DEFAULT_PROFILE, mix="guest")
    machine.TestCase.settings = _settings(2000)
    with pytest.raises(AssertionError, match="C-DIRTY-COMPLETE"):
        machine.TestCase().runTest()


def test_the_shadow_mmu_checks_catch_a_harvest_that_forgets_to_reprotect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From inside: D1 sees the leaf that stayed writable over a page just reported clean,
    before the guest writes through it."""
    monkeypatch.setattr(ShadowMmu, "kvm_arch_mmu_enable_log_dirty_pt_masked", _forgets)
    machine = machines.memslot_machine(DEFAULT_PROFILE, mix="guest")
    machine.TestCase.settings = _settings(2000)
    with pytest.raises(AssertionError, match=r"D1: gfn 0x[0-9a-f]+ of logged slot"):
        machine.TestCase().runTest()


def test_the_reference_and_the_kernel_agree_with_a_guest() -> None:
    _kvm_or_skip()
    machine = machines.differential_machine(DEFAULT_PROFILE, mix="guest")
    machine.TestCase.settings = _settings(40)
    machine.TestCase().runTest()
