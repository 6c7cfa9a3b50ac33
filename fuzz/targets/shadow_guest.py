"""The harness's guest on the reference with the x86 shadow MMU: the guest linux-kvm runs,
page tables and all, so that the model and the real kernel agree access by access.

On linux-kvm a guest operation is one load or store by a CPL 3 vCPU whose page tables live
in the harness's private slot (:mod:`kvmspec.fuzz.targets.kvm_guest`). With the flat MMU the
reference skipped all that (guest virtual == guest physical, no tables). With the shadow
MMU (:mod:`kvmspec.reference.x86`) the tables matter: KVM walks them on every fault, shadows
each table it reads, write-protects the shadowed tables and mirrors a guest 2 MiB page 4 KiB
by 4 KiB. So the model's guest has the same tables, at the same places in the private slot:

=================  ======================================================================
PRIVATE_GPA        the code page on linux-kvm (the model runs no code: left zero)
+ 0x1000           the PML4
+ 0x2000 ...       page-directory-pointer tables and page directories, handed out in the
                   order accesses first need them, starting with the private range's own
=================  ======================================================================

Guest virtual addresses equal guest physical ones, mapped in 2 MiB pages whose entries have
P, R/W, U/S, and Accessed and Dirty preset (so the walk never writes them). An entry is only
added, never changed: it is written through the VMM's mapping, which the shadow MMU does not
notice (FINDINGS.md 5.6), and a not-present entry is never cached, so the fault that follows
reads the new one. Each vCPU loads CR3 = PRIVATE_GPA + 0x1000 the first time it runs, as the
linux-kvm guest does with KVM_SET_SREGS before its first KVM_RUN; the paging mode is the
linux-kvm guest's (4-level long mode, CR0.WP, EFER.NXE, CPL 3: the default
:class:`~kvmspec.reference.x86.guest_walk.PagingMode`).

Each access is the instruction of its stub (:data:`~kvmspec.fuzz.targets.kvm_guest.STUBS`),
fetched from the code page before the data moves: the fetch's fault maps the code page and
prefetches its neighbours in the private slot, the guest's page tables among them. That
shows through the uAPI: when KVM later shadows one of those tables it write-protects a
writable SPTE, which flushes every vCPU's TLB, and under PVM renews each vCPU's copy of
the root's top level (reference/x86/pvm_top_level.py), so a store that would otherwise
fault and be logged again does not. What the model leaves out: the port write that ends a
stub.
"""

from __future__ import annotations

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE
from kvmspec.fuzz.targets.kvm_guest import STUBS
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.x86.guest_access import ShadowAccess, guest_instruction
from kvmspec.reference.x86.mmu_page import shadow_of
from kvmspec.reference.x86.paging import (
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)
from kvmspec.reference.x86.roots import kvm_set_cr3

PML4_OFFSET = 0x1000
FIRST_TABLE_OFFSET = 0x2000
"""Where the linux-kvm guest puts its PML4 and its first other table, in the private slot."""
TABLE_ENTRY = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK
LARGE_PAGE_ENTRY = TABLE_ENTRY | PT_PAGE_SIZE_MASK
LARGE_PAGE_SHIFT = 21
TABLE_SIZE = 4096
ENTRY_SIZE = 8


class GuestTables:
    """The guest's 4-level page tables in the private slot's host memory at ``hva``, written
    through the model's host as the VMM writes them, grown one 2 MiB page at a time. The
    same tables, byte for byte, as linux-kvm's ``GuestPageTables`` after the same accesses."""

    def __init__(self, host: HostMm, hva: int) -> None:
        self.host = host
        self.hva = hva
        self._next_table = FIRST_TABLE_OFFSET
        self._tables: dict[tuple[int, ...], int] = {(): PML4_OFFSET}  # indexes -> offset
        self._mapped: set[int] = set()  # 2 MiB page numbers
        self.map(PRIVATE_GPA)  # the code page's, first, as on linux-kvm

    def map(self, gpa: int) -> None:
        """Make the 2 MiB page holding ``gpa`` present, identity-mapped."""
        large = gpa >> LARGE_PAGE_SHIFT
        if large in self._mapped:
            return
        pml4_index, pdpt_index = (gpa >> 39) & 511, (gpa >> 30) & 511
        pdpt = self._table((pml4_index,), PML4_OFFSET, pml4_index)
        directory = self._table((pml4_index, pdpt_index), pdpt, pdpt_index)
        self._write_entry(directory, large & 511, large << LARGE_PAGE_SHIFT | LARGE_PAGE_ENTRY)
        self._mapped.add(large)

    def _table(self, path: tuple[int, ...], parent: int, index: int) -> int:
        """The table at ``path``; a new one is the next page of the pool (fresh anonymous
        memory: no entry present), linked from entry ``index`` of ``parent``."""
        table = self._tables.get(path)
        if table is None:
            if self._next_table >= PRIVATE_SIZE:
                # The parser's MAX_GIGABYTES keeps a trace well below this.
                raise RuntimeError("the guest's page-table pool is exhausted")
            table = self._next_table
            self._next_table += TABLE_SIZE
            self._tables[path] = table
            self._write_entry(parent, index, (PRIVATE_GPA + table) | TABLE_ENTRY)
        return table

    def _write_entry(self, table: int, index: int, value: int) -> None:
        errno = self.host.host_write(
            self.hva + table + ENTRY_SIZE * index, value.to_bytes(ENTRY_SIZE, "little")
        )
        # The private memory is the harness's: no operation of a trace can unmap it.
        assert errno == 0, errno


class ShadowGuest:
    """The harness's guest in a model VM whose ``kvm.arch`` is the shadow MMU: its page
    tables in the private slot's memory at ``private_hva`` (already a memslot), and the
    vCPUs that have loaded CR3."""

    def __init__(self, kvm: Kvm, host: HostMm, private_hva: int) -> None:
        self.kvm = kvm
        self.host = host
        self.mmu = shadow_of(kvm)
        self.tables = GuestTables(host, private_hva)
        self._running: set[int] = set()  # vCPU ids that have loaded CR3

    def access(self, vcpu_id: int, gpa: int, size: int, data: bytes | None) -> ShadowAccess:
        """One guest load (``data`` None) of ``size`` bytes at ``gpa``, or store of
        ``data``: the pages it touches are mapped first, then the instruction runs through
        the shadow MMU (:func:`kvmspec.reference.x86.guest_access.guest_instruction`)."""
        self.tables.map(gpa)
        self.tables.map(gpa + size - 1)
        if vcpu_id not in self._running:
            vcpu_mmu = self.mmu.vcpu_mmu(vcpu_id)
            kvm_set_cr3(self.kvm, self.mmu, vcpu_mmu, PRIVATE_GPA + PML4_OFFSET)
            self._running.add(vcpu_id)
        rip = PRIVATE_GPA + STUBS[(data is not None, size)]
        return guest_instruction(self.kvm, self.host, vcpu_id, gpa, data, size, rip=rip, fetch=True)
