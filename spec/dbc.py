"""The one contract mechanism of kvmspec: icontract, switchable for benchmarks.

Pre- and postconditions on the pure decision functions are checked at run time during tests
and harness runs, and CrossHair checks them symbolically (``make crosshair``). Benchmarks set
``KVMSPEC_CONTRACTS=off`` before import, which removes the checks entirely (icontract then
returns the undecorated function).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import icontract

ENABLED: bool = os.environ.get("KVMSPEC_CONTRACTS", "on").lower() not in ("off", "0", "no")

F = TypeVar("F", bound=Callable[..., Any])


def require(condition: Callable[..., Any], description: str) -> Callable[[F], F]:
    """A precondition: the caller broke the contract if it does not hold."""
    decorator: Callable[[F], F] = icontract.require(
        condition, description=description, enabled=ENABLED
    )
    return decorator


def ensure(condition: Callable[..., Any], description: str) -> Callable[[F], F]:
    """A postcondition: the function broke the contract if it does not hold."""
    decorator: Callable[[F], F] = icontract.ensure(
        condition, description=description, enabled=ENABLED
    )
    return decorator
