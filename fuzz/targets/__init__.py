"""Targets: anything that applies an operation and returns an observation.

``reference`` is the model; ``linux-kvm`` is the real kernel through /dev/kvm. Both are
created with :func:`make_target`.
"""

from __future__ import annotations

from kvmspec.fuzz.targets.base import Target, TargetUnavailable
from kvmspec.spec.platforms import PlatformProfile

TARGET_NAMES = ("reference", "linux-kvm")


def make_target(name: str, profile: PlatformProfile) -> Target:
    """Create a fresh target (with one new VM). Raises TargetUnavailable with a reason, or
    ValueError for an unknown name."""
    if name == "reference":
        from kvmspec.fuzz.targets.reference import ReferenceTarget

        return ReferenceTarget(profile)
    if name == "linux-kvm":
        from kvmspec.fuzz.targets.linux_kvm import LinuxKvmTarget

        return LinuxKvmTarget(profile)
    raise ValueError(f"unknown target {name!r} (known: {', '.join(TARGET_NAMES)})")


__all__ = ["TARGET_NAMES", "Target", "TargetUnavailable", "make_target"]
