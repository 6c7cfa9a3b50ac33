"""The arm64 Atheris target (fuzz/fuzz_arm64.py) and its bytes decoder
(kvmspec.fuzz.arm64_decoder): every kind of action is a harness method, the seeds are their
scenarios and run clean, any bytes decode without raising, the actions the state does not
allow are rejected and counted, seed 001's planted bugs (an emptied
kvm_arch_flush_shadow_all; stage2_try_set_pte without its cmpxchg) are found by random
inputs, the state machine's failing run replays as an input, and libFuzzer runs the script
on the seeds."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmspec.fuzz import arm64_decoder, fuzz_arm64, machines
from kvmspec.fuzz import atheris_support as support
from kvmspec.fuzz.arm64_decoder import Setup
from kvmspec.fuzz.arm64_harness import (
    DEVICE_SLOT,
    DIRTY_MODES,
    SHIFTED_SLOT,
    THP_SLOT,
    Arm64Harness,
)
from kvmspec.fuzz.arm64_machine import arm64_machine
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.seed_bugs import EmptiedFlushShadowAll
from kvmspec.reference.arm64 import fault, split, stage2
from kvmspec.reference.arm64.descriptors import KvmPgtableProt
from kvmspec.reference.arm64.mmu import Arm64Mmu, Arm64MmuLocklessAging
from kvmspec.reference.arm64.pgtable import KvmPgtableVisitCtx
from kvmspec.reference.host import PROT_READ

REPO = Path(__file__).resolve().parents[1]
ARM64_SEEDS = support.seed_files("arm64")
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


random_inputs = support.random_inputs


# -- the decoder and its seeds -------------------------------------------------------------------


def test_every_kind_of_arm64_action_is_a_harness_method_with_its_arguments() -> None:
    for kind in arm64_decoder.KINDS:
        parameters = list(inspect.signature(getattr(Arm64Harness, kind.method)).parameters)
        assert parameters == ["self", *(name for name, _ in kind.params)], kind.method
    # Every action of the harness can be decoded.
    actions = {
        name
        for name, member in inspect.getmembers(Arm64Harness, inspect.isfunction)
        if not name.startswith("_") and inspect.signature(member).return_annotation == "None"
    }
    decoded = {kind.method for kind in arm64_decoder.KINDS}
    assert actions - {"check", "note_dropped_translations"} == decoded


def test_every_arm64_seed_is_its_scenario_encoded() -> None:
    assert {path.stem for path in ARM64_SEEDS} == set(arm64_decoder.SEED_SCENARIOS)
    for path in ARM64_SEEDS:
        setup, steps = arm64_decoder.SEED_SCENARIOS[path.stem]
        assert path.read_bytes() == arm64_decoder.encode(setup, steps), (
            f"{path.name} is stale; rebuild the seeds with: "
            ".venv/bin/python -m kvmspec.fuzz.arm64_decoder seeds"
        )


def test_the_seeds_cover_every_kind_of_action_and_set_up() -> None:
    scenarios = arm64_decoder.SEED_SCENARIOS.values()
    used = {method for _, steps in scenarios for method, _ in steps}
    assert used == {kind.method for kind in arm64_decoder.KINDS}
    setups = [setup for setup, _ in scenarios]
    assert {setup.mmu_class for setup in setups} == set(arm64_decoder.MMU_CLASSES)
    assert {setup.hardware_af for setup in setups} == {False, True}
    assert {setup.split_chunk_size for setup in setups} == set(arm64_decoder.SPLIT_CHUNKS)
    assert {setup.dirty_mode for setup in setups} == set(DIRTY_MODES)


@pytest.mark.parametrize("seed", ARM64_SEEDS, ids=lambda path: path.stem)
def test_arm64_seed_runs_every_action_clean(seed: Path) -> None:
    """A seed is a scenario of allowed actions only: none is rejected, no rule is broken."""
    setup, steps = arm64_decoder.SEED_SCENARIOS[seed.stem]
    run = fuzz_arm64.run_input(seed.read_bytes())
    assert run.setup == setup
    assert run.violations == []
    assert run.rejected.total() == 0
    assert run.actions == len(steps)


@settings(max_examples=60)
@given(data=st.binary(max_size=300))
def test_the_arm64_decoder_never_raises(data: bytes) -> None:
    """Any bytes: every decoded action is applied or rejected, and the correct model breaks
    no rule."""
    run = fuzz_arm64.run_input(data)
    assert run.violations == []
    assert run.actions + run.rejected.total() <= fuzz_arm64.MAX_ACTIONS


def test_actions_the_state_does_not_allow_are_rejected_and_counted() -> None:
    """MADV_DONTNEED of device memory, deleting slot 1 twice, a harvest of a slot that does
    not log, a clear without manual protection, an interleaving on a read-only page: each
    is rejected with its rule, and the run goes on."""
    data = arm64_decoder.encode(
        Setup(Arm64Mmu),
        [
            ("madvise_dontneed", (DEVICE_SLOT, 0, 1)),
            ("place_shifted_slot", (None, False)),
            ("place_shifted_slot", (None, True)),
            ("toggle_log", (SHIFTED_SLOT,)),
            ("get_dirty_log", (THP_SLOT,)),
            ("clear_dirty_log", (THP_SLOT, 0, 1)),
            ("mprotect", (THP_SLOT, 1, PROT_READ)),
            ("interleave", ((0, 1), 1, 2, True)),
            ("race_fault_with_dontneed", (0, THP_SLOT, 1, 5)),
            ("guest_store", (0, THP_SLOT, 2, 5)),
        ],
    )
    lines: list[str] = []
    run = fuzz_arm64.run_input(data, lines.append)
    assert run.violations == [] and run.actions == 3
    assert run.rejected == {
        "device memory": 1,
        "no slot": 2,
        "not logged": 1,
        "not manual": 1,
        "not writable": 2,
    }
    assert "place_shifted_slot rejected (no slot): slot 1 is deleted" in lines


def test_the_seed_command_wants_its_one_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert arm64_decoder.main([]) == 2
    assert capsys.readouterr().err == "usage: python -m kvmspec.fuzz.arm64_decoder seeds\n"


# -- planted bugs, found by random inputs -------------------------------------------------------


def first_finding(count: int = 400) -> bytes:
    found = next(
        (data for data in random_inputs(count, 256) if fuzz_arm64.run_input(data).violations),
        None,
    )
    assert found is not None, f"{count} random inputs found nothing"
    return found


def test_seed_001_an_emptied_flush_shadow_all_is_found_by_fuzzing(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    """Planted bug (seed 001): the notifier's release leaves the stage 2 in place. Random
    inputs find translations that survive the VMM's exit; the finding names the rule, prints
    the actions and keeps the input and its report."""
    monkeypatch.setattr(arm64_decoder, "MMU_CLASSES", (EmptiedFlushShadowAll,))
    found = first_finding()
    with pytest.raises(support.SpecViolation) as raised:
        fuzz_arm64.TestOneInput(found)
    finding = raised.value
    assert "S001-FLUSH-ALL" in finding.rules, finding.violations
    report = finding.trace.read_text()
    assert finding.trace.parent == regressions and finding.trace.name.startswith("arm64-")
    assert "set_up(mmu=EmptiedFlushShadowAll" in report
    assert "actions, each followed by what the harness saw:" in report
    assert "release()" in report
    assert finding.trace.with_suffix(".bin").read_bytes() == found
    assert fuzz_arm64.run_input(found).violations == finding.violations


def plain_store(ctx: KvmPgtableVisitCtx, new: int) -> bool:
    """Seed 001's other patch gone wrong: stage2_try_set_pte stores without its cmpxchg,
    even in a shared walk."""
    ctx.mm_ops.store(ctx.ptep, new, ctx.write_info())
    return True


def test_seed_001_a_plain_store_instead_of_cmpxchg_is_found_by_fuzzing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: shared walkers (faults under the read side of mmu_lock, the lockless
    ager) overwrite each other's changes. Random inputs find it: a walker writes over an
    entry another one locked for break-before-make (A1), or a table's refcount goes wrong
    (A3), or an update is lost (S001-NO-LOST-UPDATE)."""
    monkeypatch.setattr(stage2, "stage2_try_set_pte", plain_store)
    violations = fuzz_arm64.run_input(first_finding()).violations
    rules = {line.split(":", 1)[0] for line in violations}
    assert rules & {"A1", "A3", "S001-NO-LOST-UPDATE"}, violations


def test_the_machines_failing_run_replays_as_a_fuzz_arm64_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state machine finds a write fault that logs nothing (D1, C-DIRTY-COMPLETE), and
    its failing run, kept as an input of fuzz/fuzz_arm64.py, replays to a broken rule."""
    monkeypatch.setattr(fault, "mark_page_dirty_in_slot", lambda *args: None)
    machine = arm64_machine(mmu_classes=(Arm64Mmu, Arm64MmuLocklessAging))
    machine.TestCase.settings = bug_hunt(500)
    with pytest.raises(AssertionError, match=r"D1|C-DIRTY-COMPLETE"):
        machine.TestCase().runTest()
    replayed = fuzz_arm64.run_input(bytes.fromhex(machines.LAST_RUN["reproducer"]))
    assert replayed.violations
    setup, *calls = machines.LAST_RUN["trace"].splitlines()
    assert setup == str(replayed.setup)
    assert replayed.actions + replayed.rejected.total() == len(calls)


def test_a_machine_on_a_planted_mmu_leaves_no_reproducer() -> None:
    """fuzz_arm64 has no byte for a test's MMU class: such a run keeps its trace only."""
    machine = arm64_machine(mmu_classes=(EmptiedFlushShadowAll,))
    machine.TestCase.settings = bug_hunt(500)
    with pytest.raises(AssertionError, match="S001-FLUSH-ALL"):
        machine.TestCase().runTest()
    assert "reproducer" not in machines.LAST_RUN
    assert machines.LAST_RUN["trace"].startswith("set_up(mmu=EmptiedFlushShadowAll")


# -- libFuzzer ------------------------------------------------------------------------------------


def test_fuzz_arm64_script_is_executable() -> None:
    path = REPO / "fuzz" / "fuzz_arm64.py"
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK)


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_runs_fuzz_arm64_on_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = tmp_path / "counters.json"
    monkeypatch.setenv(support.STATS_ENV, str(counters))
    corpus = tmp_path / "corpus"  # the first folder receives new units: keep seeds unchanged
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "fuzz/fuzz_arm64.py",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            "-runs=300",
            "-max_len=256",
            str(corpus),
            "corpus/seeds/arm64",
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


def test_the_machine_finds_an_eager_split_that_loses_write_protection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: eager splitting rebuilds a write-protected block as writable pages. The
    machine maps a block, switches logging on with a split chunk, and the guest's stores go
    unlogged: the dirty log misses them (or a writable leaf of a logged slot is seen)."""

    def writable_prot(pte: int) -> KvmPgtableProt:
        return stage2.kvm_pgtable_stage2_pte_prot(pte) | KvmPgtableProt.W

    monkeypatch.setattr(split, "kvm_pgtable_stage2_pte_prot", writable_prot)
    machine = arm64_machine(mmu_classes=(Arm64Mmu,))
    machine.TestCase.settings = bug_hunt(1000)
    with pytest.raises(AssertionError, match=r"D1|C-DIRTY"):
        machine.TestCase().runTest()
