"""Targets: anything that applies an operation and returns an observation.

``reference`` is the model; ``linux-kvm`` is the real kernel through /dev/kvm;
``subprocess:<command line>`` is an implementation in any language, run as a child process
that speaks the subprocess protocol (:mod:`kvmspec.fuzz.targets.subprocess_target`). All are
created with :func:`make_target`.
"""

from __future__ import annotations

from kvmspec.fuzz.targets.base import Target, TargetUnavailable
from kvmspec.spec.platforms import PlatformProfile

SUBPROCESS_PREFIX = "subprocess:"


class _TargetNames(tuple[str, ...]):
    """The names :func:`make_target` accepts. ``in`` is true for the fixed names and for
    ``subprocess:`` followed by a command line; the listing shows that form as
    ``subprocess:COMMAND``."""

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith(SUBPROCESS_PREFIX):
            return bool(name[len(SUBPROCESS_PREFIX) :].strip())
        return super().__contains__(name)


TARGET_NAMES = _TargetNames(("reference", "linux-kvm", SUBPROCESS_PREFIX + "COMMAND"))


def make_target(name: str, profile: PlatformProfile) -> Target:
    """Create a fresh target (with one new VM). Raises TargetUnavailable with a reason, or
    ValueError for an unknown name."""
    if name == "reference":
        from kvmspec.fuzz.targets.reference import ReferenceTarget

        return ReferenceTarget(profile)
    if name == "linux-kvm":
        from kvmspec.fuzz.targets.linux_kvm import LinuxKvmTarget

        return LinuxKvmTarget(profile)
    if name.startswith(SUBPROCESS_PREFIX) and name in TARGET_NAMES:
        from kvmspec.fuzz.targets.subprocess_target import SubprocessTarget

        return SubprocessTarget(name[len(SUBPROCESS_PREFIX) :], profile)
    raise ValueError(f"unknown target {name!r} (known: {', '.join(TARGET_NAMES)})")


__all__ = ["SUBPROCESS_PREFIX", "TARGET_NAMES", "Target", "TargetUnavailable", "make_target"]
