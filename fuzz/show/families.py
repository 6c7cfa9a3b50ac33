"""Fuzzer inputs (``.bin``) of the harness families, run the way their Atheris targets run
them, one action at a time, so a picture can be taken after any step.

A family is named by the file's name, as :mod:`kvmspec.fuzz.regressions` names findings
(``x86-``, ``arm64-``, ``ppc-``, ``generic-<profile>-``, ``memslots-``); an input named
``seed-NNN...`` belongs to the family of seed NNN's bug (its campaign area in
:data:`kvmspec.fuzz.seed_bugs.SEED_BUGS`); else the folder names it (``corpus/seeds/x86/``).

Each family's set-up and decoder are those of its ``fuzz/fuzz_<family>.py`` (the decoders'
``decode_*`` functions against a fresh harness, at most the target's ``MAX_ACTIONS``
decisions). Where :func:`kvmspec.fuzz.harness_fuzzing.drive` runs to the end, this loop
stops after the step asked for, and remembers the VM each action started from: an action
that ends the VM (arm64's ``release``: the VMM exits, a new VM starts) leaves the old one
to be drawn when it is that one a rule speaks about.

A seed bug is planted by its own ``plant`` (seed 001's swaps the arm64 decoder's MMU
classes for twins with ``kvm_arch_flush_shadow_all`` emptied, one for one, so every input
decodes to the same actions as without it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmspec.fuzz.atheris_support import failure_lines
from kvmspec.fuzz.decoder import BytesChooser
from kvmspec.fuzz.harness_fuzzing import Action, Rejected
from kvmspec.fuzz.show.replay import Replay, ShowError, Step, out_of_range, run_operations
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES, PlatformProfile

FAMILIES = ("x86", "arm64", "ppc", "generic", "memslots")
_SEED = re.compile(r"^seed-(\d{3})(?:-|$)")

Decode = Callable[[Any], Action | Rejected]


def family_of(path: Path) -> str:
    """The harness family of a ``.bin`` input (see the module docstring)."""
    from kvmspec.fuzz.seed_bugs import SEED_BUGS

    prefix = path.stem.split("-", 1)[0]
    if prefix in FAMILIES:
        return prefix
    seed = _SEED.match(path.stem)
    if seed is not None:
        for bug in SEED_BUGS:
            if bug.seed == seed.group(1):
                area = bug.area.split("/")
                return area[1] if area[0] == "atheris" else area[0]
    if path.parent.name in FAMILIES:
        return path.parent.name
    raise ShowError(
        f"{path}: unknown fuzzer family: name it x86-, arm64-, ppc-, generic-<profile>-,"
        " memslots- or seed-NNN-, or keep it in corpus/seeds/<family>/"
    )


def generic_profile(stem: str) -> PlatformProfile:
    """The profile a generic input's name carries (``generic-<profile>-<digest>``), else
    the default profile (the fuzzer's own findings are ``generic-<sha1>``)."""
    parts = stem.split("-", 1)
    middle = parts[1].rsplit("-", 1)[0] if len(parts) == 2 and "-" in parts[1] else ""
    return PROFILES.get(middle, DEFAULT_PROFILE)


@dataclass
class Started:
    """A family's harness, set up: how it was set up, how to decode its next action, the
    most decisions its fuzzer makes, and its scheduler's record (generic only)."""

    title: str
    setup: str
    harness: Any
    decode: Decode
    max_actions: int
    schedule: list[str] | None = None


def _start(family: str, chooser: BytesChooser, stem: str) -> Started:
    """Build and set up the family's harness from the input's first answers, exactly as
    ``fuzz/fuzz_<family>.py``'s ``run_input`` does."""
    if family == "x86":
        from kvmspec.fuzz.fuzz_x86 import MAX_ACTIONS as X86_ACTIONS
        from kvmspec.fuzz.x86_decoder import decode_action, decode_layout
        from kvmspec.fuzz.x86_layouts import make_harness

        layout = decode_layout(chooser)
        harness = make_harness(layout, DEFAULT_PROFILE)
        return Started(
            f"x86 shadow MMU, {DEFAULT_PROFILE.name}",
            f"layout {layout}",
            harness,
            lambda h: decode_action(chooser, layout),
            X86_ACTIONS,
        )
    if family == "arm64":
        from kvmspec.fuzz.arm64_decoder import decode_action as arm64_action
        from kvmspec.fuzz.arm64_decoder import decode_setup
        from kvmspec.fuzz.fuzz_arm64 import MAX_ACTIONS as ARM64_ACTIONS
        from kvmspec.spec.platforms import ARM64

        setup = decode_setup(chooser)
        return Started(
            "arm64 stage 2, arm64",
            str(setup),
            setup.harness(ARM64, lambda line: None),
            lambda h: arm64_action(chooser, h),
            ARM64_ACTIONS,
        )
    if family == "ppc":
        from kvmspec.fuzz.fuzz_ppc import MAX_ACTIONS as PPC_ACTIONS
        from kvmspec.fuzz.ppc_decoder import decode_action as ppc_action
        from kvmspec.fuzz.ppc_harness import KNOWN_KERNEL_FINDINGS, PpcHarness
        from kvmspec.spec.platforms import PPC64_HV

        return Started(
            f"POWER Book3S HV (HPT), {PPC64_HV.name}",
            "set_up()",
            PpcHarness(PPC64_HV, lambda line: None, KNOWN_KERNEL_FINDINGS),
            lambda h: ppc_action(chooser, h),
            PPC_ACTIONS,
        )
    from kvmspec.fuzz.fuzz_generic import MAX_ACTIONS as GENERIC_ACTIONS
    from kvmspec.fuzz.generic_decoder import decode_action as generic_action
    from kvmspec.fuzz.generic_decoder import decode_set_up
    from kvmspec.fuzz.generic_harness import GenericHarness

    profile = generic_profile(stem)
    set_up = decode_set_up(chooser)
    generic = GenericHarness(profile)
    generic.set_up(set_up.mode, set_up.logged)
    return Started(
        f"generic layer, {profile.name}",
        str(set_up),
        generic,
        lambda h: generic_action(chooser, h),
        GENERIC_ACTIONS,
        generic.scheduler.schedule,
    )


def action_actor(action: Action | Rejected) -> str:
    """Who runs a harness action, for the timeline: the vCPU it names, else the host (the
    VMM's memory and the host kernel's own work), the guest, or the VMM's ioctls."""
    args = dict(action.args) if isinstance(action, Action) else {}
    if "vcpu" in args:
        return f"vcpu {args['vcpu']}"
    method = action.method
    if method.startswith(("host_", "madvise", "mprotect", "munmap", "thp", "migrate", "age")):
        return "host"
    if method == "release":
        return "host"
    if method.startswith(("guest_", "h_", "invlpg", "switch_cr3")):
        return "guest"
    if "racing" in method or method.startswith(("race", "interleave", "hcalls_while")):
        return "race"
    return "vmm"


def replay_harness(path: Path, family: str, step: int | None) -> Replay:
    """Run a harness family's input to ``step`` applied actions (see the module docstring)."""
    try:
        chooser = BytesChooser(path.read_bytes())
    except OSError as error:
        raise ShowError(f"{path}: cannot read: {error.strerror}") from None
    if family == "memslots":
        return _replay_memslots(path, chooser, step)
    try:
        started = _start(family, chooser, path.stem)
    except AssertionError as error:  # the set-up itself broke a model assertion
        raise ShowError(f"{path}: the set-up failed: {error}") from None
    harness = started.harness
    replay = Replay(path.name, started.title, harness.kvm, harness.host)
    replay.steps.append(Step(0, "vmm", started.setup))
    schedule = started.schedule
    decided = applied = 0
    action: Action | Rejected | str = started.setup
    vm = (harness.kvm, harness.host)
    try:
        harness.check()
        while decided < started.max_actions and not chooser.exhausted:
            if step is not None and applied >= step:
                break
            action = started.decode(harness)
            decided += 1
            if isinstance(action, Rejected):
                replay.steps.append(Step(applied, action_actor(action), str(action), False))
                continue
            applied += 1
            before = len(schedule) if schedule is not None else 0
            replay.steps.append(Step(applied, action_actor(action), str(action)))
            vm = (harness.kvm, harness.host)
            action.apply(harness)
            if schedule is not None:
                replay.schedule += [f"{applied}|{entry}" for entry in schedule[before:]]
            harness.check()
    except AssertionError as error:
        replay.failing = applied
        replay.broken = failure_lines(error, str(action))
        if harness.kvm is not vm[0]:
            replay.kvm, replay.host = vm
            replay.notes.append(
                f"drawn: the VM step {applied} ended (the harness then started a new one)"
            )
    if replay.failing is None:
        replay.kvm, replay.host = harness.kvm, harness.host
    out_of_range(step, replay, f"{applied} steps")
    return replay


def _replay_memslots(path: Path, chooser: BytesChooser, step: int | None) -> Replay:
    """The memslot fuzzer's input: operations decoded against a session on the reference
    target (``fuzz/fuzz_memslots.py``), each judged."""
    from kvmspec.fuzz.decoder import decode_operation
    from kvmspec.fuzz.fuzz_memslots import MAX_OPERATIONS
    from kvmspec.fuzz.guest_layout import private_slot_id
    from kvmspec.fuzz.session import Session
    from kvmspec.fuzz.targets.reference import ReferenceTarget

    target = ReferenceTarget(DEFAULT_PROFILE)
    session = Session(DEFAULT_PROFILE, target)
    replay = Replay(path.name, f"memslot fuzzer, {DEFAULT_PROFILE.name}", target.kvm, target.host)
    replay.private_slot = private_slot_id(DEFAULT_PROFILE)

    def operations() -> Iterator[tuple[Any, str]]:
        for number in range(1, MAX_OPERATIONS + 1):
            if chooser.exhausted or (step is not None and number > step):
                return
            yield decode_operation(chooser, session), f"operation {number}"

    run_operations(replay, operations(), session.apply)
    out_of_range(step, replay, f"{replay.applied} steps")
    return replay
