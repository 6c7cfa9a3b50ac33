# kvmspec: the two quick-start commands are `make run` and `make test`; `make docs` builds the
# documentation site.
# Every target creates .venv and installs the pinned dependencies when needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MINUTES ?= 1

.PHONY: run test docs lint typecheck bench power mutation fuzz fuzz-generic fuzz-x86 fuzz-ppc fuzz-arm64 crosshair clean \
	example-target

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,docs]'
	touch $(STAMP)

## run: a default fuzzing campaign over every area built so far, then a summary
run: $(STAMP)
	$(VENV)/bin/kvmspec campaign --minutes $(MINUTES)

## test: lint, type-check, then the whole test suite (fast Hypothesis profile)
test: $(STAMP) lint
	$(PY) -m pytest -q

## docs: build the documentation site into docs/_build/html (open index.html). Warnings are
# errors: every example runs, every picture is drawn, every rule's citation is checked.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html

lint: $(STAMP) typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy sees the three code folders under their import names through a symlink tree.
typecheck: $(STAMP)
	@rm -rf build/mypy && mkdir -p build/mypy/kvmspec
	@ln -s ../../../spec build/mypy/kvmspec/spec
	@ln -s ../../../reference build/mypy/kvmspec/reference
	@ln -s ../../../fuzz build/mypy/kvmspec/fuzz
	cd build/mypy && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		kvmspec ../../tests \
		../../docs/_ext/kvmspec_docs.py ../../docs/make_kernel_index.py

## bench: the performance figures of the issues (a benchmark, not a timed test; tests/bench/)
bench: $(STAMP)
	KVMSPEC_CONTRACTS=off PYTHONPATH=tests $(PY) -m bench

## power: the harness's power: the branch coverage of reference/ and spec/ that a campaign of
# POWER_MINUTES (default 10) reaches, per area (HTML with contexts in build/power/html), then
# how long the campaign's machines and fuzzers take to find each seed thread's bug,
# re-injected (median of 3 trials, one core; goal: under 60 s each), then the mutation score
# (see mutation below; its report and reach cache in build/mutation/). Each figure prints
# even when one before it misses its goal.
POWER_MINUTES ?= 10
power: $(STAMP)
	@rm -rf build/power && mkdir -p build/power
	$(VENV)/bin/coverage run -m kvmspec.fuzz.cli campaign --minutes $(POWER_MINUTES) \
		--report build/power/campaign.json > build/power/campaign.txt || true
	@$(VENV)/bin/coverage combine -q
	@$(VENV)/bin/coverage html -q
	@echo "Branch coverage after a $(POWER_MINUTES)-minute campaign (goal: 95%; HTML: build/power/html):"
	@$(VENV)/bin/coverage report --include='*/reference/*' --format=total | sed 's/^/  reference\/: /; s/$$/%/'
	@$(VENV)/bin/coverage report --include='*/spec/*' --format=total | sed 's/^/  spec\/: /; s/$$/%/'
	-$(PY) -m kvmspec.fuzz.seed_bugs
	@mkdir -p build/mutation
	-$(PY) -m kvmspec.fuzz.mutation --sample $(MUTATION_SAMPLE) --budget $(MUTATION_BUDGET) \
		--summary-only --report build/mutation/power.json

## mutation: the harness's mutation score on reference/: a random sample of mutmut's mutants,
# each run against the campaign areas that reach its line for MUTATION_BUDGET CPU seconds
# (goal: 90% of the non-equivalent ones killed), then the survivors and why each survives
MUTATION_SAMPLE ?= 150
MUTATION_BUDGET ?= 10
mutation: $(STAMP)
	@mkdir -p build/mutation
	$(PY) -m kvmspec.fuzz.mutation --sample $(MUTATION_SAMPLE) --budget $(MUTATION_BUDGET) \
		--report build/mutation/report.json

## fuzz: run the memslot Atheris fuzzer for 60 seconds
fuzz: $(STAMP)
	$(PY) fuzz/fuzz_memslots.py -max_total_time=60 -max_len=1024 corpus/seeds/memslots

## fuzz-generic: run the generic-layer Atheris fuzzer for 60 seconds; new inputs go to
# build/corpus/generic, the seeds are only read
fuzz-generic: $(STAMP)
	@mkdir -p build/corpus/generic
	$(PY) fuzz/fuzz_generic.py -max_total_time=60 -max_len=512 build/corpus/generic \
		corpus/seeds/generic

## fuzz-x86: run the x86 shadow-MMU Atheris fuzzer for 60 seconds; new inputs go to
# build/corpus/x86, the seeds are only read
fuzz-x86: $(STAMP)
	@mkdir -p build/corpus/x86
	$(PY) fuzz/fuzz_x86.py -max_total_time=60 -max_len=256 build/corpus/x86 corpus/seeds/x86

## fuzz-ppc: run the POWER HPT Atheris fuzzer for 60 seconds; new inputs go to
# build/corpus/ppc, the seeds are only read
fuzz-ppc: $(STAMP)
	@mkdir -p build/corpus/ppc
	$(PY) fuzz/fuzz_ppc.py -max_total_time=60 -max_len=256 build/corpus/ppc corpus/seeds/ppc

## fuzz-arm64: run the arm64 stage-2 Atheris fuzzer for 60 seconds; new inputs go to
# build/corpus/arm64, the seeds are only read
fuzz-arm64: $(STAMP)
	@mkdir -p build/corpus/arm64
	$(PY) fuzz/fuzz_arm64.py -max_total_time=60 -max_len=256 build/corpus/arm64 corpus/seeds/arm64

## crosshair: CrossHair over the pure contracts (memslot, CLEAR_DIRTY_LOG, dirty ring, HPT hash,
# stage-2 levels), CROSSHAIR_SECONDS of CPU per postcondition; tests/test_crosshair.py is the
# bounded CI form. kvmspec is a regular package through a symlink tree (CrossHair walks parents).
CROSSHAIR_SECONDS ?= 5
CROSSHAIR_ENTRIES := \
	kvmspec.spec.uapi.memslot_rules.decide_for_crosshair \
	kvmspec.spec.uapi.dirty_log_rules.clear_dirty_log_errno \
	kvmspec.spec.uapi.dirty_log_rules.clear_dirty_log_for_crosshair \
	kvmspec.reference.dirty_ring.kvm_dirty_ring_used \
	kvmspec.reference.dirty_ring.kvm_dirty_ring_slot \
	kvmspec.spec.crosshair_entries.dirty_ring_reset_for_crosshair \
	kvmspec.spec.crosshair_entries.hpt_placement_for_crosshair \
	kvmspec.spec.crosshair_entries.stage2_walk_for_crosshair

crosshair: $(STAMP)
	@rm -rf build/crosshair && mkdir -p build/crosshair/kvmspec
	@echo '"""kvmspec as a regular package, for CrossHair."""' > build/crosshair/kvmspec/__init__.py
	@ln -s ../../../spec build/crosshair/kvmspec/spec
	@ln -s ../../../reference build/crosshair/kvmspec/reference
	@ln -s ../../../fuzz build/crosshair/kvmspec/fuzz
	@cd build/crosshair && failed=0 && for entry in $(CROSSHAIR_ENTRIES); do \
		start=$$(date +%s); \
		KVMSPEC_CONTRACTS=off ../../$(VENV)/bin/crosshair check --report_all \
			--per_condition_timeout=$(CROSSHAIR_SECONDS) --per_path_timeout=1 \
			$$entry > report.txt 2>&1; \
		if [ $$? -eq 0 ]; then result=ok; else result=FAILED; failed=1; fi; \
		echo "$$entry: $$result ($$(( $$(date +%s) - start )) s)"; \
		sed 's|^.*/build/crosshair/|    |' report.txt; \
	done; exit $$failed

clean:
	rm -rf $(VENV) build docs/_build .pytest_cache .mypy_cache .ruff_cache .hypothesis

## example-target: build the C conformance target of the subprocess protocol
# (fuzz/targets/c_target; run it with --target "subprocess:./build/kvm-c-target")
example-target: build/kvm-c-target

build/kvm-c-target: fuzz/targets/c_target/kvm-c-target.c
	@mkdir -p build
	$(CC) -O2 -Wall -Werror -o $@ $<
