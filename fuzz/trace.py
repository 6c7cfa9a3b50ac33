"""Trace format v1: JSON Lines, parsed strictly, never eval'd or unpickled.

A trace is a header line ``{"format": "kvmspec-trace/1", "platform": "<profile>"}`` followed
by one operation per line, each optionally carrying the observation it expects under
``"expect"``. Blank lines and lines starting with ``#`` are ignored. Every problem is reported
as a :class:`TraceError` naming the file and line, before anything is applied: a bad trace is
rejected whole. The field kinds below are the single source of both the parser and the JSON
Schema in docs/trace-schema.json (``kvmspec schema``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmspec.fuzz.guest_layout import (
    ACCESS_SIZES,
    GPA_LIMIT,
    MAX_GIGABYTES,
    MAX_REGION_BYTES,
    MMAP_MIN_ADDR,
    PRIVATE_END,
    PRIVATE_GPA,
    gigabytes,
    overlaps_private,
    private_slot_id,
)
from kvmspec.fuzz.ops import (
    GUEST_OPERATIONS,
    HOST_OPERATIONS,
    OPERATIONS,
    Address,
    CreateGuestMemfd,
    CreateVcpu,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostRead,
    HostWrite,
    JsonObject,
    Mmap,
    Observation,
    Operation,
    RegionAddr,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.spec.platforms import PROFILES, PlatformProfile
from kvmspec.spec.uapi.constants import CAPABILITIES, U32_MAX, U64_MAX

FORMAT = "kvmspec-trace/1"
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
MAX_BITMAP_WORDS = 1 << 20
_NAME_RE = re.compile(NAME_PATTERN)

# kind of each field: u32 / u64 / name / prot / address / gmem / cap / args / words / width
FIELD_KINDS: dict[str, dict[str, str]] = {
    "mmap": {"region": "name", "size": "u64", "prot": "prot"},
    "set_user_memory_region": {
        "slot": "u32",
        "flags": "u32",
        "guest_phys_addr": "u64",
        "memory_size": "u64",
        "userspace_addr": "address",
    },
    "set_user_memory_region2": {
        "slot": "u32",
        "flags": "u32",
        "guest_phys_addr": "u64",
        "memory_size": "u64",
        "userspace_addr": "address",
        "guest_memfd": "gmem",
        "guest_memfd_offset": "u64",
    },
    "create_guest_memfd": {"gmem": "name", "size": "u64", "flags": "u64"},
    "get_dirty_log": {"slot": "u32"},
    "clear_dirty_log": {"slot": "u32", "first_page": "u64", "num_pages": "u32", "bitmap": "words"},
    "enable_cap": {"cap": "cap", "args": "args", "flags": "u32"},
    "check_extension": {"cap": "cap"},
    "set_nr_mmu_pages": {"nr_mmu_pages": "u64"},
    "create_vcpu": {"id": "u32"},
    "reset_dirty_rings": {},
    "guest_write": {"gpa": "u64", "size": "width", "value": "u64", "vcpu": "u32"},
    "guest_read": {"gpa": "u64", "size": "width", "vcpu": "u32"},
    "harvest_dirty_ring": {"vcpu": "u32"},
    "host_write": {"region": "name", "size": "width", "value": "u64", "offset": "u64"},
    "host_read": {"region": "name", "size": "width", "offset": "u64"},
    "madvise_dontneed": {"region": "name", "length": "u64", "offset": "u64"},
    "mprotect": {"region": "name", "length": "u64", "prot": "prot", "offset": "u64"},
    "munmap": {"region": "name", "length": "u64", "offset": "u64"},
    "mmap_fixed": {"region": "name", "length": "u64", "offset": "u64", "prot": "prot"},
}
REQUIRED: dict[str, frozenset[str]] = {
    "mmap": frozenset({"region", "size"}),
    "set_user_memory_region": frozenset(FIELD_KINDS["set_user_memory_region"]),
    "set_user_memory_region2": frozenset(
        {"slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"}
    ),
    "create_guest_memfd": frozenset({"gmem", "size"}),
    "get_dirty_log": frozenset({"slot"}),
    "clear_dirty_log": frozenset({"slot", "first_page", "num_pages"}),
    "enable_cap": frozenset({"cap"}),
    "check_extension": frozenset({"cap"}),
    "set_nr_mmu_pages": frozenset({"nr_mmu_pages"}),
    "create_vcpu": frozenset(),
    "reset_dirty_rings": frozenset(),
    "guest_write": frozenset({"gpa", "size", "value"}),
    "guest_read": frozenset({"gpa", "size"}),
    "harvest_dirty_ring": frozenset(),
    "host_write": frozenset({"region", "size", "value"}),
    "host_read": frozenset({"region", "size"}),
    "madvise_dontneed": frozenset({"region", "length"}),
    "mprotect": frozenset({"region", "length", "prot"}),
    "munmap": frozenset({"region", "length"}),
    "mmap_fixed": frozenset({"region", "length"}),
}


class TraceError(Exception):
    """A trace that cannot be applied. ``str()`` is ``FILE:LINE: what is wrong``."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}" if line else f"{source}: {message}")
        self.source = source
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One operation line: the operation, what it expects (if recorded), and its line."""

    op: Operation
    expect: Observation | None
    line: int


@dataclass(frozen=True, slots=True)
class Trace:
    platform: str
    steps: tuple[TraceStep, ...]
    source: str = "<trace>"


def _field(source: str, lineno: int, op: str, name: str, kind: str, value: Any) -> Any:
    where = f"{op}.{name}"

    def fail(message: str) -> TraceError:
        return TraceError(source, lineno, f"{where}: {message}")

    def integer(limit: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {json.dumps(value)}")
        if not 0 <= value <= limit:
            raise fail(f"{value} is out of range 0..{limit:#x}")
        return value

    if kind == "u32":
        return integer(U32_MAX)
    if kind == "u64":
        return integer(U64_MAX)
    if kind == "name":
        if not isinstance(value, str) or not _valid_name(value):
            raise fail(f"expected a name matching {NAME_PATTERN}, got {json.dumps(value)}")
        return value
    if kind == "width":
        if isinstance(value, bool) or value not in ACCESS_SIZES:
            raise fail(f"expected 1, 2, 4 or 8, got {json.dumps(value)}")
        return value
    if kind == "prot":
        if value not in ("r", "rw", "none"):
            raise fail(f'expected "r", "rw" or "none", got {json.dumps(value)}')
        return value
    if kind == "cap":
        if not isinstance(value, str) or value not in CAPABILITIES:
            raise fail(f"unknown capability {json.dumps(value)}")
        return value
    if kind == "address":
        if isinstance(value, dict):
            extra = set(value) - {"region", "offset"}
            if extra or "region" not in value:
                raise fail('expected {"region": NAME, "offset": N} or an integer')
            region = _field(source, lineno, op, name + ".region", "name", value["region"])
            offset = _field(source, lineno, op, name + ".offset", "u64", value.get("offset", 0))
            return RegionAddr(region, offset)
        return integer(U64_MAX)
    if kind == "gmem":
        if isinstance(value, str):
            return _field(source, lineno, op, name, "name", value)
        return integer(U32_MAX)
    if kind in ("args", "words"):
        if not isinstance(value, list):
            raise fail("expected a list of integers")
        limit = 4 if kind == "args" else MAX_BITMAP_WORDS
        if len(value) > limit:
            raise fail(f"at most {limit} entries")
        return tuple(
            _field(source, lineno, op, f"{name}[{i}]", "u64", v) for i, v in enumerate(value)
        )
    raise AssertionError(f"unknown field kind {kind}")


def _valid_name(value: str) -> bool:
    return _NAME_RE.fullmatch(value) is not None


def parse_operation(source: str, lineno: int, obj: JsonObject) -> Operation:
    """Build one operation from a decoded trace line (without its ``expect``)."""
    name = obj.get("op")
    if not isinstance(name, str):
        raise TraceError(source, lineno, 'missing "op"')
    if name not in OPERATIONS:
        raise TraceError(source, lineno, f"unknown operation {json.dumps(name)}")
    kinds = FIELD_KINDS[name]
    given = {key: value for key, value in obj.items() if key not in ("op", "expect")}
    unknown = sorted(set(given) - set(kinds))
    if unknown:
        raise TraceError(source, lineno, f"{name}: unknown field {json.dumps(unknown[0])}")
    missing = sorted(REQUIRED[name] - set(given))
    if missing:
        raise TraceError(source, lineno, f"{name}: missing field {json.dumps(missing[0])}")
    values = {
        key: _field(source, lineno, name, key, kinds[key], value) for key, value in given.items()
    }
    if "value" in values and values["value"] >> (8 * values["size"]):
        raise TraceError(
            source,
            lineno,
            f"{name}.value: {values['value']:#x} does not fit in {values['size']} bytes",
        )
    return OPERATIONS[name](**values)


def _parse_expect(source: str, lineno: int, value: Any) -> Observation:
    if not isinstance(value, dict) or "errno" not in value:
        raise TraceError(source, lineno, 'expect: must be an object with an "errno" field')
    errno = value["errno"]
    if not (type(errno) is int and errno == 0) and not (
        isinstance(errno, str) and errno.startswith("E")
    ):
        raise TraceError(source, lineno, f'expect.errno: 0 or a name like "EINVAL", got {errno!r}')
    return value


def _page_round(size: int, profile: PlatformProfile) -> int:
    """The length of the mapping an ``mmap`` of ``size`` bytes creates (whole pages)."""
    return -(-size // profile.page_size) * profile.page_size


def _check_names(source: str, profile: PlatformProfile, steps: list[TraceStep]) -> None:
    """Regions, guest_memfds and vCPUs must be created before they are used, and an address
    in a region must lie inside it."""
    regions: dict[str, int] = {}
    gmems: set[str] = set()
    vcpus: set[int] = set()

    def region_size(name: str, line: int) -> int:
        if name not in regions:
            raise TraceError(source, line, f"no region named {name!r}")
        return regions[name]

    for step in steps:
        op = step.op
        if isinstance(op, Mmap):
            if op.region in regions:
                raise TraceError(source, step.line, f"region {op.region!r} is already mapped")
            regions[op.region] = op.size
        elif isinstance(op, CreateGuestMemfd):
            if op.gmem in gmems:
                raise TraceError(source, step.line, f"guest_memfd {op.gmem!r} already exists")
            gmems.add(op.gmem)
        elif isinstance(op, CreateVcpu):
            vcpus.add(op.id)
        elif isinstance(op, HOST_OPERATIONS):
            size = region_size(op.region, step.line)
            end = op.offset + (op.size if isinstance(op, HostWrite | HostRead) else op.length)
            # The whole range must be the region's: past its end each target has other memory.
            if end > _page_round(size, profile):
                raise TraceError(
                    source,
                    step.line,
                    f"{op.NAME}: [{op.offset:#x}, {end:#x}) is not inside region "
                    f"{op.region!r} ({size:#x} bytes)",
                )
        elif isinstance(op, GuestWrite | GuestRead | HarvestDirtyRing) and op.vcpu not in vcpus:
            raise TraceError(
                source, step.line, f"{op.NAME}.vcpu: no create_vcpu with id {op.vcpu} before"
            )
        address: Address | None = getattr(op, "userspace_addr", None)
        if isinstance(address, RegionAddr):
            size = region_size(address.region, step.line)
            # Past its end, a region's address would depend on where each target placed it.
            if address.offset >= max(size, 1):
                raise TraceError(
                    source,
                    step.line,
                    f"offset {address.offset:#x} is not inside region {address.region!r} "
                    f"({size:#x} bytes)",
                )
        if (
            isinstance(op, SetUserMemoryRegion2)
            and isinstance(op.guest_memfd, str)
            and op.guest_memfd not in gmems
        ):
            raise TraceError(source, step.line, f"no guest_memfd named {op.guest_memfd!r}")


def _check_guest(source: str, profile: PlatformProfile, steps: list[TraceStep]) -> None:
    """The rules of :mod:`kvmspec.fuzz.guest_layout` for a trace with guest operations (the
    harness's private slot stays out of the trace's way, and the guest can reach no memory
    but the trace's own regions), and the one for a trace with host operations (the regions
    fit the linux-kvm target's window, so no address a host operation computes can be the
    harness's own memory)."""
    first = next((s.line for s in steps if isinstance(s.op, GUEST_OPERATIONS)), None)
    host = any(isinstance(s.op, HOST_OPERATIONS) for s in steps)
    if first is None and not host:
        return
    kind = "guest" if first is not None else "host"
    regions: dict[str, int] = {}
    reached: set[int] = set()
    for step in steps:
        op = step.op
        if isinstance(op, Mmap):
            regions[op.region] = _page_round(op.size, profile)
        problem = None
        if isinstance(op, Mmap) and sum(regions.values()) > MAX_REGION_BYTES:
            problem = f"the regions total more than {MAX_REGION_BYTES:#x} bytes"
        elif first is None:
            continue
        elif isinstance(op, SetUserMemoryRegion | SetUserMemoryRegion2):
            problem = _slot_problem(op, profile, regions, before_guest=step.line < first)
        elif isinstance(op, GuestWrite | GuestRead):
            reached |= gigabytes(op.gpa, op.size)
            problem = _access_problem(op.gpa, op.size, len(reached))
        if problem:
            raise TraceError(
                source, step.line, f"{op.NAME}: {problem} (in a trace with {kind} operations)"
            )


def _slot_problem(
    op: SetUserMemoryRegion | SetUserMemoryRegion2,
    profile: PlatformProfile,
    regions: dict[str, int],
    before_guest: bool,
) -> str | None:
    """Why a memslot request breaks the guest rules, or None."""
    private = private_slot_id(profile)
    if op.slot == private:
        return f"slot {private} is the harness's private slot"
    if not op.memory_size:
        return None  # a delete reaches no memory
    gpa, size = op.guest_phys_addr, op.memory_size
    if before_guest and op.slot >> 16 == 0 and overlaps_private(gpa, size):
        return (
            f"the slot overlaps the harness's private guest memory [{PRIVATE_GPA:#x}, "
            f"{PRIVATE_END:#x}), mapped at the first guest operation"
        )
    address = op.userspace_addr
    if isinstance(address, RegionAddr):
        if address.offset + size > regions[address.region]:
            return f"the slot's host memory runs past the end of region {address.region!r}"
    elif address + size > MMAP_MIN_ADDR and address < profile.user_address_limit:
        return f"the raw userspace_addr {address:#x} could reach the harness's own memory"
    return None


def _access_problem(gpa: int, size: int, gigabytes_reached: int) -> str | None:
    """Why a guest access breaks the guest rules, or None."""
    if gpa + size > GPA_LIMIT:
        return f"[{gpa:#x}, {gpa + size:#x}) is not below {GPA_LIMIT:#x}"
    if overlaps_private(gpa, size):
        return f"{gpa:#x} is in the harness's private guest memory"
    if gigabytes_reached > MAX_GIGABYTES:
        return f"the accesses reach more than {MAX_GIGABYTES} distinct 1 GiB ranges"
    return None


def parse_lines(lines: Iterable[str], source: str = "<trace>") -> Trace:
    """Parse a whole trace; raise :class:`TraceError` on the first problem."""
    platform: str | None = None
    steps: list[TraceStep] = []
    last = 0
    for lineno, raw in enumerate(lines, start=1):
        last = lineno
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as error:
            # JSONDecodeError has .msg; other ValueErrors (an integer of thousands of digits)
            # and RecursionError (deep nesting) do not.
            message = getattr(error, "msg", None) or str(error).split(";")[0] or "too deep"
            raise TraceError(source, lineno, f"not valid JSON ({message})") from None
        if not isinstance(obj, dict):
            raise TraceError(source, lineno, "each line must be a JSON object")
        if platform is None:
            if obj.get("format") != FORMAT:
                raise TraceError(source, lineno, f'header must say "format": "{FORMAT}"')
            platform = obj.get("platform")
            if not isinstance(platform, str) or platform not in PROFILES:
                known = ", ".join(sorted(PROFILES))
                raise TraceError(source, lineno, f"unknown platform {platform!r} ({known})")
            continue
        op = parse_operation(source, lineno, obj)
        expect = _parse_expect(source, lineno, obj["expect"]) if "expect" in obj else None
        steps.append(TraceStep(op, expect, lineno))
    if platform is None:
        raise TraceError(source, max(last, 1), "empty trace: no header line")
    profile = PROFILES[platform]
    _check_names(source, profile, steps)
    _check_guest(source, profile, steps)
    return Trace(platform, tuple(steps), source)


def load(path: str | Path) -> Trace:
    """Read and parse a trace file; unreadable or undecodable files are a TraceError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise TraceError(str(path), 0, f"cannot read: {reason}") from None
    return parse_lines(text.splitlines(), str(path))


def dump(platform: str, steps: Iterable[tuple[Operation, Observation | None]]) -> str:
    """Serialise a trace: the header, then one operation per line with its expectation."""
    lines = [json.dumps({"format": FORMAT, "platform": platform})]
    for op, expect in steps:
        line = op.to_json()
        if expect is not None:
            line["expect"] = expect
        lines.append(json.dumps(line))
    return "\n".join(lines) + "\n"
