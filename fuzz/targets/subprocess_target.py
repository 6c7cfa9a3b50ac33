"""A target in another process, in any language: the kvmspec subprocess protocol.

The implementation under test runs as a child process. kvmspec writes the trace header
``{"format": "kvmspec-trace/1", "platform": ...}`` on its standard input, then one operation
per line, exactly the JSON objects of trace format v1 (``Operation.to_json()``, without
``expect``); the child answers each operation with one line on its standard output: the
observation, a JSON object of the same shape as the reference target's (``{"errno": 0}``,
``{"errno": "EEXIST"}``, ``{"errno": 0, "bitmap": [...]}``, errnos named as Python's
``errno.errorcode`` names them). Two answers are more than an observation:

* ``{"unsupported": "<op>"}``: the child does not implement the operation. :meth:`apply`
  raises :class:`UnsupportedOperation`, which the conformance suite reports as a skip.
* an ``mmap`` answer may carry ``"hva"``, the start address the child's mmap returned. It is
  taken out of the observation (the other targets do not report it) and lets
  :attr:`SubprocessTarget.resolve` turn region addresses into host addresses, so that a
  session can judge the memslot requests by the black-box contracts.

Whatever else goes wrong is the child's fault, not an observation: it exits, it does not
answer within the timeout, or it answers a line that is not an observation. Each raises
:class:`TargetError` with one line naming the command, the operation and what happened
(the exit status and the tail of its standard error, or the bad line). docs/conformance.md
describes the protocol for implementers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO

from kvmspec.fuzz.ops import Address, Mmap, Observation, Operation, RegionAddr
from kvmspec.fuzz.targets.base import TargetUnavailable
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import U64_MAX

DEFAULT_TIMEOUT = 10.0
"""Seconds a child has to answer one operation (and to exit once its input is closed)."""
_PIPE_CHUNK = 4096
"""Bytes written at once: a pipe with room for one byte takes PIPE_BUF (4096) at once without
blocking, so a write after select() never blocks."""
_SHOWN = 160
"""How many characters of an operation, a bad line or standard error an error message shows."""


class TargetError(Exception):
    """A target failed in a way no observation describes (a child process that died, hung, or
    answered garbage). ``str()`` is one line."""


class UnsupportedOperation(Exception):
    """The target does not implement this operation. ``str()`` is one line; ``op`` is the
    operation's name. Any target may raise it; the conformance suite skips the case."""

    def __init__(self, target: str, op: str) -> None:
        super().__init__(f"{target} does not support {op}")
        self.op = op


def _shorten(text: str) -> str:
    """``text`` on one line, cut to a readable length."""
    flat = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return flat if len(flat) <= _SHOWN else flat[: _SHOWN - 3] + "..."


def _is_errno(value: object) -> bool:
    """An observation's errno: the integer 0, or a name (``"EINVAL"``; digits for a number
    Python has no name for)."""
    if isinstance(value, str):
        return bool(value) and (value.startswith("E") or value.isdigit())
    return type(value) is int and value == 0


class SubprocessTarget:
    """A target that is a child process speaking the subprocess protocol.

    ``command`` is a command line (split like a shell would, without running one) or an
    argument list. Raises :class:`TargetUnavailable` when the command cannot be started.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        profile: PlatformProfile,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise TargetUnavailable("subprocess target: empty command")
        self.command = command if isinstance(command, str) else shlex.join(argv)
        self.name = f"subprocess:{self.command}"
        self.profile = profile
        self.timeout = timeout
        self._regions: dict[str, int] = {}  # region name -> the start its child reported
        self._addresses_known = True  # every successful mmap so far reported its "hva"
        self._buffer = bytearray()  # what the child wrote after the last complete line
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError as error:
            self._stderr.close()
            raise TargetUnavailable(f"{self.command}: {error.strerror or error}") from None
        header = {"format": "kvmspec-trace/1", "platform": profile.name}
        self._send(json.dumps(header), "the header")

    def __enter__(self) -> SubprocessTarget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the protocol

    def apply(self, op: Operation) -> Observation:
        """Send ``op``, read its observation. Raises :class:`UnsupportedOperation` when the
        child answers ``{"unsupported": ...}``, and :class:`TargetError` when it fails."""
        line = json.dumps(op.to_json())
        self._send(line, line)
        answer = self._read_line(line)
        try:
            observed = json.loads(answer)
        except (ValueError, RecursionError):
            observed = None
        if not isinstance(observed, dict):
            raise self._failure(line, f"answered a line that is not a JSON object: {answer!r}")
        if "unsupported" in observed:
            raise UnsupportedOperation(self.name, op.NAME)
        if not _is_errno(observed.get("errno")):
            raise self._failure(line, f'answered without a valid "errno": {answer!r}')
        if isinstance(op, Mmap):
            self._learn_region(op, observed)
        return observed

    def close(self) -> None:
        """Close the child's input and wait for it to exit; kill it after the timeout. Safe
        to call again."""
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        # A child that is already gone makes the final flush a broken pipe.
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        self._stderr.close()

    @property
    def resolve(self) -> Callable[[Address], int] | None:
        """The host address of a ``userspace_addr``, as the child placed its regions; None
        (no resolver: sessions judge the other rules) once a region's mmap answered without
        ``"hva"``."""
        return self._resolve if self._addresses_known else None

    def _resolve(self, address: Address) -> int:
        if isinstance(address, RegionAddr):
            return (self._regions.get(address.region, 0) + address.offset) & U64_MAX
        return address

    def _learn_region(self, op: Mmap, observed: Observation) -> None:
        hva = observed.pop("hva", None)
        if observed["errno"] != 0:
            return
        if type(hva) is int:
            self._regions[op.region] = hva
        else:
            self._addresses_known = False

    # ------------------------------------------------------------------ the pipes

    def _send(self, line: str, what: str) -> None:
        """Write one line, within the timeout: a long line (a bitmap of a million words) must
        not block forever on a child that has stopped reading."""
        process = self._live(what)
        assert process.stdin is not None
        fd = process.stdin.fileno()
        data = memoryview(line.encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(what, f"did not read its input within {self.timeout:g} s")
            _, ready, _ = select.select([], [fd], [], remaining)
            if not ready:
                continue
            try:
                data = data[os.write(fd, data[:_PIPE_CHUNK]) :]
            except OSError:
                raise self._failure(what, "stopped reading its input") from None

    def _read_line(self, what: str) -> str:
        """The next line the child writes, within the timeout."""
        process = self._live(what)
        assert process.stdout is not None
        fd = process.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(what, f"gave no answer within {self.timeout:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._failure(what, "closed its output")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode("utf-8", errors="replace").strip()

    def _live(self, what: str) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise TargetError(f"{self.name}: {_shorten(what)}: the target is closed")
        return self._process

    def _failure(self, what: str, problem: str) -> TargetError:
        """One line for a child that failed on ``what``: the problem, its exit status if it
        has exited, and the tail of its standard error. The child is stopped: a target
        that failed once cannot be trusted with the next operation."""
        process = self._live(what)
        status = ""
        try:
            status = f"; exited with status {process.wait(0.2)}"
        except subprocess.TimeoutExpired:
            process.kill()  # hung, or still running after a bad answer
        message = f"{self.name}: on {_shorten(what)}: the child {problem}{status}"
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - 4096))
        tail = _shorten(self._stderr.read().decode("utf-8", errors="replace")[-_SHOWN:])
        self.close()
        return TargetError(message + (f"; stderr: {tail}" if tail else ""))
