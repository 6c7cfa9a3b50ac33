"""`kvmspec campaign`: a short run succeeds and reports; a broken rule becomes a failure with
a replayable trace under corpus/regressions/."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvmspec.fuzz import campaign
from kvmspec.fuzz.cli import main
from kvmspec.fuzz.profiles import FAST
from kvmspec.fuzz.trace import load
from kvmspec.reference import kvm_main
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.spec.uapi.memslot_rules import MrChange


def test_a_short_campaign_reports_every_area(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    status = campaign.run_campaign(["memslots/arm64"], 0.05, "reference", str(report))
    assert status == 0
    data = json.loads(report.read_text())
    areas = {area["area"]: area for area in data["areas"]}
    assert areas["memslots/arm64"]["steps"] > 0
    assert all(not area["failures"] for area in areas.values())


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
    monkeypatch.setattr(campaign, "THOROUGH", FAST)  # shorter runs shrink faster
    monkeypatch.setattr(kvm_main, "kvm_commit_memory_region", miscounting_commit)
    assert main(["campaign", "--minutes", "0.05", "--target", "reference", "memslots/x86_64"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "M7" in out
    (trace_file,) = (tmp_path / "corpus" / "regressions").glob("memslots-x86_64-*.jsonl")
    trace = load(trace_file)
    assert trace.platform == "x86_64" and trace.steps


def test_no_matching_area_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["campaign", "--minutes", "0.01", "--target", "reference", "nothing-here"]) == 2
    assert "no area matches" in capsys.readouterr().out


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
