"""The guest's own page tables, walked the way the hardware walks them.

With shadow paging, the hardware never sees the guest's page tables: it walks KVM's shadow
tables. So when the guest faults, KVM must find out itself what the guest's tables say about
the address: it reads them from guest memory, level by level from CR3, checks present and
reserved bits and the access rights as the CPU would, and either finds the translation
(gva to gpa) or the page fault the CPU would have raised, which KVM then injects into the
guest. It also does what the CPU does on a successful walk: it sets the Accessed bit of
every entry it used, and the Dirty bit of the leaf on a write, with a compare-and-exchange
on guest memory, since other vCPUs may be writing the same tables.

The walk's result tells the shadow MMU which guest page-table pages it read (their gfns):
those are the pages it will shadow, and write-protect so that it sees the guest change them.

Modelled: 4- and 5-level long-mode paging; 4 KiB, 2 MiB and 1 GiB pages (1 GiB only with
the guest's CPUID pdpe1gb); the U/S and R/W rights with CR0.WP, and NX with EFER.NXE; the
reserved bits, including the address bits at and above the guest's MAXPHYADDR; the A/D
updates, skipped for page tables in read-only memslots. Not modelled: 32-bit and PAE paging,
SMEP, SMAP, protection keys, shadow stacks, and nested paging (an L2 guest's gpa is always
the gpa, kvm_translate_gpa being the identity).

kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(walk_addr_generic),
FNAME(update_accessed_dirty_bits), FNAME(gpte_access), FNAME(protect_clean_gpte),
FNAME(is_last_gpte); arch/x86/kvm/mmu/mmu.c:__reset_rsvds_bits_mask,
update_permission_bitmap; arch/x86/kvm/mmu.h:permission_fault (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Protocol

from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.x86.paging import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PG_LEVEL_4K,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT64_ROOT_4LEVEL,
    PT64_ROOT_5LEVEL,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_DIRTY_SHIFT,
    PT_PAGE_SIZE_MASK,
    PT_PAGE_SIZE_SHIFT,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    PT_WRITABLE_SHIFT,
    pt_index,
    pt_level_shift,
    pt_lvl_addr_mask,
    pt_lvl_offset_mask,
    rsvd_bits,
)
from kvmspec.spec.uapi.constants import PAGE_SHIFT

PTE_SIZE = 8
"""sizeof(pt_element_t) for 64-bit paging."""


class GuestMemory(Protocol):
    """Guest-physical memory as the walker reaches it: through the memslots to host memory.

    kernel: paging_tmpl.h:FNAME(walk_addr_generic) reads entries with get_user after
    kvm_vcpu_gfn_to_memslot and gfn_to_hva_memslot_prot; the A/D updates use
    __try_cmpxchg_user (v6.18)
    """

    def read_u64(self, gpa: int) -> int | None:
        """The 8-byte entry at ``gpa``; None when no visible memslot covers it or the host
        cannot provide the page (the walk then fails as if the entry were not present)."""
        ...

    def writable(self, gpa: int) -> bool:
        """May KVM write at ``gpa``? False in a read-only memslot (ROM): KVM then leaves the
        guest's A/D bits alone instead of failing the walk."""
        ...

    def cmpxchg_u64(self, gpa: int, old: int, new: int) -> bool | None:
        """Store ``new`` at ``gpa`` if it still holds ``old``: True if stored, False if the
        entry changed meanwhile (another vCPU wrote it), None if the access faulted."""
        ...


@dataclass(frozen=True)
class PagingMode:
    """What a 64-bit walk depends on: the paging mode and control bits (the kernel's
    cpu_role) and the guest's CPUID (reserved bits).

    kernel: arch/x86/include/asm/kvm_host.h:union kvm_cpu_role; arch/x86/kvm/mmu/mmu.c:
    reset_guest_rsvds_bits_mask (v6.18)
    """

    root_level: int = PT64_ROOT_4LEVEL
    """4, or 5 with CR4.LA57."""
    efer_nx: bool = True
    """EFER.NXE: NX is honoured; without it, bit 63 of every entry is reserved."""
    cr0_wp: bool = True
    """CR0.WP: without it, supervisor writes ignore R/W (user writes still honour it)."""
    maxphyaddr: int = 48
    """The guest's physical-address width (CPUID 0x80000008): higher address bits of every
    entry are reserved. 48 as on this machine."""
    gbpages: bool = True
    """CPUID pdpe1gb: a level-3 entry may map a 1 GiB page; without it, its PS is reserved."""
    amd: bool = False
    """The guest's CPUID says AMD: bit 8 of non-leaf level-4 and level-5 entries is reserved."""

    def __post_init__(self) -> None:
        if self.root_level not in (PT64_ROOT_4LEVEL, PT64_ROOT_5LEVEL):
            raise ValueError(f"long mode has 4 or 5 levels, not {self.root_level}")
        if not 32 <= self.maxphyaddr <= 52:
            raise ValueError(f"MAXPHYADDR {self.maxphyaddr} is outside 32..52")


@dataclass(frozen=True)
class RsvdBitsValidate:
    """``rsvd_bits_mask[ps][level - 1]``: the bits that must be zero in a present entry at
    ``level``, where ``ps`` is the entry's bit 7 (huge pages have their own reserved bits).

    kernel: arch/x86/include/asm/kvm_host.h:struct rsvd_bits_validate (v6.18)
    """

    rsvd_bits_mask: tuple[tuple[int, ...], tuple[int, ...]]


@lru_cache(maxsize=64)
def reset_guest_rsvds_bits_mask(mode: PagingMode) -> RsvdBitsValidate:
    """The reserved bits of each level for long-mode paging:

    * everywhere: address bits from MAXPHYADDR to 51, and bit 63 without EFER.NXE;
    * levels 5 and 4: bit 7 (no huge pages there), and bit 8 on AMD;
    * level 3: bit 7 without pdpe1gb; a 1 GiB leaf also reserves bits 29:13;
    * level 2: a 2 MiB leaf reserves bits 20:13 (bit 12 is its PAT bit);
    * level 1: nothing more (bit 7 is PAT there).

    kernel: arch/x86/kvm/mmu/mmu.c:__reset_rsvds_bits_mask, reset_guest_rsvds_bits_mask
    (v6.18)
    """
    high_bits_rsvd = rsvd_bits(mode.maxphyaddr, 51)
    if not mode.efer_nx:
        high_bits_rsvd |= rsvd_bits(63, 63)
    gbpages_bit_rsvd = 0 if mode.gbpages else rsvd_bits(7, 7)
    nonleaf_bit8_rsvd = rsvd_bits(8, 8) if mode.amd else 0

    upper = high_bits_rsvd | nonleaf_bit8_rsvd | rsvd_bits(7, 7)  # levels 4 and 5
    table = [high_bits_rsvd, high_bits_rsvd, high_bits_rsvd | gbpages_bit_rsvd, upper, upper]
    huge = [
        high_bits_rsvd,
        high_bits_rsvd | rsvd_bits(13, 20),
        high_bits_rsvd | gbpages_bit_rsvd | rsvd_bits(13, 29),
        upper,
        upper,
    ]
    return RsvdBitsValidate((tuple(table), tuple(huge)))


def is_rsvd_bits_set(rsvd: RsvdBitsValidate, gpte: int, level: int) -> bool:
    """kernel: arch/x86/kvm/mmu/spte.h:__is_rsvd_bits_set (v6.18)"""
    ps = (gpte >> PT_PAGE_SIZE_SHIFT) & 1
    return bool(gpte & rsvd.rsvd_bits_mask[ps][level - 1])


def is_last_gpte(level: int, gpte: int) -> bool:
    """Does the walk stop at this entry? At level 1 always; above, when PS is set (only
    levels 2 and 3 get here with PS: it is reserved higher up).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(is_last_gpte) (v6.18)
    """
    return level == PG_LEVEL_4K or bool(gpte & PT_PAGE_SIZE_MASK)


def gpte_access(gpte: int) -> int:
    """An entry's rights as ACC_* bits: W and U copied, EXEC when NX is clear.

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(gpte_access) (v6.18)
    """
    access = gpte & (PT_WRITABLE_MASK | PT_USER_MASK)
    if not gpte & PT64_NX_MASK:
        access |= ACC_EXEC_MASK
    return access


def protect_clean_gpte(access: int, gpte: int) -> int:
    """Drop write access when the leaf is not dirty yet: the shadow SPTE is then made
    read-only, so that the guest's first write faults and KVM can set the guest's D bit,
    as the CPU would.

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(protect_clean_gpte) (v6.18)
    """
    # D (bit 6) shifted onto W (bit 1): keep ACC_WRITE only when D is set.
    keep = ~ACC_WRITE_MASK | ((gpte >> (PT_DIRTY_SHIFT - PT_WRITABLE_SHIFT)) & ACC_WRITE_MASK)
    return access & keep


def permission_fault(mode: PagingMode, pte_access: int, access: int) -> int:
    """PFERR_PRESENT_MASK if an access (PFERR_WRITE/USER/FETCH bits) is refused by the
    rights ``pte_access`` (ACC_*) that the walk found, else 0:

    * a user access to a supervisor page;
    * a write to a read-only page, by the user, or by the supervisor when CR0.WP is set;
    * an instruction fetch from an NX page, when EFER.NXE is set.

    The kernel precomputes these answers per error code (update_permission_bitmap).

    kernel: arch/x86/kvm/mmu.h:permission_fault; arch/x86/kvm/mmu/mmu.c:
    update_permission_bitmap (v6.18)
    """
    write = bool(access & PFERR_WRITE_MASK)
    user = bool(access & PFERR_USER_MASK)
    fetch = bool(access & PFERR_FETCH_MASK)
    refused = (
        (user and not pte_access & ACC_USER_MASK)
        or (write and not pte_access & ACC_WRITE_MASK and (user or mode.cr0_wp))
        or (fetch and mode.efer_nx and not pte_access & ACC_EXEC_MASK)
    )
    return PFERR_PRESENT_MASK if refused else 0


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One entry the walk used: at ``level``, in the table page ``table_gfn``, at
    ``pte_gpa``, with the value ``pte`` (after the walk's own A/D update)."""

    level: int
    table_gfn: int
    pte_gpa: int
    pte: int


@dataclass(frozen=True, slots=True)
class GuestWalker:
    """A successful walk.

    ``pte_access`` are the rights (ACC_*) the guest's tables grant for the page: the AND of
    every level's W and U, EXEC unless some level has NX, and without W when the access was
    not a write and the leaf is not dirty (protect_clean_gpte). ``steps`` lists the entries
    from the top level down to the leaf. ``dirtied_gfns`` are the table pages the walk wrote
    (A/D bits), in order, which the caller marks dirty (kvm_vcpu_mark_page_dirty).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:struct guest_walker (v6.18)
    """

    gva: int
    gfn: int
    level: int
    pte_access: int
    steps: tuple[WalkStep, ...]
    dirtied_gfns: tuple[int, ...]

    @property
    def gpa(self) -> int:
        return (self.gfn << PAGE_SHIFT) | (self.gva & ((1 << PAGE_SHIFT) - 1))

    @property
    def table_gfns(self) -> tuple[int, ...]:
        """The guest page-table pages walked, top level first: what the shadow MMU shadows
        (and write-protects)."""
        return tuple(step.table_gfn for step in self.steps)


@dataclass(frozen=True, slots=True)
class X86Exception:
    """A failed walk: the #PF the CPU would raise. ``error_code`` holds PFERR_* bits;
    ``level`` is where the walk stopped. ``dirtied_gfns`` as in GuestWalker (a walk can only
    fail after writing when an A/D update faults half way).

    kernel: arch/x86/kvm/kvm_emulate.h:struct x86_exception (v6.18)
    """

    address: int
    error_code: int
    level: int
    dirtied_gfns: tuple[int, ...]


WalkResult = GuestWalker | X86Exception


def is_canonical_address(gva: int, root_level: int) -> bool:
    """Is ``gva`` a 64-bit address whose bits above the walked ones copy the top walked bit
    (bit 47, or 56 with five levels)? The CPU raises #GP for any other, before a walk.

    kernel: arch/x86/include/asm/page.h:__is_canonical_address (v6.18)
    """
    top = pt_level_shift(root_level) + 8  # the highest address bit the root level indexes
    high = gva >> top
    return 0 <= gva < 1 << 64 and high in (0, (1 << (64 - top)) - 1)


def update_accessed_dirty_bits(
    mem: GuestMemory, steps: list[WalkStep], write_fault: bool, dirtied: list[int]
) -> int:
    """Set A in every entry of the walk (top level first) and D in the leaf on a write, each
    with a compare-and-exchange against the value the walk read. Returns 0 when done, 1 when
    an entry changed since it was read (the walk starts again), -1 when guest memory could
    not be written (the walk fails). Entries in read-only memslots are skipped.

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(update_accessed_dirty_bits) (v6.18)
    """
    leaf = len(steps) - 1
    for i, step in enumerate(steps):
        pte = step.pte | PT_ACCESSED_MASK
        if i == leaf and write_fault:
            pte |= PT_DIRTY_MASK
        if pte == step.pte or not mem.writable(step.pte_gpa):
            continue
        stored = mem.cmpxchg_u64(step.pte_gpa, step.pte, pte)
        if stored is None:
            return -1
        if not stored:
            return 1
        dirtied.append(step.table_gfn)
        steps[i] = replace(step, pte=pte)
    return 0


def walk_addr_generic(
    mem: GuestMemory, mode: PagingMode, cr3: int, addr: int, access: int
) -> KernelOp[WalkResult]:
    """Translate the guest virtual address ``addr`` through the tables rooted at ``cr3``
    for an ``access`` made of PFERR_WRITE_MASK, PFERR_USER_MASK and PFERR_FETCH_MASK.

    Each level: read the entry (no memory: fail), stop if it is not present (error code 0),
    or has reserved bits set (RSVD | PRESENT); narrow the rights; stop at a leaf. Then check
    the rights (PRESENT on a refusal), compute the gfn, and set the A/D bits that are not set
    yet; if an entry changed under the update, walk again. A failure's error code also
    carries the access's WRITE and USER bits, and FETCH when EFER.NXE is on.

    A generator: reading guest memory may fault the host page in and sleep, so other vCPUs
    (the guest rewriting its tables) may run after every read.

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(walk_addr_generic) (v6.18)
    """
    if not is_canonical_address(addr, mode.root_level):
        raise ValueError(f"{addr:#x} is not canonical: the CPU raises #GP, not #PF")
    if cr3 & PT64_BASE_ADDR_MASK & rsvd_bits(mode.maxphyaddr, 51):
        raise ValueError(f"CR3 {cr3:#x} is beyond MAXPHYADDR: the CPU refuses to load it")
    write_fault = bool(access & PFERR_WRITE_MASK)
    rsvd = reset_guest_rsvds_bits_mask(mode)
    dirtied: list[int] = []

    def fault(errcode: int, level: int) -> X86Exception:
        errcode |= access & (PFERR_WRITE_MASK | PFERR_USER_MASK)
        if access & PFERR_FETCH_MASK and mode.efer_nx:
            errcode |= PFERR_FETCH_MASK
        return X86Exception(addr, errcode, level, tuple(dirtied))

    while True:  # the kernel's retry_walk label
        level = mode.root_level
        pte = cr3
        # The rights so far, as raw entry bits ANDed level by level; NX is inverted first so
        # that it can be ANDed like the others (a single NX anywhere forbids fetches).
        pte_access = ~0
        steps: list[WalkStep] = []
        while True:
            pt_access = pte_access
            table_gfn = (pte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
            pte_gpa = (table_gfn << PAGE_SHIFT) + pt_index(addr, level) * PTE_SIZE
            value = mem.read_u64(pte_gpa)
            yield Preempt(f"guest walk: read the level {level} entry")
            if value is None:
                return fault(0, level)
            pte = value
            pte_access = pt_access & (pte ^ PT64_NX_MASK)
            if not pte & PT_PRESENT_MASK:
                return fault(0, level)
            if is_rsvd_bits_set(rsvd, pte, level):
                return fault(PFERR_RSVD_MASK | PFERR_PRESENT_MASK, level)
            steps.append(WalkStep(level, table_gfn, pte_gpa, pte))
            if is_last_gpte(level, pte):
                break
            level -= 1

        acc = gpte_access(pte_access ^ PT64_NX_MASK)
        errcode = permission_fault(mode, acc, access)
        if errcode:
            return fault(errcode, level)

        gfn = (pte & pt_lvl_addr_mask(level)) >> PAGE_SHIFT
        gfn += (addr & pt_lvl_offset_mask(level)) >> PAGE_SHIFT

        # Nothing to write when every level is already accessed (and the leaf dirty, for a
        # write): A survives the AND of all levels only if every level has it.
        accessed_dirty = bool(pte_access & PT_ACCESSED_MASK)
        if write_fault:
            accessed_dirty = accessed_dirty and bool(pte & PT_DIRTY_MASK)
        else:
            acc = protect_clean_gpte(acc, pte)
        if not accessed_dirty:
            ret = update_accessed_dirty_bits(mem, steps, write_fault, dirtied)
            if ret < 0:
                return fault(0, level)
            if ret > 0:
                continue
        return GuestWalker(addr, gfn, level, acc, tuple(steps), tuple(dirtied))
