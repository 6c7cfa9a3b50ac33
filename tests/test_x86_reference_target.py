"""The reference target on the x86 shadow MMU: a shadow-paging profile gets it (others keep
the flat MMU); its guest has the linux-kvm guest's page tables, byte for byte and at the
same places; accesses go through shadow pages of those tables; a shutdown is reported as
linux-kvm reports it and breaks a contract; and a session runs the shadow-MMU invariants
after every step."""

from __future__ import annotations

import ctypes

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE
from kvmspec.fuzz.ops import (
    CheckExtension,
    CreateVcpu,
    GuestRead,
    GuestWrite,
    Mmap,
    RegionAddr,
    SetUserMemoryRegion,
)
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import make_target
from kvmspec.fuzz.targets.kvm_guest import GuestPageTables
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.fuzz.targets.shadow_guest import PML4_OFFSET, GuestTables
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.x86.rmap import slot_rmaps
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.spec.invariants.x86 import check_shadow_mmu
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES

PAGE = 4096
SLOT_GPA = 0x100000
SLOT_GFN = SLOT_GPA // PAGE
GUEST_GPAS = (SLOT_GPA, 0x40000000, 0x7FFF_FFFF_F000, 0x1_0000_0000, SLOT_GPA + 0x1FF000)
"""Accesses across several 2 MiB pages, 1 GiB ranges and PML4 entries."""


def _guest_session() -> Session:
    """A session on the reference with one vCPU and a 16-page slot at SLOT_GPA."""
    session = Session(DEFAULT_PROFILE, "reference")
    for op in (
        Mmap("ram", 16 * PAGE),
        CreateVcpu(0),
        SetUserMemoryRegion(0, 0, SLOT_GPA, 16 * PAGE, RegionAddr("ram")),
    ):
        assert session.apply(op) == ({"errno": 0}, [])
    return session


def test_a_shadow_profile_runs_the_shadow_mmu_and_the_others_the_flat_one() -> None:
    for profile in PROFILES.values():
        target = make_target("reference", profile)
        assert isinstance(target, ReferenceTarget)
        expected = ShadowMmu if profile.mmu == "shadow" else FlatMmu
        assert type(target.kvm.arch) is expected, profile.name
    assert DEFAULT_PROFILE.mmu == "shadow"


def test_the_page_tables_are_the_linux_kvm_guests_byte_for_byte() -> None:
    """The linux-kvm guest's tables, built in a plain buffer, against the model's, built
    through the model's host after the same accesses (the code page aside: the model runs
    no code)."""
    buffer = ctypes.create_string_buffer(PRIVATE_SIZE)
    kernel = GuestPageTables(ctypes.addressof(buffer))
    host = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
    _, hva = host.mmap(PRIVATE_SIZE, PROT_READ | PROT_WRITE)
    model = GuestTables(host, hva)
    for gpa in GUEST_GPAS:
        kernel.map(gpa)
        model.map(gpa)
    used = 0
    for page in range(1, 16):
        errno, ours = host.host_read(hva + page * PAGE, PAGE)
        assert errno == 0
        assert ours == buffer.raw[page * PAGE : (page + 1) * PAGE], f"table page {page}"
        used += any(ours)
    # The PML4; a PDPT and a PD for the private range; for the accesses, 2 more PDPTs
    # (PML4 entries 0 and 255) and 4 PDs (GiB 0, 1, 4 and the last below 2^47).
    assert used == 9


def test_guest_accesses_go_through_shadow_pages_of_the_guests_tables() -> None:
    session = _guest_session()
    target = session.target
    assert isinstance(target, ReferenceTarget)
    write = GuestWrite(SLOT_GPA + 8, 8, 0x1122_3344_5566_7788)
    assert session.apply(write) == ({"errno": 0, "exit": "none"}, [])
    loaded = {"errno": 0, "exit": "none", "value": 0x1122_3344_5566_7788}
    assert session.apply(GuestRead(SLOT_GPA + 8, 8, vcpu=0)) == (loaded, [])
    mmu = target.kvm.arch
    assert isinstance(mmu, ShadowMmu)
    vcpu_mmu = mmu.vcpu_mmu(0)
    assert vcpu_mmu.cr3 == PRIVATE_GPA + PML4_OFFSET
    root = vcpu_mmu.root.sp
    assert root is not None and root.gfn == (PRIVATE_GPA + PML4_OFFSET) // PAGE
    # Shadows of the PML4, and of a PDPT and a PD on each path the vCPU took: to the code
    # page it fetches the instruction from, and to the data (indirect); direct pages below
    # the guest's 2 MiB pages.
    indirect = [sp for sp in mmu.sp_by_pfn.values() if not sp.role.direct]
    assert sorted(sp.role.level for sp in indirect) == [2, 2, 3, 3, 4]
    assert any(sp.role.direct for sp in mmu.sp_by_pfn.values())
    assert mmu.stat["pf_fixed"] >= 1
    mmio = {"errno": 0, "exit": "mmio", "gpa": 0x40000000, "len": 4, "write": False, "data": ""}
    assert session.apply(GuestRead(0x40000000, 4)) == (mmio, [])
    assert check_shadow_mmu(target.kvm, mmu, target.host) == []


def test_a_shutdown_is_the_linux_kvm_exit_and_breaks_a_contract() -> None:
    """The guest's walk fails when its tables lose an entry (here the VMM zeroes the PML4
    entry of the low 512 GiB, unnoticed by the shadow MMU, FINDINGS 5.6): the guest has no
    #PF handler, so the vCPU shuts down. No access a trace may make should end so; if one
    does, the memory contract reports it."""
    session = _guest_session()
    target = session.target
    assert isinstance(target, ReferenceTarget)
    assert session.apply(GuestRead(SLOT_GPA, 1))[1] == []
    assert target.host.host_write(target.private_hva + PML4_OFFSET, bytes(8)) == 0
    observed, violations = session.apply(GuestWrite(SLOT_GPA + 4 * PAGE, 1, 0x5A))
    assert observed == {"errno": 0, "exit": "shutdown"}
    assert any("C-MMIO" in v and "shutdown" in v for v in violations), violations


def test_the_session_checks_the_shadow_mmu_after_every_step() -> None:
    session = _guest_session()
    target = session.target
    assert isinstance(target, ReferenceTarget)
    assert session.apply(GuestWrite(SLOT_GPA, 1, 1))[1] == []
    slot = target.kvm.memslots(0).id_to_memslot(0)
    assert slot is not None
    slot_rmaps(slot).heads.clear()  # the leaf's rmap entry is lost
    _, violations = session.apply(CheckExtension("KVM_CAP_NR_MEMSLOTS"))
    assert any(v.startswith("X1:") for v in violations), violations
