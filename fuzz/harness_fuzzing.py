"""What the harness-driven Atheris targets share: decoded actions on a harness, a check after
each, the report of a failing input, and libFuzzer's entry point.

fuzz_generic.py, fuzz_x86.py, fuzz_ppc.py and fuzz_arm64.py each drive one harness (a plain
class with one method per action and ``check()``) from the bytes of an input: the first bytes
set the VM up, then each action is decoded from the bytes that follow, against the harness's
state; the decoder rejects (and names the rule for) an action the state does not allow. Each
target says how to build its harness and decode its actions; :func:`drive` runs them and
:class:`HarnessFuzzTarget` reports and keeps what fails. This module imports nothing of the
model, so a target can import it before the model is loaded (instrumented).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from kvmspec.fuzz import atheris_support as support
from kvmspec.fuzz.allocator import keep_freed_memory

if TYPE_CHECKING:
    from kvmspec.fuzz.decoder import BytesChooser

Log = Callable[[str], None]
SetUp = TypeVar("SetUp")
H = TypeVar("H", bound="Harness")


class Harness(Protocol):
    def check(self) -> None:
        """Raise an AssertionError (RulesBroken) naming every rule the state breaks."""


@dataclass(frozen=True)
class Action:
    """One harness call: the method and its keyword arguments."""

    method: str
    args: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        return f"{self.method}({', '.join(f'{name}={value!r}' for name, value in self.args)})"

    def apply(self, harness: Any) -> None:
        getattr(harness, self.method)(**dict(self.args))


class Kind(Protocol):
    """What the encoder needs of a decoder's kind of action."""

    @property
    def method(self) -> str: ...

    @property
    def params(self) -> Sequence[tuple[str, Any]]: ...


def answer(options: Sequence[object], value: object) -> bytes:
    """The bytes a BytesChooser reads as ``value`` when asked to pick among ``options``:
    nothing for one option, one byte for up to 256, two (little-endian) above."""
    count, index = len(options), list(options).index(value)
    if count <= 1:
        return b""
    return index.to_bytes(1 if count <= 256 else 2, "little")


Step = tuple[str, tuple[Any, ...]]
"""A harness call in a seed scenario: the method and its argument values, in order."""


def encode_steps(
    kinds: Sequence[Kind],
    steps: Iterable[Step],
    encode_argument: Callable[[Any, object], bytes] = answer,
) -> bytes:
    """The bytes a decoder reads back as ``steps``: each step's kind, then each argument's
    answer (``encode_argument`` for a decoder whose argument domains are not plain
    sequences). The inverse of the decoders, for seeds and the machines' reproducers."""
    out = bytearray()
    methods = [kind.method for kind in kinds]
    for method, values in steps:
        index = methods.index(method)
        out += answer(range(len(kinds)), index)
        params = kinds[index].params
        if len(values) != len(params):
            raise ValueError(f"{method} takes {[name for name, _ in params]}, not {values}")
        for (_, domain), value in zip(params, values, strict=True):
            out += encode_argument(domain, value)
    return bytes(out)


@dataclass(frozen=True)
class Rejected:
    """An action the decoder did not call: ``why`` is the rule that rejected it, ``detail``
    the particulars."""

    method: str
    why: str
    detail: str

    def __str__(self) -> str:
        return f"{self.method} rejected ({self.why}): {self.detail}"


@dataclass
class Run(Generic[SetUp]):
    """What one input did: its set-up, how many actions it applied, how many the decoder
    rejected (by rule), the broken rules if a check failed (else an empty list), and, for a
    harness with a scheduler, the schedule (which actor ran which step)."""

    setup: SetUp
    actions: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)


def _quiet(line: str) -> None:
    """The harness's log when nobody reads it."""


def drive(
    run: Run[SetUp],
    chooser: BytesChooser,
    start: Callable[[Log], H],
    decode: Callable[[H], Action | Rejected],
    log: Log | None,
    max_actions: int,
) -> Run[SetUp]:
    """Build and set up the harness (``start``, given the harness's log), check it, then
    decode and apply actions until the bytes or ``max_actions`` run out, checking every rule
    after each; stop at the first check that fails. ``log``, if given, receives the set-up
    and each action (or why it was rejected), followed by the harness's lines, indented."""
    step: object = run.setup
    try:
        if log is None:
            harness = start(_quiet)
        else:
            harness = start(lambda line: log(f"  {line}"))
            log(str(step))
        harness.check()
        while run.actions + run.rejected.total() < max_actions and not chooser.exhausted:
            step = decode(harness)
            if log is not None:
                log(str(step))
            if isinstance(step, Rejected):
                run.rejected[step.why] += 1
                continue
            run.actions += 1
            step.apply(harness)
            harness.check()
    except AssertionError as error:
        run.violations = support.failure_lines(error, str(step))
    return run


class HarnessFuzzTarget(Generic[SetUp]):
    """libFuzzer's side of a harness target: ``family`` names its findings
    (``corpus/regressions/<family>-<sha1>.bin`` and ``.txt``), ``run_input`` runs one input
    (with a log, or none), ``title`` heads its report."""

    def __init__(
        self,
        family: str,
        run_input: Callable[[bytes, Log | None], Run[SetUp]],
        title: Callable[[Run[SetUp], bytes], str],
    ) -> None:
        self.family = family
        self.run_input = run_input
        self.title = title
        self.stats = support.ActionStats(os.environ.get(support.STATS_ENV))

    def report(self, data: bytes) -> tuple[Run[SetUp], str]:
        """Replay an input with its log on: the run, and its report (the broken rules, then
        each action with what the harness saw it do, and the schedule if there is one)."""
        lines: list[str] = []
        run = self.run_input(data, lines.append)
        schedule = ["schedule (which actor ran which step):", *(f"  {s}" for s in run.schedule)]
        text = "\n".join(
            [
                f"{self.title(run, data)}, {len(data)} bytes: broken rules",
                *(f"  {violation}" for violation in run.violations),
                "actions, each followed by what the harness saw:",
                *(f"  {line}" for line in lines),
                *(schedule if run.schedule else []),
                "",
            ]
        )
        return run, text

    def test_one_input(self, data: bytes) -> None:
        """libFuzzer's entry point: one input, one fresh VM; raise SpecViolation on a
        finding, after keeping the input and its report."""
        run = self.run_input(data, None)
        self.stats.add(run.actions, run.rejected)
        if run.violations:
            replayed, text = self.report(data)
            print(text, file=sys.stderr)
            path = support.write_reproducer(self.family, data, text)
            raise support.SpecViolation(replayed.violations or run.violations, path)

    def main(self) -> None:
        """Run libFuzzer (its flags come from the command line)."""
        import atheris

        support.warn_if_contracts_off()
        keep_freed_memory()  # each input's fresh VM reuses the last one's memory
        atheris.Setup(sys.argv, self.test_one_input)
        atheris.Fuzz()
