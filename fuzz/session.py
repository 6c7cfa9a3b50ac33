"""A session: one target driven step by step, every step checked against the rules.

The session applies an operation, records it with its observation (so any run can be written
out as a trace), checks the black-box contracts on the observation, and, when the target is
the reference model, the white-box invariants on its state. It also keeps what a VMM knows
(regions, guest_memfds, the last accepted request of each slot) for the decoder.
"""

from __future__ import annotations

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE, private_slot_id
from kvmspec.fuzz.ops import (
    GUEST_OPERATIONS,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    Mmap,
    Observation,
    Operation,
    ResetDirtyRings,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.fuzz.targets import Target, make_target
from kvmspec.fuzz.trace import dump
from kvmspec.spec.contracts import MemslotUapiContract
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import errno_code
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

RegionOp = SetUserMemoryRegion | SetUserMemoryRegion2


class Session:
    """One target, one VM, and the checks that judge it."""

    def __init__(
        self, profile: PlatformProfile, target: Target | str, large_slots: bool = False
    ) -> None:
        self.profile = profile
        self.target = make_target(target, profile) if isinstance(target, str) else target
        self.large_slots = large_slots
        self.contract = MemslotUapiContract(profile)
        self.monitor = None
        kvm = getattr(self.target, "kvm", None)
        if kvm is not None:
            from kvmspec.spec.invariants.memslots import InvariantMonitor

            self.monitor = InvariantMonitor(kvm)
        self.region_sizes: dict[str, int] = {}  # mapped regions, in mapping order
        self.gmems: list[str] = []
        self.slot_requests: dict[tuple[int, int], RegionOp] = {}
        self.history: list[tuple[Operation, Observation]] = []
        self.private_slot_known = False  # the contract has been told of the guest's slot

    @property
    def steps(self) -> int:
        return len(self.history)

    def close(self) -> None:
        self.target.close()

    def trace_text(self) -> str:
        """The session so far as a replayable trace, each step expecting what it observed."""
        return dump(self.profile.name, self.history)

    def apply(self, op: Operation) -> tuple[Observation, list[str]]:
        """Apply one operation; return its observation and every rule it broke."""
        observed = self.target.apply(op)
        self.history.append((op, observed))
        if isinstance(op, GUEST_OPERATIONS) and not self.private_slot_known:
            self._learn_private_slot()
        errno = errno_code(observed["errno"])
        violations = [str(v) for v in self._judge(op, observed, errno)]
        if self.monitor is not None:
            updated = isinstance(op, RegionOp)
            checked = self.monitor.check(failed=errno != 0, memslots_changed=updated)
            violations.extend(str(v) for v in checked)
        self._remember(op, errno)
        return observed, violations

    def _learn_private_slot(self) -> None:
        """The first guest operation made the target create the harness's private slot
        (kvmspec.fuzz.guest_layout) outside any operation: the contract must know it, or
        it would not expect EEXIST from a later overlap. A target shows it by its
        ``private_hva``."""
        hva = getattr(self.target, "private_hva", 0)
        if not hva:
            return
        slot = private_slot_id(self.profile)
        region = MemoryRegion(slot, 0, PRIVATE_GPA, PRIVATE_SIZE, hva, 0)
        found = self.contract.on_set_memory_region(region, 1, None, 0)
        assert not found, found  # the parser's guest rules leave room for it
        self.private_slot_known = True

    def _judge(self, op: Operation, observed: Observation, errno: int) -> list[object]:
        contract = self.contract
        if isinstance(op, RegionOp):
            resolve = getattr(self.target, "resolve", None)
            address = resolve(op.userspace_addr) if resolve is not None else op.userspace_addr
            if not isinstance(address, int):
                return []  # a target that cannot resolve addresses is judged on the rest
            version = 1
            offset = 0
            gmem_name = None
            if isinstance(op, SetUserMemoryRegion2):
                version, offset = 2, op.guest_memfd_offset
                if isinstance(op.guest_memfd, str):
                    gmem_name = op.guest_memfd
            region = MemoryRegion(
                op.slot, op.flags, op.guest_phys_addr, op.memory_size, address, offset
            )
            return list(contract.on_set_memory_region(region, version, gmem_name, errno))
        if isinstance(op, CreateGuestMemfd):
            return list(contract.on_create_guest_memfd(op.gmem, op.size, op.flags, errno))
        if isinstance(op, GetDirtyLog):
            return list(contract.on_get_dirty_log(op.slot, errno, observed.get("bitmap")))
        if isinstance(op, ClearDirtyLog):
            return list(contract.on_clear_dirty_log(op.slot, op.first_page, op.num_pages, errno))
        if isinstance(op, EnableCap):
            return list(contract.on_enable_cap(op.cap, op.flags, op.args, errno))
        if isinstance(op, CreateVcpu):
            contract.on_create_vcpu(op.id, errno)
        elif isinstance(op, ResetDirtyRings):
            return list(contract.on_reset_dirty_rings(errno))
        return []

    def _remember(self, op: Operation, errno: int) -> None:
        if errno:
            return
        if isinstance(op, Mmap):
            self.region_sizes[op.region] = op.size
        elif isinstance(op, CreateGuestMemfd):
            self.gmems.append(op.gmem)
        elif isinstance(op, RegionOp):
            key = (op.slot >> 16, op.slot & 0xFFFF)
            if op.memory_size == 0:
                self.slot_requests.pop(key, None)
            else:
                self.slot_requests[key] = op
