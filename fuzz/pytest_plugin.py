"""The kvmspec pytest plugin: check another implementation of the target interface.

``pytest --kvmspec-target=TARGET --pyargs kvmspec.fuzz.conformance_suite`` runs the
conformance suite (:mod:`kvmspec.fuzz.conformance_suite`) against TARGET: every trace of
the conformance corpus, each observation compared with the one the real kernel gave and
every step judged by the black-box contracts, then the differential state machine, the
reference and TARGET in lockstep. TARGET is one of

* ``package.module:factory``: a callable taking a :class:`PlatformProfile` and returning a
  fresh :class:`~kvmspec.fuzz.targets.base.Target` (one new VM);
* ``subprocess:COMMAND``: a program in any language that speaks the subprocess protocol
  (:mod:`kvmspec.fuzz.targets.subprocess_target`);
* a built-in target name, ``reference`` or ``linux-kvm``.

The plugin is registered through the ``pytest11`` entry point, so it is available wherever
kvmspec is installed; ``-p kvmspec.fuzz.pytest_plugin`` loads it explicitly. Without
``--kvmspec-target`` it only adds its options. docs/conformance.md is the guide.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmspec.fuzz.targets import SUBPROCESS_PREFIX, Target, make_target
from kvmspec.fuzz.targets.subprocess_target import DEFAULT_TIMEOUT, SubprocessTarget
from kvmspec.spec.platforms import PlatformProfile

TargetFactory = Callable[[PlatformProfile], Target]

DEFAULT_EXAMPLES = 25
"""Hypothesis examples of the differential machine per profile."""
SHIPPED_CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "conformance"
"""The conformance corpus next to the code (a source checkout or an editable install)."""

FACTORY_KEY = pytest.StashKey[TargetFactory]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmspec", "kvmspec conformance (kvmspec.fuzz.conformance_suite)")
    group.addoption(
        "--kvmspec-target",
        metavar="TARGET",
        default=None,
        help="the implementation to check: package.module:factory, subprocess:COMMAND, "
        "reference or linux-kvm",
    )
    group.addoption(
        "--kvmspec-corpus",
        metavar="DIR",
        default=None,
        help="the conformance corpus: a folder of <profile>/*.jsonl traces "
        "(default: the corpus/conformance next to kvmspec's code)",
    )
    group.addoption(
        "--kvmspec-examples",
        metavar="N",
        type=int,
        default=DEFAULT_EXAMPLES,
        help=f"Hypothesis examples of the differential machine (default {DEFAULT_EXAMPLES}; "
        "0 skips it)",
    )
    group.addoption(
        "--kvmspec-shrink",
        action="store_true",
        help="shrink a failing differential run to a minimal one (can take minutes); by "
        "default the first failing run is reported as found",
    )
    group.addoption(
        "--kvmspec-timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"how long a subprocess target has to answer one operation (default "
        f"{DEFAULT_TIMEOUT:g})",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Resolve --kvmspec-target once, so that a bad one is one usage error, not one error
    per test."""
    spec = config.getoption("kvmspec_target", None)
    if spec is not None:
        config.stash[FACTORY_KEY] = target_factory(spec, config.getoption("kvmspec_timeout"))


def target_factory(spec: str, timeout: float = DEFAULT_TIMEOUT) -> TargetFactory:
    """The factory a --kvmspec-target value names. Raises pytest.UsageError (one line) for a
    value that names nothing callable."""
    if spec.startswith(SUBPROCESS_PREFIX):
        command = spec[len(SUBPROCESS_PREFIX) :].strip()
        if not command:
            raise pytest.UsageError("--kvmspec-target=subprocess: needs a command line")
        return lambda profile: SubprocessTarget(command, profile, timeout)
    if spec in ("reference", "linux-kvm"):
        return lambda profile: make_target(spec, profile)
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise pytest.UsageError(
            f"--kvmspec-target={spec}: expected package.module:factory, subprocess:COMMAND, "
            "reference or linux-kvm"
        )
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as error:
        raise pytest.UsageError(
            f"--kvmspec-target={spec}: cannot import {module_name}: {error}"
        ) from None
    for part in attribute.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        raise pytest.UsageError(
            f"--kvmspec-target={spec}: {attribute} is not a callable of {module_name}"
        )
    factory: TargetFactory = found
    return factory


@pytest.fixture(scope="session")
def kvmspec_target_factory(pytestconfig: pytest.Config) -> TargetFactory:
    """The factory of the target under test (skips when --kvmspec-target is not given)."""
    factory = pytestconfig.stash.get(FACTORY_KEY, None)
    if factory is None:
        pytest.skip(
            "no target to check: give --kvmspec-target=package.module:factory or subprocess:COMMAND"
        )
    return factory


def corpus_folder(config: pytest.Config) -> Path:
    """The conformance corpus the suite replays."""
    given = config.getoption("kvmspec_corpus", None)
    return Path(given) if given else SHIPPED_CORPUS
