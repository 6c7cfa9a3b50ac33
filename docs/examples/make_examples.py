"""Write the inputs the docs draw with ``kvmspec show`` (the ``kvmspec-show`` directive).

Every input is built from an explicit list of steps, so the files are the same on every run:

* ``memslots.jsonl``: a trace on x86_64-linux-6.18-pvm: RAM, a READONLY ROM, a dirty-logged
  slot, a slot MOVEd to 1 GiB, an alias of the RAM, some guest writes (one to the ROM: an
  MMIO exit) and a dirty-log harvest. Its expectations are what the reference observed.
* ``x86-shadow.bin``: the x86 harness (``huge`` layout): the guest's 4-level tables, a 2 MiB
  guest page backed by a host THP (a huge SPTE for vCPU 0), and a second process on vCPU 1
  whose page directory lies inside that page, so its view of the page is 4K SPTEs (the
  directory's gfn is write-tracked, and the huge SPTE is write-protected for it).
* ``arm64-stage2.bin``: the arm64 harness: a stage-2 block over a collapsed THP, pages with
  and without the access flag after aging, and dirty logging on slot 1 with stores.
* ``ppc-hpt.bin``: the POWER harness: entries entered (one bolted, one in the secondary
  group), referenced and changed by guest accesses, one made ABSENT by the host dropping
  its page, one emulated-MMIO entry.
* ``seed-001.bin``: arm64: both vCPUs store, then the VMM exits (the notifier's release).
  With ``seed-001-flush-shadow-all-emptied`` planted, translations survive the release:
  S001-FLUSH-ALL.
* ``seed-000.bin``: POWER: two entries for one page of slot 1; while the slot is INVALID
  (being deleted) the guest removes one and re-enters it elsewhere. With
  ``seed-000-invalid-slot-ignored-on-removal`` planted, the removal misses the INVALID slot,
  its chain is corrupted, and an entry survives the slot: S000-NO-HPTE-OUTSIDE-SLOTS.

    python docs/examples/make_examples.py          # (re)write them
    python docs/examples/make_examples.py --check  # exit 1 if a file is not up to date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvmspec.fuzz import arm64_decoder, ppc_decoder, x86_decoder
from kvmspec.fuzz.arm64_decoder import Setup
from kvmspec.fuzz.arm64_harness import DEVICE_SLOT, SHIFTED_SLOT, THP_SLOT
from kvmspec.fuzz.harness_fuzzing import Step
from kvmspec.fuzz.ops import (
    CreateVcpu,
    GetDirtyLog,
    GuestRead,
    GuestWrite,
    HostWrite,
    Mmap,
    Observation,
    Operation,
    RegionAddr,
    SetUserMemoryRegion,
)
from kvmspec.fuzz.ppc_harness import GFNS, MMIO_GFN, RAM0_GFN, RAM1_GFN
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.fuzz.trace import dump
from kvmspec.fuzz.x86_huge_harness import PML4_B
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

HERE = Path(__file__).resolve().parent
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def _region(slot: int, flags: int, gpa: int, size: int, offset: int) -> SetUserMemoryRegion:
    return SetUserMemoryRegion(slot, flags, gpa, size, RegionAddr("HOST", offset))


MEMSLOT_OPERATIONS: tuple[Operation, ...] = (
    Mmap("HOST", 64 * MIB),
    CreateVcpu(0),
    _region(0, 0, 0, 1 * MIB, 0),  # RAM
    _region(1, KVM_MEM_READONLY, 1 * MIB, 256 * KIB, 16 * MIB),  # a ROM
    _region(2, KVM_MEM_LOG_DIRTY_PAGES, 4 * MIB, 2 * MIB, 32 * MIB),  # dirty-logged
    _region(3, 0, 16 * MIB, 1 * MIB, 48 * MIB),
    _region(3, 0, 1 * GIB, 1 * MIB, 48 * MIB),  # MOVE of slot 3 to 1 GiB
    _region(4, 0, 3 * GIB, 64 * KIB, 0),  # an alias of the first 64 KiB of RAM
    GuestWrite(0x1000, 8, 0x1122_3344_5566_7788, 0),
    GuestRead(3 * GIB + 0x1000, 8, 0),  # the same bytes through the alias
    HostWrite("HOST", 8, 0xAB, 16 * MIB),
    GuestRead(1 * MIB, 8, 0),  # the ROM reads what the host wrote
    GuestWrite(1 * MIB, 1, 0x77, 0),  # and a store to it is an MMIO exit
    GuestWrite(4 * MIB + 0x3000, 4, 0xD1D1, 0),
    GuestWrite(4 * MIB + 0x5000, 4, 0xD2D2, 0),
    GuestWrite(1 * GIB + 0x2000, 8, 0xBEEF, 0),
    GetDirtyLog(2),
)


def memslots_trace() -> str:
    """The memslot trace, each step expecting what the reference observes."""
    target = ReferenceTarget(DEFAULT_PROFILE)
    steps: list[tuple[Operation, Observation | None]] = [
        (op, target.apply(op)) for op in MEMSLOT_OPERATIONS
    ]
    header = (
        "# RAM (slot 0), a READONLY ROM (1), a dirty-logged slot (2), a slot MOVEd to 1 GiB (3)\n"
        "# and an alias of the RAM (4), with guest writes; written by make_examples.py\n"
    )
    return header + dump(DEFAULT_PROFILE.name, steps)


X86_SHADOW: tuple[Step, ...] = (
    ("host_thp", (True,)),  # the slot's first 2 MiB become one host huge page
    ("guest_read", (0, 20, 8)),  # through vCPU 0's 2 MiB guest page: a huge SPTE, A set
    ("guest_write", (0, 21, 3)),  # W and D
    ("switch_cr3", (1, PML4_B)),  # vCPU 1 in another process, whose PD lies in that page:
    ("guest_read", (1, 40, 0)),  # its SPTEs are 4K (the PD's gfn is write-tracked)
    ("guest_read", (1, 41, 0)),
    ("guest_write", (1, 64, 5)),
)

ARM64_STAGE2: tuple[Step, ...] = (
    ("host_write", (THP_SLOT, 1, 0x11)),  # the VMM touches the first 2 MiB of slot 0,
    ("thp", (THP_SLOT, 0, True)),  # and khugepaged makes them one host huge page
    ("guest_read", (0, THP_SLOT, 1, 0, "load")),  # a 2 MiB block at stage 2
    ("guest_read", (0, THP_SLOT, 512, 0, "load")),  # a page (the second 2 MiB is not huge)
    ("guest_store", (1, THP_SLOT, 1023, 9)),
    ("age", (THP_SLOT, 512, "clear_young")),  # AF cleared on one page
    ("toggle_log", (SHIFTED_SLOT,)),  # dirty logging on slot 1
    ("guest_store", (0, SHIFTED_SLOT, 1, 4)),
    ("guest_store", (1, SHIFTED_SLOT, 2, 5)),
    ("guest_read", (0, SHIFTED_SLOT, 510, 0, "load")),  # mapped read-only while logged
    ("guest_read", (1, DEVICE_SLOT, 0, 0, "load")),  # device memory
    ("guest_read", (0, THP_SLOT, 1023, 0, "load")),
    ("get_dirty_log", (SHIFTED_SLOT,)),
    ("guest_store", (1, SHIFTED_SLOT, 2, 6)),
)

RW, RO, FIRST_FREE = True, False, -1
PPC_HPT: tuple[Step, ...] = (
    ("h_enter", (0, GFNS.index(RAM0_GFN), RW, True, False, FIRST_FREE)),  # bolted
    ("h_enter", (1, GFNS.index(RAM0_GFN + 1), RW, False, False, FIRST_FREE)),
    ("h_enter", (2, GFNS.index(RAM1_GFN), RW, False, True, FIRST_FREE)),  # H
    ("h_enter", (3, GFNS.index(RAM0_GFN + 3), RO, False, False, FIRST_FREE)),
    ("h_enter", (4, GFNS.index(MMIO_GFN), RW, False, False, FIRST_FREE)),
    ("guest_access", (0, 0, True)),  # R and C
    ("guest_access", (1, 1, False)),  # R only
    ("guest_access", (0, 2, True)),
    ("guest_access", (1, 3, False)),
    ("guest_access", (0, 4, False)),  # emulated MMIO
    ("host_dontneed", (0, 1)),  # the host drops gfn 1's page: its entry becomes ABSENT
)

SEED_001: tuple[Step, ...] = (
    ("guest_store", (0, THP_SLOT, 2, 7)),
    ("guest_store", (1, SHIFTED_SLOT, 2, 8)),
    ("guest_read", (0, DEVICE_SLOT, 0, 0, "load")),
    ("release", ()),  # the VMM exits: kvm_arch_flush_shadow_all must unmap everything
    ("guest_read", (0, THP_SLOT, 2, 0, "load")),  # a new VM
)

DELETE = False  # hcalls_while_slot1_invalid's ``move``: delete slot 1
SEED_000: tuple[Step, ...] = (
    ("h_enter", (0, GFNS.index(RAM1_GFN), RW, False, False, FIRST_FREE)),
    ("h_enter", (1, GFNS.index(RAM1_GFN), RW, False, False, FIRST_FREE)),
    ("guest_access", (0, 0, True)),
    ("guest_access", (1, 1, True)),
    # While slot 1 is INVALID, the guest removes its entry for ea 0 and enters gfn 0 there.
    ("hcalls_while_slot1_invalid", (DELETE, 0, GFNS.index(RAM0_GFN))),
    ("guest_access", (0, 1, False)),
)


def examples() -> dict[str, bytes]:
    """Every example file's name and contents."""
    return {
        "memslots.jsonl": memslots_trace().encode(),
        "x86-shadow.bin": x86_decoder.encode("huge", X86_SHADOW),
        "arm64-stage2.bin": arm64_decoder.encode(Setup(Arm64Mmu, hardware_af=True), ARM64_STAGE2),
        "ppc-hpt.bin": ppc_decoder.encode(PPC_HPT),
        "seed-001.bin": arm64_decoder.encode(Setup(Arm64Mmu, hardware_af=False), SEED_001),
        "seed-000.bin": ppc_decoder.encode(SEED_000),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, contents in examples().items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_bytes() != contents:
                stale.append(name)
        else:
            path.write_bytes(contents)
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    if stale:
        print(f"stale: {', '.join(stale)} (run {Path(__file__).name})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
