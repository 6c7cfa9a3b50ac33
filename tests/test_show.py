"""``kvmspec show`` and kvmspec.fuzz.show.render_svg: every kind of input draws valid SVG whose
elements match the model (one memslot rectangle per active slot, one entry rectangle per
leaf), ``--step`` stops where asked, a planted seed bug draws its failure and timeline, and
every bad input is one line and exit status 2."""

from __future__ import annotations

import importlib.util
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmspec.fuzz import arm64_decoder
from kvmspec.fuzz.cli import main
from kvmspec.fuzz.show import CSS_CLASSES, ShowError, render_svg, run
from kvmspec.fuzz.show.families import family_of
from kvmspec.fuzz.show.memslots import active_slots
from kvmspec.fuzz.show.replay import Replay
from kvmspec.fuzz.show.svg import Canvas
from kvmspec.fuzz.show.tree import PER_TABLE, Node, capped, draw_outline
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.x86.mmu_page import ShadowMmuState
from kvmspec.reference.x86.spte import is_last_spte, is_shadow_present_pte
from kvmspec.spec.invariants.arm64 import stage2_leaves

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
SEEDS = ROOT / "corpus" / "seeds"
SVG = "{http://www.w3.org/2000/svg}"
FLUSH_ALL_BUG = "seed-001-flush-shadow-all-emptied"
SEED_000_BUG = "seed-000-invalid-slot-ignored-on-removal"

INPUTS = [
    EXAMPLES / "memslots.jsonl",
    EXAMPLES / "x86-shadow.bin",
    EXAMPLES / "arm64-stage2.bin",
    EXAMPLES / "ppc-hpt.bin",
    EXAMPLES / "seed-001.bin",
    EXAMPLES / "seed-000.bin",
    SEEDS / "generic" / "create-alias-delete.bin",
    SEEDS / "memslots" / "four-slots.bin",
    SEEDS / "x86" / "shadow-unsync-invlpg.bin",
    SEEDS / "trace" / "valid-dirty-ring.jsonl",
]


def classed(svg: str, name: str, tag: str = "rect") -> list[ET.Element]:
    """The elements of ``tag`` whose classes include ``kvmspec-<name>``."""
    root = ET.fromstring(svg)
    return [
        element
        for element in root.iter(f"{SVG}{tag}")
        if f"kvmspec-{name}" in element.get("class", "").split()
    ]


def model_leaves(replay: Replay) -> int:
    """How many translations the VM's MMU holds, counted from the model itself."""
    arch = replay.kvm.arch
    if isinstance(arch, Arm64Mmu):
        return 0 if arch.pgt is None else len(list(stage2_leaves(arch.pgt)))
    if isinstance(arch, ShadowMmuState):
        return sum(
            1
            for sp in arch.active_mmu_pages
            for spte in sp.spt.values()
            if is_shadow_present_pte(spte) and is_last_spte(spte, sp.role.level)
        )
    if isinstance(arch, HptMmu):
        return sum(1 for v, _ in arch.hpt.hptes.values() if v & 0x21)  # VALID or ABSENT
    assert isinstance(arch, FlatMmu)
    return len(arch.ptes)


def drawn_leaves(svg: str) -> int:
    """Entry rectangles that stand for a translation (not an invalid or MMIO entry)."""
    return sum(
        1
        for rect in classed(svg, "pte")
        if rect.get("data-kind") in {"leaf", "block", "page", "valid", "absent"}
    )


@pytest.mark.parametrize("path", INPUTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_each_input_draws_its_memslots_and_translations(path: Path) -> None:
    replay = run(path, None)
    svg = render_svg(path)
    ET.fromstring(svg)  # well-formed XML
    slots = active_slots(replay.kvm)
    rects = classed(svg, "memslot")
    assert len(rects) == len(slots) > 0
    assert {(r.get("data-as-id"), r.get("data-slot")) for r in rects} == {
        (str(slot.as_id), str(slot.id)) for slot in slots
    }
    assert drawn_leaves(svg) == model_leaves(replay)
    assert len(classed(svg, "timeline-step")) >= replay.applied
    assert not classed(svg, "failure")


def test_the_examples_show_what_the_docs_say() -> None:
    """The pictures the docs name have the features their captions promise."""
    memslots = render_svg(EXAMPLES / "memslots.jsonl")
    assert classed(memslots, "readonly") and classed(memslots, "dirty-log")
    assert classed(memslots, "alias", "path")
    assert classed(memslots, "gap", "path")  # 1 GiB to 3 GiB, and up to the guest's slot
    x86 = render_svg(EXAMPLES / "x86-shadow.bin")
    assert classed(x86, "huge") and classed(x86, "root")
    arm64 = render_svg(EXAMPLES / "arm64-stage2.bin")
    assert [r.get("data-kind") for r in classed(arm64, "huge")] == ["block"]
    assert "kvmspec-dirty-log" in arm64
    ppc = render_svg(EXAMPLES / "ppc-hpt.bin")
    kinds = {r.get("data-kind") for r in classed(ppc, "pte")}
    assert kinds == {"valid", "absent"} and classed(ppc, "bolted")
    set_bits = {t.text for t in classed(ppc, "set", "text")}
    assert {"R", "C", "V", "A", "B", "H"} <= set_bits


def test_every_class_a_picture_uses_is_documented() -> None:
    used: set[str] = set()
    pictures = [render_svg(path) for path in INPUTS]
    pictures.append(render_svg(EXAMPLES / "seed-001.bin", bug=FLUSH_ALL_BUG))
    pictures.append(render_svg(SEEDS / "generic" / "move-under-fault.bin", step=4))
    for svg in pictures:
        for element in ET.fromstring(svg).iter():
            used |= set(element.get("class", "").split())
    assert used <= set(CSS_CLASSES), used - set(CSS_CLASSES)
    assert {"kvmspec-memslot", "kvmspec-pte", "kvmspec-timeline-step"} <= used


def test_large_tables_are_cut_with_a_count() -> None:
    canvas = Canvas("test")
    leaves = [Node(f"leaf {n}", ("pte",)) for n in range(PER_TABLE + 8)]
    root = Node("table", ("table",))
    capped(leaves, root)
    draw_outline(canvas, [root])
    svg = canvas.render("cut")
    assert len(classed(svg, "pte")) == PER_TABLE
    assert [t.text for t in classed(svg, "more", "text")] == ["+8 more"]


def test_step_stops_after_that_many_steps() -> None:
    path = EXAMPLES / "memslots.jsonl"
    svg = render_svg(path, step=3)  # mmap, create_vcpu, slot 0
    assert "after step 3" in svg
    assert len(classed(svg, "memslot")) == 1
    assert [box.get("data-step") for box in classed(svg, "timeline-step")] == ["1", "2", "3"]
    before_the_guest = run(EXAMPLES / "x86-shadow.bin", 1)
    assert before_the_guest.applied == 1 and model_leaves(before_the_guest) == 0
    assert not classed(render_svg(path, step=0), "timeline-step")


def test_a_generic_interleaving_shows_its_actors_and_the_invalid_slot() -> None:
    """Mid-MOVE (the generic harness's memslot actor stopped after publishing the INVALID
    copy): the slot is hatched, and the timeline has one lane per actor."""
    svg = render_svg(SEEDS / "generic" / "move-under-fault.bin", step=4)
    (slot,) = classed(svg, "memslot")
    assert "kvmspec-invalid" in slot.get("class", "")
    assert len(classed(svg, "invalid-hatch")) == 1
    actors = {box.get("data-actor") for box in classed(svg, "timeline-step")}
    assert {"fault#1", "memslot#2"} <= actors


@pytest.mark.parametrize(
    ("name", "bug", "rule"),
    [
        ("seed-001.bin", FLUSH_ALL_BUG, "S001-FLUSH-ALL"),
        ("seed-000.bin", SEED_000_BUG, "S000-NO-HPTE-OUTSIDE-SLOTS"),
    ],
)
def test_a_planted_seed_bug_draws_its_failure_and_timeline(name: str, bug: str, rule: str) -> None:
    path = EXAMPLES / name
    svg = render_svg(path, bug=bug)
    assert len(classed(svg, "failure")) == 1
    rules = [t.text or "" for t in classed(svg, "rule", "text")]
    assert any(text.startswith(f"{rule}: ") for text in rules), rules
    replay_failing = [
        b for b in classed(svg, "timeline-step") if "kvmspec-failing" in b.get("class", "")
    ]
    assert len(replay_failing) == 1
    failing_step = replay_failing[0].get("data-step")
    assert f"Step {failing_step} broke the rules:" in rules
    # Without the bug, the same input breaks nothing.
    clean = render_svg(path)
    assert not classed(clean, "failure") and not classed(clean, "failing")


def test_seed_001_draws_the_vm_the_release_left() -> None:
    """The release ends the VM (the harness starts a new one): the picture is of the old
    VM, whose stage 2 still maps guest pages with the bug and maps nothing without it."""
    with_bug = render_svg(EXAMPLES / "seed-001.bin", bug=FLUSH_ALL_BUG)
    assert "EmptiedFlushShadowAll" in with_bug and drawn_leaves(with_bug) == 3
    assert arm64_decoder.MMU_CLASSES[0] is Arm64Mmu  # the plant is undone
    after_release = render_svg(EXAMPLES / "seed-001.bin", step=4)
    assert drawn_leaves(after_release) == 0


def test_seed_000_marks_the_entry_left_outside_every_slot() -> None:
    """The entry the rule names (valid, mapping a page of the deleted slot) is framed."""
    with_bug = render_svg(EXAMPLES / "seed-000.bin", bug=SEED_000_BUG)
    (orphan,) = classed(with_bug, "orphan")
    rule = next(t.text or "" for t in classed(with_bug, "rule-text", "text"))
    assert rule.startswith(
        f"S000-NO-HPTE-OUTSIDE-SLOTS: valid HPTE {int(orphan.get('data-index', '')):#x} "
    )
    assert not classed(render_svg(EXAMPLES / "seed-000.bin"), "orphan")


def test_text_is_escaped(tmp_path: Path) -> None:
    weird = tmp_path / "a<b>&'c\".jsonl"
    shutil.copy(EXAMPLES / "memslots.jsonl", weird)
    root = ET.fromstring(render_svg(weird))
    title = next(root.iter(f"{SVG}title"))
    assert title.text is not None and title.text.startswith("a<b>&'c\".jsonl")


def test_the_cli_writes_the_picture(tmp_path: Path) -> None:
    out = tmp_path / "picture.svg"
    assert main(["show", str(EXAMPLES / "ppc-hpt.bin"), "--step", "5", "--svg", str(out)]) == 0
    assert classed(out.read_text(), "pte")


def test_family_of_input_names(tmp_path: Path) -> None:
    assert family_of(Path("x86-0123.bin")) == "x86"
    assert family_of(Path("generic-arm64-0123.bin")) == "generic"
    assert family_of(Path("seed-000.bin")) == "ppc"
    assert family_of(Path("seed-001-anything.bin")) == "arm64"
    assert family_of(SEEDS / "x86" / "huge-migration.bin") == "x86"
    with pytest.raises(ShowError, match="unknown fuzzer family"):
        family_of(tmp_path / "mystery.bin")


def _write(tmp_path: Path, name: str, data: bytes = b"\x00") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


BAD_INPUTS: dict[str, tuple[Callable[[Path], str], list[str], str]] = {
    "missing file": (lambda tmp: str(tmp / "nowhere.jsonl"), [], "no such file"),
    "a folder": (lambda tmp: str(tmp), [], "not a file"),
    "unknown suffix": (lambda tmp: _write(tmp, "trace.txt"), [], "not a trace (.jsonl)"),
    "unknown family": (lambda tmp: _write(tmp, "mystery.bin"), [], "unknown fuzzer family"),
    "bad trace line": (
        lambda tmp: str(SEEDS / "trace" / "malformed-bad-json.jsonl"),
        [],
        ":2: not valid JSON",
    ),
    "step out of range": (
        lambda tmp: str(EXAMPLES / "memslots.jsonl"),
        ["--step", "99"],
        "--step 99 is out of range",
    ),
    "step out of range (bin)": (
        lambda tmp: str(EXAMPLES / "ppc-hpt.bin"),
        ["--step", "12"],
        "has 11 steps",
    ),
    "negative step": (lambda tmp: str(EXAMPLES / "memslots.jsonl"), ["--step", "-1"], "0 or more"),
    "unknown bug": (
        lambda tmp: str(EXAMPLES / "seed-001.bin"),
        ["--bug", "seed-999"],
        "unknown bug 'seed-999'",
    ),
    "not a number": (lambda tmp: str(EXAMPLES / "memslots.jsonl"), ["--step", "x"], "invalid int"),
}


def cli(args: list[str]) -> int | str | None:
    """``kvmspec`` with ``args``: its exit status (argparse's errors exit)."""
    try:
        return main(args)
    except SystemExit as done:
        return done.code


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, extra, message = BAD_INPUTS[name]
    out = tmp_path / "out.svg"
    assert cli(["show", make(tmp_path), *extra, "--svg", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvmspec: error: "), err
    assert message in err
    assert "Traceback" not in err and not out.exists()


def _example_builder() -> Callable[[], dict[str, bytes]]:
    """docs/examples/make_examples.py's ``examples`` (the script is not in a package)."""
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    examples: Callable[[], dict[str, bytes]] = module.examples
    return examples


def test_the_example_files_are_what_make_examples_builds() -> None:
    for name, contents in _example_builder()().items():
        assert (EXAMPLES / name).read_bytes() == contents, f"{name}: run make_examples.py"
