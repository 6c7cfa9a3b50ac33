"""Test-suite set-up: the fast Hypothesis profile, and findings kept out of the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from kvmspec.fuzz import atheris_support
from kvmspec.fuzz.profiles import FAST, register_profiles

register_profiles()
settings.load_profile(FAST)


@pytest.fixture(autouse=True)
def regressions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Findings a test makes (planted bugs found by the fuzzers) go to a temporary folder,
    never to corpus/regressions: that folder is one of the suite's test paths."""
    folder = tmp_path / "regressions"
    monkeypatch.setenv(atheris_support.REGRESSIONS_ENV, str(folder))
    return folder
