"""Which part of the harness checks each rule: the "checked by" column of the catalogue.

A rule is only as good as its checker. Every rule of :mod:`kvmspec.spec.rules` appears here
with the checkers that test it automatically: a black-box contract that judges observations,
a white-box check run after every step of a state machine, or a named scenario test that
drives the interleaving or planted fault the rule is about. A rule nothing checks yet says
so, with the reason. tests/test_docs.py keeps this table and the catalogue in step, and
checks that every named test exists.
"""

from __future__ import annotations

from kvmspec.spec.invariants.memslots import CHECKED_RULES, SCENARIO_TESTS

MEMSLOT_CONTRACT = "MemslotUapiContract (every session, any target)"
MEMORY_CONTRACT = "MemoryCoherenceContract (the generic machine)"
AGING_CONTRACT = "AgingContract (the generic machine)"
DIRTY_CONTRACT = "DirtyLogContract (the generic machine)"
MONITOR = "InvariantMonitor (after every step)"
TRANSLATIONS = "translation checks of spec/invariants/translations.py (the generic machine)"
DIRTY_CHECKS = "dirty checks of spec/invariants/dirty.py (the generic machine)"
NOT_CHECKED = "not checked yet"

_GENERIC_TESTS = "tests/test_generic_dirty.py::"

CHECKED_BY: dict[str, tuple[str, ...]] = {
    "C-MEMSLOT-ORDER": (MEMSLOT_CONTRACT,),
    "C-MEMSLOT-EEXIST": (MEMSLOT_CONTRACT,),
    "C-GMEM-IMMUTABLE": (MEMSLOT_CONTRACT,),
    "C-DIRTY-API": (MEMSLOT_CONTRACT,),
    "C-DIRTY-RING-ENABLE": (MEMSLOT_CONTRACT,),
    "C-COHERENCE": (MEMORY_CONTRACT,),
    "C-MMIO": (MEMORY_CONTRACT,),
    "C-EFAULT": (MEMORY_CONTRACT,),
    "C-NOTIFIER-EXCLUSION": (MEMORY_CONTRACT,),
    "C-AGING": (AGING_CONTRACT,),
    "C-DIRTY-COMPLETE": (DIRTY_CONTRACT,),
    "D5": (DIRTY_CONTRACT, f"scenario test `{_GENERIC_TESTS}test_d5_initially_set`"),
    "D11": (DIRTY_CONTRACT,),
    **{rule_id: (MONITOR,) for rule_id in CHECKED_RULES},
    **{rule_id: (f"scenario test `{test}`",) for rule_id, test in SCENARIO_TESTS.items()},
    "N4": (
        TRANSLATIONS,
        "scenario test `tests/test_reference_faults.py::"
        "test_n4_a_fault_racing_an_invalidation_retries`",
    ),
    "N5": (TRANSLATIONS,),
    "M13": (TRANSLATIONS,),
    "N7": (TRANSLATIONS,),
    "N8": (TRANSLATIONS,),
    "D1": (DIRTY_CHECKS, DIRTY_CONTRACT),
    "D2": (DIRTY_CHECKS, f"scenario test `{_GENERIC_TESTS}test_d2_write_after_get_is_logged`"),
    "D3": (f"scenario test `{_GENERIC_TESTS}test_d3_clear_reprotects_exactly`",),
    "D4": (
        "x86 shadow MMU checks of spec/invariants/x86.py (check_huge_leaves: no writable huge"
        " leaf in a dirty-logged slot), after every step of tests/test_x86_huge.py's machine",
        "scenario test `tests/test_x86_huge.py::"
        "test_dirty_logging_splits_the_huge_spte_and_stopping_it_recovers_it`",
    ),
    "D8": (DIRTY_CHECKS,),
    "D10": (
        DIRTY_CHECKS,
        MONITOR + ": the WARN",
        f"scenario test `{_GENERIC_TESTS}test_d10_write_without_vcpu`",
    ),
    "LOCKING": (
        MONITOR + ": the lockdep assertions",
        "scenario test `tests/test_concurrency.py::test_the_machine_catches_a_missing_mmu_lock`",
    ),
}
