"""The ``kvmspec`` command: replay traces, run campaigns, print the trace schema.

Errors a user can cause (a bad trace, an unknown target, a missing /dev/kvm) end with one line
``kvmspec: error: ...`` and exit status 2, never a traceback.

    kvmspec replay TRACE [--target reference|linux-kvm] [--json]
    kvmspec campaign [--minutes N] [--workers N] [--target T] [--report FILE] [AREA ...]
    kvmspec schema
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


def replay(trace: Trace, target_name: str, as_json: bool, out: TextIO) -> int:
    """Apply every step of ``trace`` to a fresh target; print each observation. Returns the
    exit status: 0 when all recorded expectations match, 1 at the first divergence."""
    try:
        target = make_target(target_name, PROFILES[trace.platform])
    except TargetUnavailable as reason:
        raise UsageError(f"target {target_name} is unavailable: {reason}") from None
    first_divergence: tuple[int, Observation, Observation] | None = None
    try:
        for number, step in enumerate(trace.steps, start=1):
            observed = target.apply(step.op)
            match = None if step.expect is None else observed == step.expect
            if as_json:
                record = {
                    "step": number,
                    "op": step.op.NAME,
                    "observed": observed,
                    "expected": step.expect,
                    "match": match,
                }
                print(json.dumps(record), file=out)
            else:
                mark = {None: " ", True: "=", False: "!"}[match]
                print(f"{mark} {number:4d} {step.op.NAME:<24} {json.dumps(observed)}", file=out)
            if match is False and first_divergence is None:
                assert step.expect is not None
                first_divergence = (step.line, step.expect, observed)
    finally:
        target.close()
    if first_divergence is None:
        return EXIT_OK
    line, expected, observed = first_divergence
    print(
        f"{trace.source}:{line}: divergence: expected {json.dumps(expected)}, "
        f"observed {json.dumps(observed)}",
        file=sys.stderr,
    )
    return EXIT_DIVERGED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmspec", description=__doc__.splitlines()[0] if __doc__ else "")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    replay_cmd = commands.add_parser("replay", help="apply a trace to a target")
    replay_cmd.add_argument("trace", help="a kvmspec-trace/1 JSON Lines file")
    replay_cmd.add_argument("--target", default="reference", help="reference or linux-kvm")
    replay_cmd.add_argument("--json", action="store_true", help="one JSON object per step")

    campaign_cmd = commands.add_parser("campaign", help="run the state machines and fuzzers")
    campaign_cmd.add_argument("areas", nargs="*", help="areas to run (default: all)")
    campaign_cmd.add_argument("--minutes", type=float, default=1.0, help="time budget")
    campaign_cmd.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: one per core)"
    )
    campaign_cmd.add_argument("--target", default=None, help="reference or linux-kvm")
    campaign_cmd.add_argument(
        "--report", default=None, help="write a JSON report to this file as well"
    )

    commands.add_parser("schema", help="print the JSON Schema of trace lines")
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
            return replay(trace, args.target, args.json, sys.stdout)
        if args.command == "campaign":
            from kvmspec.fuzz.campaign import run_campaign

            if args.workers is not None and args.workers < 1:
                raise UsageError(f"--workers {args.workers}: at least 1")
            if args.minutes <= 0:
                raise UsageError(f"--minutes {args.minutes}: must be positive")
            return run_campaign(args.areas, args.minutes, args.target, args.report, args.workers)
        if args.command == "schema":
            from kvmspec.fuzz.schema import trace_schema

            print(json.dumps(trace_schema(), indent=2))
            return EXIT_OK
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
