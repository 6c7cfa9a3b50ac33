"""The guest, dirty-ring and host operations of trace v1.

Parsing: every bad field and every broken guest rule is one clear line and exit status 2,
with nothing applied. Targets: the reference and linux-kvm answer the same where the
conformance traces do not look (a vCPU that does not exist, a VM without a ring, the
harness's private slot and the session's contract). Tests that need /dev/kvm are marked
``kvm`` and skip, with the reason, where it cannot be opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kvmspec.fuzz.cli import main
from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE
from kvmspec.fuzz.ops import (
    CreateVcpu,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostRead,
    HostWrite,
    MadviseDontneed,
    Mmap,
    MmapFixed,
    Mprotect,
    Munmap,
    Observation,
    Operation,
    RegionAddr,
    SetUserMemoryRegion,
)
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import TargetUnavailable
from kvmspec.fuzz.targets.linux_kvm import LinuxKvmTarget
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.fuzz.trace import dump, parse_lines
from kvmspec.spec.platforms import DEFAULT_PROFILE

HEADER = '{"format": "kvmspec-trace/1", "platform": "x86_64-linux-6.18-pvm"}'
MMAP = '{"op": "mmap", "region": "ram", "size": 1048576}'
VCPU = '{"op": "create_vcpu", "id": 0}'
SLOT = (
    '{"op": "set_user_memory_region", "slot": 0, "flags": 0, "guest_phys_addr": 1048576, '
    '"memory_size": 65536, "userspace_addr": {"region": "ram"}}'
)
WRITE = '{"op": "guest_write", "gpa": 1048576, "size": 8, "value": 1}'


def slot(fields: str) -> str:
    """A set_user_memory_region line with ``fields`` in place of the usual ones."""
    return '{"op": "set_user_memory_region", "flags": 0, ' + fields + "}"


BAD_LINES: dict[str, tuple[list[str], str]] = {
    "guest_write without value": (
        [VCPU, '{"op": "guest_write", "gpa": 0, "size": 1}'],
        'guest_write: missing field "value"',
    ),
    "size 3": ([VCPU, '{"op": "guest_read", "gpa": 0, "size": 3}'], "expected 1, 2, 4 or 8"),
    "size true": ([VCPU, '{"op": "guest_read", "gpa": 0, "size": true}'], "expected 1, 2, 4 or 8"),
    "value too wide": (
        [VCPU, '{"op": "guest_write", "gpa": 0, "size": 2, "value": 65536}'],
        "guest_write.value: 0x10000 does not fit in 2 bytes",
    ),
    "negative gpa": ([VCPU, '{"op": "guest_read", "gpa": -1, "size": 1}'], "out of range"),
    "read with a value": (
        [VCPU, '{"op": "guest_read", "gpa": 0, "size": 1, "value": 0}'],
        'guest_read: unknown field "value"',
    ),
    "vCPU never created": (
        ['{"op": "guest_read", "gpa": 0, "size": 1, "vcpu": 1}'],
        "guest_read.vcpu: no create_vcpu with id 1 before",
    ),
    "harvest without vCPU": (
        ['{"op": "harvest_dirty_ring"}'],
        "harvest_dirty_ring.vcpu: no create_vcpu with id 0 before",
    ),
    "host_write to an unknown region": (
        ['{"op": "host_write", "region": "rom", "size": 1, "value": 0}'],
        "no region named 'rom'",
    ),
    "host_write past the region": (
        [MMAP, '{"op": "host_write", "region": "ram", "offset": 1048572, "size": 8, "value": 0}'],
        "host_write: [0xffffc, 0x100004) is not inside region 'ram'",
    ),
    "host_read of 16 bytes": (
        [MMAP, '{"op": "host_read", "region": "ram", "size": 16}'],
        "host_read.size: expected 1, 2, 4 or 8, got 16",
    ),
    "madvise without length": (
        [MMAP, '{"op": "madvise_dontneed", "region": "ram"}'],
        'madvise_dontneed: missing field "length"',
    ),
    "munmap past the region": (
        [MMAP, '{"op": "munmap", "region": "ram", "offset": 4096, "length": 1048576}'],
        "munmap: [0x1000, 0x101000) is not inside region 'ram'",
    ),
    "mprotect without prot": (
        [MMAP, '{"op": "mprotect", "region": "ram", "length": 4096}'],
        'mprotect: missing field "prot"',
    ),
    "mmap_fixed with prot rwx": (
        [MMAP, '{"op": "mmap_fixed", "region": "ram", "length": 4096, "prot": "rwx"}'],
        'mmap_fixed.prot: expected "r", "rw" or "none", got "rwx"',
    ),
    "the private slot id": (
        [
            MMAP,
            VCPU,
            slot('"slot": 32763, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0'),
            WRITE,
        ],
        "slot 32763 is the harness's private slot (in a trace with guest operations)",
    ),
    "the private range before the first guest operation": (
        [
            MMAP,
            VCPU,
            slot(
                f'"slot": 1, "guest_phys_addr": {PRIVATE_GPA}, "memory_size": 4096, '
                '"userspace_addr": {"region": "ram"}'
            ),
            WRITE,
        ],
        "the slot overlaps the harness's private guest memory",
    ),
    "an access at 2^47": (
        [VCPU, '{"op": "guest_read", "gpa": 140737488355328, "size": 1}'],
        "guest_read: [0x800000000000, 0x800000000001) is not below 0x800000000000",
    ),
    "an access across 2^47": (
        [VCPU, '{"op": "guest_read", "gpa": 140737488355325, "size": 8}'],
        "guest_read: [0x7ffffffffffd, 0x800000000005) is not below 0x800000000000",
    ),
    "an access to the private range": (
        [VCPU, f'{{"op": "guest_write", "gpa": {PRIVATE_GPA + 8}, "size": 1, "value": 0}}'],
        "is in the harness's private guest memory",
    ),
    "a slot past its region": (
        [
            MMAP,
            VCPU,
            slot(
                '"slot": 1, "guest_phys_addr": 0, "memory_size": 2097152, '
                '"userspace_addr": {"region": "ram"}'
            ),
            WRITE,
        ],
        "the slot's host memory runs past the end of region 'ram'",
    ),
    "a raw userspace_addr": (
        [
            VCPU,
            slot(
                '"slot": 1, "guest_phys_addr": 0, "memory_size": 4096, '
                '"userspace_addr": 1099511627776'
            ),
            WRITE,
        ],
        "the raw userspace_addr 0x10000000000 could reach the harness's own memory",
    ),
    "regions of more than 32 TiB": (
        [VCPU, '{"op": "mmap", "region": "big", "size": 35184372088833}', WRITE],
        "mmap: the regions total more than 0x200000000000 bytes",
    ),
    "regions of more than 32 TiB with a host operation": (
        [
            '{"op": "mmap", "region": "big", "size": 35184372088833}',
            '{"op": "munmap", "region": "big", "length": 4096}',
        ],
        "mmap: the regions total more than 0x200000000000 bytes (in a trace with host",
    ),
    "more than 1024 gigabytes": (
        [VCPU] + [f'{{"op": "guest_read", "gpa": {n << 30}, "size": 1}}' for n in range(1025)],
        "the accesses reach more than 1024 distinct 1 GiB ranges",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_bad_line_is_one_error_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines, message = BAD_LINES[name]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    assert main(["replay", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was applied
    assert captured.err.startswith(f"kvmspec: error: {path}:")
    assert message in captured.err
    assert captured.err.count("\n") == 1


def test_rules_that_only_bind_traces_with_guest_operations() -> None:
    """Without a guest operation, slot 32763, raw addresses and the private range are as
    free as ever; after the first one, an overlap of the private range is allowed (it is an
    ordinary EEXIST)."""
    free = [
        MMAP,
        slot('"slot": 32763, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0'),
        slot(f'"slot": 2, "guest_phys_addr": {PRIVATE_GPA}, "memory_size": 4096, '
             '"userspace_addr": 1099511627776'),
    ]  # fmt: skip
    assert len(parse_lines([HEADER, *free]).steps) == 3
    after = [
        MMAP,
        VCPU,
        WRITE,
        slot(f'"slot": 2, "guest_phys_addr": {PRIVATE_GPA}, "memory_size": 4096, '
             '"userspace_addr": {"region": "ram"}'),
    ]  # fmt: skip
    assert len(parse_lines([HEADER, *after]).steps) == 4


NEW_OPERATIONS: list[Operation] = [
    GuestWrite(0x1FFC, 8, 0x1122334455667788),
    GuestWrite(0, 1, 255, vcpu=3),
    GuestRead(0x1000, 2),
    HarvestDirtyRing(),
    HostWrite("ram", 4, 0xFFFFFFFF, offset=8),
    HostRead("ram", 1),
    MadviseDontneed("ram", 8192, offset=4096),
    Mprotect("ram", 4096, "none"),
    Munmap("ram", 4096, offset=4096),
    MmapFixed("ram", 4096, prot="r"),
]


def test_every_new_operation_round_trips() -> None:
    steps: list[tuple[Operation, Observation | None]] = [
        (Mmap("ram", 1 << 20), None),
        (CreateVcpu(0), None),
        (CreateVcpu(3), None),
    ]
    steps += [(op, {"errno": 0}) for op in NEW_OPERATIONS]
    trace = parse_lines(dump("x86_64-linux-6.18-pvm", steps).splitlines())
    assert [(s.op, s.expect) for s in trace.steps] == steps


# --------------------------------------------------------------------------- both targets


def open_kvm() -> LinuxKvmTarget:
    """A fresh linux-kvm target, or a skip that says why there is none."""
    try:
        return LinuxKvmTarget(DEFAULT_PROFILE)
    except TargetUnavailable as reason:
        pytest.skip(f"linux-kvm target unavailable: {reason}")


def both(ops: Sequence[Operation]) -> tuple[list[Observation], list[Observation]]:
    """Apply ``ops`` to a fresh reference and a fresh linux-kvm target: (model, kernel)."""
    kernel_target = open_kvm()
    model_target = ReferenceTarget(DEFAULT_PROFILE)
    try:
        return [model_target.apply(op) for op in ops], [kernel_target.apply(op) for op in ops]
    finally:
        kernel_target.close()
        model_target.close()


RAM = RegionAddr("ram")


@pytest.mark.kvm
def test_a_missing_vcpu_or_ring_is_the_same_errno_on_both() -> None:
    ops = [Mmap("ram", 1 << 20), GuestRead(0, 1), HarvestDirtyRing(), CreateVcpu(0)]
    ops += [HarvestDirtyRing(), GuestRead(0, 1), GuestWrite(0, 1, 1, vcpu=5)]
    model, kernel = both(ops)
    assert model == kernel
    assert [o["errno"] for o in kernel[1:]] == ["EBADF", "EBADF", 0, "EINVAL", 0, "EBADF"]


@pytest.mark.kvm
def test_the_private_slot_appears_at_the_first_guest_operation_on_both() -> None:
    """Before the first guest operation the private range is free (a slot there can be made
    and deleted); after it, an overlap is EEXIST and the private slot id is taken."""
    probe = SetUserMemoryRegion(1, 0, PRIVATE_GPA, 4096, RAM)
    ops: list[Operation] = [Mmap("ram", 1 << 20), CreateVcpu(0), probe]
    ops += [SetUserMemoryRegion(1, 0, 0, 0, 0), GuestRead(0, 8), probe]
    ops += [SetUserMemoryRegion(32763, 0, 0, PRIVATE_SIZE, RAM)]
    model, kernel = both(ops)
    assert model == kernel
    assert [o["errno"] for o in kernel[2:]] == [0, 0, 0, "EEXIST", "EINVAL"]


@pytest.mark.kvm
def test_a_refused_private_slot_is_the_guest_operations_answer_on_both() -> None:
    """Operations built in Python skip the parser's rules: if a slot already covers the
    private range, the first guest operation answers the EEXIST of the private slot."""
    ops = [
        Mmap("ram", 1 << 20),
        CreateVcpu(0),
        SetUserMemoryRegion(1, 0, PRIVATE_GPA, 4096, RAM),
        GuestWrite(0, 1, 1),
    ]
    model, kernel = both(ops)
    assert model == kernel
    assert kernel[-1] == {"errno": "EEXIST"}


@pytest.mark.kvm
@pytest.mark.parametrize("target", ["reference", "linux-kvm"])
def test_the_session_contract_knows_the_private_slot(target: str) -> None:
    """After the first guest operation, EEXIST for the private range is what the memslot
    contract expects too: the session told it of the slot."""
    if target == "linux-kvm":
        open_kvm().close()  # skip where /dev/kvm cannot be opened
    session = Session(DEFAULT_PROFILE, target)
    try:
        ops = [Mmap("ram", 1 << 20), CreateVcpu(0), GuestWrite(0x2000, 4, 7)]
        ops += [SetUserMemoryRegion(1, 0, PRIVATE_GPA - 4096, 8192, RAM)]
        results = [session.apply(op) for op in ops]
    finally:
        session.close()
    assert results[-1] == ({"errno": "EEXIST"}, [])
    assert all(not violations for _, violations in results)
