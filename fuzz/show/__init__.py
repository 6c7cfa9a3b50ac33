"""``kvmspec show``: a picture of the model's state after a trace or a fuzzer input, as SVG.

:func:`render_svg` runs the input (:mod:`kvmspec.fuzz.show.replay`) to the step asked for,
with a seed bug planted if one is named, and draws:

* the guest-physical map: every memslot of every address space to scale, with its flags,
  INVALID slots hatched and aliases joined (:mod:`kvmspec.fuzz.show.memslots`);
* the architecture's translation structure, sparsely (only what exists, large levels cut to
  their first entries and a "+N more" note): the x86 shadow MMU's roots, shadow pages and
  SPTEs; the arm64 stage-2 tables; the POWER hashed page table's groups in use;
* for a run that broke a rule: the rules with their statements and sources, and the
  timeline of the interleaving (which actor ran which step), the failing step highlighted.

The main elements carry stable CSS classes (``kvmspec-memslot``, ``kvmspec-pte``,
``kvmspec-timeline-step``, ...; the full list is :data:`CSS_CLASSES`), which the picture's
own stylesheet colours and the docs' browser test looks for. The docs site's
``kvmspec-show`` directive calls :func:`render_svg`; the CLI is
``kvmspec show TRACE [--step N] [--bug NAME] --svg OUT``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

from kvmspec.fuzz.seed_bugs import SEED_BUGS
from kvmspec.fuzz.show.arm64 import draw_arm64
from kvmspec.fuzz.show.families import family_of, replay_harness
from kvmspec.fuzz.show.flat import draw_flat
from kvmspec.fuzz.show.memslots import draw_memslots
from kvmspec.fuzz.show.ppc import draw_ppc
from kvmspec.fuzz.show.replay import Replay, ShowError, check_step, replay_trace
from kvmspec.fuzz.show.svg import LINE, MARGIN, Canvas
from kvmspec.fuzz.show.timeline import draw_failure, draw_timeline
from kvmspec.fuzz.show.x86 import draw_x86
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.x86.mmu_page import ShadowMmuState

__all__ = ["CSS_CLASSES", "ShowError", "render_svg"]

CSS_CLASSES: dict[str, str] = {
    # the picture
    "kvmspec-show": "the <svg> element",
    "kvmspec-title": "the title line: the input, the steps run, the bug planted",
    "kvmspec-heading": "a section's heading",
    "kvmspec-note": "a section's explanation, or a remark",
    "kvmspec-label": "a label (of a slot, a row, an entry)",
    "kvmspec-more": 'the "+N more" note where a table or a section is cut',
    # the failure and the timeline
    "kvmspec-failure-box": "the group of a failure (data-step: the step that broke a rule)",
    "kvmspec-failure": "the failure's frame",
    "kvmspec-rule": "a rule line: the failing step, each rule's statement and source",
    "kvmspec-rule-text": "a violation line as the checks reported it",
    "kvmspec-timeline": "the group of the timeline",
    "kvmspec-actor": "an actor's lane label (a vCPU, the host, the VMM, a kernel operation)",
    "kvmspec-timeline-step": "one step of the timeline (data-step, data-actor); with"
    " kvmspec-failing for the step that broke a rule, kvmspec-skipped for an action the"
    " decoder rejected",
    "kvmspec-failing": "see kvmspec-timeline-step",
    "kvmspec-skipped": "see kvmspec-timeline-step",
    # the guest-physical map
    "kvmspec-memslots": "the group of the guest-physical map",
    "kvmspec-memslot": "one memslot's rectangle on the gpa axis (data-as-id, data-slot); with"
    " kvmspec-readonly, kvmspec-dirty-log, kvmspec-gmem, kvmspec-invalid as its flags say",
    "kvmspec-memslot-key": "a slot's colour key in the list under the axis (same flag classes)",
    "kvmspec-readonly": "a READONLY slot",
    "kvmspec-dirty-log": "a slot with LOG_DIRTY_PAGES",
    "kvmspec-gmem": "a guest_memfd slot",
    "kvmspec-invalid": "an INVALID slot (the picture was taken in the middle of an update)",
    "kvmspec-invalid-hatch": "the hatching over an INVALID slot",
    "kvmspec-alias": "the arc joining two slots that share host memory",
    "kvmspec-alias-label": "an alias's label",
    "kvmspec-axis": "the gpa axis",
    "kvmspec-tick": "an address or size on the axis, a step number in the timeline",
    "kvmspec-gap": "the break mark of a compressed stretch of the axis with no slot",
    # the translations
    "kvmspec-shadow-mmu": "the group of the x86 shadow MMU",
    "kvmspec-stage2": "the group of the arm64 stage 2",
    "kvmspec-hpt": "the group of the POWER hashed page table (data-entries: entries in use)",
    "kvmspec-flat-mmu": "the group of the flat MMU (generic harness)",
    "kvmspec-tree": "a translation outline (data-entries: the entry rows drawn)",
    "kvmspec-table": "a table row: a shadow page, a stage-2 table page (data-level)",
    "kvmspec-root": "a root table: a vCPU's root shadow page, a stage-2 PGD page",
    "kvmspec-obsolete": "an obsolete shadow page (zapped, or older than the last fast zap)",
    "kvmspec-edge": "the line from a table to its entries",
    "kvmspec-pte": "one entry that exists: an SPTE, a stage-2 descriptor, an HPT entry, a flat"
    " translation (data-kind: leaf, block, page, mmio, locked, owner, nonpresent, valid,"
    " absent; data-level, data-gfn, data-ipa, data-index where they apply)",
    "kvmspec-huge": "a huge SPTE or a stage-2 block",
    "kvmspec-readonly-pte": "an entry without write permission",
    "kvmspec-mmio": "an MMIO SPTE, or an HPT entry KVM keeps for emulated MMIO",
    "kvmspec-locked": "a stage-2 descriptor LOCKED by a walker (break-before-make)",
    "kvmspec-absent": "an HPT entry made ABSENT (the host took the page), or an invalid"
    " stage-2 descriptor with an owner",
    "kvmspec-bolted": "a bolted HPT entry",
    "kvmspec-orphan": "an HPT entry the hardware translates that maps a gfn of no usable slot",
    "kvmspec-hpte-free": "a free entry of an HPT group in use",
    "kvmspec-rmap": "one guest page's rmap chain (POWER)",
    "kvmspec-bit": "one bit of an entry (W, A, D, AF, DBM, R, C, ...), kvmspec-set when set",
    "kvmspec-set": "see kvmspec-bit",
}
"""The stable classes of a picture's elements, and what each marks."""


def _ident(path: Path, step: int | None, bug: str | None) -> str:
    """A short name unique to one picture, deterministic (the hatch pattern's id)."""
    return hashlib.sha1(f"{path.name}|{step}|{bug}".encode()).hexdigest()[:8]


@contextlib.contextmanager
def planted(bug: str | None) -> Iterator[None]:
    """The seed bug ``bug`` (a name from kvmspec.fuzz.seed_bugs.SEED_BUGS) planted, or
    nothing."""
    if bug is None:
        yield
        return
    chosen = {seed.name: seed for seed in SEED_BUGS}.get(bug)
    if chosen is None:
        names = ", ".join(seed.name for seed in SEED_BUGS)
        raise ShowError(f"unknown bug {bug!r} (one of: {names})")
    with chosen.plant():
        yield


def run(path: Path, step: int | None) -> Replay:
    """Run the input at ``path`` to ``step`` (None: to its end)."""
    check_step(step)
    if not path.exists():
        raise ShowError(f"{path}: no such file")
    if not path.is_file():
        raise ShowError(f"{path}: not a file")
    if path.suffix == ".jsonl":
        return replay_trace(path, step)
    if path.suffix == ".bin":
        return replay_harness(path, family_of(path), step)
    raise ShowError(f"{path}: not a trace (.jsonl) or a fuzzer input (.bin)")


def render_svg(path: Path, step: int | None = None, bug: str | None = None) -> str:
    """The picture of the model after running ``path`` (a ``.jsonl`` trace or a ``.bin``
    fuzzer input) for ``step`` steps (None: all of them), with the seed bug ``bug``
    planted first (None: the reference as it is). Raises :class:`ShowError` (one line) for
    input it cannot draw."""
    path = Path(path)
    with planted(bug):
        replay = run(path, step)
        return draw(replay, _ident(path, step, bug), bug)


def draw(replay: Replay, ident: str, bug: str | None) -> str:
    """The picture of a run: title, failure and timeline, memslots, translations."""
    canvas = Canvas(ident)
    title = f"{replay.source} ({replay.kind}): after step {replay.applied}"
    if bug is not None:
        title += f", with {bug} planted"
    canvas.text(MARGIN, canvas.y + 14, title, "title")
    canvas.advance(LINE + 10)
    draw_failure(canvas, replay)
    draw_timeline(canvas, replay)
    draw_memslots(canvas, replay.kvm, replay.private_slot)
    draw_translations(canvas, replay)
    return canvas.render(title)


def draw_translations(canvas: Canvas, replay: Replay) -> None:
    """The section of the VM's MMU, whichever it is."""
    arch = replay.kvm.arch
    if isinstance(arch, Arm64Mmu):
        draw_arm64(canvas, arch)
    elif isinstance(arch, ShadowMmuState):
        draw_x86(canvas, arch)
    elif isinstance(arch, HptMmu):
        draw_ppc(canvas, replay.kvm, arch)
    elif isinstance(arch, FlatMmu):
        draw_flat(canvas, arch)
    else:
        canvas.text(MARGIN, canvas.y + 12, f"({type(arch).__name__}: not drawn)", "note")
        canvas.advance(LINE)
