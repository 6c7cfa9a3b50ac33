"""This machine's PVM backend: each vCPU's copy of its shadow root's top level.

Every scenario below was run on /dev/kvm here, and what the kernel put in vCPU 1's dirty
ring is written next to it. Each scenario is one question about the copy
(reference/x86/pvm_top_level.py): when it is taken, what renews it, what one fault copies.
The same table checks the reference (everywhere) and the real kernel (where /dev/kvm
exists), so a change on either side shows up as a failure naming the scenario.

The shape of every scenario: two vCPUs, a dirty ring, a logged slot of one page at 1 MiB;
vCPU 0 stores to the page first (one entry in its ring, and the top-level entry for the low
512 GiB appears in the shared root), vCPU 1 stores to it afterwards. vCPU 1's ring gets the
page again exactly when vCPU 1's copy lacked that entry.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from kvmspec.fuzz.targets import Target, TargetUnavailable, make_target
from kvmspec.fuzz.trace import parse_lines
from kvmspec.spec.platforms import X86_64_LINUX_6_18_PVM, PlatformProfile

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
FAR = 0x7000_0000_0000
"""An MMIO address under top-level entry 224, far from everything else."""

Op = dict[str, Any]


def _create(vcpu: int) -> Op:
    return {"op": "create_vcpu", "id": vcpu}


def _read(gpa: int, vcpu: int) -> Op:
    return {"op": "guest_read", "gpa": gpa, "size": 1, "vcpu": vcpu}


def _write(gpa: int, vcpu: int) -> Op:
    return {"op": "guest_write", "gpa": gpa, "size": 1, "value": 1, "vcpu": vcpu}


def _slot(slot: int, gpa: int, offset: int, flags: int = 1) -> Op:
    return {
        "op": "set_user_memory_region",
        "slot": slot,
        "flags": flags,
        "guest_phys_addr": gpa,
        "memory_size": 4096,
        "userspace_addr": {"region": "HOST", "offset": offset},
    }


SETUP: list[Op] = [
    {"op": "mmap", "region": "HOST", "size": 262144, "prot": "rw"},
    {"op": "enable_cap", "cap": "KVM_CAP_DIRTY_LOG_RING", "args": [4096], "flags": 0},
]
LOGGED = _slot(0, MIB, 204800)
COPY_TAKEN = [_create(0), _create(1), _read(FAR, 1)]
"""vCPU 1 first runs beside vCPU 0 (an MMIO read far up): its copy holds no low entry."""
BOTH_STORE = [LOGGED, _write(MIB, 0), _write(MIB, 1)]
OTHER_SLOT = _slot(1, GIB, 8192, flags=0)
UNMAP_OTHER = {"op": "madvise_dontneed", "region": "HOST", "length": 4096, "offset": 8192}
AT_1TIB = _slot(2, TIB, 16384)

# name -> (operations after SETUP, vCPU 1's ring entries as [slot, offset], measured here)
SCENARIOS: dict[str, tuple[list[Op], list[list[int]]]] = {
    "copy-taken-before-the-entry-exists": (
        [*COPY_TAKEN, *BOTH_STORE],
        [[0, 0]],
    ),
    "no-copy-before-the-first-run": ([_create(0), _create(1), *BOTH_STORE], []),
    "alone-the-vcpu-walks-the-root-itself": (
        [_create(1), _read(FAR, 1), _create(0), *BOTH_STORE],
        [],
    ),
    "copy-taken-at-the-first-run-beside-another-vcpu": (
        [_create(1), _read(FAR, 1), _create(0), _write(0, 1), *BOTH_STORE],
        [[0, 0]],
    ),
    "a-later-vcpu-does-not-renew-the-copy": (
        [*COPY_TAKEN, LOGGED, _write(MIB, 0), _create(2), _write(MIB, 1)],
        [[0, 0]],
    ),
    "a-later-store-goes-through-the-copied-entry": (
        [*COPY_TAKEN, *BOTH_STORE, _write(MIB, 1)],
        [[0, 0]],
    ),
    "a-read-through-the-missing-entry-logs-too": (
        [*COPY_TAKEN, LOGGED, _write(MIB, 0), _read(MIB, 1), _write(MIB, 1)],
        [[0, 0]],
    ),
    "an-mmio-fault-through-the-missing-entry-copies-it": (
        [*COPY_TAKEN, LOGGED, _write(MIB, 0), _read(0, 1), _write(MIB, 1)],
        [],
    ),
    "a-fault-through-another-entry-copies-nothing-here": (
        [*COPY_TAKEN, LOGGED, _write(MIB, 0), _read(FAR, 1), _write(MIB, 1)],
        [[0, 0]],
    ),
    "a-notifier-flush-renews-the-copy": (
        [
            *COPY_TAKEN,
            LOGGED,
            OTHER_SLOT,
            _write(GIB, 0),
            _write(MIB, 0),
            UNMAP_OTHER,
            _write(MIB, 1),
        ],
        [],
    ),
    "the-renewal-waits-for-the-next-entry": (
        [
            *COPY_TAKEN,
            LOGGED,
            OTHER_SLOT,
            _write(GIB, 0),
            UNMAP_OTHER,
            _write(MIB, 0),
            _write(MIB, 1),
        ],
        [],
    ),
    "shadowing-prefetched-tables-flushes": (
        [_create(0), _create(1), _read(0, 1), *BOTH_STORE],
        [],
    ),
    "tables-written-after-the-prefetch-do-not": (
        [_create(0), _create(1), _read(TIB, 1), _read(0, 1), *BOTH_STORE],
        [[0, 0]],
    ),
    "one-fault-copies-one-entry": (
        [
            *COPY_TAKEN,
            LOGGED,
            AT_1TIB,
            _write(MIB, 0),
            _write(TIB, 0),
            _write(TIB, 1),
            _write(MIB, 1),
        ],
        [[2, 0], [0, 0]],
    ),
}


def _vcpu1_ring(target: Target, operations: list[Op]) -> list[list[int]]:
    """Run SETUP + ``operations`` + the harvest of vCPU 1's ring on ``target``: the
    entries harvested (every other step must succeed)."""
    header = {"format": "kvmspec-trace/1", "platform": X86_64_LINUX_6_18_PVM.name}
    harvest = {"op": "harvest_dirty_ring", "vcpu": 1}
    lines = [json.dumps(op) for op in [header, *SETUP, *operations, harvest]]
    trace = parse_lines(lines)
    try:
        observations = [target.apply(step.op) for step in trace.steps]
    finally:
        target.close()
    assert all(o.get("errno", 0) == 0 for o in observations), observations
    entries: list[list[int]] = observations[-1]["entries"]
    return entries


def _target(name: str, profile: PlatformProfile = X86_64_LINUX_6_18_PVM) -> Target:
    try:
        return make_target(name, profile)
    except (TargetUnavailable, ImportError) as reason:
        pytest.skip(f"{name} target unavailable: {reason}")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_reference_matches_the_measurement(name: str) -> None:
    operations, expected = SCENARIOS[name]
    assert _vcpu1_ring(_target("reference"), operations) == expected


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_linux_kvm_still_behaves_so(name: str) -> None:
    operations, expected = SCENARIOS[name]
    assert _vcpu1_ring(_target("linux-kvm"), operations) == expected


def test_without_the_copy_the_second_store_is_never_logged() -> None:
    """The architectural behaviour (a profile without the PVM copy): vCPU 1 stores through
    the SPTE vCPU 0 made, in every scenario where the kernel here logs it again."""
    plain = replace(X86_64_LINUX_6_18_PVM, pvm_top_level_copy=False)
    for name, (operations, expected) in SCENARIOS.items():
        if expected == [[0, 0]]:
            assert _vcpu1_ring(_target("reference", plain), operations) == [], name
