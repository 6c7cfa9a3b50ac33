"""`kvmspec campaign`: a short run succeeds and reports; a broken rule becomes a failure with
a replayable trace under corpus/regressions/."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import Phase, settings
from rich.console import Console

from kvmspec.fuzz import campaign
from kvmspec.fuzz.cli import main
from kvmspec.fuzz.profiles import FAST, register_profiles
from kvmspec.fuzz.regressions import check_regression, write_regression_test
from kvmspec.fuzz.trace import load
from kvmspec.reference import kvm_main
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.spec.uapi.memslot_rules import MrChange

register_profiles()
NO_SHRINK = "kvmspec-test-no-shrink"
settings.register_profile(
    NO_SHRINK,
    settings.get_profile(FAST),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def test_a_short_campaign_reports_every_area(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    status = campaign.run_campaign(["memslots/arm64"], 0.05, "reference", str(report))
    assert status == 0
    data = json.loads(report.read_text())
    areas = {area["area"]: area for area in data["areas"]}
    assert areas["memslots/arm64"]["steps"] > 0
    assert all(not area["failures"] for area in areas.values())
    # The area's first slice ran under coverage.py: the branch arcs of reference/ and spec/.
    assert areas["memslots/arm64"]["coverage_unit"] == "arcs"
    assert areas["memslots/arm64"]["coverage"] > 100


def test_a_traced_slice_counts_the_arcs_of_reference_and_spec_only() -> None:
    from kvmspec.reference.memslots import KvmMemslots

    def lookup() -> None:
        assert KvmMemslots(0).gfn_to_memslot(0) is None

    arcs = campaign._traced_arcs(lookup)
    files = {path for path, _, _ in arcs}
    assert files and all(path.startswith(("reference/", "spec/")) for path in files)
    assert "reference/memslots.py" in files


def test_a_broken_model_is_reported_with_a_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A variant whose commit forgets to count created pages breaks M7."""
    original = kvm_main.kvm_commit_memory_region

    def miscounting_commit(
        kvm: Kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None, change: MrChange
    ) -> None:
        original(kvm, old, new, change)
        if change is MrChange.CREATE and new is not None:
            kvm.nr_memslot_pages -= new.npages

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no Atheris
    # Short runs, not shrunk: shrinking is Hypothesis's own, and would take a minute here.
    monkeypatch.setattr(campaign, "THOROUGH", NO_SHRINK)
    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", miscounting_commit)
    assert main(["campaign", "--minutes", "0.05", "--target", "reference", "memslots/x86_64"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "M7" in out
    (trace_file,) = (tmp_path / "corpus" / "regressions").glob("memslots-x86_64-*.jsonl")
    trace = load(trace_file)
    assert trace.platform == "x86_64" and trace.steps
    # The summary names the rule's source and how to replay the finding.
    assert "source: kernel: virt/kvm/kvm_main.c" in out and "kvmspec replay --check" in out
    # The finding replays, every time, as long as the bug is there.
    assert all(check_regression(trace_file) for _ in range(100))
    assert main(["replay", "--check", str(trace_file)]) == 1
    err = capsys.readouterr().err
    assert "M7:" in err and "source: kernel: virt/kvm/kvm_main.c" in err
    # Its pytest case fails now, and passes once the model is fixed.
    (test_file,) = trace_file.parent.glob("test_memslots_x86_64_*.py")
    assert (
        pytest.main(["-q", "-p", "no:cacheprovider", str(test_file)])
        == pytest.ExitCode.TESTS_FAILED
    )
    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", original)
    assert not check_regression(trace_file)
    assert pytest.main(["-q", "-p", "no:cacheprovider", str(test_file)]) == pytest.ExitCode.OK


def test_no_matching_area_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["campaign", "--minutes", "0.01", "--target", "reference", "nothing-here"]) == 2
    assert "no area matches" in capsys.readouterr().out


@pytest.mark.kvm
def test_a_linux_kvm_area_can_be_named_alone() -> None:
    """Naming ``guest/linux-kvm`` picks that area and nothing else: a user chasing a
    divergence of the real kernel reruns just it. Its family ``guest`` includes it."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    console = Console(quiet=True)
    assert [a.name for a in campaign._areas(["guest/linux-kvm"], None, console)] == [
        "guest/linux-kvm"
    ]
    assert "guest/linux-kvm" in {a.name for a in campaign._areas(["guest"], None, console)}
    names = {a.name for a in campaign._areas(["linux-kvm"], None, console)}
    assert names == {"memslots/linux-kvm", "differential/linux-kvm", "guest/linux-kvm"}


def test_the_campaign_runs_the_x86_shadow_mmu_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The family ``x86`` names the x86 state machine's area (and, with Atheris, the x86
    fuzzer, switched off here)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    report = tmp_path / "report.json"
    assert campaign.run_campaign(["x86"], 0.02, "reference", str(report)) == 0
    (area,) = json.loads(report.read_text())["areas"]
    assert area["area"] == "x86/x86_64-linux-6.18-pvm" and not area["failures"]
    assert area["examples"] > 0 and area["steps"] > 0


def test_a_worker_that_dies_is_reported_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that takes its worker process down (here: exits while creating a slot) is a
    crash: each slice it was running is reported against its area, a new worker takes over,
    and after DEATHS_BEFORE_GIVING_UP deaths the area is left out; the other area goes on."""
    original = kvm_main.kvm_commit_memory_region

    def crashing_commit(
        kvm: Kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None, change: MrChange
    ) -> None:
        if kvm.profile.name == "arm64":
            os._exit(3)
        original(kvm, old, new, change)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no Atheris
    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", crashing_commit)
    report = tmp_path / "report.json"
    areas = ["memslots/arm64", "memslots/x86_64"]
    # Long enough for three deaths on a busy machine: the other area's first slice is traced
    # by coverage.py (slow), and the areas take turns for the workers.
    assert campaign.run_campaign(areas, 0.2, "reference", str(report), workers=2) == 1
    out = capsys.readouterr().out
    assert "WORKER DIED" in out and "memslots/arm64" in out
    data = {area["area"]: area for area in json.loads(report.read_text())["areas"]}
    assert len(data["memslots/arm64"]["worker_deaths"]) >= campaign.DEATHS_BEFORE_GIVING_UP
    assert data["memslots/arm64"]["steps"] == 0
    assert data["memslots/x86_64"]["steps"] > 0 and not data["memslots/x86_64"]["failures"]


def test_ctrl_c_stops_the_workers_and_still_reports(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) ends a campaign within seconds: exit status 130, the summary table and
    the JSON report, and no worker or fuzzer process left behind."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "kvmspec.fuzz.cli", "campaign", "--minutes", "5"]
    areas = ["memslots", "atheris/memslots"]
    process = subprocess.Popen(
        [*command, "--workers", "2", "--report", str(report), *areas],
        cwd=tmp_path,
        # As from a terminal: a job started in the background (as a test may be) inherits
        # SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, "KVMSPEC_TEST_TAG": str(tmp_path)},  # inherited by every child
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(12)  # long enough for both kinds of worker to be running
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=90)
    assert process.returncode == 130, out
    assert "interrupted" in out and "memslots/x86_64" in out
    data = json.loads(report.read_text())
    assert data["interrupted"] is True
    assert data["seconds"] < 60
    assert sum(area["steps"] for area in data["areas"]) > 0
    assert {"memslots/x86_64", "atheris/memslots"} <= {area["area"] for area in data["areas"]}
    time.sleep(1)  # the workers were sent SIGTERM; give them a moment to exit
    left = [
        proc
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and f"KVMSPEC_TEST_TAG={tmp_path}".encode() in _environ(proc)
    ]
    assert not left, left


def _environ(proc: Path) -> bytes:
    """A process's environment (empty once it has gone)."""
    try:
        return (proc / "environ").read_bytes()
    except OSError:
        return b""


def test_workers_and_minutes_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["campaign", "--workers", "0"]) == 2
    assert "--workers 0: at least 1" in capsys.readouterr().err
    assert main(["campaign", "--minutes", "-1"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_a_slice_running_long_past_the_budget_is_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slice stuck long after the budget (here: a model that sleeps in every commit) is
    ended after the grace period; the campaign reports it and ends."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no Atheris
    monkeypatch.setattr(campaign, "_grace", lambda budget: 1.0)
    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", lambda *args: time.sleep(600))
    began = time.monotonic()
    assert campaign.run_campaign(["memslots/arm64"], 0.02, "reference", None, workers=1) == 0
    assert time.monotonic() - began < 30
    assert "cut short" in capsys.readouterr().out


def test_a_failure_still_shrinking_when_its_slice_is_cut_short_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slice cut short while Hypothesis shrinks a failure does not lose it: Hypothesis
    saved the failing example in the database, and the campaign replays it (no shrinking)
    and reports it. The planted bug makes every memslot commit slow and then fail, so the
    shrink outlasts the grace period."""

    def slow_failure(*args: object) -> None:
        time.sleep(0.3)
        raise RuntimeError("planted: the commit failed")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no Atheris
    monkeypatch.setattr(campaign, "_grace", lambda budget: 1.0)
    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", slow_failure)
    report = tmp_path / "report.json"
    began = time.monotonic()
    status = campaign.run_campaign(["memslots/arm64"], 0.02, "reference", str(report), workers=1)
    assert time.monotonic() - began < 60
    out = capsys.readouterr().out
    assert "cut short" in out
    assert status != 0
    (area,) = json.loads(report.read_text())["areas"]
    assert any("planted: the commit failed" in failure for failure in area["failures"]), area


def test_a_fuzzer_is_given_its_whole_share_before_it_counts_as_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fuzzer's share may be longer than the two minutes of grace: the campaign waits for
    the share plus the grace (it once waited two minutes from the start, and killed every
    fuzzer of a ten-minute campaign at 120 s)."""
    from kvmspec.fuzz import campaign_atheris

    waited: list[float] = []

    class Process:
        returncode = 0
        stderr: tuple[str, ...] = ()  # libFuzzer said nothing

        def wait(self, timeout: float) -> int:
            waited.append(timeout)
            return 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: Process())
    area = campaign.FUZZ_AREAS[0]
    worker = campaign_atheris.AtherisWorker(area, 600, tmp_path, tmp_path / "regressions")
    worker.finish()
    assert waited and waited[0] > 600


@pytest.mark.parametrize(
    "stem",
    ["arm64-" + "f" * 40, "memslots-x86_64-linux-6.18-pvm-" + "a" * 12 + "b" * 40],
)
def test_a_kept_finding_s_test_passes_the_linters(tmp_path: Path, stem: str) -> None:
    """corpus/regressions is linted with the rest (make lint): the written case must be as
    ruff check and ruff format want it, whatever the finding's name and summary."""
    finding = tmp_path / f"{stem}.bin"
    finding.write_bytes(b"")
    summary = "C-AGING: host page 0x7effffc01000 used by a guest, aged idle " * 5
    test = write_regression_test(finding, summary)
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, str(test)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
