"""The arm64 harness: one VM on the stage-2 MMU, its host, and every check, driven one action
at a time by whoever picks the actions (the Hypothesis machine of
:mod:`kvmspec.fuzz.arm64_machine`, or a scenario test).

The VM (:class:`Arm64Harness`) has two vCPUs and three slots:

* slot 0 (``THP_SLOT``): 4 MiB of anonymous, THP-capable memory, gpa and hva both 2 MiB
  aligned, so a host huge page may be mapped by a stage-2 block;
* slot 1 (``SHIFTED_SLOT``): 2 MiB of THP-capable memory starting one page into a huge
  page; at its first place the gpa disagrees with the hva modulo 2 MiB, at its second it
  agrees but no whole block fits: a block is never allowed (A4). It moves, is deleted and
  re-created, READONLY or not;
* slot 2 (``DEVICE_SLOT``): four pages of device memory (a VM_PFNMAP mapping): mapped
  execute-never, an instruction fetch there gets an abort (A6), and dirty logging is
  refused;
* slot 3 (``BLOCK_DEVICE_SLOT``): 1 GiB and 4 MiB of device memory, its gpa, hva and
  physical address all 1 GiB aligned, so that a fault maps a 1 GiB block in its first
  gigabyte and 2 MiB blocks after it (see :mod:`kvmspec.fuzz.arm64_blocks`). Only its own
  action touches it.

Actions: guest loads, stores, instruction fetches and stage-1 walk reads; accesses with no
slot or beyond the IPA space; host writes, MADV_DONTNEED, mprotect, munmap, THP collapse
and split (each a notifier invalidation); dirty logging switched on and off, harvested, and
cleared (manual protection, the bitmap starting clear or all set); a THP frame mapped with
pages while logging, then, logging stopped, by a block over their table; accesses to the
block-sized device memory; aging (clear_young,
clear_flush_young, test_young through the notifier); a fault racing an MADV_DONTNEED of its
page (the notifier retry check); two faults, the hardware and the lockless ager stepped in a
drawn order; and the VMM exiting (the notifier's release, ``kvm_arch_flush_shadow_all``),
after which a new VM starts.

:meth:`Arm64Harness.check`, after every action, raises
:class:`~kvmspec.fuzz.generic_harness.RulesBroken` with every rule broken:

* the stage-2 checks of :func:`~kvmspec.spec.invariants.arm64.check_stage2` (A1, A3, A4's
  alignment, A6, S001-NO-LOST-UPDATE, S001-RCU-TABLES, the library's WARNs), told which
  stretches of the record :meth:`Arm64Harness.interleave` ran walkers at once in;
* the memslot :class:`~kvmspec.spec.invariants.memslots.InvariantMonitor`;
* the stage 2 against the memslots and the host (:func:`check_stage2_translations`: M13,
  A4's memslot half, N4, D1, stale TLB entries);
* what the VMM can observe: an access completes or exits exactly as the slots and the host
  say (C-MMIO, C-EFAULT), a load returns what the host holds and a store reaches it
  (C-COHERENCE), every completed store to a logged slot is in the next harvest
  (C-DIRTY-COMPLETE), aging changes no translation (N7) and finds every page used since
  its last aging young (C-AGING, loose where the kernel drops access flags), and after the
  release no translation survives (S001-FLUSH-ALL);
* a fault on the block-sized device memory maps the largest leaf the VMA and the slot
  allow (A4, :func:`~kvmspec.spec.invariants.arm64.device_block_size`).

The class keeps one method per action (the decoders call them by name); the bodies of some
live with their concept: :mod:`kvmspec.fuzz.arm64_blocks` the block mappings the ordinary
actions rarely line up, :mod:`kvmspec.fuzz.arm64_interleave` the walkers and the hardware
stepped at once.

A harness may be told to let known kernel findings pass (``tolerated``): the machine and the
fuzzer let :data:`KNOWN_KERNEL_FINDINGS` pass, so that they look for new problems; a harness
built by a test reports everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EINVAL

from kvmspec.fuzz import arm64_blocks, arm64_interleave
from kvmspec.fuzz.generic_harness import Log, RulesBroken
from kvmspec.reference import kvm_main
from kvmspec.reference.arm64.fault import (
    AbortOutcome,
    Arm64Access,
    GuestAbort,
    guest_access,
    kvm_handle_guest_abort,
)
from kvmspec.reference.arm64.hw_access import guest_access as hw_guest_access
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.arm64.pgtable import EMPTY_MEMCACHE
from kvmspec.reference.arm64.s2_mmu import Stage2Features
from kvmspec.reference.capabilities import kvm_vm_ioctl_enable_cap
from kvmspec.reference.concurrency import Preempt, run_to_completion
from kvmspec.reference.dirty_log import kvm_clear_dirty_log_protect, kvm_get_dirty_log_protect
from kvmspec.reference.host import LEVEL_PMD, PROT_READ, PROT_WRITE, Device, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.spec.aging_contract import AgingContract
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.arm64 import (
    Leaf,
    Stage2Readers,
    check_stage2,
    check_stage2_translations,
    stage2_leaves,
    writable,
)
from kvmspec.spec.invariants.memslots import InvariantMonitor
from kvmspec.spec.platforms import ARM64, PlatformProfile
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
)
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
HPAGE = 512 * PAGE
RW = PROT_READ | PROT_WRITE
FLUSH_ALL = "S001-FLUSH-ALL"
"""Seed 001's "kvm_arch_flush_shadow_all emptied": after the notifier's release no stage-2
translation of guest memory may survive (the host frees every page next)."""

THP_SLOT, SHIFTED_SLOT, DEVICE_SLOT, BLOCK_DEVICE_SLOT = 0, 1, 2, 3
SLOT_IDS = (THP_SLOT, SHIFTED_SLOT, DEVICE_SLOT)
"""The slots every action may touch (slot 3 has its own action)."""
GPAGE = 512 * HPAGE
SLOT_PAGES = {
    THP_SLOT: 1024,
    SHIFTED_SLOT: 512,
    DEVICE_SLOT: 4,
    BLOCK_DEVICE_SLOT: (GPAGE + 2 * HPAGE) // PAGE,
}
THP_GPA = 0x4000_0000
SHIFTED_GPAS = (0x8000_0000, 0x9000_1000)
"""Slot 1's two places: its hva is one page past a 2 MiB boundary, so the first gpa is
incongruent with it and the second congruent, but with no whole 2 MiB block inside."""
DEVICE_GPA = 0xC000_0000
BLOCK_DEVICE_GPA = 0x1_0000_0000
DEVICE_SLOTS = (DEVICE_SLOT, BLOCK_DEVICE_SLOT)
BLOCK_DEVICE_PAGES = (0, 1, 512, GPAGE // PAGE - 1, GPAGE // PAGE, GPAGE // PAGE + 513)
"""Pages of slot 3 its action picks from: in its first gigabyte (a 1 GiB block), and after
it (2 MiB blocks: the slot ends 4 MiB later)."""
HOLE_GPA = 0xA000_0000
UNBACKED = {"hole": HOLE_GPA, "beyond_ipa": (1 << 40) + PAGE, "beyond_pa": 1 << 48}
"""IPAs no slot holds: a hole, one beyond the VM's 40-bit IPA space, one beyond PARange."""

VCPUS = (0, 1)
BOOLS = (False, True)
PAGES = (0, 1, 2, 510, 511, 512, 1023)
"""Page indexes the actions pick from (taken modulo the slot's size)."""
OFFSETS = (0, 8, PAGE - 8)
BYTES = tuple(range(1, 256))
KINDS = ("load", "store", "fetch", "s1ptw")
READ_KINDS = ("load", "fetch", "s1ptw")
PROTS = (0, PROT_READ, RW)
SHIFTED_PLACES: tuple[int | None, ...] = (0, 1, None)
FRAMES = (0, 1)
DONTNEED_PAGES = (1, 2, 512)
DIRTY_MODES = ("bitmap", "manual", "manual-initially-set")
"""KVM_GET_DIRTY_LOG get-and-clear, or manual protection (KVM_CLEAR_DIRTY_LOG), with the
bitmap starting clear or all set."""
MANUAL_CAPS = {
    "manual": KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "manual-initially-set": KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
}
CLEAR_WORDS = (0, 1, 7, 8, 15)
CLEAR_MASKS = ((1 << 64) - 1, 1, 0b1110_0000, 1 << 63)
ORDER_STEPS = tuple(range(4))
"""Who runs next in :meth:`Arm64Harness.interleave` (modulo the actors left)."""


KNOWN_KERNEL_FINDINGS = (f"A8: WARN: {EMPTY_MEMCACHE.partition(': ')[2]}",)
"""Kernel behaviour the checks report and a fuzzing run lets pass: an execution permission
fault on a write-protected block of a dirty-logged slot takes a table page from the vCPU's
memory cache without filling it first (tests/test_arm64_memcache.py shows it)."""

NOMINAL_GPA = {
    THP_SLOT: THP_GPA,
    SHIFTED_SLOT: SHIFTED_GPAS[0],
    DEVICE_SLOT: DEVICE_GPA,
    BLOCK_DEVICE_SLOT: BLOCK_DEVICE_GPA,
}


def _ignore(line: str) -> None:
    """The default log: say nothing."""


@dataclass(slots=True)
class SlotView:
    """What the VMM set up for one slot."""

    base_gfn: int
    npages: int
    flags: int
    hva: int

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)


class Arm64Harness:
    """One VM on the arm64 stage-2 MMU with the VMM's memory (see the module's docstring).
    ``mmu_class`` picks the MMU (:class:`Arm64Mmu`, seed 001's lockless ager, or a test's
    planted bug); ``features`` the CPU's stage-2 features; ``split_chunk_size`` the eager
    split chunk (0: none); ``dirty_mode`` one of :data:`DIRTY_MODES`."""

    def __init__(
        self,
        profile: PlatformProfile = ARM64,
        mmu_class: type[Arm64Mmu] = Arm64Mmu,
        features: Stage2Features | None = None,
        split_chunk_size: int = 0,
        dirty_mode: str = "bitmap",
        log: Log = _ignore,
        tolerated: tuple[str, ...] = (),
    ) -> None:
        if profile.arch != "arm64":
            raise ValueError(f"profile {profile.name}: the arm64 harness needs arm64")
        self.profile = profile
        self.mmu_class = mmu_class
        self.features = features or Stage2Features()
        self.split_chunk_size = split_chunk_size
        self.dirty_mode = dirty_mode
        self.log = log
        self.tolerated = tolerated
        self.found: list[str] = []
        self.checks = 0
        self.vms = 0
        self._start_vm()

    # -- set-up -------------------------------------------------------------------------------

    def _start_vm(self) -> None:
        """A fresh VMM process: its address space, a VM with two vCPUs, the three slots."""
        self.vms += 1
        self.host = HostMm(PAGE, self.profile.user_address_limit)
        self.mmu = self.mmu_class(self.profile, self.host, self.features, self.split_chunk_size)
        self.kvm = Kvm(self.profile, self.mmu)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        self.monitor = InvariantMonitor(self.kvm)
        self.aging = AgingContract(PAGE)
        # The leaves at the last look, by IPA: (size, hva). A leaf gone since took its access
        # flag with it, which the aging contract forgives (see note_dropped_translations).
        self.seen: dict[int, tuple[int, int]] = {}
        if self.dirty_mode != "bitmap":
            manual = MANUAL_CAPS[self.dirty_mode]
            cap = CAPABILITIES["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"]
            assert kvm_vm_ioctl_enable_cap(self.kvm, cap, 0, (manual,)) == 0
        _, self.thp_hva = self.host.mmap(2 * HPAGE, RW, hugepage=True)
        _, shifted = self.host.mmap(2 * HPAGE, RW, hugepage=True)
        self.shifted_hva = shifted + PAGE
        self.hvas = {THP_SLOT: self.thp_hva, SHIFTED_SLOT: self.shifted_hva}
        device = self.host.memory.add_device("bar0", SLOT_PAGES[DEVICE_SLOT] * PAGE)
        _, self.hvas[DEVICE_SLOT] = self.host.mmap(SLOT_PAGES[DEVICE_SLOT] * PAGE, RW, device)
        size = SLOT_PAGES[BLOCK_DEVICE_SLOT] * PAGE
        self.hvas[BLOCK_DEVICE_SLOT] = arm64_blocks.mmap_aligned_device(self.host, size, GPAGE)
        # The stretches of the record where walkers ran at once ([first event, end)).
        self.concurrent: list[tuple[int, int]] = []
        assert self.mmu.pgt is not None
        self.readers = Stage2Readers(self.mmu.pgt)
        for vcpu_id in VCPUS:
            assert kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id) == 0
        self.views: dict[int, SlotView] = {}
        # Per slot, since logging started: pages stored to since their bit was last
        # harvested or cleared, and pages whose bit userspace cleared.
        self.dirtied: dict[int, set[int]] = {slot_id: set() for slot_id in SLOT_IDS}
        self.cleared: dict[int, set[int]] = {slot_id: set() for slot_id in SLOT_IDS}
        for slot_id, hva in self.hvas.items():
            gpa = NOMINAL_GPA[slot_id]
            assert self.set_region(slot_id, 0, gpa, SLOT_PAGES[slot_id], hva) == 0

    def set_region(self, slot_id: int, flags: int, gpa: int, npages: int, hva: int) -> int:
        """KVM_SET_USER_MEMORY_REGION; the VMM's view follows a successful call."""
        region = MemoryRegion(slot_id, flags, gpa, npages * PAGE, hva)
        errno = run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))
        self.log(f"set slot {slot_id} flags {flags:#x} gpa {gpa:#x} pages {npages} -> {errno}")
        if errno == 0:
            old = self.views.get(slot_id)
            still_logging = old is not None and old.logging and flags & KVM_MEM_LOG_DIRTY_PAGES
            if not (npages and still_logging):  # the bitmap is new, or gone
                self.dirtied.setdefault(slot_id, set()).clear()
                self.cleared.setdefault(slot_id, set()).clear()
            if npages:
                self.views[slot_id] = SlotView(gpa // PAGE, npages, flags, hva)
            else:
                self.views.pop(slot_id, None)
        return errno

    # -- what the VMM expects -----------------------------------------------------------------

    def address(self, slot_id: int, page: int) -> tuple[int, int | None]:
        """(gpa, hva) of a page of the slot as the VMM placed it (its first place, and no
        hva, when the slot is deleted)."""
        page %= SLOT_PAGES[slot_id]
        view = self.views.get(slot_id)
        if view is None:
            return NOMINAL_GPA[slot_id] + page * PAGE, None
        return (view.base_gfn + page) * PAGE, view.hva + page * PAGE

    def expected(self, slot_id: int, hva: int | None, kind: str) -> AbortOutcome | None:
        """How an access of ``kind`` must end (None: it completes)."""
        if hva is None:
            return {
                "fetch": AbortOutcome.INJECT_PABT,
                "s1ptw": AbortOutcome.INJECT_DABT,
            }.get(kind, AbortOutcome.MMIO)
        if kind == "store" and self.views[slot_id].readonly:
            return AbortOutcome.MMIO
        vma = self.host.find_vma(hva)
        need = PROT_WRITE if kind == "store" else PROT_READ
        if vma is None or not vma.prot & need:
            return AbortOutcome.EFAULT
        if kind == "fetch" and slot_id in DEVICE_SLOTS:
            return AbortOutcome.INJECT_PABT
        return None

    def host_holds(self, hva: int, size: int) -> bytes:
        """What the VMM would read at ``hva``, without touching it."""
        pte = self.host.lookup(hva)
        if pte is not None:
            return self.host.memory.read(pte.pfn, hva % PAGE, size)
        vma = self.host.find_vma(hva)
        if vma is not None and isinstance(vma.backing, Device):  # its PTE comes on first touch
            pfn = vma.backing.first_pfn + vma.index(hva, PAGE)
            return self.host.memory.read(pfn, hva % PAGE, size)
        return bytes(size)

    def _expect(self, rule: str, holds: bool, what: str) -> None:
        if not holds:
            self.found.append(f"{rule}: {what}")

    def _judge(self, kind: str, access: Arm64Access, want: AbortOutcome | None) -> None:
        self._expect(
            "C-EFAULT" if AbortOutcome.EFAULT in (want, access.outcome) else "C-MMIO",
            access.outcome == want,
            f"{kind} ended {access.outcome}, expected {want}",
        )

    # -- the guest ----------------------------------------------------------------------------

    def access(self, vcpu: int, gpa: int, kind: str, data: bytes = b"") -> Arm64Access:
        return guest_access(self.kvm, self.mmu, self.host, vcpu, gpa, kind, data)

    def guest_read(self, vcpu: int, slot_id: int, page: int, offset: int, kind: str) -> None:
        """An 8-byte load, instruction fetch or stage-1 walk read (``kind``)."""
        gpa, hva = self.address(slot_id, page)
        access = self.access(vcpu, gpa + offset, kind)
        self.log(f"vcpu {vcpu} {kind} {gpa + offset:#x} -> {access}")
        want = self.expected(slot_id, hva, kind)
        self._judge(kind, access, want)
        if access.done and want is None and hva is not None:
            self.aging.on_guest_access(hva)
            held = self.host_holds(hva + offset, 8)
            self._expect(
                "C-COHERENCE",
                access.data == held,
                f"{kind} {gpa:#x} read {access.data!r}, the host holds {held!r}",
            )

    def guest_store(self, vcpu: int, slot_id: int, page: int, byte: int) -> None:
        """A one-byte store of ``byte`` at offset ``byte`` of the page."""
        gpa, hva = self.address(slot_id, page)
        access = self.access(vcpu, gpa + byte, "store", bytes([byte]))
        self.log(f"vcpu {vcpu} store {byte} at {gpa + byte:#x} -> {access}")
        want = self.expected(slot_id, hva, "store")
        self._judge("store", access, want)
        if access.done and want is None and hva is not None:
            self.aging.on_guest_access(hva)
            held = self.host_holds(hva + byte, 1)
            self._expect("C-COHERENCE", held == bytes([byte]), f"store to {gpa:#x}: host {held!r}")
            if self.views[slot_id].logging:
                self.dirtied[slot_id].add(page % SLOT_PAGES[slot_id])

    def guest_unbacked(self, vcpu: int, where: str, kind: str) -> None:
        """An access to an IPA no slot holds (:data:`UNBACKED`)."""
        ipa = UNBACKED[where]
        access = self.access(vcpu, ipa, kind, b"\x01" if kind == "store" else b"")
        self.log(f"vcpu {vcpu} {kind} {where} {ipa:#x} -> {access}")
        if where == "beyond_pa":
            want: AbortOutcome | None = AbortOutcome.INJECT_SIZE_FAULT
        elif where == "beyond_ipa":
            want = AbortOutcome.INJECT_PABT if kind == "fetch" else AbortOutcome.INJECT_DABT
        else:
            want = self.expected(SHIFTED_SLOT, None, kind)
        self._judge(kind, access, want)

    # -- the host -----------------------------------------------------------------------------

    def _hva(self, slot_id: int, page: int) -> int | None:
        """The VMM's address of a page of the memory behind a slot (None: no such memory)."""
        base = self.hvas.get(slot_id)
        return None if base is None else base + (page % SLOT_PAGES[slot_id]) * PAGE

    def host_write(self, slot_id: int, page: int, value: int) -> None:
        """The VMM writes ``value`` at the start of one of its pages (EFAULT is its own)."""
        hva = self._hva(slot_id, page)
        if hva is not None and self.host.host_write(hva, bytes([value])) == 0:
            self.aging.on_host_access(hva)

    def madvise_dontneed(self, slot_id: int, page: int, n: int) -> None:
        hva = self._hva(slot_id, page)
        if hva is not None and slot_id != DEVICE_SLOT:
            n = min(n, SLOT_PAGES[slot_id] - page % SLOT_PAGES[slot_id])
            self.host.madvise_dontneed(hva, n * PAGE)
            self.aging.on_host_drop(hva, hva + n * PAGE)

    def mprotect(self, slot_id: int, page: int, prot: int) -> None:
        hva = self._hva(slot_id, page)
        if hva is not None:
            errno = self.host.mprotect(hva, PAGE, prot)
            self.log(f"mprotect slot {slot_id} page {page} {prot} -> {errno}")

    def munmap(self, slot_id: int, page: int) -> None:
        hva = self._hva(slot_id, page)
        if hva is not None:
            assert self.host.munmap(hva, PAGE) == 0
            self.aging.on_host_drop(hva, hva + PAGE)

    def thp(self, slot_id: int, frame: int, collapse: bool) -> None:
        """MADV_COLLAPSE of one 2 MiB frame of a slot's memory, or a split of its PMD."""
        base = self.thp_hva if slot_id == THP_SLOT else self.shifted_hva - PAGE
        haddr = base + frame * HPAGE
        if collapse:
            done = self.host.madvise_collapse(haddr, HPAGE) == 0
        else:
            done = self.host.split_huge_pmd(haddr)
        self.log(f"thp slot {slot_id} frame {frame} collapse {collapse} -> {done}")
        self.aging.on_host_remap(haddr, haddr + HPAGE)

    def age(self, slot_id: int, page: int, how: str) -> None:
        """Aging through the notifier: ``clear_flush_young``, ``clear_young`` or
        ``test_young``. No translation may change (N7); a page the guest or the VMM used
        since its last aging is young (C-AGING: the host ages a huge page as a whole, so
        every page of it is judged by the one answer)."""
        hva = self._hva(slot_id, page)
        if hva is None:
            return
        self.note_dropped_translations()
        before = self._translations()
        if how == "test_young":
            if self.host.notifier is not None:
                self.host.notifier.test_young(hva)
        else:
            huge = self.host.mapping_level(hva) == LEVEL_PMD
            flush = how == "clear_flush_young"
            young = self.host.age(hva, flush=flush)
            start = hva - hva % (HPAGE if huge else PAGE)
            for each in range(start, start + (HPAGE if huge else PAGE), PAGE):
                self.found += [str(v) for v in self.aging.on_age(each, flush, young)]
        after = self._translations()
        self._expect(
            "N7", before == after, f"{how} changed {set(before.items()) ^ set(after.items())}"
        )

    def note_dropped_translations(self, leaves: list[Leaf] | None = None) -> None:
        """Tell the aging contract which translations KVM dropped since the last look (an
        invalidation, a slot's flush, a block replaced by a table on a write fault while
        logging): their access flags went with them, which the kernel accepts. ``leaves``:
        the stage 2's leaves now, when the caller has listed them already."""
        now: dict[int, tuple[int, int]] = {}
        pgt = self.mmu.pgt
        if leaves is None:
            leaves = list(stage2_leaves(pgt)) if pgt is not None else []
        if leaves:
            shift = self.profile.page_shift
            memslots = self.kvm.memslots(0)
            for leaf in leaves:
                slot = memslots.gfn_to_memslot(leaf.ipa >> shift)
                if slot is not None:
                    offset = leaf.ipa - (slot.base_gfn << shift)
                    now[leaf.ipa] = (leaf.size, slot.userspace_addr + offset)
        for ipa, (size, hva) in self.seen.items():
            if now.get(ipa, (0, 0))[0] != size:
                self.aging.on_invalidate(hva, hva + size)
        self.seen = now

    def _translations(self) -> dict[int, tuple[int, int, bool]]:
        if self.mmu.pgt is None:
            return {}
        return {
            leaf.ipa: (leaf.size, leaf.pa, writable(leaf.pte))
            for leaf in stage2_leaves(self.mmu.pgt)
        }

    def race_fault_with_dontneed(self, vcpu: int, slot_id: int, page: int, value: int) -> None:
        """The race the retry check exists for: a load faults on a page, and after its pfn
        is resolved (before mmu_lock) the host drops the page and the VMM writes a new one.
        The fault must not install the old page; the next load reads ``value``."""
        gpa, hva = self.address(slot_id, page)
        if hva is None or slot_id == DEVICE_SLOT or self.expected(slot_id, hva, "store"):
            return
        self.host.madvise_dontneed(hva - hva % PAGE, PAGE)  # so that the load faults
        pgt = self.mmu.pgt
        assert pgt is not None
        walk = run_to_completion(hw_guest_access(pgt, vcpu, gpa, False))
        if walk.fault is None:
            return  # still mapped by a block over a neighbour: nothing to race
        abort = GuestAbort(gpa, walk.fault, walk.level, write=False)
        vcpu_ = self.kvm.vcpus[vcpu]
        op = kvm_handle_guest_abort(self.kvm, self.mmu, self.host, vcpu_, abort)
        raced = False
        try:
            step = next(op)
            while True:
                if isinstance(step, Preempt) and "pfn resolved" in step.point and not raced:
                    raced = True
                    assert self.host.madvise_dontneed(hva - hva % PAGE, PAGE) == 0
                    assert self.host.host_write(hva - hva % PAGE, bytes([value])) == 0
                    self.aging.on_host_drop(hva - hva % PAGE, hva - hva % PAGE + PAGE)
                    self.aging.on_host_access(hva)
                step = op.send(None)
        except StopIteration as done:
            self.log(f"vcpu {vcpu} fault at {gpa:#x} raced (dropped: {raced}) -> {done.value}")
        self.guest_read(vcpu, slot_id, page, 0, "load")

    def interleave(self, order: tuple[int, ...], page: int, other: int, store: bool) -> None:
        """Software walkers and the hardware on the THP slot at once, one step at a time, in
        ``order`` (see :func:`~kvmspec.fuzz.arm64_interleave.interleave`)."""
        arm64_interleave.interleave(self, THP_SLOT, order, page, other, store)

    def collapse_after_logging(self, vcpu: int, frame: int, byte: int) -> None:
        """A fault maps a block over a live table (see
        :func:`~kvmspec.fuzz.arm64_blocks.collapse_after_logging`)."""
        arm64_blocks.collapse_after_logging(self, THP_SLOT, vcpu, frame, byte)

    def device_block_access(self, vcpu: int, page: int, kind: str) -> None:
        """An access of ``kind`` to a page of slot 3, whose fault must map the largest leaf
        allowed (see :func:`~kvmspec.fuzz.arm64_blocks.device_block_access`)."""
        arm64_blocks.device_block_access(self, BLOCK_DEVICE_SLOT, vcpu, page, kind)

    # -- memslots and dirty logging -----------------------------------------------------------

    def place_shifted_slot(self, place: int | None, readonly: bool) -> None:
        """Slot 1 to one of its places (CREATE or MOVE), READONLY or not, or deleted.
        READONLY cannot change on a live slot: the VMM deletes and re-creates it."""
        view = self.views.get(SHIFTED_SLOT)
        if place is None:
            if view is not None:
                assert self.set_region(SHIFTED_SLOT, view.flags, 0, 0, view.hva) == 0
            return
        flags = KVM_MEM_READONLY if readonly else 0
        if view is not None:
            flags |= view.flags & KVM_MEM_LOG_DIRTY_PAGES
            if view.readonly != readonly:
                assert self.set_region(SHIFTED_SLOT, view.flags, 0, 0, view.hva) == 0
        gpa = SHIFTED_GPAS[place]
        errno = self.set_region(
            SHIFTED_SLOT, flags, gpa, SLOT_PAGES[SHIFTED_SLOT], self.shifted_hva
        )
        self._expect("C-MEMSLOT-ORDER", errno == 0, f"placing slot 1 -> errno {errno}")

    def toggle_log(self, slot_id: int) -> None:
        """Dirty logging on or off (a flags-only change); refused while device memory is
        mapped in the slot's range (once the VMA is gone, nothing refuses it)."""
        view = self.views.get(slot_id)
        if view is None:
            return
        flags = view.flags ^ KVM_MEM_LOG_DIRTY_PAGES
        errno = self.set_region(slot_id, flags, view.base_gfn * PAGE, view.npages, view.hva)
        end = view.hva + view.npages * PAGE
        device = any(isinstance(vma.backing, Device) for vma in self.host.vmas_in(view.hva, end))
        want = EINVAL if device and flags & KVM_MEM_LOG_DIRTY_PAGES else 0
        self._expect("C-MEMSLOT-ORDER", errno == want, f"toggle log slot {slot_id} -> {errno}")

    def get_dirty_log(self, slot_id: int) -> None:
        """KVM_GET_DIRTY_LOG: every page the guest stored to since its bit was last
        harvested (or cleared, with manual protection) is set; with INITIALLY_SET, so is
        every page whose bit was never cleared."""
        errno, words = run_to_completion(kvm_get_dirty_log_protect(self.kvm, slot_id))
        self.log(f"get dirty log slot {slot_id} -> {errno} {[hex(w) for w in words]}")
        if errno:
            return
        expected = set(self.dirtied[slot_id])
        if self.dirty_mode == "manual-initially-set":
            expected |= set(range(SLOT_PAGES[slot_id])) - self.cleared[slot_id]
        for page in sorted(expected):
            word = words[page // 64] if page // 64 < len(words) else 0
            if not word >> (page % 64) & 1:
                what = f"slot {slot_id} page {page} is dirty and not in the harvest"
                self.found.append(f"C-DIRTY-COMPLETE: {what}")
                break
        if self.dirty_mode == "bitmap":
            self.dirtied[slot_id].clear()

    def clear_dirty_log(self, slot_id: int, word: int, mask: int) -> None:
        """KVM_CLEAR_DIRTY_LOG of the pages of ``mask`` in 64-page word ``word`` of the slot
        (manual protection only): their bits go, and they are write-protected again."""
        npages = SLOT_PAGES[slot_id]
        first = word * 64 % npages
        if self.dirty_mode == "bitmap":
            return
        op = kvm_clear_dirty_log_protect(self.kvm, slot_id, first, min(64, npages - first), [mask])
        errno = run_to_completion(op)
        self.log(f"clear dirty log slot {slot_id} from {first} mask {mask:#x} -> {errno}")
        if errno == 0:
            pages = {first + bit for bit in range(64) if mask >> bit & 1 and first + bit < npages}
            self.cleared[slot_id] |= pages
            self.dirtied[slot_id] -= pages

    def release(self) -> None:
        """The VMM exits: the notifier's release (kvm_arch_flush_shadow_all), then the host
        frees its address space. No stage-2 translation may be left (the pages it would
        reach are freed); then a new VMM starts a new VM."""
        self.host.exit_mmap()
        pgt = self.mmu.pgt
        if pgt is not None:
            for leaf in stage2_leaves(pgt):
                self.found.append(
                    f"{FLUSH_ALL}: after the release IPA {leaf.ipa:#x} still maps {leaf.pa:#x}"
                )
                break
        self.found += [str(v) for v in self._violations()]
        self._start_vm()

    # -- the rules, after every action ----------------------------------------------------------

    def _violations(self, leaves: list[Leaf] | None = None) -> list[Violation]:
        found = list(self.monitor.check())
        if self.mmu.pgt is not None:
            found += check_stage2(self.mmu.pgt, self.concurrent, self.readers, leaves)
        if self.host.notifier is not None:
            found += check_stage2_translations(self.kvm, self.mmu, self.host, leaves)
        return found

    def check(self) -> None:
        """Raise :class:`RulesBroken` if the actions so far broke a rule."""
        self.checks += 1
        # One listing of the leaves serves the aging bookkeeping and the checks.
        leaves = list(stage2_leaves(self.mmu.pgt)) if self.mmu.pgt is not None else []
        self.note_dropped_translations(leaves)
        found = [
            line
            for line in self.found + [str(v) for v in self._violations(leaves)]
            if not line.startswith(self.tolerated)
        ]
        if found:
            raise RulesBroken(found)
