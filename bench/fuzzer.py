"""Executions per second of ``fuzz/fuzz_memslots.py`` under libFuzzer.

The fuzzer runs as it would from the command line, started from the seed corpus, with
``-max_len=1024`` and ``-print_final_stats=1``; the figure is libFuzzer's own
``stat::number_of_executed_units`` over the time those units took
(``stat::average_exec_per_sec``). A run that stops early at a finding is continued by a new
run (with another libFuzzer seed) until the time budget is spent; the finding is reported.
New corpus units, crash inputs and regression traces go to a temporary folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import REPO

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_UNCAUGHT = "=== Uncaught Python exception: ==="


def _what_stopped(stderr: str) -> str:
    """Why a run failed: Atheris's uncaught exception, else libFuzzer's error line."""
    lines = [line.strip() for line in stderr.splitlines()]
    if _UNCAUGHT in lines[:-1]:
        return lines[lines.index(_UNCAUGHT) + 1]
    errors = [line for line in lines if "ERROR: libFuzzer:" in line]
    return errors[0] if errors else " | ".join(lines[-3:])


@dataclass
class FuzzSpeed:
    """Executions, the seconds they took, and what stopped runs early."""

    contracts: bool
    units: int = 0
    seconds: float = 0.0
    runs: int = 0
    findings: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def exec_per_second(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0


def _one_run(seconds: int, seed: int, contracts: bool, scratch: Path) -> tuple[dict[str, int], str]:
    """One libFuzzer run; its final stats and (if it stopped at a finding) the finding."""
    env = dict(os.environ)
    env["KVMSPEC_CONTRACTS"] = "on" if contracts else "off"
    env["KVMSPEC_REGRESSIONS"] = str(scratch / "regressions")
    corpus = scratch / f"corpus-{seed}"
    corpus.mkdir()
    command = [
        sys.executable,
        "fuzz/fuzz_memslots.py",
        "-max_len=1024",
        f"-max_total_time={seconds}",
        f"-seed={seed}",
        "-print_final_stats=1",
        f"-artifact_prefix={scratch}/",
        str(corpus),
        "corpus/seeds/memslots",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 120
    )
    stats = {name: int(value) for name, value in _STAT.findall(result.stderr)}
    finding = _what_stopped(result.stderr) if result.returncode else ""
    return stats, finding


def measure(seconds: int = 20, contracts: bool = True) -> FuzzSpeed:
    """Fuzz for about ``seconds`` in total and return the execution rate."""
    speed = FuzzSpeed(contracts)
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix="kvmspec-bench-") as folder:
        while speed.runs < 10 and (remaining := deadline - time.monotonic()) >= 1:
            speed.runs += 1
            stats, finding = _one_run(round(remaining), speed.runs, contracts, Path(folder))
            units = stats.get("number_of_executed_units", 0)
            rate = stats.get("average_exec_per_sec", 0)
            if not stats:
                speed.error = finding or "no libFuzzer statistics"
                break
            if rate:  # runs under a second report 0 and are left out
                speed.units += units
                speed.seconds += units / rate
            if not finding:
                break
            speed.findings.append(finding)
    return speed
