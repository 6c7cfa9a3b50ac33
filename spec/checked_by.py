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

SHADOW_MMU = (
    "x86 shadow MMU checks of spec/invariants/x86.py ({}), run by check_shadow_mmu after every"
    " action of the x86 harness (kvmspec.fuzz.x86_machine, the campaign's x86 area and"
    " fuzz_x86.py) and of every session on the reference's shadow-MMU profile"
)
SHADOW_WARNS = (
    "the WARNs the shadow MMU records on every SPTE write ({}), reported by check_shadow_mmu"
    " after every step of the same machines"
)
STAGE2 = (
    "arm64 stage-2 checks of spec/invariants/arm64.py ({}), run by check_stage2 after every"
    " action of the arm64 harness (kvmspec.fuzz.arm64_machine, the campaign's arm64 area,"
    " fuzz/fuzz_arm64.py) and at the end of every scenario test of tests/test_arm64_stage2.py"
)
ARM64_TRANSLATIONS = (
    "check_stage2_translations of spec/invariants/arm64.py ({}), after every action of the"
    " arm64 harness"
)
HPT = (
    "POWER HPT checks of spec/invariants/ppc.py (check_hpt: {}), after every action of the"
    " POWER harness (kvmspec.fuzz.ppc_machine, tests/test_ppc_hpt.py::TestHptMachine, the"
    " campaign's ppc/ppc64-hv area and fuzz/fuzz_ppc.py) and in the scenario tests"
)
RADIX = (
    "POWER radix checks of spec/invariants/ppc_radix.py (check_radix: {}), after every step of"
    " kvmspec.fuzz.radix_machine (the campaign's ppc64-hv-radix area)"
)
CROSSHAIR = (
    "CrossHair over the pure contract {} (make crosshair; bounded, with planted bugs, in"
    " tests/test_crosshair.py)"
)
_MEMSLOTS = "tests/test_reference_memslots.py::"
_X86_SHADOW = "tests/test_x86_shadow_mmu.py::"
_X86_PAGES = "tests/test_x86_mmu_pages.py::"
_X86_ROOTS = "tests/test_x86_roots.py::"
_X86_HUGE = "tests/test_x86_huge.py::"
_X86_SPTE = "tests/test_x86_spte.py::"
_ARM64 = "tests/test_arm64_stage2.py::"
_ARM64_WALKER = "tests/test_arm64_walker.py::"
_ARM64_MMU = "tests/test_arm64_mmu.py::"
_ARM64_FUZZ = "tests/test_arm64_fuzz.py::"
_ARM64_MEMCACHE = "tests/test_arm64_memcache.py::"
_PPC = "tests/test_ppc_hpt.py::"
_PPC_FAULT = "tests/test_ppc_fault.py::"
_PPC_FUZZ = "tests/test_ppc_fuzz.py::"
_RADIX = "tests/test_ppc_radix.py::"
_ARM64_BLOCKS = "tests/test_arm64_blocks.py::"
_X86_FAST = "tests/test_x86_fast_pf.py::"
_X86_APIC = "tests/test_x86_apic_migration.py::"
TDP_MMU = (
    "x86 TDP MMU checks of spec/invariants/x86_tdp.py ({}), run by check_tdp_mmu after every"
    " step of kvmspec.fuzz.tdp_machine (with A/D bits, without, with PML: the campaign's"
    " x86-tdp areas) and in tests/test_x86_tdp_mmu.py"
)
_X86_TDP = "tests/test_x86_tdp_mmu.py::"


def _scenario(path: str, name: str) -> str:
    return f"scenario test `{path}{name}`"


CHECKED_BY: dict[str, tuple[str, ...]] = {
    "C-MEMSLOT-ORDER": (MEMSLOT_CONTRACT,),
    "C-MEMSLOT-EEXIST": (MEMSLOT_CONTRACT,),
    "C-GMEM-IMMUTABLE": (MEMSLOT_CONTRACT,),
    "C-DIRTY-API": (MEMSLOT_CONTRACT, CROSSHAIR.format("clear_dirty_log_for_crosshair")),
    "C-DIRTY-RING-ENABLE": (MEMSLOT_CONTRACT,),
    "C-CAPABILITIES": (
        MEMSLOT_CONTRACT,
        _scenario("tests/test_machines.py::", "test_a_wrong_capability_answer_is_reported"),
    ),
    "C-COHERENCE": (MEMORY_CONTRACT,),
    "C-MMIO": (MEMORY_CONTRACT,),
    "C-EFAULT": (MEMORY_CONTRACT,),
    "C-NOTIFIER-EXCLUSION": (MEMORY_CONTRACT,),
    "C-AGING": (
        AGING_CONTRACT,
        "the arm64 harness's aging expectations, after every action",
        _scenario(_ARM64_MMU, "test_an_ager_that_reports_every_page_idle_is_caught"),
        "the POWER HPT harness's aging answers (kvmspec.fuzz.ppc_machine and fuzz_ppc.py:"
        " clear_young judged strictly, since kvm_age_rmapp flushes; test_young after"
        " H_CLEAR_REF moved R into the rmap; one page aged, the others stay young)",
        _scenario(_PPC_FAULT, "test_aging_answers_for_the_pages_the_guest_used"),
        _scenario(_PPC_FAULT, "test_wrong_aging_answers_are_caught"),
        "the radix machine's aging answers (a fault that maps a page is the guest's use; the"
        " contract's looseness from the notifier's invalidations)",
        _scenario(_RADIX, "test_a_page_a_fault_maps_is_young"),
        _scenario(_RADIX, "test_a_fault_that_maps_a_leaf_unreferenced_is_caught"),
    ),
    "C-DIRTY-COMPLETE": (
        DIRTY_CONTRACT,
        "the radix machine's harvests: a page stored to before a MOVE is owed by the next"
        " harvest (the bitmap moves with the slot)",
        _scenario(_RADIX, "test_a_page_stored_to_before_a_move_is_reported_after_it"),
        _scenario(_RADIX, "test_a_flush_that_folds_c_into_the_wrong_page_is_caught"),
    ),
    "D5": (
        DIRTY_CONTRACT,
        f"scenario test `{_GENERIC_TESTS}test_d5_initially_set`",
        _scenario(
            _X86_HUGE, "test_initially_set_keeps_the_2m_leaf_writable_until_a_clear_reaches_it"
        ),
    ),
    "D11": (DIRTY_CONTRACT,),
    **{rule_id: (MONITOR,) for rule_id in CHECKED_RULES},
    **{rule_id: (f"scenario test `{test}`",) for rule_id, test in SCENARIO_TESTS.items()},
    "D7": (
        MONITOR,
        CROSSHAIR.format("dirty_ring_reset_for_crosshair: entries only where the ring is live"),
        _scenario(_MEMSLOTS, "test_the_ring_checks_follow_the_u32_wrap"),
    ),
    "D9": (
        f"scenario test `{SCENARIO_TESTS['D9']}`",
        "DirtyLogContract (the generic machine and every session): the count"
        " KVM_RESET_DIRTY_RINGS returns is the entries harvested since the last reset",
        "scenario test `tests/test_generic_machine.py::"
        "test_a_ring_reset_must_return_the_entries_it_consumed`",
        CROSSHAIR.format("dirty_ring_reset_for_crosshair: reset consumes the harvested prefix"),
    ),
    # Monitor rules with a planted bug of their own (the monitor's check cannot pass vacuously).
    "S003-ACTIVE-IMMUTABLE": (
        MONITOR,
        _scenario(_MEMSLOTS, "test_seed_003_modifying_an_active_slot_is_caught"),
    ),
    "M12": (
        MONITOR,
        _scenario(_MEMSLOTS, "test_flushing_before_the_invalid_copy_is_published_is_caught"),
    ),
    "N4": (
        TRANSLATIONS,
        "scenario test `tests/test_reference_faults.py::"
        "test_n4_a_fault_racing_an_invalidation_retries`",
        RADIX.format("every valid leaf maps the host's page, writable only over a writable one"),
        _scenario(_RADIX, "test_without_the_retry_check_a_racing_fault_installs_a_stale_leaf"),
        _scenario(_RADIX, "test_a_writable_leaf_over_a_read_only_host_page_is_caught"),
        _scenario(_RADIX, "test_radix_fault_racing_an_invalidation_retries"),
        _scenario(_RADIX, "test_radix_fault_racing_a_slot_flush_retries"),
        ARM64_TRANSLATIONS.format("every leaf maps the host's page"),
        _scenario(_ARM64_MMU, "test_a_fault_path_without_the_retry_check_is_caught"),
        _scenario(_ARM64_MMU, "test_a_fault_racing_an_invalidation_installs_nothing"),
        TDP_MMU.format("check_leaves_match_host"),
        _scenario(_X86_TDP, "test_a_fault_that_resolved_its_pfn_before_an_invalidation_retries"),
        _scenario(_X86_TDP, "test_planted_fault_that_ignores_the_invalidation_is_caught"),
    ),
    "N5": (
        TRANSLATIONS,
        _scenario(_RADIX, "test_a_fault_during_an_open_invalidation_is_caught"),
        _scenario(_RADIX, "test_an_unmap_without_tlbie_is_caught"),
    ),
    "M13": (
        TRANSLATIONS,
        RADIX.format("no leaf outside the usable memslots once an update returned"),
        _scenario(_RADIX, "test_radix_delete_removes_every_leaf"),
        _scenario(_RADIX, "test_radix_move_removes_every_leaf_and_the_new_place_faults_in"),
        _scenario(_RADIX, "test_a_missing_slot_flush_is_caught"),
        _scenario(_ARM64_MMU, "test_a_delete_that_flushes_nothing_is_caught"),
        _scenario(_RADIX, "test_the_kernel_does_not_keep_a_huge_leaf_inside_its_slot"),
        "note: the kernel's radix fault does not keep a huge leaf inside its slot (x86 and arm64"
        " do); check_radix reports it, and the radix machine keeps its slots 2 MiB-aligned",
    ),
    "N7": (TRANSLATIONS,),
    "N8": (TRANSLATIONS,),
    "D1": (
        DIRTY_CHECKS,
        DIRTY_CONTRACT,
        _scenario(_ARM64_MMU, "test_a_write_fault_that_logs_nothing_is_caught"),
        _scenario(_ARM64_MMU, "test_a_harvest_that_reprotects_nothing_is_caught"),
        TDP_MMU.format("check_dirty_logging"),
        _scenario(_X86_TDP, "test_planted_harvest_without_reprotection_is_caught"),
        SHADOW_MMU.format(
            "check_writable_leaves_logged: every gfn under a writable leaf, a huge leaf's whole"
            " frame; the huge layout's INITIALLY_SET and CLEAR actions reach a 2M leaf left"
            " writable while logging"
        ),
        _scenario(_X86_HUGE, "test_a_clear_that_leaves_the_2m_leaf_writable_is_caught"),
        _scenario(_X86_HUGE, "test_the_x86_machine_finds_a_clear_that_leaves_the_2m_leaf_writable"),
        _scenario(
            "tests/test_guest_machines.py::",
            "test_the_shadow_mmu_checks_catch_a_harvest_that_forgets_to_reprotect",
        ),
    ),
    "D2": (DIRTY_CHECKS, f"scenario test `{_GENERIC_TESTS}test_d2_write_after_get_is_logged`"),
    "D3": (f"scenario test `{_GENERIC_TESTS}test_d3_clear_reprotects_exactly`",),
    "D4": (
        "x86 shadow MMU checks of spec/invariants/x86.py (check_huge_leaves: no writable huge"
        " leaf in a dirty-logged slot), after every action of the x86 harness",
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
    # -- x86 MMU (INVENTORY C.4) -------------------------------------------------------------
    "X1": (
        SHADOW_MMU.format("check_rmaps"),
        SHADOW_WARNS.format("an rmap entry missing when its leaf is dropped"),
        _scenario(_X86_SHADOW, "test_v6_18_mmio_spte_over_a_stale_present_spte_is_caught"),
    ),
    "X2": (SHADOW_MMU.format("check_parent_ptes"),),
    "X3": (
        SHADOW_MMU.format("check_leaf_writability"),
        SHADOW_WARNS.format("check_spte_change: the legal H/M/W states, host-writable fixed"),
        _scenario(_X86_SPTE, "test_x3_catches_bad_sptes_and_host_writable_flips"),
    ),
    "X4": (
        SHADOW_WARNS.format("check_spte_change: a present leaf never changes pfn in place"),
        _scenario(_X86_SPTE, "test_x4_a_present_leaf_never_changes_pfn_in_place"),
        _scenario(
            _X86_APIC, "test_x4_a_migrated_data_page_is_zapped_and_refaulted_not_changed_in_place"
        ),
    ),
    "S004-APIC-ACCESS-RELOAD": (
        SHADOW_MMU.format(
            "check_apic_access_addr: each vCPU's APIC_ACCESS_ADDR against the page the host maps"
        ),
        _scenario(_X86_APIC, "test_seed_004_the_apic_access_page_migrates_and_vcpus_reload_it"),
        _scenario(_X86_APIC, "test_a_notifier_that_forgets_the_apic_reload_is_caught"),
        _scenario(_X86_APIC, "test_a_vcpu_that_drops_the_reload_request_is_caught"),
        _scenario(_X86_APIC, "test_the_x86_fuzzer_finds_a_notifier_that_forgets_the_apic_reload"),
        _scenario(_X86_APIC, "test_an_apic_reload_during_an_invalidation_does_not_enter_the_guest"),
        _scenario(_X86_APIC, "test_an_apic_reload_racing_a_migration_reloads_again"),
    ),
    "S004-NOT-PINNED": (
        SHADOW_MMU.format("check_apic_access_addr: no private-slot page is pinned"),
        _scenario(
            _X86_APIC, "test_seed_004_a_pinned_apic_page_blocks_migration_as_the_old_code_did"
        ),
        _scenario(
            _X86_APIC,
            "test_seed_004_the_identity_map_is_not_pinned_and_is_refaulted_after_migration",
        ),
    ),
    "X5": (
        SHADOW_MMU.format("check_tlbs: no TLB entry beyond what the tables translate"),
        SHADOW_WARNS.format("a shadow page freed while live"),
        "check_released of spec/invariants/x86.py, after the VMM exits in the x86 harness's"
        " shadow and mmio layouts (release: the MMU notifier's release, kvm_mmu_zap_all): no"
        " TLB entry, no page but the zapped roots the vCPUs hold, no SPTE",
        _scenario(_X86_SHADOW, "test_the_vmm_exiting_zaps_every_shadow_page_and_a_new_vm_starts"),
        _scenario(_X86_SHADOW, "test_a_release_that_zaps_nothing_is_caught"),
        _scenario(_X86_SHADOW, "test_a_zap_all_that_never_commits_is_caught"),
        _scenario(_X86_SHADOW, "test_the_machine_finds_a_zap_all_that_never_commits"),
        TDP_MMU.format("check_tlbs"),
        _scenario(_X86_TDP, "test_planted_missing_unmap_or_flush_is_caught"),
    ),
    "X6": (
        SHADOW_MMU.format("check_shadowed_tables_write_protected"),
        "leaves_follow_guest_ptes of fuzz/x86_harness.py (the x86 machines, whose VMM never"
        " writes a guest table once the guest runs): every leaf of a synced shadow page"
        " follows its guest entry",
        _scenario(_X86_SHADOW, "test_a_synced_leaf_that_no_longer_follows_its_guest_pte_is_caught"),
        _scenario(_X86_SHADOW, "test_finding_a_stale_mmio_spte_passes_for_a_writable_leaf")
        + ": a kernel finding (with MMIO caching on; the fuzzed mmio layout cannot reach it:"
        " no gfn it gives an MMIO SPTE ever becomes a guest page table)",
        _scenario(_X86_SHADOW, "test_guest_page_table_write_is_emulated_and_takes_effect"),
        _scenario(
            _X86_HUGE, "test_seed_002_a_large_spte_left_writable_over_a_shadowed_gfn_is_caught"
        ),
        _scenario(_X86_SHADOW, "test_a_store_across_two_guest_ptes_zaps_the_shadow_page"),
        _scenario(_X86_SHADOW, "test_the_machine_finds_a_store_across_two_ptes_taken_for_one"),
    ),
    "X7": (
        SHADOW_MMU.format(
            "check_unsync; check_shadowed_tables_write_protected exempts unsync pages (X6)"
        ),
        _scenario(_X86_SHADOW, "test_a_guest_pte_write_unsyncs_the_table_until_the_guest_flushes"),
        _scenario(_X86_SHADOW, "test_an_unsync_page_its_parents_do_not_know_of_is_caught"),
    ),
    "X8": (
        SHADOW_MMU.format("check_lpage_info; memory attributes and the MIXED bit are not modelled"),
        _scenario(_X86_HUGE, "test_lpage_info_of_misaligned_and_incongruent_slots"),
        _scenario(_X86_HUGE, "test_seed_002_shadowing_that_forgets_disallow_lpage_is_caught"),
    ),
    "X9": (
        SHADOW_MMU.format("check_huge_leaves; mixed attributes are not modelled"),
        _scenario(_X86_HUGE, "test_seed_002_large_spte_write_protect_makes_progress"),
    ),
    "S002-LARGE-SPTE-PROGRESS": (
        "the x86 guest access itself: more than MAX_FAULTS_PER_ACCESS faults for one access is"
        " an assertion, in every test and state machine that drives guest accesses",
        _scenario(_X86_HUGE, "test_seed_002_large_spte_write_protect_makes_progress"),
        _scenario(_X86_HUGE, "test_seed_002_without_the_retry_guard_the_refault_loops"),
    ),
    "X10": (
        SHADOW_MMU.format("check_obsolete"),
        SHADOW_WARNS.format("an invalid page on the active list"),
        _scenario(_X86_SHADOW, "test_fast_zap_makes_every_root_obsolete_and_vcpus_drop_them"),
    ),
    "X11": (
        _scenario(_X86_SPTE, "test_mmio_sptes_round_trip") + ": the generation is stored and"
        " trusted only in its own generation, never during an update",
        _scenario(_X86_SPTE, "test_mmio_generation_wrap_forces_a_zap"),
        SHADOW_MMU.format(
            "check_mmio_sptes; MMIO caching is on only in the harness's mmio layout, where the"
            " fuzzers let the finding below pass (SYNCED_STALE_MMIO of fuzz/x86_known_findings.py:"
            " exactly the MMIO SPTEs a sync remade, and the accesses through them)"
        ),
        _scenario(_X86_SHADOW, "test_a_slot_created_over_a_cached_mmio_gfn_is_faulted_into"),
        _scenario(_X86_SHADOW, "test_an_mmu_that_trusts_every_mmio_spte_is_caught"),
        _scenario(_X86_SHADOW, "test_an_mmio_generation_wrap_zaps_every_shadow_page"),
        _scenario(_X86_SHADOW, "test_an_mmu_that_misses_the_mmio_generation_wrap_is_caught"),
        _scenario(_X86_SHADOW, "test_the_fuzzers_let_the_sync_finding_pass"),
        _scenario(
            _X86_SHADOW, "test_letting_the_sync_finding_pass_hides_no_trusted_stale_mmio_spte"
        ),
        _scenario(_X86_SHADOW, "test_an_mmio_fast_path_that_caches_every_right_is_caught"),
        _scenario(_X86_SHADOW, "test_finding_a_sync_gives_a_stale_mmio_spte_the_current_generation")
        + ": a divergence the model reproduces (an unsync page's sync remakes a stale MMIO SPTE"
        " with the current generation), not yet settled as kernel bug or allowed looseness",
    ),
    "X12": (
        SHADOW_MMU.format(
            "check_mmu_page_limit of spec/invariants/x86_page_limit.py: the count is the pages"
            " held, and within the limit's overshoot; the harness's set_mmu_page_limit action"
            " makes faults recycle, and check_enospc judges any access that fails with ENOSPC"
        ),
        _scenario(_X86_PAGES, "test_a_lower_limit_recycles_the_oldest_pages_that_are_no_root"),
        _scenario(
            _X86_PAGES, "test_a_limit_no_larger_than_the_roots_in_use_fails_kvm_run_with_enospc"
        ),
        _scenario(_X86_PAGES, "test_a_fault_that_never_recycles_is_caught"),
        _scenario(_X86_PAGES, "test_an_allocation_left_uncounted_is_caught"),
        _scenario(_X86_PAGES, "test_the_x86_machine_finds_a_limit_that_recycling_ignores"),
        _scenario(
            _X86_PAGES, "test_create_and_delete_recompute_the_default_move_and_flags_only_do_not"
        ),
        MEMSLOT_CONTRACT + ": the answer of KVM_SET_NR_MMU_PAGES (spec/uapi/vm_ioctl_rules.py),"
        " which the memslot machines and fuzz_memslots.py send, the differential machine to"
        " /dev/kvm too",
        _scenario(_X86_PAGES, "test_a_wrong_kvm_set_nr_mmu_pages_answer_is_reported"),
    ),
    "X13": (
        TDP_MMU.format("check_frozen"),
        _scenario(_X86_TDP, "test_a_table_zap_racing_a_fault_freezes_it_and_leaves_nothing_frozen"),
        _scenario(_X86_TDP, "test_planted_zap_that_leaves_a_frozen_spte_is_caught"),
    ),
    "X14": (
        TDP_MMU.format("check_roots"),
        _scenario(_X86_TDP, "test_a_root_is_freed_only_after_the_rcu_readers_leave"),
        _scenario(_X86_TDP, "test_delete_returns_only_after_the_invalidated_roots_are_zapped"),
        _scenario(
            _X86_TDP,
            "test_move_zaps_the_old_root_and_the_guest_finds_its_data_at_the_new_place",
        ),
        _scenario(_X86_TDP, "test_planted_root_free_without_a_grace_period_is_caught"),
        _scenario(_X86_TDP, "test_planted_root_without_the_mmus_own_reference_is_caught"),
        _scenario(_X86_TDP, "test_planted_delete_that_skips_zapping_invalidated_roots_is_caught"),
    ),
    "X15": (
        TDP_MMU.format("check_atomic_updates"),
        _scenario(
            _X86_TDP, "test_two_faults_on_one_gfn_one_wins_the_other_retries_without_side_effects"
        ),
        _scenario(_X86_TDP, "test_two_faults_racing_to_link_a_table_the_loser_frees_its_own"),
        _scenario(_X86_TDP, "test_planted_cmpxchg_that_stores_without_comparing_is_caught"),
        _scenario(_X86_TDP, "test_planted_bookkeeping_after_a_failed_exchange_is_caught"),
        _scenario(_X86_TDP, "test_lockless_aging_racing_write_protection_loses_no_update"),
        _scenario(_X86_TDP, "test_planted_aging_by_plain_store_is_caught"),
        _scenario(_X86_TDP, "test_tdp_machine_finds_a_planted_cmpxchg_that_does_not_compare"),
    ),
    "X16": (
        TDP_MMU.format("check_fast_page_faults"),
        _scenario(_X86_FAST, "test_a_dirty_logged_write_fixed_by_the_fast_path_is_logged"),
        _scenario(_X86_FAST, "test_the_fast_path_leaves_read_faults_and_read_only_pages_alone"),
        _scenario(_X86_FAST, "test_an_access_tracked_leaf_is_restored_by_the_fast_path"),
        _scenario(_X86_FAST, "test_a_zap_between_the_read_and_the_exchange_is_not_undone"),
        _scenario(_X86_FAST, "test_a_fast_path_that_stores_without_compare_is_caught"),
        _scenario(_X86_FAST, "test_a_fast_path_that_ignores_mmu_writable_is_caught"),
        _scenario(_X86_FAST, "test_a_fast_path_that_maps_another_page_is_caught"),
        _scenario(_X86_FAST, "test_tdp_machine_finds_a_fast_path_that_ignores_mmu_writable"),
    ),
    "X17": (
        SHADOW_MMU.format(
            "check_roots_follow_cr3 of spec/invariants/x86_roots.py; the harness's guest has"
            " five PML4s, one more than the roots a vCPU keeps, so its CR3 switches drop"
            " roots as well as rotate the cache"
        ),
        _scenario(_X86_ROOTS, "test_cr3_switches_among_five_processes_rotate_and_drop_roots"),
        _scenario(_X86_ROOTS, "test_a_cr3_switch_that_keeps_the_evicted_root_is_caught"),
        _scenario(_X86_ROOTS, "test_a_cached_root_for_another_cr3_is_caught"),
        _scenario(_X86_ROOTS, "test_the_x86_machine_finds_a_cr3_switch_that_keeps_the_old_root"),
    ),
    "X18": (
        SHADOW_MMU.format("check_one_page_per_gfn_and_role of spec/invariants/x86_roots.py"),
        _scenario(_X86_ROOTS, "test_a_lookup_that_never_finds_a_page_is_caught"),
    ),
    # -- arm64 stage 2 (INVENTORY C.5, seed 001) ---------------------------------------------
    "A1": (
        STAGE2.format("check_break_before_make, over the history of every descriptor"),
        _scenario(_ARM64, "test_a_missing_tlbi_is_caught_by_the_break_before_make_check"),
        _scenario(_ARM64_FUZZ, "test_seed_001_a_plain_store_instead_of_cmpxchg_is_found_by_fuzzing")
        + " (a plain store in every shared walk breaks break-before-make)",
    ),
    "A2": (
        STAGE2.format(
            "check_warnings: a LOCKED entry met by an exclusive walker, a make"
            " over an entry not LOCKED"
        ),
        _scenario(_ARM64, "test_a_second_walker_on_a_locked_entry_gets_eagain"),
        _scenario(_ARM64, "test_an_exclusive_walker_meeting_a_locked_entry_is_a_warning"),
    ),
    "A3": (
        STAGE2.format("check_table_refcounts, check_no_freed_table_reachable"),
        _scenario(_ARM64_WALKER, "test_table_refcounts_after_maps_and_unmaps") + " (Hypothesis:"
        " after every map and unmap)",
        "UnlinkedTables of spec/invariants/arm64.py (the walker half), after every action of"
        " the arm64 harness: no entry of a table is written after the table was unlinked,"
        " outside a window of interleaved walkers",
        _scenario(_ARM64_BLOCKS, "test_a_fault_maps_a_block_over_the_pages_mapped_while_logging"),
        _scenario(_ARM64_BLOCKS, "test_a_walker_descending_into_the_table_it_unlinked_is_caught"),
    ),
    "A4": (
        STAGE2.format("check_leaves: block level and alignment"),
        _scenario(_ARM64, "test_a_block_over_a_misaligned_output_address_is_caught"),
        ARM64_TRANSLATIONS.format(
            "the memslot half: a block lies inside one slot with gpa and hva congruent, and"
            " only pages while the slot is dirty-logged"
        ),
        _scenario(_ARM64_MMU, "test_a_slot_incongruent_or_without_a_whole_block_never_gets_one"),
        _scenario(_ARM64_MMU, "test_logging_maps_pages_and_blocks_come_back_when_it_stops"),
        _scenario(_ARM64_MMU, "test_a_fault_path_ignoring_the_slot_layout_is_caught"),
        "device_block_size of spec/invariants/arm64.py (the device half), for every access"
        " of the arm64 harness's device_block_access action (slot 3: device memory 1 GiB"
        " aligned): the leaf a device fault installs",
        _scenario(_ARM64_BLOCKS, "test_device_memory_is_mapped_with_the_largest_block_that_fits"),
        _scenario(_ARM64_BLOCKS, "test_a_device_fault_mapping_a_smaller_block_is_caught"),
        _scenario(
            _ARM64_BLOCKS,
            "test_finding_a_device_vma_starting_on_a_block_boundary_gets_a_block_past_its_end",
        )
        + ": a kernel finding (get_vma_page_shift's end test passes for any hva on a block"
        " boundary)",
    ),
    "A5": (
        _scenario(_ARM64, "test_unmap_cleans_cacheable_memory_without_fwb") + ": counts the"
        " clean to PoC before a mapping (and after its removal); no general check over the"
        " history yet",
    ),
    "A6": (
        STAGE2.format("check_leaves: device memory is execute-never"),
        _scenario(_ARM64, "test_device_memory_is_mapped_execute_never"),
        _scenario(
            _ARM64_MMU,
            "test_device_memory_is_mapped_execute_never_and_a_fetch_there_gets_an_abort",
        ),
    ),
    "A7": (
        _scenario(_ARM64, "test_write_protection_waits_for_the_callers_flush"),
        ARM64_TRANSLATIONS.format("no TLB entry more permissive than the tables"),
        _scenario(_ARM64_MMU, "test_write_protection_without_the_callers_flush_is_caught"),
    ),
    "A8": (
        STAGE2.format("check_warnings: the WARN of an allocation from an empty memory cache")
        + " (the machine and fuzz_arm64.py let the known kernel finding pass: a strict"
        " harness reports it)",
        _scenario(
            _ARM64_MEMCACHE,
            "test_an_exec_fault_on_a_logged_block_takes_a_table_from_an_empty_cache",
        ),
        _scenario(_ARM64_MEMCACHE, "test_a_fault_path_that_never_fills_the_cache_is_caught"),
    ),
    "S001-FLUSH-ALL": (
        "the arm64 harness: after kvm_mmu_notifier_release, no stage-2 translation is left",
        _scenario(_ARM64_MMU, "test_seed_001_an_emptied_flush_shadow_all_is_caught"),
        _scenario(_ARM64_MMU, "test_seed_001_the_machine_finds_an_emptied_flush_shadow_all"),
        _scenario(_ARM64_FUZZ, "test_seed_001_an_emptied_flush_shadow_all_is_found_by_fuzzing"),
    ),
    "S001-NO-LOST-UPDATE": (
        STAGE2.format("check_no_lost_hardware_updates"),
        _scenario(_ARM64, "test_seed_001_lockless_aging_keeps_a_concurrent_hardware_dirty_update"),
        _scenario(_ARM64, "test_seed_001_a_plain_store_instead_of_cmpxchg_is_caught"),
        _scenario(
            _ARM64_MMU,
            "test_faults_the_hardware_and_lockless_aging_interleaved_keep_every_rule",
        ),
    ),
    "S001-RCU-TABLES": (
        STAGE2.format("check_no_reads_after_free"),
        _scenario(_ARM64, "test_a_table_unlinked_under_a_reader_is_freed_only_after_it_leaves"),
        _scenario(_ARM64, "test_a_reader_inside_a_freed_table_is_recorded"),
    ),
    # -- POWER (INVENTORY C.6, seed 000) -----------------------------------------------------
    "P1": (
        HPT.format("no HPTE or rmap lock left held, and the model's WARNs on unlocked writes"),
        _scenario(_PPC, "test_the_check_sees_a_broken_chain_and_a_leaked_lock"),
    ),
    "P2": (
        HPT.format("the chains rebuilt from the table"),
        _scenario(_PPC, "test_the_check_sees_a_broken_chain_and_a_leaked_lock"),
    ),
    "P3": (
        _scenario(_PPC, "test_rc_are_read_after_the_tlbie"),
        _scenario(_PPC, "test_h_clear_ref_and_h_clear_mod"),
        _scenario(_PPC, "test_dirty_harvest_collects_a_pending_c_and_leaves_the_entry_valid"),
        _scenario(_PPC, "test_seed_000_delete_removes_every_translation"),
        "the POWER harness: every slot-1 page the guest stored to is reported by the next"
        " KVM_GET_DIRTY_LOG",
    ),
    "P4": (
        HPT.format("H_READ of every entry shows no software bit and no host address"),
        "every action of the POWER harness (kvmspec.fuzz.ppc_machine;"
        " tests/test_ppc_hpt.py::TestHptMachine): the guest reads back what it entered",
        "every H_REMOVE and H_BULK_REMOVE of the POWER harness: the R and C reported against"
        " those H_READ showed just before (the machine lets the known kernel finding below"
        " pass by default, KNOWN_KERNEL_FINDINGS)",
        _scenario(_PPC_FAULT, "test_kernel_finding_a_resize_drops_the_r_and_c_of_a_moved_entry")
        + ": a kernel finding (a resize gives a moved entry a guest_rpte without its R and C)",
        _scenario(
            _PPC_FAULT,
            "test_kernel_finding_h_read_shows_the_r_that_h_clear_ref_cleared_on_an_absent_entry",
        )
        + ": a kernel finding (H_READ merges an absent entry's stale hardware R and C)",
        "every hypercall of the POWER harness that reports R and C (H_READ, the removals,"
        " H_CLEAR_REF and H_CLEAR_MOD): set only where the guest used that entry since"
        " entering it; H_BULK_REMOVE's response words (type, code, the request's flags and"
        " index, R and C in their field)",
        _scenario(_PPC_FAULT, "test_r_and_c_are_only_the_guests_own"),
        _scenario(_PPC_FAULT, "test_an_invalidation_that_makes_up_r_and_c_is_caught"),
        _scenario(_PPC_FAULT, "test_a_bulk_remove_response_without_its_index_is_caught"),
        _scenario(
            _PPC_FAULT, "test_a_bulk_remove_that_misplaces_an_absent_entrys_r_and_c_is_caught"
        ),
    ),
    "P5": (
        HPT.format("a valid HPTE maps the host's page at its gfn"),
        _scenario(_PPC, "test_h_enter_racing_an_invalidation_enters_the_entry_absent"),
        _scenario(_PPC, "test_without_the_retry_check_the_race_leaves_a_stale_translation"),
        _scenario(_PPC_FAULT, "test_an_absent_hpte_becomes_valid_only_after_the_retry_check"),
        _scenario(
            _PPC_FAULT, "test_without_the_retry_check_the_fault_installs_a_page_the_host_dropped"
        ),
    ),
    "P6": (
        HPT.format("no TLB caches an invalidated HPTE"),
        _scenario(_PPC, "test_rc_are_read_after_the_tlbie"),
        _scenario(_PPC_FUZZ, "test_hypercalls_that_skip_the_tlbie_are_found_by_fuzzing"),
        RADIX.format("no TLB entry more permissive than the tree"),
        _scenario(_RADIX, "test_an_unmap_without_tlbie_is_caught"),
        _scenario(_RADIX, "test_a_harvest_that_reports_before_the_tlbie_loses_a_write"),
    ),
    "P7": (
        HPT.format("an MMIO HPTE is never valid"),
        "check_mmio_cache of spec/invariants/ppc.py after every action of the POWER harness: a"
        " current MMIO cache entry is still in the HPT (the machine lets the known kernel"
        " finding below pass by default, KNOWN_KERNEL_FINDINGS)",
        _scenario(_PPC, "test_h_enter_entries_are_only_as_good_as_the_host_page"),
        _scenario(
            _PPC_FAULT, "test_an_mmio_hpte_never_becomes_valid_and_its_cache_follows_mmio_update"
        ),
        _scenario(_PPC_FAULT, "test_an_mmio_cache_entry_the_hpt_no_longer_holds_is_caught"),
        "every removal or change of an MMIO HPTE by the POWER harness: a vCPU cache entry"
        " that answered for its address just before is void after it",
        _scenario(_PPC_FAULT, "test_a_bulk_remove_of_an_mmio_entry_that_keeps_its_cache_is_caught"),
        _scenario(_PPC_FAULT, "test_kernel_finding_a_stale_mmio_cache_entry_emulates_ram_as_mmio")
        + ": a kernel finding (the cache outlives the MMIO entry it describes)",
    ),
    "P8": (
        "every H_PROTECT of the POWER harness (kvmspec.fuzz.ppc_machine): a valid read-only"
        " entry is still read-only in hardware",
        _scenario(_PPC, "test_h_protect_return_codes_and_no_upgrade"),
    ),
    "P9": (
        HPT.format("a writable HPTE over a writable host page, in a slot not READONLY"),
        _scenario(_PPC, "test_h_enter_entries_are_only_as_good_as_the_host_page"),
        _scenario(_PPC, "test_read_only_slots_do_not_exist_on_book3s_hv"),
        _scenario(_PPC_FAULT, "test_a_read_only_host_page_gets_a_read_only_hpte"),
    ),
    "P10": (
        "check_hpt_resize of spec/invariants/ppc.py after every resize commit of the POWER"
        " harness, and each bolted entry found again at its new hash",
        CROSSHAIR.format("hpt_placement_for_crosshair: an entry's groups and its rehash"),
        _scenario(_PPC_FAULT, "test_resize_keeps_exactly_the_bolted_entries"),
        _scenario(_PPC_FAULT, "test_a_resize_that_keeps_a_non_bolted_entry_is_caught"),
        _scenario(_PPC_FAULT, "test_a_resize_that_drops_a_bolted_entry_is_caught"),
        _scenario(_PPC_FAULT, "test_resize_return_codes"),
        _scenario(_PPC_FAULT, "test_a_fault_racing_a_resize_commit_retries_on_the_new_table"),
    ),
    "R1": (
        RADIX.format(
            "no huge leaf in a dirty-logged slot, over an incongruent range or larger than the"
            " host page; the dirty harvest clears C, completes the tlbie, then reports"
        ),
        _scenario(_RADIX, "test_radix_huge_leaf_only_when_congruent_and_not_logged"),
        _scenario(_RADIX, "test_radix_leaf_level_follows_the_host_page_size_exactly"),
        _scenario(_RADIX, "test_radix_dirty_harvest_tlbies_before_reporting"),
        _scenario(_RADIX, "test_a_harvest_that_reports_before_the_tlbie_loses_a_write"),
        _scenario(_RADIX, "test_a_fault_that_ignores_dirty_logging_is_caught"),
        _scenario(_RADIX, "test_a_leaf_larger_than_the_host_page_is_caught"),
        _scenario(_RADIX, "test_radix_dirty_logging_on_breaks_huge_leaves_into_base_pages"),
        _scenario(_RADIX, "test_the_radix_machine_finds_a_missing_flush_when_logging_starts"),
    ),
    "S000-NO-HPTE-OUTSIDE-SLOTS": (
        HPT.format("no valid HPTE maps a gfn outside every usable slot"),
        _scenario(_PPC, "test_seed_000_delete_removes_every_translation"),
        _scenario(_PPC, "test_seed_000_move_removes_every_translation_and_keeps_the_rmap"),
        _scenario(_PPC, "test_seed_000_a_missing_flush_is_caught"),
        _scenario(_PPC_FAULT, "test_seed_000_a_removal_path_that_ignores_invalid_slots_is_caught"),
        _scenario(_PPC_FAULT, "test_a_fault_on_a_deleted_slots_page_is_mmio"),
        _scenario(_PPC_FUZZ, "test_a_removal_path_that_ignores_invalid_slots_is_found_by_fuzzing"),
    ),
}
