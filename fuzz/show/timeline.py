"""What happened: the broken rules of a failing run, and the timeline of its steps.

The failure box lists each violation line the checks reported, then, for each rule those
lines name, its statement and its first source (:func:`kvmspec.fuzz.regressions.cite`).

The timeline has one lane per actor (a vCPU, the host, the VMM's ioctls; in the generic
harness each in-flight kernel operation the scheduler ran: ``fault0``, ``memslot1``, ...)
and one box per step, left to right: each action, or, for the generic harness, each step
the scheduler let an actor take (its record, ``Run.schedule``), labelled with the action's
number. Actions the decoder rejected are dashed; the failing step is red. Only the last
:data:`MOST_STEPS` boxes are drawn. Under a failure, the last few steps are listed in full.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmspec.fuzz.regressions import cite, rule_of
from kvmspec.fuzz.show.replay import Replay
from kvmspec.fuzz.show.svg import CHAR, LINE, MARGIN, WIDTH, Canvas, fit
from kvmspec.fuzz.show.tree import heading

MOST_STEPS = 60
LISTED = 8
"""Steps listed in full under a failure (the failing one last)."""
LANE_LABEL = 96
LANE = 18


def wrap(text: str, width: float) -> list[str]:
    """``text`` broken into lines of at most ``width`` units of label font."""
    most = max(int(width / CHAR), 10)
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split(" "):
            if line and len(line) + 1 + len(word) > most:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        while len(line) > most:  # one word longer than the line
            lines.append(line[:most])
            line = line[most:]
        lines.append(line)
    return lines


def draw_failure(canvas: Canvas, replay: Replay) -> None:
    """The box of broken rules (nothing for a run that broke none)."""
    if replay.failing is None:
        return
    width = WIDTH - 2 * MARGIN
    lines: list[tuple[str, str]] = [
        (f"Step {replay.failing} broke the rules:", "rule"),
    ]
    for violation in replay.broken:
        lines += [(line, "rule-text") for line in wrap(violation, width - 24)]
    for rule_id in dict.fromkeys(filter(None, map(rule_of, replay.broken))):
        lines += [(line, "rule") for line in wrap(cite(rule_id), width - 24)]
    lines += [(note, "note") for note in replay.notes]
    top = canvas.y
    canvas.open_group("failure-box", step=replay.failing)
    canvas.rect(MARGIN, top, width, len(lines) * LINE + 10, ("failure",))
    for number, (line, kind) in enumerate(lines):
        canvas.text(MARGIN + 10, top + 16 + number * LINE, line, kind)
    canvas.close_group()
    canvas.advance(len(lines) * LINE + 20)


@dataclass(frozen=True)
class Box:
    """One box of the timeline: its step, actor, what it did, and its kind."""

    step: int
    actor: str
    what: str
    applied: bool


def boxes(replay: Replay) -> list[Box]:
    """The timeline's boxes: each step, or the scheduler's steps within it."""
    scheduled: dict[int, list[tuple[str, str]]] = {}
    for entry in replay.schedule:
        number, _, rest = entry.partition("|")
        actor, _, point = rest.partition(": ")
        scheduled.setdefault(int(number), []).append((actor, point))
    found = []
    for step in replay.steps:
        if step.number == 0 and step.applied:
            continue  # the set-up is in the title's note
        inside = scheduled.get(step.number, []) if step.applied else []
        for actor, point in inside:
            found.append(Box(step.number, actor, f"{point} (in {step.what})", True))
        if not inside:
            found.append(Box(step.number, step.actor, step.what, step.applied))
    return found


def draw_timeline(canvas: Canvas, replay: Replay) -> None:
    """The timeline section."""
    found = boxes(replay)
    canvas.open_group("timeline")
    setup = next((step.what for step in replay.steps if step.number == 0), None)
    heading(
        canvas,
        f"Timeline: {replay.applied} steps" + (f", after {setup}" if setup else ""),
        "one lane per actor, one box per step (dashed: rejected by the decoder; red: the step"
        " that broke a rule)"
        if found
        else "no steps",
    )
    hidden = max(len(found) - MOST_STEPS, 0)
    shown = found[hidden:]
    actors = list(dict.fromkeys(box.actor for box in shown))
    width = min(36.0, (WIDTH - 2 * MARGIN - LANE_LABEL) / max(len(shown), 1))
    top = canvas.y
    for lane, actor in enumerate(actors):
        canvas.text(MARGIN, top + lane * LANE + 12, fit(actor, LANE_LABEL - 6), "actor")
    for column, box in enumerate(shown):
        x = MARGIN + LANE_LABEL + column * width
        y = top + actors.index(box.actor) * LANE
        classes = ["timeline-step"]
        if not box.applied:
            classes.append("skipped")
        elif box.step == replay.failing:
            classes.append("failing")
        canvas.rect(
            x,
            y,
            width - 2,
            LANE - 3,
            tuple(classes),
            f"step {box.step}, {box.actor}: {box.what}",
            step=box.step,
            actor=box.actor,
        )
        if width >= 16:
            canvas.text(x + (width - 2) / 2, y + 11, str(box.step), "tick", anchor="middle")
    canvas.advance(len(actors) * LANE + 4)
    if hidden:
        canvas.text(MARGIN, canvas.y + 12, f"(the first {hidden} boxes are not drawn)", "note")
        canvas.advance(LINE)
    if replay.failing is not None:
        for box in found[-LISTED:]:
            mark = "!" if box.step == replay.failing and box.applied else " "
            line = f"{mark} step {box.step:3d} {box.actor:>10}: {box.what}"
            canvas.text(MARGIN, canvas.y + 12, fit(line, WIDTH - 2 * MARGIN), "label")
            canvas.advance(LINE)
    canvas.advance(8)
    canvas.close_group()
