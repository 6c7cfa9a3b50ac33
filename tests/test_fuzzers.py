"""The Atheris fuzz targets: seeds and random inputs run clean, libFuzzer runs the scripts, and
a broken model is caught with the rule it breaks; the generic-layer and x86 decoders reject
(and count) every action the state does not allow, never raising. Known findings of the fuzzers
are kept as strict xfails until they are fixed."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmspec.fuzz import atheris_support as support
from kvmspec.fuzz import (
    campaign,
    fuzz_generic,
    fuzz_memslots,
    fuzz_trace,
    fuzz_x86,
    generic_decoder,
    x86_decoder,
)
from kvmspec.fuzz.generic_decoder import SEED_SCENARIOS, SetUp, encode
from kvmspec.fuzz.generic_harness import GenericHarness
from kvmspec.fuzz.ops import (
    GetDirtyLog,
    Mmap,
    Observation,
    Operation,
    RegionAddr,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import Target
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.fuzz.trace import TraceError, load, parse_lines
from kvmspec.fuzz.x86_harness import ShadowHarness
from kvmspec.fuzz.x86_huge_harness import PD_B, PD_C, HugeHarness
from kvmspec.reference import kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.memslot_rules import MrChange

REPO = Path(__file__).resolve().parents[1]
MEMSLOT_SEEDS = support.seed_files("memslots")
TRACE_SEEDS = support.seed_files("trace")
GENERIC_SEEDS = support.seed_files("generic")
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


random_inputs = support.random_inputs


# ---------------------------------------------------------------------------------------------
# The seeds
# ---------------------------------------------------------------------------------------------


def test_every_scenario_has_a_seed_and_every_seed_a_scenario() -> None:
    assert {path.stem for path in MEMSLOT_SEEDS} == set(support.MEMSLOT_SCENARIOS)
    assert len(TRACE_SEEDS) >= 10


@pytest.mark.parametrize("seed", MEMSLOT_SEEDS, ids=lambda path: path.stem)
def test_memslot_seed_still_decodes_to_its_scenario(seed: Path) -> None:
    wants = support.MEMSLOT_SCENARIOS[seed.stem]
    assert support.scenario_holds(wants, seed.read_bytes(), DEFAULT_PROFILE), (
        f"{seed.name} no longer decodes to its scenario (did the decoder change?); rebuild "
        "the seeds with: .venv/bin/python -m kvmspec.fuzz.atheris_support seeds"
    )


# ---------------------------------------------------------------------------------------------
# (1) TestOneInput, called directly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", MEMSLOT_SEEDS, ids=lambda path: path.stem)
def test_fuzz_memslots_runs_each_seed_clean(seed: Path) -> None:
    fuzz_memslots.TestOneInput(seed.read_bytes())


def test_fuzz_memslots_runs_random_inputs_clean() -> None:
    for data in random_inputs(2000, 512):
        fuzz_memslots.TestOneInput(data)


@pytest.mark.parametrize("seed", TRACE_SEEDS, ids=lambda path: path.name)
def test_fuzz_trace_runs_each_seed_clean(seed: Path) -> None:
    fuzz_trace.TestOneInput(seed.read_bytes())


def test_fuzz_trace_runs_random_inputs_clean() -> None:
    for data in random_inputs(2000, 512):
        fuzz_trace.TestOneInput(data)
    # Random lines after a valid header reach the operation parser, not only the header.
    header = b'{"format": "kvmspec-trace/1", "platform": "x86_64"}\n'
    for data in random_inputs(2000, 200, seed=7):
        fuzz_trace.TestOneInput(header + data)


def test_the_hypothesis_bridge_runs_bytes() -> None:
    run = support.hypothesis_fuzz_one_input(DEFAULT_PROFILE)
    for data in [seed.read_bytes() for seed in MEMSLOT_SEEDS] + random_inputs(50, 1024):
        run(data)


# ---------------------------------------------------------------------------------------------
# (2) The scripts under libFuzzer
# ---------------------------------------------------------------------------------------------


def run_fuzzer(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a fuzz script with this Python; new corpus units and crashes go to ``tmp_path``."""
    return subprocess.run(
        [sys.executable, f"fuzz/{script}", "-seed=1", f"-artifact_prefix={tmp_path}/", *args],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("script", ["fuzz_memslots.py", "fuzz_trace.py", "fuzz_generic.py"])
def test_fuzz_scripts_are_executable(script: str) -> None:
    path = REPO / "fuzz" / script
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK)


def test_instrumentation_covers_the_model_and_the_rules_never_the_checkers() -> None:
    """libFuzzer is guided by what the model and the rules it executes decide. Every checker
    (found on disk, so one added later is included) and the harness stay uninstrumented."""
    excluded = set(support._harness_modules())
    spec_modules = {
        "kvmspec.spec." + ".".join(path.relative_to(REPO / "spec").with_suffix("").parts)
        for path in (REPO / "spec").rglob("*.py")
    }
    rules = {name for name in spec_modules if name.startswith(support.RULE_MODULES)}
    assert {"kvmspec.spec.uapi.memslot_rules", "kvmspec.spec.platforms"} <= rules
    assert not rules & excluded
    checkers = {name.removesuffix(".__init__") for name in spec_modules - rules} - {
        "kvmspec.spec"  # the package itself: a docstring, no code
    }
    assert {"kvmspec.spec.invariants.x86", "kvmspec.spec.dbc"} <= checkers
    assert checkers <= excluded
    assert "kvmspec.fuzz.session" in excluded
    assert not any(name.startswith("kvmspec.reference") for name in excluded)


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_runs_fuzz_memslots_on_the_seeds(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # the first folder receives new units: keep seeds unchanged
    corpus.mkdir()
    result = run_fuzzer(
        "fuzz_memslots.py", "-runs=500", str(corpus), "corpus/seeds/memslots", tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 500 runs" in result.stderr


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_runs_fuzz_trace(tmp_path: Path) -> None:
    result = run_fuzzer("fuzz_trace.py", "-runs=2000", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 2000 runs" in result.stderr


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_runs_fuzz_generic_on_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = tmp_path / "counters.json"
    monkeypatch.setenv(support.STATS_ENV, str(counters))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = run_fuzzer(
        "fuzz_generic.py", "-runs=300", str(corpus), "corpus/seeds/generic", tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 300 runs" in result.stderr
    counted = json.loads(counters.read_text())
    assert counted["executions"] >= 1 and counted["actions"] >= 1


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_the_campaign_runs_the_generic_fuzzer(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    assert campaign.run_campaign(["atheris/generic"], 0.02, "reference", str(report)) == 0
    (area,) = json.loads(report.read_text())["areas"]
    assert area["area"] == "atheris/generic" and not area["failures"]
    assert area["examples"] > 0 and area["steps"] > 0


# ---------------------------------------------------------------------------------------------
# (3) A broken model is caught
# ---------------------------------------------------------------------------------------------


class MiscountingArch(KvmArch):
    """An architecture whose commit hook counts a moved slot's pages a second time."""

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        if change is MrChange.MOVE and new is not None:
            kvm.nr_memslot_pages += new.npages


class MiscountingTarget(ReferenceTarget):
    """The reference target on a VM with :class:`MiscountingArch`."""

    def __init__(self, profile: PlatformProfile) -> None:
        super().__init__(profile)
        self.kvm = Kvm(profile, MiscountingArch())


def first_finding(inputs: list[bytes]) -> support.SpecViolation:
    """The finding TestOneInput raises for the first input that has one."""
    for data in inputs:
        try:
            fuzz_memslots.TestOneInput(data)
        except support.SpecViolation as finding:
            return finding
    raise AssertionError("no input found the broken model")


def seeds_then_random() -> list[bytes]:
    return [seed.read_bytes() for seed in MEMSLOT_SEEDS] + random_inputs(2000, 512)


def check_finding(finding: support.SpecViolation, rule: str, regressions: Path) -> None:
    assert rule in finding.rules, finding.violations
    assert rule in str(finding)
    assert finding.trace.parent == regressions
    assert finding.trace.name.startswith("memslots-")
    load(finding.trace)  # the regression trace is a valid, replayable trace


def test_a_broken_arch_commit_is_caught_as_m7(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    monkeypatch.setattr(fuzz_memslots, "new_target", MiscountingTarget)
    check_finding(first_finding(seeds_then_random()), "M7", regressions)


def test_a_commit_that_forgets_deleted_pages_is_caught_as_m7(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    original = kvm_main.kvm_commit_memory_region

    def forgetful(
        kvm: Kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None, change: MrChange
    ) -> None:
        pages = kvm.nr_memslot_pages
        original(kvm, old, new, change)
        if change is MrChange.DELETE:
            kvm.nr_memslot_pages = pages

    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", forgetful)
    check_finding(first_finding(seeds_then_random()), "M7", regressions)


def _target_raising(error: Exception) -> Callable[[PlatformProfile], Target]:
    """A reference target that raises ``error`` when asked for a dirty log."""

    class Raising(ReferenceTarget):
        def apply(self, op: Operation) -> Observation:
            if isinstance(op, GetDirtyLog):
                raise error
            return super().apply(op)

    return Raising


def test_an_assertion_inside_the_model_is_a_finding_with_the_failing_operation(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    monkeypatch.setattr(fuzz_memslots, "new_target", _target_raising(AssertionError("boom")))
    finding = first_finding([(REPO / "corpus/seeds/memslots/dirty-log.bin").read_bytes()])
    assert finding.rules == ("MODEL-ASSERT",)
    assert load(finding.trace).steps[-1].op.NAME == "get_dirty_log"


def test_any_other_exception_is_a_harness_bug_and_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fuzz_memslots, "new_target", _target_raising(KeyError("bug")))
    with pytest.raises(KeyError):
        fuzz_memslots.TestOneInput((REPO / "corpus/seeds/memslots/dirty-log.bin").read_bytes())


# ---------------------------------------------------------------------------------------------
# (4) The generic layer: the decoder, its seeds, and a broken fault path found by fuzzing
# ---------------------------------------------------------------------------------------------


def test_every_kind_of_generic_action_is_a_harness_method_with_its_arguments() -> None:
    for kind in generic_decoder.KINDS:
        parameters = list(inspect.signature(getattr(GenericHarness, kind.method)).parameters)
        assert parameters == ["self", *(name for name, _ in kind.params)], kind.method


def test_every_generic_seed_is_its_scenario_encoded() -> None:
    assert {path.stem for path in GENERIC_SEEDS} == set(SEED_SCENARIOS)
    for path in GENERIC_SEEDS:
        assert path.read_bytes() == encode(*SEED_SCENARIOS[path.stem]), (
            f"{path.name} is stale; rebuild the seeds with: "
            ".venv/bin/python -m kvmspec.fuzz.generic_decoder seeds"
        )


@pytest.mark.parametrize("profile", [DEFAULT_PROFILE, ARM64], ids=lambda p: p.name)
@pytest.mark.parametrize("seed", GENERIC_SEEDS, ids=lambda path: path.stem)
def test_generic_seed_runs_every_action_clean(seed: Path, profile: PlatformProfile) -> None:
    """A seed is a scenario of allowed actions only: none is rejected, no rule is broken."""
    run = fuzz_generic.run_input(seed.read_bytes(), profile)
    assert run.violations == []
    assert run.rejected.total() == 0
    assert run.actions == len(SEED_SCENARIOS[seed.stem][1])


@pytest.mark.parametrize("profile", [DEFAULT_PROFILE, ARM64], ids=lambda p: p.name)
@settings(max_examples=150)
@given(data=st.binary(min_size=16, max_size=400))
def test_the_generic_decoder_never_raises(profile: PlatformProfile, data: bytes) -> None:
    """Any bytes: every decoded action is allowed or rejected, so the scheduler never refuses
    a step (it would raise ValueError), and the correct model breaks no rule."""
    run = fuzz_generic.run_input(data, profile)
    assert run.violations == []
    assert run.actions + run.rejected.total() <= fuzz_generic.MAX_ACTIONS


def test_fuzz_generic_runs_random_inputs_clean() -> None:
    for data in random_inputs(300, 256):
        fuzz_generic.TestOneInput(data)


def test_rejected_actions_are_counted_and_never_reach_the_scheduler() -> None:
    read = False
    data = encode(
        SetUp("bitmap", False),
        [
            ("step_actor", (0,)),  # nothing in flight
            ("drop_a_page_under_a_fault", (0,)),  # no fault has resolved a page
            ("harvest_ring", (0,)),  # no dirty ring in bitmap mode
            ("start_fault", (0, 0, read, 0)),  # holds kvm->srcu from its first step
            ("start_memslot_update", (0, 0, 1)),  # DELETE slot 0: waits for the fault's SRCU
            ("finish_actor", (1,)),
            ("step_actor", (1,)),  # the DELETE waits
            ("step_actor", (2,)),  # only two actors are in flight
            ("finish_actor", (0,)),  # the fault ends, so the DELETE may go on
            ("finish_actor", (0,)),
        ],
    )
    lines: list[str] = []
    run = fuzz_generic.run_input(data, DEFAULT_PROFILE, lines.append)
    assert run.violations == []
    assert run.rejected == {
        "not in flight": 2,
        "nothing resolved": 1,
        "not allowed": 1,
        "waiting": 1,
    }
    assert run.actions == 5
    assert (
        "step_actor rejected (waiting): memslot#2 waits: kvm->srcu: grace period waits for readers"
        in lines
    )
    assert run.schedule[-1] == "memslot#2: done -> 0"


def test_a_fault_without_the_retry_check_is_found_by_fuzzing_the_generic_decoder(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    """Random inputs alone (no seed) reach the race the retry check exists for; the finding
    names the rule, prints the schedule and keeps the input and its report."""
    import kvmspec.reference.page_fault as page_fault

    monkeypatch.setattr(page_fault, "mmu_invalidate_retry_gfn", lambda kvm, seq, gfn: False)
    found = next(
        (
            data
            for data in random_inputs(2000, 256)
            if fuzz_generic.run_input(data, DEFAULT_PROFILE).violations
        ),
        None,
    )
    assert found is not None, "2000 random inputs did not find the missing retry check"
    with pytest.raises(support.SpecViolation) as raised:
        fuzz_generic.TestOneInput(found)
    finding = raised.value
    assert set(finding.rules) & {"N4", "N5", "COHERENCE"}, finding.violations
    report = finding.trace.read_text()
    assert finding.trace.parent == regressions and finding.trace.name.startswith("generic-")
    assert "schedule (which actor ran which step):" in report and "fault#" in report
    reproducer = finding.trace.with_suffix(".bin")
    assert reproducer.read_bytes() == found
    assert fuzz_generic.run_input(found, DEFAULT_PROFILE).violations == finding.violations


def test_the_generic_seed_command_wants_its_one_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert generic_decoder.main(["seed"]) == 2
    assert capsys.readouterr().err == "usage: python -m kvmspec.fuzz.generic_decoder seeds\n"


# ---------------------------------------------------------------------------------------------
# Findings of the fuzzers: fixed ones as regressions, open ones as strict xfails (an xfail that
# starts passing must become a plain test)
# ---------------------------------------------------------------------------------------------


def test_finding_delete_with_guest_memfd_flag_ignores_the_descriptor() -> None:
    """fuzz_memslots found the contract expecting EBADF for a KVM_SET_USER_MEMORY_REGION2
    DELETE with KVM_MEM_GUEST_MEMFD and a closed fd; the kernel deletes without looking at the
    fd (checked on this machine's KVM), as the reference does."""
    session = Session(DEFAULT_PROFILE, "reference")
    session.apply(Mmap("r0", 4 << 20))
    session.apply(SetUserMemoryRegion(3, 0, 0x200000, 0x40000, RegionAddr("r0", 0)))
    observed, violations = session.apply(SetUserMemoryRegion2(3, 4, 0, 0, 0, 9999, 0))
    assert observed == {"errno": 0}
    assert violations == []


HEADER = '{"format": "kvmspec-trace/1", "platform": "x86_64"}\n'


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"format": "kvmspec-trace/1", "platform": []}', id="unhashable-platform"),
        pytest.param(HEADER + '{"op": "check_extension", "cap": []}', id="unhashable-cap"),
        pytest.param(HEADER + '{"op": "create_vcpu", "id": ' + "9" * 5000 + "}", id="huge-int"),
    ],
)
def test_finding_the_trace_parser_crashed_on_unhashable_or_huge_values(text: str) -> None:
    """fuzz_trace found parse_lines looking up an unhashable JSON value in a dict (platform,
    cap) and json.loads raising ValueError past 4300 integer digits: now clean TraceErrors."""
    with pytest.raises(TraceError):
        parse_lines(text.splitlines())
    fuzz_trace.TestOneInput(text.encode())


# ---------------------------------------------------------------------------------------------
# (5) The x86 shadow MMU: the decoder, its seeds, a broken notifier found by fuzzing, libFuzzer
# ---------------------------------------------------------------------------------------------

X86_SEEDS = support.seed_files("x86")


@pytest.mark.parametrize("layout", sorted(x86_decoder.KINDS))
def test_every_kind_of_x86_action_is_a_harness_method_with_its_arguments(layout: str) -> None:
    harness = {"shadow": ShadowHarness, "huge": HugeHarness}[layout]
    for kind in x86_decoder.KINDS[layout]:
        parameters = list(inspect.signature(getattr(harness, kind.method)).parameters)
        assert parameters == ["self", *(name for name, _ in kind.params)], kind.method


def test_every_x86_seed_is_its_scenario_encoded() -> None:
    assert {path.stem for path in X86_SEEDS} == set(x86_decoder.SEED_SCENARIOS)
    for path in X86_SEEDS:
        assert path.read_bytes() == x86_decoder.encode(*x86_decoder.SEED_SCENARIOS[path.stem]), (
            f"{path.name} is stale; rebuild the seeds with: "
            ".venv/bin/python -m kvmspec.fuzz.x86_decoder seeds"
        )


@pytest.mark.parametrize("seed", X86_SEEDS, ids=lambda path: path.stem)
def test_x86_seed_runs_every_action_clean(seed: Path) -> None:
    """A seed is a scenario of allowed actions only: none is rejected, no rule is broken."""
    run = fuzz_x86.run_input(seed.read_bytes())
    assert run.violations == []
    assert run.rejected.total() == 0
    assert run.actions == len(x86_decoder.SEED_SCENARIOS[seed.stem][1])


@settings(max_examples=60)
@given(data=st.binary(min_size=1, max_size=300))
def test_the_x86_decoder_never_raises(data: bytes) -> None:
    """Any bytes: every decoded action is applied or rejected, and the correct model breaks
    no rule."""
    run = fuzz_x86.run_input(data)
    assert run.violations == []
    assert run.actions + run.rejected.total() <= fuzz_x86.MAX_ACTIONS


def test_a_table_page_is_rejected_not_accessed() -> None:
    """In the huge layout, B's and C's page directories are not data: an access to one is
    rejected and counted, and the run goes on."""
    data = x86_decoder.encode(
        "huge", [("guest_write", (0, PD_B, 1)), ("guest_read", (1, PD_C, 0)), ("harvest", ())]
    )
    lines: list[str] = []
    run = fuzz_x86.run_input(data, lines.append)
    assert run.violations == [] and run.actions == 1
    assert run.rejected == {"a table page": 2}
    assert "guest_write rejected (a table page): page 4 is a guest page table" in lines


def test_a_notifier_that_unmaps_nothing_is_found_by_fuzzing_the_x86_decoder(
    monkeypatch: pytest.MonkeyPatch, regressions: Path
) -> None:
    """Planted bug: the shadow MMU's kvm_unmap_gfn_range leaves every SPTE in place. Random
    inputs find SPTEs left over pages the host has taken away; the finding names the rule,
    prints the actions and keeps the input and its report."""
    monkeypatch.setattr(ShadowMmu, "kvm_unmap_gfn_range", lambda self, kvm, gfn_range: False)
    found = next(
        (data for data in random_inputs(200, 256) if fuzz_x86.run_input(data).violations), None
    )
    assert found is not None, "200 random inputs did not find the notifier that unmaps nothing"
    with pytest.raises(support.SpecViolation) as raised:
        fuzz_x86.TestOneInput(found)
    finding = raised.value
    # N4 for a 4K leaf, X9 for a huge one (the host moved or split the page under it), or
    # seed 004's reload of the APIC-access address, which the same notifier requests.
    rules = {"N4", "X9", "COHERENCE", "S004-APIC-ACCESS-RELOAD"}
    assert set(finding.rules) & rules, finding.violations
    report = finding.trace.read_text()
    assert finding.trace.parent == regressions and finding.trace.name.startswith("x86-")
    assert "actions, each followed by what the harness saw:" in report
    assert finding.trace.with_suffix(".bin").read_bytes() == found
    assert fuzz_x86.run_input(found).violations == finding.violations


def test_the_x86_seed_command_wants_its_one_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert x86_decoder.main([]) == 2
    assert capsys.readouterr().err == "usage: python -m kvmspec.fuzz.x86_decoder seeds\n"


def test_fuzz_x86_script_is_executable() -> None:
    path = REPO / "fuzz" / "fuzz_x86.py"
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK)


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris cannot be imported")
def test_libfuzzer_runs_fuzz_x86_on_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = tmp_path / "counters.json"
    monkeypatch.setenv(support.STATS_ENV, str(counters))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = run_fuzzer(
        "fuzz_x86.py",
        "-runs=300",
        "-max_len=256",
        str(corpus),
        "corpus/seeds/x86",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 300 runs" in result.stderr
    counted = json.loads(counters.read_text())
    assert counted["executions"] >= 1 and counted["actions"] >= 1
