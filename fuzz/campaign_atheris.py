"""The campaign's Atheris areas: each fuzz target in its own libFuzzer process, watched live.

libFuzzer prints a status line on every new coverage feature and at every power-of-two
execution count (``#4096 pulse cov: 638 ft: 2550 corp: 300/10225b exec/s: 2085 rss: 50Mb``),
and its final statistics when it stops (``-print_final_stats=1``). A reader thread follows
the status lines, so the campaign table shows executions, their rate and the edge coverage
while the fuzzer runs; the final statistics give the exact figures at the end. The campaign
stops a fuzzer early (Ctrl-C) with SIGTERM, on which libFuzzer prints them too and exits with
its "interrupted" status, 72.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SPAWN_LOCK = threading.Lock()
"""Held while a process is started. The campaign forks its state-machine workers while a thread
starts the fuzzers: a worker forked in the middle of ``Popen`` would inherit Popen's pipe to
the new child, and Popen would wait on that pipe until the worker exits."""

LIBFUZZER_INTERRUPTED = 72
"""libFuzzer's exit status after SIGINT or SIGTERM (its -interrupted_exitcode default)."""
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+)\b.*?(?:exec/s: (\d+))?")


@dataclass
class AreaResult:
    """What one area did: steps (state-machine rules, fuzzer executions or harness actions),
    the seconds its workers spent on it, its coverage where the engine measures one, and
    every failure and lost worker."""

    area: str
    target: str
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    coverage: int | None = None
    coverage_unit: str = "edges"
    """What ``coverage`` counts: libFuzzer's edges for a fuzzer, branch arcs of reference/ and
    spec/ for a state machine (see kvmspec.fuzz.campaign)."""
    failures: list[str] = field(default_factory=list)
    worker_deaths: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class FuzzArea:
    """An Atheris fuzz target of the campaign: its module, seed corpus and input size, and
    the family of state-machine areas it fuzzes too (``kvmspec campaign generic`` picks it)."""

    name: str
    family: str
    module: str
    seeds: Path
    max_len: int
    counts_actions: bool = False
    """Whether the target writes its action counters (``KVMSPEC_FUZZ_STATS``): its steps are
    then harness actions, else executions."""


class AtherisWorker:
    """One Atheris fuzz target in its own process, for ``seconds``.

    New inputs go to a scratch corpus (libFuzzer writes into its first corpus folder), so the
    seed corpus in the repository is only read. A finding stops libFuzzer; what it keeps is in
    ``regressions`` like every other finding.
    """

    def __init__(
        self,
        area: FuzzArea,
        seconds: float,
        scratch: Path,
        regressions: Path,
        result: AreaResult | None = None,
    ) -> None:
        self.area = area
        self.seconds = seconds
        self.result = result if result is not None else AreaResult(area.name, "reference")
        folder = scratch / area.family
        corpus = folder / "corpus"
        corpus.mkdir(parents=True)
        self.counters = folder / "counters.json"
        command = [
            sys.executable,
            "-m",
            area.module,
            f"-max_len={area.max_len}",
            f"-max_total_time={max(int(seconds), 1)}",
            "-print_final_stats=1",
            f"-artifact_prefix={folder}/",
            str(corpus),
        ]
        if area.seeds.is_dir():
            command.append(str(area.seeds))
        environment = dict(
            os.environ,
            KVMSPEC_REGRESSIONS=str(regressions.resolve()),
            KVMSPEC_FUZZ_STATS=str(self.counters),
        )
        self.started = time.monotonic()
        self.lines: list[str] = []
        with SPAWN_LOCK:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
                # Its own session: a Ctrl-C in the terminal reaches the campaign only, which
                # then stops the fuzzer itself (and still reads its final statistics).
                start_new_session=True,
            )
        self.reader = threading.Thread(target=self._follow, daemon=True)
        self.reader.start()

    def _follow(self) -> None:
        """Read libFuzzer's output as it comes; keep the live figures up to date."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            status = _STATUS.match(line)
            if status is not None:
                executions, coverage, rate = status.groups()
                self.result.examples = self.result.steps = int(executions)
                self.result.coverage = int(coverage)
                if rate:
                    self.result.seconds = int(executions) / max(int(rate), 1)

    def stop(self) -> None:
        """Ask libFuzzer to stop now (it prints its final statistics and exits). SIGTERM, not
        SIGINT: a process started in the background has SIGINT ignored, and keeps it so."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def finish(self) -> AreaResult:
        """Wait for the fuzzer to stop and read libFuzzer's final statistics (and, for a
        target that counts its actions, its counters)."""
        # libFuzzer stops itself after -max_total_time; a fuzzer still running two minutes
        # after that is stuck, and is killed.
        remaining = self.started + max(self.seconds, 1) - time.monotonic()
        try:
            self.process.wait(timeout=max(remaining, 0) + 120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=10)
        stderr = "".join(self.lines)
        stats = {name: int(value) for name, value in _STAT.findall(stderr)}
        units = stats.get("number_of_executed_units", self.result.examples)
        self.result.steps = self.result.examples = units
        rate = stats.get("average_exec_per_sec", 0)
        self.result.seconds = units / rate if rate else time.monotonic() - self.started
        if self.area.counts_actions and self.counters.exists():
            counters = json.loads(self.counters.read_text())
            if counters["executions"]:
                # The counters are written at most once a second: scale them to the final
                # number of executions.
                per_execution = counters["actions"] / counters["executions"]
                self.result.steps = round(per_execution * units)
        # Stopped by the campaign (libFuzzer's "interrupted" status) is not a failure; any
        # other non-zero status is.
        if self.process.returncode not in (0, LIBFUZZER_INTERRUPTED):
            lines = [line.rstrip() for line in self.lines if line.strip()]
            finding = next((line for line in lines if "SpecViolation" in line), None)
            self.result.failures.append(finding or (lines[-1] if lines else "fuzzer failed"))
        return self.result


class AtherisWorkers:
    """The Atheris areas one after the other, in one process at a time, within ``seconds``:
    each gets an equal share of the time left when it starts (a fuzzer stopped early by a
    finding leaves its time to the next). ``results`` holds every area's live result from the
    start, so the campaign table can show them as they run."""

    def __init__(
        self,
        areas: Sequence[FuzzArea],
        seconds: float,
        scratch: Path,
        regressions: Path,
        delay: float = 0.0,
    ) -> None:
        self.results = [AreaResult(area.name, "reference") for area in areas]
        self._stopping = threading.Event()
        self._current: AtherisWorker | None = None
        start = time.monotonic() + delay
        self.thread = threading.Thread(
            target=self._run, args=(areas, start, start + seconds, scratch, regressions)
        )
        self.thread.start()

    def _run(
        self,
        areas: Sequence[FuzzArea],
        start: float,
        deadline: float,
        scratch: Path,
        regressions: Path,
    ) -> None:
        # With one worker the fuzzers wait for the state machines' share of the budget.
        if self._stopping.wait(timeout=max(0.0, start - time.monotonic())):
            return
        for index, area in enumerate(areas):
            if self._stopping.is_set():
                return
            share = (deadline - time.monotonic()) / (len(areas) - index)
            if share < 1:
                return
            worker = AtherisWorker(area, share, scratch, regressions, self.results[index])
            self._current = worker
            worker.finish()

    def stop(self) -> None:
        """Stop the running fuzzer and start no other."""
        self._stopping.set()
        if self._current is not None:
            self._current.stop()

    def finish(self) -> list[AreaResult]:
        """Wait for the last fuzzer; the results, in the order of the areas."""
        self.thread.join()
        return self.results
