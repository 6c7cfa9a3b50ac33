"""Findings kept as regressions: the reproducer, a pytest case beside it, and their replay.

Every finding of a campaign or a fuzzer is kept in ``corpus/regressions/`` (the folder
``$KVMSPEC_REGRESSIONS`` names, if set) as something that replays it:

* ``<name>.jsonl``: a kvmspec trace (the memslot, guest and differential machines, and
  fuzz_memslots.py). Replayed on the reference by a session that judges every step by the
  contracts and invariants (``kvmspec replay --check``).
* ``<family>-....bin``: an input of ``fuzz/fuzz_<family>.py`` (the generic and x86 harnesses;
  a ``generic-<profile>-...`` name says the profile), with its report ``.txt``. Replayed by the
  family's ``run_input``.

Beside each, :func:`write_regression_test` writes ``test_<name>.py``: a pytest case that
replays the finding and fails while any rule is still broken. The folder is one of the test
suite's paths, so a kept finding fails ``make test`` until the model (or the implementation)
is fixed, and passes from then on. A rule line names the rule; :func:`cite` adds the rule's
statement and where it comes from.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path

from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets import make_target
from kvmspec.fuzz.trace import Trace, load
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES, PlatformProfile
from kvmspec.spec.rules import RULES, Citation, DocCitation, KernelCitation, SeedCitation

_RULE = re.compile(r"^\s*(?:step \d+: )?([A-Z][A-Z0-9-]*\d*[A-Z0-9-]*):")


def rule_of(line: str) -> str | None:
    """The id of the rule a violation line names (``"M7: ..."`` -> ``"M7"``), if it is one."""
    found = _RULE.match(line)
    if found is None or found.group(1) not in RULES:
        return None
    return found.group(1)


def _citation(citation: Citation) -> str:
    if isinstance(citation, KernelCitation):
        return f"kernel: {citation.path}:{citation.function} ({citation.version})"
    if isinstance(citation, SeedCitation):
        return f'seed {citation.file}: "{citation.quote}"'
    if isinstance(citation, DocCitation):
        return f"kernel doc: {citation.document}, {citation.section}"
    return f"measured: {citation.document}, {citation.section}"


def cite(rule_id: str) -> str:
    """A rule in two lines: its statement, and its first source."""
    rule = RULES[rule_id]
    return f"{rule_id}: {rule.statement}\n    source: {_citation(rule.citations[0])}"


def replay_checked(trace: Trace, target_name: str = "reference") -> list[str]:
    """Apply ``trace`` to a fresh target in a session that judges every step; the broken
    rules, each line prefixed with its step number (empty when every rule holds). Recorded
    expectations are not compared here (``kvmspec replay`` does that)."""
    profile = PROFILES[trace.platform]
    session = Session(profile, make_target(target_name, profile))
    try:
        for number, step in enumerate(trace.steps, start=1):
            _, violations = session.apply(step.op)
            if violations:
                return [f"step {number}: {line}" for line in violations]
    finally:
        session.close()
    return []


def _bin_profile(stem: str) -> PlatformProfile:
    """The profile a generic reproducer's name carries (``generic-<profile>-<digest>``), else
    the default one (the fuzzer's own findings are named ``generic-<sha1>``)."""
    middle = stem.split("-", 1)[1].rsplit("-", 1)[0] if stem.count("-") >= 2 else ""
    return PROFILES.get(middle, DEFAULT_PROFILE)


def check_regression(path: Path) -> list[str]:
    """Replay a kept finding; the rule lines it still breaks (empty once fixed)."""
    if path.suffix == ".jsonl":
        return replay_checked(load(path))
    if path.suffix == ".bin":
        family = path.stem.split("-", 1)[0]
        module = importlib.import_module(f"kvmspec.fuzz.fuzz_{family}")
        data = path.read_bytes()
        if family == "generic":
            run = module.run_input(data, _bin_profile(path.stem))
        else:
            run = module.run_input(data)
        violations: list[str] = run.violations
        return violations
    raise ValueError(f"{path}: not a trace (.jsonl) or a fuzzer input (.bin)")


_TEST = '''"""{doc}
"""

from pathlib import Path

from kvmspec.fuzz.regressions import check_regression

{finding}


def test_{identifier}() -> None:
    broken = check_regression(FINDING)
    assert not broken, "\\n".join(broken)
'''


def write_regression_test(path: Path, what: str) -> Path:
    """Write the pytest case that replays the finding kept at ``path``; return its path.
    The file is laid out as ``ruff format`` would, within 100 columns: it lands in a test
    path that ``make lint`` checks."""
    identifier = re.sub(r"\W", "_", path.stem)
    test = path.with_name(f"test_{identifier}.py")
    summary = " ".join(what.split())[:200].replace('"""', "'''").replace("\\", "/")
    doc = "\n".join(
        [
            *textwrap.wrap(f"Regression: {summary}.", 96),
            "",
            *textwrap.wrap(
                f"Replays {path.name} and fails while any rule is still broken"
                " (kvmspec.fuzz.regressions).",
                96,
            ),
        ]
    )
    finding = f'FINDING = Path(__file__).with_name("{path.name}")'
    if len(finding) > 100:
        finding = f'FINDING = Path(__file__).with_name(\n    "{path.name}"\n)'
    # One case per file: a name cut to fit its line is still unique where it matters.
    name = identifier[:75]
    test.write_text(_TEST.format(doc=doc, finding=finding, identifier=name))
    return test
