#!/usr/bin/env python3
"""Atheris fuzz target: the trace parser must accept or reject any text, never crash.

Any bytes, decoded as UTF-8 (invalid sequences replaced), are parsed with
:func:`kvmspec.fuzz.trace.parse_lines`. The parser must return a Trace or raise TraceError;
any other exception is a bug and propagates for libFuzzer to report. A trace that parses must
round-trip: written back with :func:`~kvmspec.fuzz.trace.dump` and parsed again, it has the
same platform and the same operations with the same expectations.

    ./fuzz/fuzz_trace.py -max_total_time=60 corpus/seeds/trace
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # This folder is the kvmspec.fuzz package; as a script folder its trace.py would shadow
    # the standard library's trace module.
    del sys.path[0]

try:
    from kvmspec.fuzz import atheris_support as support
except ImportError:  # started as ./fuzz/fuzz_trace.py by a Python without the project
    _VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if __name__ != "__main__" or not _VENV_PYTHON.exists() or sys.executable == str(_VENV_PYTHON):
        raise
    os.execv(_VENV_PYTHON, [str(_VENV_PYTHON), __file__, *sys.argv[1:]])

with support.instrumentation(enabled=__name__ == "__main__", default="kvmspec"):
    from kvmspec.fuzz.trace import Trace, TraceError, dump, parse_lines


def _expectations(trace: Trace) -> list[str]:
    """Each step's expectation as JSON text (so that a NaN read from the input compares equal
    to itself)."""
    return [json.dumps(step.expect) for step in trace.steps]


def TestOneInput(data: bytes) -> None:
    """libFuzzer's entry point: parse, and if that succeeds, check the round trip."""
    try:
        trace = parse_lines(data.decode("utf-8", "replace").splitlines())
    except TraceError:
        return
    text = dump(trace.platform, ((step.op, step.expect) for step in trace.steps))
    again = parse_lines(text.splitlines(), "<dumped>")
    assert again.platform == trace.platform, (trace.platform, again.platform)
    assert [s.op for s in again.steps] == [s.op for s in trace.steps], "operations differ"
    assert _expectations(again) == _expectations(trace), "expectations differ"


def main() -> None:
    """Run libFuzzer (its flags come from the command line)."""
    import atheris

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
