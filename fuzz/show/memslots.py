"""The guest-physical map: every memslot of every address space, along the gpa axis.

What a reader (a vCPU fault, an MMU notifier) sees is each address space's *active* set
(``kvm->memslots[as_id]``); during an update the active set may hold the INVALID copy of a
slot being deleted or moved (seed 000), which is drawn hatched. Slots are drawn to scale:
the axis is cut at every slot boundary, the pieces a slot covers are linear in their size
(with a minimum width so a one-page slot stays visible), and an empty stretch is drawn to
the same scale up to :data:`GAP_MOST` units, beyond which it is compressed to that width,
marked with a break and labelled with its size. Two slots whose host memory overlaps (an
alias: two gpa ranges of one hva range) are joined by an arc over their shared part.

kernel: include/linux/kvm_host.h:struct kvm_memslots, struct kvm_memory_slot (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

from kvmspec.fuzz.show.svg import CHAR, LINE, MARGIN, WIDTH, Canvas, fit

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot

AXIS_LEFT = MARGIN + 44
"""Where the axis starts: room for the lane labels (``as 0``)."""
AXIS_RIGHT = WIDTH - MARGIN
LANE = 26
"""The height of one address space's lane of slots."""
PIECE_LEAST = 6.0
"""The smallest width of a piece of the axis a slot covers."""
GAP_LEAST, GAP_MOST = 10.0, 48.0
"""An empty stretch is at least GAP_LEAST wide, and at most GAP_MOST (then compressed)."""
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size_text(size: int) -> str:
    """A byte count in binary units: ``4 KiB``, ``1.5 GiB``."""
    value, unit = float(size), 0
    while value >= 1024 and unit < len(UNITS) - 1:
        value /= 1024
        unit += 1
    shown = f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.3g}"
    return f"{shown} {UNITS[unit]}"


_FLAGS = (
    ("readonly", "READONLY", "readonly"),
    ("dirty_logging", "LOG_DIRTY_PAGES", "dirty-log"),
    ("is_gmem", "guest_memfd", "gmem"),
    ("invalid", "INVALID", "invalid"),
)
"""Each flag a slot may show: its KvmMemorySlot property, its name in the uAPI (INVALID is the
kernel's own), and its CSS class."""


def flag_names(slot: KvmMemorySlot) -> list[str]:
    """The slot's flags as the uAPI names them."""
    return [name for attribute, name, _ in _FLAGS if getattr(slot, attribute)]


def slot_classes(slot: KvmMemorySlot) -> tuple[str, ...]:
    """The CSS classes of a slot's rectangle: ``kvmspec-memslot`` and one per flag."""
    return ("memslot", *(css for attribute, _, css in _FLAGS if getattr(slot, attribute)))


@dataclass(frozen=True)
class Piece:
    """One stretch of the axis between two slot boundaries: gfns [start, end), drawn from
    ``x`` to ``x + width``; ``covered`` when some slot holds it."""

    start: int
    end: int
    x: float
    width: float
    covered: bool

    @property
    def compressed(self) -> bool:
        return not self.covered and self.width >= GAP_MOST - 0.01


class GpaAxis:
    """The piecewise-linear map from gfn to x described in the module docstring."""

    def __init__(self, slots: list[KvmMemorySlot]) -> None:
        bounds = sorted({gfn for slot in slots for gfn in (slot.base_gfn, slot.end_gfn)})
        stretches = [
            (start, end, any(s.base_gfn < end and start < s.end_gfn for s in slots))
            for start, end in pairwise(bounds)
        ]
        span = AXIS_RIGHT - AXIS_LEFT
        least = min(PIECE_LEAST, span / max(len(stretches), 1))
        gap_least = min(GAP_LEAST, least * 2)
        covered_total = sum(end - start for start, end, covered in stretches if covered) or 1
        scale = span / covered_total
        for _ in range(8):  # settle the scale: fixed-width pieces leave less for the others
            widths = [
                self._width(end - start, covered, scale, least, gap_least)
                for start, end, covered in stretches
            ]
            linear = sum(
                end - start
                for (start, end, covered), width in zip(stretches, widths, strict=True)
                if covered and width > least
            )
            fixed = sum(
                width
                for (start, end, covered), width in zip(stretches, widths, strict=True)
                if not (covered and width > least)
            )
            if linear == 0:
                break
            scale = max((span - fixed) / linear, 1e-30)
        widths = [
            self._width(end - start, covered, scale, least, gap_least)
            for start, end, covered in stretches
        ]
        total = sum(widths) or 1.0
        squeeze = min(1.0, span / total)  # many tiny slots: everything shrinks to fit
        self.pieces: list[Piece] = []
        x = float(AXIS_LEFT)
        for (start, end, covered), width in zip(stretches, widths, strict=True):
            self.pieces.append(Piece(start, end, x, width * squeeze, covered))
            x += width * squeeze

    @staticmethod
    def _width(length: int, covered: bool, scale: float, least: float, gap_least: float) -> float:
        if covered:
            return max(length * scale, least)
        return min(max(length * scale, gap_least), GAP_MOST)

    def x(self, gfn: int) -> float:
        """Where ``gfn`` lies (linear inside its piece)."""
        for piece in self.pieces:
            if piece.start <= gfn <= piece.end:
                return piece.x + piece.width * (gfn - piece.start) / (piece.end - piece.start)
        return float(AXIS_LEFT)


def active_slots(kvm: Kvm) -> list[KvmMemorySlot]:
    """Every slot of every address space's active set, by address space and gfn."""
    slots = [slot for as_id in range(len(kvm.memslot_sets)) for slot in kvm.memslots(as_id)]
    return sorted(slots, key=lambda slot: (slot.as_id, slot.base_gfn, slot.id))


def aliases(
    slots: list[KvmMemorySlot], page_size: int
) -> list[tuple[KvmMemorySlot, int, int, KvmMemorySlot, int, int]]:
    """Pairs of slots whose host memory overlaps: (slot, first gfn, end gfn) of the shared
    hva range in each."""
    found = []
    for n, one in enumerate(slots):
        for other in slots[n + 1 :]:
            start = max(one.userspace_addr, other.userspace_addr)
            end = min(
                one.userspace_addr + one.npages * page_size,
                other.userspace_addr + other.npages * page_size,
            )
            if start < end:
                found.append(
                    (
                        one,
                        one.base_gfn + (start - one.userspace_addr) // page_size,
                        one.base_gfn + -(-(end - one.userspace_addr) // page_size),
                        other,
                        other.base_gfn + (start - other.userspace_addr) // page_size,
                        other.base_gfn + -(-(end - other.userspace_addr) // page_size),
                    )
                )
    return found


def slot_label(slot: KvmMemorySlot, page_shift: int) -> str:
    """One line about a slot: its id, gfn range, gpa, size, hva and flags."""
    flags = " ".join(flag_names(slot)) or "-"
    return (
        f"as {slot.as_id} slot {slot.id}: gfn {slot.base_gfn:#x}-{slot.end_gfn - 1:#x} "
        f"(gpa {slot.base_gfn << page_shift:#x}, {size_text(slot.npages << page_shift)}) "
        f"hva {slot.userspace_addr:#x}  {flags}"
    )


def slot_names(kvm: Kvm, private_slot: int | None) -> dict[tuple[int, int], str]:
    """What the picture calls the slots nobody's VMM created: the architecture's internal
    slots (address space 0), and the slot a trace's guest keeps its page tables in."""
    names = {
        (0, slot_id): f"KVM's internal slot {name}" for name, slot_id in kvm.profile.internal_slots
    }
    if private_slot is not None:
        names[(0, private_slot)] = "the trace guest's own slot, for its page tables"
    return names


def draw_memslots(canvas: Canvas, kvm: Kvm, private_slot: int | None = None) -> None:
    """The guest-physical map section (see the module docstring); ``private_slot`` is the
    id of a trace guest's slot, if the input is a trace."""
    page_shift = kvm.profile.page_shift
    names = slot_names(kvm, private_slot)
    slots = active_slots(kvm)
    canvas.open_group("memslots")
    canvas.text(MARGIN, canvas.y + 12, "Guest-physical map: the active memslots", "heading")
    canvas.advance(LINE + 8)
    if not slots:
        canvas.text(MARGIN, canvas.y + 12, "no memslots", "note")
        canvas.advance(LINE + 4)
        canvas.close_group()
        return
    axis = GpaAxis(slots)
    spaces = range(len(kvm.memslot_sets))
    arcs = aliases(slots, 1 << page_shift)
    top = canvas.y + (14 if arcs else 0)
    for lane, as_id in enumerate(spaces):
        y = top + lane * (LANE + 6)
        canvas.text(MARGIN, y + LANE / 2 + 4, f"as {as_id}", "label")
        for slot in (s for s in slots if s.as_id == as_id):
            x0, x1 = axis.x(slot.base_gfn), axis.x(slot.end_gfn)
            canvas.rect(
                x0,
                y,
                x1 - x0,
                LANE,
                slot_classes(slot),
                slot_label(slot, page_shift),
                slot=slot.id,
                as_id=slot.as_id,
            )
            if slot.invalid:
                canvas.hatch(x0, y, x1 - x0, LANE)
            if x1 - x0 > 14:
                canvas.text(
                    (x0 + x1) / 2,
                    y + LANE / 2 + 4,
                    fit(str(slot.id), x1 - x0 - 4),
                    "label",
                    anchor="middle",
                )
    lanes_bottom = top + len(spaces) * (LANE + 6) - 6
    for one, start, end, other, other_start, other_end in arcs:
        a = (axis.x(start) + axis.x(end)) / 2
        b = (axis.x(other_start) + axis.x(other_end)) / 2
        ya = top + one.as_id * (LANE + 6)
        yb = top + other.as_id * (LANE + 6)
        lift = min(ya, yb) - 12
        canvas.path(
            f"M {a:.1f} {ya:.1f} C {a:.1f} {lift:.1f} {b:.1f} {lift:.1f} {b:.1f} {yb:.1f}", "alias"
        )
        canvas.text(
            (a + b) / 2, lift + 2, f"alias {one.id}~{other.id}", "alias-label", anchor="middle"
        )
    axis_y = lanes_bottom + 6
    canvas.line(AXIS_LEFT, axis_y, AXIS_RIGHT, axis_y, "axis")
    last_label = -1e9
    for piece in axis.pieces:
        if piece.compressed:
            middle = piece.x + piece.width / 2
            canvas.path(
                f"M {middle - 4:.1f} {axis_y + 4:.1f} L {middle:.1f} {axis_y - 4:.1f} "
                f"M {middle:.1f} {axis_y + 4:.1f} L {middle + 4:.1f} {axis_y - 4:.1f}",
                "gap",
            )
            canvas.text(
                middle,
                axis_y + 24,
                size_text((piece.end - piece.start) << page_shift),
                "tick",
                anchor="middle",
            )
        label = f"{piece.start << page_shift:#x}"
        room = AXIS_RIGHT - piece.x  # a label near the right end ends there instead
        if piece.covered and piece.x - last_label >= 76 and room >= len(label) * CHAR:
            canvas.text(piece.x, axis_y + 12, label, "tick")
            last_label = piece.x
    if AXIS_RIGHT - last_label >= 150:
        end = axis.pieces[-1].end << page_shift
        canvas.text(AXIS_RIGHT, axis_y + 12, f"{end:#x}", "tick", anchor="end")
    canvas.advance(axis_y + 30 - canvas.y)
    for slot in slots:
        classes = slot_classes(slot)
        canvas.rect(MARGIN, canvas.y + 3, 10, 10, ("memslot-key", *classes[1:]))
        name = names.get((slot.as_id, slot.id))
        label = slot_label(slot, page_shift) + (f"  ({name})" if name else "")
        canvas.text(MARGIN + 16, canvas.y + 12, label, "label")
        canvas.advance(LINE)
    for one, start, end, other, other_start, other_end in arcs:
        canvas.text(
            MARGIN,
            canvas.y + 12,
            f"alias: as {one.as_id} slot {one.id} gfn {start:#x}-{end - 1:#x} and as "
            f"{other.as_id} slot {other.id} gfn {other_start:#x}-{other_end - 1:#x} share "
            "host memory",
            "alias-label",
        )
        canvas.advance(LINE)
    canvas.advance(8)
    canvas.close_group()
