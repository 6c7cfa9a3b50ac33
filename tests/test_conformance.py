"""Conformance traces: behaviour measured on a real kernel, replayed on every target.

Every ``corpus/conformance/<profile>/*.jsonl`` is one behaviour of that platform's KVM, with the
observation the real kernel gave under ``"expect"`` on each line (see the README there). Each
trace is replayed on a fresh reference target, and, where /dev/kvm works, on a fresh linux-kvm
target; every observation must equal its expectation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmspec.fuzz.targets import Target, TargetUnavailable, make_target
from kvmspec.fuzz.trace import Trace, load
from kvmspec.spec.platforms import PROFILES

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "conformance"
TRACES = sorted(CORPUS.glob("**/*.jsonl"))

REFERENCE_XFAIL: dict[str, str] = {}
"""Traces on which the reference model is known to disagree with the kernel, by pytest id
(``<profile>/<file>.jsonl``), with the reason. Each is a strict xfail: once the model is
fixed the entry must go."""


def _trace_id(path: Path) -> str:
    return path.relative_to(CORPUS).as_posix()


def _load(path: Path) -> Trace:
    trace = load(path)
    folder = path.relative_to(CORPUS).parts[0]
    assert trace.platform == folder, (
        f"{path}: header platform {trace.platform!r} is not its folder {folder!r}"
    )
    return trace


def _replay(trace: Trace, target: Target) -> list[str]:
    """Apply every step; return one message per observation that differs from its expect."""
    mismatches = []
    for step in trace.steps:
        observed = target.apply(step.op)
        if step.expect is not None and observed != step.expect:
            mismatches.append(
                f"{trace.source}:{step.line}: {step.op.to_json()}\n"
                f"    expected {step.expect}\n"
                f"    observed {observed}"
            )
    return mismatches


def _check(trace: Trace, target: Target) -> None:
    try:
        mismatches = _replay(trace, target)
    finally:
        target.close()
    if mismatches:
        pytest.fail(
            f"{target.name}: {len(mismatches)} observation(s) differ from the trace\n"
            + "\n".join(mismatches),
            pytrace=False,
        )


def _reference_params() -> list[object]:
    params: list[object] = []
    for path in TRACES:
        trace_id = _trace_id(path)
        reason = REFERENCE_XFAIL.get(trace_id)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(path, id=trace_id, marks=marks))
    return params


def test_corpus_is_present() -> None:
    folders = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
    assert folders, f"no profile folders under {CORPUS}"
    for folder in folders:
        assert folder in PROFILES, f"{CORPUS / folder}: not a platform profile"
        assert any((CORPUS / folder).glob("*.jsonl")), f"{CORPUS / folder}: no traces"
    assert set(REFERENCE_XFAIL) <= {_trace_id(p) for p in TRACES}, "stale REFERENCE_XFAIL"


@pytest.mark.parametrize("path", _reference_params())
def test_reference_conforms(path: Path) -> None:
    trace = _load(path)
    _check(trace, make_target("reference", PROFILES[trace.platform]))


@pytest.mark.kvm
@pytest.mark.parametrize("path", [pytest.param(p, id=_trace_id(p)) for p in TRACES])
def test_linux_kvm_conforms(path: Path) -> None:
    trace = _load(path)
    try:
        target = make_target("linux-kvm", PROFILES[trace.platform])
    except (TargetUnavailable, ImportError) as reason:
        pytest.skip(f"linux-kvm target unavailable: {reason}")
    _check(trace, target)
