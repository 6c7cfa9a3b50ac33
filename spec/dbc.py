"""The one contract mechanism of kvmspec: PEP 316 conditions in docstrings.

A function's contract is written in its docstring, one condition per line, as PEP 316 and
CrossHair define them::

    pre: 0 <= slot <= 0xFFFFFFFF
    post: __return__.errno != 0 or __return__.change is not None

CrossHair checks these symbolically (``make crosshair``). At run time, :func:`checked` enforces
the same lines during tests and harness runs: the conditions are compiled once, when the module
is imported, and evaluated against the call's arguments (``__return__`` is the result). A
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
from types import CodeType
from typing import Any, TypeVar, cast

ENABLED: bool = os.environ.get("KVMSPEC_CONTRACTS", "on").lower() not in ("off", "0", "no")

F = TypeVar("F", bound=Callable[..., Any])
Condition = tuple[str, CodeType]


class ContractViolation(AssertionError):
    """A pre- or postcondition of a checked function did not hold."""


def conditions(function: Callable[..., Any]) -> tuple[list[Condition], list[Condition]]:
    """The compiled ``pre:`` and ``post:`` lines of ``function``'s docstring."""
    pres: list[Condition] = []
    posts: list[Condition] = []
    for line in (inspect.getdoc(function) or "").splitlines():
        kind, _, text = line.strip().partition(":")
        if kind in ("pre", "post") and text.strip():
            source = text.strip()
            code = compile(source, f"<{kind}condition of {function.__qualname__}>", "eval")
            (pres if kind == "pre" else posts).append((source, code))
    return pres, posts


def checked(function: F) -> F:
    """Enforce ``function``'s PEP 316 conditions on every call (unless contracts are off)."""
    pres, posts = conditions(function)
    if not ENABLED or not (pres or posts):
        return function
    signature = inspect.signature(function)
    names = list(signature.parameters)
    defaults = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    namespace = function.__globals__
    where = function.__qualname__

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = dict(defaults)
        bound.update(zip(names, args, strict=False))
        bound.update(kwargs)
        for source, code in pres:
            if not eval(code, namespace, bound):
                raise ContractViolation(f"{where}: precondition failed: {source}")
        result = function(*args, **kwargs)
        bound["__return__"] = result
        for source, code in posts:
            if not eval(code, namespace, bound):
                raise ContractViolation(f"{where}: postcondition failed: {source}")
        return result

    return cast(F, wrapper)
