"""Test-suite set-up: the fast Hypothesis profile and the /dev/kvm skip helper."""

from __future__ import annotations

from hypothesis import settings

from kvmspec.fuzz.profiles import FAST, register_profiles

register_profiles()
settings.load_profile(FAST)
