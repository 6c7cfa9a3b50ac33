"""The conformance suite: the tests the kvmspec pytest plugin runs against another target.

Collected with ``pytest --kvmspec-target=TARGET --pyargs kvmspec.fuzz.conformance_suite``
(the plugin, :mod:`kvmspec.fuzz.pytest_plugin`, resolves TARGET):

* ``test_conformance_trace[<profile>/<file>.jsonl]``, one case per trace of the conformance
  corpus: every step is applied to a fresh target inside a :class:`Session`; each
  observation must equal the one the real kernel gave (``expect``), and no step may break a
  black-box contract (on a model VM, a white-box invariant). An operation the target does
  not support ends the case as a skip with that reason, once the steps before it agreed.
* ``test_differential_machine[<profile>]``: the differential state machine, the reference
  and the target in lockstep on Hypothesis-drawn memslot operations, identical observations
  required; operations the target does not support are left out of the run.

A failure names the trace file and line, the operation, and what differs; docs/conformance.md
explains every kind of report.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from kvmspec.fuzz.machines import DECODERS, STATS, DifferentialMachine, HypothesisChooser
from kvmspec.fuzz.ops import Observation
from kvmspec.fuzz.pytest_plugin import TargetFactory, corpus_folder
from kvmspec.fuzz.regressions import cite, rule_of
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import TargetUnavailable
from kvmspec.fuzz.targets.subprocess_target import TargetError, UnsupportedOperation
from kvmspec.fuzz.trace import TraceError, load
from kvmspec.spec.platforms import PROFILES

NO_SHRINK = [phase for phase in Phase if phase not in (Phase.shrink, Phase.explain)]
SKIPPED: Counter[str] = Counter()
"""Operations the differential machine left out because the target does not support them."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One case per corpus trace, and one differential machine per profile with traces."""
    corpus = corpus_folder(metafunc.config)
    traces = sorted(corpus.glob("*/*.jsonl"))
    if "conformance_trace" in metafunc.fixturenames:
        metafunc.parametrize(
            "conformance_trace",
            [pytest.param(p, id=p.relative_to(corpus).as_posix()) for p in traces]
            or [pytest.param(None, id="no-corpus")],
        )
    if "profile_name" in metafunc.fixturenames:
        profiles = sorted({p.parent.name for p in traces} & set(PROFILES))
        metafunc.parametrize("profile_name", profiles or [pytest.param(None, id="no-corpus")])


# --------------------------------------------------------------------------- the corpus


def describe_divergence(expected: Observation, observed: Observation) -> str:
    """What differs between two observations, in one line: the errno, or the fields."""
    if expected.get("errno") != observed.get("errno"):
        return f"errno differs: expected {expected.get('errno')}, observed {observed.get('errno')}"
    parts = []
    for key in sorted(set(expected) | set(observed)):
        if key not in observed:
            parts.append(f"{key} missing (expected {json.dumps(expected[key])})")
        elif key not in expected:
            parts.append(f"{key} not expected (observed {json.dumps(observed[key])})")
        elif expected[key] != observed[key]:
            parts.append(
                f"{key} differs: expected {json.dumps(expected[key])}, "
                f"observed {json.dumps(observed[key])}"
            )
    return "field " + "; ".join(parts)


def _contract_violation(where: str, op_name: str, violation: str) -> str:
    rule_id = rule_of(violation)
    found = f"{where}: {op_name}: contract violation {violation}"
    if rule_id is not None:
        found += "\n    " + cite(rule_id).replace("\n", "\n    ")
    return found


def test_conformance_trace(
    conformance_trace: Path | None, kvmspec_target_factory: TargetFactory
) -> None:
    """Replay one corpus trace on a fresh target; every observation must be the kernel's
    and every step must keep the contracts."""
    if conformance_trace is None:
        pytest.skip("no conformance traces found: give --kvmspec-corpus=DIR")
    try:
        trace = load(conformance_trace)
    except TraceError as error:
        pytest.fail(f"bad corpus trace: {error}", pytrace=False)
    profile = PROFILES[trace.platform]
    try:
        target = kvmspec_target_factory(profile)
    except TargetUnavailable as reason:
        pytest.skip(f"target unavailable for {profile.name}: {reason}")
    session = Session(profile, target)
    problems: list[str] = []
    unsupported = ""
    try:
        for step in trace.steps:
            where = f"{trace.source}:{step.line}"
            line = json.dumps(step.op.to_json())
            try:
                observed, broken = session.apply(step.op)
            except UnsupportedOperation as reason:
                unsupported = f"{where}: {reason}"
                break
            except TargetError as error:
                problems.append(f"{where}: {line}\n    target failed: {error}")
                break
            if step.expect is not None and observed != step.expect:
                problems.append(
                    f"{where}: {line}\n"
                    f"    expected {json.dumps(step.expect)}\n"
                    f"    observed {json.dumps(observed)}\n"
                    f"    {describe_divergence(step.expect, observed)}"
                )
            problems.extend(_contract_violation(where, step.op.NAME, v) for v in broken)
    finally:
        session.close()
    if problems:
        if unsupported:
            problems.append(f"(then stopped: {unsupported})")
        pytest.fail(
            f"{target.name}: {len(problems)} problem(s)\n" + "\n".join(problems), pytrace=False
        )
    if unsupported:
        pytest.skip(f"unsupported operation: {unsupported}")


# --------------------------------------------------------------------------- differential


class ConformanceDifferential(DifferentialMachine):
    """The differential machine, leaving out the operations the target does not support:
    such an operation is offered to the target first, and when it declines, the reference
    does not apply it either, so both stay in the same state."""

    @precondition(lambda self: not self.differences)
    @rule(data=st.data())
    def apply_to_both(self, data: st.DataObject) -> None:
        op = self.decode(HypothesisChooser(data), self.reference)
        note(json.dumps(op.to_json()))
        name = self.other_session.target.name
        try:
            observed, other_violations = self.other_session.apply(op)
        except UnsupportedOperation as reason:
            SKIPPED[op.NAME] += 1
            note(f"  left out: {reason}")
            return
        except TargetError as error:
            self.differences.append(f"{op.NAME}: target failed: {error}")
            return
        expected, violations = self.reference.apply(op)
        STATS["steps"] += 1
        STATS["invariant_checks"] += 1
        note(f"  reference -> {json.dumps(expected)}")
        note(f"  {name} -> {json.dumps(observed)}")
        if expected != observed:
            self.differences.append(
                f"{op.NAME}: reference {json.dumps(expected)}, {name} {json.dumps(observed)}: "
                + describe_divergence(expected, observed)
            )
        self.differences.extend(f"reference broke {v}" for v in violations)
        self.differences.extend(f"{name} broke {v}" for v in other_violations)


def test_differential_machine(
    profile_name: str | None, kvmspec_target_factory: TargetFactory, pytestconfig: pytest.Config
) -> None:
    """The reference and the target agree on every operation Hypothesis draws."""
    examples: int = pytestconfig.getoption("kvmspec_examples")
    if profile_name is None:
        pytest.skip("no conformance traces found, so no profile to run: give --kvmspec-corpus")
    if examples <= 0:
        pytest.skip("--kvmspec-examples=0")
    profile = PROFILES[profile_name]
    try:
        kvmspec_target_factory(profile).close()
    except TargetUnavailable as reason:
        pytest.skip(f"target unavailable for {profile.name}: {reason}")
    attributes = {
        "profile": profile,
        "other": staticmethod(kvmspec_target_factory),
        "decode": staticmethod(DECODERS["memslots"]),
    }
    machine: type[ConformanceDifferential] = type(
        f"ConformanceDifferential[{profile.name}]", (ConformanceDifferential,), attributes
    )
    # Hypothesis's shrinking of this machine takes minutes; it is asked for explicitly.
    phases = list(Phase) if pytestconfig.getoption("kvmspec_shrink") else NO_SHRINK
    machine.TestCase.settings = settings(
        max_examples=examples,
        phases=phases,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine.TestCase().runTest()
