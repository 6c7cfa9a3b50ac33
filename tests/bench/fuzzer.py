"""Executions per second of the Atheris fuzz targets under libFuzzer: ``fuzz/fuzz_memslots.py``
and ``fuzz/fuzz_generic.py`` (which also counts its harness actions).

The fuzzer runs as it would from the command line, started from its seed corpus, with its
``-max_len`` and ``-print_final_stats=1``; the figure is libFuzzer's own
``stat::number_of_executed_units`` over the time those units took
(``stat::average_exec_per_sec``). A target that writes its counters (``KVMSPEC_FUZZ_STATS``)
also gives the actions it applied per execution. A run that stops early at a finding is
continued by a new run (with another libFuzzer seed) until the time budget is spent; the
finding is reported. New corpus units, crash inputs and regression traces go to a temporary
folder.
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class FuzzScript:
    """A fuzz target as the bench runs it: its script, seed corpus and ``-max_len``."""

    path: str
    seeds: str
    max_len: int


MEMSLOTS = FuzzScript("fuzz/fuzz_memslots.py", "corpus/seeds/memslots", 1024)
GENERIC = FuzzScript("fuzz/fuzz_generic.py", "corpus/seeds/generic", 512)


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
    actions: float = 0.0
    """Harness actions applied, for a target that counts them (else 0)."""
    runs: int = 0
    findings: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def exec_per_second(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0

    @property
    def actions_per_second(self) -> float:
        return self.actions / self.seconds if self.seconds else 0.0


def _one_run(
    script: FuzzScript, seconds: int, seed: int, contracts: bool, scratch: Path
) -> tuple[dict[str, int], float | None, str]:
    """One libFuzzer run: its final stats, the actions it applied per execution (None if the
    target does not count them) and (if it stopped at a finding) the finding."""
    env = dict(os.environ)
    env["KVMSPEC_CONTRACTS"] = "on" if contracts else "off"
    env["KVMSPEC_REGRESSIONS"] = str(scratch / "regressions")
    counters = scratch / f"counters-{seed}.json"
    env["KVMSPEC_FUZZ_STATS"] = str(counters)
    corpus = scratch / f"corpus-{seed}"
    corpus.mkdir()
    command = [
        sys.executable,
        script.path,
        f"-max_len={script.max_len}",
        f"-max_total_time={seconds}",
        f"-seed={seed}",
        "-print_final_stats=1",
        f"-artifact_prefix={scratch}/",
        str(corpus),
        script.seeds,
    ]
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 120
    )
    stats = {name: int(value) for name, value in _STAT.findall(result.stderr)}
    finding = _what_stopped(result.stderr) if result.returncode else ""
    per_execution = None
    if counters.exists():
        counted = json.loads(counters.read_text())
        if counted["executions"]:
            per_execution = counted["actions"] / counted["executions"]
    return stats, per_execution, finding


def measure(seconds: int = 20, contracts: bool = True, script: FuzzScript = MEMSLOTS) -> FuzzSpeed:
    """Fuzz for about ``seconds`` in total and return the execution rate (and the action
    rate, for a target that counts its actions)."""
    speed = FuzzSpeed(contracts)
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix="kvmspec-bench-") as folder:
        while speed.runs < 10 and (remaining := deadline - time.monotonic()) >= 1:
            speed.runs += 1
            stats, per_execution, finding = _one_run(
                script, round(remaining), speed.runs, contracts, Path(folder)
            )
            units = stats.get("number_of_executed_units", 0)
            rate = stats.get("average_exec_per_sec", 0)
            if not stats:
                speed.error = finding or "no libFuzzer statistics"
                break
            if rate:  # runs under a second report 0 and are left out
                speed.units += units
                speed.seconds += units / rate
                # The counters are written at most once a second: scale them to libFuzzer's
                # final count.
                speed.actions += (per_execution or 0.0) * units
            if not finding:
                break
            speed.findings.append(finding)
    return speed
