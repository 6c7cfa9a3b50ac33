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

from kvmspec.fuzz.show.memslots import draw_memslots
from kvmspec.fuzz.show.replay import Replay, ShowError, check_step, replay_trace
from kvmspec.fuzz.show.svg import LINE, MARGIN, Canvas
from kvmspec.fuzz.show.timeline import draw_failure, draw_timeline

__all__ = ["CSS_CLASSES", "ShowError", "render_svg"]

CSS_CLASSES = {
    "kvmspec-show": "the <svg> element",
    "kvmspec-title": "the picture's title line (input, step, bug)",
    "kvmspec-memslots": "the group of the guest-physical map",
    "kvmspec-memslot": "one memslot's rectangle on the gpa axis (data-slot, data-as-id);"
    " with kvmspec-readonly, kvmspec-dirty-log, kvmspec-gmem, kvmspec-invalid as flagged",
    "kvmspec-invalid-hatch": "the hatching over an INVALID slot",
    "kvmspec-alias": "the arc joining two slots that share host memory",
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
    from kvmspec.fuzz.seed_bugs import SEED_BUGS

    chosen = {seed.name: seed for seed in SEED_BUGS}.get(bug)
    if chosen is None:
        names = ", ".join(seed.name for seed in SEED_BUGS)
        raise ShowError(f"unknown bug {bug!r} (one of: {names})")
    from kvmspec.fuzz.show.families import harness_plant

    with chosen.plant(), harness_plant(bug):
        yield


def run(path: Path, step: int | None) -> Replay:
    """Run the input at ``path`` to ``step`` (None: to its end)."""
    check_step(step)
    if not path.is_file():
        raise ShowError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        return replay_trace(path, step)
    if path.suffix == ".bin":
        from kvmspec.fuzz.show.families import family_of, replay_harness

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
    draw_memslots(canvas, replay.kvm)
    draw_translations(canvas, replay)
    return canvas.render(title)


def draw_translations(canvas: Canvas, replay: Replay) -> None:
    """The section of the VM's MMU, whichever it is."""
    from kvmspec.reference.arm64.mmu import Arm64Mmu

    arch = replay.kvm.arch
    if isinstance(arch, Arm64Mmu):
        from kvmspec.fuzz.show.arm64 import draw_arm64

        draw_arm64(canvas, arch)
        return
    from kvmspec.reference.x86.mmu_page import ShadowMmuState

    if isinstance(arch, ShadowMmuState):
        from kvmspec.fuzz.show.x86 import draw_x86

        draw_x86(canvas, arch)
        return
    from kvmspec.reference.ppc.hpt_mmu import HptMmu

    if isinstance(arch, HptMmu):
        from kvmspec.fuzz.show.ppc import draw_ppc

        draw_ppc(canvas, replay.kvm, arch)
        return
    from kvmspec.reference.flat_mmu import FlatMmu

    if isinstance(arch, FlatMmu):
        from kvmspec.fuzz.show.flat import draw_flat

        draw_flat(canvas, arch)
        return
    canvas.text(MARGIN, canvas.y + 12, f"({type(arch).__name__}: no picture of this MMU)", "note")
    canvas.advance(LINE)
