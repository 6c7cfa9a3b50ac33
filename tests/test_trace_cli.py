"""Trace parsing and `kvmspec replay`: bad input gets one clear line and exit status 2, with
nothing applied; good traces replay deterministically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmspec.fuzz.cli import main
from kvmspec.fuzz.ops import Mmap, RegionAddr, SetUserMemoryRegion
from kvmspec.fuzz.trace import TraceError, dump, parse_lines

HEADER = '{"format": "kvmspec-trace/1", "platform": "x86_64-linux-6.18-pvm"}'
MMAP = '{"op": "mmap", "region": "r0", "size": 16777216}'
CREATE = (
    '{"op": "set_user_memory_region", "slot": 0, "flags": 0, "guest_phys_addr": 1048576, '
    '"memory_size": 65536, "userspace_addr": {"region": "r0", "offset": 0}}'
)


def write(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BAD_TRACES = {
    "malformed JSON": ([HEADER, '{"op": "mmap", "region": '], ":2: not valid JSON"),
    "no header": ([MMAP], ':1: header must say "format"'),
    "unknown platform": (['{"format": "kvmspec-trace/1", "platform": "vax"}'], "unknown platform"),
    "unknown operation": ([HEADER, '{"op": "explode"}'], ':2: unknown operation "explode"'),
    "unknown field": ([HEADER, '{"op": "get_dirty_log", "slot": 0, "slto": 1}'], "unknown field"),
    "missing field": ([HEADER, '{"op": "get_dirty_log"}'], 'missing field "slot"'),
    "missing region": ([HEADER, CREATE], ':2: no region named "r0"'.replace('"', "'")),
    "out-of-range u32": ([HEADER, '{"op": "get_dirty_log", "slot": 4294967296}'], "out of range"),
    "negative": ([HEADER, '{"op": "create_vcpu", "id": -1}'], "out of range"),
    "bool as int": ([HEADER, '{"op": "create_vcpu", "id": true}'], "expected an integer"),
    "bad expect": ([HEADER, MMAP.replace("}", ', "expect": {"errno": 5}}')], "expect.errno"),
    "unknown cap": ([HEADER, '{"op": "check_extension", "cap": "KVM_CAP_NOPE"}'], "unknown cap"),
    "not an object": ([HEADER, "[1, 2]"], "must be a JSON object"),
    "empty": ([], "empty trace"),
    "duplicate region": ([HEADER, MMAP, MMAP], "already mapped"),
    "offset outside region": (
        [HEADER, MMAP, CREATE.replace('"offset": 0', '"offset": 16777216')],
        "not inside region",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_TRACES))
def test_bad_trace_is_one_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines, message = BAD_TRACES[name]
    path = write(tmp_path, *lines)
    assert main(["replay", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was applied
    assert captured.err.startswith(f"kvmspec: error: {path}")
    assert message in captured.err
    assert captured.err.count("\n") == 1


def test_unknown_target_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, HEADER, MMAP)
    assert main(["replay", path, "--target", "qemu"]) == 2
    assert main(["replay", str(tmp_path / "absent.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'qemu'" in err and "cannot read" in err


def test_replay_json_reports_each_step_and_the_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = CREATE.replace("}}", '}, "expect": {"errno": "EEXIST"}}')
    path = write(tmp_path, HEADER, MMAP, CREATE.replace("}}", '}, "expect": {"errno": 0}}'), wrong)
    assert main(["replay", path, "--json"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["match"] for r in records] == [None, True, False]
    assert records[2] == {
        "step": 3,
        "op": "set_user_memory_region",
        "observed": {"errno": 0},
        "expected": {"errno": "EEXIST"},
        "match": False,
    }


def test_dump_and_parse_round_trip() -> None:
    steps = [
        (Mmap("r0", 1 << 20), {"errno": 0}),
        (SetUserMemoryRegion(0, 1, 0, 4096, RegionAddr("r0", 4096)), {"errno": 0}),
        (SetUserMemoryRegion(1, 0, 0, 4096, 0x7FFF_FFFF_F000), None),
    ]
    trace = parse_lines(dump("arm64", steps).splitlines())
    assert trace.platform == "arm64"
    assert [(s.op, s.expect) for s in trace.steps] == steps


def test_trace_error_names_file_and_line() -> None:
    with pytest.raises(TraceError) as error:
        parse_lines([HEADER, "", "# comment", "{}"], "x.jsonl")
    assert str(error.value) == 'x.jsonl:4: missing "op"'


def test_console_script_exit_status(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER, "{")
    result = subprocess.run(
        [sys.executable, "-m", "kvmspec.fuzz.cli", "replay", path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("kvmspec: error:")
