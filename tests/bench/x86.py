"""The x86 shadow MMU's fuzzing figures: how fast its state machine and its Atheris target run.

* State-machine steps per second: the campaign's area ``x86/<profile>``
  (:func:`kvmspec.fuzz.x86_machine.x86_machine`, both layouts) run as the campaign runs it,
  in slices of ten examples under the ``kvmspec-thorough`` Hypothesis profile (no example
  database), for a time budget; a step is one rule, with every check after it, Hypothesis's
  own drawing and shrinking-ready bookkeeping included.
* ``fuzz/fuzz_x86.py`` under libFuzzer: executions per second (and harness actions per
  second, from its counters), measured by :func:`bench.fuzzer.measure` from
  ``corpus/seeds/x86``.
"""

from __future__ import annotations

import time

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from bench.fuzzer import FuzzScript
from kvmspec.fuzz import machines
from kvmspec.fuzz.profiles import THOROUGH, register_profiles
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.spec.platforms import PlatformProfile

FUZZ_X86 = FuzzScript("fuzz/fuzz_x86.py", "corpus/seeds/x86", 256)
SLICE_EXAMPLES = 10


def machine_steps_per_second(profile: PlatformProfile, seconds: float = 5.0) -> float:
    """Rules per second of the x86 state machine, run in the campaign's slices for about
    ``seconds``."""
    register_profiles()
    machine = x86_machine(profile)
    slice_settings = settings(
        settings.get_profile(THOROUGH), max_examples=SLICE_EXAMPLES, database=None
    )
    before = machines.STATS["steps"]
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        run_state_machine_as_test(machine, settings=slice_settings)
    return (machines.STATS["steps"] - before) / (time.perf_counter() - started)
