"""The target interface every implementation under test provides."""

from __future__ import annotations

from typing import Protocol

from kvmspec.fuzz.ops import Observation, Operation


class TargetUnavailable(Exception):
    """The target cannot run here (for example, /dev/kvm cannot be opened). ``str()`` is the
    reason, in one line."""


class Target(Protocol):
    """Applies operations to one VM and reports what it observed.

    A target starts with one fresh VM. ``apply`` never raises for anything a trace can ask:
    kernel errors are observations (``{"errno": "EINVAL"}``). ``close`` releases every
    resource the target holds (VMs, file descriptors, mappings).
    """

    name: str

    def apply(self, op: Operation) -> Observation: ...

    def close(self) -> None: ...
