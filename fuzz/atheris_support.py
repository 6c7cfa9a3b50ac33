"""What the Atheris fuzz targets share: findings, instrumentation, seeds, the Hypothesis bridge.

* :class:`SpecViolation` and :func:`write_regression`: a finding is an AssertionError that
  names the broken rules, and the run that found it is kept as a replayable trace under
  ``corpus/regressions/`` (``KVMSPEC_REGRESSIONS`` moves it, e.g. in tests); the harness
  targets (fuzz_generic, fuzz_x86) keep the input itself and its report
  (:func:`write_reproducer`), name a failure's rules with :func:`failure_lines`, count
  their actions with :class:`ActionStats`, and write their seeds with
  :func:`write_seed_inputs` and :func:`seeds_command`.
* :func:`instrumentation`: the ``atheris.instrument_imports()`` context the targets import
  kvmspec under, limited by default to the model (kvmspec.reference and kvmspec.spec) so that
  coverage guides towards model behaviour, not towards the harness's own branches.
* :func:`write_seeds`: the seed corpora, rebuilt with
  ``python -m kvmspec.fuzz.atheris_support seeds`` after a change to the decoder.
* :func:`hypothesis_fuzz_one_input`: the Hypothesis memslot state machine driven by Atheris
  bytes (``KVMSPEC_FUZZ_DRIVER=hypothesis ./fuzz/fuzz_memslots.py``).

Nothing from the model is imported at the top of this module: the fuzz targets import it
before they enter :func:`instrumentation`, and a model module imported earlier would stay
uninstrumented.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pkgutil
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmspec.fuzz.ops import Operation
    from kvmspec.fuzz.session import Session
    from kvmspec.spec.platforms import PlatformProfile

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "corpus" / "seeds"
CONFORMANCE = REPO / "corpus" / "conformance"
REGRESSIONS_ENV = "KVMSPEC_REGRESSIONS"
PROFILE_ENV = "KVMSPEC_PROFILE"
INSTRUMENT_ENV = "KVMSPEC_INSTRUMENT"
STATS_ENV = "KVMSPEC_FUZZ_STATS"


# ---------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------


class SpecViolation(AssertionError):
    """A fuzz input made the model break a rule. ``rules`` are the rule ids (``M7``, ...),
    ``trace`` the regression trace written for it."""

    def __init__(self, violations: list[str], trace: Path) -> None:
        self.violations = violations
        self.rules = tuple(dict.fromkeys(v.split(":", 1)[0] for v in violations))
        self.trace = trace
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"{violations[0]}{more}; trace: {trace}")


def regressions_dir() -> Path:
    """Where findings are written: ``$KVMSPEC_REGRESSIONS``, else ``corpus/regressions``."""
    return Path(os.environ.get(REGRESSIONS_ENV, "corpus/regressions"))


def random_inputs(count: int, max_len: int, seed: int = 20261121) -> list[bytes]:
    """``count`` random inputs of 0 to ``max_len`` bytes, the same for the same ``seed``:
    what a fuzzer starts from with no corpus, for tests that search for a planted bug."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(max_len + 1)) for _ in range(count)]


def write_regression(kind: str, data: bytes, trace_text: str) -> Path:
    """Write a finding's trace as ``<kind>-<sha1 of the input>.jsonl``; return its path."""
    directory = regressions_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{kind}-{hashlib.sha1(data).hexdigest()}.jsonl"
    path.write_text(trace_text, encoding="utf-8")
    _write_test(path, f"a finding of fuzz_{kind}.py")
    return path


def write_reproducer(family: str, data: bytes, text: str) -> Path:
    """Keep a harness target's finding: ``<family>-<sha1 of the input>.bin`` (the input,
    which ``./fuzz/fuzz_<family>.py FILE`` replays) and ``.txt`` (its report) in the
    regressions folder; return the report's path."""
    folder = regressions_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{family}-{hashlib.sha1(data).hexdigest()}"
    stem.with_suffix(".bin").write_bytes(data)
    path = stem.with_suffix(".txt")
    path.write_text(text, encoding="utf-8")
    _write_test(stem.with_suffix(".bin"), f"a finding of fuzz_{family}.py")
    return path


def _write_test(path: Path, what: str) -> None:
    """The pytest case that replays a kept finding (kvmspec.fuzz.regressions). Imported here,
    not at the top: this module is imported before the model, which must load instrumented."""
    from kvmspec.fuzz.regressions import write_regression_test

    write_regression_test(path, what)


def failure_lines(error: AssertionError, during: str) -> list[str]:
    """The rule lines of a harness failure: the checks' own lines (an AssertionError that
    carries ``violations``, as RulesBroken does), else one line naming its kind: DEADLOCK,
    a runtime CONTRACT, or a MODEL-ASSERT raised by the model itself."""
    violations: list[str] | None = getattr(error, "violations", None)
    if violations is not None:
        return violations
    message = " ".join(str(error).split())
    kind = type(error).__name__
    if kind == "DeadlockFound":
        return [f"DEADLOCK: {message}"]
    rule = "CONTRACT" if kind == "ContractViolation" else "MODEL-ASSERT"
    return [f"{rule}: {kind} in {during}: {message}"]


class ActionStats:
    """A harness target's counters, written to ``$KVMSPEC_FUZZ_STATS`` after executions 1,
    2, 4, 8, ... and then whenever a second has passed. libFuzzer ends the process without
    telling the target, so the file may miss the last second: readers scale it to
    libFuzzer's final count of executions."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.executions = 0
        self.actions = 0
        self.rejected: Counter[str] = Counter()
        self.written = 0.0

    def add(self, actions: int, rejected: Counter[str]) -> None:
        """One input ran ``actions`` actions; the decoder rejected ``rejected`` (by rule)."""
        self.executions += 1
        self.actions += actions
        self.rejected.update(rejected)
        if self.path is None:
            return
        power_of_two = self.executions & (self.executions - 1) == 0
        if power_of_two or time.monotonic() - self.written >= 1.0:
            self.write()

    def write(self) -> None:
        assert self.path is not None
        counters = {"executions": self.executions, "actions": self.actions}
        self.path.write_text(json.dumps(counters | {"rejected": dict(self.rejected)}))
        self.written = time.monotonic()


def write_seed_inputs(folder: Path, inputs: dict[str, bytes]) -> list[Path]:
    """(Re)write a seed corpus: each named input becomes ``<folder>/<name>.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in inputs.items():
        path = folder / f"{name}.bin"
        path.write_bytes(data)
        written.append(path)
    return written


def seeds_command(module: str, write: Callable[[], list[Path]], argv: list[str] | None) -> int:
    """``python -m <module> seeds``: run ``write`` and list what it wrote; anything else is
    one usage line and exit status 2."""
    if (sys.argv[1:] if argv is None else argv) != ["seeds"]:
        print(f"usage: python -m {module} seeds", file=sys.stderr)
        return 2
    for path in write():
        print(path, path.stat().st_size, "bytes")
    return 0


def profile_from_env() -> PlatformProfile:
    """The profile named by ``$KVMSPEC_PROFILE``, else the default profile."""
    from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES

    name = os.environ.get(PROFILE_ENV)
    if name is None:
        return DEFAULT_PROFILE
    if name not in PROFILES:
        known = ", ".join(sorted(PROFILES))
        print(f"kvmspec: error: {PROFILE_ENV}={name!r}: unknown profile ({known})", file=sys.stderr)
        raise SystemExit(2)
    return PROFILES[name]


# ---------------------------------------------------------------------------------------------
# Instrumentation
# ---------------------------------------------------------------------------------------------


# What the model executes: the uAPI decision functions and the platform profiles. Every other
# module of kvmspec.spec is a checker (contracts, invariants, the catalogue, the runtime
# condition checker): its branches only differ when a rule is broken, so its coverage would
# only add noise to what guides the fuzzer, and instrumenting it slows every execution.
RULE_MODULES = ("kvmspec.spec.uapi", "kvmspec.spec.platforms")


def _modules_on_disk(folder: Path, package: str) -> list[str]:
    """``package`` and every module and subpackage under ``folder``, found without importing
    any of them (importing here would load them uninstrumented)."""
    names = [package]
    for module in pkgutil.iter_modules([str(folder)], package + "."):
        if module.ispkg:
            names.extend(_modules_on_disk(folder / module.name.rsplit(".", 1)[1], module.name))
        else:
            names.append(module.name)
    return names


def _harness_modules() -> list[str]:
    """Every module of kvmspec.fuzz, and every module of kvmspec.spec but the rule modules
    (so a checker added later is never instrumented by mistake)."""
    root = Path(__file__).resolve().parents[1]
    checkers = [
        name
        for name in _modules_on_disk(root / "spec", "kvmspec.spec")[1:]
        if not name.startswith(RULE_MODULES)
    ]
    return [*_modules_on_disk(Path(__file__).resolve().parent, "kvmspec.fuzz"), *checkers]


def instrumentation(
    enabled: bool, default: str = "model"
) -> contextlib.AbstractContextManager[Any]:
    """The context to import kvmspec in, so that Atheris sees coverage of what it imports.

    ``$KVMSPEC_INSTRUMENT`` (else ``default``) chooses what: ``model`` (kvmspec.reference and
    the rules of kvmspec.spec, without the checkers), ``kvmspec`` (the harness too), ``all``
    (every module imported inside, libraries included) or ``none``. Disabled (``enabled``
    False, e.g. when a test imports a fuzz target) it does nothing.
    """
    mode = os.environ.get(INSTRUMENT_ENV, default)
    if not enabled or mode == "none":
        return contextlib.nullcontext()
    import atheris

    hook: contextlib.AbstractContextManager[Any]
    if mode == "all":
        hook = atheris.instrument_imports()
    elif mode == "kvmspec":
        hook = atheris.instrument_imports(include=["kvmspec"])
    elif mode == "model":
        hook = atheris.instrument_imports(include=["kvmspec"], exclude=_harness_modules())
    else:
        raise SystemExit(f"{INSTRUMENT_ENV}={mode!r}: expected model, kvmspec, all or none")
    return hook


def warn_if_contracts_off() -> None:
    """The runtime contracts are part of what a fuzz run checks; say so when they are off."""
    from kvmspec.spec import dbc

    if not dbc.ENABLED:
        print("WARNING: KVMSPEC_CONTRACTS is off: contracts are not checked", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The Hypothesis bridge
# ---------------------------------------------------------------------------------------------


def hypothesis_fuzz_one_input(profile: PlatformProfile) -> Callable[[bytes], None]:
    """The Hypothesis MemslotMachine as a fuzz target: each byte string is one run of the
    machine (Hypothesis reads its draws from the bytes). A failing run raises its error
    after writing the machine's trace as a ``hypothesis-<sha1>.jsonl`` regression."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import get_state_machine_test

    from kvmspec.fuzz import machines

    machine = machines.memslot_machine(profile, large_slots=False)
    test = get_state_machine_test(
        machine,
        settings=settings(
            database=None,
            deadline=None,
            stateful_step_count=64,
            suppress_health_check=list(HealthCheck),
        ),
    )
    fuzz_one_input: Callable[[bytes], object] = test.hypothesis.fuzz_one_input  # type: ignore[attr-defined]

    def run(data: bytes) -> None:
        machines.LAST_RUN.clear()
        try:
            fuzz_one_input(data)
        except Exception:
            if "trace" in machines.LAST_RUN:
                write_regression("hypothesis", data, machines.LAST_RUN["trace"])
            raise

    return run


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

Match = Callable[["Operation", "Session"], bool]


@dataclass(frozen=True)
class Want:
    """One operation a seed must decode to: ``match`` is checked before it is applied (with
    the session as it was), ``errno`` after (0, a name such as ``"EEXIST"``, or None: any)."""

    match: Match
    errno: int | str | None = 0


def _is(kind: str, test: Callable[[Any, Session], bool] | None = None) -> Match:
    """Matches operations whose trace name is ``kind`` (and that pass ``test``)."""

    def match(op: Operation, session: Session) -> bool:
        return kind == op.NAME and (test is None or test(op, session))

    return match


def _known(op: Any, session: Session) -> Any:
    """The last accepted request for the slot ``op`` names, or None."""
    return session.slot_requests.get((op.slot >> 16, op.slot & 0xFFFF))


def _in_region(op: Any) -> bool:
    """Whether the request's userspace_addr is inside a mapped region."""
    from kvmspec.fuzz.ops import RegionAddr

    return isinstance(op.userspace_addr, RegionAddr)


def _new_slot(flags: int | None = None, min_pages: int = 0) -> Match:
    """A one-region request for a slot that does not exist yet (flags as given, if given) of
    at least ``min_pages`` pages."""
    return _is(
        "set_user_memory_region",
        lambda op, s: (
            _known(op, s) is None
            and _in_region(op)
            and (flags is None or op.flags == flags)
            and op.memory_size >= min_pages * 4096
        ),
    )


def _change(what: str) -> Match:
    """A request for an existing slot that changes only ``what``: flags, gpa, size, hva."""

    def test(op: Any, session: Session) -> bool:
        old = _known(op, session)
        if old is None or op.memory_size == 0 or op.NAME != old.NAME:
            return False
        fields = {
            "flags": op.flags != old.flags,
            "gpa": op.guest_phys_addr != old.guest_phys_addr,
            "size": op.memory_size != old.memory_size,
            "hva": op.userspace_addr != old.userspace_addr,
        }
        return fields[what] and not any(changed for name, changed in fields.items() if name != what)

    return _is("set_user_memory_region", test)


def _delete_known() -> Match:
    return _is("set_user_memory_region", lambda op, s: op.memory_size == 0 and _known(op, s))


def _cap(name: str, args: tuple[int, ...] | None = None) -> Match:
    return _is("enable_cap", lambda op, s: op.cap == name and (args is None or op.args == args))


LOG = 1  # KVM_MEM_LOG_DIRTY_PAGES
READONLY = 2  # KVM_MEM_READONLY
_MMAP = Want(_is("mmap", lambda op, s: op.prot == "rw" and op.size >= 4 << 20))

MEMSLOT_SCENARIOS: dict[str, tuple[Want, ...]] = {
    "create": (_MMAP, Want(_new_slot(0))),
    "create-log": (_MMAP, Want(_new_slot(LOG))),
    "create-readonly": (_MMAP, Want(_new_slot(READONLY))),
    "create-flags-move-delete": (
        _MMAP,
        Want(_new_slot(0)),
        Want(_change("flags")),
        Want(_change("gpa")),
        Want(_delete_known()),
    ),
    "create-delete-create": (
        _MMAP,
        Want(_new_slot()),
        Want(_delete_known()),
        Want(_new_slot()),
    ),
    "move-and-log-toggle": (
        _MMAP,
        Want(_new_slot(0)),
        Want(_is("set_user_memory_region", lambda op, s: bool(_known(op, s)) and op.flags == LOG)),
        Want(_change("gpa")),
    ),
    "log-on-log-off": (_MMAP, Want(_new_slot(LOG)), Want(_change("flags"))),
    "resize-einval": (_MMAP, Want(_new_slot()), Want(_change("size"), "EINVAL")),
    "change-hva-einval": (_MMAP, Want(_new_slot()), Want(_change("hva"), "EINVAL")),
    "overlap-eexist": (_MMAP, Want(_new_slot()), Want(_new_slot(), "EEXIST")),
    "move-onto-other-eexist": (
        _MMAP,
        Want(_new_slot()),
        Want(_new_slot()),
        Want(_change("gpa"), "EEXIST"),
    ),
    "two-slots-one-hva": (
        _MMAP,
        Want(_new_slot()),
        Want(
            _is(
                "set_user_memory_region",
                lambda op, s: (
                    _known(op, s) is None
                    and any(op.userspace_addr == r.userspace_addr for r in s.slot_requests.values())
                ),
            )
        ),
    ),
    "four-slots": (_MMAP, *[Want(_new_slot()) for _ in range(4)]),
    "delete-missing-einval": (
        Want(
            _is("set_user_memory_region", lambda op, s: op.memory_size == 0 and not _known(op, s)),
            "EINVAL",
        ),
    ),
    "unaligned-size-einval": (
        _MMAP,
        Want(_is("set_user_memory_region", lambda op, s: op.memory_size % 4096 != 0), "EINVAL"),
    ),
    "address-space-1-einval": (
        _MMAP,
        Want(_is("set_user_memory_region", lambda op, s: op.slot >> 16 == 1), "EINVAL"),
    ),
    "internal-slot-id-einval": (
        _MMAP,
        Want(_is("set_user_memory_region", lambda op, s: op.slot == 32764), "EINVAL"),
    ),
    "raw-hva": (Want(_is("set_user_memory_region", lambda op, s: not _in_region(op)), None),),
    "dirty-log": (_MMAP, Want(_new_slot(LOG)), Want(_is("get_dirty_log"))),
    "dirty-log-not-logged": (_MMAP, Want(_new_slot(0)), Want(_is("get_dirty_log"), "ENOENT")),
    "manual-protect-clear": (
        Want(_cap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", (1,))),
        _MMAP,
        Want(_new_slot(LOG)),
        Want(_is("get_dirty_log")),
        Want(_is("clear_dirty_log", lambda op, s: op.num_pages > 0)),
    ),
    "manual-protect-initially-set": (
        Want(_cap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", (3,))),
        _MMAP,
        Want(_new_slot(LOG)),
        Want(_is("clear_dirty_log", lambda op, s: op.num_pages > 0)),
        Want(_is("get_dirty_log")),
    ),
    "clear-short-bitmap": (
        Want(_cap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", (1,))),
        _MMAP,
        Want(_new_slot(LOG, min_pages=128)),
        Want(_is("clear_dirty_log", lambda op, s: op.num_pages > 64 and len(op.bitmap) == 1)),
    ),
    "clear-without-manual-protect": (
        _MMAP,
        Want(_new_slot(LOG)),
        Want(_is("clear_dirty_log", lambda op, s: bool(_known(op, s))), None),
    ),
    "dirty-ring": (
        Want(_cap("KVM_CAP_DIRTY_LOG_RING", (4096,))),
        Want(_is("create_vcpu")),
        _MMAP,
        Want(_new_slot(LOG)),
        Want(_is("reset_dirty_rings")),
        Want(_is("get_dirty_log"), None),
    ),
    "dirty-ring-acq-rel": (
        Want(_cap("KVM_CAP_DIRTY_LOG_RING_ACQ_REL")),
        Want(_is("create_vcpu")),
        Want(_is("reset_dirty_rings")),
    ),
    "dirty-ring-after-vcpu": (
        Want(_is("create_vcpu")),
        Want(_cap("KVM_CAP_DIRTY_LOG_RING"), None),
    ),
    "dirty-ring-after-logging": (
        _MMAP,
        Want(_new_slot(LOG)),
        Want(_cap("KVM_CAP_DIRTY_LOG_RING", (4096,))),
        Want(_is("get_dirty_log"), None),
    ),
    "ring-with-bitmap": (Want(_cap("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP"), None),),
    "guest-memfd-bind-delete": (
        Want(_is("create_guest_memfd")),
        Want(_is("set_user_memory_region2", lambda op, s: isinstance(op.guest_memfd, str))),
        Want(_delete_known()),
    ),
    "guest-memfd-closed-fd": (
        Want(_is("set_user_memory_region2", lambda op, s: op.flags == 4), "EBADF"),
    ),
    "disable-slot-zap-quirk-move": (
        Want(_cap("KVM_CAP_DISABLE_QUIRKS2")),
        _MMAP,
        Want(_new_slot()),
        Want(_change("gpa")),
    ),
    "check-extension": (Want(_is("check_extension")), Want(_is("check_extension"))),
    "set-nr-mmu-pages": (
        Want(_is("set_nr_mmu_pages", lambda op, s: op.nr_mmu_pages < 64), "EINVAL"),
        Want(_is("set_nr_mmu_pages", lambda op, s: op.nr_mmu_pages >= 64), 0),
    ),
}
"""Seed scenarios: each becomes ``corpus/seeds/memslots/<name>.bin``, the shortest bytes
found (by a seeded search) that decode to operations matching these, with these results."""


def _decode(
    data: bytes, profile: PlatformProfile, max_operations: int | None = None
) -> tuple[Session, list[str], int]:
    """Run ``data`` as fuzz_memslots does (stopping after ``max_operations`` if given); return
    the session, its violations and how many bytes its choices read."""
    from kvmspec.fuzz.decoder import BytesChooser
    from kvmspec.fuzz.fuzz_memslots import MAX_OPERATIONS, apply_input
    from kvmspec.fuzz.session import Session

    session = Session(profile, "reference")
    chooser = BytesChooser(data)
    finding = apply_input(session, chooser, max_operations or MAX_OPERATIONS)
    return session, finding.violations if finding else [], chooser.position


def scenario_holds(wants: tuple[Want, ...], data: bytes, profile: PlatformProfile) -> bool:
    """Whether ``data`` decodes to exactly the operations ``wants`` describes, cleanly."""
    from kvmspec.fuzz.session import Session

    session, violations, _ = _decode(data, profile)
    if violations or len(session.history) != len(wants):
        return False
    replay = Session(profile, "reference")
    for want, (op, observed) in zip(wants, session.history, strict=True):
        if not want.match(op, replay):
            return False
        replay.apply(op)
        if want.errno is not None and observed["errno"] != want.errno:
            return False
    return True


def find_seed(
    wants: tuple[Want, ...], profile: PlatformProfile, rng: random.Random, tries: int = 200_000
) -> bytes:
    """The bytes of a scenario, one operation at a time: random chunks are appended to the
    bytes found so far until the next operation decodes and ends as wanted, then the chunk is
    cut where that operation's choices end."""
    data = b""
    for index in range(len(wants)):
        for _ in range(tries):
            candidate = data + rng.randbytes(rng.randint(2, 24))
            _, violations, used = _decode(candidate, profile, index + 1)
            wanted = wants[: index + 1]
            fits = not violations and used <= len(candidate)
            if fits and scenario_holds(wanted, candidate[:used], profile):
                data = candidate[:used]
                break
        else:
            raise RuntimeError(f"no bytes found for step {index + 1} after {tries} tries")
    return data


_MALFORMED_TRACES = {
    "empty.jsonl": "",
    "no-header.jsonl": '{"op": "create_vcpu"}\n',
    "bad-json.jsonl": '{"format": "kvmspec-trace/1", "platform": "x86_64"}\n{"op": \n',
    "unknown-platform.jsonl": '{"format": "kvmspec-trace/1", "platform": "sparc"}\n',
    "unknown-op.jsonl": '{"format": "kvmspec-trace/1", "platform": "arm64"}\n{"op": "reboot"}\n',
    "unknown-field.jsonl": (
        '{"format": "kvmspec-trace/1", "platform": "arm64"}\n{"op": "create_vcpu", "cpu": 1}\n'
    ),
    "out-of-range.jsonl": (
        '{"format": "kvmspec-trace/1", "platform": "x86_64"}\n'
        '{"op": "get_dirty_log", "slot": 4294967296}\n'
    ),
    "unknown-region.jsonl": (
        '{"format": "kvmspec-trace/1", "platform": "x86_64"}\n'
        '{"op": "set_user_memory_region", "slot": 0, "flags": 0, "guest_phys_addr": 0, '
        '"memory_size": 4096, "userspace_addr": {"region": "nowhere", "offset": 0}}\n'
    ),
    "region-twice.jsonl": (
        '{"format": "kvmspec-trace/1", "platform": "x86_64"}\n'
        '{"op": "mmap", "region": "a", "size": 4096}\n{"op": "mmap", "region": "a", "size": 4096}\n'
    ),
    "bad-expect.jsonl": (
        '{"format": "kvmspec-trace/1", "platform": "x86_64"}\n'
        '{"op": "create_vcpu", "expect": {"errno": -22}}\n'
    ),
}
_CONFORMANCE_SEEDS = (
    "s3-create-base.jsonl",
    "s3-move.jsonl",
    "s3-flags-only-log.jsonl",
    "s3-delete-ignores-fields.jsonl",
    "s3-overlap-eexist.jsonl",
)


def write_seeds(seeds: Path = SEEDS) -> list[Path]:
    """(Re)build both seed corpora: ``memslots/`` from :data:`MEMSLOT_SCENARIOS`; ``trace/``
    from the memslot seeds' own traces, a few conformance traces, and malformed traces."""
    from kvmspec.spec.platforms import DEFAULT_PROFILE

    written: list[Path] = []
    memslots = seeds / "memslots"
    traces = seeds / "trace"
    memslots.mkdir(parents=True, exist_ok=True)
    traces.mkdir(parents=True, exist_ok=True)
    for name, wants in MEMSLOT_SCENARIOS.items():
        data = find_seed(wants, DEFAULT_PROFILE, random.Random(name))
        path = memslots / f"{name}.bin"
        path.write_bytes(data)
        written.append(path)
        if name in ("create-flags-move-delete", "manual-protect-clear", "dirty-ring"):
            session, _, _ = _decode(data, DEFAULT_PROFILE)
            path = traces / f"valid-{name}.jsonl"
            path.write_text(session.trace_text(), encoding="utf-8")
            written.append(path)
    for name in _CONFORMANCE_SEEDS:
        source = CONFORMANCE / DEFAULT_PROFILE.name / name
        path = traces / f"valid-{name}"
        path.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
        written.append(path)
    for name, text in _MALFORMED_TRACES.items():
        path = traces / f"malformed-{name}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _iter_files(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.iterdir() if p.is_file())


def seed_files(corpus: str) -> list[Path]:
    """The files of one seed corpus (``memslots`` or ``trace``)."""
    return list(_iter_files(SEEDS / corpus))


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmspec.fuzz.atheris_support seeds``: rebuild the seed corpora."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["seeds"]:
        print("usage: python -m kvmspec.fuzz.atheris_support seeds", file=sys.stderr)
        return 2
    for path in write_seeds():
        print(path.relative_to(REPO), path.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
