"""The generic-layer harness: one VM on the minimal flat MMU, its host, the actors in flight
and every check, driven one action at a time by whoever picks the actions.

Memslot updates, page faults, MADV_DONTNEED and the dirty-log ioctls are actors of a
:class:`~kvmspec.fuzz.scheduler.Scheduler`: one action starts one, another advances an
in-flight actor by one step, so the caller explores their interleavings. Other host actions
(writes, mprotect, munmap, migration, aging, reclaim) run whole, with KVM's MMU notifier
called inside them. Guest accesses run at any time, on one of two vCPUs. A run first picks a
dirty-logging mode: the plain bitmap, manual protection (with or without INITIALLY_SET), the
dirty ring, or the ring with a backup bitmap where the platform has it.

Two drivers choose the actions and their arguments: the Hypothesis state machine
(:mod:`kvmspec.fuzz.generic_machine`), and the byte decoder of the Atheris fuzzer
(:mod:`kvmspec.fuzz.generic_decoder`). Each action is one method with explicit arguments; an
action whose ``can_*`` precondition is false must not be called. :meth:`GenericHarness.check`,
after every action, raises :class:`RulesBroken` (an AssertionError) with what it found:

* no deadlock;
* the black-box contracts: every memslot answer as the uAPI rules predict; guest accesses
  coherent, MMIO, EFAULT and notifier exclusion exactly where due; every write reported by the
  dirty log; aging sound;
* the MMU-notifier counters, and dirty tracking (D1, D10);
* when no memslot update is in flight, every memslot invariant, that every translation points
  at the page the host maps (N4, M13) and that writable pages are dirty (N8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from errno import EBUSY

from kvmspec.fuzz.scheduler import Scheduler
from kvmspec.reference import kvm_main
from kvmspec.reference.capabilities import kvm_vm_ioctl_enable_cap
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import (
    kvm_clear_dirty_log_protect,
    kvm_get_dirty_log_protect,
    kvm_vm_ioctl_reset_dirty_pages,
)
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.guest_memory import vgic_its_save_tables
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.host_reclaim import Reclaim
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.page_fault import Fault, guest_access, kvm_page_fault
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.spec.aging_contract import AgingContract
from kvmspec.spec.contracts import MemslotUapiContract
from kvmspec.spec.dirty_contract import DirtyLogContract
from kvmspec.spec.invariants.dirty import (
    check_ring_full_keeps_vcpu_out,
    check_rings_and_bitmaps,
    check_writable_translations_logged,
)
from kvmspec.spec.invariants.memslots import InvariantMonitor
from kvmspec.spec.invariants.translations import (
    check_aging_keeps_translations,
    check_open_invalidations,
    check_translations_match_host,
    check_writable_pages_dirty,
    translation_snapshot,
)
from kvmspec.spec.memory_contract import MemoryCoherenceContract
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
)
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
REGION_PAGES = 8
SLOT_PAGES = 4
VCPUS = (0, 1)
# Where each slot id may sit in guest-physical space (two places, so MOVE has somewhere to go)
# and which part of the host region backs it (slot 2 aliases slot 0's pages).
GPAS = {0: (0x100000, 0x200000), 1: (0x300000, 0x108000), 2: (0x400000, 0x500000)}
SLOT_IDS = tuple(sorted(GPAS))
HOST_OFFSET = {0: 0, 1: SLOT_PAGES * PAGE, 2: 0}
RING_BYTES = 1 << 12  # the smallest ring: 256 entries, 192 before the soft-full exit
PROT_NAMES = {0: "none", PROT_READ: "r", PROT_READ | PROT_WRITE: "rw"}
MAX_IN_FLIGHT = 3
"""Actors in flight at most: enough for three-way races, few enough to finish them."""
DIRTY_MODES = ("bitmap", "manual", "manual-initially-set", "ring")
"""The modes a driver asks for; :meth:`GenericHarness.set_up` adapts them to the platform."""

Log = Callable[[str], None]


def _ignore(line: str) -> None:
    """The default log: say nothing."""


def dirty_modes(profile: PlatformProfile) -> list[str]:
    """The dirty-logging set-ups this platform offers."""
    modes = ["bitmap"]
    if profile.manual_dirty_log_protect:
        modes += ["manual", "manual-initially-set"]
    if profile.dirty_ring_supported:
        modes.append("ring")
        if profile.dirty_ring_with_bitmap:
            modes.append("ring-with-bitmap")
    return modes


class RulesBroken(AssertionError):
    """:meth:`GenericHarness.check` found broken rules: ``violations`` are their lines, each
    starting with the rule's id (``N4: ...``)."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("\n".join(violations))
        self.violations = violations


class GenericHarness:
    """The model (``kvm`` on ``mmu``, with ``host`` as the VMM's address space), the actors in
    flight, the contracts and the white-box checks. ``log`` receives one line per event worth
    reading in a failure report (the Hypothesis machine passes ``note``)."""

    def __init__(self, profile: PlatformProfile, log: Log = _ignore) -> None:
        self.profile = profile
        self.log = log
        self.mmu = FlatMmu()
        self.kvm = Kvm(profile, self.mmu)
        self.host = HostMm(PAGE, profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.base = self.host.mmap(REGION_PAGES * PAGE, PROT_READ | PROT_WRITE)
        self.monitor = InvariantMonitor(self.kvm)
        self.scheduler = Scheduler()
        # The black-box contracts: the memslot uAPI, what guest accesses must observe, what
        # the dirty log must report, and what aging must see.
        self.memslots = MemslotUapiContract(profile)
        self.memory = MemoryCoherenceContract(self.memslots)
        self.memory.on_host_map(self.base, self.base + REGION_PAGES * PAGE, PROT_READ | PROT_WRITE)
        self.dirty = DirtyLogContract(self.memslots)
        self.aging = AgingContract(PAGE)
        self.violations: list[str] = []
        self.faulting: dict[str, int] = {}  # fault actor -> the host page it is resolving
        self.zapping: dict[str, int] = {}  # madvise actor -> the host page it drops
        self.updating: dict[str, MemoryRegion] = {}  # memslot actor -> its request
        self.counter = 0
        self.checks = 0

    def set_up(self, mode: str, logged: bool) -> None:
        """Pick the dirty-logging mode (capabilities must come before vCPUs and memslots),
        create the vCPUs, and put slot 0 in place (dirty-logged or not), as a VMM sets up RAM
        before running. A mode the platform lacks falls back to the bitmap."""
        if mode not in dirty_modes(self.profile):
            mode = "bitmap"
        if mode == "ring" and "ring-with-bitmap" in dirty_modes(self.profile):
            mode = "ring-with-bitmap"  # arm64 needs the backup bitmap to save ITS tables
        self.log(f"dirty logging: {mode}")
        caps: list[tuple[str, int]] = []
        if mode.startswith("manual"):
            initially_set = KVM_DIRTY_LOG_INITIALLY_SET if mode.endswith("set") else 0
            manual = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | initially_set
            caps.append(("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", manual))
        if mode.startswith("ring"):
            acq_rel = not self.profile.dirty_ring_tso
            name = "KVM_CAP_DIRTY_LOG_RING_ACQ_REL" if acq_rel else "KVM_CAP_DIRTY_LOG_RING"
            caps.append((name, RING_BYTES))
        if mode == "ring-with-bitmap":
            caps.append(("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", 0))
        for name, arg in caps:
            errno = kvm_vm_ioctl_enable_cap(self.kvm, CAPABILITIES[name], 0, (arg,))
            self._judge(self.memslots.on_enable_cap(name, 0, (arg,), errno))
        for vcpu_id in VCPUS:
            errno = kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id)
            self.memslots.on_create_vcpu(vcpu_id, errno)
        flags = KVM_MEM_LOG_DIRTY_PAGES if logged else 0
        region = MemoryRegion(0, flags, GPAS[0][0], SLOT_PAGES * PAGE, self.base)
        errno = run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))
        self._judge(self.memslots.on_set_memory_region(region, 1, None, errno))
        self.dirty.on_memslots_changed()

    # -- preconditions --------------------------------------------------------------------------

    def can_start(self) -> bool:
        """Whether another actor may start (:data:`MAX_IN_FLIGHT`)."""
        return len(self.scheduler.actors) < MAX_IN_FLIGHT

    def can_step(self) -> bool:
        return bool(self.scheduler.runnable())

    def can_get_dirty_log(self) -> bool:
        return self.can_start() and self.kvm.use_dirty_bitmap()

    def can_clear_dirty_log(self) -> bool:
        return self.can_get_dirty_log() and bool(self.memslots.manual_protect)

    def can_harvest_ring(self) -> bool:
        return bool(self.kvm.dirty_ring_size) and not self._in_flight("reset")

    def can_reset_dirty_rings(self) -> bool:
        return self.can_start() and bool(self.kvm.dirty_ring_size)

    def can_save_its_tables(self) -> bool:
        return self.profile.arch == "arm64"

    def can_remap(self) -> bool:
        """mprotect and munmap wait for no MADV_DONTNEED to be in flight."""
        return not self.zapping

    def resolved(self) -> list[int]:
        """Host pages whose pfn an in-flight fault has resolved and not yet installed (what
        :meth:`drop_a_page_under_a_fault` takes)."""
        return sorted(
            hva
            for name, hva in self.faulting.items()
            if "pfn resolved" in getattr(self.scheduler.actors[name].pending, "point", "")
            and self.memory.prot_at(hva) == PROT_READ | PROT_WRITE
        )

    # -- helpers ------------------------------------------------------------------------------

    def _judge(self, found: Iterable[object]) -> None:
        self.violations.extend(map(str, found))

    def _in_flight(self, kind: str) -> bool:
        return any(name.startswith(kind) for name in self.scheduler.actors)

    def _name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}#{self.counter}"

    def _sync_invalidations(self) -> None:
        """The harness is the host: it knows which of its invalidations are open."""
        self.memory.invalidating = list(self.host.invalidating)

    def _sync_updates(self) -> None:
        """The gpa ranges memslot updates in flight may change: each one's new place, and
        where its slot is now as the VMM knows it (an earlier update may still be running,
        so that is recomputed whenever one ends)."""
        ranges = []
        for region in self.updating.values():
            ranges.append((region.guest_phys_addr, region.guest_phys_addr + region.memory_size))
            old = self.memslots.slots.get((0, region.id))
            if old is not None:
                ranges.append((old.base_gfn * PAGE, (old.base_gfn + old.npages) * PAGE))
        self.memory.updating = ranges

    def _hva_of(self, gpa: int) -> int | None:
        for (_as_id, _slot_id), view in self.memslots.slots.items():
            if view.base_gfn * PAGE <= gpa < (view.base_gfn + view.npages) * PAGE:
                return view.userspace_addr + gpa - view.base_gfn * PAGE
        return None

    # -- memslot updates and faults as actors ---------------------------------------------------

    def start_memslot_update(self, slot_id: int, where: int, action: int) -> None:
        """CREATE or MOVE (to the slot's place ``where``, 0 or 1) with ``action`` 0, DELETE
        with 1, or the same with dirty logging on with 2."""
        gpa = GPAS[slot_id][where]
        flags = 0
        if action == 1:
            size = 0  # delete
        else:
            size = SLOT_PAGES * PAGE
            flags = KVM_MEM_LOG_DIRTY_PAGES if action == 2 else 0
        region = MemoryRegion(slot_id, flags, gpa, size, self.base + HOST_OFFSET[slot_id])
        self._start_memslot_update(region)

    def start_toggle_logging(self, slot_id: int) -> None:
        """Switch dirty logging on or off for a slot where it is (a flags-only change: how a
        VMM starts and ends a live migration); nothing if the slot does not exist."""
        view = self.memslots.slots.get((0, slot_id))
        if view is None:
            return
        flags = view.flags ^ KVM_MEM_LOG_DIRTY_PAGES
        gpa, size = view.base_gfn * PAGE, view.npages * PAGE
        self._start_memslot_update(MemoryRegion(slot_id, flags, gpa, size, view.userspace_addr))

    def _start_memslot_update(self, region: MemoryRegion) -> None:
        slot_id = region.id
        name = self._name("memslot")
        self.log(f"{name}: start set_user_memory_region {region}")
        self.updating[name] = region
        self.dirty.on_memslot_update_start((0, slot_id), region.memory_size // PAGE, region.flags)
        self.aging.on_memslot_update_start()

        def done(errno: int) -> None:
            # Updates hold slots_lock, so they finish in the order they took effect.
            del self.updating[name]
            old = self.memslots.slots.get((0, slot_id))
            self._judge(self.memslots.on_set_memory_region(region, 1, None, errno))
            new = self.memslots.slots.get((0, slot_id))
            moved = old is not None and (new is None or new.base_gfn != old.base_gfn)
            self.aging.on_memslot_update_end(zapped=bool(errno) or moved)  # DELETE, MOVE zap
            if errno:
                return
            self.dirty.on_memslots_changed()
            self._sync_updates()

        op = kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1)
        self.scheduler.start(name, op, done)
        self._sync_updates()

    def start_fault(self, slot_id: int, page: int, write: bool, vcpu_id: int) -> None:
        """A vCPU's fault at ``page`` of the slot's first place."""
        gpa = GPAS[slot_id][0] + page * PAGE
        name = self._name("fault")
        self.log(f"{name}: start vcpu {vcpu_id} {'write' if write else 'read'} fault at {gpa:#x}")
        op = kvm_page_fault(self.kvm, self.host, 0, gpa, write, self.kvm.vcpus[vcpu_id])
        self.faulting[name] = self.base + HOST_OFFSET[slot_id] + page * PAGE

        def done(outcome: Fault) -> None:
            self.log(f"{name} -> {outcome}")
            self.faulting.pop(name, None)

        self.scheduler.start(name, op, done)

    def step_actor(self, name: str) -> None:
        """Let the runnable actor ``name`` run to its next yield."""
        self.scheduler.step(name)
        self.log(self.scheduler.schedule[-1])
        self._sync_invalidations()

    def finish_actor(self, name: str) -> None:
        """Run the runnable actor ``name`` until it is done or waits (reaching deeper states
        in fewer actions)."""
        while name in self.scheduler.runnable():
            self.step_actor(name)

    # -- dirty logging ------------------------------------------------------------------------

    def start_get_dirty_log(self, slot_id: int) -> None:
        name = self._name("get_dirty_log")
        since = self.dirty.now()

        def done(result: tuple[int, list[int]]) -> None:
            errno, bitmap = result
            self.log(f"{name} -> {errno} {[hex(word) for word in bitmap]}")
            self._judge(self.memslots.on_get_dirty_log(slot_id, errno, bitmap))
            if not errno:
                self._judge(self.dirty.on_get_dirty_log(slot_id, bitmap, since))

        self.scheduler.start(name, kvm_get_dirty_log_protect(self.kvm, slot_id), done)

    def start_clear_dirty_log(self, slot_id: int, mask: int) -> None:
        """KVM_CLEAR_DIRTY_LOG of the slot's pages whose bits ``mask`` sets."""
        name = self._name("clear_dirty_log")
        self.log(f"{name}: slot {slot_id} mask {mask:#x}")

        def done(errno: int) -> None:
            self._judge(self.memslots.on_clear_dirty_log(slot_id, 0, SLOT_PAGES, errno))
            if not errno:
                self.dirty.on_clear_dirty_log(slot_id, 0, SLOT_PAGES, [mask])

        op = kvm_clear_dirty_log_protect(self.kvm, slot_id, 0, SLOT_PAGES, [mask])
        self.scheduler.start(name, op, done)

    def harvest_ring(self, vcpu_id: int) -> None:
        """The VMM collects the vCPU's dirty-ring entries."""
        ring = self.kvm.vcpus[vcpu_id].dirty_ring
        assert ring is not None
        entries = [(entry.slot, entry.offset) for entry in ring.harvest()]
        self.log(f"harvest vcpu {vcpu_id}: {entries}")
        self._judge(self.dirty.on_harvest_ring(vcpu_id, entries))

    def start_reset_dirty_rings(self) -> None:
        name = self._name("reset_dirty_rings")

        def done(result: tuple[int, int]) -> None:
            errno, cleared = result
            self._judge(self.memslots.on_reset_dirty_rings(errno))
            if not errno:
                settled = not self._in_flight("reset")  # (this actor has left the list)
                self._judge(self.dirty.on_reset_dirty_rings(cleared, settled))

        self.scheduler.start(name, kvm_vm_ioctl_reset_dirty_pages(self.kvm), done)

    def save_its_tables(self, slot_id: int, page: int) -> None:
        """arm64: KVM writes the vgic ITS tables into guest RAM with no vCPU running
        (skipped where an update or a zap in flight makes the target page undetermined)."""
        gpa = GPAS[slot_id][0] + page * PAGE
        if self.memory.in_update(gpa) or self._hva_of(gpa) in self.zapping.values():
            return
        errno = vgic_its_save_tables(self.kvm, self.host, [(gpa, b"\x17")])
        self.log(f"ITS save to {gpa:#x} -> {errno}")
        if not errno:
            hva = self._hva_of(gpa)
            assert hva is not None
            self.memory.on_host_write(hva, 0x17)
            self.aging.on_host_access(hva)
            self.dirty.on_guest_store(gpa, None, completed=True)

    # -- the host -----------------------------------------------------------------------------

    def host_write(self, page: int, value: int) -> None:
        """The VMM writes ``value`` (1 to 255) to offset 0 of one of its pages."""
        hva = self.base + page * PAGE
        if hva in self.zapping.values():
            return  # the zap in flight would race the write: which wins is not specified
        errno = self.host.host_write(hva, bytes([value]))
        if errno:
            return  # not mapped, or not writable: the VMM's own EFAULT
        self.memory.on_host_write(hva, value)
        self.aging.on_host_access(hva)

    def start_madvise_dontneed(self, page: int) -> None:
        """MADV_DONTNEED as an actor: its notifier start and end are separate steps, so
        faults and memslot updates run while the invalidation is open."""
        hva = self.base + page * PAGE
        if self.memory.prot_at(hva) is None:
            return
        name = self._name("madvise")
        self.log(f"{name}: start MADV_DONTNEED of host page {page}")
        self.memory.on_host_drop(hva, hva + PAGE)
        self.aging.on_host_drop(hva, hva + PAGE)
        self.zapping[name] = hva

        def done(errno: int) -> None:
            assert errno == 0
            self.zapping.pop(name, None)

        self.scheduler.start(name, self.host.madvise_dontneed_op(hva, PAGE), done)
        self._sync_invalidations()

    def drop_a_page_under_a_fault(self, hva: int) -> None:
        """The race the retry check exists for: the host takes away the very page an
        in-flight fault has resolved (one of :meth:`resolved`): MADV_DONTNEED, then the VMM
        writes a new page."""
        if hva in self.zapping.values():
            return
        assert self.host.madvise_dontneed(hva, PAGE) == 0
        self.memory.on_host_drop(hva, hva + PAGE)
        self.aging.on_host_drop(hva, hva + PAGE)
        assert self.host.host_write(hva, b"\x5a") == 0
        self.memory.on_host_write(hva, 0x5A)
        self.aging.on_host_access(hva)

    def mprotect(self, page: int, prot: int) -> None:
        """One host page becomes ``prot`` (a key of :data:`PROT_NAMES`)."""
        hva = self.base + page * PAGE
        errno = self.host.mprotect(hva, PAGE, prot)
        self.log(f"mprotect host page {page} {PROT_NAMES[prot]} -> {errno}")
        if not errno:
            self.memory.on_host_map(hva, hva + PAGE, prot)
            self.aging.on_invalidate(hva, hva + PAGE)

    def munmap(self, page: int) -> None:
        hva = self.base + page * PAGE
        assert self.host.munmap(hva, PAGE) == 0  # unmapping a hole is not an error
        self.memory.on_host_unmap(hva, hva + PAGE)
        self.aging.on_host_drop(hva, hva + PAGE)

    def migrate(self, page: int) -> None:
        hva = self.base + page * PAGE
        errno = self.host.migrate_page(hva)
        # A fault between resolving the page and releasing it holds a reference, and a
        # page with extra references cannot move (it is retried later).
        assert errno == 0 or (errno == EBUSY and hva in self.faulting.values()), errno
        if not errno:
            self.aging.on_invalidate(hva, hva + PAGE)

    def age(self, page: int, flush: bool) -> None:
        hva = self.base + page * PAGE
        before = translation_snapshot(self.mmu)
        young = self.host.age(hva, flush)
        self._judge(check_aging_keeps_translations(before, translation_snapshot(self.mmu)))
        self._judge(self.aging.on_age(hva, flush, young))

    def reclaim(self, page: int) -> None:
        """Reclaim picks one host page. It ages it first, as an aging with a flush: a used
        page is kept (REFERENCED), and the aging contract judges the answer either way. An
        idle one is swapped out under a CLEAR invalidation (KVM drops its translations)
        unless a fault in flight holds it (then it stays in the swap cache); the next
        access brings the same contents back."""
        hva = self.base + page * PAGE
        before = translation_snapshot(self.mmu)
        outcome = self.host.reclaim(hva)
        self.log(f"reclaim host page {page} -> {outcome.value}")
        if outcome is Reclaim.SKIPPED:
            return  # nothing mapped, or the zero page: nothing was asked
        young = outcome is Reclaim.REFERENCED
        if young:
            self._judge(check_aging_keeps_translations(before, translation_snapshot(self.mmu)))
        self._judge(self.aging.on_age(hva, True, young))
        if not young:
            self.aging.on_invalidate(hva, hva + PAGE)

    # -- the guest ----------------------------------------------------------------------------

    def guest_access(self, slot_id: int, where: int, page: int, value: int, vcpu_id: int) -> None:
        """A store of ``value`` (0 means a load) at offset 0 of a page; a load must return
        the last value stored there through any path (coherence)."""
        gpa = GPAS[slot_id][where] + page * PAGE
        data = bytes([value]) if value else None
        hva = self._hva_of(gpa)
        zapping = hva is not None and hva - hva % PAGE in self.zapping.values()
        if data and (self.memory.in_update(gpa) or zapping):
            return  # which page such a store reaches is not determined (see the contract)
        ring = self.kvm.vcpus[vcpu_id].dirty_ring
        was_soft_full = ring is not None and ring.soft_full()
        outcome, read = guest_access(self.kvm, self.host, vcpu_id, gpa, data)
        self.log(f"vcpu {vcpu_id} {'store' if data else 'load'} {gpa:#x} -> {outcome} {read!r}")
        completed = outcome is Fault.MAPPED
        self._judge(check_ring_full_keeps_vcpu_out(vcpu_id, was_soft_full, completed))
        if data:
            self._judge(self.memory.on_guest_store(gpa, value, outcome.value))
            self.dirty.on_guest_store(gpa, vcpu_id, completed)
        else:
            self._judge(self.memory.on_guest_load(gpa, outcome.value, read[0] if read else None))
        if completed and hva is not None:
            self.aging.on_guest_access(hva)

    # -- the rules, after every action ----------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`~kvmspec.fuzz.scheduler.DeadlockFound` if actors are in flight and
        none can run, else :class:`RulesBroken` if the actions so far broke a rule."""
        self.checks += 1
        self.scheduler.check_progress()
        if self.violations:
            raise RulesBroken(self.violations)
        found = check_open_invalidations(self.kvm, self.mmu, self.host)
        found += check_rings_and_bitmaps(self.kvm)
        if not self._in_flight("memslot"):
            # Logging that is being switched on protects the slot at commit, after the new
            # slot is published: writes in between are covered by the VMM's first full copy
            # (it cannot harvest before the ioctl returns), so D1 holds from the return on.
            found += check_writable_translations_logged(self.kvm, self.mmu)
            found += self.monitor.check()
            found += check_translations_match_host(self.kvm, self.mmu, self.host)
            found += check_writable_pages_dirty(self.mmu, self.host)
        if found:
            raise RulesBroken([str(violation) for violation in found])
