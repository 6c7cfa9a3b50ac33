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

import bench
from bench.fuzzer import FuzzScript
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.spec.platforms import PlatformProfile

FUZZ_X86 = FuzzScript("fuzz/fuzz_x86.py", "corpus/seeds/x86", 256)


def machine_steps_per_second(profile: PlatformProfile, seconds: float = 5.0) -> float:
    """Rules per second of the x86 state machine, as the campaign runs it."""
    return bench.machine_steps_per_second(x86_machine(profile), seconds)
