"""``python -m bench`` (``make bench``; tests/ on the path): every figure next to its goal.

python -m bench                       # everything (about three minutes)
python -m bench memslots lookup       # some sections only
python -m bench --quick               # small sizes and short runs, to try the bench itself
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

from bench import (
    SLICE_EXAMPLES,
    Figure,
    arm64,
    fuzzer,
    generic,
    guest,
    lookup,
    memory,
    memslots,
    ppc,
    x86,
)
from kvmspec.spec import dbc
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PPC64_HV, PlatformProfile

SECTIONS = ("memslots", "lookup", "memory", "fuzzer", "generic", "guest", "x86", "ppc", "arm64")
RATIO_GOAL = 1.0
LOOKUP_RATIO_GOAL = 2.0
MEMORY_GOAL_MIB = 100.0
FUZZ_GOAL = 3000.0
GENERIC_STEPS_GOAL = 20000.0
GUEST_RATIO_GOAL = 10.0
X86_MACHINE_GOAL = 1000.0
X86_FUZZ_GOAL = 1000.0
ARM64_MACHINE_GOAL = 1000.0
ARM64_FUZZ_GOAL = 1000.0


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain table: the first column left-aligned, the others right-aligned."""
    print(f"\n{title}")
    table = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        print("  " + "  ".join(cells).rstrip())


def section_memslots(profile: PlatformProfile, quick: bool) -> list[Figure]:
    sizes = (100, 1000) if quick else memslots.SIZES
    reference, kernel = memslots.measure_both(profile, sizes, repeats=1 if quick else 5)
    figures: list[Figure] = []
    rows = []
    for nslots in sizes:
        for phase in memslots.PHASES:
            ours = reference.ops_per_second[nslots][phase]
            row = [f"{nslots:>5} {phase}", f"{ours:,.0f}"]
            if isinstance(kernel, str):
                rows.append([*row, "-", "-", "", ""])
                continue
            theirs = kernel.ops_per_second[nslots][phase]
            ratio = ours / theirs
            figure = Figure(f"{phase} at {nslots} slots", f"{ratio:.2f}", ">= 1.0", ratio >= 1)
            figures.append(figure)
            rows.append([*row, f"{theirs:,.0f}", f"{ratio:.2f}", figure.goal, figure.verdict])
    _print_table(
        "Memslot updates, ops/s (median; slot i: 1 page at 16 MiB + 2i pages, MOVE into the gap)",
        ["slots op", "reference", "linux-kvm", "ratio", "goal", ""],
        rows,
    )
    if isinstance(kernel, str):
        print(f"  linux-kvm: unavailable: {kernel}")
    return figures


def section_lookup(profile: PlatformProfile, quick: bool) -> list[Figure]:
    cost = lookup.measure(profile)
    few, many = sorted(cost.search_memslots)
    figures = []
    rows = []
    for name, by_size in (
        ("search_memslots", cost.search_memslots),
        ("gfn_to_memslot (cache missed)", cost.gfn_to_memslot),
    ):
        ratio = by_size[many] / by_size[few]
        figure = Figure(f"{name} {many}/{few}", f"{ratio:.2f}", "<= 2.0", ratio <= 2)
        figures.append(figure)
        costs = [f"{by_size[few]:.0f}", f"{by_size[many]:.0f}"]
        rows.append([name, *costs, figure.value, figure.goal, figure.verdict])
    _print_table(
        "gfn lookup, ns per lookup (median of 5 x 200000 lookups of random slots)",
        ["lookup", f"{few} slots", f"{many} slots", "ratio", "goal", ""],
        rows,
    )
    return figures


def section_memory(profile: PlatformProfile, quick: bool) -> list[Figure]:
    cost = memory.measure()
    figure = Figure(
        "peak RSS growth",
        f"{cost.growth_mib:.1f} MiB",
        f"< {MEMORY_GOAL_MIB:.0f} MiB",
        cost.growth_mib < MEMORY_GOAL_MIB,
    )
    dense_mib = cost.bitmap_words * 8 / (1 << 20)
    _print_table(
        f"Model memory: one 1 TiB LOG_DIRTY slot + {cost.small_slots} one-page slots "
        f"({cost.slots} slots, every user slot; measured in a fresh process)",
        ["figure", "value", "goal", ""],
        [[figure.name, figure.value, figure.goal, figure.verdict]],
    )
    print(
        f"  1 TiB slot dirty bitmap: {cost.bitmap_stored_words} words stored of "
        f"{cost.bitmap_words:,} ({dense_mib:.0f} MiB if dense, as in the kernel)"
    )
    return [figure]


def section_fuzzer(profile: PlatformProfile, quick: bool) -> list[Figure]:
    seconds = 5 if quick else 20
    figures = []
    rows = []
    notes: list[str] = []
    for contracts in (True, False):
        speed = fuzzer.measure(seconds, contracts)
        label = f"fuzz_memslots.py, contracts {'on' if contracts else 'off'}"
        if speed.error:
            rows.append([label, f"failed: {speed.error}", "", ""])
            continue
        rate = speed.exec_per_second
        # The fuzzer runs with its contracts on: that is the figure with the goal.
        met = rate >= FUZZ_GOAL if contracts else None
        figure = Figure(label, f"{rate:,.0f}", f">= {FUZZ_GOAL:,.0f}" if contracts else "", met)
        figures.append(figure)
        rows.append([label, figure.value, figure.goal, figure.verdict])
        notes.extend(f"{label}: a run stopped ({finding[:160]})" for finding in speed.findings)
    _print_table(
        f"Atheris exec/s (-max_len=1024, about {seconds} s from corpus/seeds/memslots)",
        ["fuzzer", "exec/s", "goal", ""],
        rows,
    )
    for note in notes:
        print(f"  {note}; continued with a new run")
    return figures


def section_generic(profile: PlatformProfile, quick: bool) -> list[Figure]:
    rate = generic.scheduler_steps_per_second(profile, 1.0 if quick else 3.0)
    steps = Figure(
        "generic-layer scheduler steps/s",
        f"{rate:,.0f}",
        f">= {GENERIC_STEPS_GOAL:,.0f}",
        rate >= GENERIC_STEPS_GOAL,
    )
    harness = generic.harness_speed(profile, 1.0 if quick else 3.0)
    actions = Figure(
        "generic harness actions/s (decode, action, every check)",
        f"{harness.actions_per_second:,.0f}",
        f">= {GENERIC_STEPS_GOAL:,.0f}",
        harness.actions_per_second >= GENERIC_STEPS_GOAL,
    )
    per_action = f"{1e6 / harness.actions_per_second:.1f} µs per action"
    rejected = harness.rejected / (harness.actions + harness.rejected)
    _print_table(
        "Generic layer, one core: page-fault actors stepped by the scheduler alone; the harness "
        "driven by fuzz_generic's decoder (random 256-byte inputs, a fresh VM each)",
        ["figure", "value", "goal", ""],
        [
            [steps.name, steps.value, steps.goal, steps.verdict],
            [actions.name, actions.value, actions.goal, actions.verdict],
        ],
    )
    print(
        f"  harness: {per_action}; {harness.executions_per_second:,.0f} inputs/s; "
        f"{rejected:.0%} of decoded actions rejected (not allowed in the state)"
    )
    seconds = 5 if quick else 20
    speed = fuzzer.measure(seconds, contracts=True, script=fuzzer.GENERIC)
    label = "fuzz_generic.py, contracts on"
    if speed.error:
        fuzz_row = [label, f"failed: {speed.error}", ""]
    else:
        fuzz_row = [label, f"{speed.exec_per_second:,.0f}", f"{speed.actions_per_second:,.0f}"]
    _print_table(
        f"Generic layer under Atheris (-max_len=512, about {seconds} s from corpus/seeds/generic)",
        ["fuzzer", "exec/s", "harness actions/s"],
        [fuzz_row],
    )
    for finding in speed.findings:
        print(f"  {label}: a run stopped ({finding[:160]}); continued with a new run")
    costs = generic.invalidation_costs(profile)
    rows = [
        [c.range_name, str(c.mapped), f"{c.microseconds:,.0f}", f"{c.microseconds / c.mapped:.2f}"]
        for c in costs
    ]
    _print_table(
        "MMU-notifier invalidation over one slot, its mapped pages dropped (median of 7)",
        ["range", "mapped pages", "µs", "µs per mapped page"],
        rows,
    )
    by_range = {c.range_name: c.microseconds for c in costs}
    ratio = by_range["1 TiB"] / by_range["1 GiB"]
    flat = Figure(
        "invalidation 1 TiB / 1 GiB (same 1000 pages)", f"{ratio:.2f}", "<= 1.5", ratio <= 1.5
    )
    print(f"  {flat.name}: {flat.value} (goal {flat.goal}) {flat.verdict}")
    return [steps, actions, flat]


def section_guest(profile: PlatformProfile, quick: bool) -> list[Figure]:
    count, pages = (10_000, 1_000) if quick else (guest.ACCESSES, guest.PAGES)
    speed = guest.measure(profile, count, pages)
    rows = [["reference", f"{speed.reference:,.0f}", f"{1e6 / speed.reference:.1f}"]]
    figures = []
    if isinstance(speed.kernel, str):
        rows.append(["linux-kvm", "-", "-"])
    else:
        rows.append(["linux-kvm", f"{speed.kernel:,.0f}", f"{1e6 / speed.kernel:.1f}"])
        ratio = speed.reference / speed.kernel
        figures.append(
            Figure(
                "guest accesses/s, reference / linux-kvm",
                f"{ratio:.2f}",
                f">= {GUEST_RATIO_GOAL:.0f}",
                ratio >= GUEST_RATIO_GOAL,
            )
        )
    _print_table(
        f"Guest accesses/s: {speed.accesses:,} 8-byte loads and stores over {speed.pages:,} "
        f"pages of one slot (the reference on {profile.mmu} paging; linux-kvm: a CPL 3 guest)",
        ["target", "accesses/s", "µs per access"],
        rows,
    )
    if isinstance(speed.kernel, str):
        print(f"  linux-kvm: unavailable: {speed.kernel}")
    for figure in figures:
        print(f"  {figure.name}: {figure.value} (goal {figure.goal}) {figure.verdict}")
    return figures


def section_x86(profile: PlatformProfile, quick: bool) -> list[Figure]:
    seconds = 2.0 if quick else 10.0
    rate = x86.machine_steps_per_second(profile, seconds)
    steps = Figure(
        "x86 state machine steps/s",
        f"{rate:,.0f}",
        f">= {X86_MACHINE_GOAL:,.0f}",
        rate >= X86_MACHINE_GOAL,
    )
    fuzz_seconds = 5 if quick else 20
    speed = fuzzer.measure(fuzz_seconds, contracts=True, script=x86.FUZZ_X86)
    label = "fuzz_x86.py exec/s, contracts on"
    figures = [steps]
    if speed.error:
        fuzz_row = [label, f"failed: {speed.error}", "", "", ""]
    else:
        met = speed.exec_per_second >= X86_FUZZ_GOAL
        executions = Figure(label, f"{speed.exec_per_second:,.0f}", f">= {X86_FUZZ_GOAL:,.0f}", met)
        figures.append(executions)
        actions = f"{speed.actions_per_second:,.0f}"
        fuzz_row = [label, executions.value, actions, executions.goal, executions.verdict]
    _print_table(
        f"x86 shadow MMU: the campaign's state machine (slices of "
        f"{SLICE_EXAMPLES} examples, about {seconds:.0f} s) and fuzz_x86.py under "
        f"libFuzzer (-max_len={x86.FUZZ_X86.max_len}, about {fuzz_seconds} s from "
        f"{x86.FUZZ_X86.seeds})",
        ["figure", "value", "harness actions/s", "goal", ""],
        [[steps.name, steps.value, "", steps.goal, steps.verdict], fuzz_row],
    )
    for finding in speed.findings:
        print(f"  {label}: a run stopped ({finding[:160]}); continued with a new run")
    return figures


PPC_STEPS_GOAL, PPC_FUZZ_GOAL, PPC_HCALL_GOAL = 1000.0, 1000.0, 20000.0


def section_ppc(profile: PlatformProfile, quick: bool) -> list[Figure]:
    seconds, fuzz_seconds = (2.0, 5) if quick else (10.0, 20)
    hpt_rate = ppc.machine_steps_per_second(PPC64_HV, seconds)
    radix_rate = ppc.radix_steps_per_second(seconds)
    figures = [
        Figure(name, f"{rate:,.0f}", f">= {PPC_STEPS_GOAL:,.0f}", rate >= PPC_STEPS_GOAL)
        for name, rate in (
            ("POWER HPT state machine steps/s", hpt_rate),
            ("POWER radix state machine steps/s", radix_rate),
        )
    ]
    rows = [[f.name, f.value, "", f.goal, f.verdict] for f in figures]
    speed = fuzzer.measure(fuzz_seconds, contracts=True, script=ppc.FUZZ_PPC)
    label = "fuzz_ppc.py exec/s, contracts on"
    if speed.error:
        rows.append([label, f"failed: {speed.error}", "", "", ""])
    else:
        rate = speed.exec_per_second
        fuzz = Figure(label, f"{rate:,.0f}", f">= {PPC_FUZZ_GOAL:,.0f}", rate >= PPC_FUZZ_GOAL)
        figures.append(fuzz)
        rows.append(
            [label, fuzz.value, f"{speed.actions_per_second:,.0f}", fuzz.goal, fuzz.verdict]
        )
    hcalls = ppc.hcalls_per_second(calls=50_000 if quick else 200_000)
    rate = hcalls.calls_per_second
    name = f"hypercalls/s, order-{ppc.HCALL_ORDER} HPT, {hcalls.entries:,} valid entries"
    hcall = Figure(name, f"{rate:,.0f}", f">= {PPC_HCALL_GOAL:,.0f}", rate >= PPC_HCALL_GOAL)
    figures.append(hcall)
    rows.append([hcall.name, hcall.value, "", hcall.goal, hcall.verdict])
    _print_table(
        f"POWER Book3S HV: the campaign's HPT and radix machines (slices of {SLICE_EXAMPLES}"
        f" examples, about {seconds:.0f} s each), fuzz_ppc.py under libFuzzer (-max_len="
        f"{ppc.FUZZ_PPC.max_len}, about {fuzz_seconds} s from {ppc.FUZZ_PPC.seeds}), and "
        "rounds of H_READ, H_PROTECT twice, H_REMOVE and H_ENTER on random entries of a full HPT",
        ["figure", "value", "harness actions/s", "goal", ""],
        rows,
    )
    print(
        f"  {hcalls.calls:,} hypercalls timed; the {hcalls.entries:,} H_ENTERs before took "
        f"{hcalls.fill_seconds:.1f} s"
    )
    for finding in speed.findings:
        print(f"  {label}: a run stopped ({finding[:160]}); continued with a new run")
    return figures


def section_arm64(profile: PlatformProfile, quick: bool) -> list[Figure]:
    # The arm64 figures run on the arm64 profile, whatever the bench's profile.
    seconds = 2.0 if quick else 10.0
    rate = arm64.machine_steps_per_second(ARM64, seconds)
    steps = Figure(
        "arm64 state machine steps/s",
        f"{rate:,.0f}",
        f">= {ARM64_MACHINE_GOAL:,.0f}",
        rate >= ARM64_MACHINE_GOAL,
    )
    fuzz_seconds = 5 if quick else 20
    speed = fuzzer.measure(fuzz_seconds, contracts=True, script=arm64.FUZZ_ARM64)
    label = "fuzz_arm64.py exec/s, contracts on"
    figures = [steps]
    if speed.error:
        fuzz_row = [label, f"failed: {speed.error}", "", "", ""]
    else:
        met = speed.exec_per_second >= ARM64_FUZZ_GOAL
        executions = Figure(
            label, f"{speed.exec_per_second:,.0f}", f">= {ARM64_FUZZ_GOAL:,.0f}", met
        )
        figures.append(executions)
        actions = f"{speed.actions_per_second:,.0f}"
        fuzz_row = [label, executions.value, actions, executions.goal, executions.verdict]
    _print_table(
        f"arm64 stage 2: the campaign's state machine (slices of "
        f"{SLICE_EXAMPLES} examples, about {seconds:.0f} s) and fuzz_arm64.py under "
        f"libFuzzer (-max_len={arm64.FUZZ_ARM64.max_len}, about {fuzz_seconds} s from "
        f"{arm64.FUZZ_ARM64.seeds})",
        ["figure", "value", "harness actions/s", "goal", ""],
        [[steps.name, steps.value, "", steps.goal, steps.verdict], fuzz_row],
    )
    for finding in speed.findings:
        print(f"  {label}: a run stopped ({finding[:160]}); continued with a new run")

    pages = (100, 1_000) if quick else arm64.WALK_PAGES
    cost = arm64.walk_cost(pages)
    low, high = arm64.WALK_RATIO_GOAL
    walk = Figure(
        f"stage-2 walk over 1 TiB, {pages[1]:,} pages / {pages[0]:,} pages",
        f"{cost.tib_ratio:.1f}",
        f"{low:.0f} to {high:.0f} (pages x{cost.page_ratio:.0f})",
        low <= cost.tib_ratio <= high,
    )
    span = Figure(
        f"the same {pages[1]:,} pages walked over 1 TiB / over 1 GiB",
        f"{cost.range_ratio:.2f}",
        f"<= {arm64.RANGE_RATIO_GOAL:.0f}",
        cost.range_ratio <= arm64.RANGE_RATIO_GOAL,
    )
    rows = [
        [f"{n:>6,} pages over {name}", f"{seconds_ * 1000:,.0f}", "", "", ""]
        for name, times in (("1 TiB", cost.tib), ("1 GiB", cost.gib))
        for n, seconds_ in sorted(times.items())
    ]
    over_tib = f"{cost.gib_pages_over_tib * 1000:,.0f}"
    rows.append([f"{pages[1]:>6,} pages over 1 GiB, walked over 1 TiB", over_tib, "", "", ""])
    rows += [[f.name, "", f.value, f.goal, f.verdict] for f in (walk, span)]
    _print_table(
        "arm64 stage-2 walk (kvm_pgtable_stage2_test_clear_young, no clearing; 4 KiB pages "
        "at an even stride, 40-bit IPA), ms per walk",
        ["walk", "ms", "ratio", "goal", ""],
        rows,
    )
    return [*figures, walk, span]


RUNNERS = {
    "memslots": section_memslots,
    "lookup": section_lookup,
    "memory": section_memory,
    "fuzzer": section_fuzzer,
    "generic": section_generic,
    "guest": section_guest,
    "x86": section_x86,
    "ppc": section_ppc,
    "arm64": section_arm64,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="kvmspec's performance figures, each with its goal"
    )
    parser.add_argument("sections", nargs="*", help=f"some of: {' '.join(SECTIONS)} (all)")
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    sections: list[str] = args.sections or list(SECTIONS)

    profile = DEFAULT_PROFILE
    started = time.monotonic()
    print(
        f"kvmspec bench: profile {profile.name}, runtime contracts "
        f"{'on' if dbc.ENABLED else 'off'} for the model figures, Python "
        f"{platform.python_version()}, {platform.machine()}"
    )
    figures: list[Figure] = []
    for name in sections:
        figures.extend(RUNNERS[name](profile, args.quick))
        sys.stdout.flush()

    judged = [figure for figure in figures if figure.met is not None]
    missed = [figure for figure in judged if not figure.met]
    print(
        f"\n{len(judged) - len(missed)} PASS, {len(missed)} MISS "
        f"({time.monotonic() - started:.0f} s)"
    )
    for figure in missed:
        print(f"  MISS {figure.name}: {figure.value} (goal {figure.goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
