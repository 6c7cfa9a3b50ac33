"""Block mappings the arm64 harness's ordinary actions rarely line up: two actions of
:class:`~kvmspec.fuzz.arm64_harness.Arm64Harness`, and the device mapping behind slot 3.

* :func:`collapse_after_logging`: a THP frame is mapped with pages while dirty logging is
  on; logging stops; the next fault in the frame maps a 2 MiB block over the live table of
  pages (stage2_map_walk_table_pre), which the walker must then step over rather than
  descend into the table it just unlinked (A3, the walker half:
  :class:`~kvmspec.spec.invariants.arm64.UnlinkedTables`).
* :func:`device_block_access`: a guest access to slot 3, device memory (VM_PFNMAP) whose
  gpa, hva and physical address are all 1 GiB aligned, and whose fault must map exactly
  the leaf :func:`~kvmspec.spec.invariants.arm64.device_block_size` says: a 1 GiB block in
  the slot's first gigabyte, 2 MiB blocks in the 4 MiB after it (A4).

kernel: arch/arm64/kvm/mmu.c:user_mem_abort, get_vma_page_shift;
arch/arm64/kvm/hyp/pgtable.c:stage2_map_walk_table_pre, __kvm_pgtable_visit (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.spec.invariants.arm64 import device_block_size, installed_leaves

if TYPE_CHECKING:
    from kvmspec.fuzz.arm64_harness import Arm64Harness


def mmap_aligned_device(host: HostMm, size: int, align: int) -> int:
    """A new device of at least ``size`` bytes, its physical address ``align``-aligned,
    mapped whole (RW) at an ``align``-aligned address; returns the address. A VMM gets such
    a placement with an over-sized reservation; in the model, whose mmap places each new
    mapping just below the last one, the mapping is sized to end at the current top.

    kernel: drivers/vfio/pci/vfio_pci_core.c:vfio_pci_core_mmap (v6.18)
    """
    memory = host.memory
    pad = -memory.next_device_pfn % (align // host.page_size)
    if pad:
        memory.add_device("alignment", pad * host.page_size)
    start = (host.next_top - size) // align * align
    length = host.next_top - start
    device = memory.add_device("bar2", length)
    errno, hva = host.mmap(length, PROT_READ | PROT_WRITE, device)
    assert errno == 0 and hva == start, f"the device mapping landed at {hva:#x}, not {start:#x}"
    return hva


def collapse_after_logging(
    harness: Arm64Harness, slot_id: int, vcpu: int, frame: int, byte: int
) -> None:
    """The collapse back to a block after dirty logging: the VMM writes the first page of a
    2 MiB frame of the slot (THP-capable memory, gpa and hva congruent) and collapses the
    frame into a THP; with logging on (switched on if it was off) the guest stores to the
    frame's second page and loads its third, which maps them with pages; logging is
    switched off, and a load from the frame's first page maps the whole frame with a
    block, over the table holding those pages."""
    first = frame * harness.host.hpage_nr
    harness.host_write(slot_id, first, byte)
    harness.thp(slot_id, frame, collapse=True)
    if not harness.views[slot_id].logging:
        harness.toggle_log(slot_id)
    harness.guest_store(vcpu, slot_id, first + 1, byte)
    harness.guest_read(vcpu, slot_id, first + 2, 0, "load")
    harness.toggle_log(slot_id)
    harness.guest_read(vcpu, slot_id, first, 0, "load")


def device_block_access(
    harness: Arm64Harness, slot_id: int, vcpu: int, page: int, kind: str
) -> None:
    """An access of ``kind`` to ``page`` of a slot of device memory: it ends as the slot
    and the VMA say (an instruction fetch gets an abort), a load reads what the device
    holds and a store reaches it, and a leaf the access's fault installed has the size
    :func:`device_block_size` gives (A4)."""
    gpa, hva = harness.address(slot_id, page)
    pgt = harness.mmu.pgt
    assert hva is not None and pgt is not None, f"slot {slot_id} lives as long as the VM"
    since = len(pgt.mm_ops.history.events)
    data = bytes([page % 255 + 1]) if kind == "store" else b""
    access = harness.access(vcpu, gpa, kind, data)
    harness.log(f"vcpu {vcpu} {kind} slot {slot_id} page {page} {gpa:#x} -> {access}")
    want = harness.expected(slot_id, hva, kind)
    harness._judge(kind, access, want)
    if not access.done or want is not None:
        return
    held = harness.host_holds(hva, len(data) or 8)
    harness._expect(
        "C-COHERENCE",
        held == data if data else access.data == held,
        f"{kind} {gpa:#x} saw {access.data or data!r}, the device holds {held!r}",
    )
    slot = harness.kvm.memslots(0).gfn_to_memslot(gpa // harness.host.page_size)
    assert slot is not None
    size = device_block_size(harness.host, slot, gpa)
    for installed in installed_leaves(pgt, since, gpa):
        harness._expect(
            "A4",
            installed == size,
            f"a fault at {gpa:#x} on device memory mapped {installed:#x}, the VMA and the "
            f"slot allow {size:#x}",
        )
