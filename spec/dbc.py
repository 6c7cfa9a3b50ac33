"""The one contract mechanism of kvmspec: PEP 316 conditions in docstrings.

A function's contract is written in its docstring, one condition per line, as PEP 316 and
CrossHair define them::

    pre: 0 <= slot <= 0xFFFFFFFF
    post: __return__.errno != 0 or __return__.change is not None

CrossHair checks these symbolically (``make crosshair``). At run time, :func:`checked` enforces
the same lines during tests and harness runs: each condition is compiled once, when the module
is imported, into a function of the checked function's parameters (and ``__return__``, the
result), and called with the call's arguments. A
failing condition raises :class:`ContractViolation`, an AssertionError, so the harness reports
it as a finding. Benchmarks set ``KVMSPEC_CONTRACTS=off`` before import, and ``checked`` then
returns the function untouched.

Why not icontract or deal: both resolve the call's arguments through ``inspect`` on every
call, which cost 24 µs per memslot decision here, ten times the decision itself, and kept the
fuzzers below their speed goal. The conditions are our own source text, never user input.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

ENABLED: bool = os.environ.get("KVMSPEC_CONTRACTS", "on").lower() not in ("off", "0", "no")

F = TypeVar("F", bound=Callable[..., Any])


class ContractViolation(AssertionError):
    """A pre- or postcondition of a checked function did not hold."""


def conditions(function: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """The ``pre:`` and ``post:`` lines of ``function``'s docstring, as source text."""
    pres: list[str] = []
    posts: list[str] = []
    for line in (inspect.getdoc(function) or "").splitlines():
        kind, _, text = line.strip().partition(":")
        if kind in ("pre", "post") and text.strip():
            (pres if kind == "pre" else posts).append(text.strip())
    return pres, posts


def _condition_function(
    function: Callable[..., Any], kind: str, source: str, parameters: list[str]
) -> Callable[..., Any]:
    """One condition as a function of the checked function's parameters (and, for a
    postcondition, ``__return__``), defined in that function's module so that it sees the
    same globals. Calling it with the call's own positional arguments costs a fraction of
    building a namespace and evaluating the expression in it."""
    arguments = ", ".join(parameters)
    text = f"def condition({arguments}):\n    return {source}\n"
    scope: dict[str, Any] = {}
    exec(
        compile(text, f"<{kind}condition of {function.__qualname__}>", "exec"),
        function.__globals__,
        scope,
    )
    condition: Callable[..., Any] = scope["condition"]
    return condition


def checked(function: F) -> F:
    """Enforce ``function``'s PEP 316 conditions on every call (unless contracts are off)."""
    pres, posts = conditions(function)
    if not ENABLED or not (pres or posts):
        return function
    signature = inspect.signature(function)
    names = list(signature.parameters)
    where = function.__qualname__
    pre_checks = [(source, _condition_function(function, "pre", source, names)) for source in pres]
    post_checks = [
        (source, _condition_function(function, "post", source, [*names, "__return__"]))
        for source in posts
    ]

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != len(names):
            # Keywords or defaults: put the arguments in parameter order first.
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = tuple(bound.arguments.values())
        else:
            values = args
        for source, condition in pre_checks:
            if not condition(*values):
                raise ContractViolation(f"{where}: precondition failed: {source}")
        result = function(*args, **kwargs)
        for source, condition in post_checks:
            if not condition(*values, result):
                raise ContractViolation(f"{where}: postcondition failed: {source}")
        return result

    return cast(F, wrapper)
