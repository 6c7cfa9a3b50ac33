"""Black-box contracts of the memslot and dirty-log uAPI, for judging any implementation.

:class:`MemslotUapiContract` sees only what a VMM sees: the requests it made and the answers
it got. From the requests that succeeded it keeps the VMM's own view of the VM (which slots
exist, which guest_memfd ranges are bound, which capabilities are on), and it predicts each
answer with the same pure rules the reference executes (:mod:`kvmspec.spec.uapi`). It imports
nothing from the reference, so it can judge the real kernel or another implementation alone.

Each ``on_*`` method takes a request and the observed errno and returns the violations (empty
when the answer is the one the rules give). Where the kernel is deliberately loose, the
contract says so instead of being silently weak: dirty-bitmap *contents* are not predicted
here (over-reporting is allowed); only their length and the absence of bits past the slot.

The contract's view follows the answers it predicted. After the first divergence it may be
wrong about the VM (the target did something else), so only the first violation of a run is
meaningful; the harness stops there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from errno import EEXIST, EINVAL

from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.capability_rules import check_extension_answer
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    U32_MAX,
    errno_name,
)
from kvmspec.spec.uapi.dirty_log_rules import (
    clear_dirty_log_errno,
    dirty_bitmap_words,
    enable_dirty_log_ring_errno,
    enable_dirty_ring_with_bitmap_errno,
    enable_manual_dirty_log_protect_errno,
    get_dirty_log_errno,
    uses_dirty_bitmap,
)
from kvmspec.spec.uapi.guest_memfd_rules import (
    GmemFileView,
    kvm_gmem_bind_errno,
    kvm_gmem_create_errno,
)
from kvmspec.spec.uapi.memslot_rules import (
    MemoryRegion,
    MrChange,
    SlotRecord,
    decide_set_memory_region,
    kvm_arch_prepare_memory_region_errno,
)
from kvmspec.spec.uapi.vm_ioctl_rules import set_nr_mmu_pages_errno


@dataclass
class GmemState:
    """The VMM's view of one guest_memfd it created: size, and bound page ranges by slot."""

    size: int
    bound: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    def overlaps(self, pgoff: int, npages: int) -> bool:
        return any(
            start < pgoff + npages and pgoff < start + count for start, count in self.bound.values()
        )


@dataclass(frozen=True)
class ContractViolation:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


def _mismatch(rule: str, what: str, expected: int, observed: int) -> list[ContractViolation]:
    if expected == observed:
        return []
    return [
        ContractViolation(
            rule, f"{what}: expected {errno_name(expected)}, observed {errno_name(observed)}"
        )
    ]


class MemslotUapiContract:
    """The memslot and dirty-log rules, checked from outside."""

    def __init__(self, profile: PlatformProfile) -> None:
        self.profile = profile
        self.slots: dict[tuple[int, int], SlotRecord] = {}
        self.slot_gmem: dict[tuple[int, int], str] = {}
        self.gmems: dict[str, GmemState] = {}
        self.nr_memslot_pages = 0
        self.manual_protect = 0
        self.ring_size = 0
        self.ring_with_bitmap = False
        self.vcpus: set[int] = set()

    # -- helpers ------------------------------------------------------------------------------

    def _overlaps(self, as_id: int, slot_id: int, start: int, end: int) -> bool:
        return any(
            key[0] == as_id
            and key[1] != slot_id
            and view.base_gfn < end
            and start < view.base_gfn + view.npages
            for key, view in self.slots.items()
        )

    def _uses_bitmap(self) -> bool:
        return uses_dirty_bitmap(bool(self.ring_size), self.ring_with_bitmap)

    def _logged_npages(self, slot: int) -> int | None:
        view = self.slots.get((slot >> 16, slot & 0xFFFF))
        if view is None or not view.flags & KVM_MEM_LOG_DIRTY_PAGES or not self._uses_bitmap():
            return None
        return view.npages

    # -- the ioctls ---------------------------------------------------------------------------

    def on_set_memory_region(
        self,
        region: MemoryRegion,
        version: int,
        gmem_name: str | None,
        observed: int,
    ) -> list[ContractViolation]:
        """Predict the errno; on success, update the VMM's view. ``gmem_name`` is the name of
        the guest_memfd passed (None: a descriptor that is not open)."""
        key = (region.as_id, region.id)
        verdict = decide_set_memory_region(
            self.profile,
            region,
            version,
            lambda as_id, slot_id: self.slots.get((as_id, slot_id)),
            self._overlaps,
            self.nr_memslot_pages,
        )
        expected = verdict.errno
        gmem = self.gmems.get(gmem_name) if gmem_name is not None else None
        # A DELETE never looks at the guest_memfd descriptor.
        binds = verdict.change not in (None, MrChange.DELETE)
        if not expected and binds and region.flags & KVM_MEM_GUEST_MEMFD:
            pgoff = region.guest_memfd_offset >> self.profile.page_shift
            view = GmemFileView(True, True, gmem.size) if gmem is not None else None
            already = gmem is not None and gmem.overlaps(pgoff, verdict.npages)
            expected = kvm_gmem_bind_errno(
                self.profile, view, region.guest_memfd_offset, verdict.npages, already
            )
        if not expected and verdict.change is not None:
            expected = kvm_arch_prepare_memory_region_errno(
                self.profile, verdict.change, verdict.base_gfn, verdict.npages
            )
        # An EEXIST the rules did not predict breaks the EEXIST contract in particular.
        rule = "C-MEMSLOT-EEXIST" if EEXIST in (observed, expected) else "C-MEMSLOT-ORDER"
        violations = _mismatch(rule, f"set region {region}", expected, observed)
        if observed or expected or verdict.change is None:
            return violations

        # The request succeeded: record what the VMM now knows.
        change = verdict.change
        if change is MrChange.DELETE:
            old = self.slots.pop(key)
            self.nr_memslot_pages -= old.npages
            bound = self.slot_gmem.pop(key, None)
            if bound is not None and bound in self.gmems:
                self.gmems[bound].bound.pop(key, None)
            return violations
        if change is MrChange.CREATE:
            self.nr_memslot_pages += verdict.npages
        self.slots[key] = SlotRecord(
            verdict.base_gfn, verdict.npages, region.flags, region.userspace_addr
        )
        if region.flags & KVM_MEM_GUEST_MEMFD and gmem is not None and gmem_name is not None:
            pgoff = region.guest_memfd_offset >> self.profile.page_shift
            gmem.bound[key] = (pgoff, verdict.npages)
            self.slot_gmem[key] = gmem_name
        return violations

    def on_create_guest_memfd(
        self, name: str, size: int, flags: int, observed: int
    ) -> list[ContractViolation]:
        expected = kvm_gmem_create_errno(self.profile, size, flags)
        if not observed and not expected:
            self.gmems[name] = GmemState(size)
        return _mismatch("C-MEMSLOT-ORDER", f"create_guest_memfd {size:#x}", expected, observed)

    def on_get_dirty_log(
        self, slot: int, observed: int, bitmap: list[int] | None
    ) -> list[ContractViolation]:
        npages = self._logged_npages(slot)
        expected = get_dirty_log_errno(self.profile, self._uses_bitmap(), slot, npages is not None)
        violations = _mismatch("C-DIRTY-API", f"get_dirty_log {slot:#x}", expected, observed)
        if observed or expected or npages is None or bitmap is None:
            return violations
        if len(bitmap) != dirty_bitmap_words(npages):
            violations.append(
                ContractViolation("C-DIRTY-API", f"bitmap of {len(bitmap)} words for {npages}")
            )
        elif npages % 64 and bitmap and bitmap[-1] >> (npages % 64):
            violations.append(ContractViolation("C-DIRTY-API", "a dirty bit beyond npages"))
        return violations

    def on_clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, observed: int
    ) -> list[ContractViolation]:
        expected = clear_dirty_log_errno(
            self.profile,
            self._uses_bitmap(),
            slot,
            self._logged_npages(slot),
            first_page,
            num_pages,
        )
        return _mismatch("C-DIRTY-API", f"clear_dirty_log {slot:#x}", expected, observed)

    def on_enable_cap(
        self, cap: str, flags: int, args: tuple[int, ...], observed: int
    ) -> list[ContractViolation]:
        arg0 = args[0] if args else 0
        rule = "C-DIRTY-API"
        expected: int | None
        apply: Callable[[], None] | None = None
        if cap == "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2":
            expected = enable_manual_dirty_log_protect_errno(self.profile, flags, arg0)

            def apply() -> None:
                self.manual_protect = arg0

        elif cap in ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"):
            rule = "C-DIRTY-RING-ENABLE"
            expected = enable_dirty_log_ring_errno(
                self.profile,
                cap == "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                arg0 & U32_MAX,
                bool(self.ring_size),
                bool(self.vcpus),
            )

            def apply() -> None:
                self.ring_size = arg0 & U32_MAX

        elif cap == "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP":
            rule = "C-DIRTY-RING-ENABLE"
            expected = enable_dirty_ring_with_bitmap_errno(
                self.profile, flags, bool(self.ring_size), bool(self.slots)
            )

            def apply() -> None:
                self.ring_with_bitmap = True

        elif cap not in CAPABILITIES:
            expected = EINVAL
        else:
            expected = None  # capabilities outside the memory subsystem: not judged here
        if expected is None:
            return []
        if not observed and not expected and apply is not None:
            apply()
        return _mismatch(rule, f"enable_cap {cap} {list(args)}", expected, observed)

    def on_check_extension(self, cap: str, observed: int) -> list[ContractViolation]:
        """KVM_CHECK_EXTENSION answers what the platform supports (C-CAPABILITIES); it
        changes nothing, so the view stays as it is."""
        expected = check_extension_answer(self.profile, cap)
        if observed == expected:
            return []
        return [
            ContractViolation(
                "C-CAPABILITIES", f"check_extension {cap}: expected {expected}, observed {observed}"
            )
        ]

    def on_set_nr_mmu_pages(self, nr_mmu_pages: int, observed: int) -> list[ContractViolation]:
        """KVM_SET_NR_MMU_PAGES accepts a shadow-page limit of 64 or more on x86 and refuses
        a smaller one (X12); elsewhere it is an ioctl the architecture does not know. The
        limit is not part of the memslot view: nothing here reads it back."""
        expected = set_nr_mmu_pages_errno(self.profile, nr_mmu_pages)
        return _mismatch("X12", f"set_nr_mmu_pages {nr_mmu_pages}", expected, observed)

    def on_create_vcpu(self, vcpu_id: int, observed: int) -> None:
        """vCPU creation is outside the memory rules; the contract only records that a vCPU
        exists, which forbids enabling the dirty ring from then on."""
        if not observed:
            self.vcpus.add(vcpu_id)

    def on_reset_dirty_rings(self, observed: int) -> list[ContractViolation]:
        expected = 0 if self.ring_size else EINVAL
        return _mismatch("C-DIRTY-RING-ENABLE", "reset_dirty_rings", expected, observed)
