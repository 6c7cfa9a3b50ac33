"""A hashed page-table entry (HPTE): two 64-bit words, "v" and "r", and the guest's view.

The guest builds HPTEs itself and hands them to the hypervisor with hypercalls (hcalls.py);
KVM stores them in the hashed page table (hpt.py) that the hardware walks. What the
hardware sees is not what the guest wrote:

* the "r" word carries a *host* real address (the guest gave a guest-physical one), so KVM
  keeps the guest's own "r" word aside in the reverse-map entry (``guest_rpte``);
* KVM uses bits of "v" for itself: HVLOCK (a per-entry lock) and ABSENT ("valid to the
  guest, invalid to the hardware": the host took the page away, or it is emulated MMIO);
* an ABSENT entry for emulated MMIO carries storage key 31 in "r".

The guest must never see any of that (P4): :func:`hpte_guest_view` is the one conversion,
what H_READ and H_REMOVE return. The layout is the pre-ISA-3.0 one (POWER7/8), which is
also the format of every hypercall; POWER9 stores a converted format in memory and converts
back at each hypercall, which changes nothing the guest or the host can observe.

kernel: arch/powerpc/include/asm/book3s/64/mmu-hash.h (HPTE_V_*, HPTE_R_*, PP_*);
arch/powerpc/include/asm/kvm_book3s_64.h:HPTE_V_HVLOCK, HPTE_V_ABSENT, HPTE_GR_MODIFIED,
kvmppc_hpte_page_shifts, kvmppc_actual_pgsz, hpte_rpn, hpte_is_writable, hpte_make_readonly,
hpte_cache_flags_ok; arch/powerpc/kvm/book3s_hv_rm_mmu.c:is_mmio_hpte, kvmppc_h_read (v6.18)
"""

from __future__ import annotations

# -- dword 0, "v" -------------------------------------------------------------------------

HPTE_V_SSIZE_SHIFT = 62
HPTE_V_1TB_SEG = 1 << HPTE_V_SSIZE_SHIFT
"""B = 1: the entry translates a 1 TB segment (B = 0: 256 MB)."""
HPTE_V_AVPN_SHIFT = 7
HPTE_V_AVPN = 0x3FFF_FFFF_FFFF_FF80
"""The abbreviated virtual page number: virtual address >> 23, stored from bit 7."""
HPTE_V_HVLOCK = 0x40
"""KVM software bit: the entry is locked by a CPU in the hypervisor."""
HPTE_V_ABSENT = 0x20
"""KVM software bit: valid for the guest, invalid for the hardware (an access traps)."""
HPTE_V_BOLTED = 0x10
"""A Linux guest's hint: keep this entry (it survives an HPT resize)."""
HPTE_V_LOCK = 0x08
"""The host's own native-hash lock; unused by KVM HV, part of the guest's bits."""
HPTE_V_LARGE = 0x04
"""L: a page larger than 4 KiB; the LP bits of "r" say which size."""
HPTE_V_SECONDARY = 0x02
"""H: the entry sits in the group of the secondary hash."""
HPTE_V_VALID = 0x01
"""V: the hardware may translate through the entry."""

HPTE_V_SOFTWARE = HPTE_V_HVLOCK | HPTE_V_ABSENT
"""The bits of "v" that only KVM uses, and that the guest must never see (P4)."""

# -- dword 1, "r" -------------------------------------------------------------------------

HPTE_R_PP0 = 1 << 63
HPTE_R_TS = 1 << 62
HPTE_R_KEY_HI = 0x3000_0000_0000_0000
HPTE_R_RPN_SHIFT = 12
HPTE_R_RPN = 0x0FFF_FFFF_FFFF_F000
"""The real page number (a real address with the low 12 bits clear); for a large page its
low bits hold the LP size encoding instead."""
HPTE_R_KEY_LO = 0xE00
HPTE_R_KEY = HPTE_R_KEY_HI | HPTE_R_KEY_LO
"""The 5-bit storage key, split in two fields."""
HPTE_R_R = 0x100
"""Referenced: set by the hardware on an access through the entry."""
HPTE_R_C = 0x080
"""Changed: set by the hardware on a store through the entry."""
HPTE_R_W = 0x40
HPTE_R_I = 0x20
HPTE_R_M = 0x10
HPTE_R_G = 0x08
HPTE_R_WIMG = 0x78
HPTE_R_N = 0x4
"""No-execute."""
HPTE_R_PP = 0x3
"""The low two protection bits (with PP0, three)."""

LP_SHIFT = 12
"""Where the large-page size encoding (LP) starts in "r"."""

PP_RWXX = 0
PP_RWRX = 1
PP_RWRW = 2
PP_RXRX = 3
PP_RXXX = HPTE_R_PP0 | 2
"""Protections (supervisor / problem state), for the usual Ks = 0, Kp = 1 segments."""

HPTE_GR_MODIFIED = 1 << 62
"""KVM software bit in ``guest_rpte``: the entry changed since the HTAB stream last sent it."""
HPTE_GR_RESERVED = HPTE_GR_MODIFIED
"""Bits of the guest's "r" that KVM reserves: cleared on H_ENTER, never returned."""

KEY_MMIO = HPTE_R_KEY_HI | HPTE_R_KEY_LO
"""Storage key 31: what KVM puts on an ABSENT entry for emulated MMIO (P7)."""


def kvmppc_hpte_page_shifts(v: int, r: int) -> tuple[int, int]:
    """(base page shift, actual page shift) of an entry, or (0, 0) for an encoding KVM
    does not support. Small entries are 4 KiB; large ones say their sizes in LP: 16 MiB,
    64 KiB, 16 GiB, and the mixed sizes (a 64 KiB page in a 4 KiB segment, ...).

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:kvmppc_hpte_page_shifts (v6.18)
    """
    if not v & HPTE_V_LARGE:
        return 12, 12
    lp_high = (r >> 16) & 0xF
    lp_low = (r >> LP_SHIFT) & 0xF
    # (LP bits 12-15, LP bits 16-19) -> (base shift, actual shift); None: any high bits.
    encodings = {
        (0, 0): (24, 24),
        (1, None): (16, 16),
        (3, 0): (34, 34),
        (7, None): (12, 16),
        (8, 0): (16, 24),
        (8, 3): (12, 24),
    }
    found = encodings.get((lp_low, lp_high), encodings.get((lp_low, None)))
    return found if found is not None else (0, 0)


def kvmppc_hpte_base_page_shift(v: int, r: int) -> int:
    """kernel: arch/powerpc/include/asm/kvm_book3s_64.h:kvmppc_hpte_base_page_shift (v6.18)"""
    return kvmppc_hpte_page_shifts(v, r)[0]


def kvmppc_actual_pgsz(v: int, r: int) -> int:
    """The size in bytes of the page the entry maps, or 0 for an unsupported encoding.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:kvmppc_actual_pgsz (v6.18)
    """
    shift = kvmppc_hpte_page_shifts(v, r)[1]
    return 1 << shift if shift else 0


def hpte_rpn(ptel: int, psize: int, page_shift: int) -> int:
    """The frame number (in host pages of ``page_shift``) where the entry's page starts:
    the RPN with the bits below the page size dropped. On the guest's "r" word this is the
    base gfn, on the hardware's the host pfn.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:hpte_rpn (v6.18)
    """
    return ((ptel & HPTE_R_RPN) & ~(psize - 1)) >> page_shift


def hpte_is_writable(ptel: int) -> bool:
    """Does the protection allow a store (in supervisor state)?

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:hpte_is_writable (v6.18)
    """
    pp = ptel & (HPTE_R_PP0 | HPTE_R_PP)
    return pp not in (PP_RXRX, PP_RXXX)


def hpte_make_readonly(ptel: int) -> int:
    """The same entry without write permission: RXXX where only the supervisor could
    access, RXRX otherwise.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:hpte_make_readonly (v6.18)
    """
    if ptel & HPTE_R_PP0 or (ptel & HPTE_R_PP) == PP_RWXX:
        return (ptel & ~HPTE_R_PP) | PP_RXXX
    return ptel | PP_RXRX


def hpte_cache_flags_ok(ptel: int, is_ci: bool) -> bool:
    """Do the guest's WIMG bits suit the host page? Normal memory must be mapped M only
    (SAO, W|I|M, counts as M); cache-inhibited host memory must be mapped I and not W.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:hpte_cache_flags_ok (v6.18)
    """
    wimg = ptel & HPTE_R_WIMG
    if wimg == HPTE_R_W | HPTE_R_I | HPTE_R_M:
        wimg = HPTE_R_M
    if not is_ci:
        return wimg == HPTE_R_M
    return not wimg & HPTE_R_W and bool(wimg & HPTE_R_I)


def is_mmio_hpte(v: int, r: int) -> bool:
    """An entry KVM created for emulated MMIO: ABSENT, with storage key 31 (P7).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:is_mmio_hpte (v6.18)
    """
    return bool(v & HPTE_V_ABSENT) and (r & KEY_MMIO) == KEY_MMIO


def hpte_guest_view(v: int, r: int, guest_rpte: int) -> tuple[int, int]:
    """What the guest reads for an entry whose words are ``v`` and ``r`` in the table.

    The lock bit is dropped, an ABSENT entry reads as VALID (the guest entered it; that the
    host took the page away is none of its business), and a valid entry's "r" is the one
    the guest wrote, with the R and C bits the hardware set since. A free entry's words are
    returned as they are, as the kernel does: PAPR leaves them undefined.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_read (v6.18)
    """
    v &= ~HPTE_V_HVLOCK
    if v & HPTE_V_ABSENT:
        v = (v & ~HPTE_V_ABSENT) | HPTE_V_VALID
    if v & HPTE_V_VALID:
        r = (guest_rpte | (r & (HPTE_R_R | HPTE_R_C))) & ~HPTE_GR_RESERVED
    return v, r
