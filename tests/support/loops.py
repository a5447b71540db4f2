"""Event loops to run the same test on: asyncio's and uvloop's (anyio conftest style).

Name: loops
Scope: per test (a fresh loop each time).
Depends: uvloop when importable; the uvloop parameter is skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

uvloop: Any
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency, but keep the asyncio half usable
    uvloop = None

T = TypeVar("T")

LOOP_FACTORIES = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(
        uvloop.new_event_loop if uvloop is not None else None,
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not importable"),
    ),
]


def runner(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], budget_s: float | None = None
) -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Yields `run(coro)` on a fresh loop from `loop_factory`, each run bounded by `budget_s`."""
    with asyncio.Runner(loop_factory=loop_factory) as loop_runner:

        def run(coro: Coroutine[Any, Any, T]) -> T:
            return loop_runner.run(coro if budget_s is None else asyncio.wait_for(coro, budget_s))

        yield run
