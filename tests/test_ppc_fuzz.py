"""The POWER Book3S HV Atheris target (fuzz/fuzz_ppc.py) and its bytes decoder
(kvmspec.fuzz.ppc_decoder): every kind of action is a harness method, the seeds are their
scenarios and run clean, any bytes decode without raising, the actions the state does not
allow are rejected and counted, planted bugs (a removal path that ignores INVALID slots, seed
000; hypercalls that skip the tlbie, P6) are found by random inputs, the state machine's
failing run replays as an input, and libFuzzer runs the script on the seeds. Hypercalls with
bad arguments answer H_PARAMETER and change nothing; H_BULK_REMOVE's conditions remove what
H_REMOVE would; planted bugs in both are caught."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmspec.fuzz import atheris_support as support
from kvmspec.fuzz import fuzz_ppc, harness_fuzzing, machines, ppc_decoder, ppc_harness, ppc_hcalls
from kvmspec.fuzz.decoder import BytesChooser
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.ppc_harness import EAS, INVALID_HCALLS, PpcHarness
from kvmspec.fuzz.ppc_machine import ppc_machine
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.seed_bugs import revmap_for_usable_slots_only
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.ppc import hcalls, hpt
from kvmspec.reference.ppc.hcalls import H_ANDCOND, H_AVPN, H_SUCCESS
from kvmspec.spec.platforms import PPC64_HV

REPO = Path(__file__).resolve().parents[1]
PPC_SEEDS = support.seed_files("ppc")
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


random_inputs = support.random_inputs


# -- the decoder and its seeds -------------------------------------------------------------------


def test_every_kind_of_ppc_action_is_a_harness_method_with_its_arguments() -> None:
    for kind in ppc_decoder.KINDS:
        parameters = list(inspect.signature(getattr(PpcHarness, kind.method)).parameters)
        assert parameters == ["self", *(name for name, _ in kind.params)], kind.method
    # Every action of the harness can be decoded.
    actions = {
        name
        for name, member in inspect.getmembers(PpcHarness, inspect.isfunction)
        if not name.startswith("_") and inspect.signature(member).return_annotation == "None"
    }
    decoded = {kind.method for kind in ppc_decoder.KINDS}
    assert actions - {"check"} == decoded


def test_every_ppc_seed_is_its_scenario_encoded() -> None:
    assert {path.stem for path in PPC_SEEDS} == set(ppc_decoder.SEED_SCENARIOS)
    for path in PPC_SEEDS:
        assert path.read_bytes() == ppc_decoder.encode(ppc_decoder.SEED_SCENARIOS[path.stem]), (
            f"{path.name} is stale; rebuild the seeds with: "
            ".venv/bin/python -m kvmspec.fuzz.ppc_decoder seeds"
        )


def test_the_seeds_cover_every_kind_of_action() -> None:
    used = {method for steps in ppc_decoder.SEED_SCENARIOS.values() for method, _ in steps}
    assert used == {kind.method for kind in ppc_decoder.KINDS}


@pytest.mark.parametrize("seed", PPC_SEEDS, ids=lambda path: path.stem)
def test_ppc_seed_runs_every_action_clean(seed: Path) -> None:
    """A seed is a scenario of allowed actions only: none is rejected, no rule is broken."""
    run = fuzz_ppc.run_input(seed.read_bytes())
    assert run.violations == []
    assert run.rejected.total() == 0
    assert run.actions == len(ppc_decoder.SEED_SCENARIOS[seed.stem])


@settings(max_examples=60)
@given(data=st.binary(max_size=300))
def test_the_ppc_decoder_never_raises(data: bytes) -> None:
    """Any bytes: every decoded action is applied or rejected, and the correct model breaks
    no rule."""
    run = fuzz_ppc.run_input(data)
    assert run.violations == []
    assert run.actions + run.rejected.total() <= fuzz_ppc.MAX_ACTIONS


def test_actions_the_state_does_not_allow_are_rejected_and_counted() -> None:
    """A second H_ENTER for an address, an H_PROTECT of an address without an entry, a
    write to an unmapped page, a harvest of a deleted slot, turning logging to what it is:
    each is rejected with its rule, and the run goes on."""
    data = ppc_decoder.encode(
        [
            ("h_enter", (0, 0, True, False, False, -1)),
            ("h_enter", (0, 1, True, False, False, -1)),
            ("h_protect", (1, False)),
            ("host_munmap", (2,)),
            ("host_write", (0, 2)),
            ("toggle_slot1_log", (True,)),
            ("change_slot1", (None,)),
            ("get_dirty_log", ()),
            ("change_slot1", (None,)),
            ("h_remove", (0, H_AVPN)),
        ]
    )
    lines: list[str] = []
    run = fuzz_ppc.run_input(data, lines.append)
    assert run.violations == [] and run.actions == 4
    assert run.rejected == {
        "entered already": 1,
        "no entry": 1,
        "unmapped": 1,
        "no change": 1,
        "no slot 1": 2,
    }
    assert "h_protect rejected (no entry): for ea 0x1000" in lines


def test_the_seed_command_wants_its_one_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert ppc_decoder.main([]) == 2
    assert capsys.readouterr().err == "usage: python -m kvmspec.fuzz.ppc_decoder seeds\n"


def test_each_input_starts_from_a_copy_of_the_same_set_up_vm() -> None:
    """fuzz_ppc restores the set-up VM from one snapshot per process instead of building it
    per input: the copy holds what a freshly built VM holds, and every seed and 200 random
    inputs run exactly as they do on a freshly built one."""
    fresh = PpcHarness(tolerated=ppc_harness.KNOWN_KERNEL_FINDINGS)
    copy = fuzz_ppc.new_harness(fresh.log)
    assert copy is not fuzz_ppc.new_harness(fresh.log)  # each input its own
    # Compared as copies made the same way (a copy shares fewer strings than the original).
    assert pickle.dumps(copy) == pickle.dumps(pickle.loads(pickle.dumps(fresh)))

    def built(data: bytes) -> fuzz_ppc.Run[str]:
        chooser = BytesChooser(data)
        return harness_fuzzing.drive(
            fuzz_ppc.Run("set_up()"),
            chooser,
            lambda log: PpcHarness(PPC64_HV, log, ppc_harness.KNOWN_KERNEL_FINDINGS),
            lambda harness: ppc_decoder.decode_action(chooser, harness),
            None,
            fuzz_ppc.MAX_ACTIONS,
        )

    inputs = [seed.read_bytes() for seed in PPC_SEEDS] + list(random_inputs(200, 256))
    for data in inputs:
        restored, rebuilt = fuzz_ppc.run_input(data), built(data)
        assert (restored.actions, restored.violations, restored.rejected) == (
            rebuilt.actions,
            rebuilt.violations,
            rebuilt.rejected,
        )


# -- planted bugs, found by random inputs -------------------------------------------------------


def first_finding(count: int = 400) -> bytes:
    """The first of ``count`` random inputs (up to 256 bytes) that breaks a rule."""
    found = next(
        (data for data in random_inputs(count, 256) if fuzz_ppc.run_input(data).violations), None
    )
    assert found is not None, f"{count} random inputs found nothing"
    return found


def test_a_removal_path_that_ignores_invalid_slots_is_found_by_fuzzing(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    """Planted bug (seed 000): remove_revmap_chain looks only at usable slots, so an entry
    the guest removes while its slot is INVALID stays on the slot's chain. Random inputs
    find entries left mapping pages of no slot, or, entered again meanwhile, valid on a
    chain that is not their page's; the finding names the rule, prints the actions and
    keeps the input and its report."""

    usable_only = revmap_for_usable_slots_only(hpt.revmap_for_hpte)
    monkeypatch.setattr(hpt, "revmap_for_hpte", usable_only)
    # Which random input finds it depends on the decoder's table; with the table of 31
    # kinds the first is input 355 (under a second).
    found = first_finding(2500)
    with pytest.raises(support.SpecViolation) as raised:
        fuzz_ppc.TestOneInput(found)
    finding = raised.value
    assert {"S000-NO-HPTE-OUTSIDE-SLOTS", "P2"} & set(finding.rules), finding.violations
    report = finding.trace.read_text()
    assert finding.trace.parent == regressions and finding.trace.name.startswith("ppc-")
    assert "actions, each followed by what the harness saw:" in report
    assert "hcalls_while_slot1_invalid(" in report
    assert finding.trace.with_suffix(".bin").read_bytes() == found
    assert fuzz_ppc.run_input(found).violations == finding.violations


def test_hypercalls_that_skip_the_tlbie_are_found_by_fuzzing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: H_REMOVE, H_BULK_REMOVE and H_PROTECT invalidate entries without the
    tlbie, so a vCPU's TLB keeps translating through them (P6)."""
    monkeypatch.setattr(hcalls, "do_tlbies", lambda hpt, tlbs, indexes: None)
    violations = fuzz_ppc.run_input(first_finding()).violations
    assert any(line.startswith("P6: a TLB still caches invalidated HPTE") for line in violations)


def test_the_machines_failing_run_replays_as_a_fuzz_ppc_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state machine finds the planted tlbie bug too, and its failing run, kept as an
    input of fuzz/fuzz_ppc.py, replays to a broken rule, call for call (each applied, or
    rejected as one the harness has nothing to do for)."""
    monkeypatch.setattr(hcalls, "do_tlbies", lambda hpt, tlbs, indexes: None)
    machine = ppc_machine(PPC64_HV)
    # Runs as long as the campaign's (80 steps): the bug needs an entry entered, used and
    # removed in one run; a run stops at the finding.
    machine.TestCase.settings = settings(bug_hunt(3000), stateful_step_count=80)
    with pytest.raises(AssertionError, match=r"P3|P6"):
        machine.TestCase().runTest()
    replayed = fuzz_ppc.run_input(bytes.fromhex(machines.LAST_RUN["reproducer"]))
    assert replayed.violations
    calls = machines.LAST_RUN["trace"].splitlines()
    assert replayed.actions + replayed.rejected.total() == len(calls)


# -- libFuzzer ------------------------------------------------------------------------------------


def test_fuzz_ppc_script_is_executable() -> None:
    path = REPO / "fuzz" / "fuzz_ppc.py"
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK)


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_runs_fuzz_ppc_on_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = tmp_path / "counters.json"
    monkeypatch.setenv(support.STATS_ENV, str(counters))
    corpus = tmp_path / "corpus"  # the first folder receives new units: keep seeds unchanged
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "fuzz/fuzz_ppc.py",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            "-runs=300",
            "-max_len=256",
            str(corpus),
            "corpus/seeds/ppc",
        ],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 300 runs" in result.stderr
    counted = json.loads(counters.read_text())
    assert counted["executions"] >= 1 and counted["actions"] >= 1


# -- hypercalls with bad arguments, and H_BULK_REMOVE's conditions --------------------------------


def _harness_with_two_entries() -> PpcHarness:
    """A bolted entry for EAS[0] (stored through), a plain one for EAS[1]."""
    vm = PpcHarness()
    vm.h_enter(0, 0, True, True, False, -1)
    vm.h_enter(1, 1, True, False, False, -1)
    vm.guest_access(0, 0, True)
    vm.check()
    return vm


def test_invalid_hypercalls_return_h_parameter_and_leave_the_hpt_alone() -> None:
    vm = _harness_with_two_entries()
    for call in INVALID_HCALLS:
        vm.h_invalid(call)
        vm.check()


def test_bulk_remove_conditions_remove_what_h_remove_would() -> None:
    vm = _harness_with_two_entries()
    vm.h_bulk_remove_cond(0, H_ANDCOND)  # bolted: stays
    vm.h_bulk_remove_cond(1, H_AVPN)  # the right AVPN: goes
    vm.h_bulk_remove_cond(1, 0)  # a free slot now: not found
    vm.check()
    assert vm.index_of(EAS[0]) is not None and vm.index_of(EAS[1]) is None


def test_planted_h_read_without_its_bound_check_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ppc_hcalls, "kvmppc_h_read", lambda kvm, flags, index: (H_SUCCESS, []))
    vm = _harness_with_two_entries()
    vm.h_invalid("read_index")
    with pytest.raises(RulesBroken, match="read_index: 0, not H_PARAMETER"):
        vm.check()


def test_planted_bulk_remove_that_ignores_its_condition_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every request treated as absolute: the bolted entry goes despite ANDCOND."""

    def absolute(kvm, args):  # type: ignore[no-untyped-def]
        return hcalls.kvmppc_h_bulk_remove(kvm, [args[0] & ~(3 << 56), *args[1:]])

    monkeypatch.setattr(ppc_hcalls, "kvmppc_h_bulk_remove", absolute)
    vm = _harness_with_two_entries()
    vm.h_bulk_remove_cond(0, H_ANDCOND)
    with pytest.raises(RulesBroken, match="H_BULK_REMOVE"):
        vm.check()


def test_h_clear_ref_that_loses_r_outside_slot_0_is_caught_by_the_aging_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted: H_CLEAR_REF (and H_CLEAR_MOD, which make the same lookup) finds the page's
    rmap word by its gfn counted from 0, not from the slot's base. Slot 0 starts at gfn 0,
    so only slot 1 shows it: the aging seed clears the R of a slot-1 page the guest used,
    and the host's aging of that page finds it idle (C-AGING)."""
    real = hpt.revmap_for_hpte

    def from_gfn_0(kvm: Kvm, v: int, r: int) -> tuple[KvmMemorySlot | None, int]:
        slot, gfn = real(kvm, v, r)
        return slot, gfn if slot is None else gfn + slot.base_gfn

    monkeypatch.setattr(hcalls, "revmap_for_hpte", from_gfn_0)
    violations = fuzz_ppc.run_input((ppc_decoder.SEEDS / "aging.bin").read_bytes()).violations
    assert any(line.startswith("C-AGING: host page") for line in violations), violations
