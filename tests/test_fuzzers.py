"""The Atheris fuzz targets: seeds and random inputs run clean, libFuzzer runs both scripts, and
a broken model is caught with the rule it breaks. Known findings of the fuzzers are kept as
strict xfails until they are fixed."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmspec.fuzz import atheris_support as support
from kvmspec.fuzz import fuzz_memslots, fuzz_trace
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
from kvmspec.reference import kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.spec.platforms import DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.memslot_rules import MrChange

REPO = Path(__file__).resolve().parents[1]
MEMSLOT_SEEDS = support.seed_files("memslots")
TRACE_SEEDS = support.seed_files("trace")
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


def random_inputs(count: int, max_len: int, seed: int = 20261121) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(max_len + 1)) for _ in range(count)]


@pytest.fixture(autouse=True)
def regressions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Findings made by a test go to a temporary folder, not to corpus/regressions."""
    folder = tmp_path / "regressions"
    monkeypatch.setenv(support.REGRESSIONS_ENV, str(folder))
    return folder


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


@pytest.mark.parametrize("script", ["fuzz_memslots.py", "fuzz_trace.py"])
def test_fuzz_scripts_are_executable(script: str) -> None:
    path = REPO / "fuzz" / script
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK)


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
