"""The project's Hypothesis settings profiles, used deliberately.

* ``kvmspec-fast``: for ``make test`` and CI; a few dozen examples per machine, no deadline
  (a CI machine can be slow), derandomized so CI is reproducible.
* ``kvmspec-thorough``: for campaigns; many examples and long runs of steps.

Hypothesis registers its own ``ci`` profile and loads it when the ``CI`` environment variable
is set; the test suite loads ``kvmspec-fast`` on top of it either way.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

FAST = "kvmspec-fast"
THOROUGH = "kvmspec-thorough"


def register_profiles() -> None:
    """Register both profiles, once per process. Hypothesis bases a profile on the profile
    loaded when it is registered (``ci`` under CI), so registering again after loading one
    of ours would base ``kvmspec-thorough`` on ``kvmspec-fast`` (derandomized)."""
    if FAST in settings._profiles:
        return
    settings.register_profile(
        FAST,
        max_examples=40,
        stateful_step_count=30,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        THOROUGH,
        max_examples=2000,
        stateful_step_count=80,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def bug_hunt(examples: int) -> settings:
    """Settings for a test that must find a planted bug: the fast profile's runs, many of
    them, reproducible (derandomized), and no shrinking (finding the bug is the point, and a
    shrunk example would only cost time).

    Derandomized is reproducible only for one set of loaded modules: Hypothesis also draws
    the literal constants of every local module it has seen (its "local constants"), so the
    same test explores differently alone and in the whole suite. Give a hunt a budget well
    above what it needs alone; a run stops at the first finding, so that costs nothing
    while the bug is found."""
    return settings(
        settings.get_profile(FAST),
        max_examples=examples,
        derandomize=True,
        print_blob=False,
        phases=[Phase.explicit, Phase.generate],
        database=None,
    )
