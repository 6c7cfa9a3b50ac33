"""The guest's hypercalls in the POWER harness, and what PAPR says each must answer: the
bodies of the hypercall actions of :class:`~kvmspec.fuzz.ppc_harness.PpcHarness` (which keeps
one thin method per action, so that the decoders' action names keep their meaning), each
given the harness and the effective address its action picked.

What the guest is told, checked against what it did:

* each hypercall's status and the words it returns, against the entries the guest entered
  (``COHERENCE``); H_ENTER takes the first free slot of the group, or exactly the one named
  with H_EXACT; a hypercall with an argument out of range answers H_PARAMETER and changes
  nothing;
* H_BULK_REMOVE answers each request in place with a response word: its completion code,
  the request's condition flags and entry index echoed, and for a removal the entry's R and
  C in their own field, nothing else (``COHERENCE``);
* the R and C the guest is shown (H_READ, the removals, H_CLEAR_REF and H_CLEAR_MOD) are
  only those its own accesses and stores through that entry earned since it was entered,
  and a removal loses none that H_READ showed just before (P4; for an absent entry the two
  need not agree in v6.18, the known kernel finding :data:`STALE_ABSENT_RC`);
* removing or changing an MMIO entry voids every vCPU's MMIO cache entry that answered for
  its address just before (P7).

kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_do_h_enter, kvmppc_do_h_remove,
kvmppc_h_bulk_remove, kvmppc_h_protect, kvmppc_h_read, kvmppc_h_clear_ref,
kvmppc_h_clear_mod; arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_unmap_hpte;
arch/powerpc/include/asm/hvcall.h (v6.18)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.ppc.fault import MmioHpteCacheEntry, mmio_cache_search
from kvmspec.reference.ppc.hcalls import (
    H_ANDCOND,
    H_AVPN,
    H_BULK_REMOVE_ANDCOND,
    H_BULK_REMOVE_AVPN,
    H_BULK_REMOVE_END,
    H_BULK_REMOVE_NOT_FOUND,
    H_BULK_REMOVE_PARM,
    H_BULK_REMOVE_PTEX,
    H_BULK_REMOVE_RC,
    H_BULK_REMOVE_REQUEST,
    H_BULK_REMOVE_RESPONSE,
    H_BULK_REMOVE_SUCCESS,
    H_NOT_FOUND,
    H_PARAMETER,
    H_PTEG_FULL,
    H_READ_4,
    H_SUCCESS,
    kvmppc_do_h_enter,
    kvmppc_do_h_remove,
    kvmppc_h_bulk_remove,
    kvmppc_h_clear_mod,
    kvmppc_h_clear_ref,
    kvmppc_h_protect,
    kvmppc_h_read,
)
from kvmspec.reference.ppc.hpt import HPTES_PER_GROUP
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_R,
    HPTE_V_ABSENT,
    HPTE_V_BOLTED,
    HPTE_V_LARGE,
    HPTE_V_VALID,
    PP_RWXX,
    PP_RXRX,
    hpte_is_writable,
    is_mmio_hpte,
)

if TYPE_CHECKING:
    from kvmspec.fuzz.ppc_harness import Entered, PpcHarness

STALE_ABSENT_RC = "P4: H_READ and the removal disagree on the R and C of absent HPTE"
"""How P4 violations of an absent entry's R and C begin (a kernel finding: see
tests/test_ppc_fault.py)."""


def bulk_rc(response: int) -> int:
    """The R and C an H_BULK_REMOVE response word reports for its entry (bits 58 and 59,
    the "r" word's R and C shifted up by 51)."""
    return response >> (56 - 5) & (HPTE_R_R | HPTE_R_C)


# -- the hypercalls ------------------------------------------------------------------------------


def check_entered(
    harness: PpcHarness, status: int, index: int, entry: Entered, asked: int, exact: bool
) -> None:
    """H_ENTER of ``entry`` at ``asked`` (exactly there with H_EXACT) answered ``status`` and
    ``index``: the first free slot it could take, or H_PTEG_FULL; the harness records what
    the guest entered."""
    group = asked // HPTES_PER_GROUP
    candidates = [asked] if exact else [group * 8 + i for i in range(HPTES_PER_GROUP)]
    free = [i for i in candidates if i not in harness.entered]
    if free:
        harness._expect(
            (status, index) == (H_SUCCESS, free[0]),
            f"H_ENTER at {asked:#x}: ({status}, {index:#x}), slot {free[0]:#x} was free",
        )
    else:
        harness._expect(status == H_PTEG_FULL, f"H_ENTER in a full group: {status}")
    if status == H_SUCCESS:
        harness._record(index, entry)


def h_remove(harness: PpcHarness, ea: int, how: int) -> None:
    """H_REMOVE of the guest's entry for ``ea`` (or of a free slot of its group),
    unconditionally, with H_AVPN naming its AVPN, or with H_ANDCOND on BOLTED."""
    index = harness.index_of(ea)
    target = index if index is not None else harness._group(ea) * HPTES_PER_GROUP + 7
    entry = harness.entered.get(target)
    argument = {0: 0, H_AVPN: entry.v & ~0x7F if entry else 0, H_ANDCOND: HPTE_V_BOLTED}
    seen = rc_seen(harness, target) if entry is not None else None
    cached = mmio_cached(harness, target, ea)
    status, v, r = kvmppc_do_h_remove(harness.kvm, how, target, argument[how])
    harness.log(f"H_REMOVE {target:#x} how {how:#x}: {status}")
    if entry is None:
        harness._expect(status == H_NOT_FOUND, f"H_REMOVE of free {target:#x}: {status}")
        return
    if how == H_ANDCOND and entry.v & HPTE_V_BOLTED:
        harness._expect(status == H_NOT_FOUND, f"H_ANDCOND BOLTED removed {target:#x}")
        return
    harness._expect(
        status == H_SUCCESS
        and v == entry.v | HPTE_V_VALID
        and r & ~(HPTE_R_R | HPTE_R_C) == entry.r,
        f"H_REMOVE {target:#x}: ({status}, {v:#x}, {r:#x}), the guest entered {entry}",
    )
    if status == H_SUCCESS and seen is not None:
        check_removed_rc(harness, "H_REMOVE", target, seen, r & (HPTE_R_R | HPTE_R_C))
    if status == H_SUCCESS:
        check_mmio_cache_voided(harness, "H_REMOVE", target, ea, cached)
    del harness.entered[target]


def h_bulk_remove(harness: PpcHarness, eas: tuple[int, ...]) -> None:
    """H_BULK_REMOVE of the guest's entries for up to four addresses (absolute requests)."""
    picked = []
    for ea in eas[:4]:
        index = harness.index_of(ea)
        if index is not None and index not in picked:
            picked.append(index)
    args = []
    for index in picked:
        args += [H_BULK_REMOVE_REQUEST | index, 0]
    args += [H_BULK_REMOVE_END, 0] * (4 - len(picked))
    seen = [rc_seen(harness, index) for index in picked]
    cached = [mmio_cached(harness, index, harness.entered[index].ea) for index in picked]
    status, out = kvmppc_h_bulk_remove(harness.kvm, args)
    harness._expect(status == H_SUCCESS, f"H_BULK_REMOVE of {picked}: {status}")
    for n, index in enumerate(picked):
        check_bulk_response(harness, args[2 * n], out[2 * n], H_BULK_REMOVE_SUCCESS)
        check_removed_rc(harness, "H_BULK_REMOVE", index, seen[n], bulk_rc(out[2 * n]))
        ea = harness.entered[index].ea
        check_mmio_cache_voided(harness, "H_BULK_REMOVE", index, ea, cached[n])
        del harness.entered[index]


def h_bulk_remove_cond(harness: PpcHarness, ea: int, how: int) -> None:
    """H_BULK_REMOVE of one request, for the guest's entry for ``ea`` (or a free slot of its
    group), with H_REMOVE's condition ``how`` as a bulk condition (absolute, AVPN naming its
    AVPN, ANDCOND on BOLTED): found exactly when that H_REMOVE would remove it."""
    index = harness.index_of(ea)
    target = index if index is not None else harness._group(ea) * HPTES_PER_GROUP + 7
    entry = harness.entered.get(target)
    condition = {0: 0, H_AVPN: H_BULK_REMOVE_AVPN, H_ANDCOND: H_BULK_REMOVE_ANDCOND}[how]
    argument = {0: 0, H_AVPN: entry.v & ~0x7F if entry else 0, H_ANDCOND: HPTE_V_BOLTED}
    request = H_BULK_REMOVE_REQUEST | condition | target
    seen = rc_seen(harness, target) if entry is not None else None
    cached = mmio_cached(harness, target, ea)
    status, out = kvmppc_h_bulk_remove(
        harness.kvm, [request, argument[how]] + [H_BULK_REMOVE_END, 0] * 3
    )
    found = not out[0] & H_BULK_REMOVE_NOT_FOUND
    harness.log(f"H_BULK_REMOVE {target:#x} how {how:#x}: {status}, {out[0]:#x}")
    removes = entry is not None and not (how == H_ANDCOND and entry.v & HPTE_V_BOLTED)
    harness._expect(
        status == H_SUCCESS and found == removes,
        f"H_BULK_REMOVE {target:#x} how {how:#x}: {out[0]:#x}, the guest entered {entry}",
    )
    code = H_BULK_REMOVE_SUCCESS if removes else H_BULK_REMOVE_NOT_FOUND
    check_bulk_response(harness, request, out[0], code)
    if removes and seen is not None and found:
        check_removed_rc(harness, "H_BULK_REMOVE", target, seen, bulk_rc(out[0]))
        check_mmio_cache_voided(harness, "H_BULK_REMOVE", target, ea, cached)
    if removes:
        del harness.entered[target]


def h_protect(harness: PpcHarness, ea: int, writable: bool) -> None:
    """H_PROTECT of the guest's entry for ``ea`` to read-write or read-only. A valid
    read-only entry stays read-only in hardware (P8); a changed MMIO entry is cached by
    no vCPU any more (P7)."""
    index = harness.index_of(ea)
    if index is None:
        return
    hpt = harness.mmu.hpt
    was_ro = hpt.v(index) & HPTE_V_VALID and not hpte_is_writable(hpt.r(index))
    cached = mmio_cached(harness, index, ea)
    pp = PP_RWXX if writable else PP_RXRX
    status = kvmppc_h_protect(harness.kvm, pp, index, 0)
    harness._expect(status == H_SUCCESS, f"H_PROTECT {index:#x}: {status}")
    if status == H_SUCCESS:
        check_mmio_cache_voided(harness, "H_PROTECT", index, ea, cached)
    entry = harness.entered[index]
    harness.entered[index] = replace(entry, r=(entry.r & ~3) | pp)
    if was_ro and hpt.v(index) & HPTE_V_VALID and hpte_is_writable(hpt.r(index)):
        harness.found.append(f"P8: H_PROTECT made valid read-only HPTE {index:#x} writable")


def h_read(harness: PpcHarness, ea: int, four: bool) -> None:
    """H_READ of the guest's entry for ``ea`` (of its quad with H_READ_4)."""
    index = harness.index_of(ea)
    target = index if index is not None else harness._group(ea) * HPTES_PER_GROUP
    status, entries = kvmppc_h_read(harness.kvm, H_READ_4 if four else 0, target)
    harness._expect(status == H_SUCCESS and len(entries) == (4 if four else 1), "H_READ")


def h_clear_ref_or_mod(harness: PpcHarness, ea: int, mod: bool) -> None:
    """H_CLEAR_MOD or H_CLEAR_REF of the guest's entry for ``ea``."""
    index = harness.index_of(ea)
    if index is None:
        return
    clear = kvmppc_h_clear_mod if mod else kvmppc_h_clear_ref
    status, gr = clear(harness.kvm, 0, index)
    call = f"H_CLEAR_{'MOD' if mod else 'REF'}"
    harness._expect(
        status == H_SUCCESS and gr & ~(HPTE_R_R | HPTE_R_C) == harness.entered[index].r,
        f"{call} {index:#x}: ({status}, {gr:#x})",
    )
    check_rc_earned(harness, call, index, gr & (HPTE_R_R | HPTE_R_C))


def h_invalid(harness: PpcHarness, call: str, v: int, r: int, group: int) -> None:
    """One of :data:`~kvmspec.fuzz.ppc_harness.INVALID_HCALLS`, made from the words ``v`` and
    ``r`` of a valid entry whose group starts at index ``group``: H_PARAMETER, and the HPT
    (every entry and the guest's view of it) exactly as it was."""
    hpt = harness.mmu.hpt
    before = hpt_snapshot(harness)
    past = hpt.npte
    status: int
    if call.startswith("enter"):
        if call == "enter_page_size":
            v, r = v | HPTE_V_LARGE, r | 0xF << 12  # LP 0xF: no such size
        elif call == "enter_16m_page":
            v, r = v | HPTE_V_LARGE, r & ~0xFF000  # LP 0: 16 MiB
        index = past if call == "enter_index" else group
        enter = kvmppc_do_h_enter(harness.kvm, harness.host, 0, index, v, r)
        status, _ = run_to_completion(enter)
    elif call.startswith("bulk"):
        request = H_BULK_REMOVE_REQUEST | past if call == "bulk_index" else 2 << 62
        status, out = kvmppc_h_bulk_remove(harness.kvm, [request, 0] + [H_BULK_REMOVE_END, 0] * 3)
        check_bulk_response(harness, request, out[0], H_BULK_REMOVE_PARM)
    elif call == "remove_index":
        status = kvmppc_do_h_remove(harness.kvm, 0, past, 0)[0]
    elif call == "protect_index":
        status = kvmppc_h_protect(harness.kvm, PP_RWXX, past, 0)
    elif call == "read_index":
        status = kvmppc_h_read(harness.kvm, 0, past)[0]
    else:
        clear = kvmppc_h_clear_mod if call == "clear_mod_index" else kvmppc_h_clear_ref
        status = clear(harness.kvm, 0, past)[0]
    harness.log(f"{call}: {status}")
    harness._expect(status == H_PARAMETER, f"{call}: {status}, not H_PARAMETER")
    harness._expect(hpt_snapshot(harness) == before, f"{call} changed the HPT")


def hpt_snapshot(harness: PpcHarness) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    """Every entry of the HPT, and the guest's view of each (its guest_rpte)."""
    hpt = harness.mmu.hpt
    entries = {index: (hpt.v(index), hpt.r(index)) for index in sorted(hpt.hptes)}
    return entries, {index: rev.guest_rpte for index, rev in sorted(hpt.rev.items())}


# -- H_BULK_REMOVE's response words -------------------------------------------------------------


def check_bulk_response(harness: PpcHarness, request: int, response: int, code: int) -> None:
    """An H_BULK_REMOVE request is answered in place by a response word (type 2) with
    its completion ``code``, the request's condition flags and entry index echoed, and
    for a removal the entry's R and C in their own field; nothing else.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_bulk_remove;
    arch/powerpc/include/asm/hvcall.h (v6.18)
    """
    echoed = request & (H_BULK_REMOVE_ANDCOND | H_BULK_REMOVE_AVPN | H_BULK_REMOVE_PTEX)
    expected = H_BULK_REMOVE_RESPONSE | code | echoed
    rc_field = H_BULK_REMOVE_RC if code == H_BULK_REMOVE_SUCCESS else 0
    harness._expect(
        response & ~rc_field == expected,
        f"H_BULK_REMOVE answered request {request:#x} with {response:#x}, not "
        f"{expected:#x}{' and R/C' if rc_field else ''}",
    )


# -- the R and C the guest sees ------------------------------------------------------------------


def unearned_rc(harness: PpcHarness, call: str, index: int, rc: int) -> str | None:
    """P4: the R and C the guest is shown for its entry at ``index`` are the hardware's,
    set by the guest's own accesses (R) and stores (C) through that entry since it was
    entered; KVM only ever moves them between the hardware word, the guest's view and
    its rmap, never makes them up.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_read, kvmppc_do_h_remove;
    arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_unmap_hpte (v6.18)
    """
    ea = harness.entered[index].ea
    referenced = HPTE_R_R if ea in harness.referenced else 0
    earned = referenced | (HPTE_R_C if ea in harness.stored else 0)
    if not rc & ~earned:
        return None
    did = "stored to" if earned & HPTE_R_C else "loaded from" if earned else "entered"
    return f"P4: {call} of HPTE {index:#x} shows R/C {rc:#x}, the guest only {did} ea {ea:#x}"


def check_rc_earned(harness: PpcHarness, call: str, index: int, rc: int) -> None:
    unearned = unearned_rc(harness, call, index, rc)
    if unearned is not None:
        harness.found.append(unearned)


def rc_seen(harness: PpcHarness, index: int) -> tuple[int, bool]:
    """The R and C the guest reads for entry ``index`` now (H_READ), and whether the
    entry is absent (no hardware can add to them before a removal)."""
    rc = HPTE_R_R | HPTE_R_C
    absent = bool(harness.mmu.hpt.v(index) & HPTE_V_ABSENT)
    return kvmppc_h_read(harness.kvm, 0, index)[1][0][1] & rc, absent


def check_removed_rc(
    harness: PpcHarness, call: str, index: int, seen: tuple[int, bool], rc: int
) -> None:
    """P4: a removal reports the entry's R and C as the guest's view has them. The
    hardware may still set bits up to the tlbie (P3), so for a valid entry the report
    holds at least those the guest read (H_READ) just before. For an absent entry no
    hardware can add any, so the two must agree; in v6.18 they need not (a known
    kernel finding, :data:`STALE_ABSENT_RC`). And never any the guest did not earn."""
    check_rc_earned(harness, call, index, rc)
    seen_rc, absent = seen
    if absent and rc != seen_rc:
        harness.found.append(
            f"{STALE_ABSENT_RC} {index:#x}: H_READ showed {seen_rc:#x}, {call} reported {rc:#x}"
        )
    elif rc & seen_rc != seen_rc:
        harness.found.append(
            f"P4: {call} of HPTE {index:#x} reported R/C {rc:#x}, losing some of the "
            f"{seen_rc:#x} the guest read just before"
        )


# -- the MMIO cache after a removal or change ----------------------------------------------------


Cached = dict[int, MmioHpteCacheEntry]
"""The MMIO cache entry each vCPU answers ``ea`` with, by vCPU id."""


def mmio_cached(harness: PpcHarness, index: int, ea: int) -> Cached:
    """If entry ``index`` (the guest's for ``ea``) is one KVM keeps for emulated MMIO
    (absent, key 31): the vCPUs whose MMIO cache answers for ``ea`` now, with the cache
    entry that answers."""
    mmu = harness.mmu
    if not is_mmio_hpte(mmu.hpt.v(index), mmu.hpt.r(index)):
        return {}
    cached = {}
    for vcpu_id, vcpu in mmu.vcpu_arch.items():
        entry = mmio_cache_search(vcpu, ea, harness.segment, mmu.mmio_update)
        if entry is not None:
            cached[vcpu_id] = entry
    return cached


def check_mmio_cache_voided(
    harness: PpcHarness, call: str, index: int, ea: int, cached: Cached
) -> None:
    """P7: the guest removed or changed the MMIO entry ``index`` for ``ea``, which the
    ``cached`` entries of vCPUs' MMIO caches answered for: the kernel moves
    ``mmio_update`` on, so none of those entries answers any more. (Another, older entry
    may answer now: an HPT resize starts the count again, so an entry stamped before it
    can become current again. That is the known finding of
    :data:`~kvmspec.fuzz.ppc_harness.KNOWN_KERNEL_FINDINGS`, which check_mmio_cache
    reports; regression ppc-39861bb19d17 is such a run.)

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_do_h_remove,
    kvmppc_h_bulk_remove, kvmppc_h_protect (v6.18)
    """
    mmu = harness.mmu
    for vcpu_id, entry in sorted(cached.items()):
        if entry.mmio_update == mmu.mmio_update:
            harness.found.append(
                f"P7: {call} of MMIO HPTE {index:#x} left vCPU {vcpu_id}'s MMIO cache "
                f"entry for ea {ea:#x} current"
            )
