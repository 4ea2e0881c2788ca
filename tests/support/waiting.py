"""Waiting for another thread or task: :func:`eventually` (polling a condition), gates that hold
a load, a count of callers provably waiting on a flight, crowds of concurrent callers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import pytest

WAIT = 5.0  # seconds any test waits for another thread or task before failing (never reached when green)

T = TypeVar("T")


def _polls(predicate: Callable[[], T], what: str, timeout: float, interval: float) -> Generator[float, None, T]:
    """Yields the seconds to sleep between polls; returns the first truthy ``predicate()``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what} (last value: {result!r})")
        yield interval


def eventually(
    predicate: Callable[[], T],
    what: str = "the condition",
    *,
    mode: Any = None,
    timeout: float = WAIT,
    interval: float = 0.002,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail the test
    naming ``what`` after ``timeout`` seconds. Given an async ``mode``, the test's event loop
    runs meanwhile (background loads and refreshes are tasks on it); inside a coroutine, use
    :func:`aeventually`."""
    if mode is not None and mode.is_async:
        result: T = mode.run(aeventually(predicate, what, timeout=timeout, interval=interval))
        return result
    polls = _polls(predicate, what, timeout, interval)
    try:
        while True:
            time.sleep(next(polls))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def aeventually(
    predicate: Callable[[], T], what: str = "the condition", *, timeout: float = WAIT, interval: float = 0.0
) -> T:
    """:func:`eventually` inside a coroutine: the loop runs between polls (``interval`` 0: every
    other task gets one turn)."""
    polls = _polls(predicate, what, timeout, interval)
    try:
        while True:
            await asyncio.sleep(next(polls))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class Gate:
    """Holds a sync or async function until the test opens it (the ``gate`` fixture opens it
    at teardown, so no worker thread stays stuck)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def open(self) -> None:
        self.event.set()

    def block(self) -> None:
        assert self.event.wait(WAIT), "the gate was never opened"

    async def ablock(self) -> None:
        await aeventually(self.event.is_set, "the gate to open", interval=0.002)


class Joined:
    """Counts callers that wait on a flight (instead of loading), so a function can hold its
    load until a known number of callers are provably waiting for it (the ``joined`` fixture
    counts ``Flight.add_waiter``)."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def bump(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def reach(self, n: int) -> Mark:
        return Mark(self, n)

    def block(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, WAIT), f"{self.count} of {n} callers joined"

    async def ablock(self, n: int) -> None:
        # bumped on this loop's thread by the tasks that join
        await aeventually(lambda: self.count >= n, f"{n} callers to join")


class Mark:
    """Something a call waits for: ``n`` callers joined."""

    def __init__(self, joined: Joined, n: int) -> None:
        self.joined, self.n = joined, n

    def block(self) -> None:
        self.joined.block(self.n)

    async def ablock(self) -> None:
        await self.joined.ablock(self.n)


def crowd(mode: Any, n: int, call: Callable[[], Any]) -> tuple[list[Any], float]:
    """``n`` concurrent ``call()``s (threads, or tasks in async mode): results or exceptions,
    and the seconds until the last returned."""
    started = time.monotonic()
    if mode.is_async:

        async def gather() -> list[Any]:
            return await asyncio.wait_for(asyncio.gather(*(call() for _ in range(n)), return_exceptions=True), WAIT)

        results: list[Any] = mode.run(gather())
        return results, time.monotonic() - started
    results = [None] * n
    go = threading.Event()

    def run(i: int) -> None:
        go.wait()
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started = time.monotonic()
    go.set()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a caller is still waiting"
    return results, time.monotonic() - started
