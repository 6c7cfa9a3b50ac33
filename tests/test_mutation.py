"""The mutation score's machinery (kvmspec.fuzz.mutation): a mutant that breaks a rule is
killed, an equivalent one survives and is classified as such, a classification by hand is
used (and overruled when the tests kill the mutant), and bad input is one line, status 2.
No test measures a sample: that is ``make mutation``."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from kvmspec.fuzz import mutation
from kvmspec.fuzz.mutation import Reach, run_mutant
from kvmspec.fuzz.mutation_mutants import Mutant, enumerate_mutants, reference_dir, render
from kvmspec.fuzz.mutation_report import (
    Outcome,
    UsageError,
    classify,
    load_classified,
    wilson,
)

AREA = "generic/x86_64-linux-6.18-pvm"
KVM = "kvmspec.reference.kvm"
WARN_ON = "xǁKvmǁwarn_on"
LOCKDEP = "xǁKvmǁlockdep_assert_mmu_lock_held_write"


def _reach_everywhere(mutant: Mutant) -> Reach:
    """A reach pass as if AREA executed every line of the mutant's file."""
    return Reach({AREA: {str(mutant.path.resolve()): set(range(1, 10_000))}}, {})


@functools.cache
def _mutants(module: str) -> list[Mutant]:
    return enumerate_mutants(reference_dir(), module)


def _find(module: str, function: str, before: str, after: str) -> Mutant:
    """The one mutant of ``function`` in ``module`` that turns ``before`` into ``after``."""
    mutants = [m for m in _mutants(module) if m.function == function]
    rendered = render(mutants)
    (found,) = [
        m
        for m in mutants
        if any(before in line for line in rendered[m.key].diff if line.startswith("-"))
        and any(after in line for line in rendered[m.key].diff if line.startswith("+"))
    ]
    return found


def test_a_mutant_that_breaks_a_rule_is_killed() -> None:
    # Kvm.warn_on records a WARN whatever the condition: the campaign's first check fails.
    mutant = _find(
        "kvmspec.reference.kvm", WARN_ON, "if condition and (rule", "if condition or (rule"
    )
    outcome = run_mutant(mutant, render([mutant])[mutant.key], _reach_everywhere(mutant), 10, 1)
    assert (outcome.status, outcome.kind, outcome.area) == ("killed", "rule", AREA)
    assert "WARN" in outcome.detail
    assert outcome.seconds < 10


def test_an_equivalent_mutant_survives_and_is_classified() -> None:
    mutant = _find(
        "kvmspec.reference.kvm_main",
        "x_kvm_invalidate_memslot",
        'Preempt("invalidate: mappings dropped',
        'Preempt("XXinvalidate: mappings dropped',
    )
    assert mutant.equivalent.startswith("label")
    outcome = run_mutant(mutant, render([mutant])[mutant.key], _reach_everywhere(mutant), 2, 1)
    assert (outcome.status, outcome.kind) == ("survived", "undetected")
    classify(outcome, {})
    assert outcome.verdict == "equivalent"


def test_a_mutant_no_area_reaches_survives_without_running() -> None:
    mutant = _find(
        "kvmspec.reference.kvm", WARN_ON, "if condition and (rule", "if condition or (rule"
    )
    outcome = run_mutant(mutant, render([mutant])[mutant.key], Reach({}, {}), 20, 1)
    assert (outcome.status, outcome.kind, outcome.seconds) == ("survived", "unreached", 0.0)


@pytest.mark.parametrize(
    "after", ["self.warn_on(None, ", 'self.warn_on(not self.mmu_lock.held_for_write, None, f"']
)
def test_none_for_a_warn_condition_or_rule_is_equivalent_by_construction(after: str) -> None:
    mutant = _find(KVM, LOCKDEP, "self.warn_on(not self.mmu_lock", after)
    assert mutant.equivalent.startswith("self-check")


def _survivor(tests: str) -> Outcome:
    return Outcome("k", "n", "generic", [], "survived", "undetected", tests=tests)


def test_survivors_are_classified_by_hand_first_unless_the_tests_kill_them(
    tmp_path: Path,
) -> None:
    table = tmp_path / "survivors.toml"
    table.write_text('["k"]\nclass = "equivalent"\nwhy = "the value is never read"\n')
    by_hand = load_classified(table)
    outcome = _survivor("not killed")
    classify(outcome, by_hand)
    assert (outcome.verdict, outcome.why) == ("equivalent", "the value is never read")
    # A mutant the tests kill is not equivalent, whatever the table says.
    outcome = _survivor("killed")
    classify(outcome, by_hand)
    assert outcome.verdict == "gap"
    outcome = _survivor("not killed")
    classify(outcome, {})
    assert (outcome.verdict, outcome.why) == ("unclassified", "not killed by the tests either")
    table.write_text('["k"]\nclass = "maybe"\n')
    with pytest.raises(UsageError, match="needs class"):
        load_classified(table)


def test_the_hand_classifications_name_known_classes() -> None:
    for entry in load_classified().values():
        assert entry["class"] in ("equivalent", "gap")


def test_wilson_interval() -> None:
    low, high = wilson(9, 10)
    assert (round(low, 3), round(high, 3)) == (0.596, 0.982)
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sample", "0"], "must be positive"),
        (["--budget", "soon"], "not a number"),
        (["--only", "kvmspec.reference.nothing"], "no mutants"),
        (["--tests-dir", "/nonexistent"], "not a folder"),
        (["--unknown"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mutation.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_reclassify_reads_a_report_and_applies_todays_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutant = _find(
        "kvmspec.reference.kvm_main",
        "x_kvm_invalidate_memslot",
        'Preempt("invalidate: mappings dropped',
        'Preempt("XXinvalidate: mappings dropped',
    )
    survivor = Outcome(mutant.key, mutant.name, "generic", [], "survived", "undetected")
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "settings": {"seed": "1", "budget": "10"},
                "population": 1,
                "elapsed_seconds": 1.0,
                "left_out_areas": {},
                "mutants": [asdict(survivor)],  # written before the label rule existed
            }
        )
    )
    assert mutation.main(["--reclassify", "--report", str(report)]) == 1  # 0% < 90%
    (entry,) = json.loads(report.read_text())["mutants"]
    assert (entry["verdict"], entry["auto"][:5]) == ("equivalent", "label")
    assert "Mutation score: 0.0%" in capsys.readouterr().out


def test_a_mutant_identical_to_the_original_is_equivalent_by_construction() -> None:
    # mutmut 3.3.1 turns b"" into b"" (it compares the new text with the old one without
    # its prefix): such a mutant is equivalent whatever it is run on.
    no_ops = [m for m in _mutants("kvmspec.reference.guest_memory") if m.equivalent]
    no_ops = [m for m in no_ops if m.equivalent.startswith("no-op")]
    assert no_ops
    assert all(render([m])[m.key].diff == [] for m in no_ops)


def test_the_sample_is_uniform_and_stable_when_code_is_added() -> None:
    """stable_sample draws by each mutant's own id: the same seed gives the same sample,
    another seed another one, and mutants added to the population displace only the few
    members they outrank (here, 200 added to 2,000: the expected share is 10%)."""
    mutants = enumerate_mutants(reference_dir(), "kvmspec.reference.x86")
    population, added = mutants[:2000], mutants[2000:2200]
    assert len(added) == 200
    sample = mutation.stable_sample(population, 150, seed=1)
    assert len(sample) == 150 == len({m.key for m in sample})
    assert sample == sorted(sample, key=lambda m: (str(m.path), m.index))
    assert mutation.stable_sample(population, 150, seed=1) == sample
    assert len(set(mutation.stable_sample(population, 150, seed=2)) & set(sample)) < 40
    grown = mutation.stable_sample([*population, *added], 150, seed=1)
    kept = len(set(grown) & set(sample))
    assert 120 <= kept < 150, kept  # about 150 * 2000 / 2200 = 136
    assert set(grown) - set(sample) <= set(added)
