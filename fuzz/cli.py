"""The ``kvmspec`` command: replay traces, run campaigns, print the trace schema.

Errors a user can cause (a bad trace, an unknown target, a missing /dev/kvm) end with one line
``kvmspec: error: ...`` and exit status 2, never a traceback.

    kvmspec replay TRACE [--target reference|linux-kvm|subprocess:COMMAND] [--json] [--check]
    kvmspec campaign [--minutes N] [--workers N] [--target T] [--database DB] [--report FILE]
                     [AREA ...]
    kvmspec schema
    kvmspec show TRACE [--step N] [--bug NAME] --svg OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from kvmspec.fuzz.ops import Observation
from kvmspec.fuzz.targets import TARGET_NAMES, TargetUnavailable, make_target
from kvmspec.fuzz.trace import Trace, TraceError, load
from kvmspec.spec.platforms import PROFILES

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kvmspec: error: {message}\n")


def replay(trace: Trace, target_name: str, as_json: bool, out: TextIO, check: bool = False) -> int:
    """Apply every step of ``trace`` to a fresh target; print each observation. Returns the
    exit status: 0 when all recorded expectations match, 1 at the first divergence. With
    ``check``, a session also judges every step by the rules (the black-box contracts on
    any target, the white-box invariants on the reference), and the first step that breaks
    one ends the replay with its rules, their statements and sources, and status 1."""
    from kvmspec.fuzz.regressions import cite, rule_of
    from kvmspec.fuzz.session import Session
    from kvmspec.fuzz.targets.subprocess_target import TargetError, UnsupportedOperation

    try:
        target = make_target(target_name, PROFILES[trace.platform])
    except TargetUnavailable as reason:
        raise UsageError(f"target {target_name} is unavailable: {reason}") from None
    session = Session(PROFILES[trace.platform], target) if check else None
    first_divergence: tuple[int, Observation, Observation] | None = None
    broken: list[str] = []
    try:
        for number, step in enumerate(trace.steps, start=1):
            try:
                if session is not None:
                    observed, broken = session.apply(step.op)
                else:
                    observed = target.apply(step.op)
            except (TargetError, UnsupportedOperation) as error:
                # A target in another process that died, hung or answered nonsense, or one
                # that does not implement this operation: one line, not a traceback.
                raise UsageError(f"{trace.source}:{step.line}: {error}") from None
            match = None if step.expect is None else observed == step.expect
            if as_json:
                record: dict[str, object] = {
                    "step": number,
                    "op": step.op.NAME,
                    "observed": observed,
                    "expected": step.expect,
                    "match": match,
                }
                if check:
                    record["broken"] = broken
                print(json.dumps(record), file=out)
            else:
                mark = {None: " ", True: "=", False: "!"}[match]
                print(f"{mark} {number:4d} {step.op.NAME:<24} {json.dumps(observed)}", file=out)
            if match is False and first_divergence is None:
                assert step.expect is not None
                first_divergence = (step.line, step.expect, observed)
            if broken:
                print(f"{trace.source}:{step.line}: step {number} breaks:", file=sys.stderr)
                for line in broken:
                    print(f"  {line}", file=sys.stderr)
                for rule_id in dict.fromkeys(filter(None, map(rule_of, broken))):
                    print(f"  {cite(rule_id)}", file=sys.stderr)
                return EXIT_DIVERGED
    finally:
        target.close()
    if first_divergence is None:
        return EXIT_OK
    divergence_line, expected, observed = first_divergence
    print(
        f"{trace.source}:{divergence_line}: divergence: expected {json.dumps(expected)}, "
        f"observed {json.dumps(observed)}",
        file=sys.stderr,
    )
    return EXIT_DIVERGED


def show(trace: str, step: int | None, bug: str | None, out: str) -> int:
    """Draw the model after ``trace`` (``step`` steps, ``bug`` planted) into ``out``."""
    from pathlib import Path

    from kvmspec.fuzz.show import ShowError, render_svg

    try:
        svg = render_svg(Path(trace), step, bug)
    except ShowError as error:
        raise UsageError(str(error)) from None
    try:
        Path(out).write_text(svg)
    except OSError as error:
        raise UsageError(f"{out}: cannot write: {error.strerror}") from None
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmspec", description=__doc__.splitlines()[0] if __doc__ else "")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    replay_cmd = commands.add_parser("replay", help="apply a trace to a target")
    replay_cmd.add_argument("trace", help="a kvmspec-trace/1 JSON Lines file")
    replay_cmd.add_argument(
        "--target", default="reference", help="reference, linux-kvm or subprocess:COMMAND"
    )
    replay_cmd.add_argument("--json", action="store_true", help="one JSON object per step")
    replay_cmd.add_argument(
        "--check", action="store_true", help="also judge every step by the rules (exit 1)"
    )

    campaign_cmd = commands.add_parser("campaign", help="run the state machines and fuzzers")
    campaign_cmd.add_argument("areas", nargs="*", help="areas to run (default: all)")
    campaign_cmd.add_argument("--minutes", type=float, default=1.0, help="time budget")
    campaign_cmd.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: one per core)"
    )
    campaign_cmd.add_argument(
        "--target", default=None, help="reference, linux-kvm or subprocess:COMMAND"
    )
    campaign_cmd.add_argument(
        "--database",
        default=None,
        help="the shared example database: a folder (default .hypothesis/examples) or a"
        " redis://host:port/db URL",
    )
    campaign_cmd.add_argument(
        "--report", default=None, help="write a JSON report to this file as well"
    )

    commands.add_parser("schema", help="print the JSON Schema of trace lines")

    show_cmd = commands.add_parser("show", help="draw the model's state after an input as SVG")
    show_cmd.add_argument(
        "trace", metavar="TRACE", help="a kvmspec trace (.jsonl) or a harness fuzzer input (.bin)"
    )
    show_cmd.add_argument(
        "--step", type=int, default=None, metavar="N", help="stop after N steps (default: all)"
    )
    show_cmd.add_argument(
        "--bug",
        default=None,
        metavar="NAME",
        help="plant a seed bug of kvmspec.fuzz.seed_bugs first",
    )
    show_cmd.add_argument("--svg", required=True, metavar="OUT", help="the SVG file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "replay":
            if args.target not in TARGET_NAMES:
                raise UsageError(f"unknown target {args.target!r} ({', '.join(TARGET_NAMES)})")
            try:
                trace = load(args.trace)
            except TraceError as error:
                raise UsageError(str(error)) from None
            return replay(trace, args.target, args.json, sys.stdout, args.check)
        if args.command == "campaign":
            from kvmspec.fuzz.campaign import run_campaign

            if args.workers is not None and args.workers < 1:
                raise UsageError(f"--workers {args.workers}: at least 1")
            if args.minutes <= 0:
                raise UsageError(f"--minutes {args.minutes}: must be positive")
            from kvmspec.fuzz.campaign_database import DatabaseError

            try:
                return run_campaign(
                    args.areas, args.minutes, args.target, args.report, args.workers, args.database
                )
            except DatabaseError as error:
                raise UsageError(str(error)) from None
        if args.command == "schema":
            from kvmspec.fuzz.schema import trace_schema

            print(json.dumps(trace_schema(), indent=2))
            return EXIT_OK
        if args.command == "show":
            return show(args.trace, args.step, args.bug, args.svg)
    except UsageError as error:
        print(f"kvmspec: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvmspec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`kvmspec replay T | head`): stop quietly, as cat does.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the closed stream
        return 141
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
