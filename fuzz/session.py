"""A session: one target driven step by step, every step checked against the rules.

The session applies an operation, records it with its observation (so any run can be written
out as a trace), checks the black-box contracts on the observation, and, when the target is
the reference model, the white-box invariants on its state (those of the x86 shadow MMU too,
when the model VM runs it). It also keeps what a VMM knows (regions, guest_memfds, the last
accepted request of each slot) for the decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE, private_slot_id
from kvmspec.fuzz.ops import (
    GUEST_OPERATIONS,
    HOST_OPERATIONS,
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostOperation,
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
    ResetDirtyRings,
    SetNrMmuPages,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.fuzz.targets import Target, make_target
from kvmspec.fuzz.trace import dump
from kvmspec.spec.contracts import MemslotUapiContract
from kvmspec.spec.dirty_contract import DirtyLogContract
from kvmspec.spec.memory_contract import MemoryCoherenceContract
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import errno_code
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm
    from kvmspec.reference.kvm import Kvm
    from kvmspec.spec.invariants import Violation

RegionOp = SetUserMemoryRegion | SetUserMemoryRegion2
_OUTCOMES = {"none": "mapped", "mmio": "mmio", "dirty_ring_full": "dirty_ring_full"}
"""A guest observation's exit, as the memory contract names outcomes."""
_PROT_BITS = {"none": 0, "r": 1, "rw": 3}


def _arch_checks(kvm: Kvm, host: HostMm | None) -> Callable[[], list[Violation]] | None:
    """The white-box checks of the model VM's MMU, run after every step, if it has any: the
    x86 shadow MMU's (:func:`kvmspec.spec.invariants.x86.check_shadow_mmu`, the X rules,
    N4 and D4), which read the VM's host too."""
    from kvmspec.reference.x86.shadow_mmu import ShadowMmu
    from kvmspec.spec.invariants.x86 import check_shadow_mmu

    arch = kvm.arch
    if not isinstance(arch, ShadowMmu) or host is None:
        return None
    return lambda: check_shadow_mmu(kvm, arch, host)


class Session:
    """One target, one VM, and the checks that judge it."""

    def __init__(
        self, profile: PlatformProfile, target: Target | str, large_slots: bool = False
    ) -> None:
        self.profile = profile
        self.target = make_target(target, profile) if isinstance(target, str) else target
        self.large_slots = large_slots
        self.contract = MemslotUapiContract(profile)
        # What guest accesses must observe and what the dirty log must report, judged from
        # the observations of any target (the real kernel included).
        self.memory = MemoryCoherenceContract(self.contract)
        self.dirty = DirtyLogContract(self.contract)
        self.monitor = None
        self.arch_checks: Callable[[], list[Violation]] | None = None
        kvm = getattr(self.target, "kvm", None)
        if kvm is not None:
            from kvmspec.spec.invariants.memslots import InvariantMonitor

            self.monitor = InvariantMonitor(kvm)
            self.arch_checks = _arch_checks(kvm, getattr(self.target, "host", None))
        self.region_sizes: dict[str, int] = {}  # mapped regions, in mapping order
        self.gmems: list[str] = []
        self.slot_requests: dict[tuple[int, int], RegionOp] = {}
        self.history: list[tuple[Operation, Observation]] = []
        self.private_slot_known = False  # the contract has been told of the guest's slot

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def vcpus(self) -> set[int]:
        """The vCPUs created so far."""
        return self.contract.vcpus

    def close(self) -> None:
        self.target.close()

    def trace_text(self) -> str:
        """The session so far as a replayable trace, each step expecting what it observed."""
        return dump(self.profile.name, self.history)

    def apply(self, op: Operation) -> tuple[Observation, list[str]]:
        """Apply one operation; return its observation and every rule it broke."""
        observed = self.target.apply(op)
        self.history.append((op, observed))
        created = False  # this step created the guest's private slot
        if isinstance(op, GUEST_OPERATIONS) and not self.private_slot_known:
            created = self._learn_private_slot()
        errno = errno_code(observed["errno"])
        violations = [str(v) for v in self._judge(op, observed, errno)]
        if self.monitor is not None:
            # A guest access that fails (EFAULT from KVM_RUN) after creating the private
            # slot did change the memslots.
            updated = isinstance(op, RegionOp) or created
            failed = errno != 0 and not created
            checked = self.monitor.check(failed=failed, memslots_changed=updated)
            violations.extend(str(v) for v in checked)
            if self.arch_checks is not None:
                # The VM's WARNs are in both lists: report each once.
                violations.extend(str(v) for v in self.arch_checks() if v not in checked)
        self._remember(op, errno)
        return observed, violations

    def _learn_private_slot(self) -> bool:
        """The first guest operation made the target create the harness's private slot
        (kvmspec.fuzz.guest_layout) outside any operation: the contract must know it, or
        it would not expect EEXIST from a later overlap. A target shows it by its
        ``private_hva``. Returns whether the slot was there to learn."""
        hva = getattr(self.target, "private_hva", 0)
        if not hva:
            return False
        slot = private_slot_id(self.profile)
        region = MemoryRegion(slot, 0, PRIVATE_GPA, PRIVATE_SIZE, hva, 0)
        found = self.contract.on_set_memory_region(region, 1, None, 0)
        assert not found, found  # the parser's guest rules leave room for it
        self.private_slot_known = True
        return True

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
            found: list[object] = [
                *contract.on_set_memory_region(region, version, gmem_name, errno)
            ]
            if not errno:
                self.dirty.on_memslots_changed()
            return found
        if isinstance(op, CreateGuestMemfd):
            return list(contract.on_create_guest_memfd(op.gmem, op.size, op.flags, errno))
        if isinstance(op, GetDirtyLog):
            got: list[object] = [*contract.on_get_dirty_log(op.slot, errno, observed.get("bitmap"))]
            if not errno and not got:
                got += self.dirty.on_get_dirty_log(op.slot, observed["bitmap"])
            return got
        if isinstance(op, ClearDirtyLog):
            cleared: list[object] = [
                *contract.on_clear_dirty_log(op.slot, op.first_page, op.num_pages, errno)
            ]
            if not errno and not cleared:
                self.dirty.on_clear_dirty_log(op.slot, op.first_page, op.num_pages, list(op.bitmap))
            return cleared
        if isinstance(op, Mmap):
            resolve = getattr(self.target, "resolve", None)
            if not errno and resolve is not None:
                start = resolve(RegionAddr(op.region, 0))
                size = -(-op.size // self.profile.page_size) * self.profile.page_size
                self.memory.on_host_map(start, start + size, _PROT_BITS[op.prot])
            return []
        if isinstance(op, EnableCap):
            return list(contract.on_enable_cap(op.cap, op.flags, op.args, errno))
        if isinstance(op, CheckExtension) and not errno:
            return list(contract.on_check_extension(op.cap, observed["result"]))
        if isinstance(op, SetNrMmuPages):
            return list(contract.on_set_nr_mmu_pages(op.nr_mmu_pages, errno))
        if isinstance(op, CreateVcpu):
            contract.on_create_vcpu(op.id, errno)
        elif isinstance(op, ResetDirtyRings):
            reset: list[object] = [*contract.on_reset_dirty_rings(errno)]
            if errno:
                return reset
            return reset + list(self.dirty.on_reset_dirty_rings(observed["result"]))
        elif isinstance(op, HarvestDirtyRing) and not errno:
            entries = [(slot, offset) for slot, offset in observed["entries"]]
            return list(self.dirty.on_harvest_ring(op.vcpu, entries))
        elif isinstance(op, GUEST_OPERATIONS):
            return self._judge_guest(op, observed, errno)
        elif isinstance(op, HOST_OPERATIONS):
            return self._judge_host(op, observed, errno)
        return []

    def _judge_guest(
        self, op: GuestWrite | GuestRead, observed: Observation, errno: int
    ) -> list[object]:
        """The memory and dirty-log contracts on a guest access. An access that spans two
        pages is not judged (KVM may complete part of it); what it may have written becomes
        unknown."""
        if errno and errno_code("EFAULT") != errno:
            return []  # no such vCPU: nothing ran
        # Another exit (a shutdown) is no outcome the contracts allow: they report it.
        exit_name: str = "" if errno else observed["exit"]
        outcome = "efault" if errno else _OUTCOMES.get(exit_name, exit_name)
        page = self.profile.page_size
        if op.gpa % page + op.size > page:
            if isinstance(op, GuestWrite):
                self.memory.on_unjudged_store(op.gpa, op.size)
                self.dirty.on_guest_store(op.gpa, op.vcpu, False)
            return []
        if isinstance(op, GuestWrite):
            self.dirty.on_guest_store(op.gpa, op.vcpu, outcome == "mapped")
            return list(self.memory.on_guest_store(op.gpa, op.value, outcome, op.size))
        value = observed.get("value")
        return list(self.memory.on_guest_load(op.gpa, outcome, value, op.size))

    def _judge_host(self, op: HostOperation, observed: Observation, errno: int) -> list[object]:
        """Keep the memory contract's view of the VMM's memory; judge the VMM's own loads."""
        resolve = getattr(self.target, "resolve", None)
        if resolve is None:
            return []
        start = resolve(RegionAddr(op.region, op.offset))
        memory = self.memory
        if isinstance(op, HostWrite):
            if not errno:
                memory.on_host_write(start, op.value, op.size)
            return []
        if isinstance(op, HostRead):
            return list(memory.on_host_read(start, observed["value"], op.size)) if not errno else []
        end = start + -(-op.length // self.profile.page_size) * self.profile.page_size
        if isinstance(op, MadviseDontneed) and not errno:
            memory.on_host_drop(start, end)
        elif isinstance(op, Munmap) and not errno:
            memory.on_host_unmap(start, end)
        elif isinstance(op, MmapFixed) and not errno:
            memory.on_host_unmap(start, end)
            memory.on_host_map(start, end, _PROT_BITS[op.prot])
        elif isinstance(op, Mprotect):
            if errno:
                memory.on_host_unknown(start, end)  # it may have changed a part
            else:
                memory.on_host_map(start, end, _PROT_BITS[op.prot])
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
