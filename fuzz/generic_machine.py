"""The generic-layer state machine: memslot updates, page faults, host memory actions and
guest accesses on the minimal flat MMU, interleaved step by step.

Memslot updates and page faults are actors of a :class:`~kvmspec.fuzz.scheduler.Scheduler`:
a rule starts one, another rule advances any in-flight actor by one step, so Hypothesis
explores their interleavings (and shrinks a failure to the shortest schedule, printed actor by
actor). Host actions (writes, MADV_DONTNEED, migration) run whole, with KVM's MMU notifier
called inside them. Guest accesses run when nothing is in flight.

After every rule: no deadlock; the black-box contracts (every memslot answer as the uAPI
rules predict; guest loads return the last value stored through any path; MMIO exactly where
there is no slot or a store hits a READONLY one); the MMU-notifier counters; and, when no
memslot update is in flight, every memslot invariant and that every translation points at the
page the host maps (N4, M13).
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmspec.fuzz import machines
from kvmspec.fuzz.scheduler import Scheduler
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.page_fault import Fault, guest_access, kvm_page_fault
from kvmspec.spec.contracts import MemslotUapiContract
from kvmspec.spec.invariants.memslots import InvariantMonitor
from kvmspec.spec.invariants.translations import (
    check_open_invalidations,
    check_translations_match_host,
)
from kvmspec.spec.memory_contract import MemoryCoherenceContract
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
REGION_PAGES = 8
SLOT_PAGES = 4
# Where each slot id may sit in guest-physical space (two places, so MOVE has somewhere to go)
# and which part of the host region backs it (slot 2 aliases slot 0's pages).
GPAS = {0: (0x100000, 0x200000), 1: (0x300000, 0x108000), 2: (0x400000, 0x500000)}
HOST_OFFSET = {0: 0, 1: SLOT_PAGES * PAGE, 2: 0}


class GenericMachine(RuleBasedStateMachine):
    profile: PlatformProfile

    def __init__(self) -> None:
        super().__init__()
        self.mmu = FlatMmu()
        self.kvm = Kvm(self.profile, self.mmu)
        self.host = HostMm(PAGE, self.profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.base = self.host.mmap(REGION_PAGES * PAGE, PROT_READ | PROT_WRITE)
        self.monitor = InvariantMonitor(self.kvm)
        self.scheduler = Scheduler()
        # The black-box contracts: the memslot uAPI, and what guest accesses must observe.
        self.memslots = MemslotUapiContract(self.profile)
        self.memory = MemoryCoherenceContract(self.memslots)
        self.violations: list[str] = []
        self.faulting: dict[str, int] = {}  # fault actor -> the host page it is resolving
        self.zapping: dict[str, int] = {}  # madvise actor -> the host page it drops
        self.counter = 0
        self.rules_run = 0
        # The VM starts with slot 0 in place, as a VMM sets up RAM before running vCPUs.
        region = MemoryRegion(0, 0, GPAS[0][0], SLOT_PAGES * PAGE, self.base)
        errno = run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))
        assert errno == 0 and not self.memslots.on_set_memory_region(region, 1, None, errno)

    # -- helpers ------------------------------------------------------------------------------

    def _memslot_in_flight(self) -> bool:
        return any(name.startswith("memslot") for name in self.scheduler.actors)

    def _name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}#{self.counter}"

    # -- memslot updates and faults as actors ---------------------------------------------------

    @precondition(lambda self: len(self.scheduler.actors) < 3)
    @rule(slot_id=st.sampled_from(sorted(GPAS)), where=st.integers(0, 1), action=st.integers(0, 2))
    def start_memslot_update(self, slot_id: int, where: int, action: int) -> None:
        """CREATE or MOVE (to one of the slot's two places), DELETE, or toggle logging."""
        gpa = GPAS[slot_id][where]
        flags = 0
        if action == 1:
            size = 0  # delete
        else:
            size = SLOT_PAGES * PAGE
            flags = KVM_MEM_LOG_DIRTY_PAGES if action == 2 else 0
        region = MemoryRegion(slot_id, flags, gpa, size, self.base + HOST_OFFSET[slot_id])
        name = self._name("memslot")
        note(f"{name}: start set_user_memory_region {region}")

        def done(errno: int) -> None:
            # Updates hold slots_lock, so they finish in the order they took effect.
            found = self.memslots.on_set_memory_region(region, 1, None, errno)
            self.violations.extend(map(str, found))

        op = kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1)
        self.scheduler.start(name, op, done)

    @precondition(lambda self: len(self.scheduler.actors) < 3)
    @rule(
        slot_id=st.sampled_from(sorted(GPAS)),
        page=st.integers(0, SLOT_PAGES - 1),
        write=st.booleans(),
    )
    def start_fault(self, slot_id: int, page: int, write: bool) -> None:
        gpa = GPAS[slot_id][0] + page * PAGE
        name = self._name("fault")
        note(f"{name}: start {'write' if write else 'read'} fault at {gpa:#x}")
        op = kvm_page_fault(self.kvm, self.host, 0, gpa, write)
        self.faulting[name] = self.base + HOST_OFFSET[slot_id] + page * PAGE

        def done(outcome: Fault) -> None:
            note(f"{name} -> {outcome}")
            self.faulting.pop(name, None)

        self.scheduler.start(name, op, done)

    @precondition(lambda self: bool(self.scheduler.runnable()))
    @rule(data=st.data())
    def step_an_actor(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.scheduler.runnable()))
        self.scheduler.step(name)
        note(self.scheduler.schedule[-1])

    # -- the host, run whole ------------------------------------------------------------------

    @rule(page=st.integers(0, REGION_PAGES - 1), value=st.integers(1, 255))
    def host_write(self, page: int, value: int) -> None:
        hva = self.base + page * PAGE
        if hva in self.zapping.values():
            return  # the zap in flight would race the write: which wins is not specified
        assert self.host.host_write(hva, bytes([value])) == 0
        self.memory.on_host_write(hva, value)

    @precondition(lambda self: len(self.scheduler.actors) < 3)
    @rule(page=st.integers(0, REGION_PAGES - 1))
    def start_madvise_dontneed(self, page: int) -> None:
        """MADV_DONTNEED as an actor: its notifier start and end are separate steps, so
        faults and memslot updates run while the invalidation is open."""
        hva = self.base + page * PAGE
        name = self._name("madvise")
        note(f"{name}: start MADV_DONTNEED of host page {page}")
        self.memory.on_host_drop(hva, hva + PAGE)
        self.zapping[name] = hva

        def done(errno: int) -> None:
            assert errno == 0
            self.zapping.pop(name, None)

        self.scheduler.start(name, self.host.madvise_dontneed_op(hva, PAGE), done)

    def _resolved(self) -> list[int]:
        """Host pages whose pfn an in-flight fault has resolved and not yet installed."""
        return sorted(
            hva
            for name, hva in self.faulting.items()
            if "pfn resolved" in getattr(self.scheduler.actors[name].pending, "point", "")
        )

    @precondition(lambda self: bool(self._resolved()))
    @rule(data=st.data())
    def drop_a_page_under_a_fault(self, data: st.DataObject) -> None:
        """The race the retry check exists for: the host takes away the very page an
        in-flight fault has resolved (MADV_DONTNEED, then the VMM writes a new page)."""
        hva = data.draw(st.sampled_from(self._resolved()))
        assert self.host.madvise_dontneed(hva, PAGE) == 0
        self.memory.on_host_drop(hva, hva + PAGE)
        assert self.host.host_write(hva, b"\x5a") == 0
        self.memory.on_host_write(hva, 0x5A)

    @rule(page=st.integers(0, REGION_PAGES - 1))
    def migrate(self, page: int) -> None:
        assert self.host.migrate_page(self.base + page * PAGE) == 0

    @rule(page=st.integers(0, REGION_PAGES - 1), flush=st.booleans())
    def age(self, page: int, flush: bool) -> None:
        self.host.age(self.base + page * PAGE, flush)

    # -- the guest, when nothing is in flight -------------------------------------------------

    @precondition(lambda self: not self.scheduler.actors)
    @rule(
        slot_id=st.sampled_from(sorted(GPAS)),
        where=st.integers(0, 1),
        page=st.integers(0, SLOT_PAGES - 1),
        value=st.integers(0, 255),
    )
    def guest_access(self, slot_id: int, where: int, page: int, value: int) -> None:
        """A store of ``value`` (0 means a load) at offset 0 of a page; a load must return
        the last value stored there through any path (coherence)."""
        gpa = GPAS[slot_id][where] + page * PAGE
        data = bytes([value]) if value else None
        outcome, read = guest_access(self.kvm, self.host, 0, gpa, data)
        note(f"guest {'store' if data else 'load'} {gpa:#x} -> {outcome} {read!r}")
        if data:
            found = self.memory.on_guest_store(gpa, value, outcome.value)
        else:
            found = self.memory.on_guest_load(gpa, outcome.value, read[0] if read else None)
        self.violations.extend(map(str, found))

    # -- the rules, after every step ------------------------------------------------------------

    def teardown(self) -> None:
        machines.STATS["steps"] += self.rules_run
        machines.STATS["invariant_checks"] += self.rules_run
        # Guest accesses are not in trace format v1 yet: a failure keeps the schedule.
        machines.LAST_RUN["trace"] = "\n".join(self.scheduler.schedule) + "\n"
        machines.LAST_RUN["suffix"] = ".schedule.txt"

    @invariant()
    def rules_hold(self) -> None:
        self.rules_run += 1
        self.scheduler.check_progress()
        assert not self.violations, "\n".join(self.violations)
        open_ranges = check_open_invalidations(self.kvm, self.mmu, self.host)
        assert not open_ranges, "\n".join(map(str, open_ranges))
        if self._memslot_in_flight():
            return
        violations = self.monitor.check()
        violations += check_translations_match_host(self.kvm, self.mmu, self.host)
        assert not violations, "\n".join(map(str, violations))


def generic_machine(profile: PlatformProfile) -> type[GenericMachine]:
    return type(f"GenericMachine[{profile.name}]", (GenericMachine,), {"profile": profile})
